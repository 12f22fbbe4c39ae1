"""Container power models: CPU cores -> kW, and the inverse used to turn a power cap into a CPU limit.

There is no RAPL or metered power here: every container power the ecovisor reports is *modelled from CPU
usage* with these functions (the API says so with ``power_source = "modelled-from-cpu"``).
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from cicm.errors import InputError

POWER_SOURCE = "modelled-from-cpu"
MIN_CPU_LIMIT_CORES = 0.01  # the smallest CPU limit a cap can become (1 ms per 100 ms period)


@dataclass(frozen=True)
class PowerModel:
    """Piecewise-linear, non-decreasing power in kW over CPU cores in [0, cores]. A linear model is two points."""

    cores: float
    xs: tuple[float, ...]
    ys: tuple[float, ...]

    @classmethod
    def linear(cls, cores: float, idle_kw: float, max_kw: float) -> "PowerModel":
        if not cores > 0:
            raise InputError("cores", "must be > 0")
        if not 0 <= idle_kw <= max_kw:
            raise InputError("idle_kw", "need 0 <= idle_kw <= max_kw")
        return cls(cores=float(cores), xs=(0.0, float(cores)), ys=(float(idle_kw), float(max_kw)))

    @classmethod
    def piecewise(cls, points: list[tuple[float, float]]) -> "PowerModel":
        xs = tuple(float(p[0]) for p in points)
        ys = tuple(float(p[1]) for p in points)
        if len(xs) < 2 or xs[0] != 0 or any(b <= a for a, b in zip(xs, xs[1:])):
            raise InputError("points", "cores must start at 0 and strictly increase")
        if any(b < a for a, b in zip(ys, ys[1:])) or ys[0] < 0:
            raise InputError("points", "kW must be >= 0 and non-decreasing")
        return cls(cores=xs[-1], xs=xs, ys=ys)

    @classmethod
    def from_spec(cls, cores: float, spec) -> "PowerModel":
        if spec.kind == "linear":
            return cls.linear(cores, spec.idle_kw, spec.max_kw)
        return cls.piecewise(list(spec.points))

    @property
    def idle_kw(self) -> float:
        return self.ys[0]

    @property
    def max_kw(self) -> float:
        return self.ys[-1]

    def power_kw(self, cpu_cores: float) -> float:
        """Power at a CPU usage; usage is clamped to [0, cores]. The same float as ``np.interp(c, xs, ys)``
        (the same formula), without numpy's per-call overhead: the tick calls this once per container."""
        c = min(max(float(cpu_cores), 0.0), self.cores)
        xs, ys = self.xs, self.ys
        j = bisect_right(xs, c) - 1  # xs[j] <= c < xs[j + 1]
        if c != c or j < 0:
            return float(np.interp(c, xs, ys))  # NaN (and never: c >= 0 = xs[0])
        if j >= len(xs) - 1:
            return ys[-1]
        if xs[j] == c:
            return ys[j]
        return (ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j]) * (c - xs[j]) + ys[j]

    def cores_for_power(self, power_kw: float) -> float:
        """The largest CPU usage whose modelled power is <= ``power_kw`` (inverse of a non-decreasing model).

        Caps below idle power cannot be met by a CPU limit and are rejected; at or above max power the
        whole container (``cores``) is allowed.
        """
        p = float(power_kw)
        if p != p or p < 0:
            raise InputError("kw", "must be a number >= 0")
        if p < self.idle_kw - 1e-12:
            raise InputError("kw", f"{p} kW is below the container's idle power {self.idle_kw} kW")
        if p >= self.max_kw:
            return self.cores
        # largest x with y(x) <= p: walk the segments from the top (flat segments resolve to their right end)
        for i in range(len(self.xs) - 1, 0, -1):
            x0, x1, y0, y1 = self.xs[i - 1], self.xs[i], self.ys[i - 1], self.ys[i]
            if y0 <= p:
                if y1 <= p:
                    return x1
                return x0 + (p - y0) * (x1 - x0) / (y1 - y0)
        return 0.0

    def cpu_limit_for_cap(self, cap_kw: float) -> float:
        """CPU limit in cores enforcing a power cap (never below MIN_CPU_LIMIT_CORES, never above cores)."""
        return min(self.cores, max(MIN_CPU_LIMIT_CORES, self.cores_for_power(cap_kw)))
