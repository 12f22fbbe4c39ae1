"""The engine's model of one series, vectorised over a cluster axis (the method: `cicm.models.load`).

Every function takes the series of C clusters over the same consecutive complete local days, X (C, n, P) with
P periods a day (24 local hours, or 1 for the daily means): the week-ahead EWMA (seven interleaved chains) and
its (α, β) grid search, the level EWMA and moving-average bases, the rolling day-ahead adjustment fitted for
every origin at once, the model selection, and the empirical error quantiles.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


def forecast_series(
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


def quantiles(arrays: list[np.ndarray], q: float) -> list[float | None]:
    """np.quantile(a, q, method="higher") of each array a (None if empty), one call per array length ('higher'
    picks an element: the same number as alone)."""
    out: list[float | None] = [None] * len(arrays)
    lengths = np.array([len(a) for a in arrays])
    for length in np.unique(lengths[lengths > 0]):
        rows = np.flatnonzero(lengths == length)
        for i, v in zip(rows, np.quantile(np.stack([arrays[i] for i in rows]), q, axis=1, method="higher")):
            out[i] = float(v)
    return out
