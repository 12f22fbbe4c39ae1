"""What every backtest policy works on: a segment of consecutive days, each cluster's inputs, and the runs.

A policy reads a :class:`Segment` (the hours, the actual and forecast carbon, each cluster's inflexible usage,
reservation ratio and flexible tasks) and stores one :class:`PolicyRun` per cluster in ``Segment.runs``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

import numpy as np
import pandas as pd

from cicm.backtest.accounting import ClusterPower
from cicm.backtest.carbon_input import Forecaster, ZoneCarbon
from cicm.backtest.sim import SimResult, Tasks, job_outcomes, simulate
from cicm.config import Campus, Cluster
from cicm.errors import InputError


@dataclass
class ClusterData:
    """Everything the backtest needs about one cluster over the whole demo history (derived from real traces)."""

    cluster: Cluster
    usage: pd.DataFrame  # base (unshaped) telemetry: hour, inflexible/flexible/reserved cpu cores
    jobs: pd.DataFrame  # scaled flexible jobs: arrival, length_hours, cpu_cores
    ratio: pd.Series  # actual reservations / usage per hour (UTC index)
    power: ClusterPower


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
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # CPU time of each policy's run (the bench's split)
    memo: dict = field(default_factory=dict)  # what several policies compute alike (the forecast-value gate)


def hour_slots(hours: pd.DatetimeIndex, sub: pd.DatetimeIndex) -> np.ndarray:
    """Positions of the hours ``sub`` in the simulated ``hours``; an hour outside them is an error."""
    idx = hours.get_indexer(sub)
    if (idx < 0).any():
        raise InputError("hours", "day hours fall outside the simulated hours")
    return idx


def run_open_loop(seg: Segment, cluster: Cluster, policy: str, cap_cpu_cores: np.ndarray,
                  deadline_guard: bool = False, vcc_cores: np.ndarray | None = None) -> None:
    """Simulate ``cluster`` under a fixed flexible usage cap per hour; store the run as ``policy``'s."""
    tasks = seg.tasks[cluster.name]
    res = simulate(tasks, seg.inflexible[cluster.name], cluster.capacity_cores, cap_cpu_cores,
                   deadline_guard=deadline_guard)
    seg.runs[(policy, cluster.name)] = PolicyRun(policy, cluster.name, res, job_outcomes(tasks, res),
                                                 cap_cpu_cores, vcc_cores)


def vcc_to_cap(vcc_cores: np.ndarray, ratio: np.ndarray, inflexible_cpu_cores: np.ndarray) -> np.ndarray:
    """Flexible usage cap from a VCC in reservation cores: VCC / R_actual - inflexible (>= 0)."""
    return np.maximum(vcc_cores / ratio - inflexible_cpu_cores, 0.0)
