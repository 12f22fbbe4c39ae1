"""The SLO check one cluster at a time: the plain reference the fleet check (cicm.planning.slo.check_fleet_days,
vectorised over clusters) must equal row for row. Test oracle only; production keeps the fleet path."""
from __future__ import annotations

from collections import deque
from datetime import date, timedelta

import numpy as np
import pandas as pd

from cicm.planning.slo import CLOSE_FRACTION, DEADLINE_HOURS, EVENT_COLUMNS
from cicm.store import slo as slo_store
from cicm.timeutil import local_day_hours_utc


def fluid_served(arrivals: np.ndarray, room: np.ndarray, deadline_hours: int = DEADLINE_HOURS) -> np.ndarray:
    """Core-hours of each hour's arrivals served within ``deadline_hours`` (FIFO fluid queue, 1-hour steps).

    Arrivals of hour t may run in hours t .. t + deadline_hours - 1; what is left then is dropped.
    """
    a = np.asarray(arrivals, dtype=float)
    r = np.asarray(room, dtype=float)
    if a.shape != r.shape:
        raise ValueError("arrivals and room must have the same length")
    if np.isnan(a).any() or (a < 0).any():
        raise ValueError("arrivals must be numbers >= 0")
    served = np.zeros_like(a)
    queue: deque[list] = deque()
    for t in range(len(a)):
        if a[t] > 0:
            queue.append([t, a[t]])
        while queue and queue[0][0] + deadline_hours <= t:
            queue.popleft()  # missed its deadline
        left = max(float(r[t]), 0.0) if np.isfinite(r[t]) else 0.0
        while left > 0 and queue:
            take = min(left, queue[0][1])
            served[queue[0][0]] += take
            queue[0][1] -= take
            left -= take
            if queue[0][1] <= 1e-12:
                queue.popleft()
    return served


def _plan_hours(store, cluster: str, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    return slo_store.cluster_plan_hours(store, cluster, start, end)


def check_cluster_days(store, cluster, tz: str, days: list[date], cutoff: pd.Timestamp, *,
                       deadline_hours: int = DEADLINE_HOURS, close_fraction: float = CLOSE_FRACTION) -> pd.DataFrame:
    """slo_events rows for the days of ``days`` that have a plan and complete evidence before ``cutoff``."""
    if not days:
        return pd.DataFrame(columns=EVENT_COLUMNS)
    first, last = min(days), max(days)
    start = local_day_hours_utc(first - timedelta(days=1), tz)[0]
    end = local_day_hours_utc(last + timedelta(days=1), tz)[-1] + pd.Timedelta(hours=1)
    end = min(end, cutoff.floor("h"))
    grid = pd.date_range(start, end, freq="h", inclusive="left", name="hour")
    usage = slo_store.cluster_usage(store, cluster.name, start, end).set_index("hour").reindex(grid)
    plans = _plan_hours(store, cluster.name, start, end).set_index("hour").reindex(grid)
    capacity = float(cluster.capacity_cores)
    infl = usage["inflexible_cpu_cores"].to_numpy(float)
    total = (usage["inflexible_cpu_cores"] + usage["flexible_cpu_cores"]).to_numpy(float)
    reserved = usage["reserved_cpu_cores"].to_numpy(float)
    measured_r = np.where(total > 0, reserved / np.where(total > 0, total, 1), np.nan)
    ratio = plans["reservation_ratio"].to_numpy(float)
    ratio = np.where(np.isfinite(ratio) & (ratio > 0), ratio,
                     np.where(np.isfinite(measured_r) & (measured_r > 0), measured_r, cluster.reservation_ratio))
    shaped = (plans["status"] == "shaped").to_numpy() & np.isfinite(plans["vcc_cores"].to_numpy(float))
    cap_usage = np.where(shaped, np.minimum(plans["vcc_cores"].to_numpy(float) / ratio, capacity), capacity)
    room = np.maximum(cap_usage - np.nan_to_num(infl, nan=capacity), 0.0)
    arrivals = np.nan_to_num(usage["flexible_arrived_core_hours"].to_numpy(float), nan=0.0)
    served = fluid_served(arrivals, room, deadline_hours)

    status = slo_store.cluster_plan_status(store, cluster.name, first, last)
    status["plan_date"] = pd.to_datetime(status["plan_date"]).dt.date
    status = status.set_index("plan_date")
    rows = []
    have = usage["inflexible_cpu_cores"].notna()
    for day in sorted(days):
        if day not in status.index:
            continue  # no plan: nothing to check
        hours = local_day_hours_utc(day, tz)
        deadline_end = hours[-1] + pd.Timedelta(hours=deadline_hours)
        if deadline_end > cutoff or not have.reindex(hours, fill_value=False).all():
            continue  # evidence not complete yet
        window = grid.get_indexer(hours)
        if (window < 0).any() or not have.iloc[window[-1]: window[-1] + deadline_hours].all():
            continue
        demand = float(arrivals[window].sum())
        got = float(served[window].sum())
        theta = status.loc[day, "theta_core_hours"]
        theta = float(theta) if theta is not None and np.isfinite(theta) else np.nan
        reserved = float(usage["reserved_cpu_cores"].iloc[window].sum())
        rows.append({
            "cluster": cluster.name, "day": day, "demand_core_hours": demand, "served_core_hours": got,
            "theta_core_hours": theta, "violated": bool(got < demand - 1e-6 * max(demand, 1.0)),
            "close": bool(np.isfinite(theta) and reserved >= close_fraction * theta),
        })
    return pd.DataFrame(rows, columns=EVENT_COLUMNS)
