"""Baseline forecasts to measure the engine against (bench/forecast_accuracy.py): seasonal naive and
Holt-Winters, hourly and daily, for one series, read from that series' day matrix (`day_matrix`: complete local
days × local hour, DST holes filled as the engine fills them)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cicm.errors import InputError
from cicm.models.load.history import HISTORY_COLUMNS, check_target_hours, check_tz, prepare_history
from cicm.timeutil import local_dates, local_day_lengths


@dataclass(frozen=True)
class DayMatrix:
    dates: pd.DatetimeIndex  # naive local midnights of the complete local days, consecutive
    hourly: dict[str, np.ndarray]  # column -> (n_days, 24) local hour of day, DST holes filled
    daily_mean: dict[str, np.ndarray]  # column -> (n_days,) mean cores over the day's real hours


def fill_row_gaps(matrix: np.ndarray) -> np.ndarray:
    out = matrix.copy()
    hods = np.arange(matrix.shape[1])
    for i in np.flatnonzero(np.isnan(out).any(axis=1)):
        row = out[i]
        ok = ~np.isnan(row)
        out[i] = np.interp(hods, hods[ok], row[ok])
    return out


def day_matrix(frame: pd.DataFrame, tz: str) -> DayMatrix:
    """One series' complete local days × local hour (the engine gathers its own, for many clusters at once)."""
    if frame.empty:
        return DayMatrix(pd.DatetimeIndex([]), {c: np.zeros((0, 24)) for c in HISTORY_COLUMNS},
                         {c: np.zeros(0) for c in HISTORY_COLUMNS})
    dates = local_dates(frame.index, tz)
    hod = frame.index.tz_convert(tz).hour.to_numpy()
    counts = pd.Series(1, index=dates).groupby(level=0).size()
    complete = pd.DatetimeIndex(counts.index[counts.to_numpy() == local_day_lengths(counts.index, tz)])
    # History is gap-free, so complete days are consecutive (only the first and last can be partial).
    hourly, daily = {}, {}
    in_complete = dates.isin(complete)
    day_pos = complete.get_indexer(dates[in_complete])
    for column in HISTORY_COLUMNS:
        values = frame[column].to_numpy()[in_complete]
        total = np.zeros((len(complete), 24))
        count = np.zeros((len(complete), 24))
        np.add.at(total, (day_pos, hod[in_complete]), values)
        np.add.at(count, (day_pos, hod[in_complete]), 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            matrix = total / count
        hourly[column] = fill_row_gaps(matrix)
        daily[column] = total.sum(axis=1) / count.sum(axis=1)
    return DayMatrix(complete, hourly, daily)


def _series_day_matrix(history: pd.Series, before: pd.Timestamp, tz: str) -> tuple[pd.DatetimeIndex, np.ndarray, np.ndarray]:
    if not isinstance(history, pd.Series):
        raise InputError("history", "must be a pandas Series of hourly values with a UTC DatetimeIndex")
    frame = pd.DataFrame({c: history for c in HISTORY_COLUMNS})
    frame.index = history.index
    frame = prepare_history(frame.rename_axis("hour"), before, max_history_days=10_000)
    days = day_matrix(frame, tz)
    return days.dates, days.hourly[HISTORY_COLUMNS[0]], days.daily_mean[HISTORY_COLUMNS[0]]


def seasonal_naive_forecast(history: pd.Series, target_hours: pd.DatetimeIndex, tz: str = "UTC") -> pd.Series:
    """Same local hour of the same weekday one week before (the target day's local date − 7 days)."""
    tz = check_tz(tz)
    hours, target_date = check_target_hours(target_hours, tz)
    dates, hourly, _ = _series_day_matrix(history, hours[0], tz)
    pos = dates.get_indexer([target_date - pd.Timedelta(days=7)])[0]
    if pos < 0:
        raise InputError("history", f"no complete local day {(target_date - pd.Timedelta(days=7)).date()}")
    return pd.Series(hourly[pos][hours.tz_convert(tz).hour], index=hours, name=history.name)


def seasonal_naive_core_hours(history: pd.Series, target_hours: pd.DatetimeIndex, tz: str = "UTC") -> float:
    """Daily total (core-hours) of the target day: the mean rate one week before × hours of the target day."""
    tz = check_tz(tz)
    hours, target_date = check_target_hours(target_hours, tz)
    dates, _, daily = _series_day_matrix(history, hours[0], tz)
    pos = dates.get_indexer([target_date - pd.Timedelta(days=7)])[0]
    if pos < 0:
        raise InputError("history", f"no complete local day {(target_date - pd.Timedelta(days=7)).date()}")
    return float(daily[pos] * len(hours))


def holt_winters_forecast(
    history: pd.Series,
    target_hours: pd.DatetimeIndex,
    tz: str = "UTC",
    fit_days: int = 56,
    initialization_method: str = "estimated",
) -> pd.Series:
    """Holt-Winters (statsmodels ExponentialSmoothing, additive seasonal 168, no trend) on the last
    `fit_days` complete local days before the target day, laid out by local hour (DST holes filled as in
    `forecast_load`). Uses every hour of `history` before the target day: pass history cut at the issue time."""
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    tz = check_tz(tz)
    hours, target_date = check_target_hours(target_hours, tz)
    dates, hourly, _ = _series_day_matrix(history, hours[0], tz)
    if len(dates) < 14:
        raise InputError("history", "Holt-Winters needs at least 14 complete days")
    dates, hourly = dates[-fit_days:], hourly[-fit_days:]
    horizon_days = int((target_date - dates[-1]).days)
    y = hourly.reshape(-1)
    result = ExponentialSmoothing(
        y, trend=None, seasonal="add", seasonal_periods=168, initialization_method=initialization_method
    ).fit()
    fc = np.asarray(result.forecast(24 * horizon_days)).reshape(horizon_days, 24)[-1]
    return pd.Series(np.maximum(fc, 0.0)[hours.tz_convert(tz).hour], index=hours, name=history.name)


def holt_winters_core_hours(
    history: pd.Series, target_hours: pd.DatetimeIndex, tz: str = "UTC", fit_days: int = 182
) -> float:
    """Holt-Winters on daily mean rates (additive seasonal 7, no trend, estimated initialisation) of the last
    `fit_days` complete local days, × the hours of the target day. Pass history cut at the issue time."""
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    tz = check_tz(tz)
    hours, target_date = check_target_hours(target_hours, tz)
    dates, _, daily = _series_day_matrix(history, hours[0], tz)
    if len(dates) < 14:
        raise InputError("history", "Holt-Winters needs at least 14 complete days")
    dates, daily = dates[-fit_days:], daily[-fit_days:]
    horizon_days = int((target_date - dates[-1]).days)
    result = ExponentialSmoothing(
        daily, trend=None, seasonal="add", seasonal_periods=7, initialization_method="estimated"
    ).fit()
    return float(max(np.asarray(result.forecast(horizon_days))[-1], 0.0) * len(hours))
