"""What a load forecast returns: `LoadForecast`, and the visible "insufficient-history" result."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd


@dataclass(frozen=True, eq=False)
class LoadForecast:
    """Forecast of one cluster's load on one local day.

    status "ok": every number is set. status "insufficient-history": `reason` says why, the Series are empty
    and the numbers None; nothing is invented.

    The hourly figures are held as arrays over `target_hours` (``inflexible_values``, ``inflexible_upper_values``,
    ``ratio_values``; the batch engine makes ten thousand of these a night) and are Series only when read as
    ``inflexible_cpu_cores``, ``inflexible_upper_cpu_cores`` and ``reservation_ratio`` (built once, indexed by
    `target_hours`; empty when not ok).
    """

    status: str
    reason: str | None
    target_hours: pd.DatetimeIndex
    issued_at: pd.Timestamp
    gamma: float
    inflexible_values: np.ndarray  # per target hour (empty when not ok)
    inflexible_upper_values: np.ndarray
    flexible_core_hours: float | None
    reservations_core_hours: float | None
    ratio_values: np.ndarray
    reservations_rel_error_q97: float | None
    theta_core_hours: float | None
    inflexible_rel_error_upper: float | None
    parameters: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def _series(self, values: np.ndarray, name: str) -> pd.Series:
        if not self.ok:
            return pd.Series(dtype=float, index=pd.DatetimeIndex([], tz="UTC", name="hour"), name=name)
        return pd.Series(values, index=self.target_hours, name=name)

    @cached_property
    def inflexible_cpu_cores(self) -> pd.Series:
        return self._series(self.inflexible_values, "inflexible_cpu_cores")

    @cached_property
    def inflexible_upper_cpu_cores(self) -> pd.Series:
        return self._series(self.inflexible_upper_values, "inflexible_upper_cpu_cores")

    @cached_property
    def reservation_ratio(self) -> pd.Series:
        return self._series(self.ratio_values, "reservation_ratio")


_EMPTY = np.zeros(0)


def insufficient(reason: str, hours: pd.DatetimeIndex, now: pd.Timestamp, gamma: float, params: dict) -> LoadForecast:
    return LoadForecast(
        status="insufficient-history",
        reason=reason,
        target_hours=hours,
        issued_at=now,
        gamma=gamma,
        inflexible_values=_EMPTY,
        inflexible_upper_values=_EMPTY,
        flexible_core_hours=None,
        reservations_core_hours=None,
        ratio_values=_EMPTY,
        reservations_rel_error_q97=None,
        theta_core_hours=None,
        inflexible_rel_error_upper=None,
        parameters=params,
    )
