"""A cluster simulator with an admission queue: hourly steps, job-level queue, pure (no I/O).

Model (docs/backtests.md has the reasoning):

- Time is counted in hours since the simulation's first hour ``t0`` (UTC); slot ``h`` is ``[h, h + 1)``.
- **Inflexible** work runs on arrival: its usage ``inflexible_cpu_cores[h]`` is given and is never queued.
- **Flexible** work is a list of real batch jobs (arrival, length_hours, cpu_cores). A job needs ``cpu_cores`` for
  ``length_hours`` of run time. A job wider than ``max_task_cores`` is split into equal tasks no wider than that
  (a batch job is a set of tasks; the job finishes when its last task does). Without the split a single trace job
  can be wider than the whole cluster and would never fit under any cap.
- Every hour the scheduler admits the waiting and running tasks in least-laxity-first order (laxity = deadline
  - end of the slot - remaining run time; deadline = arrival + 24 h), greedily, skipping a task that does not fit
  and trying the next (backfill), while the hour's **flexible usage** (core-hours in the slot / 1 h, i.e. the
  hour's mean) stays within ``limit[h] = min(flexible_cap[h], capacity - inflexible[h])``. Tasks are checkpointable: a task that no
  longer fits when the cap drops is suspended and resumes later with its progress (the suspend/resume model of
  Wait Awhile; CICM's caps act the same way on admission).
- A task arriving inside a slot can run only for the rest of that slot; a task runs ``min(remaining, available)``
  hours in a slot. It finishes at ``max(slot start, arrival) + run``, hour-level precision.
- Optional **deadline guard**: a task that can no longer meet its deadline unless it runs in this slot bypasses the
  cap (never the machine capacity). Off by default; used by the deadline-aware threshold baseline. With
  ``guard_hours`` > 0 it acts that many hours earlier (laxity below guard_hours), so that a burst of tasks that
  all turn urgent together still finds room before their deadlines (the queue-aware planner uses 2 h).

A job is **late** if it finishes more than 24 h after its arrival (or never, within the simulated hours). Its
**delay** is ``finish - (arrival + length_hours)``: the extra time queueing and suspension cost it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cicm.errors import InputError

DEADLINE_HOURS = 24.0
_EPS = 1e-9


@dataclass(frozen=True, eq=False)
class Tasks:
    """Flexible work as tasks, sorted by arrival. Times in hours since ``t0``."""

    t0: pd.Timestamp
    job: np.ndarray  # (T,) int job index into `jobs`
    arrival_h: np.ndarray  # (T,)
    work_h: np.ndarray  # (T,) run time needed
    cores: np.ndarray  # (T,)
    jobs: pd.DataFrame  # one row per job: arrival (UTC), length_hours, cpu_cores, arrival_h, n_tasks

    @property
    def n_tasks(self) -> int:
        return int(self.job.shape[0])

    @property
    def core_hours(self) -> float:
        return float((self.cores * self.work_h).sum())


def make_tasks(jobs: pd.DataFrame, t0: pd.Timestamp, t_end: pd.Timestamp, max_task_cores: float) -> Tasks:
    """The jobs arriving in ``[t0, t_end)`` as tasks no wider than ``max_task_cores``. Pure."""
    for col in ("arrival", "length_hours", "cpu_cores"):
        if col not in jobs.columns:
            raise InputError(col, "column missing from the flexible jobs")
    if not (max_task_cores > 0):
        raise InputError("max_task_cores", f"must be > 0, got {max_task_cores!r}")
    inside = (jobs["arrival"] >= t0) & (jobs["arrival"] < t_end)
    sel = jobs.loc[inside, ["arrival", "length_hours", "cpu_cores"]].sort_values("arrival", kind="stable")
    sel = sel[(sel["length_hours"] > 0) & (sel["cpu_cores"] > 0)].reset_index(drop=True)
    lengths = sel["length_hours"].to_numpy(float)
    if (lengths > DEADLINE_HOURS + _EPS).any():
        raise InputError("length_hours", f"a flexible job is longer than its {DEADLINE_HOURS:g} h deadline")
    arrival_h = (sel["arrival"] - t0).dt.total_seconds().to_numpy() / 3600.0
    cores = sel["cpu_cores"].to_numpy(float)
    n = np.ceil(cores / max_task_cores - 1e-12).astype(int).clip(min=1)
    sel["arrival_h"] = arrival_h
    sel["n_tasks"] = n
    job = np.repeat(np.arange(len(sel)), n)
    return Tasks(t0=t0, job=job, arrival_h=np.repeat(arrival_h, n), work_h=np.repeat(lengths, n),
                 cores=np.repeat(cores / n, n), jobs=sel)


@dataclass
class SimResult:
    flexible_cpu_cores: np.ndarray  # (N,) hourly mean flexible usage
    limit_cpu_cores: np.ndarray  # (N,) the limit applied (cap clipped to the machine room)
    task_finish_h: np.ndarray  # (T,) NaN if unfinished
    task_start_h: np.ndarray  # (T,) first time it ran, NaN if never
    remaining_core_hours: float  # work left at the end of the simulated hours
    guard_core_hours: float  # core-hours run above the cap by the deadline guard


class ClusterSim:
    """One cluster's flexible queue, stepped hour by hour (so a closed-loop planner can look at the state)."""

    def __init__(self, tasks: Tasks, inflexible_cpu_cores: np.ndarray, capacity_cores: float,
                 deadline_guard: bool = False, guard_hours: float = 0.0):
        self.tasks = tasks
        self.inflexible = np.asarray(inflexible_cpu_cores, dtype=float)
        if self.inflexible.ndim != 1 or np.isnan(self.inflexible).any():
            raise InputError("inflexible_cpu_cores", "must be a 1-D array without NaN")
        if not capacity_cores > 0:
            raise InputError("capacity_cores", f"must be > 0, got {capacity_cores!r}")
        self.capacity = float(capacity_cores)
        self.deadline_guard = deadline_guard
        if not 0.0 <= guard_hours < DEADLINE_HOURS:
            raise InputError("guard_hours", f"must be in [0, {DEADLINE_HOURS:g}), got {guard_hours!r}")
        self.guard_hours = float(guard_hours)
        n_h = len(self.inflexible)
        self.cap = np.full(n_h, np.inf)  # flexible cap (usage cores); set per day by the policy
        self.usage = np.zeros(n_h)
        self.limit = np.full(n_h, np.nan)
        self.remaining = tasks.work_h.astype(float).copy()
        self.start = np.full(tasks.n_tasks, np.nan)
        self.finish = np.full(tasks.n_tasks, np.nan)
        self.deadline = tasks.arrival_h + DEADLINE_HOURS
        self.active = np.zeros(0, dtype=int)
        self.next_task = 0
        self.hour = 0  # next slot to simulate
        self.guard_core_hours = 0.0

    @property
    def n_hours(self) -> int:
        return len(self.inflexible)

    def set_cap(self, first_hour: int, cap_cpu_cores: np.ndarray) -> None:
        """Set the flexible cap (usage cores) for slots first_hour.. (only future slots may change)."""
        cap = np.asarray(cap_cpu_cores, dtype=float)
        if first_hour < self.hour:
            raise InputError("first_hour", f"slot {first_hour} is already simulated (now at {self.hour})")
        if np.isnan(cap).any():
            raise InputError("cap_cpu_cores", "contains NaN")
        end = min(first_hour + len(cap), self.n_hours)
        self.cap[first_hour:end] = cap[: end - first_hour]

    def advance(self, until_hour: int) -> None:
        """Simulate slots [self.hour, until_hour)."""
        until_hour = min(int(until_hour), self.n_hours)
        for h in range(self.hour, until_hour):
            self._slot(h)
        self.hour = max(self.hour, until_hour)

    def _slot(self, h: int) -> None:
        t = self.tasks
        end = int(np.searchsorted(t.arrival_h, h + 1.0, side="left"))
        if end > self.next_task:
            self.active = np.concatenate([self.active, np.arange(self.next_task, end)])
            self.next_task = end
        room = max(self.capacity - self.inflexible[h], 0.0)
        limit = max(min(self.cap[h], room), 0.0)
        self.limit[h] = limit
        act = self.active
        if act.size == 0:
            return
        # Least laxity first: the slack a task would have left at the end of this slot if it did not run.
        laxity = self.deadline[act] - (h + 1.0) - self.remaining[act]
        act = act[np.argsort(laxity, kind="stable")]
        begin = np.maximum(float(h), t.arrival_h[act])
        avail = (h + 1.0) - begin
        run = np.minimum(self.remaining[act], avail)
        need = t.cores[act] * run
        chosen = np.zeros(act.size, dtype=bool)
        used = 0.0
        if self.deadline_guard:
            # Must run now: even running without pause from the end of this slot it would miss the deadline.
            urgent = np.sort(laxity, kind="stable") < self.guard_hours - _EPS
            if urgent.any():
                chosen, used = _greedy(need, urgent, room, chosen, 0.0)
        if need[~chosen].sum() + used <= limit * (1 + 1e-12):
            chosen[:] = True
            used = float(need.sum())
        else:
            chosen, used = _greedy(need, ~chosen, limit, chosen, used)
        if self.deadline_guard:
            self.guard_core_hours += max(used - limit, 0.0)
        idx = act[chosen]
        r = run[chosen]
        self.usage[h] = used
        first = np.isnan(self.start[idx])
        self.start[idx[first]] = begin[chosen][first]
        self.remaining[idx] -= r
        done = self.remaining[idx] <= 1e-9
        self.finish[idx[done]] = begin[chosen][done] + r[done]
        self.remaining[idx[done]] = 0.0
        if done.any():
            act = self.active
            self.active = act[self.remaining[act] > 0.0]

    def result(self) -> SimResult:
        left = float((self.remaining * self.tasks.cores).sum())
        return SimResult(self.usage.copy(), self.limit.copy(), self.finish.copy(), self.start.copy(), left,
                         self.guard_core_hours)


def _greedy(need: np.ndarray, eligible: np.ndarray, limit: float, chosen: np.ndarray,
            used: float) -> tuple[np.ndarray, float]:
    """Admit eligible tasks in order while the total stays within ``limit`` (skip what does not fit)."""
    chosen = chosen.copy()
    idx = np.flatnonzero(eligible)
    if idx.size == 0:
        return chosen, used
    cum = used + np.cumsum(need[idx])
    # The prefix that fits is admitted at once; the rest one by one (backfill).
    k = int(np.searchsorted(cum, limit * (1 + 1e-12) + 1e-9, side="right"))
    chosen[idx[:k]] = True
    used = float(cum[k - 1]) if k else used
    rest = idx[k:]
    if rest.size:
        rest_need = need[rest]
        floor = np.minimum.accumulate(rest_need[::-1])[::-1]  # smallest need from here on
        tol = limit * 1e-12 + 1e-9
        for j, i in enumerate(rest):
            if limit - used < floor[j] - tol:
                break
            if used + rest_need[j] <= limit + tol:
                chosen[i] = True
                used += float(rest_need[j])
    return chosen, used


def simulate(tasks: Tasks, inflexible_cpu_cores: np.ndarray, capacity_cores: float, cap_cpu_cores: np.ndarray,
             deadline_guard: bool = False) -> SimResult:
    """Open-loop run: the whole cap is known in advance."""
    sim = ClusterSim(tasks, inflexible_cpu_cores, capacity_cores, deadline_guard=deadline_guard)
    sim.set_cap(0, cap_cpu_cores)
    sim.advance(sim.n_hours)
    return sim.result()


def job_outcomes(tasks: Tasks, result: SimResult) -> pd.DataFrame:
    """One row per job: arrival, length, cores, finish_h, delay_hours, late."""
    jobs = tasks.jobs
    n_jobs = len(jobs)
    finish = np.full(n_jobs, -np.inf)
    f = np.where(np.isnan(result.task_finish_h), np.inf, result.task_finish_h)
    np.maximum.at(finish, tasks.job, f)
    ideal = jobs["arrival_h"].to_numpy() + jobs["length_hours"].to_numpy()
    delay = finish - ideal
    late = finish > jobs["arrival_h"].to_numpy() + DEADLINE_HOURS + 1e-6
    return pd.DataFrame({
        "arrival": jobs["arrival"].to_numpy(), "arrival_h": jobs["arrival_h"].to_numpy(),
        "length_hours": jobs["length_hours"].to_numpy(), "cpu_cores": jobs["cpu_cores"].to_numpy(),
        "core_hours": jobs["length_hours"].to_numpy() * jobs["cpu_cores"].to_numpy(),
        "finish_h": finish, "delay_hours": np.maximum(delay, 0.0), "late": late,
        "finished": np.isfinite(finish),
    })
