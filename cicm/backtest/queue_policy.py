"""The queue-aware planner (and its perfect-foresight oracle) in the closed-loop backtest. No Prefect, no DuckDB.

Every local day, at the nightly planning time (18:00 the evening before), the planner makes the day's **plan of
record** with :func:`cicm.optimize.queue.plan_queue` over ``horizon_hours`` from planning time: the measured
backlog (the simulator's queue, each task with its remaining work, width and deadline), forecast hourly arrivals
(:func:`cicm.models.arrivals.forecast_arrivals`), the room left by the inflexible upper quantile, the fitted power
curve and the carbon forecast. Only the day's hours are committed; the VCC's flexible part is the planned service
plus the risk margin (the upper-quantile arrivals' extra work, released in the hours the plan already releases).

**Hourly correction.** At the start of every hour the same program is solved again from the live backlog, with
the plan of record as a priced ceiling: the admission cap of the hour is the re-planned service, which exceeds the
plan only where a deadline needs it (each such hour is a stored deviation with its reason). The simulator's
deadline guard is on: a task that would otherwise miss its deadline runs anyway (within the machines).

The **oracle** is the same program and the same correction with perfect foresight: actual carbon, every job's
actual arrival, width and deadline, actual inflexible usage and the true power curve.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING, Callable, Mapping, cast

import numpy as np
import pandas as pd

from cicm.backtest.closed_loop import closed_loop_history, forecast_value_at, slo_feedback, task_local_days
from cicm.backtest.segment import ClusterData, PolicyRun, Segment, hour_slots
from cicm.backtest.sim import ClusterSim, job_outcomes
from cicm.errors import InputError
from cicm.models.arrivals import forecast_arrivals, hourly_arrivals, seasonal_ewma
from cicm.optimize.queue import QueueCampus, QueueCluster, arrival_bounds, correction_cap, plan_queue, risk_margin, \
    task_bounds

if TYPE_CHECKING:
    from cicm.backtest.runner import BacktestOptions
    from cicm.models.load import LoadForecast
    from cicm.optimize.inputs import PowerCurve
    from cicm.planning.stages import CampusDay

_H = pd.Timedelta(hours=1)


@dataclass
class _Cluster:
    name: str
    capacity: float
    sim: ClusterSim
    arrivals_hist: pd.Series  # hourly arrived core-hours over the whole demo history (UTC)
    arrivals_fc: np.ndarray  # seasonal EWMA per simulated hour (uses only data >= 1 week older)
    inflexible_fc: np.ndarray  # per simulated hour: the planner's inflexible forecast
    inflexible_up: np.ndarray
    curve: PowerCurve | None  # the curve the program plans with (None: no power model yet)
    record: np.ndarray  # plan of record: flexible usage cap per simulated hour (NaN = no plan: unshaped)
    replan: np.ndarray  # re-planned service per simulated hour (the cap applied)
    q_arrivals: float = 0.0
    fallback: str | None = None


def run_queue_policy(seg: Segment, campus_days: list[CampusDay], options: BacktestOptions,
                     data: Mapping[str, ClusterData], policy: str, perfect_foresight: bool,
                     tick: Callable[[], None] | None = None) -> pd.DataFrame:
    """Simulate the queue-aware planner over the segment, with ``perfect_foresight`` the oracle; store its
    PolicyRun as ``policy``'s; return per cluster-day rows (``{policy}_status``, ``{policy}_reason``, planned
    figures, intraday deviations)."""
    from cicm.demo.telemetry import cluster_power_telemetry
    from cicm.planning import stages

    oracle = perfect_foresight
    campus = seg.campus
    n_h = len(seg.hours)

    def carbon_plan(issued_at: pd.Timestamp, hz: np.ndarray) -> np.ndarray:
        """The carbon a solve at ``issued_at`` plans with: the forecast then known (the actual for the oracle)."""
        return seg.carbon[hz] if oracle else seg.forecaster.at(issued_at, hz)

    clusters = _clusters(seg, options, data, oracle)
    task_days = {c.name: task_local_days(seg.tasks[c.name], campus.timezone) for c in campus.clusters}
    base = {c.name: data[c.name].usage.set_index("hour") for c in campus.clusters}
    since = {c.name: seg.days[0] for c in campus.clusters}
    off_until: dict[str, date] = {}
    off_reason: dict[str, str] = {}
    thetas: dict[tuple[str, date], float] = {}
    rows = []
    plan_slots = [max(int(math.floor((cd.planned_at - seg.t0) / _H)), 0) for cd in campus_days]
    day_of_hour = seg.day_of_hour
    window_hours = int((day_of_hour >= 0).sum())
    next_day = 0
    for t in range(n_h):
        # The nightly plan of every day whose planning time has come.
        while next_day < len(campus_days) and plan_slots[next_day] <= t:
            cd, d = campus_days[next_day], seg.days[next_day]
            for cl in clusters.values():
                cl.sim.advance(t)
            low_benefit = None if oracle else stages.low_benefit_reason(
                forecast_value_at(seg, cd, options), options.min_forecast_value_pct)
            for c in campus.clusters:
                cl = clusters[c.name]
                row = {"day": d, "cluster": c.name}
                cl.fallback = low_benefit
                if options.slo_feedback and not oracle:
                    if not (c.name in off_until and d <= off_until[c.name]):
                        reason = slo_feedback(seg, cl.sim, c.name, task_days[c.name], d, since[c.name], thetas)
                        if reason:
                            off_until[c.name] = d + timedelta(days=options.slo_off_days - 1)
                            off_reason[c.name], since[c.name] = reason, d
                    if c.name in off_until and d <= off_until[c.name]:
                        cl.fallback = off_reason[c.name]
                if not oracle:
                    history = closed_loop_history(base[c.name], seg, cl.sim, c.name, cd.planned_at,
                                                  stages.LOAD_HISTORY_DAYS)
                    window = history[history.index >= cd.planned_at - pd.Timedelta(days=stages.POWER_WINDOW_DAYS + 1)]
                    telemetry = cluster_power_telemetry(c, window.reset_index(), options.seed)
                    models = stages.cluster_models_from_frames(c, telemetry, history.reset_index(), cd, options.gamma)
                    problem = models.load_problem or models.power_problem
                    if problem or models.power_curve is None:
                        cl.fallback = problem or "no-power-model"
                    else:
                        # without a problem the load forecast is an "ok" one
                        cl.curve = models.power_curve
                        load = cast("LoadForecast", models.load)
                        idx = hour_slots(seg.hours, cd.hours)
                        cl.inflexible_fc[idx] = load.inflexible_cpu_cores.to_numpy()
                        cl.inflexible_up[idx] = load.inflexible_upper_cpu_cores.to_numpy()
                        assert load.theta_core_hours is not None  # set on an "ok" forecast
                        thetas[(c.name, d)] = float(load.theta_core_hours)
                    past = cl.arrivals_hist[cl.arrivals_hist.index < cd.planned_at.floor("h")]
                    try:
                        fc = forecast_arrivals(past.iloc[-24 * 63:], cd.hours, quantile=options.arrival_quantile)
                        cl.q_arrivals = fc.rel_error_quantile
                    except InputError as exc:  # bad or missing arrival history: a visible fallback
                        cl.fallback = cl.fallback or f"bad-history: {exc}"
                row.update({"planner_status": "fallback" if cl.fallback else "shaped",
                            "planner_reason": cl.fallback})
                rows.append(row)
            _plan_of_record(seg, clusters, cd, carbon_plan, options, oracle, t)
            next_day += 1
            if tick:
                tick()
        # The hour's correction from the live backlog (in the drain, after the last day, the window's work is
        # still planned, against the room alone).
        for cl in clusters.values():
            cl.sim.advance(t)
        _correct(seg, clusters, carbon_plan, options, oracle, t, drain=t >= window_hours)
    _store_runs(seg, policy, clusters)
    out = pd.DataFrame(rows)
    dev = _deviations(seg, clusters)
    if len(out) and len(dev):
        out = out.merge(dev, on=["day", "cluster"], how="left")
    return out.rename(columns={"planner_status": f"{policy}_status", "planner_reason": f"{policy}_reason"})


def _clusters(seg: Segment, options: BacktestOptions, data: Mapping[str, ClusterData],
              oracle: bool) -> dict[str, _Cluster]:
    """Each cluster's simulator (with the deadline guard), arrivals and inflexible forecasts before any plan."""
    n_h = len(seg.hours)
    clusters: dict[str, _Cluster] = {}
    for c in seg.campus.clusters:
        inputs = data[c.name]
        hist_hours = pd.date_range(inputs.usage["hour"].iloc[0], seg.hours[-1] + _H, freq="h", inclusive="left")
        arr = hourly_arrivals(inputs.jobs["arrival"],
                              (inputs.jobs["length_hours"] * inputs.jobs["cpu_cores"]).to_numpy(), hist_hours)
        infl = seg.inflexible[c.name]
        week_ago = inputs.usage.set_index("hour")["inflexible_cpu_cores"].reindex(seg.hours - pd.Timedelta(days=7))
        clusters[c.name] = _Cluster(
            name=c.name, capacity=float(c.capacity_cores),
            sim=ClusterSim(seg.tasks[c.name], infl, c.capacity_cores, deadline_guard=True,
                           guard_hours=options.guard_hours),
            arrivals_hist=arr, arrivals_fc=np.nan_to_num(seasonal_ewma(arr, seg.hours)),
            inflexible_fc=infl.copy() if oracle else week_ago.to_numpy(float).copy(),
            inflexible_up=infl.copy() if oracle else week_ago.to_numpy(float) * 1.05,
            curve=inputs.power.curve() if oracle else None,
            record=np.full(n_h, np.nan), replan=np.full(n_h, np.nan))
    return clusters


def _store_runs(seg: Segment, policy: str, clusters: Mapping[str, _Cluster]) -> None:
    """Run every cluster's simulator to the end of the drain; store its run, the plan of record as the VCC."""
    for c in seg.campus.clusters:
        cl = clusters[c.name]
        cl.sim.advance(len(seg.hours))
        res = cl.sim.result()
        vcc_cores = np.where(np.isfinite(cl.record), (seg.inflexible[c.name] + cl.record) * seg.ratio[c.name],
                             np.nan)
        seg.runs[(policy, c.name)] = PolicyRun(policy, c.name, res, job_outcomes(seg.tasks[c.name], res),
                                               cl.sim.cap.copy(), vcc_cores)


def _horizon(seg, t: int, options, oracle: bool) -> np.ndarray:
    hours = options.oracle_horizon_hours if oracle else options.horizon_hours
    return np.arange(t, min(t + hours, len(seg.hours)))


def _cluster_input(seg, cl: _Cluster, t: int, hz: np.ndarray, options, oracle: bool,
                   limit: np.ndarray | None, carry: float = 0.0) -> QueueCluster:
    assert cl.curve is not None  # _solve passes only the clusters with a curve
    sim = cl.sim
    tasks = sim.tasks
    n = hz.size
    known = int(np.searchsorted(tasks.arrival_h, float(t), side="left"))
    rem = sim.remaining[:known]
    live = np.flatnonzero(rem > 1e-12)
    margin = 0.0 if oracle else options.planning_margin_hours  # perfect foresight needs no safety margin
    must, avail = task_bounds(n, tasks.arrival_h[live] - t, rem[live], tasks.cores[live],
                              sim.deadline[live] - t, margin)
    if oracle:
        ahead = np.arange(known, int(np.searchsorted(tasks.arrival_h, float(hz[-1] + 1), side="left")))
        m2, a2 = task_bounds(n, tasks.arrival_h[ahead] - t, tasks.work_h[ahead], tasks.cores[ahead],
                             sim.deadline[ahead] - t, margin)
    else:
        m2, a2 = arrival_bounds(cl.arrivals_fc[hz], 24.0 - margin)
    return QueueCluster(cl.name, cl.inflexible_fc[hz], cl.inflexible_up[hz], cl.capacity * options.plan_capacity_share,
                        must + m2, avail + a2,
                        cl.curve, limit_cpu_cores=limit, carry_core_hours=carry)


def _solve(seg, clusters: dict, t: int, hz: np.ndarray, carbon_gco2_per_kwh: np.ndarray, options, oracle: bool,
           committed: np.ndarray, with_limit: bool):
    shaped = [cl for cl in clusters.values() if not cl.fallback and cl.curve is not None]
    if not shaped:
        return None, shaped
    inputs = []
    for cl in shaped:
        limit, carry = None, 0.0
        if with_limit:
            rec = cl.record[hz]
            limit = np.where(np.isfinite(rec), rec, cl.capacity) if np.isfinite(rec).any() else None
            carry = _carry(seg, cl, t)
        inputs.append(_cluster_input(seg, cl, t, hz, options, oracle, limit, carry))
    campus = QueueCampus(seg.campus.name, tuple(inputs), carbon_gco2_per_kwh, committed=committed,
                         contract_kw=seg.campus.contract_limit_kw, lambda_e=options.lambda_e,
                         lambda_p=options.lambda_p, solver=options.solver)
    return plan_queue(campus), shaped


def _carry(seg, cl: _Cluster, t: int) -> float:
    """What the plan of record released since the start of hour t's local day and the cluster did not run."""
    k = seg.day_of_hour[t]
    if k < 0:
        return 0.0
    start = int(np.flatnonzero(seg.day_of_hour == k)[0])
    rec = cl.record[start:t]
    ok = np.isfinite(rec)
    return max(float((rec[ok] - cl.sim.usage[start:t][ok]).sum()), 0.0)


def _plan_of_record(seg, clusters: dict, cd, carbon, options, oracle: bool, t: int) -> None:
    """The day's plan of record: service over the day's hours plus the risk margin, as a usage cap."""
    day_idx = hour_slots(seg.hours, cd.hours)
    hz = _horizon(seg, t, options, oracle)
    hz = np.arange(t, max(hz[-1] + 1, day_idx[-1] + 1))
    committed = np.isin(hz, day_idx)
    plan, shaped = _solve(seg, clusters, t, hz, carbon(cd.planned_at, hz), options, oracle, committed,
                          with_limit=False)
    for cl in clusters.values():
        if cl not in shaped or plan is None:
            cl.record[day_idx] = np.nan
            continue
        i = plan.clusters.index(cl.name)
        if plan.status[i] != "optimal":
            cl.record[day_idx] = np.nan
            continue
        service = plan.service_cpu_cores[i][committed]
        room = np.maximum(cl.capacity - cl.inflexible_up[day_idx], 0.0)
        extra = cl.q_arrivals * float(cl.arrivals_fc[day_idx].sum())
        cl.record[day_idx] = service + risk_margin(service, room, extra)


def _correct(seg, clusters: dict, carbon, options, oracle: bool, t: int, drain: bool = False) -> None:
    """Re-plan from the live backlog at hour t and set each cluster's cap for that hour."""
    hz = _horizon(seg, t, options, oracle)
    committed = np.zeros(hz.size, bool)
    committed[0] = True
    if drain:
        for cl in clusters.values():
            if not cl.fallback and cl.curve is not None:
                cl.record[t] = cl.capacity  # no plan of record in the drain: the room is the only limit
    active = [cl for cl in clusters.values() if np.isfinite(cl.record[t])]
    for cl in clusters.values():
        if not np.isfinite(cl.record[t]):
            cl.sim.set_cap(t, np.array([np.inf]))  # no plan of record for this hour: unshaped
    if not active:
        return
    if not options.hourly_correction:
        for cl in active:
            cl.replan[t] = cl.record[t]
            cl.sim.set_cap(t, np.array([cl.record[t]]))
        return
    sub = {cl.name: cl for cl in active}
    plan, shaped = _solve(seg, sub, t, hz, carbon(seg.hours[t], hz), options, oracle, committed, with_limit=True)
    for cl in active:
        i = plan.clusters.index(cl.name) if plan is not None and cl.name in plan.clusters else -1
        cap = cl.record[t] if i < 0 or plan.status[i] != "optimal" else correction_cap(
            plan.service_cpu_cores[i], plan.late_core_hours[i], plan.room_cpu_cores[i])
        cl.replan[t] = cap
        cl.sim.set_cap(t, np.array([cap]))


def _deviations(seg, clusters: dict) -> pd.DataFrame:
    """Per cluster-day: hours and core-hours the hourly correction admitted above / below the plan of record."""
    rows = []
    for cl in clusters.values():
        for k, d in enumerate(seg.days):
            idx = np.flatnonzero(seg.day_of_hour == k)
            rec, rep = cl.record[idx], cl.replan[idx]
            ok = np.isfinite(rec) & np.isfinite(rep)
            diff = rep[ok] - rec[ok]
            rows.append({"day": d, "cluster": cl.name, "hours_above_plan": int((diff > 1e-6).sum()),
                         "core_hours_above_plan": float(diff[diff > 0].sum()),
                         "core_hours_below_plan": float(-diff[diff < 0].sum())})
    return pd.DataFrame(rows)
