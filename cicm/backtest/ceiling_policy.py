"""The ``cicm-ceiling`` policy's run: the CICM ceiling program (the paper's), closed loop. No Prefect, no DuckDB.

At 18:00 local on the eve of each day it plans from data before that moment only (the carbon forecast, the load
forecaster and power model refit on the closed-loop history, the SLO feedback loop and the forecast-value gate);
the simulator advances between plans, and a shaped day's VCC becomes the flexible cap of its hours.
"""
from __future__ import annotations

import math
from datetime import date, timedelta
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np
import pandas as pd

from cicm.backtest.closed_loop import closed_loop_history, forecast_value_at, slo_feedback, task_local_days
from cicm.backtest.segment import ClusterData, PolicyRun, Segment, hour_slots, vcc_to_cap
from cicm.backtest.sim import ClusterSim, job_outcomes

if TYPE_CHECKING:
    from cicm.backtest.runner import BacktestOptions
    from cicm.models.load import LoadForecast
    from cicm.planning.stages import CampusDay

_H = pd.Timedelta(hours=1)


def run_ceiling(seg: Segment, campus_days: list[CampusDay], options: BacktestOptions,
                data: Mapping[str, ClusterData], policy: str, tick: Callable[[], None]) -> pd.DataFrame:
    """The CICM ceiling program, day by day, on the closed-loop history; the simulator advances between plans.
    Stores each cluster's run as ``policy``'s; returns per cluster-day rows (``ceiling_status`` and the plan)."""
    from cicm.demo.telemetry import cluster_power_telemetry
    from cicm.planning import stages
    from cicm.optimize.program import plan_campus

    campus = seg.campus
    n_h = len(seg.hours)
    sims = {c.name: ClusterSim(seg.tasks[c.name], seg.inflexible[c.name], c.capacity_cores)
            for c in campus.clusters}
    vccs = {c.name: np.full(n_h, np.nan) for c in campus.clusters}
    base = {c.name: data[c.name].usage.set_index("hour") for c in campus.clusters}
    since: dict[str, date] = {c.name: seg.days[0] for c in campus.clusters}  # days before an earlier switch-off
    thetas: dict[tuple[str, date], float] = {}  # the plan's capacity requirement per (cluster, day)
    task_days = {c.name: task_local_days(seg.tasks[c.name], campus.timezone) for c in campus.clusters}
    off_until: dict[str, date] = {}
    off_reason: dict[str, str] = {}
    rows = []
    for cd, d in zip(campus_days, seg.days):
        now_slot = int(math.floor((cd.planned_at - seg.t0) / _H))
        for sim in sims.values():
            sim.advance(max(now_slot, 0))
        inputs, fallbacks = [], {}
        low_benefit = stages.low_benefit_reason(forecast_value_at(seg, cd, options), options.min_forecast_value_pct)
        for c in campus.clusters:
            sim = sims[c.name]
            history = closed_loop_history(base[c.name], seg, sim, c.name, cd.planned_at,
                                          stages.LOAD_HISTORY_DAYS)
            # SLO feedback: a job past its deadline and unfinished, or finished late, by planning time.
            if options.slo_feedback and not (c.name in off_until and d <= off_until[c.name]):
                reason = slo_feedback(seg, sim, c.name, task_days[c.name], d, since[c.name], thetas)
                if reason:
                    off_until[c.name] = d + timedelta(days=options.slo_off_days - 1)
                    off_reason[c.name] = reason
                    since[c.name] = d
            preset = off_reason[c.name] if c.name in off_until and d <= off_until[c.name] else None
            preset = preset or low_benefit
            window = history[history.index >= cd.planned_at - pd.Timedelta(days=stages.POWER_WINDOW_DAYS + 1)]
            telemetry = cluster_power_telemetry(c, window.reset_index(), options.seed)
            models = stages.cluster_models_from_frames(c, telemetry, history.reset_index(), cd, options.gamma)
            load = models.load
            ok = load if load is not None and load.ok else None
            row = {"day": d, "cluster": c.name, "q97": ok.reservations_rel_error_q97 if ok is not None else np.nan,
                   "forecast_flexible_core_hours": ok.flexible_core_hours if ok is not None else np.nan}
            problem = models.load_problem or models.power_problem
            if problem or models.power_curve is None:
                fallbacks[c.name] = problem or "no-power-model"
                rows.append({**row, "ceiling_status": "fallback", "ceiling_reason": fallbacks[c.name]})
                continue
            inputs.append(stages.cluster_input(c, models, preset))
            rows.append(row)
        status = {}
        if inputs:
            carbon = seg.forecast[hour_slots(seg.hours, cd.hours)]
            plan = plan_campus(stages.campus_input(campus, inputs, carbon, cd.hours, options))
            for r in plan.clusters.itertuples():
                status[r.cluster] = (r.status, r.reason, r.flexible_saving_pct, r.tau_core_hours)
                thetas[(r.cluster, d)] = float(r.theta_core_hours)
            idx = hour_slots(seg.hours, cd.hours)
            for c in campus.clusters:
                if c.name not in status:
                    continue
                h = plan.hourly[plan.hourly["cluster"] == c.name]
                vcc = h["vcc_cores"].to_numpy(float)
                if status[c.name][0] == "shaped":
                    vccs[c.name][idx] = vcc
                    sims[c.name].set_cap(idx[0], vcc_to_cap(vcc, seg.ratio[c.name][idx],
                                                            seg.inflexible[c.name][idx]))
        for row in rows[-len(campus.clusters):]:
            if row["cluster"] in status:
                st, reason, saving, tau = status[row["cluster"]]
                row.update({"ceiling_status": st, "ceiling_reason": reason, "planned_flexible_saving_pct": saving,
                            "tau_core_hours": tau})
        tick()
    _store_runs(seg, policy, sims, vccs)
    return pd.DataFrame(rows)


def _store_runs(seg: Segment, policy: str, sims: Mapping[str, ClusterSim], vccs: Mapping[str, np.ndarray]) -> None:
    """Run every cluster's simulator to the end of the drain and store its run as ``policy``'s."""
    for c in seg.campus.clusters:
        sims[c.name].advance(len(seg.hours))
        res = sims[c.name].result()
        cap = sims[c.name].cap.copy()
        seg.runs[(policy, c.name)] = PolicyRun(policy, c.name, res, job_outcomes(seg.tasks[c.name], res), cap,
                                               vccs[c.name])
