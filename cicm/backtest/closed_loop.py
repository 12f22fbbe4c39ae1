"""What the closed-loop planners (``cicm-ceiling``, ``planner``) see at planning time, from the backtest itself.

The usage history with the backtest's own past hours as the policy shaped them, the forecast-value gate's score
of the zone's forecasts, and the project's SLO rule on the simulator's job-level evidence.
"""
from __future__ import annotations

import math
from datetime import date, timedelta
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cicm.backtest.segment import Segment
from cicm.backtest.sim import ClusterSim, Tasks

if TYPE_CHECKING:
    from cicm.backtest.runner import BacktestOptions
    from cicm.models.carbon_skill import ForecastValue
    from cicm.planning.stages import CampusDay

_H = pd.Timedelta(hours=1)


def forecast_value_at(seg: Segment, cd: CampusDay, options: BacktestOptions) -> ForecastValue | None:
    """As the nightly plan measures it: following the zone's day-ahead forecasts over the 28 days before
    planning, scored on the actual intensity (the vintages a running planner would have stored)."""
    key = ("forecast_value", cd.planned_at, options.seed, options.delta_max)
    if key not in seg.memo:  # the same for every policy that plans this day
        seg.memo[key] = _forecast_value_at(seg, cd, options)
    return seg.memo[key]


def _forecast_value_at(seg: Segment, cd: CampusDay, options: BacktestOptions) -> ForecastValue | None:
    from cicm.planning.stages import FORECAST_VALUE_WINDOW_DAYS
    from cicm.models.carbon_skill import forecast_value

    zc = seg.zone_carbon
    end = cd.planned_at.floor("D")
    start = max(end - pd.Timedelta(days=FORECAST_VALUE_WINDOW_DAYS), zc.first_hour.ceil("D"))
    if end <= start:
        return None
    forecasts = zc.forecast_history(start, end, options.seed)
    actual = zc.filled[(zc.filled.index >= start) & (zc.filled.index < end)].dropna()
    return forecast_value(forecasts, actual, seg.campus.timezone, options.delta_max)


_EPOCH = date(1970, 1, 1)


def local_day_numbers(arrival: pd.Series | pd.DatetimeIndex, tz: str) -> np.ndarray:
    """The local calendar day of each UTC moment, as int64 days since 1970-01-01 (no Timestamp objects)."""
    local = pd.DatetimeIndex(arrival).tz_convert(tz).tz_localize(None)
    return local.to_numpy().astype("datetime64[D]").astype(np.int64)


def day_number(d: date) -> int:
    """``d`` as days since 1970-01-01 (the numbering of :func:`local_day_numbers`)."""
    return (d - _EPOCH).days


def day_from_number(k: int) -> date:
    return _EPOCH + timedelta(days=int(k))


def task_local_days(tasks: Tasks, tz: str) -> np.ndarray:
    """The local calendar day each task's job arrived on (the cluster-day it belongs to), as day numbers
    (:func:`day_number`)."""
    return local_day_numbers(tasks.jobs["arrival"], tz)[tasks.job]


def slo_feedback(seg: Segment, sim: ClusterSim, name: str, task_days: np.ndarray, plan_day: date, since: date,
                 thetas: dict[tuple[str, date], float]) -> str | None:
    """The project's SLO rule (:func:`cicm.planning.slo.feedback_decision`) on the backtest's own evidence.

    As ``slo_stage`` does: only days whose every deadline has passed by planning time are checked (the newest is
    plan_day - 3), the last 7 of them, none before an earlier switch-off. A day **violates** when one of its jobs
    finished late or not at all (job level, from the simulator, where ``slo_stage`` uses a fluid queue); it came
    **close** when its reservations reached 95% of the plan's Theta.
    """
    from cicm.planning.slo import CLOSE_FRACTION, feedback_decision

    newest = plan_day - timedelta(days=3)
    days = [x for x in seg.days if max(since, plan_day - timedelta(days=9)) <= x <= newest][-7:]
    if not days:
        return None
    rows = []
    for x in days:
        k = seg.days.index(x)
        mine = np.flatnonzero(task_days == day_number(x))
        fin = sim.finish[mine]
        violated = bool((np.isnan(fin) | (fin > sim.deadline[mine] + 1e-6)).any())
        idx = np.flatnonzero(seg.day_of_hour == k)
        reserved = float(((seg.inflexible[name][idx] + sim.usage[idx]) * seg.ratio[name][idx]).sum())
        theta = thetas.get((name, x), np.nan)
        rows.append({"day": x, "violated": violated,
                     "close": bool(np.isfinite(theta) and reserved >= CLOSE_FRACTION * theta)})
    return feedback_decision(pd.DataFrame(rows), plan_day)


def closed_loop_history(base: pd.DataFrame, seg: Segment, sim: ClusterSim, name: str, now: pd.Timestamp,
                        days: int) -> pd.DataFrame:
    """Usage history as the planner sees it at ``now``: the demo telemetry before the backtest, then the
    backtest's own simulated hours (inflexible as measured, flexible as shaped, reservations = usage x R)."""
    start = now - pd.Timedelta(days=days)
    before = base[(base.index >= start) & (base.index < min(now, seg.t0))][
        ["inflexible_cpu_cores", "flexible_cpu_cores", "reserved_cpu_cores"]]
    n_sim = int(max(0, math.floor((now - seg.t0) / _H)))
    if n_sim == 0:
        return before.rename_axis("hour")
    infl = seg.inflexible[name][:n_sim]
    flex = sim.usage[:n_sim]
    sim_frame = pd.DataFrame({"inflexible_cpu_cores": infl, "flexible_cpu_cores": flex,
                              "reserved_cpu_cores": (infl + flex) * seg.ratio[name][:n_sim]},
                             index=seg.hours[:n_sim])
    return pd.concat([before, sim_frame]).rename_axis("hour")

