"""The enforcement agent: every hour it applies the cluster's VCC through the ecovisor's HTTP API.

One pass (``Agent.step``):

1. Read the cluster's plan covering the current UTC hour (store or plan file).
   - shaped plan: cap flexible containers at the hour's flexible allowance (see :mod:`cicm.enforce.policy`);
     for a queue-program plan, with the hourly correction on and a backlog source, the allowance is the
     re-plan's from the live backlog (:mod:`cicm.enforce.correction`): never above the plan of record unless
     a deadline needs it; each deviation from the plan is audited with its reason (``intraday_deviations``);
   - fallback plan: lift every cap (the plan itself says "full capacity"), reason ``fallback-plan: ...``;
   - no VCC for the hour, a stale plan, an unreadable source: lift every cap (or, with
     ``on_missing_plan="keep"``, keep the caps as they are), reason ``no-vcc``/``stale-plan``/``plan-unreadable``.
2. Reconcile: read the containers' current caps and CPU limits; set only what differs (a restarted agent,
   mid-hour, changes nothing that is already right). Inflexible containers are never capped: any cap found on
   one is lifted. Flexible CPU limits never add up to more than the plan allows.
3. Drive the battery: from the campus's storage plan for the hour when one is in force (its grid charge and max
   discharge, corrected for the actual solar and clipped to the state of charge read back), else from the day's
   carbon in the plan (charge in clean hours, discharge in dirty ones); the settings are read back.
4. Audit the pass (``agent_actions`` or a JSONL file): mode, reason, allowance, caps, battery, result.

If the ecovisor cannot be reached the pass is audited as ``failed`` and retried with exponential back-off
(capped, and always at the next hour boundary); the agent keeps running. Time comes from a clock object, so
tests drive the agent on a simulated clock.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import threading
from dataclasses import dataclass, field
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, cast

import pandas as pd

from cicm.enforce.backlog import BacklogUnavailable
from cicm.enforce.client import EcovisorClient, EcovisorError, EcovisorUnavailable
from cicm.enforce.clock import Clock, hour_start, next_hour
from cicm.enforce.plans import DayPlan, PlanUnavailable
from cicm.errors import InputError
from cicm.enforce.policy import (
    BatteryDecision,
    CapModel,
    ContainerInfo,
    battery_decision,
    flexible_targets,
    storage_decision,
    tolerance_cores,
)

if TYPE_CHECKING:
    from cicm.enforce.correction import Correction, Deviation
    from cicm.enforce.slurm import SlurmAdmission
    from cicm.ops.agent_metrics import AgentMetrics
    from cicm.optimize.inputs import PowerCurve

log = logging.getLogger("cicm.agent")

MODE_SHAPED, MODE_LIFT, MODE_KEEP = "shaped", "lift", "keep"
CapSteps = Generator[float, dict, dict]  # a container's caps to set, one per step; sent each answer; its audit entry
RESULT_APPLIED, RESULT_UNCHANGED, RESULT_FAILED, RESULT_ERROR = "applied", "unchanged", "failed", "error"


class AgentConfigError(RuntimeError):
    """A problem retrying cannot fix (no flexible containers, unknown capacity, missing API routes)."""


@dataclass
class AgentConfig:
    cluster: str
    flexible: tuple[str, ...] = ()  # explicit flexible container names; empty: use flexible_pattern
    flexible_pattern: str = "batch-*"  # glob over the app's containers; the others are inflexible
    cluster_cores_per_core: float | None = None  # cluster cores one container core stands for
    capacity_cores: float | None = None  # cluster capacity when the plan does not carry it (plan files)
    on_missing_plan: str = MODE_LIFT  # lift | keep: no VCC / stale plan / unreadable source
    max_plan_age_hours: float | None = 48.0  # a plan issued longer before the hour than this is stale
    battery: bool = True
    battery_hours: int = 4  # n cleanest hours charge, n dirtiest discharge
    retry_base_s: float = 5.0
    retry_max_s: float = 300.0
    reconcile_every_s: float = 3600.0
    max_cap_steps: int = 12
    correction: bool = True  # queue plans: re-plan every hour from the live backlog (needs a backlog source)
    max_backlog_age_hours: float = 2.0  # an older backlog is not live: the plan of record applies as it is
    campus_battery_kwh: float | None = None  # the fleet's campus battery: storage plans scale to the app's battery

    def __post_init__(self):
        if self.on_missing_plan not in (MODE_LIFT, MODE_KEEP):
            raise ValueError(f"on_missing_plan must be 'lift' or 'keep', not {self.on_missing_plan!r}")
        if self.cluster_cores_per_core is not None and not self.cluster_cores_per_core > 0:
            raise ValueError("cluster_cores_per_core must be > 0")


@dataclass
class PassOutcome:
    hour: pd.Timestamp
    acted_at: pd.Timestamp
    mode: str
    reason: str | None
    result: str
    plan: DayPlan | None = None
    vcc_cores: float | None = None
    allowance_cores: float | None = None  # cluster cores (applied: the corrected allowance when corrected)
    plan_allowance_cores: float | None = None  # the plan of record's flexible allowance for the hour
    correction: Correction | None = None
    allowance_container_cores: float | None = None
    caps: dict = field(default_factory=dict)
    battery: BatteryDecision | None = None
    changes: list[str] = field(default_factory=list)
    detail: str = ""
    audit_to: str = ""
    store_problem: str | None = None  # the plan store was missing, corrupt, locked or unreadable (storehealth)
    release: Deviation | None = None  # Slurm: jobs whose deadline was at risk were released above the allowance
    slurm: object | None = None  # Slurm: the pass's cicm.enforce.slurm.SlurmPass
    trigger: list[str] = field(default_factory=list)  # the ecovisor events that triggered this pass (early)

    @property
    def ok(self) -> bool:
        return self.result in (RESULT_APPLIED, RESULT_UNCHANGED)

    @property
    def deviation(self) -> Deviation | None:
        if self.release is not None:  # a deadline released work above what the correction (or plan) allowed
            return self.release
        return self.correction.deviation if self.correction is not None else None

    def line(self) -> str:
        allow = "" if self.allowance_cores is None else f" allowance {self.allowance_cores:,.0f} cores"
        why = f" ({self.reason})" if self.reason else ""
        return (f"{self.hour:%Y-%m-%d %H:%M}Z {self.mode}{why}{allow}: {self.result}"
                + (f", {len(self.changes)} change(s)" if self.changes else "")
                + (f"; {self.detail}" if self.detail else ""))


class Agent:
    def __init__(self, config: AgentConfig, client: EcovisorClient | None, plans, audit, clock: Clock, backlog=None,
                 slurm: SlurmAdmission | None = None):
        self.config = config
        self.client = client  # None with --enforce slurm (no ecovisor)
        self.slurm = slurm  # --enforce slurm: the flexible partition's admission limit instead of power caps
        self.plans = plans
        self.audit = audit
        self.clock = clock
        self.backlog = backlog  # cicm.enforce.backlog.BacklogSource, or None: no hourly correction
        self._corrections: dict[pd.Timestamp, tuple] = {}
        self.models: dict[str, CapModel] = {}
        self._contract_ok = False
        self._last_acted: pd.Timestamp | None = None
        self._last_acted_loaded = False
        self.passes: list[PassOutcome] = []
        self.metrics: AgentMetrics | None = None  # Prometheus metrics of each pass (docs/metrics.md)
        self._store_problem: str | None = None  # this pass's plan store problem (cicm.enforce.storehealth kind)
        self._store_counter: Any = None  # cicm_agent_store_unreadable_passes, on the metrics' registry

    @property
    def eco(self) -> EcovisorClient:
        """The ecovisor client (the ecovisor path); there is none with ``--enforce slurm``."""
        if self.client is None:
            raise AgentConfigError("no ecovisor: this agent enforces through Slurm")
        return self.client

    # ------------------------------------------------------------------------------------------- plan
    def _safe(self, reason: str) -> tuple[str, str]:
        return self.config.on_missing_plan, reason

    def plan_for(self, hour: pd.Timestamp) -> tuple[str, str | None, DayPlan | None, float | None, str]:
        """(mode, reason, plan covering the hour or None, flexible allowance in cluster cores, note)."""
        self._store_problem = None
        try:
            look = self.plans.lookup(hour)
        except PlanUnavailable as exc:  # a deleted or corrupt store, or a locked one without a cached plan
            self._store_problem = exc.kind
            return (*self._safe(f"plan-unreadable: {exc}"), None, None, "")
        note = "; ".join([*(look.problems or []), *([look.note] if look.note else [])])
        plan = look.plan
        if plan is None:
            newest = look.newest
            if newest is not None and newest.last_hour < hour:
                reason = (f"stale-plan: no VCC for {hour:%Y-%m-%d %H:%M}Z; the newest plan is for {newest.plan_date}")
            else:
                reason = f"no-vcc: no plan for cluster {self.config.cluster} covers {hour:%Y-%m-%d %H:%M}Z"
            return (*self._safe(reason), None, None, note)
        if plan.status != "shaped":
            return MODE_LIFT, f"fallback-plan: {plan.reason or plan.status}", plan, None, note
        age = self.config.max_plan_age_hours
        if age is not None and plan.planned_at is not None:
            hours_old = (hour - plan.planned_at).total_seconds() / 3600.0
            if hours_old > age:
                return (*self._safe(f"stale-plan: issued {plan.planned_at:%Y-%m-%d %H:%M}Z, {hours_old:.0f} h "
                                    f"before this hour (limit {age:g} h)"), plan, None, note)
        allowance = float(plan.row(hour)["flexible_cpu_cores"])
        if not math.isfinite(allowance):
            return (*self._safe(f"no-vcc: the plan of {plan.plan_date} has no flexible allowance for "
                                f"{hour:%H:%M}Z"), plan, None, note)
        return MODE_SHAPED, None, plan, allowance, note

    # ------------------------------------------------------------------------------------------- correction
    def corrected(self, hour: pd.Timestamp, plan: DayPlan, allowance: float) -> tuple[float, Correction | None, str]:
        """(allowance to apply, the correction or None, note). Today's allowance unless the plan is a queue plan,
        the correction is on and there is a backlog source; decided once per hour and plan (a reconcile pass
        within the hour applies the same allowance)."""
        if not self.config.correction or self.backlog is None or plan.program != "queue":
            return allowance, None, ""
        key = (plan.run_id, float(allowance))
        cached = self._corrections.get(hour)
        if cached is not None and cached[0] == key:
            return cached[1]
        result = self._correct(hour, plan, allowance)
        self._corrections = {hour: (key, result)}
        return result

    def _correct(self, hour: pd.Timestamp, plan: DayPlan, allowance: float) -> tuple[float, Correction | None, str]:
        # imported here: the correction's queue program needs cvxpy (~0.7 s to import), a ceiling plan does not
        from cicm.enforce.correction import CorrectionInput, carry_core_hours, correct_hour

        off = "no hourly correction: "
        q = plan.queue
        if q is None:
            return allowance, None, off + "the plan carries no queue context"
        if q.problem:
            return allowance, None, off + q.problem
        # Without a problem the context has both (cicm.enforce.plans, where the curve is typed object).
        assert q.capacity_cores is not None
        capacity_cores, power_curve = q.capacity_cores, cast("PowerCurve", q.power_curve)
        frames = [plan.hours.loc[plan.hours.index >= hour]]
        try:  # tomorrow's plan, when it is in force already, is the rest of the horizon
            after = self.plans.lookup(plan.last_hour + pd.Timedelta(hours=1)).plan
        except PlanUnavailable:
            after = None
        if after is not None and after.program == "queue" and after.status == "shaped":
            frames.append(after.hours.loc[after.hours.index > plan.last_hour])
        hz = pd.concat(frames)
        hz = hz.reindex(columns=["flexible_cpu_cores", "gco2_per_kwh", "inflexible_cpu_cores",
                                 "inflexible_upper_cpu_cores"]).astype(float)
        hz["inflexible_upper_cpu_cores"] = hz["inflexible_upper_cpu_cores"].fillna(hz["inflexible_cpu_cores"])
        carbon_note = ""
        newest = getattr(self.plans, "carbon_forecast", None)  # the forecast known now, as the backtest re-plans
        fresh = newest(pd.DatetimeIndex(hz.index), hour) if callable(newest) else None
        if fresh is not None and fresh.notna().any():
            hz["gco2_per_kwh"] = fresh.combine_first(hz["gco2_per_kwh"])
            carbon_note = f"carbon: newest forecast for {int(fresh.notna().sum())} of {len(hz)} hours"
        known = hz[["gco2_per_kwh", "inflexible_cpu_cores", "inflexible_upper_cpu_cores"]].notna().all(axis=1)
        n = int(known.cummin().sum())  # the horizon ends at the first hour the plan does not describe
        if n == 0:
            return allowance, None, off + f"the plan has no load forecast or carbon for {hour:%H:%M}Z"
        hz = hz.iloc[:n]
        try:
            snap = self.backlog.snapshot(hour, hz.index)
        except (BacklogUnavailable, InputError) as exc:
            return allowance, None, off + f"backlog unavailable ({exc})"
        age = (hour - snap.as_of) / pd.Timedelta(hours=1)
        if age > self.config.max_backlog_age_hours:
            limit = self.config.max_backlog_age_hours
            return allowance, None, off + (f"the backlog ({snap.source}) was measured at {snap.as_of:%Y-%m-%d %H:%M}Z, "
                                           f"{age:.0f} h before this hour (limit {limit:g} h)")
        before = plan.hours.index[plan.hours.index < hour]
        try:
            carry = carry_core_hours(plan.hours.loc[before, "flexible_cpu_cores"].to_numpy(float),
                                     snap.served_cpu_cores.reindex(before).to_numpy(float))
            corr = correct_hour(CorrectionInput(
                hours=pd.DatetimeIndex(hz.index), plan_cpu_cores=hz["flexible_cpu_cores"].to_numpy(),
                inflexible_cpu_cores=hz["inflexible_cpu_cores"].to_numpy(),
                inflexible_upper_cpu_cores=hz["inflexible_upper_cpu_cores"].to_numpy(),
                capacity_cores=capacity_cores, power_curve=power_curve,
                carbon_gco2_per_kwh=hz["gco2_per_kwh"].to_numpy(), backlog=snap.items,
                arrivals_core_hours=snap.arrivals_core_hours, carry_core_hours=carry,
                planning_margin_hours=q.planning_margin_hours, lambda_e=q.lambda_e, lambda_p=q.lambda_p,
                solver=q.solver, name=self.config.cluster))
        except InputError as exc:  # bad backlog or plan data: enforce the plan of record, say which field
            return allowance, None, off + f"bad input: {exc}"
        notes = [n for n in (snap.note, corr.note, carbon_note) if n]
        if corr.deviation is not None:
            d = corr.deviation
            head = f"hourly correction {d.reason}: {d.plan_cores:,.0f} -> {d.applied_cores:,.0f} cores ({d.detail})"
        else:
            head = f"hourly correction: at plan ({snap.backlog_core_hours:,.0f} core-hours queued at " \
                   f"{snap.as_of:%H:%M}Z)"
        return corr.allowance_cores, corr, "; ".join([head, *notes])

    # ------------------------------------------------------------------------------------------- ecovisor
    def _is_flexible(self, name: str) -> bool:
        if self.config.flexible:
            return name in self.config.flexible
        return fnmatch.fnmatchcase(name, self.config.flexible_pattern)

    def _scale(self, plan: DayPlan | None, containers: list[ContainerInfo]) -> float:
        if self.config.cluster_cores_per_core:
            return float(self.config.cluster_cores_per_core)
        cap = plan.capacity_cores if plan is not None else None
        if cap is None or not math.isfinite(cap) or cap <= 0:
            cap = self.config.capacity_cores
        if not cap:
            raise AgentConfigError(f"the cluster's capacity is unknown (the plan does not carry it): pass "
                                   "--cluster-cores-per-core or a fleet file naming the cluster")
        total = sum(c.cores for c in containers)
        return float(cap) / total

    def _model(self, c: ContainerInfo) -> CapModel:
        m = self.models.get(c.name)
        if m is None or (m.cores, m.idle_kw, m.max_kw) != (c.cores, c.idle_kw, c.max_kw):
            m = self.models[c.name] = CapModel(c.cores, c.idle_kw, c.max_kw)
        if c.cpu_limit_cores is not None:
            m.learn(c.effective_powercap_kw, c.cpu_limit_cores)
        return m

    def _lift(self, c: ContainerInfo, changes: list[str], why: str) -> dict:
        return self._drive(c.name, self._lift_steps(c, changes, why))

    def _cap(self, c: ContainerInfo, target: float, changes: list[str]) -> dict:
        return self._drive(c.name, self._cap_steps(c, target, changes))

    def _drive(self, name: str, steps: CapSteps) -> dict:
        """Run one container's cap steps with one ``PUT /v1/containers/{name}/powercap`` per step."""
        try:
            kw = next(steps)
            while True:
                kw = steps.send(self.eco.set_powercap(name, kw))
        except StopIteration as done:
            return done.value

    def _drive_all(self, steps: dict[str, CapSteps]) -> tuple[dict[str, dict], str]:
        """Run every container's cap steps together: each round sends the next cap of every container still
        searching in one bulk request (``EcovisorClient.set_powercaps``: one ``PUT /v1/containers/powercaps``,
        or one PUT per container against an older ecovisor), and feeds each container its own answer. Each
        container's search is the one :meth:`_drive` runs alone; returns the entries by name and a note on
        the requests."""
        bulk = getattr(self.eco, "set_powercaps", None)
        done: dict[str, dict] = {}
        pending: dict[str, float] = {}
        for name, st in steps.items():
            try:
                pending[name] = next(st)
            except StopIteration as fin:
                done[name] = fin.value
        rounds = settings = 0
        touched: set[str] = set()
        while pending:
            batch = list(pending.items())
            touched.update(pending)
            answers = bulk(batch) if bulk is not None else {n: self.eco.set_powercap(n, kw) for n, kw in batch}
            rounds, settings = rounds + 1, settings + len(batch)
            nxt: dict[str, float] = {}
            for name, _kw in batch:
                try:
                    nxt[name] = steps[name].send(answers[name])
                except StopIteration as fin:
                    done[name] = fin.value
            pending = nxt
        if not rounds:
            return done, ""
        fallback = getattr(self.eco, "bulk_fallback", None) if bulk is not None else "the client has no bulk route"
        how = (f"{rounds} bulk request(s)" if bulk is not None and not fallback else
               f"{settings} per-container PUT(s) ({fallback})")
        return done, f"caps: {settings} setting(s) of {len(touched)} container(s) in {how}"

    def _lift_steps(self, c: ContainerInfo, changes: list[str], why: str) -> CapSteps:
        entry = {"target_cores": c.cores, "powercap_kw": c.max_kw, "cpu_limit_cores": c.cpu_limit_cores,
                 "flexible": c.flexible}
        if c.powercap_kw < c.max_kw - 1e-9:
            resp = yield c.max_kw
            entry["cpu_limit_cores"] = resp.get("cpu_limit_cores")
            changes.append(f"{c.name}: lifted {c.powercap_kw:.4g} -> {c.max_kw:.4g} kW ({why})")
        return entry

    def _cap_steps(self, c: ContainerInfo, target: float, changes: list[str]) -> CapSteps:
        """The caps to set, one at a time (each step yields a cap and is sent the ecovisor's answer), so that
        the container's CPU limit reaches ``target`` without exceeding it; returns the container's audit entry."""
        tol = tolerance_cores(c.cores)
        if target >= c.cores - tol:
            lifted = yield from self._lift_steps(c, changes, "allowance covers the container")
            return lifted | {"target_cores": target}
        model = self._model(c)
        limit, kw = c.cpu_limit_cores, c.powercap_kw
        entry = {"target_cores": round(target, 6), "flexible": True}
        if limit is not None and abs(limit - target) <= tol:
            return entry | {"powercap_kw": kw, "cpu_limit_cores": limit}
        puts = 0
        (a_kw, a_lim), (b_kw, b_lim) = model.bracket(target)
        fa, fb = a_lim - target, b_lim - target  # fa <= 0 < fb
        side = 0
        for _ in range(self.config.max_cap_steps):  # Illinois: regula falsi that does not stall at kinks
            new_kw = (a_kw * fb - b_kw * fa) / (fb - fa) if fb != fa else (a_kw + b_kw) / 2
            new_kw = float(min(max(new_kw, c.idle_kw), c.max_kw))
            if puts and abs(new_kw - kw) < 1e-12:
                break  # no progress: the model cannot do better
            resp = yield new_kw
            puts += 1
            kw, limit = new_kw, resp.get("cpu_limit_cores")
            if limit is None:
                break
            model.learn(float(resp.get("effective_powercap_kw", new_kw)), limit)
            f = limit - target
            if abs(f) <= tol:
                break
            if f > 0:
                b_kw, fb = kw, f
                if side > 0:
                    fa /= 2
                side = 1
            else:
                a_kw, fa = kw, f
                if side < 0:
                    fb /= 2
                side = -1
        if limit is None or limit > target + tol:  # never exceed the plan: fall back to a cap known to be below
            kw = model.safe_kw(target + tol)
            resp = yield kw
            puts += 1
            limit = resp.get("cpu_limit_cores")
        changes.append(f"{c.name}: cap {c.powercap_kw:.4g} -> {kw:.4g} kW, CPU limit "
                       f"{c.cpu_limit_cores if c.cpu_limit_cores is not None else float('nan'):.3g} -> {limit:.3g} "
                       f"(target {target:.3g}, {puts} PUT)")
        return entry | {"powercap_kw": round(kw, 9), "cpu_limit_cores": limit, "puts": puts}

    def _battery(self, plan: DayPlan | None, hour: pd.Timestamp, me: dict,
                 changes: list[str], stale: bool = False) -> BatteryDecision | None:
        """Set the app's battery for the hour: from the campus's storage plan when one is in force for the hour
        (:func:`cicm.enforce.policy.storage_decision`: the plan's charge and discharge, corrected for the solar
        and clipped to the state of charge read back), else the heuristic (``battery_decision``). The settings
        are read back after they are set."""
        if not self.config.battery:
            return None
        b = self.eco.battery()  # GET /v1/battery: the state of charge now (me's copy is the registration's view)
        if float(b.get("capacity_kwh") or 0.0) <= 0:
            return None
        grid_share = float(me.get("grid_share_kw") or 0.0)
        row = plan.storage_row(hour) if plan is not None and not stale else None
        if row is not None:
            assert plan is not None
            solar = self.eco.solar()  # GET /v1/solar/power: the share's power now (current_kw)
            now_kw = solar.get("current_kw", solar.get("power_kw"))
            scale, how = self._storage_scale(b)
            label = (f"of campus {plan.campus or '?'} for {hour:%Y-%m-%d %H:%M}Z (run {plan.run_id}, {how})")
            dec = storage_decision(row, b, None if now_kw is None else float(now_kw), scale, grid_share, label)
        else:
            carbon = plan.carbon() if plan is not None else None
            heuristic = battery_decision(carbon, hour, b, grid_share, self.config.battery_hours)
            if heuristic is None:
                return None
            where = (f"campus {plan.campus}" if plan is not None and plan.campus else
                     f"cluster {self.config.cluster}'s campus")
            src = "" if plan is None else (" (a plan file carries none)" if plan.source.startswith("plan file") else
                                           " (the plan is stale)" if stale and plan.storage is not None else "")
            dec = dataclasses.replace(heuristic, why=f"no storage plan in force for {where} at {hour:%H:%M}Z{src}: "
                                                     f"heuristic: {heuristic.why}")
        charging = float(b.get("charge_rate_kw") or 0.0)
        if dec.charge_kw <= 1e-9 and charging > 1e-9:
            self.eco.set_battery_charge_rate(0.0)  # stop charging first, so the discharge setting takes
            changes.append(f"battery: grid charging stopped ({charging:.3g} -> 0 kW, {dec.source})")
            charging = 0.0
        current_md = b.get("max_discharge_setting_kw")
        if current_md is None or abs(float(current_md) - dec.max_discharge_kw) > 1e-6:
            self.eco.set_battery_max_discharge(dec.max_discharge_kw)
            changes.append(f"battery: max discharge -> {dec.max_discharge_kw:.3g} kW ({dec.mode}, {dec.source})")
        if abs(charging - dec.charge_kw) > 1e-6:
            self.eco.set_battery_charge_rate(dec.charge_kw)
            changes.append(f"battery: grid charge rate -> {dec.charge_kw:.3g} kW ({dec.source})")
        if changes and any(c.startswith("battery:") for c in changes):
            back = self.eco.battery()  # read back what the ecovisor holds now
            rate, md = float(back.get("charge_rate_kw") or 0.0), back.get("max_discharge_setting_kw")
            ok = abs(rate - dec.charge_kw) <= 1e-6 and md is not None and abs(float(md) - dec.max_discharge_kw) <= 1e-6
            note = (f"read back after setting: charge rate {rate:.3g} kW, max discharge "
                    f"{float(md) if md is not None else float('nan'):.3g} kW, SoC {float(back.get('soc') or 0):.3f}"
                    + ("" if ok else " (NOT WHAT WAS SET)"))
            dec = dataclasses.replace(dec, why=f"{dec.why}; {note}", audit={**dec.audit, "read_back": back})
        return dec

    def _storage_scale(self, battery: dict) -> tuple[float, str]:
        """App kW per plan kW: the app's battery capacity over the campus's (fleet file), or 1 without a fleet
        entry (the campus's battery is the app's battery)."""
        campus_kwh = self.config.campus_battery_kwh
        app_kwh = float(battery.get("capacity_kwh") or 0.0)
        if campus_kwh and campus_kwh > 0 and app_kwh > 0:
            return app_kwh / campus_kwh, f"app battery {app_kwh:.4g} of the campus's {campus_kwh:.4g} kWh"
        return 1.0, "the campus's battery is the app's"

    # ------------------------------------------------------------------------------------------- one pass
    def step(self, trigger: list | None = None) -> PassOutcome:
        """One pass. ``trigger``: the ecovisor events (``cicm.ecovisor.subscribe.Event``) that made this an early
        re-application within the hour (battery_full, battery_empty, solar_change); named in the audit."""
        now = self.clock.now()
        hour = hour_start(now)
        mode, reason, plan, allowance, note = self.plan_for(hour)
        out = PassOutcome(hour=hour, acted_at=now, mode=mode, reason=reason, result=RESULT_UNCHANGED, plan=plan,
                          allowance_cores=allowance, plan_allowance_cores=allowance, store_problem=self._store_problem)
        if plan is not None and plan.covers(hour):
            out.vcc_cores = float(plan.row(hour)["vcc_cores"])
        details = [note] if note else []
        if trigger:
            out.trigger = [f"{e.type} {e.id}" for e in trigger]
            details.insert(0, "early re-application on " + ", ".join(
                f"{e.type} {e.id} ({_event_values(e)})" for e in trigger))
        if mode == MODE_SHAPED:
            assert plan is not None and allowance is not None  # plan_for gives both with MODE_SHAPED
            out.allowance_cores, out.correction, corr_note = self.corrected(hour, plan, allowance)
            allowance = out.allowance_cores
            if corr_note:
                details.append(corr_note)
        fatal: AgentConfigError | None = None
        if self.slurm is not None:
            fatal = self._enforce_slurm(out, mode, reason, plan, allowance, details)
        else:
            fatal = self._enforce_ecovisor(out, mode, reason, plan, allowance, hour, details)
        if out.changes:
            details.append("; ".join(out.changes))
        out.detail = " | ".join(d for d in details if d)
        out.acted_at = self._unique_acted_at(now)
        out.audit_to = self._audit(out)
        self.passes.append(out)
        if self.metrics is not None:
            self._count_store_problem(out)
            self.metrics.observe(out)
        (log.info if out.ok else log.warning)("%s", out.line())
        if fatal is not None:
            raise fatal
        return out

    # ------------------------------------------------------------------------------------------- slurm
    def wall_seconds_to_next_pass(self) -> float:
        """Wall seconds until the next pass (the next hour, or ``reconcile_every_s``), on a compressed clock too."""
        now = self.clock.now()
        wake = min(next_hour(now), now + pd.Timedelta(seconds=self.config.reconcile_every_s))
        return max(0.0, (wake - now).total_seconds()) / float(getattr(self.clock, "rate", 1.0))

    def _enforce_slurm(self, out: PassOutcome, mode: str, reason: str | None, plan: DayPlan | None,
                       allowance: float | None, details: list[str]) -> AgentConfigError | None:
        from cicm.enforce.correction import Deviation
        from cicm.enforce.slurm import SlurmConfigError, SlurmError, SlurmUnavailable

        assert self.slurm is not None
        capacity = plan.capacity_cores if plan is not None and plan.capacity_cores else self.config.capacity_cores
        try:
            sp = self.slurm.apply(mode=mode, allowance_cores=allowance, capacity_cores=capacity,
                                  now=pd.Timestamp.now(tz="UTC"), horizon_s=self.wall_seconds_to_next_pass(),
                                  reason=reason or (f"hourly correction {out.deviation.reason}"
                                                    if out.deviation is not None else None),
                                  round_up=out.deviation is not None
                                  and out.deviation.reason == "deadline-release")
        except SlurmConfigError as exc:
            out.result = RESULT_ERROR
            details.append(f"configuration: {exc}")
            return AgentConfigError(str(exc))
        except SlurmError as exc:
            out.result = RESULT_FAILED
            kind = "slurmctld unreachable" if isinstance(exc, SlurmUnavailable) else "slurm error"
            details.append(f"{kind}: {exc}")
            details.append(self.slurm.stuck_note(mode, allowance, capacity, self.config.retry_base_s,
                                                 self.config.retry_max_s))
            return None
        out.slurm = sp
        out.caps = sp.caps
        out.changes = sp.changes
        details.extend(sp.details)
        if mode == MODE_SHAPED and sp.releases and sp.scale is not None and allowance is not None:
            above = sp.released_above_plan_cpus * sp.scale
            if above > 0:
                applied = allowance + above
                out.release = Deviation(out.hour, float(out.plan_allowance_cores or allowance), applied,
                                        "deadline-release", next(d for d in sp.details
                                                                 if d.startswith("deadline-release")))
                out.allowance_cores = applied
        out.result = RESULT_APPLIED if sp.changes or any(r.priority != r.priority_before for r in sp.releases) \
            else RESULT_UNCHANGED
        return None

    def shutdown(self) -> PassOutcome | None:
        """A stopping agent (loop mode) lifts the Slurm limit, so that no lower limit outlives it; audited as a
        ``lift`` pass, reason ``agent-stopping``. None when there is nothing to lift (or no Slurm path)."""
        if self.slurm is None or not self.slurm.config.lift_on_exit:
            return None
        now = self.clock.now()
        out = PassOutcome(hour=hour_start(now), acted_at=now, mode=MODE_LIFT,
                          reason="agent-stopping: no limit outlives its agent", result=RESULT_UNCHANGED)
        try:
            change = self.slurm.lift()
        except Exception as exc:  # noqa: BLE001 - say so; the next agent reconciles
            out.result, out.detail = RESULT_FAILED, f"could not lift the limit on exit: {exc}"
        else:
            if change is None:
                return None
            out.result, out.changes, out.detail = RESULT_APPLIED, [change], change
        out.acted_at = self._unique_acted_at(now)
        out.audit_to = self._audit(out)
        self.passes.append(out)
        (log.info if out.ok else log.warning)("%s", out.line())
        return out

    # ------------------------------------------------------------------------------------------- ecovisor path
    def _enforce_ecovisor(self, out: PassOutcome, mode: str, reason: str | None, plan: DayPlan | None,
                          allowance: float | None, hour: pd.Timestamp,
                          details: list[str]) -> AgentConfigError | None:
        fatal: AgentConfigError | None = None
        try:
            if not self._contract_ok:
                missing = self.eco.check_contract()
                if missing:
                    raise AgentConfigError(f"the ecovisor at {self.eco.base_url} lacks routes: {', '.join(missing)}")
                self._contract_ok = True
            me = self.eco.me()
            containers = [ContainerInfo.from_api(d, self._is_flexible(d["container"]))
                          for d in self.eco.containers()]
            flexible = [c for c in containers if c.flexible]
            if not flexible:
                raise AgentConfigError(
                    f"none of the app's containers ({', '.join(c.name for c in containers) or 'none'}) is flexible "
                    f"(flexible: {', '.join(self.config.flexible) or self.config.flexible_pattern})")
            changes: list[str] = []
            own: dict[str, list[str]] = {c.name: [] for c in containers}  # each container's change lines
            steps: dict[str, CapSteps] = {}
            for c in containers:
                if not c.flexible:
                    steps[c.name] = self._lift_steps(c, own[c.name], "inflexible work is never capped")
            if mode == MODE_SHAPED:
                assert allowance is not None  # as above
                scale = self._scale(plan, containers)
                out.allowance_container_cores = allowance / scale
                targets = flexible_targets(out.allowance_container_cores, flexible)
                for c in flexible:
                    steps[c.name] = self._cap_steps(c, targets[c.name], own[c.name])
            elif mode == MODE_LIFT:
                for c in flexible:
                    steps[c.name] = self._lift_steps(c, own[c.name], reason or "lift")
            entries, how = self._drive_all(steps)  # every cap that differs, in one request per search round
            for c in [*(c for c in containers if not c.flexible), *(flexible if mode != MODE_KEEP else [])]:
                out.caps[c.name] = entries[c.name]
                changes.extend(own[c.name])
            if mode == MODE_SHAPED:
                assert out.allowance_container_cores is not None
                used = sum(float(out.caps[c.name].get("cpu_limit_cores") or 0.0) for c in flexible)
                slack = sum(tolerance_cores(c.cores) for c in flexible)
                within = used <= min(out.allowance_container_cores, sum(c.cores for c in flexible)) + slack
                details.append(f"flexible CPU limits {used:.3g} of {out.allowance_container_cores:.3g} allowed "
                               f"container cores (scale {scale:,.6g} cluster cores per core)"
                               + ("" if within else " EXCEEDS THE PLAN"))
            elif mode == MODE_KEEP:  # keep: record what is there
                for c in flexible:
                    out.caps[c.name] = {"target_cores": None, "powercap_kw": c.powercap_kw,
                                        "cpu_limit_cores": c.cpu_limit_cores, "flexible": True, "kept": True}
            if how:
                details.append(how)
            if mode == MODE_KEEP and plan is None:
                details.append("battery settings kept")
            else:
                out.battery = self._battery(plan, hour, me, changes,
                                            stale=(reason or "").startswith("stale-plan"))
            if out.battery is not None:
                details.append(f"battery {out.battery.mode}: {out.battery.why}")
            out.changes = changes
            out.result = RESULT_APPLIED if changes else RESULT_UNCHANGED
        except EcovisorUnavailable as exc:
            out.result = RESULT_FAILED
            details.append(f"ecovisor unreachable: {exc}")
        except EcovisorError as exc:
            out.result = RESULT_FAILED
            details.append(f"ecovisor error: {exc}")
        except AgentConfigError as exc:
            out.result = RESULT_ERROR
            details.append(f"configuration: {exc}")
            fatal = exc
        return fatal

    def _count_store_problem(self, out: PassOutcome) -> None:
        """``cicm_agent_store_unreadable_passes_total{cluster, kind}``: passes whose plan store was missing,
        corrupt, locked (with no cached plan) or unreadable, on the agent's metrics registry (an alert fires on
        ``increase(...[15m]) > 0``). Never raises."""
        try:
            from prometheus_client import Counter

            from cicm.enforce.storehealth import KINDS

            registry = getattr(self.metrics, "registry", None)
            if registry is None:
                return
            if self._store_counter is None:
                self._store_counter = Counter(
                    "cicm_agent_store_unreadable_passes", "Agent passes whose plan store could not be read, by "
                    "kind (missing, corrupt, locked without a cached plan, unreadable); the caps were lifted "
                    "(or kept with --on-missing-plan keep)", ["cluster", "kind"], registry=registry)
                for k in KINDS:
                    self._store_counter.labels(self.config.cluster, k)
            if out.store_problem:
                self._store_counter.labels(self.config.cluster, out.store_problem).inc()
        except Exception as exc:  # noqa: BLE001 - metrics never stop enforcement
            log.warning("agent metrics: %s", exc)

    def _unique_acted_at(self, now: pd.Timestamp) -> pd.Timestamp:
        """acted_at is the audit key with the cluster; a simulated clock can repeat instants, so bump by 1 µs."""
        if not self._last_acted_loaded:
            self._last_acted_loaded = True
            try:
                self._last_acted = self.audit.last_acted_at(self.config.cluster)
            except Exception as exc:  # noqa: BLE001 - uniqueness is best effort; the upsert key still holds
                log.warning("could not read the last audit time: %s", exc)
        t = now
        if self._last_acted is not None and t <= self._last_acted:
            t = self._last_acted + pd.Timedelta(microseconds=1)
        self._last_acted = t
        return t

    def _audit(self, out: PassOutcome) -> str:
        b = out.battery
        row = {
            "cluster": self.config.cluster, "acted_at": out.acted_at, "hour": out.hour,
            "plan_date": out.plan.plan_date if out.plan is not None else None, "mode": out.mode,
            "reason": out.reason, "vcc_cores": out.vcc_cores, "flexible_allowance_cores": out.allowance_cores,
            "caps": json.dumps(out.caps, sort_keys=True, default=str),
            "battery_charge_kw": b.charge_kw if b else None,
            "battery_max_discharge_kw": b.max_discharge_kw if b else None,
            "result": out.result, "detail": out.detail[:4000],
        }
        if out.ok and out.mode in (MODE_SHAPED, MODE_LIFT):  # the hour's deviation in force: this pass's, or none
            d = out.deviation if out.mode == MODE_SHAPED else None
            row["deviation"] = None if d is None else {
                "plan_cores": d.plan_cores, "applied_cores": d.applied_cores, "reason": d.reason,
                "detail": d.detail[:4000], "recorded_at": pd.Timestamp.now(tz="UTC")}
        try:
            return self.audit.write(row)
        except Exception as exc:  # noqa: BLE001 - never let the audit kill enforcement; say so loudly
            log.error("AUDIT FAILED for %s at %s: %s; row: %s", self.config.cluster, out.acted_at, exc, row)
            return "failed"

    # ------------------------------------------------------------------------------------------- the loop
    def run(self, once: bool = False, max_passes: int | None = None,
            stop: threading.Event | None = None) -> PassOutcome:
        """Pass now, then at every hour boundary (and every ``reconcile_every_s``); after a failed pass retry
        with back-off (``retry_base_s`` doubling up to ``retry_max_s``), never later than the next hour.

        With a clock that listens to the ecovisor's events (``clock.wait_for``: :mod:`cicm.enforce.events`), the
        wait ends at the ``tick`` that reaches the wake time, and a battery_full, battery_empty or solar_change
        event within the hour triggers one early pass (at most one per event; events of one tick share a pass),
        while the battery follows a storage plan. Early passes count towards ``max_passes``."""
        failures = 0
        passes = 0
        out = self.step()
        while True:
            passes += 1
            if once or (max_passes is not None and passes >= max_passes) or (stop is not None and stop.is_set()):
                return out
            now = self.clock.now()
            wake = min(next_hour(now), now + pd.Timedelta(seconds=self.config.reconcile_every_s))
            if out.ok:
                failures = 0
            elif not out.trigger:
                failures += 1
            if not out.ok:
                delay = min(self.config.retry_max_s, self.config.retry_base_s * 2 ** (max(failures, 1) - 1))
                wake = min(wake, now + pd.Timedelta(seconds=delay))
            wait_for = getattr(self.clock, "wait_for", None)
            if wait_for is None:
                self.clock.sleep_until(wake)
                triggers: list = []
            else:
                while True:  # events while the battery does not follow a storage plan do not end the wait
                    got = wait_for(wake, since=out.acted_at)
                    triggers = got if self._on_storage_plan() else []
                    if triggers or not got or (stop is not None and stop.is_set()):
                        break
            if stop is not None and stop.is_set():
                return out
            out = self.step(trigger=triggers or None)

    def _on_storage_plan(self) -> bool:
        """Whether the last pass set the battery from a storage plan (events then re-apply its hour)."""
        last = self.passes[-1] if self.passes else None
        return last is not None and last.battery is not None and last.battery.source == "plan"


def _event_values(e) -> str:
    d = getattr(e, "data", {}) or {}
    t = str(d.get("time") or "")[11:16]
    if e.type in ("battery_full", "battery_empty"):
        return f"SoC {float(d.get('soc', float('nan'))):.3f} at {t}Z"
    if e.type == "solar_change":
        return (f"solar {float(d.get('previous_kw', float('nan'))):.3g} -> {float(d.get('solar_kw', float('nan'))):.3g}"
                f" kW at {t}Z")
    return t
