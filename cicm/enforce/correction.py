"""The agent's hourly correction: re-plan the rest of the horizon from the live backlog against the plan of record.
Pure: arrays, timestamps and dataclasses in, a dataclass out. No Prefect, no DuckDB, no backtest imports.

The day-ahead plan of a queue program (``vccs.flexible_cpu_cores``: the planned flexible service per hour) is the
**plan of record**. At the start of every hour the agent solves the same queue program again
(:func:`cicm.optimize.queue.plan_queue`) over the hours that are left, from what is actually queued:

- the live backlog (each item with its remaining core-hours, its width and its deadline, through
  :func:`cicm.optimize.queue.task_bounds`) and the forecast arrivals (:func:`cicm.optimize.queue.arrival_bounds`),
  both with their deadlines planned ``planning_margin_hours`` early, as the nightly plan does;
- the room (capacity − the inflexible upper quantile), the power curve and the carbon forecast of those hours;
- the plan of record as a priced cumulative release schedule (``limit_cpu_cores``, and ``carry_core_hours``: what
  the plan released earlier in the day but the cluster did not run). Running ahead of it costs 10× the dearest
  carbon, lateness 1000×, so the re-plan exceeds the plan only where a deadline needs it.

The hour's cap comes from :func:`cicm.optimize.queue.correction_cap` (the re-plan's first hour, or no cap when the
re-plan is saturated), and is then held to the plan: **it never exceeds the plan of record unless a deadline
needs it** (the re-plan expects lateness, or runs this hour ahead of the cumulative plan). Reasons, when the
allowance differs from the hour's plan of record (by more than ``DEVIATION_RTOL`` of the room, unless a deadline
needs it):

- ``deadline-release`` (above the plan): a deadline needs it. The re-plan runs this hour ahead of the cumulative
  plan of record, or it expects work to be late (then the hour is not capped: the room is only a forecast).
- ``catch-up`` (above the hour's plan, within the plan's cumulative release): the plan released work earlier in
  the day that the cluster did not run (``carry``); the re-plan runs it now.
- ``below-plan`` (below the plan): the live backlog, with this hour's forecast arrivals, is smaller than the
  plan's release; everything that can run this hour is admitted.
- ``deferred`` (below the plan): the re-plan holds work that could run now for later, cleaner hours (the live
  backlog's deadlines allow it).

Without a deadline need, an allowance within that tolerance of the plan is the plan exactly; with one, any
release above the plan is a deviation. So the allowance equals the plan of record whenever no deviation is
returned. A failed re-plan (solver error) returns the plan of record, with a note: never a guess.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cicm.errors import InputError
from cicm.optimize.inputs import PowerCurve
from cicm.optimize.queue import QueueCampus, QueueCluster, arrival_bounds, correction_cap, plan_queue, task_bounds

REASON_DEADLINE = "deadline-release"
REASON_CATCH_UP = "catch-up"
REASON_BELOW = "below-plan"
REASON_DEFERRED = "deferred"
REASONS = (REASON_DEADLINE, REASON_CATCH_UP, REASON_BELOW, REASON_DEFERRED)
#: An allowance within this share of the room (or of the plan, when larger) of the plan is not a deviation.
DEVIATION_RTOL = 1e-3
#: Numerical tolerance (share of the room) for "the re-plan expects lateness / runs ahead of the plan".
NEED_RTOL = 1e-6

_H = pd.Timedelta(hours=1)


@dataclass(frozen=True)
class WorkItem:
    """One queued piece of flexible work: ``remaining_core_hours`` still to run, at most ``width_cores`` wide
    (so it needs at least remaining / width hours), due by ``deadline`` (tz-aware)."""

    remaining_core_hours: float
    width_cores: float
    deadline: pd.Timestamp


@dataclass(frozen=True)
class Deviation:
    """The hour's applied flexible allowance where it differs from the plan of record (cluster cores)."""

    hour: pd.Timestamp
    plan_cores: float
    applied_cores: float
    reason: str
    detail: str


@dataclass(frozen=True)
class Correction:
    """The re-plan's answer for the hour. ``allowance_cores`` is what to apply (cluster cores of flexible usage);
    ``deviation`` is set when it differs from ``plan_cores``; the arrays are the re-plan over the horizon."""

    hour: pd.Timestamp
    plan_cores: float
    allowance_cores: float
    deviation: Deviation | None
    carry_core_hours: float
    status: str  # "optimal" | "fallback" (the re-plan failed: the plan of record is applied)
    service_cpu_cores: np.ndarray
    late_core_hours: np.ndarray
    over_cpu_cores: np.ndarray
    room_cpu_cores: np.ndarray
    note: str = ""


@dataclass(frozen=True, eq=False)
class CorrectionInput:
    """Everything the hour's re-plan needs, over the N hours left in the horizon (the current hour first).

    - ``hours``: N consecutive UTC hours, the first the hour being corrected.
    - ``plan_cpu_cores[N]``: the plan of record, planned flexible service per hour (``vccs.flexible_cpu_cores``
      of the queue program); NaN where no plan of record covers the hour (then only the room limits it). The
      first hour must have a plan.
    - ``inflexible_cpu_cores[N]``, ``inflexible_upper_cpu_cores[N]``: the load forecast and its upper quantile;
      ``capacity_cores``: the cluster's usable cores. Room = capacity − upper quantile.
    - ``power_curve``: the cluster's P(u); ``carbon_gco2_per_kwh[N]``: the carbon forecast of those hours.
    - ``backlog``: the live queue (:class:`WorkItem`); ``arrivals_core_hours[N]``: forecast arrivals per hour,
      due ``arrival_deadline_hours`` after they arrive.
    - ``carry_core_hours``: released by the plan earlier in the day but not run (:func:`carry_core_hours`).
    - ``planning_margin_hours``: deadlines are planned this much early (the nightly plan's margin).
    """

    hours: pd.DatetimeIndex
    plan_cpu_cores: np.ndarray
    inflexible_cpu_cores: np.ndarray
    inflexible_upper_cpu_cores: np.ndarray
    capacity_cores: float
    power_curve: PowerCurve
    carbon_gco2_per_kwh: np.ndarray
    backlog: tuple[WorkItem, ...]
    arrivals_core_hours: np.ndarray
    carry_core_hours: float = 0.0
    planning_margin_hours: float = 6.0
    arrival_deadline_hours: float = 24.0
    lambda_e: float = 1.0
    lambda_p: float = 0.0
    solver: str = "HIGHS"
    name: str = "cluster"

    def __post_init__(self):
        hours = self.hours
        if not isinstance(hours, pd.DatetimeIndex) or len(hours) == 0:
            raise InputError("hours", "must be a non-empty DatetimeIndex")
        if hours.tz is None:
            raise InputError("hours", "must be tz-aware (UTC)")
        if len(hours) > 1 and not ((hours[1:] - hours[:-1]) == _H).all():
            raise InputError("hours", "must be consecutive whole hours")
        n = len(hours)
        plan = _array("plan_cpu_cores", self.plan_cpu_cores, n, allow_nan=True)
        if not math.isfinite(plan[0]):
            raise InputError("plan_cpu_cores", f"the hour being corrected ({hours[0]:%Y-%m-%d %H:%M}Z) has no plan "
                                               "of record")
        object.__setattr__(self, "plan_cpu_cores", plan)
        object.__setattr__(self, "arrivals_core_hours", _array("arrivals_core_hours", self.arrivals_core_hours, n))
        cap = _scalar("capacity_cores", self.capacity_cores)
        if cap <= 0:
            raise InputError("capacity_cores", f"must be > 0, got {self.capacity_cores!r}")
        for name in ("planning_margin_hours", "arrival_deadline_hours"):
            _scalar(name, getattr(self, name))
        if not isinstance(self.backlog, (tuple, list)):
            raise InputError("backlog", f"must be a sequence of WorkItem, got {type(self.backlog).__name__}")
        object.__setattr__(self, "backlog", tuple(self.backlog))


def _array(name: str, value, n: int, allow_nan: bool = False) -> np.ndarray:
    try:
        arr = np.array(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise InputError(name, f"is not numeric ({exc})") from None
    if arr.shape != (n,):
        raise InputError(name, f"has shape {arr.shape}, expected ({n},): one value per hour")
    bad = np.isinf(arr) | (np.isnan(arr) if not allow_nan else False)
    if bad.any():
        raise InputError(name, f"hour {int(np.argmax(bad))}: NaN or infinite")
    if (arr < 0).any():
        h = int(np.nanargmin(arr))
        raise InputError(name, f"hour {h}: must be >= 0, got {arr[h]:g}")
    return arr


def _scalar(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(name, f"must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise InputError(name, f"must be finite and >= 0, got {value!r}")
    return v


def backlog_arrays(items, start: pd.Timestamp) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(work hours, width cores, deadline in hours from ``start``) of the items with work left. Bad input raises
    InputError naming the item and field, e.g. ``backlog[3].remaining_core_hours``."""
    work, width, deadline = [], [], []
    for i, item in enumerate(items):
        if not isinstance(item, WorkItem):
            raise InputError(f"backlog[{i}]", f"must be a WorkItem, got {type(item).__name__}")
        rem = _item_number(i, "remaining_core_hours", item.remaining_core_hours)
        cores = _item_number(i, "width_cores", item.width_cores)
        try:
            due = pd.Timestamp(item.deadline)
        except (TypeError, ValueError):
            raise InputError(f"backlog[{i}].deadline", f"is not a time: {item.deadline!r}") from None
        if due is pd.NaT or pd.isna(due):
            raise InputError(f"backlog[{i}].deadline", "is missing (NaT)")
        if due.tzinfo is None:
            raise InputError(f"backlog[{i}].deadline", "must be tz-aware (UTC)")
        if rem == 0:
            continue
        if cores == 0:
            raise InputError(f"backlog[{i}].width_cores", f"must be > 0 for work left ({rem:g} core-hours)")
        work.append(rem / cores)
        width.append(cores)
        deadline.append((due - start) / _H)
    return np.array(work, float), np.array(width, float), np.array(deadline, float)


def _item_number(i: int, name: str, value) -> float:
    field = f"backlog[{i}].{name}"
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(field, f"must be a number, got {value!r}") from None
    if math.isnan(v):
        raise InputError(field, "is NaN")
    if math.isinf(v):
        raise InputError(field, "is infinite")
    if v < 0:
        raise InputError(field, f"must be >= 0, got {v:g}")
    return v


def carry_core_hours(plan_cpu_cores, served_cpu_cores) -> float:
    """What the plan of record released in the day's earlier hours and the cluster did not run:
    max(Σ (plan − served), 0) over the hours where both are known (an hour whose usage is not known counts as
    run to plan: the carry never grows from missing data)."""
    plan = np.asarray(plan_cpu_cores, float)
    served = np.asarray(served_cpu_cores, float)
    if plan.shape != served.shape:
        raise InputError("served_cpu_cores", f"has shape {served.shape}, expected {plan.shape}")
    ok = np.isfinite(plan) & np.isfinite(served)
    return max(float((plan[ok] - served[ok]).sum()), 0.0)


def queue_cluster(inp: CorrectionInput) -> QueueCluster:
    """The re-plan's :class:`cicm.optimize.queue.QueueCluster`: bounds from the backlog and the arrivals, the plan
    of record as the limit (the room where there is none)."""
    n = len(inp.hours)
    work, width, due = backlog_arrays(inp.backlog, inp.hours[0])
    must, avail = task_bounds(n, np.zeros(work.size), work, width, due, inp.planning_margin_hours)
    m2, a2 = arrival_bounds(inp.arrivals_core_hours, inp.arrival_deadline_hours - inp.planning_margin_hours)
    limit = np.where(np.isfinite(inp.plan_cpu_cores), inp.plan_cpu_cores, inp.capacity_cores)
    return QueueCluster(inp.name, inp.inflexible_cpu_cores, inp.inflexible_upper_cpu_cores, inp.capacity_cores,
                        must + m2, avail + a2, inp.power_curve, limit_cpu_cores=limit,
                        carry_core_hours=inp.carry_core_hours)


def correct_hour(inp: CorrectionInput) -> Correction:
    """The hour's flexible allowance from a re-plan of the live backlog (see the module doc)."""
    hour = inp.hours[0]
    plan0 = float(inp.plan_cpu_cores[0])
    qc = queue_cluster(inp)
    committed = np.zeros(len(inp.hours), bool)
    committed[0] = True
    campus = QueueCampus(inp.name, (qc,), inp.carbon_gco2_per_kwh, committed=committed, lambda_e=inp.lambda_e,
                         lambda_p=inp.lambda_p, solver=inp.solver)
    qp = plan_queue(campus)
    service, late, over = qp.service_cpu_cores[0], qp.late_core_hours[0], qp.over_cpu_cores[0]
    room = qp.room_cpu_cores[0]
    carry = qc.carry_core_hours
    base = dict(hour=hour, plan_cores=plan0, carry_core_hours=carry, service_cpu_cores=service,
                late_core_hours=late, over_cpu_cores=over, room_cpu_cores=room)
    if qp.status[0] != "optimal":
        why = qp.detail.get("solver_error") or qp.reason[0] or "no solution"
        return Correction(allowance_cores=plan0, deviation=None, status="fallback",
                          note=f"re-plan failed ({why}): the plan of record applies", **base)
    scale = max(float(room.max()), 1.0)
    eps = NEED_RTOL * scale
    in_plan = plan0 + carry  # what the plan of record lets run this hour (its release + the earlier shortfall)
    # A deadline needs more than the plan: the re-plan expects lateness, or runs this hour ahead of the plan's
    # cumulative release (read from the service itself: the LP's over-plan variables are degenerate in time).
    ahead = float(service[0]) - (carry + min(plan0, float(room[0])))
    need = float(late.max()) > eps or ahead > eps
    cap = correction_cap(service, late, room)
    if not math.isfinite(cap):  # saturated: no cap if a deadline needs it, else as much as the plan allows
        cap = inp.capacity_cores if need else min(in_plan, inp.capacity_cores)
    allowance = max(float(cap), 0.0)
    if not need:
        allowance = min(allowance, in_plan)  # never above the plan of record without a deadline that needs it
    tol = max(DEVIATION_RTOL * max(scale, plan0), 1e-9)
    if not need and abs(allowance - plan0) <= tol:
        allowance = plan0  # a difference this small is noise: apply the plan of record exactly
    deviation = None
    if allowance > plan0 + (eps if need else tol):
        if need:
            reason, detail = REASON_DEADLINE, _deadline_detail(inp, qc, late, ahead, allowance, plan0)
        else:
            reason = REASON_CATCH_UP
            detail = (f"the plan of record released {carry:,.0f} core-hours earlier today that did not run; the "
                      f"re-plan runs {allowance - plan0:,.0f} cores of them this hour")
        deviation = Deviation(hour, plan0, allowance, reason, detail)
    elif allowance < plan0 - tol:
        can_run = float(qc.avail_core_hours[0])
        if service[0] >= can_run - max(tol, eps):
            reason = REASON_BELOW
            detail = (f"the live backlog and this hour's forecast arrivals allow {can_run:,.0f} core-hours this hour, "
                      f"the plan of record released {plan0:,.0f}")
        else:
            reason = REASON_DEFERRED
            nxt = _next_cleaner(inp, service)
            detail = (f"{can_run - service[0]:,.0f} core-hours could run now; the re-plan holds them for later hours"
                      + (f" (e.g. {nxt})" if nxt else "") + "; the live backlog's deadlines allow it")
        deviation = Deviation(hour, plan0, allowance, reason, detail)
    return Correction(allowance_cores=allowance, deviation=deviation, status="optimal", **base)


def _deadline_detail(inp: CorrectionInput, qc: QueueCluster, late, ahead: float, allowance: float,
                     plan0: float) -> str:
    parts = []
    due = [it.deadline for it in inp.backlog if float(it.remaining_core_hours) > 0]
    if due:
        first = min(pd.Timestamp(d).tz_convert("UTC") for d in due)
        parts.append(f"backlog due from {first:%Y-%m-%d %H:%M}Z (planned {inp.planning_margin_hours:g} h early)")
    released = np.flatnonzero(np.nan_to_num(inp.plan_cpu_cores[1:], nan=np.inf) > DEVIATION_RTOL * max(plan0, 1.0))
    if plan0 <= DEVIATION_RTOL and released.size:
        parts.append(f"the plan of record releases nothing before {inp.hours[1 + released[0]]:%Y-%m-%d %H:%M}Z")
    if float(late.max()) > NEED_RTOL * max(float(qc.room_cpu_cores.max()), 1.0):
        parts.append(f"the re-plan still expects up to {float(late.max()):,.0f} core-hours late: no cap this hour")
    if ahead > 0:
        parts.append(f"the re-plan runs {ahead:,.0f} cores ahead of the plan's cumulative release this hour")
    parts.append(f"allowance {allowance:,.0f} cores for a plan of {plan0:,.0f}")
    return "; ".join(parts)


def _next_cleaner(inp: CorrectionInput, service) -> str | None:
    later = np.flatnonzero(service[1:] > 0)
    if not later.size:
        return None
    h = 1 + int(later[0])
    return f"{service[h]:,.0f} cores at {inp.hours[h]:%H:%M}Z, {inp.carbon_gco2_per_kwh[h]:.0f} gCO2/kWh"


__all__ = ["WorkItem", "Deviation", "Correction", "CorrectionInput", "correct_hour", "carry_core_hours",
           "backlog_arrays", "queue_cluster", "REASONS", "REASON_DEADLINE", "REASON_CATCH_UP", "REASON_BELOW",
           "REASON_DEFERRED"]
