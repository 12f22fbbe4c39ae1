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
* every request has a timeout (``timeout_s``, unless the call passes its own).

``sleep`` is injectable so tests can record the delays instead of waiting for them.
"""
from __future__ import annotations

import email.utils
import time
from typing import Any, Callable, Collection, Mapping

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, NewConnectionError, ReadTimeoutError
from urllib3.exceptions import ConnectTimeoutError as Urllib3ConnectTimeout
from urllib3.util.retry import Retry

#: Statuses worth retrying for a data API: rate limiting and server-side failures.
RETRY_STATUSES: frozenset[int] = frozenset({429, *range(500, 600)})


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
        if (response is not None and self.respect_retry_after_header
                and response.status in self.RETRY_AFTER_STATUS_CODES):
            delay = self.get_retry_after(response)
        self.sleep_fn(self.get_backoff_time() if delay is None else delay)


class _TimeoutAdapter(HTTPAdapter):
    """An HTTPAdapter that gives every request a default timeout (requests has none)."""

    def __init__(self, *, timeout_s: float, **kwargs: Any) -> None:
        self.timeout_s = timeout_s
        super().__init__(**kwargs)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout_s
        return super().send(request, **kwargs)


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
) -> requests.Session:
    """A ``requests.Session`` whose http:// and https:// adapters retry with :class:`BoundedRetry`.

    ``methods=None`` retries every verb (the default retries only idempotent ones). Close the session when done
    (it is a context manager).
    """
    if timeout_s <= 0:
        raise ValueError("timeout_s must be > 0")
    retry = make_retry(retries, backoff_s, backoff_max_s=backoff_max_s, retry_after_cap_s=retry_after_cap_s,
                       retry_statuses=retry_statuses, methods=methods, sleep=sleep)
    session = requests.Session()
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
    """One line for a request that got no response: ``timeout after T s (...)`` or ``connection error: ...``."""
    cause = _root_cause(exc)
    if is_timeout(exc):
        after = f" after {timeout_s:g} s" if timeout_s is not None else ""
        return f"timeout{after} ({type(cause).__name__})"
    return f"connection error: {type(cause).__name__}: {cause}"
