"""The agent's decisions as pure functions: plan hour in, targets out. No HTTP, no store.

Caps. The plan's flexible allowance for hour h is the program's planned flexible usage
``flexible_cpu_cores(h) = VCC(h)/R(h) - U_IF,upper(h)`` (cluster cores). The ecovisor's containers stand for
the cluster at a scale of ``cluster_cores_per_core`` cluster cores per container core (default: the cluster's
capacity over all the app's container cores, i.e. the site is the cluster in miniature; 1 when the containers
*are* the cluster). The allowance in container cores is split over the flexible containers in proportion to
their cores; each target is a CPU limit, turned into a power cap through the container's power model by
:class:`CapModel`. Inflexible containers are never capped.

Battery, with a storage plan in force for the campus and hour (:func:`storage_decision`): the plan's grid charge
and max discharge, corrected for the actual solar, clipped to the state of charge read back (docs/enforcement.md).

Battery, without one (:func:`battery_decision`, the heuristic). From the day's carbon in the plan: in the ``n`` dirtiest hours the battery may discharge (spreading
its usable energy, capacity x (1 - reserve SoC), over them; the ecovisor never goes below the reserve); in the
``n`` cleanest hours it charges from the grid, but only if that hour's intensity is below the round-trip
efficiency x the mean of the dirty hours (else the losses eat the gain); in every other hour it holds (no grid
charging, no discharge). Excess solar charges the battery in any hour (the ecovisor does that by itself).
Decisions depend only on the plan and the battery's spec, not its charge level, so a restarted agent makes
the same ones (idempotent reconciliation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class ContainerInfo:
    name: str
    cores: float
    idle_kw: float
    max_kw: float
    powercap_kw: float
    effective_powercap_kw: float
    cpu_limit_cores: float | None
    flexible: bool

    @classmethod
    def from_api(cls, doc: dict, flexible: bool) -> "ContainerInfo":
        limit = doc.get("cpu_limit_cores")
        return cls(
            name=doc["container"], cores=float(doc["cores"]), idle_kw=float(doc["idle_kw"]),
            max_kw=float(doc["max_kw"]), powercap_kw=float(doc["powercap_kw"]),
            effective_powercap_kw=float(doc.get("effective_powercap_kw", doc["powercap_kw"])),
            cpu_limit_cores=None if limit is None else float(limit), flexible=flexible,
        )


def tolerance_cores(cores: float) -> float:
    """How close a CPU limit must be to its target to count as set (0.02 cores or 0.5%, whichever is more)."""
    return max(0.02, 0.005 * cores)


def flexible_targets(allowance_container_cores: float, flexible: list[ContainerInfo]) -> dict[str, float]:
    """Split the allowance (container cores) over the flexible containers in proportion to their cores."""
    total = sum(c.cores for c in flexible)
    if total <= 0:
        return {}
    a = min(max(float(allowance_container_cores), 0.0), total)
    return {c.name: c.cores * a / total for c in flexible}


# ---------------------------------------------------------------------------------------------- caps


@dataclass
class CapModel:
    """A container's CPU -> power curve as the agent knows it: idle and max power from the ecovisor (linear
    between them) refined by every (effective cap, resulting CPU limit) pair the ecovisor has answered. The
    ecovisor's own model may be piecewise: the agent searches the cap for a target CPU limit with the Illinois
    variant of regula falsi inside this bracket (see ``Agent._cap``), and what it learns narrows the next
    hour's bracket."""

    cores: float
    idle_kw: float
    max_kw: float
    learned: dict[float, float] = field(default_factory=dict)  # kw -> cpu limit (cores)

    def learn(self, kw: float, limit_cores: float | None) -> None:
        if limit_cores is None or not math.isfinite(kw):
            return
        self.learned[float(kw)] = float(limit_cores)

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        pts = {self.idle_kw: 0.0, self.max_kw: self.cores}
        pts.update({k: v for k, v in self.learned.items() if self.idle_kw <= k <= self.max_kw})
        kws = np.array(sorted(pts))
        limits = np.maximum.accumulate(np.array([pts[k] for k in kws]))
        return kws, limits

    def bracket(self, cores: float) -> tuple[tuple[float, float], tuple[float, float]]:
        """The known caps nearest the target: ((kw, limit) with limit <= cores, (kw, limit) with limit > cores).
        Priors (idle -> 0 cores, max -> all cores) close the bracket until the ecovisor has answered."""
        kws, limits = self.points()
        below = np.flatnonzero(limits <= cores)
        above = np.flatnonzero(limits > cores)
        lo = (float(kws[below[-1]]), float(limits[below[-1]])) if below.size else (self.idle_kw, 0.0)
        hi = (float(kws[above[0]]), float(limits[above[0]])) if above.size else (self.max_kw, self.cores)
        return lo, hi

    def safe_kw(self, cores: float) -> float:
        """The largest known cap whose CPU limit was at most ``cores`` (idle if none): never exceeds."""
        ok = [k for k, v in self.learned.items() if v <= cores + 1e-12]
        return max(max(ok), self.idle_kw) if ok else self.idle_kw


# ---------------------------------------------------------------------------------------------- battery


@dataclass(frozen=True)
class BatteryDecision:
    mode: str  # "charge" | "discharge" | "hold"
    charge_kw: float  # the grid charge rate to set (set_battery_charge_rate)
    max_discharge_kw: float  # set_battery_max_discharge
    why: str
    source: str = "heuristic"  # "plan": the campus's storage plan for the hour; "heuristic": cleanest/dirtiest hours
    audit: dict = field(default_factory=dict, hash=False, compare=False)  # plan values, read-back state, clips


def battery_decision(day_carbon: pd.Series | None, hour: pd.Timestamp, battery: dict, grid_share_kw: float,
                     hours_each: int = 4) -> BatteryDecision | None:
    """None when the app has no battery. ``day_carbon``: gCO2/kWh over the plan day's hours (UTC index)."""
    capacity = float(battery.get("capacity_kwh") or 0.0)
    if capacity <= 0:
        return None
    if day_carbon is None or hour not in day_carbon.index or not np.isfinite(day_carbon.get(hour, np.nan)):
        return BatteryDecision("hold", 0.0, 0.0, "no carbon intensity for this hour in the plan")
    carbon = day_carbon.astype(float).dropna()
    n = max(1, min(int(hours_each), len(carbon) // 3))
    order = carbon.sort_values(kind="stable")
    clean, dirty = order.index[:n], order.index[-n:]
    eta = float(battery.get("round_trip_efficiency") or 1.0)
    usable = capacity * (1.0 - float(battery.get("reserve_soc") or 0.0))
    dirty_mean = float(carbon.loc[dirty].mean())
    here = float(carbon.loc[hour])
    if hour in dirty:
        rate = min(float(battery.get("max_discharge_kw") or 0.0), usable / n)
        return BatteryDecision("discharge", 0.0, rate,
                               f"one of the {n} dirtiest hours ({here:.0f} gCO2/kWh)")
    if hour in clean:
        if here < eta * dirty_mean:
            rate = min(float(battery.get("max_charge_kw") or 0.0), max(grid_share_kw, 0.0), usable / (eta * n))
            return BatteryDecision("charge", rate, 0.0,
                                   f"one of the {n} cleanest hours ({here:.0f} < {eta:.2f} x {dirty_mean:.0f} "
                                   "gCO2/kWh)")
        return BatteryDecision("hold", 0.0, 0.0, f"clean hour, but {here:.0f} >= {eta:.2f} x {dirty_mean:.0f} "
                                                 "gCO2/kWh: grid charging would not pay for its losses")
    return BatteryDecision("hold", 0.0, 0.0, "neither among the cleanest nor the dirtiest hours")


# ---------------------------------------------------------------------------------------------- storage plan

EPS_KW = 1e-6


def _f(row, key: str) -> float:
    try:
        v = float(row[key])
    except (KeyError, TypeError, ValueError):
        return math.nan
    return v


def storage_decision(row, battery: dict, solar_now_kw: float | None, scale: float = 1.0,
                     grid_share_kw: float = math.inf, label: str = "") -> BatteryDecision:
    """The ecovisor settings for one hour of the campus's storage plan (``row``: load_kw, solar_kw, solar_used_kw,
    charge_kw, discharge_kw, energy_kwh, energy_before_kwh, in the plan's kW), for the app's battery as read back
    (``battery``: ``GET /v1/battery``) and its solar share now (``solar_now_kw``; None: not known).

    ``scale``: app kW per plan kW (1: the campus's battery *is* the app's battery). In three steps:

    1. **The plan's setpoints**, as ``cicm.backtest.storage.commands``: the planned solar surplus
       ``max(solar_used - load, 0)`` charges the battery by itself (the ecovisor does), so the grid charge rate
       is the planned charge beyond it, and the max discharge is the planned discharge.
    2. **Actual solar** (``solar_now - solar_kw`` = delta). More sun: its surplus charges the battery, and the
       grid charge is cut by the extra surplus (same energy in, less from the grid). Less sun: the planned solar
       charge falls by the difference first (it is not made up from the grid); load the sun no longer serves is
       then taken off the grid charge, and, in an hour where the plan discharges, the max discharge rises by the
       rest, so the grid draw stays at the plan's as far as the battery allows.
    3. **The state of charge read back.** Over the hour the battery takes at most ``(capacity - E) / eta`` kWh in
       (the ecovisor applies the round trip on charge), the expected solar surplus first, and gives at most
       ``E - reserve`` out; the C-rates and the app's grid share bound the rates. Every clip is named in
       ``why`` and ``audit['clips']``.
    """
    k = float(scale)
    load, solar_fc, used = (_f(row, c) * k for c in ("load_kw", "solar_kw", "solar_used_kw"))
    charge, discharge = (_f(row, c) * k for c in ("charge_kw", "discharge_kw"))
    e_plan_before, e_plan = _f(row, "energy_before_kwh") * k, _f(row, "energy_kwh") * k
    load, solar_fc, used = (0.0 if not math.isfinite(v) else v for v in (load, solar_fc, used))
    charge = max(charge, 0.0) if math.isfinite(charge) else 0.0
    discharge = max(discharge, 0.0) if math.isfinite(discharge) else 0.0
    surplus_plan = max(used - load, 0.0)
    plan_grid_charge = max(charge - surplus_plan, 0.0)
    grid_charge, max_discharge = plan_grid_charge, discharge
    notes: list[str] = []
    clips: list[str] = []

    surplus_now = surplus_plan
    delta = None
    if solar_now_kw is not None and math.isfinite(solar_now_kw):
        delta = float(solar_now_kw) - solar_fc
        used_now = max(0.0, used + delta)
        surplus_now = max(used_now - load, 0.0)
        if surplus_now > surplus_plan + EPS_KW:
            extra = surplus_now - surplus_plan
            cut = min(grid_charge, extra)
            if cut > EPS_KW:
                grid_charge -= cut
                notes.append(f"solar {solar_now_kw:.3g} kW is {delta:+.3g} kW off the plan's {solar_fc:.3g}: its "
                             f"extra surplus {extra:.3g} kW charges the battery, grid charge cut by {cut:.3g} kW")
        short_load = min(used, load) - min(used_now, load)  # load the sun no longer serves
        if surplus_plan > surplus_now + EPS_KW:
            notes.append(f"solar {solar_now_kw:.3g} kW is {delta:+.3g} kW off the plan's {solar_fc:.3g}: the "
                         f"planned solar charge falls by {surplus_plan - surplus_now:.3g} kW (not made up from the grid)")
        if short_load > EPS_KW:
            cut = min(grid_charge, short_load)
            grid_charge -= cut
            rest = short_load - cut
            raised = rest if (rest > EPS_KW and discharge > EPS_KW) else 0.0
            max_discharge += raised
            notes.append(f"solar {solar_now_kw:.3g} kW leaves {short_load:.3g} kW of load the plan had it serve: "
                         + (f"grid charge cut by {cut:.3g} kW" if cut > EPS_KW else "no grid charge to cut")
                         + (f", max discharge raised by {raised:.3g} kW" if raised > 0 else
                            ("" if rest <= EPS_KW else "; the rest comes from the grid (the plan does not "
                                                       "discharge in this hour)")))

    capacity = float(battery.get("capacity_kwh") or 0.0)
    energy = float(battery.get("charge_level_kwh") or 0.0)
    reserve = float(battery.get("reserve_soc") or 0.0) * capacity
    eta = float(battery.get("round_trip_efficiency") or 1.0)
    c_rate_in = float(battery.get("max_charge_kw") or 0.0)
    c_rate_out = float(battery.get("max_discharge_kw") or 0.0)
    soc = energy / capacity if capacity > 0 else 0.0
    room_in = max(0.0, capacity - energy) / eta  # kWh of input that fills it, over the hour
    solar_in = min(surplus_now, room_in, c_rate_in)
    room_grid = max(0.0, min(room_in - solar_in, c_rate_in - solar_in))
    want = grid_charge
    if grid_charge > room_grid + EPS_KW:
        clips.append(f"grid charge {want:.3g} -> {room_grid:.3g} kW: SoC {soc:.3f} read back leaves "
                     f"(capacity {capacity:.4g} - {energy:.4g} kWh) / eta {eta:.2f} = {room_in:.3g} kWh of input "
                     f"this hour" + (f", {solar_in:.3g} of it for the solar surplus" if solar_in > EPS_KW else "")
                     + (f" (C-rate {c_rate_in:.3g} kW)" if room_grid >= c_rate_in - solar_in - EPS_KW else ""))
        grid_charge = room_grid
    share = max(float(grid_share_kw), 0.0) if grid_share_kw is not None else math.inf
    if grid_charge > share + EPS_KW:
        clips.append(f"grid charge {grid_charge:.3g} -> {share:.3g} kW: the app's grid share")
        grid_charge = share
    above = max(0.0, energy - reserve)
    room_out = min(above, c_rate_out)
    if max_discharge > room_out + EPS_KW:
        why_out = (f"SoC {soc:.3f} read back leaves {above:.3g} kWh above the reserve "
                   f"({reserve / capacity if capacity else 0:.2f})" if above < c_rate_out else
                   f"the C-rate {c_rate_out:.3g} kW")
        clips.append(f"max discharge {max_discharge:.3g} -> {room_out:.3g} kW: {why_out}")
        max_discharge = room_out
    grid_charge = max(0.0, grid_charge)
    max_discharge = max(0.0, max_discharge)
    if grid_charge > EPS_KW:
        mode = "charge"
    elif max_discharge > EPS_KW:
        mode = "discharge"
    else:
        mode = "hold"
    plan_text = (f"storage plan{(' ' + label) if label else ''}: charge {charge:.3g} kW (grid {plan_grid_charge:.3g}, "
                 f"solar surplus {min(charge, surplus_plan):.3g}), discharge {discharge:.3g} kW, solar "
                 f"{solar_fc:.3g} kW, E {e_plan_before:.4g} -> {e_plan:.4g} kWh"
                 + (f" (x{k:.4g} of the campus's)" if abs(k - 1.0) > 1e-12 else ""))
    state = (f"read back: SoC {soc:.3f} ({energy:.4g} of {capacity:.4g} kWh, reserve {reserve:.4g} kWh)"
             + (f", {energy - e_plan_before:+.3g} kWh off the plan" if math.isfinite(e_plan_before) else "")
             + (f"; solar now {solar_now_kw:.3g} kW" if delta is not None and solar_now_kw is not None else
                "; solar now unknown"))
    why = "; ".join([plan_text, state, *notes, *(["CLIPPED " + c for c in clips] or ["within the SoC limits"])])
    audit = {"plan_charge_kw": charge, "plan_grid_charge_kw": plan_grid_charge, "plan_discharge_kw": discharge,
             "plan_solar_kw": solar_fc, "plan_energy_before_kwh": e_plan_before, "plan_energy_kwh": e_plan,
             "solar_now_kw": solar_now_kw, "soc": soc, "energy_kwh": energy, "capacity_kwh": capacity,
             "reserve_kwh": reserve, "scale": k, "notes": notes, "clips": clips}
    return BatteryDecision(mode, grid_charge, max_discharge, why, source="plan", audit=audit)
