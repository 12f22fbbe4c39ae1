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
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

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
#
# The outlier rules and the fit run on a grid: one row per power domain, one column per timestamp (sorted,
# unique, UTC), with a presence mask (absent cells hold NaN). One domain is a grid of one row, a fleet is a
# grid of thousands; the code is the same.


@dataclass(frozen=True)
class CleanedSamples:
    """Samples kept by `clean_power_samples`, and how many each rule removed."""

    cpu_cores: pd.Series
    power_kw: pd.Series
    n_usage_jumps: int
    n_power_usage_mismatch: int
    n_low_power: int


def _previous_present(mask: np.ndarray, *grids: np.ndarray) -> list[np.ndarray]:
    """Per cell, the values of `grids` at the previous present cell of its row (NaN where there is none)."""
    n_rows, n_cols = mask.shape
    row_start = np.arange(n_rows)[:, None] * n_cols
    latest = (np.where(mask, np.arange(n_cols), -1) + row_start).ravel()  # flat index; absent: row start - 1
    np.maximum.accumulate(latest, out=latest)
    prev = np.empty_like(latest)
    prev[:1], prev[1:] = -1, latest[:-1]
    prev = prev.reshape(n_rows, n_cols)
    found = prev >= row_start
    np.maximum(prev, 0, out=prev)
    return [np.where(found, g.ravel().take(prev), np.nan) for g in grids]


def _daily_median(day: np.ndarray, power: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per cell, the median power of the present cells of its row on its UTC day (`day`: per column, sorted)."""
    median = np.full(power.shape, np.nan)
    starts = np.flatnonzero(np.diff(day, prepend=day[:1] - 1) != 0) if len(day) else np.zeros(0, dtype=int)
    for a, b in zip(starts, np.append(starts[1:], len(day))):
        block = np.sort(np.where(mask[:, a:b], power[:, a:b], np.nan), axis=1)  # absent (NaN) sort last
        k = mask[:, a:b].sum(axis=1)
        lo = np.take_along_axis(block, np.maximum(k - 1, 0)[:, None] // 2, axis=1)[:, 0]
        hi = np.take_along_axis(block, np.minimum(k // 2, b - a - 1)[:, None], axis=1)[:, 0]
        median[:, a:b] = np.where(k > 0, (lo + hi) / 2, np.nan)[:, None]  # pandas: (a + b) / 2 for even k
    return median


def _clean_grid(
    times: pd.DatetimeIndex,
    cpu: np.ndarray,
    power: np.ndarray,
    mask: np.ndarray,
    max_usage_jump_frac: float = 0.30,
    max_power_to_usage_change: float = 20.0,
    min_power_change_frac: float = 0.05,
    low_power_frac_of_daily_median: float = 0.80,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The outlier rules on a grid: (kept mask, per-row counts removed by rule 1 low power, 2 jumps, 3 mismatch)."""
    day = times.floor("D").asi8 if len(times) else np.zeros(0, dtype=np.int64)
    median = _daily_median(day, power, mask)
    with np.errstate(invalid="ignore"):
        keep1 = mask & (power >= low_power_frac_of_daily_median * median)

    (prev_u,) = _previous_present(keep1, cpu)
    with np.errstate(divide="ignore", invalid="ignore"):
        du = np.abs(cpu - prev_u) / prev_u
    du = np.where(prev_u == 0, np.where(cpu == 0, 0.0, np.inf), du)
    jump = keep1 & (np.nan_to_num(du, copy=False, nan=0.0) > max_usage_jump_frac)
    keep2 = keep1 & ~jump

    prev_u, prev_p = _previous_present(keep2, cpu, power)
    with np.errstate(divide="ignore", invalid="ignore"):
        du = np.abs(cpu - prev_u) / prev_u
        dp = np.abs(power - prev_p) / prev_p
    du = np.nan_to_num(du, copy=False, nan=0.0, posinf=np.inf)
    dp = np.nan_to_num(dp, copy=False, nan=0.0, posinf=np.inf)
    mismatch = keep2 & (dp > min_power_change_frac) & (dp > max_power_to_usage_change * du)
    keep3 = keep2 & ~mismatch
    return keep3, (mask & ~keep1).sum(axis=1), jump.sum(axis=1), mismatch.sum(axis=1)


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
    ("Just before it" is the previous sample that survived the rules before: rule 2 sees rule 1's survivors,
    rule 3 sees rule 2's.)
    """
    cpu, power = _check_series(cpu_cores, power_kw)
    keep, n_low, n_jump, n_mismatch = _clean_grid(
        cpu.index, cpu.to_numpy()[None, :], power.to_numpy()[None, :], np.ones((1, len(cpu)), dtype=bool),
        max_usage_jump_frac, max_power_to_usage_change, min_power_change_frac, low_power_frac_of_daily_median,
    )
    return CleanedSamples(cpu[keep[0]], power[keep[0]], int(n_jump[0]), int(n_mismatch[0]), int(n_low[0]))


# ------------------------------------------------------------------------------------------- fitting

# A fit solves the 4x4 normal equations in the hat (B-spline) basis of the same piecewise-linear functions:
# well conditioned, and each sample touches two neighbouring knots only. Fits whose Gram matrix is (nearly)
# singular fall back to statsmodels' pseudo-inverse on the hinge basis, which is what sm.WLS computes.
_RCOND_FALLBACK = 1e-7  # eigenvalue ratio of the unit-diagonal Gram matrix below which the pinv fallback runs
_OK, _TOO_FEW, _CONSTANT = 0, 1, 2


@dataclass
class _GridFits:
    """Per-row results of `_fit_grid` (rows of a grid of power domains)."""

    status: np.ndarray  # _OK, _TOO_FEW or _CONSTANT
    n_samples: np.ndarray
    cpu_min: np.ndarray
    breakpoints: np.ndarray  # (rows, 4), valid where status == _OK
    coefficients: np.ndarray  # (rows, 4)
    r2: np.ndarray
    mape_pct: np.ndarray


def _fit_grid(
    times: pd.DatetimeIndex, cpu: np.ndarray, power: np.ndarray, mask: np.ndarray, now: pd.Timestamp, clean: bool
) -> _GridFits:
    """Fit every row of a grid whose columns `times` all lie in the window (cleaning them first if `clean`)."""
    n_rows = mask.shape[0]
    if clean:
        mask = _clean_grid(times, cpu, power, mask)[0]
    n = mask.sum(axis=1)
    lo = np.where(mask, cpu, np.inf).min(axis=1, initial=np.inf)
    hi = np.where(mask, cpu, -np.inf).max(axis=1, initial=-np.inf)
    status = np.where(n < MIN_SAMPLES, _TOO_FEW, _OK)
    with np.errstate(invalid="ignore"):
        status[(status == _OK) & (hi - lo <= 1e-9 * np.maximum(1.0, np.abs(hi)))] = _CONSTANT
    fits = _GridFits(status, n, lo, np.full((n_rows, 4), np.nan), np.full((n_rows, 4), np.nan),
                     np.full(n_rows, np.nan), np.full(n_rows, np.nan))
    rows = np.flatnonzero(status == _OK)
    if len(rows) == 0:
        return fits
    if len(rows) < n_rows:
        cpu, power, mask = cpu[rows], power[rows], mask[rows]
    B = np.linspace(lo[rows], hi[rows], N_SEGMENTS + 1, axis=1)  # the same numbers as np.linspace per row
    age_days = (now - times).total_seconds().to_numpy() / 86400.0
    W = np.where(mask, 1.0 / (1.0 + age_days), 0.0)  # the WLS weights; 0 for absent cells
    p = np.where(mask, power, 0.0)

    # The hat basis of the same piecewise-linear functions: with v = (u - b0) / segment width, basis function
    # k is max(0, 1 - |v - k|). Its Gram matrix is tridiagonal and well conditioned; the solution is the fitted
    # power at the four breakpoints.
    v = np.where(mask, cpu, B[:, :1])  # absent cells: any CPU in range (their weight is 0)
    v -= B[:, :1]
    v /= (B[:, 3:] - B[:, :1]) / N_SEGMENTS
    phi = []
    for k in range(N_SEGMENTS + 1):
        f = v - k
        np.abs(f, out=f)
        np.subtract(1.0, f, out=f)
        phi.append(np.maximum(f, 0.0, out=f))
    dot3 = partial(np.einsum, "ij,ij,ij->i")
    m = len(rows)
    G = np.zeros((m, 4, 4))
    for k in range(4):
        G[:, k, k] = dot3(W, phi[k], phi[k])
        if k < 3:
            G[:, k, k + 1] = G[:, k + 1, k] = dot3(W, phi[k], phi[k + 1])
    rhs = np.column_stack([dot3(W, f, p) for f in phi])

    # (nearly) singular Gram matrices: statsmodels' pinv on the hinge basis decides the answer
    d = np.sqrt(G[:, range(4), range(4)])
    with np.errstate(divide="ignore", invalid="ignore"):
        eig = np.linalg.eigvalsh(np.nan_to_num(G / d[:, :, None] / d[:, None, :], nan=0.0, posinf=0.0))
        singular = ~(eig[:, 0] > _RCOND_FALLBACK * eig[:, -1]) | (d.min(axis=1) == 0)
    G[singular] = np.eye(4)
    values = np.linalg.solve(G, rhs[:, :, None])[:, :, 0]
    slopes = np.diff(values, axis=1) / np.diff(B, axis=1)
    C = np.column_stack([values[:, 0] - slopes[:, 0] * B[:, 0], slopes[:, 0], np.diff(slopes, axis=1)])
    if singular.any():
        from statsmodels.tools.tools import pinv_extended

        for i in np.flatnonzero(singular):
            sw = np.sqrt(W[i, mask[i]])
            X = _hinge_basis(cpu[i, mask[i]], tuple(B[i]))
            C[i] = np.nan_to_num(pinv_extended(sw[:, None] * X)[0] @ (p[i, mask[i]] * sw), nan=0.0)
            values[i] = _hinge_basis(B[i], tuple(B[i])) @ C[i]

    # weighted R² as statsmodels' WLS defines it (with a constant): 1 - Σw·resid² / Σw·(p - weighted mean)²
    fitted = phi[0] * values[:, :1]
    for k in range(1, 4):
        fitted += phi[k] * values[:, k : k + 1]
    resid = np.subtract(p, fitted, out=phi[0])
    ssr = dot3(W, resid, resid)
    mean = np.einsum("ij,ij->i", W, p) / W.sum(axis=1)
    centered = np.subtract(p, mean[:, None], out=phi[1])
    tss = dot3(W, centered, centered)
    # MAPE (%) of the prediction (clipped at 0 kW) on the samples with positive power
    positive = mask & (p > 0)
    ape = np.maximum(fitted, 0.0, out=fitted)
    ape -= p
    np.abs(ape, out=ape)
    with np.errstate(divide="ignore", invalid="ignore"):
        ape /= p
        r2 = 1 - ssr / tss
        mape = np.where(positive, ape, 0.0).sum(axis=1) / positive.sum(axis=1) * 100
    fits.breakpoints[rows] = B
    fits.coefficients[rows] = C
    fits.r2[rows] = np.where(np.isfinite(r2), r2, np.nan)
    fits.mape_pct[rows] = mape
    return fits


def _fit_results(fits: _GridFits, now: pd.Timestamp, start: pd.Timestamp) -> list[PowerModel | InputError]:
    """The PowerModel, or the InputError `fit_power_model` raises, of each row of a fitted grid."""
    out: list[PowerModel | InputError] = []
    columns = (fits.status, fits.n_samples, fits.cpu_min, fits.breakpoints, fits.coefficients, fits.r2, fits.mape_pct)
    for status, n, lo, breakpoints, coefficients, r2, mape in zip(*(c.tolist() for c in columns)):
        if status == _TOO_FEW:
            out.append(InputError(
                "cpu_cores",
                f"{n} usable samples in [{start}, {now}) after outlier removal; need at least {MIN_SAMPLES}",
            ))
        elif status == _CONSTANT:
            out.append(InputError("cpu_cores", f"CPU is constant ({lo:g} cores) in the window; cannot fit a slope"))
        else:
            out.append(PowerModel(tuple(breakpoints), tuple(coefficients), n, r2, mape, now, start, now))  # type: ignore[arg-type]
    return out


def _check_window(now, window_days) -> tuple[pd.Timestamp, pd.Timestamp]:
    now = _check_now(now)
    if not (isinstance(window_days, numbers.Real) and math.isfinite(window_days) and float(window_days) > 0):
        raise InputError("window_days", f"must be a positive number of days, got {window_days!r}")
    return now, now - pd.Timedelta(days=window_days)


def fit_power_model(
    cpu_cores: pd.Series,
    power_kw: pd.Series,
    now: pd.Timestamp,
    window_days: float = 7,
    clean: bool = True,
) -> PowerModel:
    """Fit one power domain's model on the samples in [now - window_days, now), after `clean_power_samples`.

    Weighted least squares (the statsmodels WLS solution) with weight 1/(1 + age in days), age = now - sample
    time. Raises InputError for NaN/negative/misaligned input, fewer than 24 usable samples, or constant CPU.
    The fit is `fit_power_models_batch`'s, on a batch of one domain.
    """
    now, start = _check_window(now, window_days)
    cpu, power = _check_series(cpu_cores, power_kw)
    inside = (cpu.index >= start) & (cpu.index < now)
    u, p = cpu.to_numpy()[inside][None, :], power.to_numpy()[inside][None, :]
    (result,) = _fit_results(_fit_grid(cpu.index[inside], u, p, np.ones(u.shape, dtype=bool), now, clean), now, start)
    if isinstance(result, InputError):
        raise result
    return result


_TELEMETRY_COLUMNS = ("domain", "hour", "cpu_cores", "power_kw")
_MAX_EMPTY_CELLS = 1 << 20  # a grid may hold this many absent cells beyond 3 per sample before it splits


def _fit_sorted_rows(
    dom: np.ndarray, col: np.ndarray, u: np.ndarray, p: np.ndarray, n_dom: int, times: pd.DatetimeIndex,
    now: pd.Timestamp, clean: bool,
) -> list[_GridFits]:
    """Fit domains 0..n_dom-1 from long rows sorted by domain; splits the domains while the grid is sparse
    (domains sampled at different timestamps)."""
    if n_dom > 1 and n_dom * len(times) > 4 * len(dom) + _MAX_EMPTY_CELLS:
        half = n_dom // 2
        cut = int(np.searchsorted(dom, half))
        out = []
        for part, offset, count in ((slice(0, cut), 0, half), (slice(cut, None), half, n_dom - half)):
            used, local = np.unique(col[part], return_inverse=True)
            out += _fit_sorted_rows(dom[part] - offset, local, u[part], p[part], count, times[used], now, clean)
        return out
    cells = dom * len(times) + col
    U = np.full((n_dom, len(times)), np.nan)
    P = np.full((n_dom, len(times)), np.nan)
    M = np.zeros((n_dom, len(times)), dtype=bool)
    U.ravel()[cells], P.ravel()[cells], M.ravel()[cells] = u, p, True
    return [_fit_grid(times, U, P, M, now, clean)]


def _numeric(column: pd.Series) -> np.ndarray:
    if column.dtype != np.float64:
        column = pd.to_numeric(column, errors="coerce")
    return column.to_numpy(dtype=float, na_value=np.nan)


def _domain_codes(domain: pd.Series) -> tuple[np.ndarray, list]:
    """(code per row, names in order of first appearance). Fast when each domain's rows are contiguous."""
    values = domain.to_numpy()
    if len(values):
        starts = np.flatnonzero(np.concatenate([[True], values[1:] != values[:-1]]))
        names = values[starts]
        if not pd.isna(names).any() and len(set(names.tolist())) == len(names):
            return np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(values)))), names.tolist()
    codes, uniques = pd.factorize(domain, sort=False)
    if (codes < 0).any():
        raise InputError("domain", f"{int((codes < 0).sum())} rows without a domain")
    return codes, list(uniques)


def fit_power_models_batch(
    telemetry: pd.DataFrame, now: pd.Timestamp, window_days: float = 7, clean: bool = True
) -> dict[str, PowerModel | InputError]:
    """`fit_power_model` for many power domains at once, vectorised across domains.

    `telemetry` is a long frame with columns domain, hour (UTC tz-aware), cpu_cores, power_kw, in any row
    order (other columns are ignored). Returns, per domain in order of first appearance, the PowerModel that
    `fit_power_model(cpu, power, now, window_days, clean)` gives on that domain's rows (hour as the index),
    or the InputError it would raise. A bad `now`, `window_days` or frame raises InputError.
    """
    now, start = _check_window(now, window_days)
    if not isinstance(telemetry, pd.DataFrame):
        raise InputError("telemetry", "must be a pandas DataFrame")
    missing = [c for c in _TELEMETRY_COLUMNS if c not in telemetry.columns]
    if missing:
        raise InputError("telemetry", f"missing columns {missing}")
    codes, names = _domain_codes(telemetry["domain"])
    n_dom = len(names)
    hour = telemetry["hour"]
    if not isinstance(hour.dtype, pd.DatetimeTZDtype):  # not a tz-aware index: each domain's own error
        return {name: _fit_domain_slowly(telemetry, np.flatnonzero(codes == d), now, window_days, clean)
                for d, name in enumerate(names)}

    # a domain with a NaN, infinite or negative value, or a repeated hour, fails in `_check_series`
    u_all, p_all = _numeric(telemetry["cpu_cores"]), _numeric(telemetry["power_kw"])
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(u_all) | (u_all < 0) | ~np.isfinite(p_all) | (p_all < 0)
    failed = np.bincount(codes[bad], minlength=n_dom) > 0

    # columns: the distinct timestamps, sorted; rows sorted by (domain, column)
    t_codes, t_unique = pd.factorize(hour.array.asi8, sort=False)
    n_times = len(t_unique)
    order = np.argsort(t_unique, kind="stable")
    rank = np.empty(n_times, dtype=np.int64)
    rank[order] = np.arange(n_times)
    times = pd.DatetimeIndex(t_unique[order].view(f"datetime64[{hour.dtype.unit}]")).tz_localize("UTC")
    col = rank[t_codes]
    key = codes.astype(np.int64) * n_times + col
    perm = None if bool((key[1:] >= key[:-1]).all()) else np.argsort(key, kind="stable")
    if perm is not None:
        key, codes_s, col = key[perm], codes[perm], col[perm]
    else:
        codes_s = codes
    failed[codes_s[1:][key[1:] == key[:-1]]] = True

    # the window's columns are a contiguous range of the sorted timestamps
    inside = np.asarray((times >= start) & (times < now))
    first, n_inside = (int(np.argmax(inside)), int(inside.sum())) if inside.any() else (0, 0)
    sel = (col >= first) & (col < first + n_inside) & ~failed[codes_s]
    rows = np.flatnonzero(sel) if perm is None else perm[sel]
    ok = np.flatnonzero(~failed)
    local = np.full(n_dom, -1)
    local[ok] = np.arange(len(ok))
    grids = _fit_sorted_rows(local[codes_s[sel]], col[sel] - first, u_all[rows], p_all[rows], len(ok),
                             times[first : first + n_inside], now, clean)
    fitted = iter([r for g in grids for r in _fit_results(g, now, start)])

    results: dict[str, PowerModel | InputError] = {}
    by_domain = np.argsort(codes, kind="stable") if failed.any() else None
    bounds = np.searchsorted(codes[by_domain], np.arange(n_dom + 1)) if by_domain is not None else None
    for d, name in enumerate(names):
        if failed[d]:
            assert by_domain is not None and bounds is not None  # set when any domain failed
            rows = by_domain[bounds[d] : bounds[d + 1]]
            results[name] = _fit_domain_slowly(telemetry, rows, now, window_days, clean)
        else:
            results[name] = next(fitted)
    return results


def _fit_domain_slowly(telemetry, rows, now, window_days, clean) -> PowerModel | InputError:
    """One domain as `fit_power_model` sees it (builds the exact error message of a failing domain)."""
    data = telemetry.iloc[rows].set_index("hour")
    try:
        return fit_power_model(data["cpu_cores"], data["power_kw"], now, window_days, clean)
    except InputError as exc:
        return exc


def power_model_from_curve(cpu_cores, power_kw, now: pd.Timestamp, window_days: float = 7) -> PowerModel:
    """A PowerModel of a declared curve (a SPECpower row scaled to the domain, or the operator's own points):
    the same piecewise-linear fit, on samples of the curve spread evenly over [0, the curve's last CPU] in the
    window before ``now``. Its r2 and mape_pct say how well three segments follow the declared points."""
    cpu = np.asarray(cpu_cores, dtype=float)
    kw = np.asarray(power_kw, dtype=float)
    if cpu.ndim != 1 or cpu.shape != kw.shape or len(cpu) < 2 or np.any(np.diff(cpu) <= 0):
        raise InputError("power_points", "a declared curve needs two or more points with CPU increasing")
    now, start = _check_window(now, window_days)
    hours = pd.date_range(end=now - pd.Timedelta(hours=1), periods=int(window_days * 24), freq="h")
    sweep = np.abs(((np.arange(len(hours)) * 7) % 48) / 24.0 - 1.0)  # 0..1..0, 48 levels, all of them hit
    u = cpu[0] + sweep * (cpu[-1] - cpu[0])
    p = np.interp(u, cpu, kw)
    return fit_power_model(pd.Series(u, index=hours), pd.Series(p, index=hours), now, window_days, clean=False)


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
