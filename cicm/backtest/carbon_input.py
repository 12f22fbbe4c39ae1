"""A zone's carbon for a backtest: hourly actuals and the forecasts a planner would have had at any moment.

Two sources, one type (:class:`ZoneCarbon`):

- ``ZoneCarbon.bundled("CISO")``: the bundled EIA-930 2022 trace, forecasts simulated by the trace provider's
  calibrated error model (:mod:`cicm.carbon.trace`: the error shrinks as the target hour approaches).
- ``ZoneCarbon.from_csv(path, zone)``: any zone's hourly actuals from a CSV (columns ``target_hour`` or
  ``timestamp``/``datetime``, and ``gco2_per_kwh`` or ``avg_CI``/``carbon_intensity``; timestamps carry an offset,
  or the time column's name says UTC, e.g. Electricity Maps' ``Datetime (UTC)``; sub-hourly rows are averaged to
  hours). Forecasts are simulated from them with the same error model, or read from a forecast CSV
  (``target_hour``, ``gco2_per_kwh``, optional ``issued_at``): each plan then uses, for every hour, the newest
  vintage issued at or before its moment, and says so when none was.

Every consumer reads from here: the day-ahead and hourly forecasts, the forecast-value gate's history, the
actuals the policies are charged and the perfect-foresight bound. Gaps of at most 6 hours are interpolated;
longer ones are never invented: the days that touch them are skipped (:meth:`ZoneCarbon.long_gaps`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cicm.carbon.schema import MAX_PLAUSIBLE_GCO2_PER_KWH
from cicm.carbon.trace import (
    MAX_INTERP_GAP_HOURS,
    fill_short_gaps,
    find_gaps,
    forecast_log_errors,
    gb_error_calibration,
    lead_scaling,
    read_eia_trace,
)
from cicm.carbon.validate import describe_hours, format_time
from cicm.errors import InputError

_H = pd.Timedelta(hours=1)
TIME_COLUMNS = ("target_hour", "timestamp", "datetime", "datetime (utc)", "time", "date")
VALUE_COLUMNS = ("gco2_per_kwh", "avg_ci", "carbon_intensity", "carbon_intensity_gco2_per_kwh",
                 "carbon intensity gco₂eq/kwh (life cycle)", "carbon intensity gco₂eq/kwh (direct)")
#: Below this median an "intensity" is almost surely kg/kWh or t/MWh, not g/kWh.
MIN_PLAUSIBLE_MEDIAN_GCO2_PER_KWH = 5.0


@dataclass(frozen=True)
class ZoneCarbon:
    zone: str
    raw: pd.Series  # hourly gCO2/kWh, UTC hour index without holes, NaN where the source has none
    source: str
    vintages: pd.DataFrame | None = None  # forecast CSV: issued_at (or NaT), target_hour, gco2_per_kwh
    filled: pd.Series = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "filled", fill_short_gaps(self.raw))

    # ------------------------------------------------------------------------------------------ constructors

    @classmethod
    def bundled(cls, zone: str) -> "ZoneCarbon":
        return cls(zone, read_eia_trace(zone), f"bundled EIA-930 2022 ({zone})")

    @classmethod
    def from_csv(cls, path: str | Path, zone: str, forecast_csv: str | Path | None = None) -> "ZoneCarbon":
        if not zone or not zone.strip():
            raise InputError("zone", "name the zone of the carbon CSV")
        raw = read_actuals_csv(path)
        vintages = read_forecast_vintages(forecast_csv) if forecast_csv else None
        return cls(zone.strip(), raw, str(path), vintages)

    # ------------------------------------------------------------------------------------------ actuals

    @property
    def first_hour(self) -> pd.Timestamp:
        return self.raw.index[0]

    @property
    def end(self) -> pd.Timestamp:
        return self.raw.index[-1] + _H

    def actual(self, start: pd.Timestamp, end: pd.Timestamp) -> pd.Series:
        """Hourly actuals over ``[start, end)``; short gaps filled; InputError naming what is missing."""
        if start < self.first_hour or end > self.end:
            raise InputError("gco2_per_kwh", f"{self.zone}: carbon data covers [{format_time(self.first_hour)}, "
                                             f"{format_time(self.end)}), the backtest needs [{format_time(start)}, "
                                             f"{format_time(end)})")
        window = self.filled[(self.filled.index >= start) & (self.filled.index < end)]
        if window.isna().any():
            raise InputError("gco2_per_kwh", f"{self.zone}: gap(s) longer than {MAX_INTERP_GAP_HOURS} h at "
                                             f"{describe_hours(window.index[window.isna()])}")
        return window

    def long_gaps(self) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
        """Interior runs of missing hours too long to interpolate (first, last hour)."""
        return [(a, b) for a, b, n in find_gaps(self.filled) if n > MAX_INTERP_GAP_HOURS
                and a != self.raw.index[0] and b != self.raw.index[-1]]

    # ------------------------------------------------------------------------------------------ forecasts

    def forecaster(self, hours: pd.DatetimeIndex, seed: int) -> "Forecaster":
        """Forecasts of any hours of ``hours`` as issued at any moment (see :class:`Forecaster`)."""
        return Forecaster(self, pd.DatetimeIndex(hours), int(seed))

    def forecast_history(self, start: pd.Timestamp, end: pd.Timestamp, seed: int) -> pd.Series:
        """Each UTC day of ``[start, end)`` as forecast at 18:00 UTC the evening before (the vintages a running
        planner would have stored), for the forecast-value gate; days without data are left out."""
        hours = self.filled.index[(self.filled.index >= start) & (self.filled.index < end)]
        hours = hours[self.filled.reindex(hours).notna().to_numpy()]
        if len(hours) == 0:
            return pd.Series(dtype=float)
        fc = self.forecaster(hours, seed)
        days = hours.floor("D")
        out = [fc.at(day - pd.Timedelta(hours=6), np.flatnonzero(days == day)) for day in days.unique()]
        values = np.concatenate(out)
        return pd.Series(values, index=hours, name="gco2_per_kwh")


@dataclass
class Forecaster:
    """``at(issued_at, idx)``: the forecast of ``hours[idx]`` as known at ``issued_at``.

    Simulated (no forecast CSV): actual x exp(the trace model's error at each hour's lead), one standardised error
    path per (seed, zone, UTC day), so every vintage of an hour is consistent and converges on the actual.
    From a forecast CSV: for each hour, the newest vintage issued at or before ``issued_at`` (a file without
    ``issued_at`` is one vintage, used at every moment)."""

    carbon: ZoneCarbon
    hours: pd.DatetimeIndex
    seed: int

    def __post_init__(self) -> None:
        self.hours = pd.DatetimeIndex(self.hours).as_unit("ns")
        self._actual = self.carbon.filled.reindex(self.hours).to_numpy(float)
        if self.carbon.vintages is None:
            self._cal = gb_error_calibration()
            e = forecast_log_errors(self.seed, self.carbon.zone, self.hours.min(), self.hours.max() + _H, self._cal)
            self._z = (e.reindex(self.hours).to_numpy() - self._cal["log_ratio_mean"]) / self._cal["log_ratio_std"]
            self._hours_ns = self.hours.asi8
        else:
            v = self.carbon.vintages
            v = v[v["target_hour"].isin(self.hours)]
            never = np.iinfo(np.int64).min  # a vintage without issued_at is known at every moment
            self._by_hour = {}
            for h, g in v.groupby("target_hour"):
                issued = pd.DatetimeIndex(g["issued_at"]).as_unit("ns").asi8.copy()
                issued[pd.isna(g["issued_at"]).to_numpy()] = never
                order = np.argsort(issued, kind="stable")
                self._by_hour[h] = (issued[order], g["gco2_per_kwh"].to_numpy(float)[order])

    def at(self, issued_at: pd.Timestamp, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, int)
        issued_at = pd.Timestamp(issued_at).as_unit("ns")
        if self.carbon.vintages is not None:
            return self._from_vintages(issued_at, idx)
        lead_h = (self._hours_ns[idx] - issued_at.value) / 3.6e12 + 0.5
        mean, std = lead_scaling(lead_h, self._cal)
        out = self._actual[idx] * np.exp(mean + std * self._z[idx])
        if np.isnan(out).any():
            raise InputError("gco2_per_kwh", f"{self.carbon.zone}: no actual to forecast at "
                                             f"{describe_hours(self.hours[idx][np.isnan(out)])}")
        return out

    def _from_vintages(self, issued_at: pd.Timestamp, idx: np.ndarray) -> np.ndarray:
        out = np.full(idx.size, np.nan)
        for k, i in enumerate(idx):
            issued, values = self._by_hour.get(self.hours[i], (None, None))
            if issued is None:
                continue
            n_known = int(np.searchsorted(issued, issued_at.value, side="right"))
            if n_known:
                out[k] = values[n_known - 1]
        if np.isnan(out).any():
            raise InputError("forecast_csv", f"{self.carbon.zone}: no forecast issued by {format_time(issued_at)} "
                                             f"for {describe_hours(self.hours[idx][np.isnan(out)])}")
        return out


# ------------------------------------------------------------------------------------------------ CSV readers


def _column(table: pd.DataFrame, names: tuple[str, ...], what: str, path: Path) -> str:
    lower = {c.strip().lower(): c for c in table.columns}
    for name in names:
        if name in lower:
            return lower[name]
    raise InputError(what, f"{path.name}: no {what} column; expected one of {list(names)}, has {list(table.columns)}")


def _read(path: str | Path) -> tuple[pd.DataFrame, Path]:
    path = Path(path)
    if not path.is_file():
        raise InputError("carbon_csv", f"file not found: {path}")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False), path
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError("carbon_csv", f"cannot read {path}: {exc}") from exc


def _times(texts: pd.Series, column: str, field: str) -> pd.DatetimeIndex:
    """ISO timestamps with an offset; naive ones only when the column's name says UTC."""
    texts = texts.str.strip()
    try:
        parsed = pd.to_datetime(texts, utc=False, format="ISO8601")
    except (ValueError, TypeError) as exc:
        raise InputError(field, f"unparseable timestamp(s) in column {column!r}: {exc}") from exc
    if getattr(parsed.dt, "tz", None) is None:
        try:
            parsed = pd.to_datetime(texts, utc=True, format="ISO8601")
        except (ValueError, TypeError) as exc:
            raise InputError(field, f"mixed or unparseable timestamps in {column!r}: {exc}") from exc
        naive = ~texts.str.contains(r"(?:Z|[+-]\d\d:?\d\d)$", regex=True)
        if naive.any() and "utc" not in column.lower():
            raise InputError(field, f"column {column!r} has timestamps without a UTC offset (e.g. "
                                    f"{texts[naive].iloc[0]!r}); add the offset or name the column '... (UTC)'")
    return pd.DatetimeIndex(parsed.dt.tz_convert("UTC")).as_unit("ns")


def _numbers(texts: pd.Series, field: str) -> np.ndarray:
    stripped = texts.str.strip()
    numbers = pd.to_numeric(stripped.where(stripped != "", None), errors="coerce")
    junk = numbers.isna() & ~stripped.str.lower().isin(["", "nan", "na", "null"])
    if junk.any():
        shown = ", ".join(f"row {i + 2}: {v!r}" for i, v in stripped[junk].head(5).items())
        raise InputError(field, f"non-numeric value(s): {shown}")
    return numbers.to_numpy(float)


def _check_values(values: pd.Series, field: str) -> None:
    bad = values[(values < 0) | ~np.isfinite(values.fillna(0.0)) | (values > MAX_PLAUSIBLE_GCO2_PER_KWH)]
    if len(bad):
        raise InputError(field, f"impossible intensity (< 0, infinite or > {MAX_PLAUSIBLE_GCO2_PER_KWH:g} g/kWh: "
                                f"wrong units?) at {describe_hours(bad.index)}")
    median = float(values.median())
    if median < MIN_PLAUSIBLE_MEDIAN_GCO2_PER_KWH:
        raise InputError(field, f"median intensity {median:.3g} is not plausible in gCO2/kWh (kg/kWh or t/MWh? "
                                "multiply by 1000)")


def read_actuals_csv(path: str | Path) -> pd.Series:
    """Hourly actual intensity from a CSV (see the module docstring): UTC hour index without holes, NaN where
    the file has no value. Duplicate times raise; sub-hourly rows become hourly means (incomplete hours NaN)."""
    table, path = _read(path)
    tcol = _column(table, TIME_COLUMNS, "target_hour", path)
    vcol = _column(table, VALUE_COLUMNS, "gco2_per_kwh", path)
    times = _times(table[tcol], tcol, "target_hour")
    values = pd.Series(_numbers(table[vcol], "gco2_per_kwh"), index=times)
    if times.has_duplicates:
        raise InputError("target_hour", f"{path.name}: duplicate timestamp(s) {describe_hours(times[times.duplicated()])}")
    values = values.sort_index()
    if len(values) < 48:
        raise InputError("carbon_csv", f"{path.name}: {len(values)} rows; a backtest needs weeks of hourly data")
    step = pd.Series(values.index).diff().dropna()
    step = step[step > pd.Timedelta(0)].mode().min()
    if step < _H:
        if _H % step != pd.Timedelta(0):
            raise InputError("target_hour", f"{path.name}: step {step} does not divide an hour")
        grouped = values.groupby(values.index.floor("h"))
        hourly = grouped.mean().where(grouped.count() == int(_H / step))
        hourly[grouped.apply(lambda s: s.isna().any())] = np.nan
        values = hourly
    elif (values.index != values.index.floor("h")).any():
        raise InputError("target_hour", f"{path.name}: hourly rows must start on whole UTC hours "
                                        f"(e.g. {format_time(values.index[values.index != values.index.floor('h')][0])})")
    full = pd.date_range(values.index[0], values.index[-1], freq="h").as_unit("ns")
    series = values.reindex(full).rename("gco2_per_kwh").rename_axis("target_hour")
    _check_values(series.dropna(), "gco2_per_kwh")
    return series


def read_forecast_vintages(path: str | Path) -> pd.DataFrame:
    """Forecast vintages from a CSV: target_hour, gco2_per_kwh, optional issued_at (NaT without the column)."""
    table, path = _read(path)
    tcol = _column(table, TIME_COLUMNS, "target_hour", path)
    vcol = _column(table, VALUE_COLUMNS, "gco2_per_kwh", path)
    out = pd.DataFrame({"target_hour": _times(table[tcol], tcol, "target_hour"),
                        "gco2_per_kwh": _numbers(table[vcol], "gco2_per_kwh")})
    if "issued_at" in table.columns:
        out["issued_at"] = _times(table["issued_at"], "issued_at", "issued_at")
    else:
        out["issued_at"] = pd.NaT
        out["issued_at"] = pd.to_datetime(out["issued_at"], utc=True)
    dup = out.duplicated(["issued_at", "target_hour"])
    if dup.any():
        raise InputError("target_hour", f"{path.name}: duplicate (issued_at, target_hour) rows at "
                                        f"{describe_hours(pd.DatetimeIndex(out['target_hour'][dup]))}")
    if out["gco2_per_kwh"].isna().any():
        raise InputError("gco2_per_kwh", f"{path.name}: missing forecast value(s) at "
                                         f"{describe_hours(pd.DatetimeIndex(out['target_hour'][out['gco2_per_kwh'].isna()]))}")
    _check_values(out.set_index("target_hour")["gco2_per_kwh"], "gco2_per_kwh")
    return out
