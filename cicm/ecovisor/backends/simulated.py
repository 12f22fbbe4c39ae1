"""Simulated containers: each has a CPU demand in cores; usage = min(demand, limit)."""
from __future__ import annotations

import threading

from .base import BackendError


class SimulatedBackend:
    kind = "simulated"

    def __init__(self, demands: dict[str, float] | None = None):
        self._lock = threading.Lock()
        self._demand: dict[str, float] = {}
        self._limit: dict[str, float | None] = {}
        for name, d in (demands or {}).items():
            self.ensure(name, 0.0)
            self.set_demand(name, d)

    def ensure(self, container: str, cores: float) -> None:
        with self._lock:
            self._demand.setdefault(container, 0.0)
            self._limit.setdefault(container, None)

    def list(self) -> list[str]:
        with self._lock:
            return sorted(self._demand)

    def _check(self, container: str) -> None:
        if container not in self._demand:
            raise BackendError(f"unknown container {container!r}")

    def set_demand(self, container: str, cores: float) -> None:
        if not (cores == cores and cores >= 0):
            raise BackendError("demand must be >= 0")
        with self._lock:
            self._check(container)
            self._demand[container] = float(cores)

    def demand(self, container: str) -> float:
        with self._lock:
            self._check(container)
            return self._demand[container]

    def set_cpu_limit(self, container: str, cores: float | None) -> None:
        if cores is not None and not (cores == cores and cores >= 0):
            raise BackendError("limit must be >= 0")
        with self._lock:
            self._check(container)
            self._limit[container] = None if cores is None else float(cores)

    def get_cpu_limit(self, container: str) -> float | None:
        with self._lock:
            self._check(container)
            return self._limit[container]

    def cpu_usage_cores(self, container: str) -> float:
        with self._lock:
            self._check(container)
            d, lim = self._demand[container], self._limit[container]
            return d if lim is None else min(d, lim)
