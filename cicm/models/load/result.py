"""What a load forecast returns: `LoadForecast`, and the visible "insufficient-history" result."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd


@dataclass(frozen=True, eq=False)
class LoadForecast:
    """Forecast of one cluster's load on one local day.

    status "ok": every number is set. status "insufficient-history": `reason` says why, the Series are empty
    and the numbers None; nothing is invented.
    """

    status: str
    reason: str | None
    target_hours: pd.DatetimeIndex
    issued_at: pd.Timestamp
    gamma: float
    inflexible_cpu_cores: pd.Series
    inflexible_upper_cpu_cores: pd.Series
    flexible_core_hours: float | None
    reservations_core_hours: float | None
    reservation_ratio: pd.Series
    reservations_rel_error_q97: float | None
    theta_core_hours: float | None
    inflexible_rel_error_upper: float | None
    parameters: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def insufficient(reason: str, hours: pd.DatetimeIndex, now: pd.Timestamp, gamma: float, params: dict) -> LoadForecast:
    empty = pd.Series(dtype=float, index=pd.DatetimeIndex([], tz="UTC", name="hour"))
    return LoadForecast(
        status="insufficient-history",
        reason=reason,
        target_hours=hours,
        issued_at=now,
        gamma=gamma,
        inflexible_cpu_cores=empty.rename("inflexible_cpu_cores"),
        inflexible_upper_cpu_cores=empty.rename("inflexible_upper_cpu_cores"),
        flexible_core_hours=None,
        reservations_core_hours=None,
        reservation_ratio=empty.rename("reservation_ratio"),
        reservations_rel_error_q97=None,
        theta_core_hours=None,
        inflexible_rel_error_upper=None,
        parameters=params,
    )
