"""Hourly forecasts of flexible-work arrivals (core-hours arriving per hour), with an upper quantile. Pure.

The CICM baseline: the arrivals of the same hour of the week, EWMA-weighted over the last ``weeks`` weeks (the
newest week weighs ``alpha``, the one before ``alpha * (1 - alpha)``, ...; weeks without data drop out and the
weights are renormalised). Batch arrivals are spiky hour by hour but steady day by day, so the uncertainty is set
on daily totals: the upper quantile scales the forecast by (1 + q) where q is the ``quantile`` of the relative
error of the daily totals the same method made on the last ``error_days`` days.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cicm.errors import InputError

WEEK = pd.Timedelta(days=7)


@dataclass(frozen=True)
class ArrivalForecast:
    hours: pd.DatetimeIndex
    core_hours: np.ndarray  # central forecast per hour
    upper_core_hours: np.ndarray  # upper quantile per hour
    rel_error_quantile: float  # q: upper = central * (1 + q)


def _check_history(history: pd.Series) -> pd.Series:
    if not isinstance(history.index, pd.DatetimeIndex) or history.index.tz is None:
        raise InputError("hour", "arrival history needs a tz-aware hourly DatetimeIndex")
    if history.index.has_duplicates:
        raise InputError("hour", "arrival history has duplicate hours")
    values = history.astype(float)
    if values.isna().any():
        raise InputError("flexible_arrived_core_hours", "arrival history contains NaN")
    if (values < 0).any():
        raise InputError("flexible_arrived_core_hours", "arrival history contains negative values")
    return values.sort_index()


def seasonal_ewma(history: pd.Series, hours: pd.DatetimeIndex, weeks: int = 4, alpha: float = 0.5) -> np.ndarray:
    """EWMA over weeks of the arrivals at the same hour of the week (168 h earlier, 336 h, ...). NaN where none."""
    values = _check_history(history)
    num = np.zeros(len(hours))
    den = np.zeros(len(hours))
    for k in range(1, weeks + 1):
        past = values.reindex(hours - k * WEEK).to_numpy(float)
        w = alpha * (1 - alpha) ** (k - 1)
        ok = ~np.isnan(past)
        num[ok] += w * past[ok]
        den[ok] += w
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def forecast_arrivals(history: pd.Series, hours: pd.DatetimeIndex, *, weeks: int = 4, alpha: float = 0.5,
                      quantile: float = 0.9, error_days: int = 28) -> ArrivalForecast:
    """Forecast the arrivals in ``hours`` from the hourly history strictly before them (see the module doc)."""
    if not 0 < alpha <= 1:
        raise InputError("alpha", f"must be in (0, 1], got {alpha!r}")
    if not 0.5 <= quantile < 1:
        raise InputError("quantile", f"must be in [0.5, 1), got {quantile!r}")
    values = _check_history(history)
    values = values[values.index < hours[0]]
    central = seasonal_ewma(values, hours, weeks, alpha)
    if np.isnan(central).all():
        raise InputError("flexible_arrived_core_hours", f"no arrival history in the {weeks} weeks before "
                                                         f"{hours[0]:%Y-%m-%d %H:%M}Z")
    central = np.where(np.isnan(central), np.nanmean(central), central)
    # Backcast the last error_days whole days before the horizon with the same method, on data before each.
    end = hours[0].floor("D")
    past = pd.date_range(end - pd.Timedelta(days=error_days), end, freq="h", inclusive="left")
    q = 0.0
    if len(past):
        back = seasonal_ewma(values, past, weeks, alpha)
        frame = pd.DataFrame({"f": back, "a": values.reindex(past).to_numpy(float)}, index=past).dropna()
        daily = frame.groupby(frame.index.floor("D")).sum()
        daily = daily[daily["f"] > 0]
        if len(daily) >= 7:
            q = max(float(np.quantile(daily["a"] / daily["f"] - 1.0, quantile)), 0.0)
    return ArrivalForecast(hours, central, central * (1.0 + q), q)


def hourly_arrivals(arrival: pd.Series, core_hours: np.ndarray, hours: pd.DatetimeIndex) -> pd.Series:
    """Sum job core-hours into the hours they arrived in (UTC hourly index ``hours``)."""
    idx = pd.DatetimeIndex(arrival).floor("h")
    s = pd.Series(np.asarray(core_hours, float), index=idx).groupby(level=0).sum()
    return s.reindex(hours, fill_value=0.0)
