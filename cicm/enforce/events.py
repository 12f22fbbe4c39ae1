"""The ecovisor's notifications for the agent: its server-sent events, read in a background thread.

The agent subscribes to ``tick``, ``solar`` (solar_change) and ``battery`` (battery_full, battery_empty) with the
ecovisor's own client, :func:`cicm.ecovisor.subscribe.subscribe` (it needs only ``requests`` and
``cicm.httpclient``; the one ecovisor module ``cicm.enforce`` may import, see tests/test_enforce_agent.py). The
clocks (:mod:`cicm.enforce.clock`) use it in ``wait_for(t)``:

- with the ecovisor's clock, the wait ends at the first ``tick`` whose time reaches ``t`` (no polling of
  ``/v1/clock``); while the stream is down (refused, or its thread ended) the clock polls as before;
- battery_full, battery_empty and solar_change events newer than the last pass end the wait early: the agent
  re-applies the storage plan's hour once for them (events of the same tick share one pass), audited.

A reader thread keeps the stream, so that a stopping agent never blocks on a socket; events wait in a bounded
queue (the oldest are dropped past ``max_queue``: only the newest state matters, and ``tick`` times are
monotonic).
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Iterable

import pandas as pd

log = logging.getLogger("cicm.agent")

#: Events that make the agent re-apply the storage plan's hour early.
TRIGGERS = frozenset({"battery_full", "battery_empty", "solar_change"})
#: What the agent subscribes to (the ecovisor's type groups).
TYPES = ("tick", "solar", "battery")


def event_time(ev: Any) -> pd.Timestamp | None:
    """The ecovisor's clock at the end of the tick that fired the event (UTC), or None."""
    t = (getattr(ev, "data", None) or {}).get("time")
    if not t:
        return None
    try:
        ts = pd.Timestamp(t)
    except (TypeError, ValueError):
        return None
    return ts.tz_convert("UTC") if ts.tzinfo is not None else None


class EcovisorEvents:
    """The app's event stream in a daemon thread. ``subscribe_fn`` replaces the ecovisor's client (tests)."""

    def __init__(self, base_url: str, token: str, types: Iterable[str] = TYPES, *, max_queue: int = 1000,
                 subscribe_fn: Callable[..., Any] | None = None, **subscribe_kw: Any):
        self.base_url = base_url
        self.token = token
        self.types = tuple(types)
        self.subscribe_kw = subscribe_kw
        self._subscribe = subscribe_fn
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self.problem: str | None = None  # why the stream ended (a refusal, an error), None while it runs
        self.received = 0
        self.dropped = 0

    def start(self) -> "EcovisorEvents":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cicm-agent-events", daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            if self._subscribe is not None:
                subscribe: Callable[..., Any] = self._subscribe
            else:
                from cicm.ecovisor.subscribe import subscribe
            sub = subscribe(self.base_url, self.token, self.types, None, **self.subscribe_kw)
            for ev in sub:
                if self._closing.is_set():
                    break
                self.received += 1
                while True:
                    try:
                        self._queue.put_nowait(ev)
                        break
                    except queue.Full:
                        try:
                            self._queue.get_nowait()
                            self.dropped += 1
                        except queue.Empty:
                            pass
        except Exception as exc:  # noqa: BLE001 - a refusal (401/404/422) or a broken client: the clock polls
            self.problem = f"{type(exc).__name__}: {exc}"
            log.warning("ecovisor events stopped (%s): the agent polls the clock instead", self.problem)
        else:
            self.problem = self.problem or "the subscription ended"

    def get(self, timeout: float) -> Any | None:
        """The next event, or None after ``timeout`` wall seconds without one."""
        try:
            return self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def pending(self) -> int:
        """Events received but not yet taken."""
        return self._queue.qsize()

    def close(self) -> None:
        """Stop taking events (the thread ends at the stream's next event; it is a daemon)."""
        self._closing.set()


def wait_for_events(events: EcovisorEvents, reached: Callable[[Any | None], bool], stop: threading.Event,
                    since: pd.Timestamp | None, slice_s: float = 1.0, batch_s: float = 2.0) -> tuple[list, bool]:
    """Wait on the stream: (triggers, stream_ok). Ends with [] when ``reached(event_or_None)`` says the wake time
    has come (called with each ``tick`` and ``resync``, and with None every ``slice_s`` while idle), with the trigger events
    (newer than ``since``) once their tick has arrived (or ``batch_s`` after the first), and with
    ``stream_ok=False`` when the stream has ended (the caller falls back to polling)."""
    triggers: list = []
    while not stop.is_set():
        ev = events.get(slice_s if not triggers else min(slice_s, batch_s))
        if ev is None:
            if triggers:
                return triggers, True
            if not events.alive and events.pending() == 0:
                return [], False
            if reached(None):
                return [], True
            continue
        if ev.type == "tick":
            if reached(ev):
                return [], True
            if triggers:
                return triggers, True
        elif ev.type == "resync":  # events were lost: ``reached`` reads the time itself
            if reached(ev):
                return [], True
        elif ev.type in TRIGGERS:
            t = event_time(ev)
            if since is None or t is None or t > since:
                triggers.append(ev)
    return [], True


__all__ = ["EcovisorEvents", "TRIGGERS", "TYPES", "event_time", "wait_for_events"]
