"""Usage history and the arguments of a load forecast: reading and validating them.

Every check raises `InputError` naming the field (a column, `hour`, `tz`, `now`, an option). The local-day
calendar is `cicm.timeutil`'s: an hour belongs to the local day it starts in.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cicm.errors import InputError
from cicm.models.load.series import MIN_ADJUST_DAYS
from cicm.timeutil import check_timezone, local_dates, local_day_hours_utc

HISTORY_COLUMNS = ("inflexible_cpu_cores", "flexible_cpu_cores", "reserved_cpu_cores")
_ONE_HOUR = pd.Timedelta(hours=1)


def local_day_hours(day, tz: str) -> pd.DatetimeIndex:
    """UTC start times of the hours of local date `day` in time zone `tz` (the one calendar: cicm.timeutil)."""
    return local_day_hours_utc(day, check_timezone(tz, "tz"))


# ------------------------------------------------------------------------------------- arguments


def check_tz(tz: str) -> str:
    if not isinstance(tz, str) or not tz:
        raise InputError("tz", f"need a time zone name, got {tz!r}")
    try:
        pd.Timestamp("2022-01-01").tz_localize(tz)
    except Exception as exc:
        raise InputError("tz", f"unknown time zone {tz!r}") from exc
    return tz


def check_now(now) -> pd.Timestamp:
    try:
        now = pd.Timestamp(now)
    except (TypeError, ValueError) as exc:
        raise InputError("now", f"not a timestamp: {now!r}") from exc
    if now.tzinfo is None:
        raise InputError("now", "must be tz-aware (UTC)")
    return now.tz_convert("UTC")


def check_target_hours(target_hours, tz: str) -> tuple[pd.DatetimeIndex, pd.Timestamp]:
    """Returns the UTC target hours and their local date (naive midnight)."""
    if not isinstance(target_hours, pd.DatetimeIndex) or len(target_hours) == 0:
        raise InputError("target_hours", "need a non-empty DatetimeIndex of UTC hours")
    if target_hours.tz is None:
        raise InputError("target_hours", "must be tz-aware (UTC)")
    hours = target_hours.tz_convert("UTC")
    days = local_dates(hours, tz).unique()
    if len(days) != 1:
        raise InputError("target_hours", f"must lie in one local day of {tz}; spans {len(days)} days")
    expected = local_day_hours(days[0], tz)
    if not hours.equals(expected):
        raise InputError(
            "target_hours",
            f"must be the {len(expected)} hours of local day {days[0].date()} in {tz}, in order",
        )
    return expected, days[0]


def check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise InputError(name, f"must be an integer >= {low}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Request:
    """The validated arguments shared by every cluster of a call."""

    hours: pd.DatetimeIndex
    target_date: pd.Timestamp
    tz: str
    gamma: float
    now: pd.Timestamp
    min_history_days: int
    max_history_days: int
    error_window_days: int
    adjust_window_days: int
    ratio_days: int
    alpha_grid: tuple[float, ...]
    beta_grid: tuple[float, ...]


def check_request(target_hours, tz, gamma, now, min_history_days, max_history_days, error_window_days,
                  adjust_window_days, ratio_days, alpha_grid, beta_grid) -> Request:
    now = check_now(now)
    tz = check_tz(tz)
    hours, target_date = check_target_hours(target_hours, tz)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0 < gamma < 1:
        raise InputError("gamma", f"must be in (0, 1), got {gamma!r}")
    if hours[0] < now:
        raise InputError("now", f"the target day starts at {hours[0]}, before the issue time {now}")
    min_history_days = check_int(min_history_days, "min_history_days", 21)
    max_history_days = check_int(max_history_days, "max_history_days", min_history_days + 1)
    error_window_days = check_int(error_window_days, "error_window_days", 7)
    adjust_window_days = check_int(adjust_window_days, "adjust_window_days", MIN_ADJUST_DAYS)
    ratio_days = check_int(ratio_days, "ratio_days", 1)
    for name, grid in (("alpha_grid", alpha_grid), ("beta_grid", beta_grid)):
        if len(grid) == 0 or not all(isinstance(v, numbers.Real) and 0 < v <= 1 for v in grid):
            raise InputError(name, "need a non-empty list of weights in (0, 1]")
    return Request(hours, target_date, tz, float(gamma), now, min_history_days, max_history_days,
                   error_window_days, adjust_window_days, ratio_days, tuple(alpha_grid), tuple(beta_grid))


# --------------------------------------------------------------------------------------- history


def utc_ns(values, field_name: str) -> np.ndarray:
    index = pd.DatetimeIndex(values)
    if index.tz is None:
        raise InputError(field_name, "must be tz-aware (UTC)")
    return index.tz_convert("UTC").as_unit("ns").asi8


def numeric_values(frame: pd.DataFrame) -> np.ndarray:
    """(3, N): the HISTORY_COLUMNS of the frame's rows, NaN where not numeric."""
    values = np.empty((3, len(frame)))
    for i, column in enumerate(HISTORY_COLUMNS):
        series = frame[column]
        values[i] = series.to_numpy() if series.dtype == np.float64 else \
            pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)
    return values


def factorize_clusters(column: pd.Series) -> tuple[np.ndarray, pd.Index]:
    """pd.factorize(column, sort=False). An Arrow-backed column in few runs (the store's rows, ORDER BY cluster,
    hour) is factorized by its runs: a pass over the strings instead of a hash of each."""
    if hasattr(column.array, "__arrow_array__") and len(column) > 1000:
        import pyarrow as pa
        import pyarrow.compute as pc

        try:
            runs = pc.run_end_encode(column.array.__arrow_array__()).chunks
        except (pa.ArrowException, TypeError):
            runs = None
        if runs is not None and sum(len(r.values) for r in runs) * 16 <= len(column):
            lengths = np.concatenate([np.diff(r.run_ends.to_numpy(), prepend=0) for r in runs])
            values = pd.array([v for r in runs for v in r.values.to_pylist()], dtype=column.dtype)
            run_codes, names = pd.factorize(pd.Series(values), sort=False)
            return np.repeat(run_codes, lengths), names
    return pd.factorize(column, sort=False)


def one_cluster_frame(history: pd.DataFrame) -> pd.DataFrame:
    """One cluster's history indexed by its tz-aware `hour` (index or column), with every history column;
    otherwise an InputError naming what is wrong."""
    if not isinstance(history, pd.DataFrame):
        raise InputError("history", "must be a pandas DataFrame")
    frame = history.set_index("hour") if "hour" in history.columns else history
    if not isinstance(frame.index, pd.DatetimeIndex):
        raise InputError("hour", "history needs a DatetimeIndex (or column) named 'hour'")
    if frame.index.tz is None:
        raise InputError("hour", "must be tz-aware (UTC)")
    if "cluster" in frame.columns and frame["cluster"].nunique() > 1:
        raise InputError("cluster", f"history must hold one cluster, holds {frame['cluster'].nunique()}")
    missing = [c for c in HISTORY_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(missing[0], "column missing from history")
    return frame


def prepare_history(history: pd.DataFrame, now: pd.Timestamp, max_history_days: int) -> pd.DataFrame:
    """Hours that ended by `now`, at most `max_history_days` back, validated. Index: UTC `hour`."""
    frame = one_cluster_frame(history)
    index = frame.index.tz_convert("UTC")
    start = now - pd.Timedelta(days=max_history_days)
    keep = (index + _ONE_HOUR <= now) & (index >= start)
    frame = frame.loc[keep, list(HISTORY_COLUMNS)]
    index = index[keep]
    if index.has_duplicates:
        raise InputError("hour", f"duplicate hours, e.g. {index[index.duplicated()][0]}")
    if (index != index.floor("h")).any():
        raise InputError("hour", "hours must start on a whole UTC hour")
    frame = frame.set_axis(index.rename("hour")).sort_index()
    for column in HISTORY_COLUMNS:
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
        if np.isnan(values).any():
            first = frame.index[np.isnan(values)][0]
            raise InputError(column, f"{int(np.isnan(values).sum())} NaN or non-numeric values, first at {first}")
        if np.isinf(values).any():
            raise InputError(column, "infinite values")
        if (values < 0).any():
            raise InputError(column, f"negative values, first at {frame.index[values < 0][0]}")
        frame[column] = values
    if len(frame) > 1:
        gap = np.asarray((frame.index[1:] - frame.index[:-1]) != _ONE_HOUR)
        if gap.any():
            first = frame.index[1:][gap][0]
            raise InputError("hour", f"history has missing hours (gap before {first}); hourly rows needed")
    return frame
