"""The engine: the batched day-ahead load forecast the nightly plan uses (`forecast_load_batch`).

Rows of many clusters of one campus are checked at once (a cluster that fails a check gets the `InputError` that
`prepare_history` words for its rows alone), gathered into day matrices (complete local days × local hour of
day, DST holes filled), grouped by their complete days and forecast in chunks by the series model
(`cicm.models.load.series`). `forecast_load` is the same engine with one cluster.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cicm.errors import InputError
from cicm.models.load.history import (
    HISTORY_COLUMNS,
    Request,
    check_request,
    factorize_clusters,
    numeric_values,
    one_cluster_frame,
    prepare_history,
    utc_ns,
)
from cicm.models.load.result import LoadForecast, insufficient
from cicm.models.load.series import (
    ALPHA_GRID,
    BETA_GRID,
    RESERVATIONS_QUANTILE,
    SELECT_RESERVATIONS_MODEL,
    forecast_series,
    quantiles,
)
from cicm.timeutil import local_dates, local_day_lengths

_NS_PER_HOUR = 3_600_000_000_000
# clusters per engine call: bounds the memory of the week-ahead grid (G × clusters × 7 days × 24 per step)
CHUNK_CLUSTERS = 128


def _forecast_rows(
    codes: np.ndarray, n_clusters: int, hour_ns: np.ndarray, values: np.ndarray, rows_of, req: Request
) -> list:
    """The forecast (or InputError) of every cluster 0 ... n_clusters-1 from its rows: codes (N,) cluster,
    hour_ns (N,) UTC hour start in ns, values (3, N) of HISTORY_COLUMNS (NaN: missing or non-numeric).
    rows_of(c) gives cluster c's original rows, only read to word the error of a cluster that fails a check
    (`prepare_history` raises it, as for one cluster alone)."""
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

    # the checks of `prepare_history`, for every cluster at once
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
            prepare_history(rows_of(c), req.now, req.max_history_days)
        except InputError as exc:
            results[c] = exc
        else:  # pragma: no cover - the checks above are those of prepare_history
            raise AssertionError(f"cluster {c} failed a check that prepare_history passes")

    counts = np.bincount(codes, minlength=n_clusters)
    first_row = np.r_[0, np.cumsum(counts)[:-1]]
    good = np.flatnonzero(~bad & (counts > 0))
    empty = np.flatnonzero(~bad & (counts == 0))
    for c in empty:
        results[c] = insufficient(
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
    hod = grid.tz_convert(req.tz).hour.to_numpy()
    dates, date_of_hour = np.unique(local_dates(grid, req.tz).to_numpy(), return_inverse=True)
    dates = pd.DatetimeIndex(dates)
    first_hour = np.searchsorted(date_of_hour, np.arange(len(dates)), side="left")
    last_hour = np.searchsorted(date_of_hour, np.arange(len(dates)), side="right") - 1
    full = (last_hour - first_hour + 1) == local_day_lengths(dates, req.tz)
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
                results[c] = insufficient(
                    f"{n} complete local days of history before {req.now}; need {req.min_history_days}",
                    req.hours, req.now, req.gamma, dict(params),
                )
            continue
        first_date, last_date = int(key // len(dates)), int(key % len(dates))
        lag = int((req.target_date - dates[last_date]).days)
        params["lag_days"] = lag
        if not 1 <= lag <= 7:
            for c in members:
                results[c] = insufficient(
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
            # DST: a missing local hour, interpolated from its neighbours (`fill_row_gaps`)
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


def _forecast_chunk(hourly: np.ndarray, daily: np.ndarray, lag: int, req: Request, params: dict) -> list:
    """The model for clusters with the same complete days: hourly (3, C, n, 24) and daily (3, C, n) means
    of HISTORY_COLUMNS. Returns a LoadForecast per cluster."""
    C, n = daily.shape[1:]
    fit = lambda X, select: forecast_series(  # noqa: E731
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
    q_uppers = quantiles(inflexible.rel_errors, 1 - gamma)
    q97s = quantiles(reserved.rel_errors, RESERVATIONS_QUANTILE)
    # the target day's hourly figures of every cluster at once (rows are views: no per-cluster pandas objects)
    inflexible_cores = inflexible.target[:, target_hod]
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio_by_hod = reserved_by_hod / usage_by_hod
    ratios = ratio_by_hod[:, target_hod]
    out = []
    for c in range(C):
        p = dict(params, inflexible=inflexible.params[c], flexible=flexible.params[c],
                 reservations=reserved.params[c])
        if (np.isnan(inflexible.target[c]).any() or np.isnan(flexible.target[c]).any()
                or np.isnan(reserved.target[c]).any()):
            out.append(insufficient("not enough days to fit the day-ahead adjustment", hours, now, gamma, p))
            continue
        inflexible_errors, reserved_errors = inflexible.rel_errors[c], reserved.rel_errors[c]
        if len(inflexible_errors) == 0 or len(reserved_errors) == 0:
            out.append(insufficient("no backtest errors to estimate the uncertainty from", hours, now, gamma, p))
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
            out.append(insufficient(
                f"zero CPU usage at some local hour over the last {req.ratio_days} days; R(h) undefined",
                hours, now, gamma, p,
            ))
            continue
        flexible_core_hours = float(flexible.target[c, 0] * n_hours)
        reservations_core_hours = float(reserved.target[c, 0] * n_hours)
        out.append(LoadForecast(
            status="ok",
            reason=None,
            target_hours=hours,
            issued_at=now,
            gamma=gamma,
            inflexible_values=inflexible_cores[c],
            inflexible_upper_values=inflexible_cores[c] * (1 + q_upper),
            flexible_core_hours=flexible_core_hours,
            reservations_core_hours=reservations_core_hours,
            ratio_values=ratios[c],
            reservations_rel_error_q97=q97,
            theta_core_hours=reservations_core_hours * (1 + q97),
            inflexible_rel_error_upper=q_upper,
            parameters=p,
        ))
    return out


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
    req = check_request(target_hours, tz, gamma, now, min_history_days, max_history_days, error_window_days,
                        adjust_window_days, ratio_days, alpha_grid, beta_grid)
    frame = one_cluster_frame(history)
    result = _forecast_rows(np.zeros(len(frame), dtype=np.intp), 1, utc_ns(frame.index, "hour"),
                            numeric_values(frame), lambda c: history, req)[0]
    if isinstance(result, InputError):
        raise result
    return result


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
    req = check_request(target_hours, tz, gamma, now, min_history_days, max_history_days, error_window_days,
                        adjust_window_days, ratio_days, alpha_grid, beta_grid)
    if not isinstance(history, pd.DataFrame):
        raise InputError("history", "must be a pandas DataFrame")
    for column in ("cluster", "hour", *HISTORY_COLUMNS):
        if column not in history.columns:
            raise InputError(column, "column missing from history")
    try:
        hour_ns = utc_ns(history["hour"], "hour")
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError("hour", f"not timestamps: {exc}") from exc
    codes, names = factorize_clusters(history["cluster"])
    if (codes < 0).any():
        raise InputError("cluster", "missing cluster names")
    positions = None

    def rows_of(c: int) -> pd.DataFrame:
        nonlocal positions
        if positions is None:
            positions = pd.Series(np.arange(len(codes))).groupby(codes).indices
        return history.iloc[positions[c]]

    results = _forecast_rows(codes.astype(np.intp, copy=False), len(names), hour_ns, numeric_values(history),
                             rows_of, req)
    return dict(zip(names.tolist(), results))


def forecast_load_arrays(
    codes: np.ndarray,
    names: list[str],
    hour_ns: np.ndarray,
    values: np.ndarray,
    target_hours: pd.DatetimeIndex,
    tz: str,
    gamma: float,
    now: pd.Timestamp,
    **options,
) -> dict[str, LoadForecast | InputError]:
    """`forecast_load_batch` on columns instead of a frame (what the nightly plan's partition reads give):
    codes (N,) each row's cluster as an index into `names`, hour_ns (N,) its UTC hour start in ns, values (3, N)
    its HISTORY_COLUMNS. Rows may come in any order (ordered by cluster and hour is the fast path). Returns, for
    every name (in order), its LoadForecast or the InputError `forecast_load` would raise on its rows alone (a
    name without rows: its insufficient-history forecast). The options are `forecast_load_batch`'s."""
    opts = {"min_history_days": 28, "max_history_days": 182, "error_window_days": 90, "adjust_window_days": 90,
            "ratio_days": 28, "alpha_grid": ALPHA_GRID, "beta_grid": BETA_GRID, **options}
    req = check_request(target_hours, tz, gamma, now, opts["min_history_days"], opts["max_history_days"],
                        opts["error_window_days"], opts["adjust_window_days"], opts["ratio_days"], opts["alpha_grid"],
                        opts["beta_grid"])
    codes = np.asarray(codes, dtype=np.intp)
    values = np.asarray(values, dtype=float)
    if values.shape != (3, len(codes)) or len(hour_ns) != len(codes):
        raise InputError("history", f"need values (3, {len(codes)}) and {len(codes)} hours, got {values.shape} "
                                    f"and {len(hour_ns)}")
    if len(codes) and (codes.min() < 0 or codes.max() >= len(names)):
        raise InputError("cluster", "row codes outside the names")

    def rows_of(c: int) -> pd.DataFrame:  # only to word the error of a cluster that fails a check
        rows = np.flatnonzero(codes == c)
        return pd.DataFrame({"hour": pd.DatetimeIndex(np.asarray(hour_ns)[rows].astype("datetime64[ns]"), tz="UTC"),
                             **{col: values[i, rows] for i, col in enumerate(HISTORY_COLUMNS)}})

    results = _forecast_rows(codes, len(names), np.asarray(hour_ns, dtype=np.int64), values, rows_of, req)
    return dict(zip(names, results))
