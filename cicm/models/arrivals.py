"""Hourly forecasts of flexible-work arrivals (core-hours arriving per hour), with an upper quantile. Pure.

The CICM baseline: the arrivals of the same hour of the week, EWMA-weighted over the last ``weeks`` weeks (the
newest week weighs ``alpha``, the one before ``alpha * (1 - alpha)``, ...; weeks without data drop out and the
weights are renormalised). Batch arrivals are spiky hour by hour but steady day by day, so the uncertainty is set
on daily totals: the upper quantile scales the forecast by (1 + q) where q is the ``quantile`` of the relative
error of the daily totals the same method made on the last ``error_days`` days.

``forecast_arrivals(..., method="qr")`` (:func:`forecast_arrivals_qr`) instead fits gradient-boosted quantile
regressions on calendar and lag features; same return type, same daily band, plus an hourly median and an hourly
upper quantile. See docs/models.md, "Hourly arrival forecasts", for how the two compare.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cicm.errors import InputError

WEEK = pd.Timedelta(days=7)
HOUR = pd.Timedelta(hours=1)


ARRIVAL_METHODS = ("ewma", "qr")


@dataclass(frozen=True)
class ArrivalForecast:
    hours: pd.DatetimeIndex
    core_hours: np.ndarray  # central forecast per hour (expected arrivals)
    upper_core_hours: np.ndarray  # the daily band spread over the hours: central * (1 + q)
    rel_error_quantile: float  # q: the quantile of the relative error of daily totals; upper = central * (1 + q)
    median_core_hours: np.ndarray | None = None  # hourly median (qr); None -> core_hours
    hourly_upper_core_hours: np.ndarray | None = None  # hourly upper quantile (qr); None -> upper_core_hours
    method: str = "ewma"

    def __post_init__(self):
        if self.median_core_hours is None:
            object.__setattr__(self, "median_core_hours", self.core_hours)
        if self.hourly_upper_core_hours is None:
            object.__setattr__(self, "hourly_upper_core_hours", self.upper_core_hours)


def _check_history(history: pd.Series) -> pd.Series:
    if not isinstance(history.index, pd.DatetimeIndex) or history.index.tz is None:
        raise InputError("hour", "arrival history needs a tz-aware hourly DatetimeIndex")
    if history.index.has_duplicates:
        raise InputError("hour", "arrival history has duplicate hours")
    values = history.astype(float)
    if values.isna().any():
        raise InputError("flexible_arrived_core_hours", "arrival history contains NaN")
    if (values < 0).any():
        raise InputError("flexible_arrived_core_hours", "arrival history contains negative values")
    return values.sort_index()


_NS_PER_HOUR = 3_600_000_000_000


def values_at(values: pd.Series, at: pd.DatetimeIndex) -> np.ndarray:
    """``values.reindex(at)`` as floats (NaN where absent) for an index ``at`` on one hourly grid: positions by
    integer arithmetic on the grid, so it costs a few array operations whatever the datetime units."""
    at_ns = at.tz_convert("UTC").as_unit("ns").asi8
    out = np.full(len(at_ns), np.nan)
    if not len(at_ns) or values.empty:
        return out
    phase = int(at_ns[0] % _NS_PER_HOUR)
    src_ns = values.index.tz_convert("UTC").as_unit("ns").asi8 - phase
    on_grid = src_ns % _NS_PER_HOUR == 0  # reindex matches exact timestamps only
    keys = src_ns[on_grid] // _NS_PER_HOUR
    if not keys.size:
        return out
    lo = int(keys.min())
    dense = np.full(int(keys.max()) - lo + 1, np.nan)
    dense[keys - lo] = values.to_numpy(float)[on_grid]
    pos = (at_ns - phase) // _NS_PER_HOUR - lo
    exact = (at_ns - phase) % _NS_PER_HOUR == 0
    ok = exact & (pos >= 0) & (pos < dense.size)
    out[ok] = dense[pos[ok]]
    return out


def seasonal_ewma(history: pd.Series, hours: pd.DatetimeIndex, weeks: int = 4, alpha: float = 0.5) -> np.ndarray:
    """EWMA over weeks of the arrivals at the same hour of the week (168 h earlier, 336 h, ...). NaN where none.
    One row of :func:`ewma_at` on the history's grid."""
    values = _check_history(history)
    grid, start_ns = history_grid(values, hours)
    return ewma_at(grid[None, :], *grid_positions(hours, start_ns), weeks, alpha)[0]


def history_grid(values: pd.Series, hours: pd.DatetimeIndex) -> tuple[np.ndarray, int]:
    """A checked history as a gap-free hourly grid on the phase of ``hours[0]`` (NaN where no value; stamps off
    that grid are never read, as in :func:`values_at`). Returns (grid, UTC ns of its first hour)."""
    if not len(hours):
        return np.zeros(0), 0
    phase = int(hours[:1].tz_convert("UTC").as_unit("ns").asi8[0] % _NS_PER_HOUR)
    src_ns = values.index.tz_convert("UTC").as_unit("ns").asi8 - phase
    on_grid = src_ns % _NS_PER_HOUR == 0
    keys = src_ns[on_grid] // _NS_PER_HOUR
    if not keys.size:
        return np.zeros(0), 0
    lo = int(keys.min())
    grid = np.full(int(keys.max()) - lo + 1, np.nan)
    grid[keys - lo] = values.to_numpy(float)[on_grid]
    return grid, lo * _NS_PER_HOUR + phase


def grid_positions(at: pd.DatetimeIndex, start_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """Column of each stamp of ``at`` on an hourly grid from ``start_ns`` (UTC ns), and
    whether the stamp is exactly on that grid (off-grid stamps read nothing, like :func:`values_at`)."""
    rel = at.tz_convert("UTC").as_unit("ns").asi8 - start_ns
    return rel // _NS_PER_HOUR, rel % _NS_PER_HOUR == 0


def _read(grid: np.ndarray, pos: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """grid[:, pos] with NaN where ``pos`` is off the grid or outside it."""
    ok = exact & (pos >= 0) & (pos < grid.shape[1])
    out = np.full((grid.shape[0], pos.size), np.nan)
    out[:, ok] = grid[:, pos[ok]]
    return out


def ewma_at(grid: np.ndarray, pos: np.ndarray, exact: np.ndarray, weeks: int = 4, alpha: float = 0.5) -> np.ndarray:
    """:func:`seasonal_ewma` of every row of a (clusters x hours) grid at grid columns ``pos`` (NaN = unknown)."""
    num = np.zeros((grid.shape[0], pos.size))
    den = np.zeros((grid.shape[0], pos.size))
    for k in range(1, weeks + 1):
        past = _read(grid, pos - 168 * k, exact)
        w = alpha * (1 - alpha) ** (k - 1)
        ok = ~np.isnan(past)
        num += np.where(ok, w * past, 0.0)
        den += np.where(ok, w, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


@dataclass(frozen=True)
class ArrivalForecasts:
    """:func:`forecast_arrivals_grid`: the EWMA forecasts of many histories (rows) over the same hours."""
    hours: pd.DatetimeIndex
    core_hours: np.ndarray  # (C, N) central forecasts; a row with a problem is all NaN
    upper_core_hours: np.ndarray  # (C, N) central * (1 + q)
    rel_error_quantile: np.ndarray  # (C,) q
    problems: tuple[InputError | None, ...]  # per row: what forecast_arrivals would raise for it, or None

    def row(self, i: int) -> ArrivalForecast:
        problem = self.problems[i]
        if problem is not None:
            raise problem
        return ArrivalForecast(self.hours, self.core_hours[i], self.upper_core_hours[i],
                               float(self.rel_error_quantile[i]))


def _check_options(alpha: float, quantile: float) -> None:
    if not 0 < alpha <= 1:
        raise InputError("alpha", f"must be in (0, 1], got {alpha!r}")
    if not 0.5 <= quantile < 1:
        raise InputError("quantile", f"must be in [0.5, 1), got {quantile!r}")


def forecast_arrivals_grid(grid: np.ndarray, start_ns: int, hours: pd.DatetimeIndex, *, weeks: int = 4,
                           alpha: float = 0.5, quantile: float = 0.9, error_days: int = 28) -> ArrivalForecasts:
    """THE implementation of the EWMA arrival forecast (``forecast_arrivals`` calls it with one row), for a
    (clusters x hours) grid of checked hourly arrivals (NaN = no data) whose first column is the hour at UTC ns
    ``start_ns`` (on the phase of ``hours[0]``). Only columns before ``hours[0]`` are read. Each row's
    forecast, and its daily backcast error quantile, is what :func:`forecast_arrivals` gives for that history."""
    _check_options(alpha, quantile)
    grid = np.atleast_2d(np.asarray(grid, float))
    n_rows = grid.shape[0]
    pos, exact = grid_positions(hours, start_ns)
    first_ns = int(hours[:1].tz_convert("UTC").as_unit("ns").asi8[0])
    grid = grid[:, :int(np.clip(-(-(first_ns - start_ns) // _NS_PER_HOUR), 0, grid.shape[1]))]  # before hours[0]
    central = ewma_at(grid, pos, exact, weeks, alpha)
    empty = np.isnan(central).all(axis=1)
    problems: list[InputError | None] = [
        InputError("flexible_arrived_core_hours", f"no arrival history in the {weeks} weeks before "
                                                  f"{hours[0]:%Y-%m-%d %H:%M}Z") if e else None for e in empty]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows with no history: reported in ``problems``
        fill = np.nanmean(central, axis=1, keepdims=True)
    central = np.where(np.isnan(central), fill, central)
    # Backcast the last error_days whole days before the horizon with the same method, on data before each.
    end = hours[0].floor("D")
    past = pd.date_range(end - pd.Timedelta(days=error_days), end, freq="h", inclusive="left")
    q = np.zeros(n_rows)
    if len(past):
        p_pos, p_exact = grid_positions(past, start_ns)
        back = ewma_at(grid, p_pos, p_exact, weeks, alpha)
        actual = _read(grid, p_pos, p_exact)
        kept = ~np.isnan(back) & ~np.isnan(actual)
        day_codes, _ = pd.factorize(past.floor("D"), sort=False)
        n_days = int(day_codes.max()) + 1
        f_day = np.zeros((n_rows, n_days))
        a_day = np.zeros((n_rows, n_days))
        for d in range(n_days):  # days are contiguous runs of ``past``
            cols = day_codes == d
            f_day[:, d] = np.where(kept[:, cols], back[:, cols], 0.0).sum(axis=1)
            a_day[:, d] = np.where(kept[:, cols], actual[:, cols], 0.0).sum(axis=1)
        valid = f_day > 0
        ratio = np.where(valid, a_day / np.where(valid, f_day, 1.0) - 1.0, np.nan)
        enough = valid.sum(axis=1) >= 7
        if enough.any():
            q[enough] = np.maximum(np.nanquantile(ratio[enough], quantile, axis=1), 0.0)
    central = np.where(empty[:, None], np.nan, central)
    return ArrivalForecasts(hours, central, central * (1.0 + q[:, None]), q, tuple(problems))


def forecast_arrivals(history: pd.Series, hours: pd.DatetimeIndex, *, weeks: int = 4, alpha: float = 0.5,
                      quantile: float = 0.9, error_days: int = 28, method: str = "ewma") -> ArrivalForecast:
    """Forecast the arrivals in ``hours`` from the hourly history strictly before them (see the module doc).
    ``method``: "ewma" (the CICM baseline, default) or "qr" (:func:`forecast_arrivals_qr`, which ignores
    ``weeks``, ``alpha`` and ``error_days``). The EWMA is :func:`forecast_arrivals_grid` with one row."""
    if method not in ARRIVAL_METHODS:
        raise InputError("method", f"must be one of {', '.join(ARRIVAL_METHODS)}, got {method!r}")
    if method == "qr":
        return forecast_arrivals_qr(history, hours, quantile=quantile)
    _check_options(alpha, quantile)
    values = _check_history(history)
    values = values[values.index < hours[0]]
    grid, start_ns = history_grid(values, hours)
    return forecast_arrivals_grid(grid[None, :], start_ns, hours, weeks=weeks, alpha=alpha, quantile=quantile,
                                  error_days=error_days).row(0)


def hourly_arrivals(arrival: pd.Series, core_hours: np.ndarray, hours: pd.DatetimeIndex) -> pd.Series:
    """Sum job core-hours into the hours they arrived in (UTC hourly index ``hours``)."""
    idx = pd.DatetimeIndex(arrival).floor("h")
    s = pd.Series(np.asarray(core_hours, float), index=idx).groupby(level=0).sum()
    return s.reindex(hours, fill_value=0.0)


# ---------------------------------------------------------------------------------------------------------------
# Quantile regression ("qr"): gradient-boosted trees on calendar and lag features, relative to the recent level.
#
# Training rows mimic the planning situation of the target: the target hours start ``gap_h`` hours after the end
# of the history (6 h when planning at 18:00 local for the next local day), so every history hour t is put in a
# 24-hour block aligned with the target's first hour, and what is "known at planning" for it is read at that
# block's cutoff (block start - gap_h). The lags are 168 h and more: legal for any target less than a week ahead.
# Target and level features are divided by the level (the mean of the 28 days before the cutoff), so the trees
# learn a shape around the level and a level shift needs no split.

QR_FEATURES = ("hour_of_day_utc", "day_of_week_utc", "lag_168h", "lag_336h", "ewma_4w",
               "mean_24h_at_plan", "mean_7d_at_plan")
QR_LEVEL_H = 28 * 24  # the level every ratio is taken to: mean arrivals of the 28 days before the cutoff
QR_WARMUP_H = 7 * 24  # the first week of history only feeds the lags and the level
QR_FOLD_H = 7 * 24  # each rolling-origin validation fold is one week
QR_SPLITS = 4  # at most; fewer (at least 2) when the history is short
QR_MIN_HISTORY_H = QR_WARMUP_H + QR_FOLD_H + 2 * QR_FOLD_H  # 28 days: warm-up, a week to fit, two folds
QR_MAX_LEAD_H = 168  # the last target hour must be less than a week after the end of the history
QR_CANDIDATES = {  # chosen per call by rolling-origin error of the central forecast (TimeSeriesSplit)
    "calendar": (("hour_of_day_utc", "day_of_week_utc"),
                 {"max_iter": 30, "learning_rate": 0.1, "max_depth": 2, "min_samples_leaf": 150}),
    "calendar+lags": (QR_FEATURES,
                      {"max_iter": 30, "learning_rate": 0.1, "max_depth": 3, "min_samples_leaf": 80}),
}


def check_hourly_index(index: pd.DatetimeIndex, field: str = "hour") -> None:
    """InputError(field) unless ``index`` is tz-aware, on whole hours, increasing in steps of whole hours with at
    least one step of exactly 1 h (so a daily or half-hourly index is refused; a gap is allowed)."""
    if not isinstance(index, pd.DatetimeIndex) or index.tz is None:
        raise InputError(field, "needs a tz-aware hourly DatetimeIndex")
    if len(index) and (index != index.floor("h")).any():
        raise InputError(field, "not on whole hours (hourly data only)")
    if len(index) > 1:
        steps_h = np.asarray((index[1:] - index[:-1]) / HOUR, float)
        if (steps_h <= 0).any():
            raise InputError(field, "hours must be increasing and unique")
        if steps_h.min() != 1:
            raise InputError(field, f"not hourly: the smallest step is {steps_h.min():g} h")


def seasonal_ewma_grid(values: np.ndarray, weeks: int = 4, alpha: float = 0.5) -> np.ndarray:
    """:func:`seasonal_ewma` at every position of a gap-free hourly grid (NaN = unknown)."""
    num = np.zeros(len(values))
    den = np.zeros(len(values))
    for k in range(1, weeks + 1):
        past = lagged(values, 168 * k)
        w = alpha * (1 - alpha) ** (k - 1)
        ok = ~np.isnan(past)
        num[ok] += w * past[ok]
        den[ok] += w
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def lagged(values: np.ndarray, lag_h: int) -> np.ndarray:
    """values[t - lag_h] at every position t (NaN before the start)."""
    out = np.full(len(values), np.nan)
    if lag_h < len(values):
        out[lag_h:] = values[:len(values) - lag_h]
    return out


def trailing_mean_grid(values: np.ndarray, window_h: int) -> np.ndarray:
    """out[c] = mean of the known values at positions [c - window_h, c) (NaN if none), for c = 0..len(values)."""
    known = ~np.isnan(values)
    total = np.concatenate([[0.0], np.cumsum(np.where(known, values, 0.0))])
    count = np.concatenate([[0], np.cumsum(known)])
    lo = np.maximum(np.arange(len(total)) - window_h, 0)
    n = count - count[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (total - total[lo]) / np.maximum(n, 1), np.nan)


def plan_cutoff_positions(n_grid: int, first_target: int, gap_h: int, end: int) -> np.ndarray:
    """For every grid position t, where the data known when forecasting t ends: the start of t's 24-hour block
    (blocks aligned with ``first_target``) minus ``gap_h``, never after ``end`` (the end of the history)."""
    t = np.arange(n_grid)
    block_start = first_target + np.floor_divide(t - first_target, 24) * 24
    return np.minimum(block_start - gap_h, end)


def qr_feature_frame(values: np.ndarray, times: pd.DatetimeIndex, cutoffs: np.ndarray) -> tuple[pd.DataFrame,
                                                                                                np.ndarray]:
    """(the :data:`QR_FEATURES` at every position of the hourly grid ``times``, the level there). Calendar in
    UTC; lags, EWMA and trailing means as ratios to the level. ``values``: arrivals on the grid, NaN where
    unknown (always from the end of the history on)."""
    c = np.clip(cutoffs, 0, len(values))
    level = trailing_mean_grid(values, QR_LEVEL_H)[c]
    utc = times.tz_convert("UTC")
    with np.errstate(invalid="ignore", divide="ignore"):
        frame = pd.DataFrame({
            "hour_of_day_utc": utc.hour.to_numpy(float),
            "day_of_week_utc": utc.day_of_week.to_numpy(float),
            "lag_168h": lagged(values, 168) / level,
            "lag_336h": lagged(values, 336) / level,
            "ewma_4w": seasonal_ewma_grid(values) / level,
            "mean_24h_at_plan": trailing_mean_grid(values, 24)[c] / level,
            "mean_7d_at_plan": trailing_mean_grid(values, 168)[c] / level,
        })
    return frame.replace([np.inf, -np.inf], np.nan), level


def _fit_predict(loss: str, params: dict, x_fit: np.ndarray, y_fit: np.ndarray, x_pred: np.ndarray,
                 quantile: float | None = None) -> np.ndarray:
    """One ``HistGradientBoostingRegressor`` (loss "poisson" or "quantile"), fit and predicted, clipped at 0."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    if y_fit.sum() <= 0:
        return np.zeros(len(x_pred))  # nothing arrived in the training rows (and Poisson would refuse them)
    seen = ~np.isnan(x_fit).all(axis=0)  # e.g. the 336 h lag early in a short history: no split can use it
    x_fit, x_pred = x_fit[:, seen], x_pred[:, seen]
    extra = {"quantile": quantile} if loss == "quantile" else {}
    model = HistGradientBoostingRegressor(loss=loss, early_stopping=False, random_state=0, **params, **extra)
    return np.clip(model.fit(x_fit, y_fit).predict(x_pred), 0.0, None)


def block_totals(actual: np.ndarray, forecast: np.ndarray, blocks: np.ndarray) -> pd.DataFrame:
    """Actual (a) and forecast (f) totals of every complete 24-hour block with a positive forecast."""
    frame = pd.DataFrame({"block": blocks, "a": actual, "f": forecast})
    daily = frame.groupby("block").agg(a=("a", "sum"), f=("f", "sum"), n=("a", "size"))
    return daily[(daily["n"] == 24) & (daily["f"] > 0)]


def select_qr_candidate(x: pd.DataFrame, ratio: np.ndarray, level: np.ndarray, blocks: np.ndarray
                        ) -> tuple[str, np.ndarray]:
    """Rolling-origin choice among :data:`QR_CANDIDATES` (``TimeSeriesSplit`` with week-long folds) by the error
    of the central (Poisson, mean) model: the WAPE of its daily totals. Returns the name of the chosen
    candidate and the relative errors of the daily totals it made out of sample."""
    from sklearn.model_selection import TimeSeriesSplit

    splits = int(np.clip((len(ratio) - QR_FOLD_H) // QR_FOLD_H, 2, QR_SPLITS))
    folds = list(TimeSeriesSplit(n_splits=splits, test_size=QR_FOLD_H).split(x))
    actual = ratio * level
    best, best_score, best_errors = None, np.inf, np.array([])
    for name, (features, params) in QR_CANDIDATES.items():
        cols = x[list(features)].to_numpy()
        pred = np.full(len(ratio), np.nan)
        for fit_rows, test_rows in folds:
            pred[test_rows] = _fit_predict("poisson", params, cols[fit_rows], ratio[fit_rows], cols[test_rows])
        tested = ~np.isnan(pred)
        core_hours = pred[tested] * level[tested]
        daily = block_totals(actual[tested], core_hours, blocks[tested])
        errors = (daily["a"] / daily["f"] - 1.0).to_numpy()
        score = float((daily["a"] - daily["f"]).abs().sum() / max(daily["a"].sum(), 1e-12))  # daily WAPE
        if best is None or score < best_score:
            best, best_score, best_errors = name, score, errors
    assert best is not None  # QR_CANDIDATES is not empty
    return best, best_errors


def forecast_arrivals_qr(history: pd.Series, hours: pd.DatetimeIndex, *, quantile: float = 0.9) -> ArrivalForecast:
    """Quantile-regression forecast of the arrivals in ``hours`` from the hourly history strictly before them.

    ``HistGradientBoostingRegressor`` on :data:`QR_FEATURES` (UTC hour of day and day of week; the same hour 168 h
    and 336 h before; the 4-week seasonal EWMA; the means of the 24 h and 7 d before the planning cutoff; all but
    the calendar as ratios to the level, the 28-day mean before the cutoff), predicting arrivals / level:
    ``core_hours`` is the conditional **mean** (Poisson loss: the arrivals are heavy-tailed, their hourly median
    is about half the mean, so hourly medians would fall far short of the daily total), ``median_core_hours`` the
    0.5 quantile and ``hourly_upper_core_hours`` the ``quantile`` quantile per hour (pinball loss). The feature
    set and tree settings are chosen among :data:`QR_CANDIDATES` by ``TimeSeriesSplit``. The daily band is made
    as the EWMA's: ``rel_error_quantile`` = the ``quantile`` of the out-of-sample relative errors of the daily
    totals in those folds, ``upper_core_hours`` = core_hours * (1 + q). Needs :data:`QR_MIN_HISTORY_H` hours of
    history; the target hours must be consecutive and end less than :data:`QR_MAX_LEAD_H` h after the history."""
    import sklearn.ensemble  # noqa: F401  (loads OpenMP before threadpool_limits looks for it)
    from threadpoolctl import threadpool_limits

    if not 0.5 <= quantile < 1:
        raise InputError("quantile", f"must be in [0.5, 1), got {quantile!r}")
    check_hourly_index(hours, "hours")
    if len(hours) == 0 or (np.asarray((hours[1:] - hours[:-1]) / HOUR, float) != 1).any():
        raise InputError("hours", "target hours must be consecutive hours (at least one)")
    check_hourly_index(history.index, "hour")
    values = _check_history(history)
    values = values[values.index < hours[0]]
    if len(values) < QR_MIN_HISTORY_H:
        raise InputError("flexible_arrived_core_hours", f"{len(values)} hours of arrival history before "
                                                         f"{hours[0]:%Y-%m-%d %H:%M}Z, need {QR_MIN_HISTORY_H}")
    end_time = values.index[-1] + HOUR
    if hours[-1] - end_time >= pd.Timedelta(hours=QR_MAX_LEAD_H):
        raise InputError("hours", f"the last target hour is {QR_MAX_LEAD_H} h or more after the history")
    grid = pd.date_range(values.index[0], hours[-1], freq="h")
    end, first_target = int(grid.searchsorted(end_time)), int(grid.searchsorted(hours[0]))
    arrivals = np.concatenate([values.reindex(grid[:end]).to_numpy(float), np.full(len(grid) - end, np.nan)])
    cutoffs = plan_cutoff_positions(len(grid), first_target, first_target - end, end)
    x, level = qr_feature_frame(arrivals, grid, cutoffs)
    target_level = level[first_target]
    if not target_level > 0:  # no arrivals in the 28 days before: none forecast
        zeros = np.zeros(len(hours))
        return ArrivalForecast(hours, zeros, zeros, 0.0, method="qr")
    position = np.arange(len(grid))
    rows = np.flatnonzero((position >= QR_WARMUP_H) & (cutoffs >= QR_WARMUP_H) & (position < end)
                          & ~np.isnan(arrivals) & (level > 0))
    ratio, blocks = arrivals[rows] / level[rows], np.floor_divide(rows - first_target, 24)
    with threadpool_limits(limits=1, user_api="openmp"):  # ~1.4k rows: threads cost more than they give
        name, errors = select_qr_candidate(x.iloc[rows], ratio, level[rows], blocks)
        features, params = QR_CANDIDATES[name]
        x_fit, x_target = x[list(features)].to_numpy()[rows], x[list(features)].to_numpy()[first_target:]
        central = _fit_predict("poisson", params, x_fit, ratio, x_target) * target_level
        median = _fit_predict("quantile", params, x_fit, ratio, x_target, 0.5) * target_level
        upper = _fit_predict("quantile", params, x_fit, ratio, x_target, quantile) * target_level
    q = max(float(np.quantile(errors, quantile, method="higher")), 0.0) if len(errors) >= 7 else 0.0
    return ArrivalForecast(hours, central, central * (1.0 + q), q, median_core_hours=median,
                           hourly_upper_core_hours=np.maximum(upper, np.maximum(median, central)), method="qr")
