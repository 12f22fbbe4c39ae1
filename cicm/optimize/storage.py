"""Battery and solar in the campus program: the day-ahead storage plan (issue 16). Pure: arrays in, arrays out.

The campus meter sees ``grid = load - solar_used - discharge + charge`` each hour, with ``solar_used <= solar``
(the rest is curtailed), ``grid >= 0`` (no export) and the battery's energy

    E(h) = E(h-1) + eta_c * charge(h) - discharge(h) / eta_d,      reserve <= E(h) <= capacity,
    0 <= charge(h) <= max_charge_kw,  0 <= discharge(h) <= max_discharge_kw,

in one-hour steps (kW over an hour = kWh). Grid energy, including the energy that charges the battery, is charged
at the hour's carbon forecast; discharged energy is carbon-free at use (the ecovisor's accounting,
docs/ecovisor.md). Stored energy left at the horizon's end is worth ``eta_d`` x the terminal carbon (default: the
horizon's mean forecast) per kWh: what discharging it in an average hour would save, no more.

The contract bounds the grid import in every committed hour, and ``lambda_p`` prices its peak.

It is an LP: no binaries. Charging and discharging in the same hour is never optimal: replacing (c, d) by
(c - x, d - eta_c * eta_d * x) keeps every E(h) and lowers the grid import by (1 - eta_c * eta_d) * x, which
lowers the carbon whenever the hour's carbon is > 0 and the round trip loses energy (and never raises the peak);
a tiny price on throughput (``THROUGHPUT_PRICE``) makes the overlap strictly worse in every other case (lossless
battery, zero-carbon hour). docs/storage_coplan.md has the argument in full; the tests check it on random campuses.

``plan_storage`` plans the battery under a fixed load; :func:`cicm.optimize.queue.plan_queue` co-plans it with the
flexible schedule when its ``QueueCampus`` has a ``storage``. Without one the queue program is unchanged.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import cvxpy as cp
import numpy as np

from cicm.errors import InputError
from cicm.optimize.highs import solver_for

#: Price of one kWh through the battery (charged plus discharged), in units of the dearest kWh of grid carbon
#: (lambda_e * max eta / 1000): breaks ties against cycling; far too small to change a plan that saves carbon.
THROUGHPUT_PRICE = 1e-6
#: Tolerance (kW, relative to the largest power) of the post-solve repairs.
TOL = 1e-7


@dataclass(frozen=True, eq=False)
class Battery:
    """A battery: energy in kWh, power in kW, efficiencies in (0, 1]. ``reserve_soc`` and ``initial_soc`` are
    fractions of ``capacity_kwh`` (the ecovisor's site file; the reserve is never used)."""

    capacity_kwh: float
    max_charge_kw: float
    max_discharge_kw: float
    charge_efficiency: float = 0.95
    discharge_efficiency: float = 0.95
    reserve_soc: float = 0.0
    initial_soc: float = 0.5

    def __post_init__(self):
        for name in ("capacity_kwh", "max_charge_kw", "max_discharge_kw"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise InputError(name, f"must be finite and >= 0, got {getattr(self, name)!r}")
            object.__setattr__(self, name, v)
        for name in ("charge_efficiency", "discharge_efficiency"):
            v = float(getattr(self, name))
            if not (0 < v <= 1):
                raise InputError(name, f"must be in (0, 1], got {getattr(self, name)!r}")
            object.__setattr__(self, name, v)
        for name in ("reserve_soc", "initial_soc"):
            v = float(getattr(self, name))
            if not (0 <= v <= 1):
                raise InputError(name, f"must be in [0, 1], got {getattr(self, name)!r}")
            object.__setattr__(self, name, v)
        if self.initial_soc < self.reserve_soc:
            raise InputError("initial_soc", f"{self.initial_soc:g} is below the reserve {self.reserve_soc:g}")

    @classmethod
    def from_site(cls, capacity_kwh: float, round_trip_efficiency: float, max_charge_c: float,
                  max_discharge_c: float, reserve_soc: float = 0.0, initial_soc: float = 0.5) -> "Battery":
        """The ecovisor's parameters (C-rates: kW = C x kWh): the round trip split evenly, sqrt on each leg."""
        if not (0 < round_trip_efficiency <= 1):
            raise InputError("round_trip_efficiency", f"must be in (0, 1], got {round_trip_efficiency!r}")
        leg = math.sqrt(round_trip_efficiency)
        return cls(capacity_kwh, max_charge_c * capacity_kwh, max_discharge_c * capacity_kwh, leg, leg,
                   reserve_soc, initial_soc)

    @property
    def round_trip_efficiency(self) -> float:
        return self.charge_efficiency * self.discharge_efficiency

    @property
    def reserve_kwh(self) -> float:
        return self.reserve_soc * self.capacity_kwh

    @property
    def initial_kwh(self) -> float:
        return self.initial_soc * self.capacity_kwh

    def with_energy(self, energy_kwh: float) -> "Battery":
        """The same battery holding ``energy_kwh`` (clipped into [reserve, capacity]): the next day's start."""
        e = min(max(float(energy_kwh), self.reserve_kwh), self.capacity_kwh)
        soc = e / self.capacity_kwh if self.capacity_kwh > 0 else self.reserve_soc
        return Battery(self.capacity_kwh, self.max_charge_kw, self.max_discharge_kw, self.charge_efficiency,
                       self.discharge_efficiency, self.reserve_soc, max(soc, self.reserve_soc))


@dataclass(frozen=True, eq=False)
class CampusStorage:
    """A campus's battery (or None) and solar forecast (kW, the mean of each hour; None: no solar) over the
    horizon. ``other_load_kw``: load the program does not plan (e.g. cooling), drawn every hour.
    ``terminal_gco2_per_kwh``: what a kWh stored at the horizon's end is worth, before eta_d (None: the mean of
    the horizon's carbon forecast). ``hurdle_gco2_per_kwh``: a price on every kWh discharged, so the battery cycles
    only where the forecast spread beats the losses by that much (a margin for the forecast's error; 0: none)."""

    battery: Battery | None = None
    solar_kw: np.ndarray | None = None
    other_load_kw: np.ndarray | None = None
    terminal_gco2_per_kwh: float | None = None
    hurdle_gco2_per_kwh: float = 0.0

    def __post_init__(self):
        if self.battery is not None and not isinstance(self.battery, Battery):
            raise InputError("battery", f"must be a Battery, got {type(self.battery).__name__}")
        for name in ("solar_kw", "other_load_kw"):
            v = getattr(self, name)
            if v is None:
                continue
            arr = np.array(v, dtype=float)
            if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all() or (arr < 0).any():
                raise InputError(name, "must be a non-empty 1-D array of finite values >= 0 (kW per hour)")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        t = self.terminal_gco2_per_kwh
        if t is not None and (not math.isfinite(float(t)) or float(t) < 0):
            raise InputError("terminal_gco2_per_kwh", f"must be finite and >= 0, got {t!r}")
        h = float(self.hurdle_gco2_per_kwh)
        if not math.isfinite(h) or h < 0:
            raise InputError("hurdle_gco2_per_kwh", f"must be finite and >= 0, got {self.hurdle_gco2_per_kwh!r}")

    def check(self, n: int) -> None:
        for name in ("solar_kw", "other_load_kw"):
            v = getattr(self, name)
            if v is not None and v.size != n:
                raise InputError(f"storage.{name}", f"has {v.size} values, expected {n} (one per hour)")

    def solar(self, n: int) -> np.ndarray:
        return np.zeros(n) if self.solar_kw is None else np.asarray(self.solar_kw, float)

    def other(self, n: int) -> np.ndarray:
        return np.zeros(n) if self.other_load_kw is None else np.asarray(self.other_load_kw, float)


@dataclass(frozen=True, eq=False)
class StoragePlan:
    """The campus meter, hour by hour (kW = kWh per hour). Exactly, every hour:
    ``solar_used + curtailed = solar``; ``grid + solar_used + discharge = load + charge``;
    ``energy(h) = energy(h-1) + eta_c charge(h) - discharge(h) / eta_d`` (energy(-1) = the initial energy).
    ``loss_kwh = (1 - eta_c) charge + (1/eta_d - 1) discharge``. ``load_kw`` includes ``other_load_kw``."""

    load_kw: np.ndarray
    solar_kw: np.ndarray
    solar_used_kw: np.ndarray
    curtailed_kw: np.ndarray
    charge_kw: np.ndarray
    discharge_kw: np.ndarray
    energy_kwh: np.ndarray
    grid_kw: np.ndarray
    initial_kwh: float
    charge_efficiency: float
    discharge_efficiency: float
    status: str  # "optimal" | "idle" (no battery, or the solver failed: the battery holds)

    @property
    def loss_kwh(self) -> np.ndarray:
        return (1 - self.charge_efficiency) * self.charge_kw + (1 / self.discharge_efficiency - 1) * self.discharge_kw

    def carbon_kg(self, gco2_per_kwh: np.ndarray) -> float:
        return float(np.dot(self.grid_kw, gco2_per_kwh) / 1000.0)

    def balance_error_kw(self) -> float:
        """The largest violation of the three balances over the hours (0 up to rounding)."""
        prev = np.concatenate([[self.initial_kwh], self.energy_kwh[:-1]])
        return float(max(
            np.abs(self.solar_used_kw + self.curtailed_kw - self.solar_kw).max(),
            np.abs(self.grid_kw + self.solar_used_kw + self.discharge_kw - self.load_kw - self.charge_kw).max(),
            np.abs(self.energy_kwh - prev - self.charge_efficiency * self.charge_kw
                   + self.discharge_kw / self.discharge_efficiency).max()))


# ------------------------------------------------------------------------------------------------ the LP terms


@dataclass
class StorageTerms:
    """What :func:`storage_terms` adds to a program: its objective, its constraints, and the variables to read."""

    objective: cp.Expression
    constraints: list
    solar_used: cp.Variable
    charge: cp.Variable | None
    discharge: cp.Variable | None


def storage_terms(storage: CampusStorage, load_kw, carbon_gco2_per_kwh: np.ndarray, committed: np.ndarray,
                  contract_kw: float, lambda_e: float, lambda_p: float) -> StorageTerms:
    """The campus meter as LP terms over a load (kW, an expression or array over N hours, excluding
    ``other_load_kw``): carbon of the grid import, the terminal value of stored energy, the throughput price, and
    the contract and peak price on the grid import over the committed hours."""
    eta = np.asarray(carbon_gco2_per_kwh, float)
    n = eta.size
    storage.check(n)
    solar, other = storage.solar(n), storage.other(n)
    su = cp.Variable(n, bounds=[np.zeros(n), solar])
    grid = load_kw + other - su
    cons: list = []
    obj: cp.Expression = cp.Constant(0.0)
    ch = dis = None
    bat = storage.battery
    if bat is not None and bat.capacity_kwh > 0 and (bat.max_charge_kw > 0 or bat.max_discharge_kw > 0):
        ch = cp.Variable(n, bounds=[np.zeros(n), np.full(n, bat.max_charge_kw)])
        dis = cp.Variable(n, bounds=[np.zeros(n), np.full(n, bat.max_discharge_kw)])
        tri = np.tril(np.ones((n, n)))
        energy = bat.initial_kwh + tri @ (bat.charge_efficiency * ch - dis / bat.discharge_efficiency)
        cons += [energy >= bat.reserve_kwh, energy <= bat.capacity_kwh]
        grid = grid - dis + ch
        terminal = float(eta.mean()) if storage.terminal_gco2_per_kwh is None else storage.terminal_gco2_per_kwh
        obj = obj - lambda_e * terminal * bat.discharge_efficiency / 1000.0 * energy[n - 1]
        unit = max(lambda_e * float(eta.max()) / 1000.0, lambda_p, 1e-12)
        obj = obj + unit * THROUGHPUT_PRICE * cp.sum(ch + dis)
        if storage.hurdle_gco2_per_kwh > 0:
            obj = obj + lambda_e * storage.hurdle_gco2_per_kwh / 1000.0 * cp.sum(dis)
    cons.append(grid >= 0)
    obj = obj + lambda_e * (grid @ (eta / 1000.0))
    com = np.flatnonzero(committed)
    if lambda_p > 0 or math.isfinite(contract_kw):
        peak = cp.Variable()
        cons.append(grid[com] <= peak)
        if math.isfinite(contract_kw):
            cons.append(peak <= contract_kw)
        obj = obj + lambda_p * peak
    return StorageTerms(obj, cons, su, ch, dis)


def read_plan(storage: CampusStorage, terms: StorageTerms | None, load_kw: np.ndarray) -> StoragePlan:
    """The plan from solved terms (None: the battery holds and solar serves the load first), made exact: the
    energy is the recursion of the (non-negative, within-rate) charge and discharge, an overlap left by the
    solver's tolerance is netted out keeping every E(h), and the grid is the balance."""
    load = np.asarray(load_kw, float)
    n = load.size
    solar, other = storage.solar(n), storage.other(n)
    total = load + other
    bat = storage.battery
    e0 = 0.0 if bat is None else bat.initial_kwh
    ec = 1.0 if bat is None else bat.charge_efficiency
    ed = 1.0 if bat is None else bat.discharge_efficiency
    ch = np.zeros(n)
    dis = np.zeros(n)
    status = "idle"
    if terms is not None and terms.charge is not None and terms.charge.value is not None:
        assert bat is not None and terms.discharge is not None
        ch = np.clip(np.asarray(terms.charge.value, float), 0.0, bat.max_charge_kw)
        dis = np.clip(np.asarray(terms.discharge.value, float), 0.0, bat.max_discharge_kw)
        net = ec * ch - dis / ed  # keep the energy path, drop the overlap
        ch, dis = np.where(net > 0, net / ec, 0.0), np.where(net < 0, -net * ed, 0.0)
        status = "optimal"
    elif terms is not None and terms.solar_used.value is not None:
        status = "optimal"
    energy = e0 + np.cumsum(ec * ch - dis / ed)
    if bat is not None:
        energy = np.clip(energy, bat.reserve_kwh, bat.capacity_kwh)  # only rounding: the LP kept it inside
        prev = np.concatenate([[e0], energy[:-1]])
        delta = energy - prev  # re-derive the flows from the clipped path so the recursion is exact
        ch, dis = np.where(delta > 0, delta / ec, 0.0), np.where(delta < 0, -delta * ed, 0.0)
    # Solar serves what the load and charging need (the LP may have curtailed more only at no gain), the grid
    # the rest; a discharge above the load left after solar is cut (the LP's grid >= 0 held up to rounding).
    su = np.minimum(solar, np.maximum(total + ch - dis, 0.0))
    grid = total + ch - dis - su
    if (grid < 0).any():
        over = np.maximum(-grid, 0.0)
        dis = dis - over
        grid = np.maximum(grid, 0.0)
        if bat is not None:
            energy = e0 + np.cumsum(ec * ch - dis / ed)
    return StoragePlan(total, solar, su, solar - su, ch, dis, energy, total + ch - dis - su, e0, ec, ed, status)


def plan_storage(load_kw: np.ndarray, carbon_gco2_per_kwh: np.ndarray, storage: CampusStorage, *,
                 committed: np.ndarray | None = None, contract_kw: float = math.inf, lambda_e: float = 1.0,
                 lambda_p: float = 0.0, solver: str = "HIGHS") -> tuple[StoragePlan, float]:
    """The battery's plan under a fixed load (kW per hour): (plan, seconds). A solver failure leaves the battery
    holding (status ``idle``)."""
    t0 = time.perf_counter()
    load = np.asarray(load_kw, float)
    eta = np.asarray(carbon_gco2_per_kwh, float)
    if load.shape != eta.shape or load.ndim != 1:
        raise InputError("load_kw", f"must have one value per hour of the carbon forecast ({eta.size})")
    com = np.ones(load.size, bool) if committed is None else np.asarray(committed, bool)
    terms = storage_terms(storage, load, eta, com, contract_kw, lambda_e, lambda_p)
    prob = cp.Problem(cp.Minimize(terms.objective), terms.constraints)
    try:
        prob.solve(solver=solver_for(solver), ignore_dpp=True)
        ok = prob.status in ("optimal", "optimal_inaccurate")
    except cp.error.SolverError:
        ok = False
    return read_plan(storage, terms if ok else None, load), time.perf_counter() - t0
