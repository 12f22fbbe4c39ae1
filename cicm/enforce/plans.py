"""Where the agent reads its VCCs: the store (system of record) or a published plan file.

The plan file is what ``cicm vcc show --cluster C --date D --json`` prints: one JSON document per cluster-day
(``cluster, plan_date, run_id, status, reason, ..., hours: [{hour, vcc_cores, flexible_cpu_cores,
gco2_per_kwh}]``). A file may also hold a JSON list of such documents (e.g. today's and tomorrow's plans).
Optional keys the agent uses when present: ``capacity_cores`` and ``planned_at`` (ISO 8601 with zone).

Both sources answer ``lookup(hour)`` with the cluster's plan covering that UTC hour (or none, plus the newest
plan they know, so the agent can tell a missing plan from a stale one). A source that cannot be read raises
:class:`PlanUnavailable`; the store source then serves the last plan it read if that one covers the hour
(DuckDB lets one process write at a time, so a nightly plan run can lock the file for a while; ``Store`` itself
retries a locked file for ``cicm.store.core.LOCK_RETRY_SECONDS`` first). The SQL is in ``cicm.store.agent``.
"""
from __future__ import annotations

import dataclasses

import json
import math
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from cicm.errors import InputError
from cicm.jsonsafe import MAX_BYTES, JSONRejected, loads_bounded


class PlanUnavailable(RuntimeError):
    """The plan source could not be read (missing, locked, malformed). ``kind``: for a store, what is wrong with
    the file (:mod:`cicm.enforce.storehealth`: missing, corrupt, locked, unreadable); None for a plan file."""

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class QueueContext:
    """What the hourly correction needs from a queue-program plan besides its hours: the program's knobs (from
    the plan run's parameters), the cluster's usable cores and its power curve (from the run's power models and
    the fleet file). ``problem`` says why the correction cannot run on this plan (None: it can)."""

    capacity_cores: float | None = None
    power_curve: object | None = None  # cicm.optimize.inputs.PowerCurve
    planning_margin_hours: float = 6.0
    lambda_e: float = 1.0
    lambda_p: float = 0.0
    solver: str = "HIGHS"
    problem: str | None = None


@dataclass(frozen=True)
class DayPlan:
    cluster: str
    plan_date: date
    run_id: str | None
    status: str  # "shaped" | "fallback"
    reason: str | None
    capacity_cores: float | None
    planned_at: pd.Timestamp | None
    hours: pd.DataFrame  # index: hour (UTC); columns vcc_cores, flexible_cpu_cores, gco2_per_kwh (+ from the store:
    #                       inflexible_cpu_cores, inflexible_upper_cpu_cores)
    source: str
    program: str = "ceiling"  # "queue": flexible_cpu_cores is planned service, the plan of record to correct
    queue: QueueContext | None = None  # queue plans read from the store
    # the campus's storage plan of the same run (store only; issue 16): index hour (UTC); columns load_kw,
    # solar_kw, solar_used_kw, curtailed_kw, charge_kw, discharge_kw, energy_kwh, energy_before_kwh, grid_kw;
    # None without one (the battery then follows the heuristic)
    storage: pd.DataFrame | None = None
    campus: str | None = None

    def storage_row(self, hour: pd.Timestamp) -> pd.Series | None:
        """The storage plan's hour, or None when the plan has no storage plan or it does not cover the hour."""
        if self.storage is None or hour not in self.storage.index:
            return None
        return self.storage.loc[hour]

    def covers(self, hour: pd.Timestamp) -> bool:
        return hour in self.hours.index

    @property
    def last_hour(self) -> pd.Timestamp:
        return self.hours.index.max()

    def row(self, hour: pd.Timestamp) -> pd.Series:
        return self.hours.loc[hour]

    def carbon(self) -> pd.Series:
        return self.hours["gco2_per_kwh"].astype(float)


@dataclass
class PlanLookup:
    plan: DayPlan | None
    newest: DayPlan | None = None  # the newest plan the source knows (for "stale" reasons)
    note: str | None = None  # e.g. "store locked: using the plan read at ..."
    problems: list[str] = field(default_factory=list)


def _float(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def _run_time(run_id: str | None) -> pd.Timestamp | None:
    """``new_run_id`` stamps ids as kind-YYYYmmddTHHMMSS-xxxxxx (UTC)."""
    if not run_id:
        return None
    parts = run_id.split("-")
    for p in parts:
        if len(p) == 15 and p[8] == "T":
            try:
                return pd.Timestamp(datetime.strptime(p, "%Y%m%dT%H%M%S"), tz="UTC")
            except ValueError:
                return None
    return None


# -------------------------------------------------------------------------------------------------- store


class StorePlanSource:
    """Plans in force from the store. ``cluster_config`` (the fleet file's ``Cluster``) lets a queue plan carry
    the cluster's power curve, rebuilt from the plan run's stored power models, for the hourly correction."""

    def __init__(self, db_path: Path | str, cluster: str, cluster_config=None, zone: str | None = None):
        self.path = Path(db_path)
        self.cluster = cluster
        self.cluster_config = cluster_config
        self.zone = zone  # the campus's grid zone: the correction re-plans with the newest carbon forecast
        self._cache: dict[date, DayPlan] = {}

    def describe(self) -> str:
        return f"store {self.path}"

    def lookup(self, hour: pd.Timestamp) -> PlanLookup:
        from cicm.store import Store, agent

        try:
            with Store(self.path, read_only=True) as store:
                found = agent.plan_dates_covering(store, self.cluster, hour)
                newest_date = agent.newest_plan_date(store, self.cluster)
                plan = self._read(store, found["plan_date"].iloc[0]) if not found.empty else None
                plan = self._with_operator_pause(store, plan)
                newest = None
                if newest_date is not None and not pd.isna(newest_date):
                    newest_date = pd.Timestamp(newest_date).date()
                    same = plan is not None and plan.plan_date == newest_date
                    newest = plan if same else self._read(store, newest_date)
        except (duckdb.Error, InputError, OSError) as exc:  # locked by a writer (after the store's retries), gone
            from cicm.enforce.storehealth import LOCKED, classify

            kind, message = classify(exc, self.path)
            if kind != LOCKED:  # deleted, corrupt: it will not come back by itself; never cap from memory
                self._cache.clear()
                raise PlanUnavailable(message, kind) from exc
            cached = [p for p in self._cache.values() if p.covers(hour)]
            if cached:
                return PlanLookup(cached[0], note=f"store unreadable ({message}); using the plan read before")
            raise PlanUnavailable(message, kind) from exc
        return PlanLookup(plan, newest)

    def _with_operator_pause(self, store, plan: DayPlan | None) -> DayPlan | None:
        """The plan, or a fallback with the operator's reason when shaping of the cluster is paused on its day
        (``cicm shaping pause``): the agent then lifts the caps at this pass, whatever the stored plan says."""
        from cicm.store import operator

        if plan is None or plan.status != "shaped":
            return plan
        reason = operator.pause_in_force(store, self.cluster, plan.plan_date)
        return plan if reason is None else dataclasses.replace(plan, status="fallback", reason=reason)

    def carbon_forecast(self, hours: pd.DatetimeIndex, issued_before: pd.Timestamp) -> pd.Series | None:
        """The newest carbon forecast vintage issued by ``issued_before`` for ``hours`` (NaN where there is none),
        or None without a zone or a readable store: the hourly correction then plans with the plan's carbon."""
        from cicm.store import Store, agent

        if self.zone is None:
            return None
        try:
            with Store(self.path, read_only=True) as store:
                found = agent.latest_carbon_forecast(store, self.zone, hours[0], hours[-1] + pd.Timedelta(hours=1),
                                                     issued_before=issued_before)
        except (duckdb.Error, InputError, OSError):
            return None
        if found.empty:
            return None
        series = found.set_index(pd.DatetimeIndex(found["target_hour"]).tz_convert("UTC"))["gco2_per_kwh"]
        return series.astype(float).reindex(hours)

    def _read(self, store, plan_date) -> DayPlan | None:
        from cicm.store import agent, plan as plan_store

        plan_date = pd.Timestamp(plan_date).date()
        cached = self._cache.get(plan_date)
        if cached is not None:  # the plan in force is still the one read before: no need to read it again
            current = agent.plan_run_in_force(store, self.cluster, plan_date)
            if not current.empty and current["run_id"].iloc[0] == cached.run_id:
                return cached
        hours, status = plan_store.plan_in_force(store, self.cluster, plan_date)
        if status.empty or hours.empty:
            return None
        info = status.iloc[0]
        run = agent.run_started_and_params(store, info["run_id"])
        planned_at = pd.Timestamp(run["started_at"].iloc[0]).tz_convert("UTC") if not run.empty else None
        params = _params(run["params"].iloc[0]) if not run.empty else {}
        program = str(params.get("program") or "ceiling")
        index = pd.DatetimeIndex(hours["hour"]).tz_convert("UTC").rename("hour")
        frame = pd.DataFrame({
            "vcc_cores": hours["vcc_cores"].astype(float).to_numpy(),
            "flexible_cpu_cores": hours["flexible_cpu_cores"].astype(float).to_numpy(),
            "gco2_per_kwh": hours["gco2_per_kwh"].astype(float).to_numpy(),
            "inflexible_cpu_cores": hours["inflexible_cpu_cores"].astype(float).to_numpy(),
        }, index=index)
        queue = None
        if program == "queue" and str(info["status"]) == "shaped":
            upper = agent.inflexible_upper_forecast(store, info["run_id"], self.cluster)
            upper = upper.set_index(pd.DatetimeIndex(upper["hour"]).tz_convert("UTC"))["inflexible_upper_cpu_cores"]
            frame["inflexible_upper_cpu_cores"] = upper.reindex(index).astype(float).to_numpy()
            queue = self._queue_context(store, info["run_id"], params)
        plan = DayPlan(
            cluster=self.cluster, plan_date=plan_date, run_id=info["run_id"], status=str(info["status"]),
            reason=info["reason"] if isinstance(info["reason"], str) else None,
            capacity_cores=_float(info["capacity_cores"]), planned_at=planned_at, hours=frame,
            source=f"store {self.path}", program=program, queue=queue,
            storage=_storage_frame(agent.storage_plan_in_force(store, self.cluster, plan_date)),
            campus=str(info["campus"]) if isinstance(info.get("campus"), str) else None,
        )
        self._cache[plan_date] = plan
        for old in sorted(self._cache)[:-3]:  # keep a few days
            del self._cache[old]
        return plan


    def _queue_context(self, store, run_id: str, params: dict) -> QueueContext:
        knobs = {"planning_margin_hours": _float(params.get("planning_margin_hours", 6.0)),
                 "lambda_e": _float(params.get("lambda_e", 1.0)), "lambda_p": _float(params.get("lambda_p", 0.0)),
                 "solver": str(params.get("solver") or "HIGHS")}
        bad = [k for k, v in knobs.items() if k != "solver" and not (v >= 0 and math.isfinite(v))]
        if bad:
            return QueueContext(problem=f"the plan run's {bad[0]} is not a number >= 0")
        cfg = self.cluster_config
        if cfg is None:
            return QueueContext(problem="no fleet entry for the cluster: its power domains are unknown", **knobs)
        from cicm.store import agent

        models = agent.power_models_of_run(store, run_id, self.cluster)
        try:
            curve = power_curve_from_models(cfg, dict(zip(models["domain"], models["model"])))
        except InputError as exc:
            return QueueContext(capacity_cores=float(cfg.capacity_cores), problem=f"no power curve: {exc}", **knobs)
        return QueueContext(capacity_cores=float(cfg.capacity_cores), power_curve=curve, **knobs)


STORAGE_FRAME_COLUMNS = ("load_kw", "solar_kw", "solar_used_kw", "curtailed_kw", "charge_kw", "discharge_kw",
                         "energy_kwh", "energy_before_kwh", "grid_kw")


def _storage_frame(rows: pd.DataFrame) -> pd.DataFrame | None:
    """The storage plan's rows indexed by UTC hour (floats), or None without rows."""
    if rows is None or rows.empty:
        return None
    index = pd.DatetimeIndex(rows["hour"]).tz_convert("UTC").rename("hour")
    frame = pd.DataFrame({c: pd.to_numeric(rows[c], errors="coerce").astype(float).to_numpy()
                          for c in STORAGE_FRAME_COLUMNS}, index=index)
    frame["status"] = rows["status"].astype(str).to_numpy()
    return frame


def _params(text) -> dict:
    try:
        doc = json.loads(text) if isinstance(text, str) and text else {}
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def power_curve_from_models(cluster, models: dict):
    """The cluster's P(u) from its domains' stored models (JSON per domain name), as the nightly plan builds it
    (``cicm.planning.stages.cluster_power_curve``: knots at every domain breakpoint scaled to the cluster, plus
    0 and the capacity). Raises InputError naming the domain whose model is missing or unreadable."""
    from cicm.models.power import PowerModel, cluster_power_kw
    from cicm.optimize.inputs import PowerCurve

    fitted = []
    for d in cluster.power_domains:
        text = models.get(d.name)
        if not isinstance(text, str) or not text:
            raise InputError(d.name, "no power model stored for this domain in the plan's run")
        try:
            fitted.append(PowerModel.from_dict(json.loads(text)))
        except (ValueError, KeyError) as exc:
            raise InputError(d.name, f"stored power model unreadable: {exc}") from None
    shares = [d.capacity_cores / cluster.capacity_cores for d in cluster.power_domains]
    knots = {0.0, float(cluster.capacity_cores)}
    for model, share in zip(fitted, shares):
        knots.update(b / share for b in model.breakpoints_cpu_cores)
    cpu = np.array(sorted(k for k in knots if 0.0 <= k <= cluster.capacity_cores))
    power = np.maximum(np.asarray(cluster_power_kw(fitted, shares, cpu), dtype=float), 0.0)
    return PowerCurve(cpu_cores=cpu, power_kw=power)


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


# -------------------------------------------------------------------------------------------------- file


def parse_plan_document(doc: dict, source: str = "plan file") -> DayPlan:
    """One ``cicm vcc show --json`` document. Bad input raises InputError naming the field."""
    if not isinstance(doc, dict):
        raise InputError("plan", f"{source}: expected a JSON object per cluster-day")
    for key in ("cluster", "plan_date", "status", "hours"):
        if key not in doc:
            raise InputError(key, f"{source}: missing")
    try:
        plan_date = pd.Timestamp(doc["plan_date"]).date()
    except (TypeError, ValueError) as exc:
        raise InputError("plan_date", f"{source}: not a date: {doc['plan_date']!r}") from exc
    rows = doc["hours"]
    if not isinstance(rows, list) or not rows:
        raise InputError("hours", f"{source}: need a non-empty list of hours")
    hours, vcc, flex, carbon = [], [], [], []
    for i, h in enumerate(rows):
        try:
            t = pd.Timestamp(h["hour"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"hours.{i}.hour", f"{source}: missing or not a time") from exc
        if t.tzinfo is None:
            raise InputError(f"hours.{i}.hour", f"{source}: must carry a time zone")
        hours.append(t.tz_convert("UTC"))
        v = _float(h.get("vcc_cores"))
        if not (v >= 0):
            raise InputError(f"hours.{i}.vcc_cores", f"{source}: must be a number >= 0, got {h.get('vcc_cores')!r}")
        vcc.append(v)
        f = h.get("flexible_cpu_cores")
        f = math.nan if f is None else _float(f)
        if f == f and f < 0:
            raise InputError(f"hours.{i}.flexible_cpu_cores", f"{source}: must be >= 0")
        flex.append(f)
        g = h.get("gco2_per_kwh")
        carbon.append(math.nan if g is None else _float(g))
    index = pd.DatetimeIndex(hours, name="hour")
    if index.has_duplicates or not index.is_monotonic_increasing:
        raise InputError("hours", f"{source}: hours must be unique and increasing")
    planned_at = None
    if doc.get("planned_at"):
        planned_at = pd.Timestamp(doc["planned_at"])
        if planned_at.tzinfo is None:
            raise InputError("planned_at", f"{source}: must carry a time zone")
        planned_at = planned_at.tz_convert("UTC")
    else:
        planned_at = _run_time(doc.get("run_id"))
    cap = doc.get("capacity_cores")
    return DayPlan(
        cluster=str(doc["cluster"]), plan_date=plan_date, run_id=doc.get("run_id"), status=str(doc["status"]),
        reason=doc.get("reason") if isinstance(doc.get("reason"), str) else None,
        capacity_cores=None if cap is None else _float(cap), planned_at=planned_at,
        hours=pd.DataFrame({"vcc_cores": vcc, "flexible_cpu_cores": flex, "gco2_per_kwh": carbon}, index=index),
        source=source,
    )


class FilePlanSource:
    def __init__(self, path: Path | str, cluster: str):
        self.path = Path(path)
        self.cluster = cluster

    def describe(self) -> str:
        return f"plan file {self.path}"

    def read(self) -> list[DayPlan]:
        try:  # bounded: a hostile file (huge, 200,000 brackets deep, a 400-digit number) is refused, named
            with self.path.open("rb") as fh:
                raw = loads_bounded(fh.read(MAX_BYTES + 1), "plan file")
        except FileNotFoundError as exc:
            raise PlanUnavailable(f"plan file {self.path} not found") from exc
        except OSError as exc:
            raise PlanUnavailable(f"plan file {self.path}: {exc}") from exc
        except JSONRejected as exc:
            raise PlanUnavailable(f"plan file {self.path}: {exc.field}: {exc.message}") from exc
        docs = raw if isinstance(raw, list) else [raw]
        try:
            plans = [parse_plan_document(d, f"plan file {self.path}") for d in docs]
        except InputError as exc:
            raise PlanUnavailable(str(exc)) from exc
        return plans

    def lookup(self, hour: pd.Timestamp) -> PlanLookup:
        plans = self.read()
        others = sorted({p.cluster for p in plans if p.cluster != self.cluster})
        mine = [p for p in plans if p.cluster == self.cluster]
        problems = [f"plan file holds other clusters too ({', '.join(others)})"] if others and mine else []
        if not mine:
            raise PlanUnavailable(f"plan file {self.path} has no plan for cluster {self.cluster!r}"
                                  + (f" (it is for {', '.join(others)})" if others else ""))
        covering = [p for p in mine if p.covers(hour)]
        newest = max(mine, key=lambda p: p.plan_date)
        return PlanLookup(covering[-1] if covering else None, newest, problems=problems)
