"""Closed-loop backtests of one campus over consecutive local days, on the real traces. No Prefect, no DuckDB.

Every policy sees the same days, the same inflexible usage and the same flexible job arrivals (the real batch
traces via :func:`cicm.data.telemetry.scaled_cluster_jobs`), and is charged the same REAL carbon intensity:

- ``carbon-agnostic``: no cap; flexible jobs run as soon as the machines have room.
- ``threshold``: Wait Awhile's suspend/resume: flexible work runs only in hours whose day-ahead forecast is at or
  below the 30th percentile of the local day's forecast (cap 0 otherwise, the machine room in those hours).
- ``threshold-guard``: the same, but a task that would otherwise miss its 24 h deadline runs anyway (deadline-
  aware suspend/resume; a fairer baseline, since plain thresholding is unstable at realistic loads).
- ``cicm-ceiling``: the CICM ceiling program (:mod:`cicm.optimize.program`), the baseline from the paper, made at
  18:00 local on the eve of each day from data before that moment only: the trace carbon forecast, the load
  forecaster and power models refit on the closed-loop history (past hours of this very backtest, as it shaped
  them), the VCC program, and the SLO feedback loop (the project's rule, :func:`cicm.planning.slo.feedback_decision`,
  on the backtest's job-level evidence: shaping off for ``slo_off_days`` days after two close-or-violating days in
  a row or two violations in the last 7 checked days). Its VCC is a ceiling over a work-conserving queue.
- ``planner``: the queue-aware planner (:mod:`cicm.backtest.queue_policy`): the same nightly inputs plus the
  measured backlog and hourly arrival forecasts, a plan of record of WHEN flexible work runs, corrected every hour
  from the live backlog, with the deadline guard and the same SLO feedback and forecast-value gate.
- ``oracle``: the queue-aware program and its hourly correction with perfect foresight (actual carbon, every
  job's actual arrival, width and deadline, actual inflexible usage, the true power curve).

A VCC (reservation cores) becomes a flexible usage cap through the actual reservation ratio of the hour:
``cap = VCC / R_actual(h) - inflexible(h)``, so the cap binds the cluster's reservations exactly as the VCC does.
"""
from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import TYPE_CHECKING, Callable, Iterable, cast

import numpy as np
import pandas as pd

from cicm.backtest.accounting import ClusterPower
from cicm.backtest.carbon_input import Forecaster, ZoneCarbon
from cicm.backtest.sim import ClusterSim, SimResult, Tasks, job_outcomes, make_tasks, simulate
from cicm.config import Campus, Cluster, Fleet, GRID_ZONES
from cicm.errors import InputError
from cicm.planning.pipeline import PlanOptions
from cicm.timeutil import check_timezone, local_day_hours_utc, planning_time_utc

if TYPE_CHECKING:
    from cicm.models.load import LoadForecast

POLICIES = ("carbon-agnostic", "threshold", "threshold-guard", "cicm-ceiling", "planner", "oracle")
BASELINE = "carbon-agnostic"
ZONE_TIMEZONES = {
    "AZPS": "America/Phoenix", "BPAT": "America/Los_Angeles", "CISO": "America/Los_Angeles",
    "ERCO": "America/Chicago", "MISO": "America/Chicago", "NYIS": "America/New_York",
    "PJM": "America/New_York", "SOCO": "America/New_York",
}
_H = pd.Timedelta(hours=1)


@dataclass
class BacktestOptions(PlanOptions):
    """The nightly plan's knobs (PlanOptions, same defaults) plus the backtest's own."""

    # policies and simulation
    policies: tuple[str, ...] = POLICIES
    threshold_quantile: float = 0.30
    slo_feedback: bool = True
    slo_off_days: int = 7
    drain_hours: int = 72
    max_task_share: float = 0.01  # tasks no wider than this share of the cluster
    # the queue-aware planner
    horizon_hours: int = 48  # look-ahead of every solve (only the planning day is committed)
    oracle_horizon_hours: int = 72  # the oracle's: perfect foresight is not bound by a provider's forecast horizon
    planning_margin_hours: float = 6.0  # deadlines are planned this much early
    arrival_quantile: float = 0.9  # upper quantile of arrivals behind the VCC's risk margin
    hourly_correction: bool = True  # re-plan every hour from the live backlog
    plan_capacity_share: float = 1.0  # the program plans within this share of the machines (the rest: the guard)
    guard_hours: float = 0.0  # the deadline guard releases a task once its laxity falls below this
    # the randomised experiment
    experiment: bool = True
    experiment_p: float = 0.5
    top_hours_share: float = 0.2  # "highest-carbon hours": this share of each local day's hours

    def validate(self) -> None:
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown:
            raise InputError("policies", f"unknown {unknown}; choose from {', '.join(POLICIES)}")
        if BASELINE not in self.policies:
            raise InputError("policies", f"{BASELINE} is the baseline and must be included")
        if self.experiment and "planner" not in self.policies:
            raise InputError("experiment", "the experiment applies the planner's VCCs; include the planner")
        for name in ("horizon_hours", "oracle_horizon_hours"):
            if not 24 <= getattr(self, name) <= 72:
                raise InputError(name, f"must be in [24, 72], got {getattr(self, name)}")
        if not 0 <= self.planning_margin_hours < 24:
            raise InputError("planning_margin_hours", f"must be in [0, 24), got {self.planning_margin_hours}")
        if not 0.5 <= self.arrival_quantile < 1:
            raise InputError("arrival_quantile", f"must be in [0.5, 1), got {self.arrival_quantile}")
        if not 0 < self.threshold_quantile < 1:
            raise InputError("threshold_quantile", "must be in (0, 1)")
        if not 0 < self.experiment_p < 1:
            raise InputError("experiment_p", "must be in (0, 1)")
        if self.drain_hours < 24:
            raise InputError("drain_hours", "must be >= 24 so the last day's jobs can meet their deadline")


# ------------------------------------------------------------------------------------------------ inputs


def campus_for_zone(fleet: Fleet, zone: str, template: str | None = None, timezone: str | None = None) -> Campus:
    """The fleet's campus in ``zone``; for a zone without one (or with an explicit ``timezone``), the template
    campus (default: the first) moved to the zone and its time zone, so that only the grid differs. Its name says
    so: ``ca-sj@PJM``. A zone outside the bundled ones (carbon from a CSV) needs its ``timezone``."""
    if timezone is None and zone not in GRID_ZONES:
        raise InputError("timezone", f"zone {zone!r} is not a bundled zone ({', '.join(GRID_ZONES)}); give its "
                                     "IANA time zone")
    if timezone is not None:
        check_timezone(timezone)
    if template is None:
        for campus in fleet.campuses:
            if campus.grid_zone == zone and timezone in (None, campus.timezone):
                return campus
    base = next((c for c in fleet.campuses if c.name == template), None) if template else fleet.campuses[0]
    if base is None:
        raise InputError("campus", f"no campus named {template!r} in fleet {fleet.name!r}")
    return base.model_copy(update={"name": f"{base.name}@{zone}", "grid_zone": zone,
                                   "timezone": timezone or ZONE_TIMEZONES[zone]})


@dataclass
class ClusterData:
    """Everything the backtest needs about one cluster over the whole demo history (derived from real traces)."""

    cluster: Cluster
    usage: pd.DataFrame  # base (unshaped) telemetry: hour, inflexible/flexible/reserved cpu cores
    jobs: pd.DataFrame  # scaled flexible jobs: arrival, length_hours, cpu_cores
    ratio: pd.Series  # actual reservations / usage per hour (UTC index)
    power: ClusterPower


def cluster_data(fleet: Fleet, cluster: Cluster, seed: int, shift: pd.Timedelta = pd.Timedelta(0)) -> ClusterData:
    """The cluster's workload over the demo history, moved ``shift`` (whole weeks) in time."""
    from cicm.data.telemetry import cluster_usage_history, history_hours, scaled_cluster_jobs

    hours = history_hours(fleet)
    usage = cluster_usage_history(cluster, hours, seed)
    jobs = scaled_cluster_jobs(cluster, hours, seed)
    usage["hour"] = usage["hour"] + shift
    jobs["arrival"] = jobs["arrival"] + shift
    total = usage["inflexible_cpu_cores"] + usage["flexible_cpu_cores"]
    ratio = pd.Series((usage["reserved_cpu_cores"] / total).to_numpy(), index=pd.DatetimeIndex(usage["hour"]))
    return ClusterData(cluster, usage, jobs, ratio, ClusterPower(cluster))


def workload_shift(fleet: Fleet, first_day: date, need_start: pd.Timestamp, need_end: pd.Timestamp) -> pd.Timedelta:
    """Whole weeks to move the demo workload so that it covers ``[need_start, need_end)`` (the backtest's history,
    window and drain) in the carbon data's calendar, weekdays aligned; of those, the one closest to the same
    season (the first day's year moved onto the workload's year). Zero when the carbon year is the workload's."""
    lo, hi = fleet.history_start, fleet.history_end
    if need_end - need_start > hi - lo:
        raise InputError("days", f"the backtest needs {(need_end - need_start).days} days of workload (35 days of "
                                 f"history, the window and the drain); the demo workload has {fleet.history_days}")
    season = pd.Timestamp(first_day).year - lo.year
    same_season = pd.Timestamp(lo.tz_convert(None).replace(year=lo.year + season), tz="UTC") - lo
    weeks = round(same_season / pd.Timedelta(days=7))
    lo_weeks = math.ceil((need_end - hi) / pd.Timedelta(days=7))
    hi_weeks = math.floor((need_start - lo) / pd.Timedelta(days=7))
    return pd.Timedelta(days=7 * min(max(weeks, lo_weeks), hi_weeks))


# ------------------------------------------------------------------------------------------------ results


@dataclass
class PolicyRun:
    policy: str
    cluster: str
    result: SimResult
    jobs: pd.DataFrame  # job outcomes
    cap: np.ndarray  # flexible cap (usage cores) per simulated hour, inf = none
    vcc: np.ndarray | None = None  # reservation cores (program policies), NaN where none


@dataclass
class Segment:
    """One contiguous run of days (a backtest is one or more segments; long data gaps split it)."""

    campus: Campus
    days: list[date]
    t0: pd.Timestamp
    window_end: pd.Timestamp  # end of the last local day
    hours: pd.DatetimeIndex  # simulated hours (window + drain)
    carbon: np.ndarray  # actual gCO2/kWh per simulated hour
    forecast: np.ndarray  # day-ahead forecast per window hour, issued at the day's planning time (NaN in the drain)
    forecaster: Forecaster  # .at(issued_at, slots): the forecast of simulated hours as known at issued_at
    zone_carbon: ZoneCarbon
    day_of_hour: np.ndarray  # index into days per simulated hour, -1 in the drain
    inflexible: dict[str, np.ndarray]
    ratio: dict[str, np.ndarray]
    tasks: dict[str, Tasks]
    runs: dict[tuple[str, str], PolicyRun] = field(default_factory=dict)
    plans: pd.DataFrame = field(default_factory=pd.DataFrame)  # per cluster-day: planner/oracle status etc.
    treated: pd.DataFrame = field(default_factory=pd.DataFrame)  # experiment assignment


def _rng(seed: int, *names: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32("/".join(names).encode())])


# ------------------------------------------------------------------------------------------------ the run


def run_segment(fleet: Fleet, campus: Campus, days: list[date], options: BacktestOptions,
                data: dict[str, ClusterData], zone_carbon: ZoneCarbon, *,
                progress: Callable[[str, int], None] | None = None) -> Segment:
    """Simulate every policy over consecutive local days ``days`` of one campus (``fleet``'s history moved onto
    the carbon data's calendar, like ``data``)."""
    tz = campus.timezone
    day_hours = [local_day_hours_utc(d, tz) for d in days]
    for a, b in zip(day_hours, day_hours[1:]):
        if b[0] != a[-1] + _H:
            raise InputError("days", "segment days must be consecutive")
    t0, window_end = day_hours[0][0], day_hours[-1][-1] + _H
    hours = pd.date_range(t0, window_end + options.drain_hours * _H, freq="h", inclusive="left")
    n_h = len(hours)
    history_end = fleet.history_end
    if hours[-1] >= history_end:
        raise InputError("days", f"the backtest and its {options.drain_hours} h drain must end before "
                                 f"{history_end:%Y-%m-%d} (end of the demo workload)")
    earliest = fleet.history_start + pd.Timedelta(days=35)
    if planning_time_utc(days[0], tz) < earliest:
        raise InputError("start", f"the first day needs at least 35 days of history; start on or after "
                                  f"{(earliest + pd.Timedelta(days=1)):%Y-%m-%d}")
    carbon = zone_carbon.actual(hours[0], hours[-1] + _H).reindex(hours).to_numpy(float)
    day_of_hour = np.full(n_h, -1)
    for k, dh in enumerate(day_hours):
        day_of_hour[_slots(hours, dh)] = k

    from cicm.planning.stages import CampusDay

    campus_days = [CampusDay(campus, dh, planning_time_utc(d, tz)) for d, dh in zip(days, day_hours)]
    forecaster = zone_carbon.forecaster(hours, options.seed)
    forecast = np.full(n_h, np.nan)
    for cd in campus_days:
        idx = _slots(hours, cd.hours)
        forecast[idx] = forecaster.at(cd.planned_at, idx)

    seg = Segment(campus=campus, days=list(days), t0=t0, window_end=window_end, hours=hours, carbon=carbon,
                  forecast=forecast, forecaster=forecaster, zone_carbon=zone_carbon, day_of_hour=day_of_hour,
                  inflexible={}, ratio={}, tasks={})
    for c in campus.clusters:
        d = data[c.name]
        u = d.usage.set_index("hour")
        seg.inflexible[c.name] = u["inflexible_cpu_cores"].reindex(hours).to_numpy(float)
        seg.ratio[c.name] = d.ratio.reindex(hours).to_numpy(float)
        seg.tasks[c.name] = make_tasks(d.jobs, t0, window_end, options.max_task_share * c.capacity_cores)

    def tick(label: str) -> None:
        if progress:
            progress(label, 1)

    inf = np.full(n_h, np.inf)
    for c in campus.clusters:
        _open_loop(seg, c, BASELINE, inf)
    tick(BASELINE)
    if "threshold" in options.policies or "threshold-guard" in options.policies:
        thr = _threshold_cap(seg, options.threshold_quantile)
        for name, guard in (("threshold", False), ("threshold-guard", True)):
            if name in options.policies:
                for c in campus.clusters:
                    _open_loop(seg, c, name, thr, deadline_guard=guard)
                tick(name)
    from cicm.backtest.queue_policy import run_queue_policy

    frames = []
    if "cicm-ceiling" in options.policies:
        frames.append(_run_ceiling(fleet, seg, campus_days, options, data, lambda: tick("cicm-ceiling day")))
    if "planner" in options.policies:
        frames.append(run_queue_policy(seg, campus_days, options, data, "planner", lambda: tick("planner day")))
    if "oracle" in options.policies:
        frames.append(run_queue_policy(seg, campus_days, options, data, "oracle"))
        tick("oracle")
    for f in frames:
        seg.plans = f if seg.plans.empty else seg.plans.merge(f, on=["day", "cluster"], how="outer")
    if options.experiment:
        _run_experiment(seg, options)
        tick("experiment")
    return seg


def _slots(hours: pd.DatetimeIndex, sub: pd.DatetimeIndex) -> np.ndarray:
    idx = hours.get_indexer(sub)
    if (idx < 0).any():
        raise InputError("hours", "day hours fall outside the simulated hours")
    return idx


def _open_loop(seg: Segment, cluster: Cluster, policy: str, cap: np.ndarray, deadline_guard: bool = False,
               vcc: np.ndarray | None = None) -> None:
    tasks = seg.tasks[cluster.name]
    res = simulate(tasks, seg.inflexible[cluster.name], cluster.capacity_cores, cap, deadline_guard=deadline_guard)
    seg.runs[(policy, cluster.name)] = PolicyRun(policy, cluster.name, res, job_outcomes(tasks, res), cap, vcc)


def _threshold_cap(seg: Segment, q: float) -> np.ndarray:
    cap = np.full(len(seg.hours), np.inf)
    for k in range(len(seg.days)):
        idx = np.flatnonzero(seg.day_of_hour == k)
        fc = seg.forecast[idx]
        cap[idx] = np.where(fc <= np.quantile(fc, q), np.inf, 0.0)
    return cap


def _vcc_to_cap(vcc: np.ndarray, ratio: np.ndarray, inflexible: np.ndarray) -> np.ndarray:
    """Flexible usage cap from a VCC in reservation cores: VCC / R_actual - inflexible (>= 0)."""
    return np.maximum(vcc / ratio - inflexible, 0.0)


def _forecast_value(seg: Segment, cd, options: BacktestOptions):
    """As the nightly plan measures it: following the zone's day-ahead forecasts over the 28 days before
    planning, scored on the actual intensity (the vintages a running planner would have stored)."""
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


def _run_ceiling(fleet: Fleet, seg: Segment, campus_days: list, options: BacktestOptions,
                 data: dict[str, ClusterData], tick: Callable[[], None]) -> pd.DataFrame:
    """The CICM ceiling program, day by day, on the closed-loop history; the simulator advances between plans."""
    from cicm.data.telemetry import cluster_power_telemetry
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
    task_days = {c.name: _task_local_days(seg.tasks[c.name], campus.timezone) for c in campus.clusters}
    off_until: dict[str, date] = {}
    off_reason: dict[str, str] = {}
    rows = []
    for cd, d in zip(campus_days, seg.days):
        now_slot = int(math.floor((cd.planned_at - seg.t0) / _H))
        for sim in sims.values():
            sim.advance(max(now_slot, 0))
        inputs, fallbacks = [], {}
        low_benefit = stages.low_benefit_reason(_forecast_value(seg, cd, options), options.min_forecast_value_pct)
        for c in campus.clusters:
            sim = sims[c.name]
            history = _closed_loop_history(base[c.name], seg, sim, c.name, cd.planned_at,
                                           stages.LOAD_HISTORY_DAYS)
            # SLO feedback: a job past its deadline and unfinished, or finished late, by planning time.
            if options.slo_feedback and not (c.name in off_until and d <= off_until[c.name]):
                reason = _slo_feedback(seg, sim, c.name, task_days[c.name], d, since[c.name], thetas)
                if reason:
                    off_until[c.name] = d + timedelta(days=options.slo_off_days - 1)
                    off_reason[c.name] = reason
                    since[c.name] = d
            preset = off_reason[c.name] if c.name in off_until and d <= off_until[c.name] else None
            preset = preset or low_benefit
            window = history[history.index >= cd.planned_at - pd.Timedelta(days=stages.POWER_WINDOW_DAYS + 1)]
            telemetry = cluster_power_telemetry(c, window.reset_index(), options.seed)
            models = stages.cluster_models_from_frames(c, telemetry, history.reset_index(), cd, options.gamma)
            load = cast("LoadForecast | None", models.load)  # typed object in cicm.planning.stages.ClusterModels
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
            carbon = seg.forecast[_slots(seg.hours, cd.hours)]
            plan = plan_campus(stages.campus_input(campus, inputs, carbon, cd.hours, options))
            for r in plan.clusters.itertuples():
                status[r.cluster] = (r.status, r.reason, r.flexible_saving_pct, r.tau_core_hours)
                thetas[(r.cluster, d)] = float(r.theta_core_hours)
            idx = _slots(seg.hours, cd.hours)
            for c in campus.clusters:
                if c.name not in status:
                    continue
                h = plan.hourly[plan.hourly["cluster"] == c.name]
                vcc = h["vcc_cores"].to_numpy(float)
                if status[c.name][0] == "shaped":
                    vccs[c.name][idx] = vcc
                    sims[c.name].set_cap(idx[0], _vcc_to_cap(vcc, seg.ratio[c.name][idx],
                                                              seg.inflexible[c.name][idx]))
        for row in rows[-len(campus.clusters):]:
            if row["cluster"] in status:
                st, reason, saving, tau = status[row["cluster"]]
                row.update({"ceiling_status": st, "ceiling_reason": reason, "planned_flexible_saving_pct": saving,
                            "tau_core_hours": tau})
        tick()
    for c in campus.clusters:
        sims[c.name].advance(n_h)
        res = sims[c.name].result()
        cap = sims[c.name].cap.copy()
        seg.runs[("cicm-ceiling", c.name)] = PolicyRun("cicm-ceiling", c.name, res,
                                                       job_outcomes(seg.tasks[c.name], res), cap, vccs[c.name])
    return pd.DataFrame(rows)


def _task_local_days(tasks: Tasks, tz: str) -> np.ndarray:
    """The local calendar day each task's job arrived on (the cluster-day it belongs to)."""
    local = pd.DatetimeIndex(tasks.jobs["arrival"]).tz_convert(tz).tz_localize(None).normalize()
    return np.asarray([ts.date() for ts in local], dtype=object)[tasks.job] if len(local) else np.zeros(0, object)


def _slo_feedback(seg: Segment, sim: ClusterSim, name: str, task_days: np.ndarray, plan_day: date, since: date,
                  thetas: dict) -> str | None:
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
        mine = np.flatnonzero(task_days == x)
        fin = sim.finish[mine]
        violated = bool((np.isnan(fin) | (fin > sim.deadline[mine] + 1e-6)).any())
        idx = np.flatnonzero(seg.day_of_hour == k)
        reserved = float(((seg.inflexible[name][idx] + sim.usage[idx]) * seg.ratio[name][idx]).sum())
        theta = thetas.get((name, x), np.nan)
        rows.append({"day": x, "violated": violated,
                     "close": bool(np.isfinite(theta) and reserved >= CLOSE_FRACTION * theta)})
    return feedback_decision(pd.DataFrame(rows), plan_day)


def _closed_loop_history(base: pd.DataFrame, seg: Segment, sim: ClusterSim, name: str, now: pd.Timestamp,
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


def _run_experiment(seg: Segment, options: BacktestOptions) -> None:
    """Randomised cluster-days (p = experiment_p): treated ones enforce the planner's VCC, the others run
    unshaped. The assignment is drawn from the seed, independently of everything else."""
    rows = []
    n_h = len(seg.hours)
    for c in seg.campus.clusters:
        rng = _rng(options.seed, "experiment", c.name, str(seg.days[0]))
        treated = rng.random(len(seg.days)) < options.experiment_p
        planner = seg.runs[("planner", c.name)]
        planner_vcc = planner.vcc
        assert planner_vcc is not None  # a program policy stores its VCC
        cap = np.full(n_h, np.inf)
        for k, t in enumerate(treated):
            idx = np.flatnonzero(seg.day_of_hour == k)
            shaped = np.isfinite(planner_vcc[idx]).all()
            if t and shaped:
                cap[idx] = planner.cap[idx]
            rows.append({"cluster": c.name, "day": seg.days[k], "treated": bool(t), "shaped": bool(shaped)})
        _open_loop(seg, c, "experiment", cap, deadline_guard=True,
                   vcc=np.where(np.isfinite(cap), planner_vcc, np.nan))
    seg.treated = pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ segments


def long_gap_days(zone_carbon: ZoneCarbon, days: Iterable[date], tz: str, drain_hours: int) -> list[date]:
    """Days that cannot be backtested because the zone's actual carbon has a long gap in the day or in the hours
    its work may still run (the next drain_hours): PJM's 22-hour outage of 2022-03-13/14."""
    gaps = zone_carbon.long_gaps()
    bad = []
    for d in days:
        hours = local_day_hours_utc(d, tz)
        lo, hi = hours[0], hours[-1] + drain_hours * _H
        if any(a <= hi and b >= lo for a, b in gaps):
            bad.append(d)
    return bad


def split_segments(days: list[date], skip: set[date]) -> list[list[date]]:
    out: list[list[date]] = []
    cur: list[date] = []
    for d in days:
        if d in skip:
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(d)
    if cur:
        out.append(cur)
    return out


@dataclass
class Backtest:
    zone: str
    carbon_source: str
    workload_shift_days: int
    campus: Campus
    start: date
    n_days: int
    options: BacktestOptions
    segments: list[Segment]
    skipped_days: list[date]
    seconds: float


def run_backtest(zone: str, start: date, n_days: int, options: BacktestOptions | None = None, *,
                 fleet: Fleet | None = None, campus: str | None = None, carbon: ZoneCarbon | None = None,
                 timezone: str | None = None, progress: Callable[[str, int], None] | None = None) -> Backtest:
    """Backtest ``n_days`` local days from ``start`` for the campus in ``zone`` (see :func:`campus_for_zone`).

    ``carbon``: the zone's carbon (default: the bundled trace of ``zone``). When its calendar is not the demo
    workload's, the workload moves by whole weeks onto it (:func:`workload_shift`)."""
    from cicm.config import load_fleet

    t_start = time.perf_counter()
    options = options or BacktestOptions()
    options.validate()
    if n_days < 1:
        raise InputError("days", f"must be >= 1, got {n_days}")
    fleet = fleet or load_fleet()
    carbon = carbon or ZoneCarbon.bundled(zone)
    camp = campus_for_zone(fleet, zone, campus, timezone)
    days = [start + timedelta(days=i) for i in range(n_days)]
    need_start = planning_time_utc(days[0], camp.timezone) - pd.Timedelta(days=35)
    need_end = local_day_hours_utc(days[-1], camp.timezone)[-1] + (options.drain_hours + 1) * _H
    shift = workload_shift(fleet, start, need_start, need_end)
    moved = fleet.model_copy(update={"history_start": fleet.history_start + shift})
    skip = set(long_gap_days(carbon, days, camp.timezone, options.drain_hours))
    segments_days = split_segments(days, skip)
    if not segments_days:
        raise InputError("start", f"every requested day touches a long gap in the {zone} carbon data")
    data = {c.name: cluster_data(fleet, c, options.seed, shift) for c in camp.clusters}
    segments = [run_segment(moved, camp, seg_days, options, data, carbon, progress=progress)
                for seg_days in segments_days]
    return Backtest(zone, carbon.source, shift.days, camp, start, n_days, options, segments, sorted(skip),
                    time.perf_counter() - t_start)


def progress_steps(n_days: int, options: BacktestOptions) -> int:
    """How many progress ticks run_backtest makes (for a progress bar)."""
    steps = 1 + sum(p in options.policies for p in ("threshold", "threshold-guard", "oracle"))
    steps += n_days * sum(p in options.policies for p in ("cicm-ceiling", "planner"))
    return steps + (1 if options.experiment else 0)
