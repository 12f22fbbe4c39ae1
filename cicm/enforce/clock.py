"""Clocks for the agent. Production uses wall time; tests and backtests use a simulated clock whose
``sleep_until`` jumps (and can call a hook, e.g. to advance a simulated ecovisor to the same instant)."""
from __future__ import annotations

import threading
from typing import Callable, Protocol

import pandas as pd

from cicm.errors import InputError


def _utc(t) -> pd.Timestamp:
    ts = pd.Timestamp(t)
    if ts.tzinfo is None:
        raise InputError("time", f"must be tz-aware (UTC): {t!r}")
    return ts.tz_convert("UTC")


class Clock(Protocol):
    def now(self) -> pd.Timestamp: ...

    def sleep_until(self, t: pd.Timestamp) -> None: ...


class RealClock:
    """Wall time (UTC). ``sleep_until`` sleeps in slices so a signal is handled within a second. With ``events``
    (:class:`cicm.enforce.events.EcovisorEvents`), ``wait_for`` also ends early on a battery or solar event."""

    mode = "real"

    def __init__(self, stop: threading.Event | None = None, events=None):
        self.stop = stop or threading.Event()
        self.events = events

    def wait_for(self, t: pd.Timestamp, since: pd.Timestamp | None = None) -> list:
        """Sleep until ``t``; return earlier with the trigger events (newer than ``since``) when there are any."""
        t = _utc(t)
        if self.events is None:
            self.sleep_until(t)
            return []
        from cicm.enforce.events import wait_for_events

        triggers, ok = wait_for_events(self.events, lambda _ev: self.now() >= t, self.stop, since)
        if not ok:
            self.sleep_until(t)
        return triggers

    def now(self) -> pd.Timestamp:
        return pd.Timestamp.now(tz="UTC")

    def sleep_until(self, t: pd.Timestamp) -> None:
        t = _utc(t)
        while not self.stop.is_set():
            left = (t - self.now()).total_seconds()
            if left <= 0:
                return
            self.stop.wait(min(left, 1.0))


class SimulatedClock:
    """A clock that only moves when told. ``sleep_until(t)`` calls ``on_sleep(t)`` first (if given), then sets
    the time to ``t``; the hook may raise to stop a loop under test."""

    mode = "simulated"

    def __init__(self, start, on_sleep: Callable[[pd.Timestamp], None] | None = None):
        self._now = _utc(start)
        self.on_sleep = on_sleep
        self.sleeps: list[pd.Timestamp] = []

    def now(self) -> pd.Timestamp:
        return self._now

    def set(self, t) -> None:
        self._now = _utc(t)

    def advance(self, seconds: float) -> pd.Timestamp:
        self._now = self._now + pd.Timedelta(seconds=seconds)
        return self._now

    def sleep_until(self, t: pd.Timestamp) -> None:
        t = _utc(t)
        self.sleeps.append(t)
        if self.on_sleep is not None:
            self.on_sleep(t)
        if t > self._now:
            self._now = t


class CompressedClock:
    """Agent time running ``rate`` times faster than wall time from ``start`` (e.g. ``seconds_per_hour=3``: an
    hour every 3 wall seconds), for tests against real systems whose own clock is wall time (a real Slurm):
    ``sleep_until`` really sleeps the wall equivalent. ``to_agent``/``to_wall`` map instants between the two."""

    mode = "compressed"

    def __init__(self, start, seconds_per_hour: float, stop: threading.Event | None = None):
        import time

        if not seconds_per_hour > 0:
            raise InputError("seconds_per_hour", "must be > 0")
        self.start = _utc(start)
        self.rate = 3600.0 / float(seconds_per_hour)  # agent seconds per wall second
        self._mono0 = time.monotonic()
        self._wall0 = pd.Timestamp.now(tz="UTC")
        self.stop = stop or threading.Event()

    def _elapsed_wall(self) -> float:
        import time

        return time.monotonic() - self._mono0

    def now(self) -> pd.Timestamp:
        return self.start + pd.Timedelta(seconds=self._elapsed_wall() * self.rate)

    def to_agent(self, wall: pd.Timestamp) -> pd.Timestamp:
        return self.start + (_utc(wall) - self._wall0) * self.rate

    def to_wall(self, t: pd.Timestamp) -> pd.Timestamp:
        return self._wall0 + (_utc(t) - self.start) / self.rate

    def sleep_until(self, t: pd.Timestamp) -> None:
        t = _utc(t)
        while not self.stop.is_set():
            left = (t - self.now()).total_seconds() / self.rate
            if left <= 0:
                return
            self.stop.wait(min(left, 0.2))


def hour_start(t: pd.Timestamp) -> pd.Timestamp:
    return _utc(t).floor("h")


def next_hour(t: pd.Timestamp) -> pd.Timestamp:
    return hour_start(t) + pd.Timedelta(hours=1)




class EcovisorClock:
    """Follow the ecovisor's clock (``GET /v1/clock``), e.g. a simulated one advanced by ``POST /v1/tick``:
    for demos and backtests of a whole agent process. While the ecovisor cannot be reached, time stands at the
    last value read (wall time before the first).

    With ``events`` (:class:`cicm.enforce.events.EcovisorEvents`, subscribed to ``tick``), ``sleep_until`` and
    ``wait_for`` wait for the ``tick`` event whose time reaches the wake time instead of polling ``/v1/clock``
    (a ``resync`` reads the clock once); ``wait_for`` also ends early on battery and solar events. Without
    events, or while the stream is down, ``sleep_until`` polls every ``poll_s`` wall seconds."""

    mode = "ecovisor"

    def __init__(self, client, poll_s: float = 1.0, stop: threading.Event | None = None, events=None):
        self.client = client
        self.poll_s = poll_s
        self.stop = stop or threading.Event()
        self.events = events
        self._last: pd.Timestamp | None = None
        self.polls = 0  # GET /v1/clock calls made while waiting (0 while the tick events carry the time)

    def now(self) -> pd.Timestamp:
        try:
            self._last = _utc(self.client.clock()["now"])
        except Exception:  # noqa: BLE001 - unreachable or odd answer: keep the last time; the pass will say why
            if self._last is None:
                return pd.Timestamp.now(tz="UTC")
        return self._last

    def _poll_until(self, t: pd.Timestamp) -> None:
        while not self.stop.is_set():
            self.polls += 1
            if self.now() >= t:
                return
            self.stop.wait(self.poll_s)

    def wait_for(self, t: pd.Timestamp, since: pd.Timestamp | None = None) -> list:
        """Wait until the ecovisor's clock reaches ``t``; return earlier with the trigger events newer than
        ``since`` (battery_full, battery_empty, solar_change), once their tick has arrived."""
        t = _utc(t)
        if self.events is None:
            self._poll_until(t)
            return []
        from cicm.enforce.events import event_time, wait_for_events

        def reached(ev) -> bool:
            if ev is None:
                return self._last is not None and self._last >= t
            if ev.type == "resync":
                self.polls += 1
                return self.now() >= t
            when = event_time(ev)
            if when is not None and (self._last is None or when > self._last):
                self._last = when
            return when is not None and when >= t

        if self._last is not None and self._last >= t:
            return []
        triggers, ok = wait_for_events(self.events, reached, self.stop, since)
        if not ok:
            self._poll_until(t)
        return triggers

    def sleep_until(self, t: pd.Timestamp) -> None:
        t = _utc(t)
        while not self.stop.is_set() and (self._last is None or self._last < t):
            if not self.wait_for(t):  # triggers are not this caller's business: keep waiting for t
                return


__all__ = ["Clock", "CompressedClock", "RealClock", "SimulatedClock", "EcovisorClock", "hour_start", "next_hour"]
