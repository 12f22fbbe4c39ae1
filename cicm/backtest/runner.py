"""Closed-loop backtests of one campus over consecutive local days, on the real traces. No Prefect, no DuckDB.

Every policy sees the same days, the same inflexible usage and the same flexible job arrivals (the real batch
traces via :func:`cicm.demo.telemetry.scaled_cluster_jobs`), and is charged the same REAL carbon intensity. Each
policy is a small class in :mod:`cicm.backtest.policies`, found by name in its ``POLICIES`` registry and run in
registry order:

- ``carbon-agnostic``: no cap; flexible jobs run as soon as the machines have room.
- ``threshold``: Wait Awhile's suspend/resume: flexible work runs only in hours whose day-ahead forecast is at or
  below the 30th percentile of the local day's forecast (cap 0 otherwise, the machine room in those hours).
- ``threshold-guard``: the same, but a task that would otherwise miss its 24 h deadline runs anyway (deadline-
  aware suspend/resume; a fairer baseline, since plain thresholding is unstable at realistic loads).
- ``cicm-ceiling``: the CICM ceiling program (:mod:`cicm.optimize.program`, run by
  :mod:`cicm.backtest.ceiling_policy`), the baseline from the paper, made at 18:00 local on the eve of each day
  from data before that moment only: the trace carbon forecast, the load forecaster and power models refit on
  the closed-loop history (past hours of this very backtest, as it shaped them), the VCC program, and the SLO
  feedback loop (the project's rule, :func:`cicm.planning.slo.feedback_decision`, on the backtest's job-level
  evidence: shaping off for ``slo_off_days`` days after two close-or-violating days in a row or two violations in
  the last 7 checked days). Its VCC is a ceiling over a work-conserving queue.
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
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import pandas as pd

from cicm.backtest.accounting import ClusterPower
from cicm.backtest.carbon_input import ZoneCarbon
from cicm.backtest.policies import BASELINE, POLICIES, policy_class, selected_policies
from cicm.backtest.segment import ClusterData, Segment, hour_slots, run_open_loop
from cicm.backtest.sim import make_tasks
from cicm.config import Campus, Cluster, Fleet, GRID_ZONES
from cicm.errors import InputError
from cicm.planning.options import PlanOptions
from cicm.timeutil import check_timezone, local_day_hours_utc, planning_time_utc

if TYPE_CHECKING:
    from cicm.planning.stages import CampusDay

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
    policies: tuple[str, ...] = tuple(POLICIES)
    threshold_quantile: float = 0.30
    slo_feedback: bool = True
    slo_off_days: int = 7
    drain_hours: int = 72
    max_task_share: float = 0.01  # tasks no wider than this share of the cluster
    # the queue-aware planner (horizon_hours, planning_margin_hours, arrival_quantile: PlanOptions')
    oracle_horizon_hours: int = 72  # the oracle's: perfect foresight is not bound by a provider's forecast horizon
    hourly_correction: bool = True  # re-plan every hour from the live backlog
    plan_capacity_share: float = 1.0  # the program plans within this share of the machines (the rest: the guard)
    guard_hours: float = 0.0  # the deadline guard releases a task once its laxity falls below this
    # the randomised experiment
    experiment: bool = True
    experiment_p: float = 0.5
    top_hours_share: float = 0.2  # "highest-carbon hours": this share of each local day's hours

    def validate(self) -> None:
        super().validate()
        for name in self.policies:
            policy_class(name)  # an unknown name raises InputError("policies", ...)
        if BASELINE not in self.policies:
            raise InputError("policies", f"{BASELINE} is the baseline and must be included")
        if self.experiment and "planner" not in self.policies:
            raise InputError("experiment", "the experiment applies the planner's VCCs; include the planner")
        if not 24 <= self.oracle_horizon_hours <= 72:
            raise InputError("oracle_horizon_hours", f"must be in [24, 72], got {self.oracle_horizon_hours}")
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


def cluster_data(fleet: Fleet, cluster: Cluster, seed: int, shift: pd.Timedelta = pd.Timedelta(0)) -> ClusterData:
    """The cluster's workload over the demo history, moved ``shift`` (whole weeks) in time."""
    from cicm.demo.telemetry import cluster_usage_history, history_hours, scaled_cluster_jobs

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
    fleet.require_demo("a backtest")
    assert fleet.history_start is not None
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


def _rng(seed: int, *names: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32("/".join(names).encode())])


# ------------------------------------------------------------------------------------------------ the run


def run_segment(fleet: Fleet, campus: Campus, days: list[date], options: BacktestOptions,
                data: dict[str, ClusterData], zone_carbon: ZoneCarbon, *,
                progress: Callable[[str, int], None] | None = None) -> Segment:
    """Simulate every policy over consecutive local days ``days`` of one campus (``fleet``'s history moved onto
    the carbon data's calendar, like ``data``)."""
    from cicm.planning.stages import CampusDay

    tz = campus.timezone
    day_hours = [local_day_hours_utc(d, tz) for d in days]
    hours = _simulated_hours(fleet, days, day_hours, tz, options.drain_hours)
    campus_days = [CampusDay(campus, dh, planning_time_utc(d, tz)) for d, dh in zip(days, day_hours)]
    seg = _segment(campus, days, hours, campus_days, options, data, zone_carbon)

    def tick(label: str) -> None:
        if progress:
            progress(label, 1)

    for policy in selected_policies(options.policies):
        cpu = time.process_time()
        rows = policy.run(seg, campus_days, options, data, tick)
        if rows is not None:
            seg.plans = rows if seg.plans.empty else seg.plans.merge(rows, on=["day", "cluster"], how="outer")
        seg.cpu_seconds[policy.name] = time.process_time() - cpu
    if options.experiment:
        cpu = time.process_time()
        _run_experiment(seg, options)
        seg.cpu_seconds["experiment"] = time.process_time() - cpu
        tick("experiment")
    return seg


def _simulated_hours(fleet: Fleet, days: list[date], day_hours: list[pd.DatetimeIndex], tz: str,
                     drain_hours: int) -> pd.DatetimeIndex:
    """The segment's UTC hours: its consecutive local days, then the drain; inside the demo workload's history
    with 35 days of it before the first plan."""
    for a, b in zip(day_hours, day_hours[1:]):
        if b[0] != a[-1] + _H:
            raise InputError("days", "segment days must be consecutive")
    t0, window_end = day_hours[0][0], day_hours[-1][-1] + _H
    hours = pd.date_range(t0, window_end + drain_hours * _H, freq="h", inclusive="left")
    history_end = fleet.history_end
    if hours[-1] >= history_end:
        raise InputError("days", f"the backtest and its {drain_hours} h drain must end before "
                                 f"{history_end:%Y-%m-%d} (end of the demo workload)")
    earliest = fleet.history_start + pd.Timedelta(days=35)
    if planning_time_utc(days[0], tz) < earliest:
        raise InputError("start", f"the first day needs at least 35 days of history; start on or after "
                                  f"{(earliest + pd.Timedelta(days=1)):%Y-%m-%d}")
    return hours


def _segment(campus: Campus, days: list[date], hours: pd.DatetimeIndex, campus_days: list[CampusDay],
             options: BacktestOptions, data: dict[str, ClusterData], zone_carbon: ZoneCarbon) -> Segment:
    """The segment's inputs, the same for every policy: actual and day-ahead carbon, and each cluster's
    inflexible usage, reservation ratio and flexible tasks."""
    n_h = len(hours)
    t0, window_end = campus_days[0].hours[0], campus_days[-1].hours[-1] + _H
    carbon_gco2_per_kwh = zone_carbon.actual(hours[0], hours[-1] + _H).reindex(hours).to_numpy(float)
    day_of_hour = np.full(n_h, -1)
    for k, cd in enumerate(campus_days):
        day_of_hour[hour_slots(hours, cd.hours)] = k
    forecaster = zone_carbon.forecaster(hours, options.seed)
    forecast_gco2_per_kwh = np.full(n_h, np.nan)
    for cd in campus_days:
        idx = hour_slots(hours, cd.hours)
        forecast_gco2_per_kwh[idx] = forecaster.at(cd.planned_at, idx)
    seg = Segment(campus=campus, days=list(days), t0=t0, window_end=window_end, hours=hours,
                  carbon=carbon_gco2_per_kwh, forecast=forecast_gco2_per_kwh, forecaster=forecaster,
                  zone_carbon=zone_carbon, day_of_hour=day_of_hour, inflexible={}, ratio={}, tasks={})
    for c in campus.clusters:
        d = data[c.name]
        u = d.usage.set_index("hour")
        seg.inflexible[c.name] = u["inflexible_cpu_cores"].reindex(hours).to_numpy(float)
        seg.ratio[c.name] = d.ratio.reindex(hours).to_numpy(float)
        seg.tasks[c.name] = make_tasks(d.jobs, t0, window_end, options.max_task_share * c.capacity_cores)
    return seg


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
        run_open_loop(seg, c, "experiment", cap, deadline_guard=True,
                      vcc_cores=np.where(np.isfinite(cap), planner_vcc, np.nan))
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
    steps = sum(policy.progress_ticks(n_days) for policy in selected_policies(options.policies))
    return steps + (1 if options.experiment else 0)
