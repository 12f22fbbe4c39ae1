"""Day-ahead load forecasts of one cluster, with their uncertainty (CICM, Radovanović et al. 2023).

For the target day D (a local day of the campus: 23, 24 or 25 UTC hours) and an issue time `now`:

- inflexible CPU per hour U_IF(h), and its upper (1-γ) bound;
- flexible CPU-hours of the day T_UF, reservations of the day T_R, and Θ = T_R·(1 + q0.97);
- the reservations-to-usage ratio R(h).

Method (docs/models.md has the details and the measured accuracy). Only hours that ended by `now` are used.
History is arranged as complete local days × local hour of day ("day matrix"); a DST day's missing hour is
interpolated from its neighbours and its doubled hour averaged, inside the model only.

1. Week-ahead: for the 7-day block ending on day e, m = block mean and f(dow, hod) = value / m. The level L is
   an EWMA (weight α) of the block means of the blocks ending on e, e-7, e-14, ...; the hour-of-week factors
   S an EWMA (weight β) of f over the same blocks. WA(D | e) = L_e · S_e(dow(D), hod). Computed for every
   origin in one pass (seven interleaved EWMA chains). α, β come from a small grid, by the rolling-origin
   MAPE of WA(D | D - lag) over the history, lag = target day − last complete day before `now` (1 or 2).
2. Day-ahead: DA(D) = a + b·WA(D) + c·(X(D-lag) − WA(D-lag)), i.e. the last complete day's actual minus its
   own week-ahead forecast, same local hour; a, b, c by least squares over the past days' rolling forecasts
   (last 90 days), refit at every origin of the backtest.
3. Uncertainty: empirical quantiles of the relative errors (actual − DA)/DA of the rolling day-ahead backtest
   over the last 90 days: the (1-γ) quantile of the hourly inflexible errors, the 0.97 quantile of the daily
   reservation errors. Both clipped at 0 so that bounds are never below the forecast.
4. Daily series: one period per day, the daily mean CPU cores (turned into core-hours by the number of hours
   of the target day, so 23- and 25-hour days are handled). Reservations use steps 1-3 as they are. The
   flexible series' model is selected: three base models, each with its weight from a small grid by the
   rolling-origin MAPE of its own forecasts of X(D) from the state after day D - lag (as for α, β above):
     - seasonal: the week-ahead WA of step 1;
     - level EWMA: L_e = α·X(e) + (1-α)·L_{e-1}, forecast L_{D-lag}; α from `alpha_grid`;
     - moving average: the mean of the w days ending on D - lag, w in LEVEL_WINDOWS (fewer at the start);
   then each, with and without the day-ahead adjustment of step 2 (refit at every origin), is backtested
   day-ahead over every history day on which all six candidates have a forecast, and the one with the lowest
   MAPE is used (a tie keeps the seasonal model with adjustment). The hourly inflexible series always uses
   the seasonal model with adjustment (it needs the hour-of-day shape). Step 3's errors come from the chosen
   candidate's backtest. `parameters[series]` records `model`, `adjusted` and, for the flexible series, every
   candidate's `selection_mape_pct`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cicm.errors import InputError

HISTORY_COLUMNS = ("inflexible_cpu_cores", "flexible_cpu_cores", "reserved_cpu_cores")
ALPHA_GRID = (0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9)
BETA_GRID = (0.05, 0.1, 0.2, 0.35, 0.5, 0.7)
RESERVATIONS_QUANTILE = 0.97
MIN_ADJUST_DAYS = 7
LEVEL_WINDOWS = (7, 14, 28, 56, 91)
SEASONAL, LEVEL_EWMA, MOVING_AVERAGE = "seasonal", "level-ewma", "moving-average"
# Model selection for the daily reservations too? Off: on the demo fleet it was neutral for them (median
# MAPE 10.57 -> 10.77 %, p90 13.16 -> 12.42 % over Dec 3-30; 9.38 -> 9.45 % and 14.14 -> 14.46 % over
# Jul 4 - Nov 30), so they keep the seasonal model with adjustment, whose errors set Θ.
SELECT_RESERVATIONS_MODEL = False
_ONE_HOUR = pd.Timedelta(hours=1)


# ------------------------------------------------------------------------------------------- output


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


# ------------------------------------------------------------------------------------ local days


def local_day_hours(day, tz: str) -> pd.DatetimeIndex:
    """UTC start times of the hours of local date `day` in time zone `tz` (23, 24 or 25 of them)."""
    date = pd.Timestamp(day)
    if date.tzinfo is not None:
        date = date.tz_localize(None)
    date = date.normalize()
    try:
        start = date.tz_localize(tz, nonexistent="shift_forward", ambiguous=True)
        end = (date + pd.Timedelta(days=1)).tz_localize(tz, nonexistent="shift_forward", ambiguous=True)
    except Exception as exc:  # unknown tz names raise various exception types
        raise InputError("tz", f"unknown time zone {tz!r}: {exc}") from exc
    return pd.date_range(start.tz_convert("UTC"), end.tz_convert("UTC"), freq="h", inclusive="left", name="hour")


def _local_day_lengths(dates: pd.DatetimeIndex, tz: str) -> np.ndarray:
    """Number of hours of each local date (naive midnights) in `tz`: 23, 24 or 25 around DST changes."""
    def starts(midnights: pd.DatetimeIndex) -> pd.DatetimeIndex:
        return midnights.tz_localize(tz, nonexistent="shift_forward", ambiguous=np.ones(len(midnights), bool))

    seconds = (starts(dates + pd.Timedelta(days=1)) - starts(dates)).total_seconds().to_numpy()
    return np.round(seconds / 3600).astype(int)


def _check_tz(tz: str) -> str:
    if not isinstance(tz, str) or not tz:
        raise InputError("tz", f"need a time zone name, got {tz!r}")
    try:
        pd.Timestamp("2022-01-01").tz_localize(tz)
    except Exception as exc:
        raise InputError("tz", f"unknown time zone {tz!r}") from exc
    return tz


def _check_now(now) -> pd.Timestamp:
    try:
        now = pd.Timestamp(now)
    except (TypeError, ValueError) as exc:
        raise InputError("now", f"not a timestamp: {now!r}") from exc
    if now.tzinfo is None:
        raise InputError("now", "must be tz-aware (UTC)")
    return now.tz_convert("UTC")


def _check_target_hours(target_hours, tz: str) -> tuple[pd.DatetimeIndex, pd.Timestamp]:
    """Returns the UTC target hours and their local date (naive midnight)."""
    if not isinstance(target_hours, pd.DatetimeIndex) or len(target_hours) == 0:
        raise InputError("target_hours", "need a non-empty DatetimeIndex of UTC hours")
    if target_hours.tz is None:
        raise InputError("target_hours", "must be tz-aware (UTC)")
    hours = target_hours.tz_convert("UTC")
    local_dates = hours.tz_convert(tz).tz_localize(None).normalize().unique()
    if len(local_dates) != 1:
        raise InputError("target_hours", f"must lie in one local day of {tz}; spans {len(local_dates)} days")
    expected = local_day_hours(local_dates[0], tz)
    if not hours.equals(expected):
        raise InputError(
            "target_hours",
            f"must be the {len(expected)} hours of local day {local_dates[0].date()} in {tz}, in order",
        )
    return expected, local_dates[0]


# ------------------------------------------------------------------------------------------ history


def _prepare_history(history: pd.DataFrame, now: pd.Timestamp, max_history_days: int) -> pd.DataFrame:
    """Hours that ended by `now`, at most `max_history_days` back, validated. Index: UTC `hour`."""
    if not isinstance(history, pd.DataFrame):
        raise InputError("history", "must be a pandas DataFrame")
    frame = history
    if "hour" in frame.columns:
        frame = frame.set_index("hour")
    if not isinstance(frame.index, pd.DatetimeIndex):
        raise InputError("hour", "history needs a DatetimeIndex (or column) named 'hour'")
    if frame.index.tz is None:
        raise InputError("hour", "must be tz-aware (UTC)")
    if "cluster" in frame.columns and frame["cluster"].nunique() > 1:
        raise InputError("cluster", f"history must hold one cluster, holds {frame['cluster'].nunique()}")
    missing = [c for c in HISTORY_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(missing[0], "column missing from history")
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


@dataclass(frozen=True)
class _DayMatrix:
    dates: pd.DatetimeIndex  # naive local midnights of the complete local days, consecutive
    hourly: dict[str, np.ndarray]  # column -> (n_days, 24) local hour of day, DST holes filled
    daily_mean: dict[str, np.ndarray]  # column -> (n_days,) mean cores over the day's real hours


def _fill_row_gaps(matrix: np.ndarray) -> np.ndarray:
    out = matrix.copy()
    hods = np.arange(matrix.shape[1])
    for i in np.flatnonzero(np.isnan(out).any(axis=1)):
        row = out[i]
        ok = ~np.isnan(row)
        out[i] = np.interp(hods, hods[ok], row[ok])
    return out


def _day_matrix(frame: pd.DataFrame, tz: str) -> _DayMatrix:
    if frame.empty:
        return _DayMatrix(pd.DatetimeIndex([]), {c: np.zeros((0, 24)) for c in HISTORY_COLUMNS},
                          {c: np.zeros(0) for c in HISTORY_COLUMNS})
    local = frame.index.tz_convert(tz)
    dates = local.tz_localize(None).normalize()
    hod = local.hour.to_numpy()
    counts = pd.Series(1, index=dates).groupby(level=0).size()
    complete = pd.DatetimeIndex(counts.index[counts.to_numpy() == _local_day_lengths(counts.index, tz)])
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
        hourly[column] = _fill_row_gaps(matrix)
        daily[column] = total.sum(axis=1) / count.sum(axis=1)
    return _DayMatrix(complete, hourly, daily)


# ------------------------------------------------------------------------------------- the engine


def _week_ahead_inputs(X: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Block means m (C, K, 7) and the one factor observation read per chain r (C, K, 7, P) of the 7-day blocks
    ending on day d = 6 + 7k + j (chain j; padded with ones past the last day), and the number of blocks.

    X: (C, n, P) over consecutive dates. The block ending on d sets f(dow(t), ·) = X(t) / m for its 7 days t;
    chain d mod 7 only ever reads f(dow(d + lag), ·), i.e. the block's day t = d + lag - 7, which keeps the
    same position in the block along the chain: so that one is all that is kept."""
    C, n, P = X.shape
    n_blocks = max(n - 6, 0)
    K = -(-n_blocks // 7)
    m = np.ones((C, 7 * K))
    r = np.ones((C, 7 * K, P))
    if n_blocks:
        day_sums = X.sum(axis=2)
        m[:, :n_blocks] = np.lib.stride_tricks.sliding_window_view(day_sums, 7, axis=1).sum(axis=2) / (7 * P)
        observed = X[:, lag - 1 : lag - 1 + n_blocks]  # day d + lag - 7 for d = 6 ...
        mm = m[:, :n_blocks, None]
        r[:, :n_blocks] = np.where(mm > 0, observed / np.where(mm > 0, mm, 1.0), 1.0)
    return m.reshape(C, K, 7), r.reshape(C, K, 7, P), n_blocks


def _week_ahead_blocks(m: np.ndarray, r: np.ndarray, alphas: np.ndarray, betas: np.ndarray):
    """Yields, for k = 0, 1, ..., (level (A, C, 7), factor (B, C, 7, P)) after the blocks ending on days
    6 + 7k + j: the EWMA states of the seven interleaved chains, for weights alphas (A, C or 1) and betas
    (B, C or 1). WA of day 6 + 7k + j + lag is level · factor."""
    a = alphas[..., None]
    b = betas[..., None, None]
    level = np.broadcast_to(m[:, 0], a.shape[:-2] + m[:, 0].shape).copy()
    factor = np.broadcast_to(r[:, 0], b.shape[:-3] + r[:, 0].shape).copy()
    yield level, factor
    for k in range(1, m.shape[1]):
        level = alphas[..., None] * m[:, k] + (1 - a) * level
        factor = b * r[:, k] + (1 - b) * factor
        yield level, factor


def _week_ahead_all(X: np.ndarray, lag: int, alphas: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """WA[g, c, D, p] = forecast of day D (0 <= D < n + lag) from the EWMA state after day D - lag, for weights
    alphas[g], betas[g] of shape (G,) or (G, C). X: (C, n, P) over consecutive dates. NaN where no state
    exists yet."""
    C, n, P = X.shape
    alphas = np.asarray(alphas, dtype=float).reshape(len(alphas), -1)
    betas = np.asarray(betas, dtype=float).reshape(len(betas), -1)
    G = len(alphas)
    m, r, n_blocks = _week_ahead_inputs(X, lag)
    blocks = np.empty((G, C, m.shape[1], 7, P))
    for k, (level, factor) in enumerate(_week_ahead_blocks(m, r, alphas, betas)):
        blocks[:, :, k] = level[..., None] * factor
    WA = np.full((G, C, n + lag, P), np.nan)
    WA[:, :, 6 + lag : 6 + lag + n_blocks] = blocks.reshape(G, C, -1, P)[:, :, :n_blocks]
    return WA


def _level_ewma_all(X: np.ndarray, lag: int, alphas: np.ndarray) -> np.ndarray:
    """F[g, D, p] = L_g after day D - lag, where L = α·X(e) + (1-α)·L(e-1) starts at X(0). NaN before."""
    n, P = X.shape
    F = np.full((len(alphas), n + lag, P), np.nan)
    a = alphas[:, None]
    level = np.repeat(X[:1], len(alphas), axis=0)
    F[:, lag] = level
    for e in range(1, n):
        level = a * X[e] + (1 - a) * level
        F[:, e + lag] = level
    return F


def _moving_average_all(X: np.ndarray, lag: int, windows: tuple[int, ...]) -> np.ndarray:
    """F[g, D, p] = mean of X over the w_g days ending on day D - lag (fewer at the start). NaN before."""
    n, P = X.shape
    F = np.full((len(windows), n + lag, P), np.nan)
    csum = np.vstack([np.zeros((1, P)), np.cumsum(X, axis=0)])
    ends = np.arange(1, n + 1)  # day e's window is [max(0, e + 1 - w), e]
    for g, w in enumerate(windows):
        starts = np.maximum(0, ends - w)
        F[g, lag:] = (csum[ends] - csum[starts]) / (ends - starts)[:, None]
    return F


def _mape(actual: np.ndarray, forecast: np.ndarray, axis=None) -> np.ndarray:
    ok = (actual > 0) & ~np.isnan(forecast)
    ape = np.where(ok, np.abs(actual - np.where(ok, forecast, 0)) / np.where(ok, actual, 1), 0.0)
    return 100 * ape.sum(axis=axis) / np.maximum(ok.sum(axis=axis), 1)


def _pick(grid_forecasts: np.ndarray, X: np.ndarray) -> tuple[int, float, int]:
    """Index of the grid member with the lowest rolling-origin MAPE over the days every member forecasts;
    that MAPE; the number of days scored."""
    n = len(X)
    scored = ~np.isnan(grid_forecasts[:, :n]).any(axis=(0, 2))
    scores = np.array([_mape(X[scored], F[:n][scored]) for F in grid_forecasts])
    best = int(np.argmin(scores))
    return best, float(scores[best]), int(scored.sum())


def _adjust_rows(X: np.ndarray, WA: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Features (C, n + lag, P, 3) = [1, WA(D), mean over the day of X(D-lag) - WA(D-lag)], and a per-day
    availability mask (C, n + lag). X: (C, n, P), WA: (C, n + lag, P)."""
    C, n_all, P = WA.shape
    n = X.shape[1]
    resid = np.full((C, n_all, P), np.nan)
    resid[:, :n] = X - WA[:, :n]
    lagged = np.full((C, n_all, P), np.nan)
    # the last complete day's error as its daily mean (the hourly errors are mostly noise: measured on the
    # demo fleet, the daily mean gives 3.30% hourly MAPE against 3.42% for the same-hour error)
    lagged[:, lag:] = resid[:, :-lag].mean(axis=2, keepdims=True)
    feats = np.stack([np.ones((C, n_all, P)), WA, lagged], axis=-1)
    ok = ~np.isnan(feats).any(axis=(2, 3))
    return feats, ok


def _fit_adjust(feats: np.ndarray, targets: np.ndarray) -> np.ndarray:
    A = feats.reshape(-1, 3)
    y = targets.reshape(-1)
    scale = np.array([1.0, max(np.abs(A[:, 1]).max(), 1e-12), max(np.abs(A[:, 2]).max(), 1e-12)])
    coef, *_ = np.linalg.lstsq(A / scale, y, rcond=None)
    return coef / scale


# Normal equations are solved in closed form when the Jacobi-scaled normal matrix is well conditioned (its
# determinant, in (0, 1], above _WELL_CONDITIONED_DET) and no feature column is at round-off level next to the
# target (norm below _NOISE_COLUMN times the target's: its coefficient would be set by rounding, e.g. the
# lagged error of a noise-free history). The others (rank-deficient or nearly so, e.g. a constant history) go
# through `_fit_adjust`, i.e. lstsq on the scaled features, with its minimum-norm answer.
_WELL_CONDITIONED_DET = 1e-6
_NOISE_COLUMN = 1e-7


def _rolling_adjust_fits(
    feats: np.ndarray, ok: np.ndarray, X: np.ndarray, lag: int, days: np.ndarray, adjust_window_days: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares fits of X on the features over each origin's training window, for all origins at once.

    The window of day D is the days t with features, t < n, D - lag - adjust_window_days < t <= D - lag: a
    sliding window, so its Σ f fᵀ and Σ f·y are differences of cumulative sums of per-day sums.
    Returns coef (C, len(days), 3) (NaN where not fitted), fitted (C, len(days)) and the number of training
    days (C, len(days))."""
    C, n, P = X.shape
    train = ok[:, :n]
    f = np.where(train[:, :, None, None], feats[:, :n], 0.0)  # (C, n, P, 3)
    y = np.where(train[:, :, None], X, 0.0)
    per_day = np.concatenate(
        [np.einsum("cnpi,cnpj->cnij", f, f).reshape(C, n, 9), np.einsum("cnpi,cnp->cni", f, y),
         train[:, :, None].astype(float), np.einsum("cnp,cnp->cn", y, y)[:, :, None]], axis=2,
    )  # (C, n, 14): Σ f fᵀ, Σ f y, 1, Σ y²
    cum = np.concatenate([np.zeros((C, 1, 14)), np.cumsum(per_day, axis=1)], axis=1)
    hi = np.clip(days - lag + 1, 0, n)
    lo = np.clip(days - lag - adjust_window_days + 1, 0, n)
    window = cum[:, hi] - cum[:, lo]  # (C, n_days, 13)
    n_train = np.rint(window[..., 12]).astype(int)
    fitted = (n_train >= MIN_ADJUST_DAYS) & ok[:, days]
    N = window[..., :9].reshape(C, len(days), 3, 3)
    r = window[..., 9:12]
    diag = np.einsum("...ii->...i", N)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.sqrt(np.where(diag > 0, diag, np.nan))
        Nn = N / (d[..., :, None] * d[..., None, :])
        rn = r / d
        a, b, c = Nn[..., 0, 0], Nn[..., 0, 1], Nn[..., 0, 2]
        e, f_, i = Nn[..., 1, 1], Nn[..., 1, 2], Nn[..., 2, 2]
        adj = np.stack([
            np.stack([e * i - f_ * f_, c * f_ - b * i, b * f_ - c * e], axis=-1),
            np.stack([c * f_ - b * i, a * i - c * c, b * c - a * f_], axis=-1),
            np.stack([b * f_ - c * e, b * c - a * f_, a * e - b * b], axis=-1),
        ], axis=-2)
        det = a * adj[..., 0, 0] + b * adj[..., 0, 1] + c * adj[..., 0, 2]
        coef = np.einsum("...ij,...j->...i", adj, rn) / det[..., None] / d
    y_norm = np.sqrt(np.maximum(window[..., 13], 0.0))
    good = fitted & (det > _WELL_CONDITIONED_DET) & (d[..., 1:] >= _NOISE_COLUMN * y_norm[..., None]).all(axis=-1)
    # (NaN det or d: a zero column, is not good)
    coef[~fitted] = np.nan
    train_days = [np.flatnonzero(train[k]) for k in range(C)]
    for k, j in zip(*np.nonzero(fitted & ~good)):
        day = days[j]
        usable = train_days[k][(train_days[k] <= day - lag) & (train_days[k] > day - lag - adjust_window_days)]
        coef[k, j] = _fit_adjust(feats[k, usable], X[k, usable])
    return coef, fitted, n_train


def _day_ahead(
    X: np.ndarray, base: np.ndarray, lag: int, days: np.ndarray, adjust: bool, adjust_window_days: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Rolling day-ahead forecasts (C, len(days), P) from the base forecasts `base` (C, n + lag, P) of the
    clusters' series X (C, n, P), NaN where there is none; the adjustment coefficients (C, 3) of the last of
    `days` (NaN rows where none: too few training days; None without adjustment); the number of training
    days (C,) of that last fit.

    adjust=False: DA(D) = base(D). adjust=True: DA(D) = a + b·base(D) + c·(mean of X(D-lag) − base(D-lag)),
    a, b, c by least squares over the days <= D - lag that have features (the last `adjust_window_days`
    of them, at least MIN_ADJUST_DAYS). Clipped at 0."""
    C, n, P = X.shape
    if not adjust:
        return np.maximum(base[:, days], 0.0), None, np.zeros(C, dtype=int)
    feats, ok = _adjust_rows(X, base, lag)
    coef, fitted, n_train = _rolling_adjust_fits(feats, ok, X, lag, days, adjust_window_days)
    out = np.full((C, len(days), P), np.nan)
    fc = np.einsum("cdpk,cdk->cdp", feats[:, days], np.where(fitted[..., None], coef, 0.0))
    out[fitted] = np.maximum(fc[fitted], 0.0)
    return out, coef[:, -1], n_train[:, -1]


@dataclass(frozen=True)
class _Candidate:
    model: str  # SEASONAL, LEVEL_EWMA or MOVING_AVERAGE
    adjusted: bool
    base: np.ndarray  # (n + lag, P) rolling-origin base forecasts of every day, NaN where none

    @property
    def label(self) -> str:
        return f"{self.model}+adjust" if self.adjusted else self.model


@dataclass(frozen=True)
class _SeriesForecast:
    target: np.ndarray  # (P,) day-ahead forecast of the target day (mean cores per period)
    rel_errors: np.ndarray  # flattened relative errors of the rolling backtest
    params: dict


def _forecast_series(
    X: np.ndarray,
    dow: np.ndarray,
    lag: int,
    alpha_grid: tuple[float, ...],
    beta_grid: tuple[float, ...],
    error_window_days: int,
    adjust_window_days: int,
    select: bool = False,
    windows: tuple[int, ...] = LEVEL_WINDOWS,
) -> _SeriesForecast:
    """Day-ahead forecast of one series (n days × P periods). select=False: the seasonal model with the
    adjustment (hourly inflexible, daily reservations). select=True (daily flexible, P = 1): the base model
    (seasonal, level EWMA, moving average) and whether to adjust it are chosen by the rolling-origin MAPE of
    the day-ahead forecasts over the days on which all six candidates forecast."""
    n, P = X.shape
    grid = [(a, b) for a in alpha_grid for b in beta_grid]
    alphas = np.array([g[0] for g in grid])
    betas = np.array([g[1] for g in grid])
    WA_grid = _week_ahead_all(X[None], lag, alphas, betas)[:, 0]
    best, wa_mape, n_scored = _pick(WA_grid, X)
    params: dict = {
        "alpha": float(alphas[best]),
        "beta": float(betas[best]),
        "week_ahead_mape_pct": wa_mape,
        "n_scored_days": n_scored,
    }
    candidates = [_Candidate(SEASONAL, True, WA_grid[best])]
    if select:
        level_alphas = np.array(alpha_grid, dtype=float)
        level_grid = _level_ewma_all(X, lag, level_alphas)
        g_level, level_mape, _ = _pick(level_grid, X)
        ma_grid = _moving_average_all(X, lag, windows)
        g_ma, ma_mape, _ = _pick(ma_grid, X)
        params.update(
            level_alpha=float(level_alphas[g_level]), level_mape_pct=level_mape,
            window_days=int(windows[g_ma]), moving_average_mape_pct=ma_mape,
        )
        candidates += [
            _Candidate(SEASONAL, False, WA_grid[best]),
            _Candidate(LEVEL_EWMA, True, level_grid[g_level]),
            _Candidate(LEVEL_EWMA, False, level_grid[g_level]),
            _Candidate(MOVING_AVERAGE, True, ma_grid[g_ma]),
            _Candidate(MOVING_AVERAGE, False, ma_grid[g_ma]),
        ]

    # every candidate's rolling day-ahead forecasts: of the history days (for the selection and the errors)
    # and of the target day, last
    all_days = np.r_[np.arange(0 if select else max(0, n - error_window_days), n), n - 1 + lag]
    runs = []
    for c in candidates:
        out, coef, n_train = _day_ahead(X[None], c.base[None], lag, all_days, c.adjusted, adjust_window_days)
        coef = None if coef is None or np.isnan(coef[0]).any() else coef[0]
        runs.append((out[0], coef, int(n_train[0])))
    history_rows = all_days < n
    chosen = 0
    if select:
        # the days on which every candidate has a forecast: all are scored on the same days
        common = history_rows & ~np.isnan(np.stack([r[0] for r in runs])).any(axis=(0, 2))
        scores = None
        if common.any():
            scores = [float(_mape(X[all_days[common]], r[0][common])) for r in runs]
            chosen = int(np.argmin(scores))  # a tie keeps the earlier candidate (seasonal + adjustment first)
        params.update(
            selection_mape_pct={c.label: s for c, s in zip(candidates, scores)} if scores else None,
            n_selection_days=int(common.sum()),
        )
    cand, (fc, coef, n_train) = candidates[chosen], runs[chosen]

    backtest = history_rows & (all_days >= n - error_window_days) & ~np.isnan(fc).any(axis=1)
    bt_days, bt_fc = all_days[backtest], fc[backtest]
    rel = [(X[d][f > 0] - f[f > 0]) / f[f > 0] for d, f in zip(bt_days, bt_fc)]
    rel_errors = np.concatenate(rel) if rel else np.zeros(0)
    params.update(
        model=cand.model,
        adjusted=cand.adjusted,
        adjust_a_b_c=[float(c) for c in coef] if coef is not None else None,
        n_adjust_days=int(n_train),
        n_backtest_days=int(len(bt_days)),
        backtest_day_ahead_mape_pct=float(_mape(X[bt_days], bt_fc)) if len(bt_days) else None,
    )
    return _SeriesForecast(fc[-1], rel_errors, params)


def _quantile(values: np.ndarray, q: float) -> float:
    return float(np.quantile(values, q, method="higher"))


# -------------------------------------------------------------------------------------- public API


def _insufficient(reason: str, hours: pd.DatetimeIndex, now: pd.Timestamp, gamma: float, params: dict) -> LoadForecast:
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


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise InputError(name, f"must be an integer >= {low}, got {value!r}")
    return int(value)


def forecast_load(
    history: pd.DataFrame,
    target_hours: pd.DatetimeIndex,
    tz: str,
    gamma: float,
    now: pd.Timestamp,
    *,
    min_history_days: int = 28,
    max_history_days: int = 182,
    error_window_days: int = 90,
    adjust_window_days: int = 90,
    ratio_days: int = 28,
    alpha_grid: tuple[float, ...] = ALPHA_GRID,
    beta_grid: tuple[float, ...] = BETA_GRID,
) -> LoadForecast:
    """Day-ahead forecast of one cluster's load on the local day `target_hours` (see the module docstring).

    history: hourly rows of ONE cluster, UTC index (or column) `hour`, columns inflexible_cpu_cores,
    flexible_cpu_cores, reserved_cpu_cores (mean cores in that hour). Only rows whose hour ended by `now`
    are read, at most `max_history_days` back; those must be gap-free, NaN-free and non-negative.
    target_hours: the UTC start times of the hours of one local day in `tz` (see `local_day_hours`),
    starting at or after `now`. gamma: the inflexible upper bound is the (1-gamma) quantile.
    """
    now = _check_now(now)
    tz = _check_tz(tz)
    hours, target_date = _check_target_hours(target_hours, tz)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0 < gamma < 1:
        raise InputError("gamma", f"must be in (0, 1), got {gamma!r}")
    gamma = float(gamma)
    if hours[0] < now:
        raise InputError("now", f"the target day starts at {hours[0]}, before the issue time {now}")
    min_history_days = _check_int(min_history_days, "min_history_days", 21)
    max_history_days = _check_int(max_history_days, "max_history_days", min_history_days + 1)
    error_window_days = _check_int(error_window_days, "error_window_days", 7)
    adjust_window_days = _check_int(adjust_window_days, "adjust_window_days", MIN_ADJUST_DAYS)
    ratio_days = _check_int(ratio_days, "ratio_days", 1)
    for name, grid in (("alpha_grid", alpha_grid), ("beta_grid", beta_grid)):
        if len(grid) == 0 or not all(isinstance(v, numbers.Real) and 0 < v <= 1 for v in grid):
            raise InputError(name, "need a non-empty list of weights in (0, 1]")

    frame = _prepare_history(history, now, max_history_days)
    days = _day_matrix(frame, tz)
    n = len(days.dates)
    params: dict = {"history_days": n, "min_history_days": min_history_days}
    if n < min_history_days:
        return _insufficient(
            f"{n} complete local days of history before {now}; need {min_history_days}", hours, now, gamma, params
        )
    lag = int((target_date - days.dates[-1]).days)
    params["lag_days"] = lag
    if not 1 <= lag <= 7:
        return _insufficient(
            f"the last complete day of history is {days.dates[-1].date()}, {lag} days before the target day "
            f"{target_date.date()}; at most 7 allowed",
            hours, now, gamma, params,
        )
    all_dates = days.dates.append(pd.date_range(days.dates[-1] + pd.Timedelta(days=1), periods=lag, freq="D"))
    dow = all_dates.dayofweek.to_numpy()
    target_local = hours.tz_convert(tz)
    target_hod = target_local.hour.to_numpy()

    fit = lambda X, select: _forecast_series(  # noqa: E731
        X, dow, lag, tuple(alpha_grid), tuple(beta_grid), error_window_days, adjust_window_days, select
    )
    inflexible = fit(days.hourly["inflexible_cpu_cores"], False)
    flexible = fit(days.daily_mean["flexible_cpu_cores"][:, None], True)
    reserved = fit(days.daily_mean["reserved_cpu_cores"][:, None], SELECT_RESERVATIONS_MODEL)
    params.update(inflexible=inflexible.params, flexible=flexible.params, reservations=reserved.params)

    if np.isnan(inflexible.target).any() or np.isnan(flexible.target).any() or np.isnan(reserved.target).any():
        return _insufficient("not enough days to fit the day-ahead adjustment", hours, now, gamma, params)
    if len(inflexible.rel_errors) == 0 or len(reserved.rel_errors) == 0:
        return _insufficient("no backtest errors to estimate the uncertainty from", hours, now, gamma, params)

    q_upper_raw = _quantile(inflexible.rel_errors, 1 - gamma)
    q97_raw = _quantile(reserved.rel_errors, RESERVATIONS_QUANTILE)
    q_upper, q97 = max(q_upper_raw, 0.0), max(q97_raw, 0.0)
    params.update(
        inflexible_rel_error_upper_raw=q_upper_raw,
        reservations_rel_error_q97_raw=q97_raw,
        n_inflexible_errors=int(len(inflexible.rel_errors)),
        n_reservation_errors=int(len(reserved.rel_errors)),
    )

    recent = slice(max(0, n - ratio_days), n)
    reserved_by_hod = days.hourly["reserved_cpu_cores"][recent].sum(axis=0)
    usage_by_hod = (days.hourly["inflexible_cpu_cores"][recent] + days.hourly["flexible_cpu_cores"][recent]).sum(axis=0)
    if (usage_by_hod <= 0).any():
        return _insufficient(
            f"zero CPU usage at some local hour over the last {ratio_days} days; R(h) undefined",
            hours, now, gamma, params,
        )
    ratio_by_hod = reserved_by_hod / usage_by_hod

    n_hours = len(hours)
    inflexible_cores = inflexible.target[target_hod]
    flexible_core_hours = float(flexible.target[0] * n_hours)
    reservations_core_hours = float(reserved.target[0] * n_hours)
    return LoadForecast(
        status="ok",
        reason=None,
        target_hours=hours,
        issued_at=now,
        gamma=gamma,
        inflexible_cpu_cores=pd.Series(inflexible_cores, index=hours, name="inflexible_cpu_cores"),
        inflexible_upper_cpu_cores=pd.Series(
            inflexible_cores * (1 + q_upper), index=hours, name="inflexible_upper_cpu_cores"
        ),
        flexible_core_hours=flexible_core_hours,
        reservations_core_hours=reservations_core_hours,
        reservation_ratio=pd.Series(ratio_by_hod[target_hod], index=hours, name="reservation_ratio"),
        reservations_rel_error_q97=q97,
        theta_core_hours=reservations_core_hours * (1 + q97),
        inflexible_rel_error_upper=q_upper,
        parameters=params,
    )


# --------------------------------------------------------------------------------------- baselines


def _series_day_matrix(history: pd.Series, before: pd.Timestamp, tz: str) -> tuple[pd.DatetimeIndex, np.ndarray, np.ndarray]:
    if not isinstance(history, pd.Series):
        raise InputError("history", "must be a pandas Series of hourly values with a UTC DatetimeIndex")
    frame = pd.DataFrame({c: history for c in HISTORY_COLUMNS})
    frame.index = history.index
    frame = _prepare_history(frame.rename_axis("hour"), before, max_history_days=10_000)
    days = _day_matrix(frame, tz)
    return days.dates, days.hourly[HISTORY_COLUMNS[0]], days.daily_mean[HISTORY_COLUMNS[0]]


def seasonal_naive_forecast(history: pd.Series, target_hours: pd.DatetimeIndex, tz: str = "UTC") -> pd.Series:
    """Same local hour of the same weekday one week before (the target day's local date − 7 days)."""
    tz = _check_tz(tz)
    hours, target_date = _check_target_hours(target_hours, tz)
    dates, hourly, _ = _series_day_matrix(history, hours[0], tz)
    pos = dates.get_indexer([target_date - pd.Timedelta(days=7)])[0]
    if pos < 0:
        raise InputError("history", f"no complete local day {(target_date - pd.Timedelta(days=7)).date()}")
    return pd.Series(hourly[pos][hours.tz_convert(tz).hour], index=hours, name=history.name)


def seasonal_naive_core_hours(history: pd.Series, target_hours: pd.DatetimeIndex, tz: str = "UTC") -> float:
    """Daily total (core-hours) of the target day: the mean rate one week before × hours of the target day."""
    tz = _check_tz(tz)
    hours, target_date = _check_target_hours(target_hours, tz)
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

    tz = _check_tz(tz)
    hours, target_date = _check_target_hours(target_hours, tz)
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

    tz = _check_tz(tz)
    hours, target_date = _check_target_hours(target_hours, tz)
    dates, _, daily = _series_day_matrix(history, hours[0], tz)
    if len(dates) < 14:
        raise InputError("history", "Holt-Winters needs at least 14 complete days")
    dates, daily = dates[-fit_days:], daily[-fit_days:]
    horizon_days = int((target_date - dates[-1]).days)
    result = ExponentialSmoothing(
        daily, trend=None, seasonal="add", seasonal_periods=7, initialization_method="estimated"
    ).fit()
    return float(max(np.asarray(result.forecast(horizon_days))[-1], 0.0) * len(hours))
