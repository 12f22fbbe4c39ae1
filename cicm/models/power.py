"""CPU -> power models per power domain, and cluster power as the sum over its domains.

After Radovanović et al., "Power Modeling for Effective Datacenter Planning and Compute Management" (2021):
a power domain's power is piecewise linear in its CPU usage, with three equal segments between the observed
minimum and maximum CPU, fitted by weighted least squares on the last 7 days (weight 1/(1 + age in days)),
after the paper's outlier rules (`clean_power_samples`).

The model uses the continuous hinge basis  1, u, max(0, u - b1), max(0, u - b2)  with b0 < b1 < b2 < b3 the
breakpoints (b0 = observed min, b3 = observed max). Outside [b0, b3] it extrapolates linearly with the end
segment's slope, and the prediction is clipped at 0 kW.

All functions are pure (data in, data out); `load_specpower` is the one reader.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import statsmodels.api as sm

from cicm.errors import InputError

MIN_SAMPLES = 24
N_SEGMENTS = 3
SPEC_LOAD_FRACTIONS = np.linspace(0.0, 1.0, 11)
SPEC_WATT_COLUMNS = ("watts_active_idle",) + tuple(f"watts_{p}pct" for p in range(10, 101, 10))


# ----------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class PowerModel:
    """A fitted piecewise-linear CPU -> kW model of one power domain.

    coefficients are (intercept_kw, slope_kw_per_core, hinge1_kw_per_core, hinge2_kw_per_core) of the basis
    1, u, max(0, u - b1), max(0, u - b2). Segment slopes are c1, c1 + c2, c1 + c2 + c3.
    r2 is the weighted R² of the WLS fit; mape_pct the unweighted in-sample MAPE on the cleaned samples.
    """

    breakpoints_cpu_cores: tuple[float, float, float, float]
    coefficients: tuple[float, float, float, float]
    n_samples: int
    r2: float
    mape_pct: float
    fitted_at: pd.Timestamp
    window_start: pd.Timestamp
    window_end: pd.Timestamp

    @property
    def segment_slopes_kw_per_core(self) -> tuple[float, float, float]:
        c = self.coefficients
        return (c[1], c[1] + c[2], c[1] + c[2] + c[3])

    def to_dict(self) -> dict:
        """JSON-ready: floats, ints and ISO-8601 UTC strings."""
        return {
            "breakpoints_cpu_cores": [float(b) for b in self.breakpoints_cpu_cores],
            "coefficients": [float(c) for c in self.coefficients],
            "n_samples": int(self.n_samples),
            "r2": float(self.r2),
            "mape_pct": float(self.mape_pct),
            "fitted_at": self.fitted_at.isoformat(),
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PowerModel":
        try:
            breakpoints = tuple(float(b) for b in data["breakpoints_cpu_cores"])
            coefficients = tuple(float(c) for c in data["coefficients"])
            model = cls(
                breakpoints_cpu_cores=breakpoints,  # type: ignore[arg-type]
                coefficients=coefficients,  # type: ignore[arg-type]
                n_samples=int(data["n_samples"]),
                r2=float(data["r2"]),
                mape_pct=float(data["mape_pct"]),
                fitted_at=_utc(pd.Timestamp(data["fitted_at"]), "fitted_at"),
                window_start=_utc(pd.Timestamp(data["window_start"]), "window_start"),
                window_end=_utc(pd.Timestamp(data["window_end"]), "window_end"),
            )
        except KeyError as exc:
            raise InputError(str(exc.args[0]), "missing from the stored power model") from exc
        if len(breakpoints) != 4 or not all(math.isfinite(b) for b in breakpoints):
            raise InputError("breakpoints_cpu_cores", "need 4 finite breakpoints")
        if any(b1 >= b2 for b1, b2 in zip(breakpoints, breakpoints[1:])):
            raise InputError("breakpoints_cpu_cores", "breakpoints must increase strictly")
        if len(coefficients) != 4 or not all(math.isfinite(c) for c in coefficients):
            raise InputError("coefficients", "need 4 finite coefficients")
        return model


def _utc(ts: pd.Timestamp, field: str) -> pd.Timestamp:
    if ts.tzinfo is None:
        raise InputError(field, "timestamp must be tz-aware (UTC)")
    return ts.tz_convert("UTC")


def _hinge_basis(cpu_cores: np.ndarray, breakpoints: tuple[float, ...]) -> np.ndarray:
    u = np.asarray(cpu_cores, dtype=float)
    return np.column_stack(
        [np.ones_like(u), u, np.maximum(0.0, u - breakpoints[1]), np.maximum(0.0, u - breakpoints[2])]
    )


# ---------------------------------------------------------------------------------------- validation


def _check_series(cpu_cores: pd.Series, power_kw: pd.Series) -> tuple[pd.Series, pd.Series]:
    for name, s in (("cpu_cores", cpu_cores), ("power_kw", power_kw)):
        if not isinstance(s, pd.Series):
            raise InputError(name, "must be a pandas Series indexed by UTC time")
        if not isinstance(s.index, pd.DatetimeIndex) or s.index.tz is None:
            raise InputError(name, "index must be a tz-aware (UTC) DatetimeIndex")
        if s.index.has_duplicates:
            raise InputError(name, f"duplicate timestamps, e.g. {s.index[s.index.duplicated()][0]}")
        values = pd.to_numeric(s, errors="coerce").to_numpy(dtype=float)
        if np.isnan(values).any():
            raise InputError(name, f"{int(np.isnan(values).sum())} NaN or non-numeric values")
        if np.isinf(values).any():
            raise InputError(name, "infinite values")
        if (values < 0).any():
            raise InputError(name, f"negative values, e.g. {values[values < 0][0]:g}")
    if not cpu_cores.index.equals(power_kw.index):
        raise InputError("power_kw", "index must equal the cpu_cores index (same timestamps, same order)")
    if not cpu_cores.index.is_monotonic_increasing:
        order = np.argsort(cpu_cores.index.to_numpy(), kind="stable")
        cpu_cores, power_kw = cpu_cores.iloc[order], power_kw.iloc[order]
    idx = cpu_cores.index.tz_convert("UTC")
    return (
        pd.Series(cpu_cores.to_numpy(dtype=float), index=idx, name="cpu_cores"),
        pd.Series(power_kw.to_numpy(dtype=float), index=idx, name="power_kw"),
    )


def _check_now(now: pd.Timestamp) -> pd.Timestamp:
    if not isinstance(now, pd.Timestamp):
        try:
            now = pd.Timestamp(now)
        except (TypeError, ValueError) as exc:
            raise InputError("now", f"not a timestamp: {now!r}") from exc
    return _utc(now, "now")


def _cpu_array(cpu_cores, field: str = "cpu_cores") -> np.ndarray:
    u = np.asarray(cpu_cores, dtype=float)
    if np.isnan(u).any():
        raise InputError(field, "NaN CPU values")
    if (u < 0).any():
        raise InputError(field, "negative CPU values")
    return u


# ------------------------------------------------------------------------------------------ cleaning


@dataclass(frozen=True)
class CleanedSamples:
    """Samples kept by `clean_power_samples`, and how many each rule removed."""

    cpu_cores: pd.Series
    power_kw: pd.Series
    n_usage_jumps: int
    n_power_usage_mismatch: int
    n_low_power: int


def clean_power_samples(
    cpu_cores: pd.Series,
    power_kw: pd.Series,
    max_usage_jump_frac: float = 0.30,
    max_power_to_usage_change: float = 20.0,
    min_power_change_frac: float = 0.05,
    low_power_frac_of_daily_median: float = 0.80,
) -> CleanedSamples:
    """The power-modeling paper's outlier rules, applied in this order:

    1. low power: drop samples whose power is below 80% of the median power of their UTC day (meter dropouts);
    2. usage jumps: drop samples whose CPU changed by more than 30% relative to the previous sample (power and
       usage are not sampled at exactly the same instant, so such samples pair the wrong power with the usage);
    3. mismatch: drop samples whose relative power change from the previous sample is more than 20x the
       relative usage change. Power changes below `min_power_change_frac` (5%) are meter noise and never
       dropped by this rule, otherwise a flat usage stretch would lose every sample.

    Rules 2 and 3 compare each sample with the one just before it (after rule 1), so a one-sample spike also
    removes the sample after it; comparing with the last *kept* sample instead would drop everything after a
    genuine level step. Rule 1 runs first so that a meter dropout does not also flag its neighbours.
    """
    cpu, power = _check_series(cpu_cores, power_kw)
    n0 = len(cpu)

    if len(cpu):
        day = cpu.index.floor("D")
        daily_median = power.groupby(day).transform("median")
        keep = (power >= low_power_frac_of_daily_median * daily_median).to_numpy()
    else:
        keep = np.ones(0, dtype=bool)
    cpu, power = cpu[keep], power[keep]
    n_low = n0 - len(cpu)

    u = cpu.to_numpy()
    prev = np.concatenate([[np.nan], u[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        du = np.abs(u - prev) / prev
    du = np.where(prev == 0, np.where(u == 0, 0.0, np.inf), du)
    jump = np.nan_to_num(du, nan=0.0) > max_usage_jump_frac
    cpu, power = cpu[~jump], power[~jump]
    n_jump = int(jump.sum())

    u, p = cpu.to_numpy(), power.to_numpy()
    up, pp = np.concatenate([[np.nan], u[:-1]]), np.concatenate([[np.nan], p[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        du = np.abs(u - up) / up
        dp = np.abs(p - pp) / pp
    du = np.nan_to_num(du, nan=0.0, posinf=np.inf)
    dp = np.nan_to_num(dp, nan=0.0, posinf=np.inf)
    mismatch = (dp > min_power_change_frac) & (dp > max_power_to_usage_change * du)
    cpu, power = cpu[~mismatch], power[~mismatch]

    return CleanedSamples(cpu, power, n_jump, int(mismatch.sum()), n_low)


# ------------------------------------------------------------------------------------------- fitting


def fit_power_model(
    cpu_cores: pd.Series,
    power_kw: pd.Series,
    now: pd.Timestamp,
    window_days: float = 7,
    clean: bool = True,
) -> PowerModel:
    """Fit one power domain's model on the samples in [now - window_days, now), after `clean_power_samples`.

    Weighted least squares (statsmodels WLS) with weight 1/(1 + age in days), age = now - sample time.
    Raises InputError for NaN/negative/misaligned input, fewer than 24 usable samples, or constant CPU.
    """
    now = _check_now(now)
    if not (isinstance(window_days, numbers.Real) and math.isfinite(window_days) and window_days > 0):
        raise InputError("window_days", f"must be a positive number of days, got {window_days!r}")
    cpu, power = _check_series(cpu_cores, power_kw)
    start = now - pd.Timedelta(days=window_days)
    inside = (cpu.index >= start) & (cpu.index < now)
    cpu, power = cpu[inside], power[inside]
    if clean:
        cleaned = clean_power_samples(cpu, power)
        cpu, power = cleaned.cpu_cores, cleaned.power_kw
    if len(cpu) < MIN_SAMPLES:
        raise InputError(
            "cpu_cores",
            f"{len(cpu)} usable samples in [{start}, {now}) after outlier removal; need at least {MIN_SAMPLES}",
        )
    u, p = cpu.to_numpy(), power.to_numpy()
    lo, hi = float(u.min()), float(u.max())
    if hi - lo <= 1e-9 * max(1.0, abs(hi)):
        raise InputError("cpu_cores", f"CPU is constant ({lo:g} cores) in the window; cannot fit a slope")
    breakpoints = tuple(float(b) for b in np.linspace(lo, hi, N_SEGMENTS + 1))
    age_days = (now - cpu.index).total_seconds().to_numpy() / 86400.0
    weights = 1.0 / (1.0 + age_days)
    X = _hinge_basis(u, breakpoints)
    result = sm.WLS(p, X, weights=weights).fit()
    coefficients = tuple(float(c) for c in np.nan_to_num(result.params, nan=0.0))
    fitted = np.maximum(X @ np.asarray(coefficients), 0.0)
    positive = p > 0
    mape = float(np.mean(np.abs(fitted[positive] - p[positive]) / p[positive]) * 100) if positive.any() else math.nan
    r2 = float(result.rsquared) if math.isfinite(result.rsquared) else math.nan
    return PowerModel(
        breakpoints_cpu_cores=breakpoints,  # type: ignore[arg-type]
        coefficients=coefficients,  # type: ignore[arg-type]
        n_samples=int(len(u)),
        r2=r2,
        mape_pct=mape,
        fitted_at=now,
        window_start=start,
        window_end=now,
    )


def predict_power_kw(model: PowerModel, cpu_cores):
    """Power (kW) at the given CPU cores: float for a scalar, ndarray for an array. Never negative."""
    u = _cpu_array(cpu_cores)
    p = np.maximum(_hinge_basis(u.ravel(), model.breakpoints_cpu_cores) @ np.asarray(model.coefficients), 0.0)
    return float(p[0]) if u.ndim == 0 else p.reshape(u.shape)


def slope_kw_per_core(model: PowerModel, cpu_cores):
    """dP/du (kW per core) at the given CPU: the slope of the segment holding u (right derivative at a
    breakpoint); end-segment slopes beyond the range; 0 where the prediction is clipped at 0 kW."""
    u = _cpu_array(cpu_cores)
    flat = u.ravel()
    b, c = model.breakpoints_cpu_cores, model.coefficients
    slope = c[1] + c[2] * (flat >= b[1]) + c[3] * (flat >= b[2])
    raw = _hinge_basis(flat, b) @ np.asarray(c)
    slope = np.where(raw > 0, slope, 0.0)
    return float(slope[0]) if u.ndim == 0 else slope.reshape(u.shape)


# ------------------------------------------------------------------------------------------ clusters


def _check_shares(models: list[PowerModel], cpu_shares: list[float]) -> np.ndarray:
    if len(models) == 0:
        raise InputError("models", "a cluster needs at least one power model")
    shares = np.asarray(cpu_shares, dtype=float)
    if shares.ndim != 1 or len(shares) != len(models):
        raise InputError("cpu_shares", f"need one share per power model ({len(models)}), got {len(shares)}")
    if np.isnan(shares).any() or (shares < 0).any():
        raise InputError("cpu_shares", "shares must be non-negative numbers")
    if abs(shares.sum() - 1.0) > 1e-6:
        raise InputError("cpu_shares", f"shares must sum to 1, got {shares.sum():.6g}")
    return shares


def cluster_power_kw(models: list[PowerModel], cpu_shares: list[float], cluster_cpu_cores):
    """Cluster power = Σ_d P_d(share_d × u): float for a scalar u, ndarray for an array."""
    shares = _check_shares(models, cpu_shares)
    u = _cpu_array(cluster_cpu_cores, "cluster_cpu_cores")
    total = sum(np.asarray(predict_power_kw(m, s * u)) for m, s in zip(models, shares))
    return float(total) if u.ndim == 0 else np.asarray(total).reshape(u.shape)


def cluster_slope_kw_per_core(models: list[PowerModel], cpu_shares: list[float], cpu_cores):
    """Cluster slope π = dP/du = Σ_d share_d × P_d'(share_d × u), the CPU-share-weighted domain slope."""
    shares = _check_shares(models, cpu_shares)
    u = _cpu_array(cpu_cores)
    total = sum(s * np.asarray(slope_kw_per_core(m, s * u)) for m, s in zip(models, shares))
    return float(total) if u.ndim == 0 else np.asarray(total).reshape(u.shape)


# -------------------------------------------------------------------------------------- evaluation


def next_day_mape_pct(
    cpu_cores: pd.Series, power_kw: pd.Series, now: pd.Timestamp, window_days: float = 7
) -> float:
    """Held-out MAPE (%): fit on [now - window_days, now), score on [now, now + 1 day).

    The scored day goes through the same outlier rules (they remove measurement errors, not model errors).
    """
    now = _check_now(now)
    model = fit_power_model(cpu_cores, power_kw, now, window_days)
    cpu, power = _check_series(cpu_cores, power_kw)
    inside = (cpu.index >= now) & (cpu.index < now + pd.Timedelta(days=1))
    test = clean_power_samples(cpu[inside], power[inside])
    p = test.power_kw.to_numpy()
    positive = p > 0
    if not positive.any():
        raise InputError("power_kw", f"no usable positive power samples in [{now}, {now + pd.Timedelta(days=1)})")
    pred = predict_power_kw(model, test.cpu_cores.to_numpy()[positive])
    return float(np.mean(np.abs(pred - p[positive]) / p[positive]) * 100)


# --------------------------------------------------------------------------------------- SPECpower


def load_specpower(path: str | Path) -> pd.DataFrame:
    """Read the SPECpower_ssj2008 table, adding parsed `cores` and `threads` (ints). Checks the watt columns."""
    frame = pd.read_csv(path)
    missing = [c for c in SPEC_WATT_COLUMNS + ("cpus_enabled", "hardware_threads") if c not in frame.columns]
    if missing:
        raise InputError("specpower", f"missing columns {missing} in {path}")
    cores = frame["cpus_enabled"].astype(str).str.extract(r"^\s*(\d+)\s+cores?")[0]
    threads = frame["hardware_threads"].astype(str).str.extract(r"^\s*(\d+)")[0]
    if cores.isna().any():
        raise InputError("cpus_enabled", f"unparsable, e.g. {frame['cpus_enabled'][cores.isna()].iloc[0]!r}")
    if threads.isna().any():
        raise InputError("hardware_threads", f"unparsable, e.g. {frame['hardware_threads'][threads.isna()].iloc[0]!r}")
    frame = frame.assign(cores=cores.astype(int), threads=threads.astype(int))
    watts = frame[list(SPEC_WATT_COLUMNS)].to_numpy(dtype=float)
    if np.isnan(watts).any() or (watts <= 0).any():
        raise InputError("watts", "the SPECpower watt columns must be positive numbers")
    return frame


def specpower_curve_w(row) -> tuple[np.ndarray, np.ndarray]:
    """(load fractions [0, .1, ..., 1], watts at active idle, 10%, ..., 100%) of one SPECpower row."""
    try:
        watts = np.array([float(row[c]) for c in SPEC_WATT_COLUMNS])
    except KeyError as exc:
        raise InputError(str(exc.args[0]), "missing from the SPECpower row") from exc
    if np.isnan(watts).any() or (watts <= 0).any():
        raise InputError("watts", "SPECpower watts must be positive numbers")
    return SPEC_LOAD_FRACTIONS.copy(), watts
