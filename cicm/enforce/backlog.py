"""Where the agent's hourly correction gets the live backlog: a small interface and its implementations.

A backlog source answers ``snapshot(hour, hours)`` with a :class:`BacklogSnapshot`: the flexible work queued at
``as_of`` (:class:`cicm.enforce.correction.WorkItem`: remaining core-hours, width, deadline), the forecast
arrivals over ``hours`` (core-hours per hour), and the flexible usage the cluster actually ran in the hours
before (for the plan's carry). A source that cannot answer raises :class:`BacklogUnavailable` (bad rows:
:class:`cicm.errors.InputError` naming the column); the agent then applies the plan of record as it is (and says
why in the audit).

- :class:`StoreBacklogSource` (the one real source today): the store's ``usage_history``. The backlog is the FIFO
  queue of ``flexible_arrived_core_hours`` minus ``flexible_cpu_cores`` over the last ``window_hours``
  (:func:`cicm.optimize.queue.fifo_backlog`, as the nightly queue plan measures it in
  ``cicm.planning.stages.queue_cluster``): one item per arrival hour, due 24 h after it, its width unknown
  (it may run within one hour). Forecast arrivals: :func:`cicm.models.arrivals.forecast_arrivals` on the same
  history. The backlog is only as fresh as the newest usage row (``as_of``).
- :class:`StaticBacklogSource`: a fixed snapshot (tests, replays).
- :class:`cicm.enforce.slurm.SlurmBacklogSource`: Slurm's queue (``--enforce slurm``), built on this seam:
  a class with the same ``describe()`` and
  ``snapshot()`` that lists the scheduler's pending and running jobs as ``WorkItem`` (remaining core-hours =
  cores × the time left of its limit, width = its cores, deadline = its submit time + 24 h or its own), with
  ``as_of`` = the time of the query, and takes its arrival forecast and served usage from a
  ``StoreBacklogSource`` (``snapshot(...).arrivals_core_hours``). Nothing else in the agent changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pandas as pd

from cicm.errors import InputError

if TYPE_CHECKING:  # the correction (and its queue program's cvxpy) is imported only when a backlog is read
    from cicm.enforce.correction import WorkItem

_H = pd.Timedelta(hours=1)

BACKLOG_WINDOW_HOURS = 48  # the nightly queue plan measures its FIFO backlog over the same window
DEADLINE_HOURS = 24.0  # flexible work is due 24 h after it arrives
HISTORY_DAYS = 63  # arrival forecasts: 4 weeks of EWMA plus 28 days of back-cast errors


class BacklogUnavailable(RuntimeError):
    """The backlog could not be read (no store, no usage history, locked)."""


@dataclass(frozen=True)
class BacklogSnapshot:
    as_of: pd.Timestamp  # the backlog is what was queued at this time (end of the newest usage hour)
    items: tuple[WorkItem, ...]
    arrivals_core_hours: np.ndarray  # forecast arrivals over the requested hours
    served_cpu_cores: pd.Series = field(default_factory=lambda: pd.Series(dtype=float))  # by UTC hour
    source: str = ""
    note: str = ""

    @property
    def backlog_core_hours(self) -> float:
        return float(sum(float(i.remaining_core_hours) for i in self.items))


class BacklogSource(Protocol):
    def describe(self) -> str: ...

    def snapshot(self, hour: pd.Timestamp, hours: pd.DatetimeIndex) -> BacklogSnapshot: ...


class StaticBacklogSource:
    """A fixed snapshot (its arrivals are cut or padded with zeros to the hours asked for)."""

    def __init__(self, snapshot: BacklogSnapshot):
        self._snapshot = snapshot

    def describe(self) -> str:
        return "static backlog"

    def snapshot(self, hour: pd.Timestamp, hours: pd.DatetimeIndex) -> BacklogSnapshot:
        arr = np.asarray(self._snapshot.arrivals_core_hours, float)[: len(hours)]
        arr = np.concatenate([arr, np.zeros(len(hours) - arr.size)])
        s = self._snapshot
        return BacklogSnapshot(s.as_of, s.items, arr, s.served_cpu_cores, s.source or "static", s.note)


def fifo_items(arrived: pd.Series, served: pd.Series, as_of: pd.Timestamp,
               window_hours: int = BACKLOG_WINDOW_HOURS, deadline_hours: float = DEADLINE_HOURS
               ) -> tuple[WorkItem, ...]:
    """The FIFO backlog at ``as_of`` from hourly arrivals and flexible usage (UTC-indexed, same index): one item
    per arrival hour with work left, due ``deadline_hours`` after that hour, width = its remaining work."""
    from cicm.enforce.correction import WorkItem
    from cicm.optimize.queue import fifo_backlog

    recent = arrived.index >= as_of - window_hours * _H
    left = fifo_backlog(arrived[recent].to_numpy(float), served[recent].to_numpy(float))
    hours = arrived.index[recent]
    return tuple(WorkItem(float(b), float(b), h + pd.Timedelta(hours=deadline_hours))
                 for b, h in zip(left, hours) if b != 0)  # NaN, negative stay: the correction rejects them, naming them


class StoreBacklogSource:
    """The backlog from the store's usage history (see the module doc). Opens the store read-only per call."""

    def __init__(self, db_path: Path | str, cluster: str, window_hours: int = BACKLOG_WINDOW_HOURS,
                 arrival_quantile: float = 0.9):
        self.path = Path(db_path)
        self.cluster = cluster
        self.window_hours = window_hours
        self.arrival_quantile = arrival_quantile

    def describe(self) -> str:
        return f"usage history in {self.path}"

    def snapshot(self, hour: pd.Timestamp, hours: pd.DatetimeIndex) -> BacklogSnapshot:
        import duckdb

        from cicm.store import Store
        from cicm.models.arrivals import forecast_arrivals

        try:
            with Store(self.path, read_only=True) as store:
                rows = store.usage_history(self.cluster, before=hour, days=HISTORY_DAYS)
        except (duckdb.Error, InputError, OSError) as exc:
            raise BacklogUnavailable(f"store {self.path}: {str(exc).splitlines()[0][:200]}") from exc
        if rows.empty:
            raise BacklogUnavailable(f"no usage history for {self.cluster} before {hour:%Y-%m-%d %H:%M}Z")
        index = pd.DatetimeIndex(rows["hour"]).tz_convert("UTC")
        for col in ("flexible_arrived_core_hours", "flexible_cpu_cores"):
            values = rows[col].to_numpy(float)
            bad = ~(values >= 0) | np.isinf(values)
            if bad.any():
                i = int(np.argmax(bad))
                raise InputError(col, f"usage history of {self.cluster} at {index[i]:%Y-%m-%d %H:%M}Z: {values[i]:g} "
                                      "(must be a number >= 0)")
        arrived = pd.Series(rows["flexible_arrived_core_hours"].to_numpy(float), index=index)
        served = pd.Series(rows["flexible_cpu_cores"].to_numpy(float), index=index)
        as_of = index.max() + _H
        items = fifo_items(arrived, served, as_of, self.window_hours)
        note = ""
        try:
            arrivals = forecast_arrivals(arrived, hours, quantile=self.arrival_quantile).core_hours
        except InputError as exc:  # a short or bad history: plan with no arrivals, and say so
            arrivals = np.zeros(len(hours))
            note = f"no arrival forecast ({exc}): planned with the backlog alone"
        return BacklogSnapshot(as_of, items, np.asarray(arrivals, float), served, self.describe(), note)


__all__ = ["BacklogSnapshot", "BacklogSource", "BacklogUnavailable", "StaticBacklogSource", "StoreBacklogSource",
           "fifo_items"]
