"""The backtest's policies: each a small class following :class:`BacktestPolicy`, found by name in :data:`POLICIES`.

A policy simulates every cluster of a :class:`~cicm.backtest.segment.Segment` under its own caps, stores one
:class:`~cicm.backtest.segment.PolicyRun` per cluster in ``Segment.runs`` and returns its per cluster-day rows
(None for a policy without any). The runner runs the selected policies in registry order, which is the order of
the table: carbon-agnostic (the baseline) first, the oracle last.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar, Mapping, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from cicm.backtest.ceiling_policy import run_ceiling
from cicm.backtest.queue_policy import run_queue_policy
from cicm.backtest.segment import ClusterData, Segment, run_open_loop
from cicm.errors import InputError

if TYPE_CHECKING:
    from cicm.backtest.runner import BacktestOptions
    from cicm.planning.stages import CampusDay

#: Advances the progress bar by one step; the label says what finished.
Tick = Callable[[str], None]


@runtime_checkable
class BacktestPolicy(Protocol):
    """One way of capping flexible work, simulated over a segment."""

    name: ClassVar[str]

    def progress_ticks(self, n_days: int) -> int:
        """How many times :meth:`run` calls ``tick`` for ``n_days`` days."""
        ...

    def run(self, seg: Segment, campus_days: list[CampusDay], options: BacktestOptions,
            data: Mapping[str, ClusterData], tick: Tick) -> pd.DataFrame | None:
        """Simulate every cluster, store the runs in ``seg.runs``; per cluster-day rows, or None."""
        ...


class CarbonAgnosticPolicy:
    """No cap: flexible jobs run as soon as the machines have room (the baseline)."""

    name: ClassVar[str] = "carbon-agnostic"

    def progress_ticks(self, n_days: int) -> int:
        return 1

    def run(self, seg: Segment, campus_days: list[CampusDay], options: BacktestOptions,
            data: Mapping[str, ClusterData], tick: Tick) -> pd.DataFrame | None:
        no_cap_cpu_cores = np.full(len(seg.hours), np.inf)
        for c in seg.campus.clusters:
            run_open_loop(seg, c, self.name, no_cap_cpu_cores)
        tick(self.name)
        return None


class ThresholdPolicy:
    """Wait Awhile's suspend/resume: flexible work runs only in hours whose day-ahead forecast is at or below the
    local day's ``threshold_quantile`` (cap 0 otherwise)."""

    name: ClassVar[str] = "threshold"
    deadline_guard: ClassVar[bool] = False

    def progress_ticks(self, n_days: int) -> int:
        return 1

    def run(self, seg: Segment, campus_days: list[CampusDay], options: BacktestOptions,
            data: Mapping[str, ClusterData], tick: Tick) -> pd.DataFrame | None:
        cap_cpu_cores = threshold_cap(seg, options.threshold_quantile)
        for c in seg.campus.clusters:
            run_open_loop(seg, c, self.name, cap_cpu_cores, deadline_guard=self.deadline_guard)
        tick(self.name)
        return None


class ThresholdGuardPolicy(ThresholdPolicy):
    """The threshold policy, but a task that would otherwise miss its deadline runs anyway (within the machines)."""

    name: ClassVar[str] = "threshold-guard"
    deadline_guard: ClassVar[bool] = True


class CicmCeilingPolicy:
    """The CICM ceiling program (the paper's), planned nightly on the closed-loop history."""

    name: ClassVar[str] = "cicm-ceiling"

    def progress_ticks(self, n_days: int) -> int:
        return n_days

    def run(self, seg: Segment, campus_days: list[CampusDay], options: BacktestOptions,
            data: Mapping[str, ClusterData], tick: Tick) -> pd.DataFrame | None:
        return run_ceiling(seg, campus_days, options, data, self.name, lambda: tick(f"{self.name} day"))


class PlannerPolicy:
    """The queue-aware planner: a nightly plan of record, corrected every hour from the live backlog."""

    name: ClassVar[str] = "planner"

    def progress_ticks(self, n_days: int) -> int:
        return n_days

    def run(self, seg: Segment, campus_days: list[CampusDay], options: BacktestOptions,
            data: Mapping[str, ClusterData], tick: Tick) -> pd.DataFrame | None:
        return run_queue_policy(seg, campus_days, options, data, self.name, perfect_foresight=False,
                                tick=lambda: tick(f"{self.name} day"))


class OraclePolicy:
    """The queue-aware program and its hourly correction with perfect foresight."""

    name: ClassVar[str] = "oracle"

    def progress_ticks(self, n_days: int) -> int:
        return 1

    def run(self, seg: Segment, campus_days: list[CampusDay], options: BacktestOptions,
            data: Mapping[str, ClusterData], tick: Tick) -> pd.DataFrame | None:
        rows = run_queue_policy(seg, campus_days, options, data, self.name, perfect_foresight=True)
        tick(self.name)
        return rows


#: Every policy by name, in the order they run and are reported.
POLICIES: dict[str, type[BacktestPolicy]] = {
    cls.name: cls for cls in (CarbonAgnosticPolicy, ThresholdPolicy, ThresholdGuardPolicy, CicmCeilingPolicy,
                              PlannerPolicy, OraclePolicy)
}
#: The policy every other one is compared with; always run.
BASELINE = CarbonAgnosticPolicy.name


def policy_class(name: str) -> type[BacktestPolicy]:
    """The registered class for ``name``; an unknown name raises InputError listing the valid ones."""
    try:
        return POLICIES[name]
    except (KeyError, TypeError):
        raise InputError("policies", f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None


def selected_policies(names: tuple[str, ...]) -> list[BacktestPolicy]:
    """Instances of the policies called ``names``, in registry order (unknown names raise InputError)."""
    chosen = {policy_class(n).name for n in names}
    return [cls() for name, cls in POLICIES.items() if name in chosen]


def threshold_cap(seg: Segment, quantile: float) -> np.ndarray:
    """Flexible cap per simulated hour: none where the day-ahead forecast is at or below the local day's
    ``quantile``, 0 elsewhere in the window; none in the drain."""
    cap_cpu_cores = np.full(len(seg.hours), np.inf)
    for k in range(len(seg.days)):
        idx = np.flatnonzero(seg.day_of_hour == k)
        forecast_gco2_per_kwh = seg.forecast[idx]
        cap_cpu_cores[idx] = np.where(forecast_gco2_per_kwh <= np.quantile(forecast_gco2_per_kwh, quantile),
                                      np.inf, 0.0)
    return cap_cpu_cores
