"""Day-ahead load forecasts of one cluster, with their uncertainty (CICM, Radovanović et al. 2023).

`forecast_load` forecasts one cluster; `forecast_load_batch` many clusters of one campus at once, with the same
numbers per cluster (one engine, vectorised over a cluster axis; `forecast_load` is its one-cluster case).

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
from cicm.timeutil import check_timezone, local_day_hours_utc, local_day_lengths

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
    """UTC start times of the hours of local date `day` in time zone `tz` (the one calendar: cicm.timeutil)."""
    return local_day_hours_utc(day, check_timezone(tz, "tz"))


def _local_day_lengths(dates: pd.DatetimeIndex, tz: str) -> np.ndarray:
    """Number of hours of each local date (naive midnights) in `tz`: 23, 24 or 25 around DST changes."""
    return local_day_lengths(dates, tz)


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
        block_sums = day_sums[:, : n_blocks].copy()  # the 7 days' sums added in order
        for i in range(1, 7):
            block_sums += day_sums[:, i : i + n_blocks]
        m[:, :n_blocks] = block_sums / (7 * P)
        observed = X[:, lag - 1 : lag - 1 + n_blocks]  # day d + lag - 7 for d = 6 ...
        mm = m[:, :n_blocks, None]
        if (mm > 0).all():
            np.divide(observed, mm, out=r[:, :n_blocks])
        else:
            r[:, :n_blocks] = np.where(mm > 0, observed / np.where(mm > 0, mm, 1.0), 1.0)
    return m.reshape(C, K, 7), r.reshape(C, K, 7, P), n_blocks


def _week_ahead_blocks(m: np.ndarray, r: np.ndarray, alphas: np.ndarray, betas: np.ndarray):
    """Yields, for k = 0, 1, ..., (level (A, C, 7), factor (B, C, 7, P)) after the blocks ending on days
    6 + 7k + j: the EWMA states of the seven interleaved chains, for weights alphas (A, C or 1) and betas
    (B, C or 1). WA of day 6 + 7k + j + lag is level · factor. The factor is updated in place: read it before
    asking for the next block."""
    a = alphas[..., None]
    b = betas[..., None, None]
    b_rest = 1 - b
    level = np.broadcast_to(m[:, 0], a.shape[:-2] + m[:, 0].shape).copy()
    factor = np.broadcast_to(r[:, 0], b.shape[:-3] + r[:, 0].shape).copy()
    yield level, factor
    for k in range(1, m.shape[1]):
        level = alphas[..., None] * m[:, k] + (1 - a) * level
        np.multiply(factor, b_rest, out=factor)
        factor += b * r[:, k]
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


_ALL_BLOCKS_FLOATS = 1 << 20


def _week_ahead_ape_sums(m: np.ndarray, r: np.ndarray, actual: np.ndarray, K: int, alphas: np.ndarray,
                         betas: np.ndarray) -> np.ndarray:
    """Σ |WA - X| / X (A, B, C) over the days 6 + lag ... of the first K blocks with X > 0, for the grid alphas
    (A, 1) × betas (B, 1): each WA computed and compared (the reference arithmetic). actual: (C, K', 7, P), 0
    past the last day."""
    denominator = np.where(actual > 0, actual, np.inf)
    A, B, (C, _, _, P) = len(alphas), len(betas), actual.shape
    if P == 1 and K * A * B * C * 7 <= _ALL_BLOCKS_FLOATS:
        # every block at once, chain-major (7, K, A, B, C): the same operations, the sums over the 7 days in
        # order as for a row of 7 (below 8 terms numpy's sum is sequential), then over the blocks in order
        levels, factors = np.empty((7, K, A, 1, C)), np.empty((7, K, 1, B, C))
        for k, (level, factor) in zip(range(K), _week_ahead_blocks(m, r, alphas, betas)):
            levels[:, k, :, 0] = np.moveaxis(level, 2, 0)
            factors[:, k, 0] = np.moveaxis(factor[..., 0], 2, 0)
        wa = levels * factors
        chain_major = lambda a: a[:, :K, :, 0].transpose(2, 1, 0)[:, :, None, None]  # noqa: E731
        np.subtract(wa, chain_major(actual), out=wa)
        np.abs(wa, out=wa)
        np.divide(wa, chain_major(denominator), out=wa)
        return np.add.reduce(np.add.reduce(wa, axis=0), axis=0)
    sums = np.zeros((A, B, C))
    for k, (level, factor) in zip(range(K), _week_ahead_blocks(m, r, alphas, betas)):
        wa = level[:, None, :, :, None] * factor[None]
        np.subtract(wa, actual[:, k], out=wa)
        np.abs(wa, out=wa)
        np.divide(wa, denominator[:, k], out=wa)
        sums += wa.sum(axis=(3, 4))
    return sums


def _week_ahead_ape_sums_fast(m: np.ndarray, r: np.ndarray, actual: np.ndarray, K: int, alphas: np.ndarray,
                              betas: np.ndarray) -> np.ndarray:
    """`_week_ahead_ape_sums` up to round-off, with one max and one sum per grid value instead of five passes.

    With h = factor / X (0 where X = 0) and L the level (WA = L·factor): |WA - X| / X = |L·h - 1|, and over a
    block's periods with X > 0, Σ |L·h - 1| = 2·Σ (max(L·h, 1) - 1) - Σ (L·h - 1), where the first sum may run
    over every period (max(0, 1) - 1 = 0) and Σ_p max(L·h_p, 1) = L·Σ_p max(h_p, 1/L) (P when L = 0)."""
    C, _, _, P = actual.shape
    A, B = len(alphas), len(betas)
    valid = actual > 0
    inverse = np.divide(1.0, actual, out=np.zeros_like(actual), where=valid)
    levels = np.empty((K, A, C, 7))
    H = np.empty((K, B * C * 7))  # Σ_p h
    M = np.empty((K, A, B * C * 7))  # Σ_p max(h, 1/L)
    buffer = np.empty((B, C, 7, P))
    for k, (level, factor) in zip(range(K), _week_ahead_blocks(m, r, alphas, betas)):
        h = factor * inverse[:, k]  # (B, C, 7, P)
        np.einsum("ip->i", h.reshape(-1, P), out=H[k])
        levels[k] = level
        floor = np.repeat(np.divide(1.0, level, out=np.zeros_like(level), where=level > 0)[..., None], P, axis=3)
        for a in range(A):
            np.maximum(h, floor[a], out=buffer)
            np.einsum("ip->i", buffer.reshape(-1, P), out=M[k, a])
    # per block and chain j: 2·S_j - T_j = L·(2·Σ_p max(h, 1/L) - Σ_p h), 2·P where L = 0
    L = levels[:, :, None]  # (K, A, 1, C, 7)
    Z = M.reshape(K, A, B, C, 7)
    np.multiply(Z, 2.0, out=Z)
    np.subtract(Z, H.reshape(K, 1, B, C, 7), out=Z)
    np.multiply(Z, L, out=Z)
    if not (levels > 0).all():
        np.copyto(Z, 2.0 * P, where=~(L > 0))
    n_valid = valid[:, :K].sum(axis=(2, 3)).T[:, None, None]  # (K, 1, 1, C)
    return np.einsum("kabcj->abc", Z) - 14 * P * K + n_valid.sum(axis=0)


def _week_ahead_pick(
    X: np.ndarray, lag: int, alpha_grid: tuple[float, ...], beta_grid: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, int]:
    """Rolling-origin MAPE (G, C) of WA(D | D - lag) over the history days every grid member forecasts, for
    the grid (alpha, beta) in alpha-major order, and that number of days: `_pick` over `_week_ahead_all`,
    without holding the whole grid of forecasts.

    The sums come from `_week_ahead_ape_sums_fast` (round-off apart); a cluster whose best two grid members
    are that close (or with a non-finite sum) gets them from `_week_ahead_ape_sums`, so that the choice
    among near-equal members is the reference arithmetic's."""
    C, n, P = X.shape
    alphas = np.asarray(alpha_grid, dtype=float)[:, None]
    betas = np.asarray(beta_grid, dtype=float)[:, None]
    m, r, _ = _week_ahead_inputs(X, lag)
    n_scored = max(n - 6 - lag, 0)
    K = -(-n_scored // 7)  # blocks with a scored day
    actual = np.zeros((C, 7 * m.shape[1], P))
    actual[:, :n_scored] = X[:, 6 + lag : n]
    actual = actual.reshape(C, -1, 7, P)
    with np.errstate(invalid="ignore", over="ignore"):
        # one period a day: the reference arithmetic is faster
        sums = (_week_ahead_ape_sums_fast if P > 1 else _week_ahead_ape_sums)(m, r, actual, K, alphas, betas)
    sums = sums.reshape(-1, C)
    redo = ~np.isfinite(sums).all(axis=0)
    if len(sums) > 1:
        best, second = np.partition(np.where(redo, 0.0, sums), 1, axis=0)[:2]
        redo |= second - best <= _NEAR_TIE * (np.abs(best) + 7 * P * K)
    if redo.any():
        sums[:, redo] = _week_ahead_ape_sums(m[redo], r[redo], actual[redo], K, alphas, betas).reshape(-1, redo.sum())
    count = (X[:, 6 + lag : n] > 0).sum(axis=(1, 2))
    return 100 * sums / np.maximum(count, 1), n_scored


# grid members whose sums of relative errors are this close (relative to the number of terms) are compared with
# the reference arithmetic; the fast sums' round-off is below 1e-12 of it
_NEAR_TIE = 1e-9


def _level_ewma_all(X: np.ndarray, lag: int, alphas: np.ndarray) -> np.ndarray:
    """F[g, c, D, p] = L_g after day D - lag, where L = α·X(e) + (1-α)·L(e-1) starts at X(0). NaN before.
    X: (C, n, P)."""
    C, n, P = X.shape
    F = np.full((len(alphas), C, n + lag, P), np.nan)
    a = alphas[:, None, None]
    level = np.repeat(X[None, :, 0], len(alphas), axis=0)
    F[:, :, lag] = level
    for e in range(1, n):
        level = a * X[:, e] + (1 - a) * level
        F[:, :, e + lag] = level
    return F


def _moving_average_all(X: np.ndarray, lag: int, windows: tuple[int, ...]) -> np.ndarray:
    """F[g, c, D, p] = mean of X over the w_g days ending on day D - lag (fewer at the start). NaN before."""
    C, n, P = X.shape
    F = np.full((len(windows), C, n + lag, P), np.nan)
    csum = np.concatenate([np.zeros((C, 1, P)), np.cumsum(X, axis=1)], axis=1)
    ends = np.arange(1, n + 1)  # day e's window is [max(0, e + 1 - w), e]
    for g, w in enumerate(windows):
        starts = np.maximum(0, ends - w)
        F[g, :, lag:] = (csum[:, ends] - csum[:, starts]) / (ends - starts)[:, None]
    return F


def _mape(actual: np.ndarray, forecast: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """MAPE % per cluster over the rows (..., C, D) selected, the periods with actual > 0 and a forecast.
    actual, forecast: (..., C, D, P)."""
    ok = rows[..., None] & (actual > 0) & ~np.isnan(forecast)
    ape = np.where(ok, np.abs(actual - np.where(ok, forecast, 0)) / np.where(ok, actual, 1), 0.0)
    return 100 * ape.sum(axis=(-2, -1)) / np.maximum(ok.sum(axis=(-2, -1)), 1)


def _pick(grid_forecasts: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cluster: index of the grid member (G, C, n + lag, P) with the lowest rolling-origin MAPE over the
    days every member forecasts; that MAPE; the number of days scored."""
    n = X.shape[1]
    scored = ~np.isnan(grid_forecasts[:, :, :n]).any(axis=(0, 3))  # (C, n)
    scores = _mape(X[None], grid_forecasts[:, :, :n], scored[None])
    best = np.argmin(scores, axis=0)
    return best, scores[best, np.arange(X.shape[0])], scored.sum(axis=1)


def _adjust_rows(X: np.ndarray, WA: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """The features of day D are [1, WA(D), mean over the day of X(D-lag) - WA(D-lag)] (per period; the last
    one the same for every period of the day). Returns that last one (C, n + lag), NaN where none, and a per-day
    availability mask (C, n + lag). X: (C, n, P), WA: (C, n + lag, P)."""
    C, n_all, P = WA.shape
    n = X.shape[1]
    lagged = np.full((C, n_all), np.nan)
    # the last complete day's error as its daily mean (the hourly errors are mostly noise: measured on the
    # demo fleet, the daily mean gives 3.30% hourly MAPE against 3.42% for the same-hour error)
    lagged[:, lag : lag + n] = (X - WA[:, :n]).mean(axis=2)
    ok = ~(np.isnan(WA).any(axis=2) | np.isnan(lagged))
    return lagged, ok


def _features(WA: np.ndarray, lagged: np.ndarray) -> np.ndarray:
    """The features (..., P, 3) of `_adjust_rows`'s days: WA (..., P), lagged (...)."""
    return np.stack([np.ones_like(WA), WA, np.broadcast_to(lagged[..., None], WA.shape)], axis=-1)


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
    WA: np.ndarray, lagged: np.ndarray, ok: np.ndarray, X: np.ndarray, lag: int, days: np.ndarray,
    adjust_window_days: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares fits of X on the features [1, WA, lagged] (`_adjust_rows`) over each origin's training
    window, for all origins at once.

    The window of day D is the days t with features, t < n, D - lag - adjust_window_days < t <= D - lag: a
    sliding window, so its Σ f fᵀ and Σ f·y are differences of cumulative sums of per-day sums.
    Returns coef (C, len(days), 3) (NaN where not fitted), fitted (C, len(days)) and the number of training
    days (C, len(days))."""
    C, n, P = X.shape
    train = ok[:, :n]
    g = np.where(train, lagged[:, :n], 0.0)  # (C, n): the same for every period
    # per day, Σ_p of the products of the features [1, w, g] and the target y (zero off the training days),
    # each summed over p in order, as einsum("cnpi,cnpj->cnij") did: the fits are the reference arithmetic's
    # to the last bit. Rows: Σw, Σw², Σwg, Σy, Σwy, Σgy, Σg, Σg², training day, Σy²; layout (row, C, n).
    terms = np.empty((P, 6, C, n))
    w, y = terms[:, 0], terms[:, 3]
    np.copyto(w, np.moveaxis(WA[:, :n], 2, 0))
    np.copyto(y, np.moveaxis(X, 2, 0))
    if not train.all():
        np.copyto(w, 0.0, where=~train)
        np.copyto(y, 0.0, where=~train)
    np.multiply(w, w, out=terms[:, 1])
    np.multiply(w, g, out=terms[:, 2])
    np.multiply(w, y, out=terms[:, 4])
    np.multiply(g, y, out=terms[:, 5])
    per_day = np.empty((10, C, n))
    np.add.reduce(terms, axis=0, out=per_day[:6])
    per_day[6:8] = g_terms = np.stack([g, g * g])
    for _ in range(P - 1):
        per_day[6:8] += g_terms
    per_day[8] = train
    y_days = np.where(train[:, :, None], X, 0.0)
    per_day[9] = np.einsum("cnp,cnp->cn", y_days, y_days)
    cum = np.zeros((10, C, n + 1))
    np.cumsum(per_day, axis=2, out=cum[:, :, 1:])
    hi = np.clip(days - lag + 1, 0, n)
    lo = np.clip(days - lag - adjust_window_days + 1, 0, n)
    window = cum[:, :, hi] - cum[:, :, lo]  # (10, C, n_days)
    n_train = np.rint(window[8]).astype(int)
    fitted = (n_train >= MIN_ADJUST_DAYS) & ok[:, days]
    N01, N11, N12, r0, r1, r2, N02, N22 = window[:8]
    N00 = P * window[8]
    with np.errstate(invalid="ignore", divide="ignore"):
        # Jacobi scaling, then the inverse of the symmetric 3×3 by its adjugate
        d0, d1, d2 = (np.sqrt(np.where(v > 0, v, np.nan)) for v in (N00, N11, N22))
        a, b, c = N00 / (d0 * d0), N01 / (d0 * d1), N02 / (d0 * d2)
        e, f_, i = N11 / (d1 * d1), N12 / (d1 * d2), N22 / (d2 * d2)
        rn0, rn1, rn2 = r0 / d0, r1 / d1, r2 / d2
        A00, A01, A02 = e * i - f_ * f_, c * f_ - b * i, b * f_ - c * e
        A11, A12, A22 = a * i - c * c, b * c - a * f_, a * e - b * b
        det = a * A00 + b * A01 + c * A02
        coef = np.stack([  # (terms summed in the order of the reference arithmetic, einsum's)
            (A00 * rn0 + A02 * rn2 + A01 * rn1) / det / d0,
            (A01 * rn0 + A12 * rn2 + A11 * rn1) / det / d1,
            (A02 * rn0 + A22 * rn2 + A12 * rn1) / det / d2,
        ], axis=-1)
    y_norm = np.sqrt(np.maximum(window[9], 0.0))
    good = fitted & (det > _WELL_CONDITIONED_DET) & (d1 >= _NOISE_COLUMN * y_norm) & (d2 >= _NOISE_COLUMN * y_norm)
    # (NaN det or d: a zero column, is not good)
    coef[~fitted] = np.nan
    for k, j in zip(*np.nonzero(fitted & ~good)):
        day = days[j]
        usable = np.flatnonzero(train[k])
        usable = usable[(usable <= day - lag) & (usable > day - lag - adjust_window_days)]
        coef[k, j] = _fit_adjust(_features(WA[k, usable], lagged[k, usable]), X[k, usable])
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
    lagged, ok = _adjust_rows(X, base, lag)
    coef, fitted, n_train = _rolling_adjust_fits(base, lagged, ok, X, lag, days, adjust_window_days)
    use = np.where(fitted[..., None], coef, 0.0)[:, :, None, :]  # (C, days, 1, 3)
    fc = use[..., 0] + lagged[:, days, None] * use[..., 2] + base[:, days] * use[..., 1]  # einsum's order
    out = np.full((C, len(days), P), np.nan)
    out[fitted] = np.maximum(fc[fitted], 0.0)
    return out, coef[:, -1], n_train[:, -1]


@dataclass(frozen=True)
class _Candidate:
    model: str  # SEASONAL, LEVEL_EWMA or MOVING_AVERAGE
    adjusted: bool
    base: np.ndarray  # (C, n + lag, P) rolling-origin base forecasts of every day, NaN where none

    @property
    def label(self) -> str:
        return f"{self.model}+adjust" if self.adjusted else self.model


@dataclass(frozen=True)
class _SeriesForecast:
    target: np.ndarray  # (C, P) day-ahead forecast of the target day (mean cores per period)
    rel_errors: list[np.ndarray]  # per cluster, the flattened relative errors of the rolling backtest
    params: list[dict]  # per cluster


def _forecast_series(
    X: np.ndarray,
    lag: int,
    alpha_grid: tuple[float, ...],
    beta_grid: tuple[float, ...],
    error_window_days: int,
    adjust_window_days: int,
    select: bool = False,
    windows: tuple[int, ...] = LEVEL_WINDOWS,
) -> _SeriesForecast:
    """Day-ahead forecast of one series of C clusters (C × n days × P periods, the same consecutive dates).
    select=False: the seasonal model with the adjustment (hourly inflexible, daily reservations). select=True
    (daily flexible, P = 1): the base model (seasonal, level EWMA, moving average) and whether to adjust it
    are chosen by the rolling-origin MAPE of the day-ahead forecasts over the days on which all six
    candidates forecast."""
    C, n, P = X.shape
    clusters = np.arange(C)
    alphas = np.repeat(np.asarray(alpha_grid, dtype=float), len(beta_grid))
    betas = np.tile(np.asarray(beta_grid, dtype=float), len(alpha_grid))
    wa_scores, n_scored = _week_ahead_pick(X, lag, alpha_grid, beta_grid)
    best = np.argmin(wa_scores, axis=0)
    wa_mape = wa_scores[best, clusters]
    WA = _week_ahead_all(X, lag, alphas[best][None], betas[best][None])[0]
    params = [
        {"alpha": float(alphas[g]), "beta": float(betas[g]), "week_ahead_mape_pct": float(s),
         "n_scored_days": int(n_scored)}
        for g, s in zip(best, wa_mape)
    ]
    candidates = [_Candidate(SEASONAL, True, WA)]
    if select:
        level_alphas = np.array(alpha_grid, dtype=float)
        level_grid = _level_ewma_all(X, lag, level_alphas)
        g_level, level_mape, _ = _pick(level_grid, X)
        ma_grid = _moving_average_all(X, lag, windows)
        g_ma, ma_mape, _ = _pick(ma_grid, X)
        for c, p in enumerate(params):
            p.update(
                level_alpha=float(level_alphas[g_level[c]]), level_mape_pct=float(level_mape[c]),
                window_days=int(windows[g_ma[c]]), moving_average_mape_pct=float(ma_mape[c]),
            )
        level_base, ma_base = level_grid[g_level, clusters], ma_grid[g_ma, clusters]
        candidates += [
            _Candidate(SEASONAL, False, WA),
            _Candidate(LEVEL_EWMA, True, level_base),
            _Candidate(LEVEL_EWMA, False, level_base),
            _Candidate(MOVING_AVERAGE, True, ma_base),
            _Candidate(MOVING_AVERAGE, False, ma_base),
        ]

    # every candidate's rolling day-ahead forecasts: of the history days (for the selection and the errors)
    # and of the target day, last
    all_days = np.r_[np.arange(0 if select else max(0, n - error_window_days), n), n - 1 + lag]
    runs = [_day_ahead(X, c.base, lag, all_days, c.adjusted, adjust_window_days) for c in candidates]
    history_rows = all_days < n
    actual = X[:, np.minimum(all_days, n - 1)]  # the target day's row is never scored
    chosen = np.zeros(C, dtype=int)
    if select:
        # the days on which every candidate has a forecast: all are scored on the same days
        forecasts = np.stack([r[0] for r in runs])  # (6, C, days, P)
        common = history_rows & ~np.isnan(forecasts).any(axis=(0, 3))  # (C, days)
        scores = _mape(actual[None], forecasts, common[None])  # (6, C)
        has_common = common.any(axis=1)
        chosen = np.where(has_common, np.argmin(scores, axis=0), 0)  # a tie keeps the earlier candidate
        for c, p in enumerate(params):
            p.update(
                selection_mape_pct={
                    cand.label: float(scores[i, c]) for i, cand in enumerate(candidates)
                } if has_common[c] else None,
                n_selection_days=int(common[c].sum()),
            )
        fc = forecasts[chosen, clusters]
    else:
        fc = runs[0][0]

    backtest = history_rows & (all_days >= n - error_window_days) & ~np.isnan(fc).any(axis=2)  # (C, days)
    positive = backtest[..., None] & (fc > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(positive, (actual - fc) / np.where(positive, fc, 1.0), np.nan)
    bt_mape = _mape(actual, fc, backtest)
    rel_errors = [rel[c][positive[c]] for c in range(C)]
    for c, p in enumerate(params):
        _, coef, n_train = runs[chosen[c]]
        cand = candidates[chosen[c]]
        has_coef = coef is not None and not np.isnan(coef[c]).any()
        n_bt = int(backtest[c].sum())
        p.update(
            model=cand.model,
            adjusted=cand.adjusted,
            adjust_a_b_c=[float(v) for v in coef[c]] if has_coef else None,
            n_adjust_days=int(n_train[c]),
            n_backtest_days=n_bt,
            backtest_day_ahead_mape_pct=float(bt_mape[c]) if n_bt else None,
        )
    return _SeriesForecast(fc[:, -1], rel_errors, params)


def _quantiles(arrays: list[np.ndarray], q: float) -> list[float | None]:
    """np.quantile(a, q, method="higher") of each array a (None if empty), one call per array length ('higher'
    picks an element: the same number as alone)."""
    out: list[float | None] = [None] * len(arrays)
    lengths = np.array([len(a) for a in arrays])
    for length in np.unique(lengths[lengths > 0]):
        rows = np.flatnonzero(lengths == length)
        for i, v in zip(rows, np.quantile(np.stack([arrays[i] for i in rows]), q, axis=1, method="higher")):
            out[i] = float(v)
    return out


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


@dataclass(frozen=True)
class _Request:
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


def _check_request(target_hours, tz, gamma, now, min_history_days, max_history_days, error_window_days,
                   adjust_window_days, ratio_days, alpha_grid, beta_grid) -> _Request:
    now = _check_now(now)
    tz = _check_tz(tz)
    hours, target_date = _check_target_hours(target_hours, tz)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0 < gamma < 1:
        raise InputError("gamma", f"must be in (0, 1), got {gamma!r}")
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
    return _Request(hours, target_date, tz, float(gamma), now, min_history_days, max_history_days,
                    error_window_days, adjust_window_days, ratio_days, tuple(alpha_grid), tuple(beta_grid))


_NS_PER_HOUR = 3_600_000_000_000
# clusters per engine call: bounds the memory of the week-ahead grid (G × clusters × 7 days × 24 per step)
CHUNK_CLUSTERS = 128


def _utc_ns(values, field_name: str) -> np.ndarray:
    index = pd.DatetimeIndex(values)
    if index.tz is None:
        raise InputError(field_name, "must be tz-aware (UTC)")
    return index.tz_convert("UTC").as_unit("ns").asi8


def _forecast_rows(
    codes: np.ndarray, n_clusters: int, hour_ns: np.ndarray, values: np.ndarray, rows_of, req: _Request
) -> list:
    """The forecast (or InputError) of every cluster 0 ... n_clusters-1 from its rows: codes (N,) cluster,
    hour_ns (N,) UTC hour start in ns, values (3, N) of HISTORY_COLUMNS (NaN: missing or non-numeric).
    rows_of(c) gives cluster c's original rows, only read to word the error of a cluster that fails a check
    (`_prepare_history` raises it, as for one cluster alone)."""
    results: list = [None] * n_clusters
    now_ns = req.now.as_unit("ns").value
    start_ns = (req.now - pd.Timedelta(days=req.max_history_days)).as_unit("ns").value
    if len(hour_ns) and not (hour_ns.max() + _NS_PER_HOUR <= now_ns and hour_ns.min() >= start_ns):
        keep = (hour_ns + _NS_PER_HOUR <= now_ns) & (hour_ns >= start_ns)
        codes, hour_ns, values = codes[keep], hour_ns[keep], values[:, keep]
    d_code, d_hour = np.diff(codes), np.diff(hour_ns)
    if len(codes) > 1 and not ((d_code > 0) | ((d_code == 0) & (d_hour > 0))).all():
        order = np.lexsort((hour_ns, codes))
        codes, hour_ns, values = codes[order], hour_ns[order], values[:, order]
        d_code, d_hour = np.diff(codes), np.diff(hour_ns)

    # the checks of `_prepare_history`, for every cluster at once
    bad = np.zeros(n_clusters, dtype=bool)
    if values.size and not (values.min() >= 0 and values.max() < np.inf):  # NaN, infinite or negative values
        bad[codes[np.nonzero(~((values >= 0) & (values < np.inf)))[1]]] = True
    same = d_code == 0
    bad[codes[1:][same & (d_hour != _NS_PER_HOUR)]] = True  # duplicates and gaps
    # hours off the whole hour: a cluster's hours are whole hours apart or it failed above, so its first tells
    first = np.flatnonzero(np.r_[True, ~same]) if len(codes) else np.zeros(0, dtype=np.intp)
    bad[codes[first[hour_ns[first] % _NS_PER_HOUR != 0]]] = True
    for c in np.flatnonzero(bad):
        try:
            _prepare_history(rows_of(c), req.now, req.max_history_days)
        except InputError as exc:
            results[c] = exc
        else:  # pragma: no cover - the checks above are those of _prepare_history
            raise AssertionError(f"cluster {c} failed a check that _prepare_history passes")

    counts = np.bincount(codes, minlength=n_clusters)
    first_row = np.r_[0, np.cumsum(counts)[:-1]]
    good = np.flatnonzero(~bad & (counts > 0))
    empty = np.flatnonzero(~bad & (counts == 0))
    for c in empty:
        results[c] = _insufficient(
            f"0 complete local days of history before {req.now}; need {req.min_history_days}",
            req.hours, req.now, req.gamma, {"history_days": 0, "min_history_days": req.min_history_days},
        )
    if len(good) == 0:
        return results

    # the local days of the hours any cluster covers (a contiguous grid of UTC hours)
    h0 = hour_ns[first_row[good]]
    h1 = hour_ns[first_row[good] + counts[good] - 1]
    grid_start = h0.min()
    n_grid = int((h1.max() - grid_start) // _NS_PER_HOUR) + 1
    grid = pd.DatetimeIndex((grid_start + _NS_PER_HOUR * np.arange(n_grid, dtype=np.int64)).astype("datetime64[ns]"),
                            tz="UTC")
    local = grid.tz_convert(req.tz)
    local_dates = local.tz_localize(None).normalize()
    hod = local.hour.to_numpy()
    dates, date_of_hour = np.unique(local_dates.to_numpy(), return_inverse=True)
    dates = pd.DatetimeIndex(dates)
    first_hour = np.searchsorted(date_of_hour, np.arange(len(dates)), side="left")
    last_hour = np.searchsorted(date_of_hour, np.arange(len(dates)), side="right") - 1
    full = (last_hour - first_hour + 1) == _local_day_lengths(dates, req.tz)
    # complete days of a cluster: full days inside its (gap-free) hours; consecutive
    g0 = (h0 - grid_start) // _NS_PER_HOUR
    g1 = (h1 - grid_start) // _NS_PER_HOUR
    full_dates = np.flatnonzero(full)
    d0 = full_dates[np.minimum(np.searchsorted(first_hour[full_dates], g0, side="left"), len(full_dates) - 1)]
    d1 = full_dates[np.maximum(np.searchsorted(last_hour[full_dates], g1, side="right") - 1, 0)]
    n_days = np.where((first_hour[d0] >= g0) & (last_hour[d1] <= g1), d1 - d0 + 1, 0)
    n_days = np.maximum(n_days, 0)

    keys = np.where(n_days > 0, d0 * len(dates) + d1, -1)
    for key in np.unique(keys):
        members = good[keys == key]
        n = int(n_days[keys == key][0])
        params = {"history_days": n, "min_history_days": req.min_history_days}
        if n < req.min_history_days:
            for c in members:
                results[c] = _insufficient(
                    f"{n} complete local days of history before {req.now}; need {req.min_history_days}",
                    req.hours, req.now, req.gamma, dict(params),
                )
            continue
        first_date, last_date = int(key // len(dates)), int(key % len(dates))
        lag = int((req.target_date - dates[last_date]).days)
        params["lag_days"] = lag
        if not 1 <= lag <= 7:
            for c in members:
                results[c] = _insufficient(
                    f"the last complete day of history is {dates[last_date].date()}, {lag} days before the "
                    f"target day {req.target_date.date()}; at most 7 allowed",
                    req.hours, req.now, req.gamma, dict(params),
                )
            continue
        # day matrix layout of the group's hours: first and second (DST doubled hour) hour of each
        # (day, local hour of day), relative to the group's first hour
        span = np.arange(first_hour[first_date], last_hour[last_date] + 1)
        day_pos = date_of_hour[span] - first_date
        slot = day_pos * 24 + hod[span]
        hour_count = np.bincount(slot, minlength=n * 24)
        first_in_slot = np.full(n * 24, -1)
        first_in_slot[slot[::-1]] = np.arange(len(span))[::-1]
        second = np.flatnonzero(np.r_[False, slot[1:] == slot[:-1]])  # doubled hours follow each other
        for start in range(0, len(members), CHUNK_CLUSTERS):
            chunk = members[start : start + CHUNK_CLUSTERS]
            offset = first_row[chunk] + (first_hour[first_date] - (hour_ns[first_row[chunk]] - grid_start)
                                         // _NS_PER_HOUR)
            if len(span) == n * 24 and not len(second):  # no DST change: hours are the slots
                total = np.empty((3, len(chunk), len(span)))  # C order: the series' rows are contiguous
                for i, o in enumerate(offset):
                    total[:, i] = values[:, o : o + len(span)]
            else:
                total = np.take(values, offset[:, None] + np.maximum(first_in_slot, 0), axis=1)  # C order
                total[:, :, first_in_slot < 0] = 0.0
            if len(second):
                doubled = np.take(values, offset[:, None] + second, axis=1)
                np.add.at(total, (slice(None), slice(None), slot[second]), doubled)
            total = total.reshape(3, len(chunk), n, 24)
            count = hour_count.reshape(n, 24)
            daily = total[..., 0].copy()  # Σ over the hours of the day, in order
            for h in range(1, 24):
                daily += total[..., h]
            daily /= count.sum(axis=1)
            hourly = total  # the mean of each (day, hour): the value itself, but on DST days
            with np.errstate(invalid="ignore", divide="ignore"):
                for d in np.flatnonzero((count != 1).any(axis=1)):
                    hourly[:, :, d] /= count[d]
            # DST: a missing local hour, interpolated from its neighbours (`_fill_row_gaps`)
            missing_days = np.flatnonzero((count == 0).any(axis=1))
            hods = np.arange(24)
            for d in missing_days:
                ok = count[d] > 0
                for k in range(len(chunk)):
                    for col in range(3):
                        hourly[col, k, d] = np.interp(hods, hods[ok], hourly[col, k, d, ok])
            forecasts = _forecast_chunk(hourly, daily, lag, req, params)
            for c, fc in zip(chunk, forecasts):
                results[c] = fc
    return results


def _forecast_chunk(hourly: np.ndarray, daily: np.ndarray, lag: int, req: _Request, params: dict) -> list:
    """The model for clusters with the same complete days: hourly (3, C, n, 24) and daily (3, C, n) means
    of HISTORY_COLUMNS. Returns a LoadForecast per cluster."""
    C, n = daily.shape[1:]
    fit = lambda X, select: _forecast_series(  # noqa: E731
        X, lag, req.alpha_grid, req.beta_grid, req.error_window_days, req.adjust_window_days, select
    )
    inflexible = fit(np.ascontiguousarray(hourly[0]), False)  # (a no-op: the reductions over hours see C order)
    flexible = fit(daily[1][..., None], True)
    reserved = fit(daily[2][..., None], SELECT_RESERVATIONS_MODEL)
    hours, tz, now, gamma = req.hours, req.tz, req.now, req.gamma
    target_hod = hours.tz_convert(tz).hour.to_numpy()
    n_hours = len(hours)
    recent = slice(max(0, n - req.ratio_days), n)
    reserved_by_hod = hourly[2][:, recent].sum(axis=1)
    usage_by_hod = (hourly[0][:, recent] + hourly[1][:, recent]).sum(axis=1)
    q_uppers = _quantiles(inflexible.rel_errors, 1 - gamma)
    q97s = _quantiles(reserved.rel_errors, RESERVATIONS_QUANTILE)
    out = []
    for c in range(C):
        p = dict(params, inflexible=inflexible.params[c], flexible=flexible.params[c],
                 reservations=reserved.params[c])
        if (np.isnan(inflexible.target[c]).any() or np.isnan(flexible.target[c]).any()
                or np.isnan(reserved.target[c]).any()):
            out.append(_insufficient("not enough days to fit the day-ahead adjustment", hours, now, gamma, p))
            continue
        inflexible_errors, reserved_errors = inflexible.rel_errors[c], reserved.rel_errors[c]
        if len(inflexible_errors) == 0 or len(reserved_errors) == 0:
            out.append(_insufficient("no backtest errors to estimate the uncertainty from", hours, now, gamma, p))
            continue
        q_upper_raw, q97_raw = q_uppers[c], q97s[c]
        q_upper, q97 = max(q_upper_raw, 0.0), max(q97_raw, 0.0)
        p.update(
            inflexible_rel_error_upper_raw=q_upper_raw,
            reservations_rel_error_q97_raw=q97_raw,
            n_inflexible_errors=int(len(inflexible_errors)),
            n_reservation_errors=int(len(reserved_errors)),
        )
        if (usage_by_hod[c] <= 0).any():
            out.append(_insufficient(
                f"zero CPU usage at some local hour over the last {req.ratio_days} days; R(h) undefined",
                hours, now, gamma, p,
            ))
            continue
        ratio_by_hod = reserved_by_hod[c] / usage_by_hod[c]
        inflexible_cores = inflexible.target[c][target_hod]
        flexible_core_hours = float(flexible.target[c, 0] * n_hours)
        reservations_core_hours = float(reserved.target[c, 0] * n_hours)
        out.append(LoadForecast(
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
            parameters=p,
        ))
    return out


def _numeric_values(frame: pd.DataFrame) -> np.ndarray:
    """(3, N): the HISTORY_COLUMNS of the frame's rows, NaN where not numeric."""
    values = np.empty((3, len(frame)))
    for i, column in enumerate(HISTORY_COLUMNS):
        series = frame[column]
        values[i] = series.to_numpy() if series.dtype == np.float64 else \
            pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)
    return values


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
    The same engine as `forecast_load_batch`, with one cluster.
    """
    req = _check_request(target_hours, tz, gamma, now, min_history_days, max_history_days, error_window_days,
                         adjust_window_days, ratio_days, alpha_grid, beta_grid)
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
    result = _forecast_rows(np.zeros(len(frame), dtype=np.intp), 1, _utc_ns(frame.index, "hour"),
                            _numeric_values(frame), lambda c: history, req)[0]
    if isinstance(result, InputError):
        raise result
    return result


def _factorize_clusters(column: pd.Series) -> tuple[np.ndarray, pd.Index]:
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


def forecast_load_batch(
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
) -> dict[str, LoadForecast | InputError]:
    """`forecast_load` for many clusters of one campus (same tz, target day and issue time) at once.

    history: long frame with columns cluster, hour (UTC), inflexible_cpu_cores, flexible_cpu_cores,
    reserved_cpu_cores, e.g. `SELECT cluster, hour, ... ORDER BY cluster, hour` (any order is accepted).
    Returns, for every cluster present (in order of first appearance), what `forecast_load` gives for that
    cluster's rows alone: its LoadForecast, or the InputError it would raise (gaps, duplicate hours, NaN,
    negative values...). Errors in the shared arguments (target_hours, tz, gamma, now, options) or in the
    frame itself (not a DataFrame, a column missing, naive hours) are raised.
    """
    req = _check_request(target_hours, tz, gamma, now, min_history_days, max_history_days, error_window_days,
                         adjust_window_days, ratio_days, alpha_grid, beta_grid)
    if not isinstance(history, pd.DataFrame):
        raise InputError("history", "must be a pandas DataFrame")
    for column in ("cluster", "hour", *HISTORY_COLUMNS):
        if column not in history.columns:
            raise InputError(column, "column missing from history")
    try:
        hour_ns = _utc_ns(history["hour"], "hour")
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError("hour", f"not timestamps: {exc}") from exc
    codes, names = _factorize_clusters(history["cluster"])
    if (codes < 0).any():
        raise InputError("cluster", "missing cluster names")
    positions = None

    def rows_of(c: int) -> pd.DataFrame:
        nonlocal positions
        if positions is None:
            positions = pd.Series(np.arange(len(codes))).groupby(codes).indices
        return history.iloc[positions[c]]

    results = _forecast_rows(codes.astype(np.intp, copy=False), len(names), hour_ns, _numeric_values(history),
                             rows_of, req)
    return dict(zip(names.tolist(), results))


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
