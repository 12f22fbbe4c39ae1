"""Replay of the bundled EIA-930 2022 hourly carbon intensity, with simulated day-ahead forecast errors.

Actuals
    ``data/carbon_intensity/{ZONE}_2022_hourly_mix_and_ci.csv.gz`` (column ``avg_CI``, gCO2/kWh, hourly UTC,
    2022-01-01T00Z .. 2022-12-31T23Z). A few hours are blank in the source: CISO 3 single hours, MISO 1 + 2 hours,
    PJM 1 hour and one 22-hour outage (2022-03-13T07Z .. 2022-03-14T04Z). :func:`load_actual_intensity` fills
    gaps of at most ``MAX_INTERP_GAP_HOURS`` (6) consecutive hours by linear-in-time interpolation between the
    neighbouring hours; longer gaps (and gaps at the series' edges) are never invented: asking for a window that
    touches one raises InputError(``gco2_per_kwh``) naming the hours.

Forecast errors
    The forecast is ``actual x exp(e_h)``, where ``e`` is a Gaussian AR(1) log-ratio error whose mean, standard
    deviation and lag-1 autocorrelation are fitted on the real GB national day-ahead forecast vs actual sample
    (``data/carbon_forecast/gb_national_dayahead_vs_actual_2023-03-16_to_18.csv``, averaged to hours); see
    :func:`gb_error_calibration` and ``docs/carbon_forecast_calibration.md``. One independent, stationary AR(1)
    path is drawn per UTC day from a generator seeded by (seed, zone, day), so day D's forecast depends only on
    (seed, zone, D) and never on the calling order or window. Simulated log errors are clipped to
    mean +- 3 std so that no forecast exceeds the validator's plausibility bound.

Lead time
    A forecast gets better as its target approaches. The GB sample holds two real vintages of every half-hour:
    the day-ahead one (lead 13-36.5 h, mean 24.7 h) and the final one published for the half-hour itself (taken
    as lead 0.5 h). Their log-ratio errors have std 0.277 and 0.122 and means 0.061 and 0.025. The error of a
    forecast made ``L`` hours ahead is ``mu(L) + sigma(L) / sigma_DA * (e_h - mu_DA)``: the same standardised
    path as above, scaled by mean and std interpolated linearly in lead between the two vintages, and held at
    the longest measured lead (36.5 h) beyond it (:func:`lead_scaling`). At the day-ahead sample's mean lead it
    is exactly the day-ahead error, and averaged over the sample's leads it matches the sample's std. Successive
    vintages of one hour differ only by that scaling (a forecast converges towards the actual); real revisions
    are noisier, which this does not model. See ``docs/carbon_forecast_calibration.md``.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from cicm.carbon.schema import make_forecast_frame
from cicm.carbon.validate import check_window, describe_hours, format_time, require_utc_timestamp
from cicm.errors import InputError
from cicm.paths import bundled_data_dir

PROVIDER = "trace"
TRACE_ZONES = ("AZPS", "BPAT", "CISO", "ERCO", "MISO", "NYIS", "PJM", "SOCO")
MAX_INTERP_GAP_HOURS = 6
GB_SAMPLE_RELPATH = "carbon_forecast/gb_national_dayahead_vs_actual_2023-03-16_to_18.csv"
ERROR_CLIP_STD = 3.0
FINAL_FORECAST_LEAD_HOURS = 0.5  # the GB sample's "final" vintage: published for the half-hour itself
_DAY_EPOCH = pd.Timestamp("2000-01-01", tz="UTC")


# ---------------------------------------------------------------- actual intensity (EIA-930)

def trace_path(zone: str) -> Path:
    return bundled_data_dir() / "carbon_intensity" / f"{zone}_2022_hourly_mix_and_ci.csv.gz"


def _check_zone(zone: str) -> None:
    if zone not in TRACE_ZONES:
        raise InputError("zone", f"no bundled trace for zone {zone!r}; available: {', '.join(TRACE_ZONES)}")


@functools.lru_cache(maxsize=len(TRACE_ZONES))
def _read_eia_trace_cached(zone: str) -> pd.Series:
    path = trace_path(zone)
    if not path.is_file():
        raise InputError("zone", f"bundled trace file missing: {path}")
    table = pd.read_csv(path, usecols=["timestamp", "avg_CI"])
    index = pd.DatetimeIndex(pd.to_datetime(table["timestamp"], utc=True)).as_unit("ns")
    series = pd.Series(table["avg_CI"].astype("float64").to_numpy(), index=index)
    if index.has_duplicates:
        duplicated = describe_hours(index[index.duplicated()])
        raise InputError("target_hour", f"{path.name}: duplicate timestamps {duplicated}")
    full = pd.date_range(index.min(), index.max(), freq="h").as_unit("ns")
    return series.sort_index().reindex(full)  # rows absent from the file become NaN gaps too


def read_eia_trace(zone: str) -> pd.Series:
    """The raw hourly ``avg_CI`` series of a zone (UTC index, NaN where the source is blank). Cached; a copy."""
    _check_zone(zone)
    out = _read_eia_trace_cached(zone).copy()
    out.index.name, out.name = "target_hour", "gco2_per_kwh"
    return out


def find_gaps(series: pd.Series) -> list[tuple[pd.Timestamp, pd.Timestamp, int]]:
    """Runs of consecutive NaN hours as (first_hour, last_hour, n_hours). Pure."""
    isna = series.isna().to_numpy()
    gaps, i = [], 0
    while i < len(isna):
        if isna[i]:
            j = i
            while j + 1 < len(isna) and isna[j + 1]:
                j += 1
            gaps.append((series.index[i], series.index[j], j - i + 1))
            i = j + 1
        else:
            i += 1
    return gaps


def fill_short_gaps(series: pd.Series, max_gap_hours: int = MAX_INTERP_GAP_HOURS) -> pd.Series:
    """Time-interpolate interior NaN runs of at most ``max_gap_hours``; longer or edge runs stay NaN. Pure."""
    filled = series.interpolate(method="time", limit_area="inside")
    for first, last, n_hours in find_gaps(series):
        at_edge = first == series.index[0] or last == series.index[-1]
        if n_hours > max_gap_hours or at_edge:
            filled.loc[first:last] = np.nan
    return filled


def load_actual_intensity(
    zone: str,
    start: pd.Timestamp | None = None,
    end: pd.Timestamp | None = None,
    *,
    max_gap_hours: int = MAX_INTERP_GAP_HOURS,
    drop_long_gaps: bool = False,
) -> pd.Series:
    """Hourly actual intensity (gCO2/kWh, UTC index ``target_hour``) for ``[start, end)`` (default: all of 2022).

    Gaps of <= ``max_gap_hours`` are filled by time interpolation. A longer gap inside the window raises
    InputError(``gco2_per_kwh``) naming its hours, unless ``drop_long_gaps`` is set: then those hours are left
    out of the result (its index has holes; nothing is invented). That is meant for storing actuals of a whole
    year (PJM has a 22-hour outage); planning and forecasting use the strict default. A window beyond the trace
    raises InputError(``start``/``end``).
    """
    raw = read_eia_trace(zone)
    first, stop = raw.index[0], raw.index[-1] + pd.Timedelta(hours=1)
    start = first if start is None else require_utc_timestamp(start, "start")
    end = stop if end is None else require_utc_timestamp(end, "end")
    check_window(start, end)
    coverage = f"the {zone} trace covers [{format_time(first)}, {format_time(stop)})"
    if start < first:
        raise InputError("start", f"{format_time(start)} is before the trace: {coverage}")
    if end > stop:
        raise InputError("end", f"{format_time(end)} is after the trace: {coverage}")
    filled = fill_short_gaps(raw, max_gap_hours)
    window = filled[(filled.index >= start) & (filled.index < end)]
    if drop_long_gaps:
        return window.dropna()
    if window.isna().any():
        raise InputError(
            "gco2_per_kwh",
            f"{zone}: EIA-930 data has gap(s) longer than {max_gap_hours} h (not interpolated) at "
            f"{describe_hours(window.index[window.isna()])}",
        )
    return window


# ---------------------------------------------------------------- error model calibration (GB sample)

def read_gb_sample() -> pd.DataFrame:
    path = bundled_data_dir() / GB_SAMPLE_RELPATH
    table = pd.read_csv(path)
    table["from_utc"] = pd.to_datetime(table["from_utc"], utc=True)
    return table


def hourly_forecast_and_actual(sample: pd.DataFrame) -> pd.DataFrame:
    """Half-hourly GB sample -> hourly means of the day-ahead forecast and the actual. Pure."""
    indexed = sample.set_index("from_utc")[["dayahead_forecast_g_per_kwh", "actual_g_per_kwh"]].astype("float64")
    hourly = indexed.resample("1h").mean()
    if "final_forecast_g_per_kwh" in sample.columns:
        extra = sample.set_index("from_utc")[["final_forecast_g_per_kwh", "lead_hours"]].astype("float64")
        hourly = hourly.join(extra.resample("1h").mean())
    if hourly.isna().any().any():
        raise InputError("actual_g_per_kwh", "GB calibration sample has missing half-hours")
    return hourly


def fit_log_ratio_ar1(forecast_gco2_per_kwh: pd.Series, actual_gco2_per_kwh: pd.Series) -> dict:
    """Fit e = log(forecast/actual) as mean + stationary AR(1): mean, std (ddof=1), lag-1 autocorrelation."""
    if (forecast_gco2_per_kwh <= 0).any() or (actual_gco2_per_kwh <= 0).any():
        raise InputError("gco2_per_kwh", "log-ratio calibration needs positive forecasts and actuals")
    log_ratio = np.log(forecast_gco2_per_kwh / actual_gco2_per_kwh)
    phi = float(log_ratio.autocorr(lag=1))
    abs_pct = (forecast_gco2_per_kwh - actual_gco2_per_kwh).abs() / actual_gco2_per_kwh
    return {
        "log_ratio_mean": float(log_ratio.mean()),
        "log_ratio_std": float(log_ratio.std(ddof=1)),
        "ar1_phi": float(np.clip(phi, -0.99, 0.99)),
        "n_hours": int(len(log_ratio)),
        "mape": float(abs_pct.mean()),
        "bias_pct": float(((forecast_gco2_per_kwh - actual_gco2_per_kwh) / actual_gco2_per_kwh).mean()),
    }


@functools.lru_cache(maxsize=1)
def _gb_calibration_cached() -> tuple:
    hourly = hourly_forecast_and_actual(read_gb_sample())
    fit = fit_log_ratio_ar1(hourly["dayahead_forecast_g_per_kwh"], hourly["actual_g_per_kwh"])
    final = fit_log_ratio_ar1(hourly["final_forecast_g_per_kwh"], hourly["actual_g_per_kwh"])
    fit.update(
        {
            "dayahead_lead_hours": float(hourly["lead_hours"].mean()),
            "max_lead_hours": float(hourly["lead_hours"].max()),
            "final_log_ratio_mean": final["log_ratio_mean"],
            "final_log_ratio_std": final["log_ratio_std"],
            "final_lead_hours": FINAL_FORECAST_LEAD_HOURS,
            "final_mape": final["mape"],
        }
    )
    fit.update(
        {
            "resolution": "1h",
            "first_hour": format_time(hourly.index[0]),
            "last_hour": format_time(hourly.index[-1]),
            "source": GB_SAMPLE_RELPATH,
            "error_clip_std": ERROR_CLIP_STD,
        }
    )
    return tuple(fit.items())


def gb_error_calibration() -> dict:
    """Parameters of the day-ahead log-ratio error model fitted on the GB sample (hourly means).

    Keys: ``log_ratio_mean``, ``log_ratio_std``, ``ar1_phi``, ``n_hours``, ``mape`` and ``bias_pct`` (of the GB
    day-ahead forecast vs actual), ``resolution``, ``first_hour``, ``last_hour``, ``source``, ``error_clip_std``;
    for the lead-time model ``dayahead_lead_hours`` (mean lead of the day-ahead vintage), ``max_lead_hours``, and
    the final vintage's ``final_log_ratio_mean``, ``final_log_ratio_std``, ``final_lead_hours``, ``final_mape``.
    """
    return dict(_gb_calibration_cached())


# ---------------------------------------------------------------- simulation

def simulate_ar1_log_errors(
    n_hours: int, *, mean: float, std: float, phi: float, rng: np.random.Generator, clip_std: float = ERROR_CLIP_STD
) -> np.ndarray:
    """A stationary Gaussian AR(1) path: e_0 ~ N(0, std^2), e_t = phi e_{t-1} + sqrt(1-phi^2) std z_t; + mean."""
    z = rng.standard_normal(n_hours)
    e = np.empty(n_hours)
    innovation_std = std * np.sqrt(1.0 - phi**2)
    for t in range(n_hours):
        e[t] = std * z[0] if t == 0 else phi * e[t - 1] + innovation_std * z[t]
    return mean + np.clip(e, -clip_std * std, clip_std * std)


def zone_key(zone: str) -> int:
    """A stable (process-independent) integer for a zone name, for seeding."""
    return int.from_bytes(hashlib.sha256(zone.encode()).digest()[:8], "big")


def day_rng(seed: int, zone: str, day: pd.Timestamp) -> np.random.Generator:
    """Generator for one UTC day: a function of (seed, zone, day) only."""
    day_number = int((day.tz_convert("UTC").floor("D") - _DAY_EPOCH) / pd.Timedelta(days=1))
    return np.random.default_rng(np.random.SeedSequence([int(seed), zone_key(zone), day_number]))


def day_log_errors(seed: int, zone: str, day: pd.Timestamp, calibration: dict) -> pd.Series:
    """The 24 hourly log errors of one UTC day, indexed by hour."""
    day = day.tz_convert("UTC").floor("D")
    values = simulate_ar1_log_errors(
        24,
        mean=calibration["log_ratio_mean"],
        std=calibration["log_ratio_std"],
        phi=calibration["ar1_phi"],
        rng=day_rng(seed, zone, day),
        clip_std=calibration.get("error_clip_std", ERROR_CLIP_STD),
    )
    return pd.Series(values, index=pd.date_range(day, periods=24, freq="h").as_unit("ns"))


def forecast_log_errors(seed: int, zone: str, start: pd.Timestamp, end: pd.Timestamp, calibration: dict) -> pd.Series:
    """Log errors for every hour of ``[start, end)``, built from whole UTC days so each day is order-independent."""
    days = pd.date_range(start.floor("D"), (end - pd.Timedelta(hours=1)).floor("D"), freq="D")
    errors = pd.concat([day_log_errors(seed, zone, day, calibration) for day in days])
    return errors[(errors.index >= start) & (errors.index < end)]


def lead_scaling(lead_hours: np.ndarray, calibration: dict) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of the log-ratio error of forecasts ``lead_hours`` ahead: linear in lead between the final
    vintage and the day-ahead one, held beyond the longest measured lead. Pure."""
    if "final_log_ratio_std" not in calibration:  # a day-ahead-only calibration: no lead dependence
        n = np.shape(lead_hours)
        return np.full(n, calibration["log_ratio_mean"]), np.full(n, calibration["log_ratio_std"])
    lead0, lead1 = calibration["final_lead_hours"], calibration["dayahead_lead_hours"]
    x = (np.clip(np.asarray(lead_hours, float), lead0, calibration["max_lead_hours"]) - lead0) / (lead1 - lead0)
    mean = calibration["final_log_ratio_mean"] + x * (calibration["log_ratio_mean"] - calibration["final_log_ratio_mean"])
    std = calibration["final_log_ratio_std"] + x * (calibration["log_ratio_std"] - calibration["final_log_ratio_std"])
    return mean, std


def simulated_forecast_gco2_per_kwh(actual_gco2_per_kwh: pd.Series, zone: str, issued_at: pd.Timestamp, seed: int,
                                    calibration: dict | None = None) -> np.ndarray:
    """The forecast of ``actual`` (hourly, UTC index) issued at ``issued_at``: actual x exp(error at the hour's
    lead). Hours at or before ``issued_at`` get the final vintage's error. Pure given its arguments."""
    cal = calibration or gb_error_calibration()
    index = pd.DatetimeIndex(actual_gco2_per_kwh.index)
    if len(index) == 0:
        return np.zeros(0)
    day_ahead = forecast_log_errors(int(seed), zone, index.min(), index.max() + pd.Timedelta(hours=1), cal)
    e = day_ahead.reindex(index).to_numpy()
    lead = ((index - issued_at) / pd.Timedelta(hours=1)).to_numpy(float) + 0.5  # to the middle of the hour
    mean, std = lead_scaling(lead, cal)
    scaled = mean + std / cal["log_ratio_std"] * (e - cal["log_ratio_mean"])
    return actual_gco2_per_kwh.to_numpy(float) * np.exp(scaled)


def trace_forecast(
    zone: str,
    start: pd.Timestamp,
    end: pd.Timestamp,
    issued_at: pd.Timestamp,
    seed: int = 0,
    *,
    calibration: dict | None = None,
) -> pd.DataFrame:
    """Simulated forecast for ``[start, end)`` issued at ``issued_at``: actual x exp(lead-scaled AR(1) log error).
    Canonical frame."""
    start = require_utc_timestamp(start, "start")
    end = require_utc_timestamp(end, "end")
    issued_at = require_utc_timestamp(issued_at, "issued_at")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError("seed", f"expected a non-negative integer, got {seed!r}")
    actual = load_actual_intensity(zone, start, end)
    forecast = simulated_forecast_gco2_per_kwh(actual, zone, issued_at, int(seed), calibration)
    return make_forecast_frame(
        zone=zone, target_times=actual.index, issued_at=issued_at, gco2_per_kwh=forecast, provider=PROVIDER
    )
