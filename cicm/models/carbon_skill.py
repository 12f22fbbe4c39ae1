"""How much a carbon forecast is worth for within-day shifting, measured on the days before planning.

The DESIGN's ceiling moves flexible work by ±δ of its flat level from the 12 dirtiest to the 12 cleanest hours of
each day with perfect foresight. Here the hours are ranked by the *forecast* and the shift is scored on the
*actual* intensity: the realised cut tells whether following this forecast in this zone has been worth it. The
same shift ranked by the actuals gives that day's ceiling. Both are pure functions of two hourly series.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cicm.errors import InputError

MIN_SKILL_DAYS = 7


@dataclass(frozen=True)
class ForecastValue:
    days: int
    realised_cut_pct: float  # mean daily cut in flexible carbon when following the forecast
    ceiling_cut_pct: float  # the same with perfect foresight

    def describe(self) -> str:
        return (f"following the forecast would have cut flexible carbon by {self.realised_cut_pct:.1f}% "
                f"(perfect foresight {self.ceiling_cut_pct:.1f}%) over the last {self.days} days")


def half_day_shift_cut_pct(rank_by: np.ndarray, actual_gco2_per_kwh: np.ndarray, delta: float) -> float:
    """Cut (%) in the carbon of flat work when ±delta of it moves from the dirtiest to the cleanest half of the
    hours, as ranked by `rank_by`, scored on the actual intensity."""
    order = np.argsort(rank_by, kind="stable")
    half = len(order) // 2
    clean, dirty = order[:half], order[len(order) - half:]
    moved = delta * (actual_gco2_per_kwh[dirty].sum() - actual_gco2_per_kwh[clean].sum())
    return 100.0 * moved / actual_gco2_per_kwh.sum()


def forecast_value(forecast_gco2_per_kwh: pd.Series, actual_gco2_per_kwh: pd.Series, tz: str,
                   delta: float = 1.0) -> ForecastValue | None:
    """Mean daily realised and perfect-foresight cuts over the local days where both series are complete.

    None when fewer than MIN_SKILL_DAYS such days exist: the value of the forecast is then unknown.
    """
    if not 0 < delta <= 1:
        raise InputError("delta", f"must be in (0, 1], got {delta!r}")
    both = pd.concat({"f": forecast_gco2_per_kwh, "a": actual_gco2_per_kwh}, axis=1, join="inner").dropna()
    if (both < 0).any().any():
        raise InputError("gco2_per_kwh", "negative carbon intensity")
    local_day = both.index.tz_convert(tz).date
    realised, ceiling = [], []
    for _, day in both.groupby(local_day):
        if len(day) < 23 or day["a"].sum() <= 0:
            continue
        realised.append(half_day_shift_cut_pct(day["f"].to_numpy(), day["a"].to_numpy(), delta))
        ceiling.append(half_day_shift_cut_pct(day["a"].to_numpy(), day["a"].to_numpy(), delta))
    if len(realised) < MIN_SKILL_DAYS:
        return None
    return ForecastValue(len(realised), float(np.mean(realised)), float(np.mean(ceiling)))
