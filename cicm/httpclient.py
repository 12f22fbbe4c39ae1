"""The one way cicm builds an outbound HTTP client: a ``requests.Session`` with urllib3's ``Retry`` mounted.

Every outbound client (the carbon providers, the agent's ecovisor client) gets its session from
:func:`make_session`, so retries, back-off and timeouts follow one policy:

* a request is tried at most ``retries + 1`` times; connection errors, timeouts and the statuses in
  ``retry_statuses`` are retried, every other status is returned at once;
* the delay before retry *n* (1-based) is ``backoff_s * 2**(n-1)``, capped at ``backoff_max_s`` (set
  ``backoff_max_s = backoff_s`` for a fixed delay);
* an HTTP 429 with a usable ``Retry-After`` (seconds, fractional seconds or an HTTP date) waits that long instead,
  capped at ``retry_after_cap_s``; a missing or unusable header falls back to the back-off;
* when the retries are used up on a status, the last response is returned (``raise_on_status=False``) so the
  caller can report its status and body; on a transport error ``requests`` raises, and :func:`transport_problem`
  says whether it was a timeout or a connection error;
* every request has a timeout (``timeout_s``, unless the call passes its own);
* every call (``session.get(...)``: its retries, their back-off, redirects, and the body) has an overall
  wall-clock **deadline**, ``deadline_s`` (default :data:`DEFAULT_DEADLINE_S`, 60 s): each connect and read waits at
  most what is left of it, a back-off or ``Retry-After`` wait that would end past it gives up at once
  (:class:`DeadlineExceeded`, naming the wait), and a watchdog shuts the call's sockets when it passes, so a server
  that trickles one byte every few seconds (each read within its timeout) is cut off too;
* the body is read by the session (``stream=True`` inside) and refused past ``max_body_bytes`` (default
  :data:`MAX_BODY_BYTES`, 20 MB: :class:`ResponseTooLarge`). A caller that asks for ``stream=True`` reads the body
  itself: :func:`read_body` keeps to the same deadline and bound (``response.deadline``) and ends the watchdog.

Both errors are ``requests`` exceptions (:class:`DeadlineExceeded` a ``requests.Timeout``), so callers that catch
``requests.RequestException`` see them; :func:`transport_problem` gives their own message.

``sleep`` is injectable so tests can record the delays instead of waiting for them.
"""
from __future__ import annotations

import contextvars
import email.utils
import socket
import threading
import time
from typing import Any, Callable, Collection, Mapping

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import MaxRetryError, NewConnectionError, ReadTimeoutError
from urllib3.exceptions import ConnectTimeoutError as Urllib3ConnectTimeout
from urllib3.util.retry import Retry
from urllib3.util.timeout import Timeout

#: Statuses worth retrying for a data API: rate limiting and server-side failures.
RETRY_STATUSES: frozenset[int] = frozenset({429, *range(500, 600)})
#: Overall wall-clock limit of one call (retries, waits and body included), unless the session says otherwise.
DEFAULT_DEADLINE_S = 60.0
#: Largest body a session reads (20 MB, as cicm.jsonsafe.MAX_BYTES).
MAX_BODY_BYTES = 20 * 1024 * 1024


class DeadlineExceeded(requests.Timeout):
    """A call's overall deadline passed (or a wait it was asked for would pass it). ``status`` is the HTTP status
    of the last response, if one had come (a 429 whose Retry-After is too long)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


class ResponseTooLarge(requests.RequestException):
    """A response body larger than the session's ``max_body_bytes``."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


class Deadline:
    """One call's wall-clock deadline and its watchdog: the sockets the call reads from are shut down when the
    deadline passes (a blocked read then returns at once); :meth:`end` stops the watchdog."""

    def __init__(self, seconds: float, what: str = "request") -> None:
        self.seconds = float(seconds)
        self.what = what
        self.started = time.monotonic()
        self.at = self.started + self.seconds
        self.fired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._ended = False
        self._timer = threading.Timer(max(self.seconds, 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def expired(self) -> bool:
        return self.fired or self.remaining() <= 0

    def watch(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            if self._ended:
                return
            if self.fired:
                _shut(sock)
            self._sockets.append(sock)

    def _fire(self) -> None:
        with self._lock:
            if self._ended:
                return
            self.fired = True
            for sock in self._sockets:
                _shut(sock)

    def end(self) -> None:
        """The call is over (body read, or failed): stop the watchdog and forget its sockets."""
        with self._lock:
            self._ended = True
            self._sockets.clear()
        self._timer.cancel()

    def exceeded(self, doing: str, status: int | None = None) -> DeadlineExceeded:
        return DeadlineExceeded(f"deadline of {self.seconds:g} s passed {doing} ({self.what}; "
                                f"{self.elapsed():.1f} s elapsed)", status)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


#: The deadline of the call running in this thread (set by DeadlineSession.send for the duration of the call).
_CURRENT: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("cicm_http_deadline", default=None)


class _DeadlineTimeout(Timeout):
    """urllib3's Timeout whose connect and read timeouts never pass the current call's deadline (urllib3 asks for
    them again at each retry, so every attempt gets what is left)."""

    def __init__(self, *args: Any, deadline: Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def clone(self) -> "_DeadlineTimeout":
        return _DeadlineTimeout(connect=self._connect, read=self._read, total=self.total, deadline=self._deadline)

    def _bounded(self, value: Any) -> Any:
        left = max(self._deadline.remaining(), 0.001)
        if value is None or not isinstance(value, (int, float)):
            return left
        return min(float(value), left)

    @property
    def connect_timeout(self) -> Any:
        return self._bounded(super().connect_timeout)

    @property
    def read_timeout(self) -> Any:
        return self._bounded(super().read_timeout)


class _Watched:
    """Mixed into urllib3's connections: the current call's deadline watches the socket while the response is
    awaited and read."""

    sock: Any

    def getresponse(self) -> Any:
        deadline = _CURRENT.get()
        if deadline is not None:
            deadline.watch(self.sock)
        return super().getresponse()  # type: ignore[misc]


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _WatchedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


def retry_after_s(header: str | None, *, now_s: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date); None if absent/unusable."""
    if header is None or not header.strip():
        return None
    text = header.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now_s is None else now_s)
    if seconds != seconds:  # NaN
        return None
    return max(seconds, 0.0)


class BoundedRetry(Retry):
    """urllib3's ``Retry`` with cicm's delays: exponential from the first retry, capped, and an injectable sleep.

    urllib3's own schedule waits 0 s before the first retry and only parses whole-second ``Retry-After`` values
    (raising on others); this keeps the documented schedule above and treats a bad header as absent.
    """

    #: Only a 429's Retry-After is honoured (a 503 from our own services uses the back-off).
    RETRY_AFTER_STATUS_CODES = frozenset({429})

    def __init__(self, *args: Any, sleep: Callable[[float], None] = time.sleep, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sleep_fn = sleep

    def new(self, **kw: Any) -> "BoundedRetry":
        kw.setdefault("sleep", self.sleep_fn)
        return super().new(**kw)

    def get_backoff_time(self) -> float:
        failures = len(self.history)
        if failures < 1:
            return 0.0
        return float(max(0.0, min(self.backoff_max, self.backoff_factor * 2 ** (failures - 1))))

    def get_retry_after(self, response: Any) -> float | None:
        seconds = retry_after_s(response.headers.get("Retry-After"))
        return None if seconds is None else min(seconds, float(self.retry_after_max))

    def sleep(self, response: Any = None) -> None:
        delay = None
        asked = None
        if (response is not None and self.respect_retry_after_header
                and response.status in self.RETRY_AFTER_STATUS_CODES):
            asked = retry_after_s(response.headers.get("Retry-After"))
            delay = self.get_retry_after(response)
        wait = self.get_backoff_time() if delay is None else delay
        deadline = _CURRENT.get()
        if deadline is not None and wait > deadline.remaining():
            status = getattr(response, "status", None)
            if asked is not None:
                why = (f"HTTP {status} asked to retry after {asked:g} s (Retry-After, capped at "
                       f"{float(self.retry_after_max):g} s)")
            elif status is not None:
                why = f"HTTP {status}; the back-off of {wait:g} s before the next attempt"
            else:
                why = f"the back-off of {wait:g} s before the next attempt"
            raise deadline.exceeded(f"before the next attempt: {why} would end "
                                    f"{wait - max(deadline.remaining(), 0):.1f} s past it", status)
        self.sleep_fn(wait)


class _TimeoutAdapter(HTTPAdapter):
    """An HTTPAdapter that gives every request a default timeout (requests has none), never past the current
    call's deadline, and whose connections report their sockets to that deadline's watchdog."""

    def __init__(self, *, timeout_s: float, **kwargs: Any) -> None:
        self.timeout_s = timeout_s
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {  # type: ignore[assignment]
            "http": _WatchedHTTPConnectionPool, "https": _WatchedHTTPSConnectionPool}

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        timeout = kwargs.get("timeout")
        if timeout is None:
            timeout = self.timeout_s
        deadline = _CURRENT.get()
        if deadline is not None:
            if deadline.expired():
                raise deadline.exceeded(f"before {request.method} {request.url} was sent")
            if isinstance(timeout, Timeout):
                connect, read = timeout.connect_timeout, timeout.read_timeout
            elif isinstance(timeout, tuple):
                connect, read = timeout
            else:
                connect = read = timeout
            timeout = _DeadlineTimeout(connect=connect, read=read, deadline=deadline)
        kwargs["timeout"] = timeout
        try:
            return super().send(request, **kwargs)
        except requests.RequestException as exc:
            inner = _root_cause(exc)
            if isinstance(inner, DeadlineExceeded):  # raised in BoundedRetry.sleep, wrapped by requests
                raise inner from exc
            raise


class DeadlineSession(requests.Session):
    """A ``requests.Session`` whose every call has an overall wall-clock deadline and a body-size bound (see the
    module docstring). ``deadline_s`` and ``max_body_bytes`` are attributes: change them on the session."""

    def __init__(self, deadline_s: float = DEFAULT_DEADLINE_S, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        super().__init__()
        self.deadline_s = deadline_s
        self.max_body_bytes = max_body_bytes

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if _CURRENT.get() is not None:  # a redirect inside a call: the call's deadline holds
            return super().send(request, **kwargs)
        deadline = Deadline(self.deadline_s, f"{request.method} {request.url}")
        token = _CURRENT.set(deadline)
        stream = bool(kwargs.get("stream"))
        kwargs["stream"] = True
        try:
            response = super().send(request, **kwargs)
        except DeadlineExceeded:
            deadline.end()
            raise
        except requests.RequestException as exc:
            deadline.end()
            if deadline.expired():
                raise deadline.exceeded(f"waiting for {request.method} {request.url}: {transport_problem(exc)}") \
                    from exc
            raise
        except BaseException:
            deadline.end()
            raise
        finally:
            _CURRENT.reset(token)
        response.deadline = deadline  # type: ignore[attr-defined]
        response.max_body_bytes = self.max_body_bytes  # type: ignore[attr-defined]
        if not stream:
            response._content = read_body(response)  # bounded in time and size, then the watchdog ends
        return response


def read_body(response: requests.Response, max_bytes: int | None = None, *, truncate: bool = False) -> bytes:
    """The body of a streamed ``response``, read within its call's deadline (``response.deadline``, set by a
    :class:`DeadlineSession`) and at most ``max_bytes`` (default: the session's ``max_body_bytes``, else
    :data:`MAX_BODY_BYTES`). Past the bound: :class:`ResponseTooLarge`, or with ``truncate`` the first
    ``max_bytes`` (an error page). Past the deadline: :class:`DeadlineExceeded`. The response is closed after."""
    deadline: Deadline | None = getattr(response, "deadline", None)
    if max_bytes is None:
        max_bytes = getattr(response, "max_body_bytes", MAX_BODY_BYTES)
    if response._content is not False and not isinstance(response._content, bool):  # already read
        content = response._content or b""
        if len(content) > max_bytes and not truncate:
            raise ResponseTooLarge(f"response body: larger than the {max_bytes:,}-byte limit from {response.url}",
                                   response.status_code)
        return content[:max_bytes] if truncate else content
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.iter_content(chunk_size=64 * 1024):
            size += len(chunk)
            if size > max_bytes:
                if truncate:
                    chunks.append(chunk[:max_bytes - size])
                    break
                raise ResponseTooLarge(f"response body: larger than the {max_bytes:,}-byte limit from "
                                       f"{response.url}", response.status_code)
            chunks.append(chunk)
            if deadline is not None and deadline.expired():
                break
        if deadline is not None and deadline.expired():  # the watchdog may have cut the body short
            raise deadline.exceeded(f"reading the body from {response.url} ({size:,} bytes read)",
                                    response.status_code)
    except requests.RequestException as exc:
        if isinstance(exc, (DeadlineExceeded, ResponseTooLarge)):
            raise
        if deadline is not None and deadline.expired():
            raise deadline.exceeded(f"reading the body from {response.url} ({size:,} bytes read)",
                                    response.status_code) from exc
        raise
    finally:
        response.close()
        if deadline is not None:
            deadline.end()
    return b"".join(chunks)


def make_retry(
    retries: int,
    backoff_s: float,
    *,
    backoff_max_s: float = 30.0,
    retry_after_cap_s: float = 60.0,
    retry_statuses: Collection[int] = RETRY_STATUSES,
    methods: Collection[str] | None = Retry.DEFAULT_ALLOWED_METHODS,
    sleep: Callable[[float], None] = time.sleep,
) -> BoundedRetry:
    """The urllib3 ``Retry`` that :func:`make_session` mounts (see the module docstring)."""
    if retries < 0:
        raise ValueError("retries must be >= 0")
    if backoff_s < 0 or backoff_max_s < 0 or retry_after_cap_s < 0:
        raise ValueError("back-off and Retry-After caps must be >= 0")
    return BoundedRetry(
        total=retries,
        connect=None,
        read=None,
        redirect=False,  # requests follows redirects itself
        status=None,
        allowed_methods=methods,
        status_forcelist=frozenset(retry_statuses),
        backoff_factor=backoff_s,
        backoff_max=backoff_max_s,
        retry_after_max=retry_after_cap_s,  # type: ignore[arg-type]  # urllib3 types it int; floats work
        raise_on_status=False,
        respect_retry_after_header=True,
        sleep=sleep,
    )


def make_session(
    retries: int = 2,
    backoff_s: float = 0.5,
    timeout_s: float = 10.0,
    *,
    backoff_max_s: float = 30.0,
    retry_after_cap_s: float = 60.0,
    retry_statuses: Collection[int] = RETRY_STATUSES,
    methods: Collection[str] | None = Retry.DEFAULT_ALLOWED_METHODS,
    headers: Mapping[str, str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    deadline_s: float = DEFAULT_DEADLINE_S,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> DeadlineSession:
    """A :class:`DeadlineSession` whose http:// and https:// adapters retry with :class:`BoundedRetry`.

    ``methods=None`` retries every verb (the default retries only idempotent ones). ``deadline_s`` bounds each
    call in wall-clock time, ``max_body_bytes`` its body. Close the session when done (it is a context manager).
    """
    if timeout_s <= 0:
        raise ValueError("timeout_s must be > 0")
    if deadline_s <= 0:
        raise ValueError("deadline_s must be > 0")
    if max_body_bytes <= 0:
        raise ValueError("max_body_bytes must be > 0")
    retry = make_retry(retries, backoff_s, backoff_max_s=backoff_max_s, retry_after_cap_s=retry_after_cap_s,
                       retry_statuses=retry_statuses, methods=methods, sleep=sleep)
    session = DeadlineSession(deadline_s=deadline_s, max_body_bytes=max_body_bytes)
    adapter = _TimeoutAdapter(timeout_s=timeout_s, max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if headers:
        session.headers.update(headers)
    return session


def session_timeout_s(session: requests.Session, url: str) -> float | None:
    """The default timeout of the adapter serving ``url`` (None for sessions not built by make_session)."""
    adapter = session.get_adapter(url)
    return getattr(adapter, "timeout_s", None)


def session_max_attempts(session: requests.Session, url: str) -> int | None:
    """Most requests the session makes for one call to ``url`` (None when its adapter does not say)."""
    retry = getattr(session.get_adapter(url), "max_retries", None)
    total = getattr(retry, "total", None)
    return total + 1 if isinstance(total, int) and not isinstance(total, bool) else None


def attempts_made(response: requests.Response) -> int:
    """How many requests urllib3 made to get ``response`` (1 when it was not retried)."""
    retries = getattr(response.raw, "retries", None)
    return len(retries.history) + 1 if retries is not None else 1


def _root_cause(exc: BaseException) -> BaseException:
    """The urllib3 error inside a requests exception (unwrapping MaxRetryError), else ``exc`` itself."""
    reason = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
    if isinstance(reason, MaxRetryError) and reason.reason is not None:
        reason = reason.reason
    return reason


def is_timeout(exc: BaseException) -> bool:
    """A requests exception caused by a connect or read timeout (also when urllib3 wrapped it in MaxRetryError)."""
    if isinstance(exc, requests.Timeout):
        return True
    reason = _root_cause(exc)
    if isinstance(reason, NewConnectionError):  # a refused connection subclasses ConnectTimeoutError
        return False
    return isinstance(reason, (ReadTimeoutError, Urllib3ConnectTimeout))


def transport_problem(exc: BaseException, timeout_s: float | None = None) -> str:
    """One line for a request that got no response: ``timeout after T s (...)`` or ``connection error: ...``; a
    passed deadline or a too-large body says so in its own words."""
    if isinstance(exc, (DeadlineExceeded, ResponseTooLarge)):
        return str(exc)
    cause = _root_cause(exc)
    if is_timeout(exc):
        after = f" after {timeout_s:g} s" if timeout_s is not None else ""
        return f"timeout{after} ({type(cause).__name__})"
    return f"connection error: {type(cause).__name__}: {cause}"
