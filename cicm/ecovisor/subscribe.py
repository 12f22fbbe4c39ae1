"""A Python client of the ecovisor's notifications: server-sent events of ``GET /v1/apps/{app}/events``.

    from cicm.ecovisor.subscribe import subscribe

    for ev in subscribe("http://127.0.0.1:8700", token, types=("solar", "carbon", "battery"), timeout=3600):
        if ev.type == "resync":          # events were lost (the ecovisor restarted, or this reader fell behind)
            ...                          # read the current values with the getters
        elif ev.type == "carbon_change":
            ev.data["gco2_per_kwh"], ev.data["time"]

It yields :class:`Event` s until ``timeout`` seconds (wall clock) have passed, then stops (``None``: never).
A dropped connection, a stream the server ended, an idle stream (no byte, not even a keep-alive, for ``idle_s``),
a 429 (too many streams of the app; ``Retry-After`` is honoured) or a 5xx are retried within that wait, with
``Last-Event-ID`` so nothing is missed; 401, 403, 404 and 422 raise :class:`SubscriptionError` (retrying will not
help). Each connection is a :func:`cicm.httpclient.make_session` call whose overall deadline is explicit: the
time left of ``timeout``, at most ``connection_s`` (then it reconnects, seamlessly, with Last-Event-ID).

This module needs only ``requests`` and :mod:`cicm.httpclient` (not the ecovisor's server): it can be copied
next to a client that may not import ``cicm.ecovisor``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterable, Iterator

import requests

from cicm.httpclient import make_session, read_body, retry_after_s

DEFAULT_TYPES = ("solar", "carbon", "battery")
MAX_EVENT_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Event:
    """One notification: ``type`` (``solar_change``, ``carbon_change``, ``battery_full``, ``battery_empty``,
    ``tick``, or ``resync``), ``id`` (``"<tick>-<k>"``; None for resync) and ``data``, the event's JSON (with
    ``time``, the ecovisor's clock, and the new values)."""

    type: str
    id: str | None
    data: dict = field(default_factory=dict)

    @property
    def time(self) -> str | None:
        return self.data.get("time")


class SubscriptionError(RuntimeError):
    """The ecovisor refused the subscription for good (401, 403, 404, 422), or sent something that is not an
    event stream."""

    def __init__(self, status_code: int, message: str, field: str | None = None):
        self.status_code = status_code
        self.field = field
        super().__init__(f"HTTP {status_code}: {message}" + (f" (field {field})" if field else ""))


class Subscription:
    """An iterator of :class:`Event` s (see the module docstring). ``last_event_id`` is the last id received,
    ``connections`` how many streams were opened; :meth:`close` ends it (also at the end of a ``with``)."""

    def __init__(self, base_url: str, token: str, types: Iterable[str] = DEFAULT_TYPES, timeout: float | None = None,
                 *, app: str = "me", last_event_id: str | None = None, idle_s: float = 60.0, connect_s: float = 5.0,
                 connection_s: float = 3600.0, retry_s: float = 1.0, sleep: Callable[[float], None] = time.sleep):
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be >= 0 (or None: no end)")
        if idle_s <= 0 or connect_s <= 0 or connection_s <= 0 or retry_s < 0:
            raise ValueError("idle_s, connect_s and connection_s must be > 0, retry_s >= 0")
        self.url = f"{base_url.rstrip('/')}/v1/apps/{app}/events"
        self.token = token
        self.types = ",".join(types)
        self.ends_at = None if timeout is None else time.monotonic() + timeout
        self.last_event_id = last_event_id
        self.idle_s, self.connect_s, self.connection_s, self.retry_s = idle_s, connect_s, connection_s, retry_s
        self.sleep = sleep
        self.connections = 0
        self.last_problem: str | None = None
        self._response: requests.Response | None = None
        self._closed = False
        self._gen = self._events()

    def __iter__(self) -> "Subscription":
        return self

    def __next__(self) -> Event:
        return next(self._gen)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._gen.close()

    def _left(self) -> float:
        return self.connection_s if self.ends_at is None else self.ends_at - time.monotonic()

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` if the subscription lasts that long; False when it would end first."""
        if self.ends_at is not None and time.monotonic() + seconds >= self.ends_at:
            return False
        self.sleep(seconds)
        return True

    def _events(self) -> Generator[Event, None, None]:
        while not self._closed:
            left = self._left()
            if left <= 0:
                return
            wait = self.retry_s
            with make_session(retries=0, timeout_s=self.connect_s, deadline_s=min(left, self.connection_s)) as s:
                headers = {"Authorization": f"Bearer {self.token}", "Accept": "text/event-stream"}
                if self.last_event_id is not None:
                    headers["Last-Event-ID"] = self.last_event_id
                try:
                    self.connections += 1
                    r = s.get(self.url, params={"types": self.types}, headers=headers, stream=True,
                              timeout=(self.connect_s, self.idle_s))
                except requests.RequestException as e:
                    self.last_problem = f"connecting: {e}"
                else:
                    try:
                        if r.status_code == 200:
                            yield from self._read(r)
                            self.last_problem = "the stream ended"
                        else:
                            wait = self._refused(r, wait)
                    except requests.RequestException as e:  # a drop, an idle stream, or this connection's deadline
                        self.last_problem = f"reading: {e}"
                    finally:
                        r.close()
                        deadline = getattr(r, "deadline", None)
                        if deadline is not None:
                            deadline.end()
            if self._closed or not self._wait(wait):
                return

    def _refused(self, r: requests.Response, wait: float) -> float:
        """A non-200 answer: raise if retrying cannot help, else how long to wait before the next try."""
        body = read_body(r, 64 * 1024, truncate=True)
        try:
            doc = json.loads(body)
        except ValueError:
            doc = {"detail": body[:200].decode("utf-8", "replace")}
        detail = doc.get("detail") if isinstance(doc, dict) else doc
        fld = doc.get("field") if isinstance(doc, dict) else None
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            detail = detail[0].get("msg", detail)
        self.last_problem = f"HTTP {r.status_code}: {detail}"
        if r.status_code == 429 or r.status_code >= 500:
            after = retry_after_s(r.headers.get("Retry-After"))
            return max(wait, after) if after is not None else wait
        raise SubscriptionError(r.status_code, str(detail), fld)

    def _read(self, r: requests.Response) -> Iterator[Event]:
        ctype = r.headers.get("Content-Type", "")
        if not ctype.startswith("text/event-stream"):
            raise SubscriptionError(r.status_code, f"not an event stream (Content-Type {ctype!r})")
        for ev in parse_stream(r.iter_content(chunk_size=None), self):
            if ev.id is not None:
                self.last_event_id = ev.id
            yield ev


def parse_stream(chunks: Iterable[bytes], sub: Subscription | None = None) -> Iterator[Event]:
    """Events of a text/event-stream body given in chunks (the WHATWG rules: ``event``, ``data`` (joined by
    newlines), ``id``, ``retry`` (sets ``sub.retry_s``), comments ignored, an event dispatched at a blank line;
    a partial event at the end is dropped). ``data`` must be a JSON object."""
    buf = b""
    etype, eid = "", None
    data: list[str] = []
    for chunk in chunks:
        buf += chunk
        if len(buf) > MAX_EVENT_BYTES:
            raise SubscriptionError(200, f"an event stream line longer than {MAX_EVENT_BYTES:,} bytes")
        *lines, buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if line == "":
                if data:
                    yield _event(etype or "message", eid, "\n".join(data))
                etype, eid = "", None
                data = []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                etype = value
            elif name == "data":
                data.append(value)
            elif name == "id" and "\0" not in value:
                eid = value
            elif name == "retry" and value.isdigit() and sub is not None:
                sub.retry_s = int(value) / 1000


def _event(etype: str, eid: str | None, data: str) -> Event:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise SubscriptionError(200, f"event {eid or etype}: data is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise SubscriptionError(200, f"event {eid or etype}: data is not a JSON object")
    return Event(etype, eid or None, doc)


def subscribe(base_url: str, token: str, types: Iterable[str] = DEFAULT_TYPES, timeout: float | None = None,
              **kw: Any) -> Subscription:
    """The app's notifications as an iterator of :class:`Event` s, for at most ``timeout`` seconds (see the
    module docstring; keyword options as :class:`Subscription`)."""
    return Subscription(base_url, token, types, timeout, **kw)


__all__ = ["Event", "Subscription", "SubscriptionError", "subscribe", "parse_stream", "DEFAULT_TYPES"]
