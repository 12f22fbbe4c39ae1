"""Clocks: the ``Clock`` protocol, a wall clock for production and a manual clock advanced by ``POST /v1/tick``
for tests and backtests."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import Protocol, TypeGuard, runtime_checkable

from cicm.errors import InputError


@runtime_checkable
class Clock(Protocol):
    """A source of tz-aware UTC time. ``mode`` is ``"real"`` or ``"simulated"``."""

    mode: str

    def now(self) -> datetime: ...


@runtime_checkable
class ManualClock(Clock, Protocol):
    """A clock that moves only when told to."""

    def advance(self, seconds: float) -> datetime: ...

    def set(self, t: datetime) -> None: ...


class RealClock:
    """The wall clock."""

    mode = "real"

    def now(self) -> datetime:
        return datetime.now(timezone.utc)


class SimulatedClock:
    """A manual clock: starts at ``start`` and moves by ``advance`` or ``set``."""

    mode = "simulated"

    def __init__(self, start: datetime):
        if start.tzinfo is None:
            raise InputError("start", "simulated clock start must be tz-aware")
        self._now = start.astimezone(timezone.utc)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> datetime:
        if not seconds > 0:
            raise InputError("seconds", "must be > 0")
        with self._lock:
            self._now = self._now + timedelta(seconds=seconds)
            return self._now

    def set(self, t: datetime) -> None:
        with self._lock:
            self._now = t.astimezone(timezone.utc)


def clock_mode(clock: object) -> str:
    """The clock's mode, ``"?"`` for a clock without one."""
    return getattr(clock, "mode", "?")


def is_simulated(clock: object) -> TypeGuard[ManualClock]:
    """True for a clock that ticks only when advanced (``POST /v1/tick``)."""
    return clock_mode(clock) == "simulated"


def as_utc(t: datetime) -> datetime:
    """``t`` in UTC; a naive time is an :class:`InputError` on field ``time``."""
    if t.tzinfo is None:
        raise InputError("time", "must carry a time zone")
    return t.astimezone(timezone.utc)
