"""The agent's decisions as pure functions: plan hour in, targets out. No HTTP, no store.

Caps. The plan's flexible allowance for hour h is the program's planned flexible usage
``flexible_cpu_cores(h) = VCC(h)/R(h) - U_IF,upper(h)`` (cluster cores). The ecovisor's containers stand for
the cluster at a scale of ``cluster_cores_per_core`` cluster cores per container core (default: the cluster's
capacity over all the app's container cores, i.e. the site is the cluster in miniature; 1 when the containers
*are* the cluster). The allowance in container cores is split over the flexible containers in proportion to
their cores; each target is a CPU limit, turned into a power cap through the container's power model by
:class:`CapModel`. Inflexible containers are never capped.

Battery. From the day's carbon in the plan: in the ``n`` dirtiest hours the battery may discharge (spreading
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
    charge_kw: float
    max_discharge_kw: float
    why: str


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
