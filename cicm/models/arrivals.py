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


def seasonal_ewma(history: pd.Series, hours: pd.DatetimeIndex, weeks: int = 4, alpha: float = 0.5) -> np.ndarray:
    """EWMA over weeks of the arrivals at the same hour of the week (168 h earlier, 336 h, ...). NaN where none."""
    values = _check_history(history)
    num = np.zeros(len(hours))
    den = np.zeros(len(hours))
    for k in range(1, weeks + 1):
        past = values.reindex(hours - k * WEEK).to_numpy(float)
        w = alpha * (1 - alpha) ** (k - 1)
        ok = ~np.isnan(past)
        num[ok] += w * past[ok]
        den[ok] += w
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def forecast_arrivals(history: pd.Series, hours: pd.DatetimeIndex, *, weeks: int = 4, alpha: float = 0.5,
                      quantile: float = 0.9, error_days: int = 28, method: str = "ewma") -> ArrivalForecast:
    """Forecast the arrivals in ``hours`` from the hourly history strictly before them (see the module doc).
    ``method``: "ewma" (the CICM baseline, default) or "qr" (:func:`forecast_arrivals_qr`, which ignores
    ``weeks``, ``alpha`` and ``error_days``)."""
    if method not in ARRIVAL_METHODS:
        raise InputError("method", f"must be one of {', '.join(ARRIVAL_METHODS)}, got {method!r}")
    if method == "qr":
        return forecast_arrivals_qr(history, hours, quantile=quantile)
    if not 0 < alpha <= 1:
        raise InputError("alpha", f"must be in (0, 1], got {alpha!r}")
    if not 0.5 <= quantile < 1:
        raise InputError("quantile", f"must be in [0.5, 1), got {quantile!r}")
    values = _check_history(history)
    values = values[values.index < hours[0]]
    central = seasonal_ewma(values, hours, weeks, alpha)
    if np.isnan(central).all():
        raise InputError("flexible_arrived_core_hours", f"no arrival history in the {weeks} weeks before "
                                                         f"{hours[0]:%Y-%m-%d %H:%M}Z")
    central = np.where(np.isnan(central), np.nanmean(central), central)
    # Backcast the last error_days whole days before the horizon with the same method, on data before each.
    end = hours[0].floor("D")
    past = pd.date_range(end - pd.Timedelta(days=error_days), end, freq="h", inclusive="left")
    q = 0.0
    if len(past):
        back = seasonal_ewma(values, past, weeks, alpha)
        frame = pd.DataFrame({"f": back, "a": values.reindex(past).to_numpy(float)}, index=past).dropna()
        daily = frame.groupby(frame.index.floor("D")).sum()
        daily = daily[daily["f"] > 0]
        if len(daily) >= 7:
            q = max(float(np.quantile(daily["a"] / daily["f"] - 1.0, quantile)), 0.0)
    return ArrivalForecast(hours, central, central * (1.0 + q), q)


def hourly_arrivals(arrival: pd.Series, core_hours: np.ndarray, hours: pd.DatetimeIndex) -> pd.Series:
    """Sum job core-hours into the hours they arrived in (UTC hourly index ``hours``)."""
    idx = pd.DatetimeIndex(arrival).floor("h")
    s = pd.Series(np.asarray(core_hours, float), index=idx).groupby(level=0).sum()
    return s.reindex(hours, fill_value=0.0)


# ---------------------------------------------------------------------------------------------------------------
# Quantile regression ("qr"): gradient-boosted trees on calendar and legal lag features.
#
# The training rows mimic the planning situation of the target: the target hours start ``gap_h`` hours after the
# last hour of history (6 h when planning at 18:00 local for the next local day), so every history hour t is put
# in a 24-hour block aligned with the target's first hour, and its "known at planning" features are read at that
# block's cutoff (block start - gap_h). Lags are 168 h and more, legal for any target less than a week ahead.

QR_FEATURES = ("hour_of_day_utc", "day_of_week_utc", "lag_168h", "lag_336h", "ewma_4w",
               "mean_24h_at_plan", "mean_7d_at_plan", "mean_28d_at_plan")
QR_MIN_HISTORY_H = 35 * 24  # five weeks: the first only feeds lags, three are validation folds
QR_MAX_LEAD_H = 168  # the last target hour must be less than a week after the end of the history
QR_SPLITS = 3  # TimeSeriesSplit folds for the hyper-parameter choice and the daily error band
QR_FOLD_H = 7 * 24  # each validation fold is one week
QR_CANDIDATES = (  # a few settings, chosen per call by rolling-origin Poisson deviance of the central model
    {"max_iter": 60, "learning_rate": 0.05, "max_depth": 3, "min_samples_leaf": 80},
    {"max_iter": 100, "learning_rate": 0.1, "max_depth": 3, "min_samples_leaf": 40},
)


def check_hourly_index(index: pd.DatetimeIndex, field: str = "hour") -> None:
    """InputError(field) unless ``index`` is tz-aware, on whole hours, increasing in steps of (at least) 1 h,
    with at least one step of exactly 1 h (so a daily or half-hourly index is refused)."""
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
    """:func:`seasonal_ewma` for every position of a gap-free hourly grid (NaN = missing)."""
    num = np.zeros(len(values))
    den = np.zeros(len(values))
    for k in range(1, weeks + 1):
        lag_h = 168 * k
        past = np.full(len(values), np.nan)
        past[lag_h:] = values[:-lag_h] if lag_h < len(values) else []
        w = alpha * (1 - alpha) ** (k - 1)
        ok = ~np.isnan(past)
        num[ok] += w * past[ok]
        den[ok] += w
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def trailing_mean_grid(values: np.ndarray, window_h: int) -> np.ndarray:
    """out[c] = mean of the known values in positions [c - window_h, c) (NaN if none); len(values) + 1 long, so
    that out[len(values)] is the mean of the last ``window_h`` hours."""
    known = ~np.isnan(values)
    total = np.concatenate([[0.0], np.cumsum(np.where(known, values, 0.0))])
    count = np.concatenate([[0], np.cumsum(known)])
    lo = np.maximum(np.arange(len(total)) - window_h, 0)
    n = count - count[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (total - total[lo]) / n, np.nan)


def plan_cutoff_positions(n_grid: int, first_target: int, gap_h: int, end: int) -> np.ndarray:
    """For every grid position t, the position of the planning cutoff its forecast would be made at: the start
    of its 24-hour block (blocks aligned with ``first_target``) minus ``gap_h``, never after ``end`` (the end of
    the history)."""
    t = np.arange(n_grid)
    block_start = first_target + np.floor_divide(t - first_target, 24) * 24
    return np.minimum(block_start - gap_h, end)


def qr_feature_matrix(values: np.ndarray, times: pd.DatetimeIndex, cutoffs: np.ndarray) -> np.ndarray:
    """The :data:`QR_FEATURES` of every position of the hourly grid ``times`` (UTC calendar). ``values`` are the
    arrivals on the grid, NaN where unknown (and from the end of the history on)."""
    n = len(values)
    lag = {}
    for lag_h in (168, 336):
        col = np.full(n, np.nan)
        if lag_h < n:
            col[lag_h:] = values[:-lag_h]
        lag[lag_h] = col
    at_plan = {w: trailing_mean_grid(values, w)[np.clip(cutoffs, 0, n)] for w in (24, 168, 672)}
    utc = times.tz_convert("UTC")
    return np.column_stack([utc.hour, utc.day_of_week, lag[168], lag[336], seasonal_ewma_grid(values),
                            at_plan[24], at_plan[168], at_plan[672]]).astype(float)


def _hgb(loss: str, params: dict, quantile: float | None = None):
    from sklearn.ensemble import HistGradientBoostingRegressor

    extra = {"quantile": quantile} if loss == "quantile" else {}
    return HistGradientBoostingRegressor(loss=loss, early_stopping=False, random_state=0, **params, **extra)


def _fit_predict(loss: str, params: dict, x_fit, y_fit, x_pred, quantile: float | None = None) -> np.ndarray:
    if loss == "poisson" and y_fit.sum() <= 0:
        return np.zeros(len(x_pred))  # nothing ever arrived in the training rows
    return np.clip(_hgb(loss, params, quantile).fit(x_fit, y_fit).predict(x_pred), 0.0, None)


def _poisson_deviance(actual: np.ndarray, forecast: np.ndarray) -> float:
    f = np.maximum(forecast, 1e-9 * max(float(actual.mean()), 1e-12))
    with np.errstate(divide="ignore", invalid="ignore"):
        term = np.where(actual > 0, actual * np.log(actual / f), 0.0)
    return float(np.mean(2 * (term - actual + f)))


def select_qr_params(x: np.ndarray, y: np.ndarray, blocks: np.ndarray) -> tuple[dict, np.ndarray]:
    """Rolling-origin choice among :data:`QR_CANDIDATES` (``TimeSeriesSplit``, :data:`QR_SPLITS` folds of one
    week) by the Poisson deviance of the central (mean) model. Returns the chosen settings and the out-of-sample
    relative errors of the daily totals (per 24-hour block fully inside a validation fold) it made."""
    from sklearn.model_selection import TimeSeriesSplit

    folds = list(TimeSeriesSplit(n_splits=QR_SPLITS, test_size=QR_FOLD_H).split(x))
    best, best_score, best_pred = QR_CANDIDATES[0], np.inf, None
    for params in QR_CANDIDATES:
        pred = np.full(len(y), np.nan)
        for fit_rows, test_rows in folds:
            pred[test_rows] = _fit_predict("poisson", params, x[fit_rows], y[fit_rows], x[test_rows])
        tested = ~np.isnan(pred)
        score = _poisson_deviance(y[tested], pred[tested])
        if score < best_score:
            best, best_score, best_pred = params, score, pred
    tested = ~np.isnan(best_pred)
    frame = pd.DataFrame({"block": blocks[tested], "a": y[tested], "f": best_pred[tested]})
    daily = frame.groupby("block").agg(a=("a", "sum"), f=("f", "sum"), n=("a", "size"))
    daily = daily[(daily["n"] == 24) & (daily["f"] > 0)]
    return best, (daily["a"] / daily["f"] - 1.0).to_numpy()


def forecast_arrivals_qr(history: pd.Series, hours: pd.DatetimeIndex, *, quantile: float = 0.9) -> ArrivalForecast:
    """Quantile-regression forecast of the arrivals in ``hours`` from the hourly history strictly before them.

    Three ``HistGradientBoostingRegressor`` on :data:`QR_FEATURES` (UTC hour of day and day of week; the same hour
    168 h and 336 h before; the 4-week seasonal EWMA; the means of the last 24 h, 7 d and 28 d before the planning
    cutoff): the central forecast (``core_hours``) is the conditional **mean** (Poisson loss; daily totals of
    hourly medians would fall far short, the arrivals being heavy-tailed), ``median_core_hours`` the 0.5 quantile
    and ``hourly_upper_core_hours`` the ``quantile`` quantile per hour (pinball loss). The daily band, as for the
    EWMA method: ``rel_error_quantile`` = the ``quantile`` of the out-of-sample relative errors of the daily totals
    in the rolling-origin folds, ``upper_core_hours`` = core_hours * (1 + q). Needs at least
    :data:`QR_MIN_HISTORY_H` hours of history; the targets must be hourly and less than
    :data:`QR_MAX_LEAD_H` hours after the end of the history."""
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
    end_time = values.index[-1] + pd.Timedelta(hours=1)
    if hours[-1] - end_time >= pd.Timedelta(hours=QR_MAX_LEAD_H):
        raise InputError("hours", f"the last target hour is {QR_MAX_LEAD_H} h or more after the history")
    grid = pd.date_range(values.index[0], hours[-1], freq="h")
    end = int(grid.searchsorted(end_time))
    first_target = int(grid.searchsorted(hours[0]))
    arrivals = values.reindex(grid[:end]).to_numpy(float)
    arrivals = np.concatenate([arrivals, np.full(len(grid) - end, np.nan)])
    cutoffs = plan_cutoff_positions(len(grid), first_target, first_target - end, end)
    x = qr_feature_matrix(arrivals, grid, cutoffs)
    rows = np.flatnonzero((np.arange(len(grid)) >= 168) & (np.arange(len(grid)) < end) & ~np.isnan(arrivals)
                          & (cutoffs >= 24))
    x_fit, y_fit, x_target = x[rows], arrivals[rows], x[first_target:]
    blocks = np.floor_divide(rows - first_target, 24)
    with threadpool_limits(limits=1, user_api="openmp"):  # 1.5k rows: threads cost more than they give
        params, daily_rel_errors = select_qr_params(x_fit, y_fit, blocks)
        central = _fit_predict("poisson", params, x_fit, y_fit, x_target)
        median = _fit_predict("quantile", params, x_fit, y_fit, x_target, 0.5)
        upper = _fit_predict("quantile", params, x_fit, y_fit, x_target, quantile)
    q = max(float(np.quantile(daily_rel_errors, quantile)), 0.0) if len(daily_rel_errors) >= 7 else 0.0
    return ArrivalForecast(hours, central, central * (1.0 + q), q, median_core_hours=median,
                           hourly_upper_core_hours=np.maximum(upper, np.maximum(median, central)), method="qr")
