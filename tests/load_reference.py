"""Reference arithmetic for the load engine's shortcuts (cicm.models.load.series): test oracles only.

Production keeps one path, the batched engine. These are the plain, per-cluster forms of what it computes in
bulk, written from the method in `cicm.models.load`'s docstring, to check it against:

- `reference_week_ahead_mape`: the (α, β) grid's rolling-origin MAPE with every week-ahead forecast computed
  and compared (the exact arithmetic the engine falls back to for near-ties);
- `naive_week_ahead`: the week-ahead EWMA of one cluster by loops over origins, blocks and days of the week;
- `naive_adjust_fits`: the day-ahead adjustment refitted by least squares at every origin, one origin at a time.
"""
from __future__ import annotations

import numpy as np

from cicm.models.load.series import MIN_ADJUST_DAYS, _week_ahead_ape_sums, _week_ahead_inputs


def reference_week_ahead_mape(X: np.ndarray, lag: int, alpha_grid, beta_grid) -> np.ndarray:
    """The grid's rolling-origin MAPE (G, C), alpha-major, with every WA computed and compared
    (`_week_ahead_ape_sums`)."""
    C, n, P = X.shape
    m, r, _ = _week_ahead_inputs(X, lag)
    n_scored = n - 6 - lag
    actual = np.zeros((C, 7 * m.shape[1], P))
    actual[:, :n_scored] = X[:, 6 + lag :]
    sums = _week_ahead_ape_sums(m, r, actual.reshape(C, -1, 7, P), -(-n_scored // 7),
                                np.array(alpha_grid)[:, None], np.array(beta_grid)[:, None])
    return 100 * sums.reshape(-1, C) / np.maximum((X[:, 6 + lag :] > 0).sum(axis=(1, 2)), 1)


def naive_week_ahead(x: np.ndarray, lag: int, alpha: float, beta: float) -> np.ndarray:
    """WA (n + lag, P) of one cluster's series x (n, P), NaN where no state exists yet.

    For the 7-day block ending on day e: m_e = its mean, f_e(t) = x(t) / m_e for its days t (1 where m_e = 0).
    Along the chain e, e + 7, ...: L = α·m + (1-α)·L, S(t mod 7) = β·f(t) + (1-β)·S(t mod 7), both starting at
    the chain's first block. WA(e + lag | e) = L_e · S_e((e + lag) mod 7)."""
    n, P = x.shape
    WA = np.full((n + lag, P), np.nan)
    state = {}  # chain e mod 7 -> (level, {day of week: factor})
    for e in range(6, n):
        block = x[e - 6 : e + 1]
        m = block.sum() / (7 * P)
        f = {t % 7: (x[t] / m if m > 0 else np.ones(P)) for t in range(e - 6, e + 1)}
        chain = e % 7
        if chain not in state:
            level, factor = m, dict(f)
        else:
            level, factor = state[chain]
            level = alpha * m + (1 - alpha) * level
            factor = {k: beta * f[k] + (1 - beta) * factor[k] for k in factor}
        state[chain] = level, factor
        WA[e + lag] = level * factor[(e + lag) % 7]
    return WA


def naive_week_ahead_mape(X: np.ndarray, lag: int, alpha_grid, beta_grid) -> np.ndarray:
    """The grid's rolling-origin MAPE (G, C), alpha-major, from `naive_week_ahead`, over the days 6 + lag ...
    with X > 0."""
    C, n, P = X.shape
    out = np.zeros((len(alpha_grid) * len(beta_grid), C))
    for c in range(C):
        actual = X[c, 6 + lag :]
        ok = actual > 0
        for g, (a, b) in enumerate((a, b) for a in alpha_grid for b in beta_grid):
            wa = naive_week_ahead(X[c], lag, a, b)[6 + lag : n]
            out[g, c] = 100 * (np.abs(wa[ok] - actual[ok]) / actual[ok]).sum() / max(ok.sum(), 1)
    return out


def naive_adjust_fits(x: np.ndarray, wa: np.ndarray, lag: int, days, window: int) -> np.ndarray:
    """Coefficients (len(days), 3) of X(t) ~ a + b·WA(t) + c·g(t) for one cluster, refitted at every origin by
    lstsq: g(t) = mean over the day of x(t - lag) - WA(t - lag); the training days t < n with features and
    D - lag - window < t <= D - lag; NaN rows with fewer than MIN_ADJUST_DAYS of them. x (n, P), wa (n+lag, P)."""
    n, P = x.shape
    g = np.full(n + lag, np.nan)
    g[lag : lag + n] = (x - wa[:n]).mean(axis=1)
    has = ~(np.isnan(wa).any(axis=1) | np.isnan(g))
    out = np.full((len(days), 3), np.nan)
    for j, day in enumerate(days):
        train = [t for t in range(n) if has[t] and day - lag - window < t <= day - lag]
        if len(train) < MIN_ADJUST_DAYS or not has[day]:
            continue
        A = np.concatenate([np.column_stack([np.ones(P), wa[t], np.full(P, g[t])]) for t in train])
        y = np.concatenate([x[t] for t in train])
        out[j] = np.linalg.lstsq(A, y, rcond=None)[0]
    return out
