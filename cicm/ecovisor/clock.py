"""Clocks: real time for production, a simulated clock advanced by ``POST /v1/tick`` for tests and backtests."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from cicm.errors import InputError


class RealClock:
    mode = "real"

    def now(self) -> datetime:
        return datetime.now(timezone.utc)


class SimulatedClock:
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
