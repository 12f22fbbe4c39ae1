"""Validation of carbon-intensity forecasts, and the pure sub-hourly -> hourly resampling.

Every provider returns a frame with :data:`~cicm.carbon.schema.FORECAST_COLUMNS`, possibly with sub-hourly
``target_hour`` points (WattTime sends 5-minute points). :func:`validate_forecast` checks the rows that fall in
the planning window ``[start, end)`` and returns exactly one row per hour, or raises
:class:`~cicm.errors.InputError` naming the bad field and the bad hours/values. Rows outside the window are
ignored (a 72-hour provider forecast may carry nulls far beyond the day we plan).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

from cicm.carbon._parse import parse_utc_timestamp
from cicm.carbon.schema import FORECAST_COLUMNS, MAX_PLAUSIBLE_GCO2_PER_KWH, empty_forecast_frame
from cicm.errors import InputError

DEFAULT_MAX_AGE = pd.Timedelta(hours=36)
#: An ``issued_at`` later than ``now`` by more than this is rejected (clock skew or a wrong ``now``).
FUTURE_ISSUE_TOLERANCE = pd.Timedelta(minutes=15)
ONE_HOUR = pd.Timedelta(hours=1)


# ---------------------------------------------------------------- formatting helpers

def format_time(ts: pd.Timestamp) -> str:
    return ts.tz_convert("UTC").strftime("%Y-%m-%dT%H:%MZ")


def describe_hours(times: Iterable[pd.Timestamp], limit: int = 6) -> str:
    """Collapse sorted timestamps into runs of consecutive hours: '2022-03-13T07:00Z..2022-03-14T04:00Z (22 h)'."""
    ordered = sorted(pd.Timestamp(t) for t in times)
    runs: list[tuple[pd.Timestamp, pd.Timestamp, int]] = []
    for t in ordered:
        if runs and t - runs[-1][1] == ONE_HOUR:
            runs[-1] = (runs[-1][0], t, runs[-1][2] + 1)
        else:
            runs.append((t, t, 1))
    parts = [format_time(a) if n == 1 else f"{format_time(a)}..{format_time(b)} ({n} h)" for a, b, n in runs]
    shown = ", ".join(parts[:limit])
    if len(parts) > limit:
        shown += f", ... ({len(ordered)} in total)"
    return shown


def _describe_points(times: pd.Series, values: pd.Series | None = None, limit: int = 6) -> str:
    items = [format_time(t) if values is None else f"{format_time(t)}={v!r}" for t, v in
             zip(times, values if values is not None else [None] * len(times))]
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in total)" if len(items) > limit else "")


# ---------------------------------------------------------------- scalar / column checks

def require_utc_timestamp(value, field: str) -> pd.Timestamp:
    """A tz-aware timestamp converted to UTC (ns); naive or missing ones raise InputError(field)."""
    return parse_utc_timestamp(value, field)


def check_window(start: pd.Timestamp, end: pd.Timestamp) -> None:
    for name, ts in (("start", start), ("end", end)):
        if ts != ts.floor("h"):
            raise InputError(name, f"{format_time(ts)} is not an hour start")
    if not start < end:
        raise InputError("end", f"window end {format_time(end)} is not after start {format_time(start)}")


def check_columns(df: pd.DataFrame) -> None:
    if not isinstance(df, pd.DataFrame):
        raise InputError("forecast", f"expected a DataFrame, got {type(df).__name__}")
    for column in FORECAST_COLUMNS:
        if column not in df.columns:
            raise InputError(column, "missing column")


def check_tz_aware_column(df: pd.DataFrame, column: str) -> None:
    dtype = df[column].dtype
    if not isinstance(dtype, pd.DatetimeTZDtype):
        if pd.api.types.is_datetime64_dtype(dtype):
            raise InputError(column, "naive timestamps: the column must be tz-aware (UTC)")
        raise InputError(column, f"expected tz-aware datetimes, got dtype {dtype}")
    if df[column].isna().any():
        bad_rows = list(np.flatnonzero(df[column].isna().to_numpy())[:6])
        raise InputError(column, f"missing timestamp(s) in row(s) {bad_rows}")


def check_single_zone(df: pd.DataFrame) -> None:
    zones = df["zone"].dropna().unique()
    if df["zone"].isna().any() or len(zones) > 1:
        raise InputError("zone", f"expected one zone per forecast, got {sorted(map(str, zones))} (or missing)")


def check_unique_times(times: pd.Series) -> None:
    dup = times[times.duplicated(keep="first")].drop_duplicates().sort_values()
    if len(dup):
        raise InputError("target_hour", f"duplicate timestamp(s) in the input: {_describe_points(dup)}")


def check_intensity_values(df: pd.DataFrame) -> None:
    """NaN, negative and implausibly large intensities are rejected, naming the times and values."""
    values = df["gco2_per_kwh"]
    if not pd.api.types.is_numeric_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype):
        raise InputError("gco2_per_kwh", f"expected numbers, got dtype {values.dtype}")
    values = values.astype("float64")
    nan = values.isna()
    if nan.any():
        raise InputError("gco2_per_kwh", f"missing (NaN) value(s) at {_describe_points(df['target_hour'][nan])}")
    inf = ~np.isfinite(values)
    if inf.any():
        raise InputError("gco2_per_kwh", f"infinite value(s): {_describe_points(df['target_hour'][inf], values[inf])}")
    neg = values < 0
    if neg.any():
        raise InputError("gco2_per_kwh", f"negative value(s): {_describe_points(df['target_hour'][neg], values[neg])}")
    big = values > MAX_PLAUSIBLE_GCO2_PER_KWH
    if big.any():
        raise InputError(
            "gco2_per_kwh",
            f"impossible magnitude(s) > {MAX_PLAUSIBLE_GCO2_PER_KWH:g} g/kWh (wrong units?): "
            f"{_describe_points(df['target_hour'][big], values[big])}",
        )


def check_issued_at(issued_at: pd.Series, *, now: pd.Timestamp, max_age: pd.Timedelta) -> None:
    """Reject forecasts issued more than ``max_age`` before ``now`` (stale) or after ``now`` (from the future)."""
    if len(issued_at) == 0:
        return
    oldest, newest = issued_at.min(), issued_at.max()
    if oldest < now - max_age:
        raise InputError(
            "issued_at",
            f"stale forecast: issued {format_time(oldest)}, {(now - oldest) / ONE_HOUR:.1f} h before now "
            f"{format_time(now)} (max age {max_age / ONE_HOUR:g} h)",
        )
    if newest > now + FUTURE_ISSUE_TOLERANCE:
        raise InputError("issued_at", f"forecast issued in the future: {format_time(newest)} > now {format_time(now)}")


# ---------------------------------------------------------------- resampling (pure)

def infer_step(times: pd.Series) -> pd.Timedelta:
    """The sampling step: the most common positive gap between sorted unique times (1 h for a single point)."""
    unique = pd.Series(times.drop_duplicates().sort_values().to_numpy())
    gaps = unique.diff().dropna()
    gaps = gaps[gaps > pd.Timedelta(0)]
    if gaps.empty:
        return ONE_HOUR
    return pd.Timedelta(gaps.mode().min())


def to_hourly(df: pd.DataFrame) -> pd.DataFrame:
    """Hourly means of (possibly sub-hourly) points, in canonical form. Pure.

    * Hourly (or coarser) input must sit on hour starts and is returned sorted, unchanged in value.
    * Sub-hourly input with step s (s must divide one hour) becomes one row per hour holding the mean of the
      3600/s points that fall in that hour. Hours not fully covered by points are dropped, so the caller sees
      them as missing rather than as a mean over a partial hour. A NaN point makes its hour NaN (never skipped).
    * ``issued_at`` of an hour is the latest ``issued_at`` of its points.
    """
    if df.empty:
        return empty_forecast_frame()
    times = df["target_hour"]
    step = infer_step(times)
    if step >= ONE_HOUR:
        off_grid = times[times != times.dt.floor("h")]
        if len(off_grid):
            raise InputError("target_hour", f"hourly points not on hour starts: {_describe_points(off_grid)}")
        return _canonical(df.sort_values("target_hour"))
    if ONE_HOUR % step != pd.Timedelta(0):
        raise InputError("target_hour", f"sampling step {step} does not divide one hour")
    points_per_hour = int(ONE_HOUR / step)
    hour = times.dt.floor("h").rename("hour")
    grouped = df.assign(_is_nan=df["gco2_per_kwh"].isna()).groupby(hour, sort=True)
    hourly = pd.DataFrame(
        {
            "zone": grouped["zone"].first(),
            "issued_at": grouped["issued_at"].max(),
            "gco2_per_kwh": grouped["gco2_per_kwh"].mean(),
            "provider": grouped["provider"].first(),
            "n_points": grouped["target_hour"].nunique(),
            "any_nan": grouped["_is_nan"].any(),
        }
    )
    hourly.loc[hourly["any_nan"], "gco2_per_kwh"] = np.nan
    hourly = hourly[hourly["n_points"] == points_per_hour]
    hourly = hourly.rename_axis("target_hour").reset_index()
    return _canonical(hourly)


def _canonical(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "zone": df["zone"].astype(str).to_numpy(),
            "target_hour": pd.DatetimeIndex(df["target_hour"]).tz_convert("UTC").as_unit("ns"),
            "issued_at": pd.DatetimeIndex(df["issued_at"]).tz_convert("UTC").as_unit("ns"),
            "gco2_per_kwh": df["gco2_per_kwh"].astype("float64").to_numpy(),
            "provider": df["provider"].astype(str).to_numpy(),
        }
    )
    out["zone"] = out["zone"].astype(str)
    out["provider"] = out["provider"].astype(str)
    return out[FORECAST_COLUMNS].sort_values("target_hour", ignore_index=True)


# ---------------------------------------------------------------- the validator

def expected_hours(start: pd.Timestamp, end: pd.Timestamp) -> pd.DatetimeIndex:
    return pd.date_range(start, end, freq="h", inclusive="left").as_unit("ns")


def validate_forecast(
    df: pd.DataFrame,
    *,
    start: pd.Timestamp,
    end: pd.Timestamp,
    now: pd.Timestamp,
    max_age: pd.Timedelta = DEFAULT_MAX_AGE,
) -> pd.DataFrame:
    """Check a raw forecast for ``[start, end)`` and return it hourly, canonical and sorted.

    Raises InputError naming: ``start``/``end``/``now`` (naive or misaligned window), a missing column,
    ``zone`` (several zones), ``target_hour`` (naive, duplicate, off-grid or missing hours),
    ``gco2_per_kwh`` (NaN, infinite, negative, > 2000 g/kWh), ``issued_at`` (naive, missing, stale or future).
    """
    start = require_utc_timestamp(start, "start")
    end = require_utc_timestamp(end, "end")
    now = require_utc_timestamp(now, "now")
    check_window(start, end)
    check_columns(df)
    check_tz_aware_column(df, "target_hour")
    check_tz_aware_column(df, "issued_at")
    check_single_zone(df)
    in_window = (df["target_hour"] >= start) & (df["target_hour"] < end)
    raw = df.loc[in_window, FORECAST_COLUMNS].reset_index(drop=True)
    check_unique_times(raw["target_hour"])
    check_intensity_values(raw)
    check_issued_at(raw["issued_at"], now=now, max_age=max_age)
    hourly = to_hourly(raw)
    missing = expected_hours(start, end).difference(pd.DatetimeIndex(hourly["target_hour"]))
    if len(missing):
        raise InputError(
            "target_hour",
            f"missing hourly slot(s) in [{format_time(start)}, {format_time(end)}) "
            f"(absent, or not fully covered by sub-hourly points): {describe_hours(missing)}",
        )
    return hourly
