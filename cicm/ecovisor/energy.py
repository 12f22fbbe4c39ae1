"""The physical energy model of one application's virtual energy system over one tick. Pure functions.

Order of supply in a tick of length ``dt_h`` (hours), all powers are tick averages in kW:

1. Solar serves the load first. Excess solar charges the battery up to its charge limit; the rest is curtailed.
2. The battery discharges up to ``min(C-rate limit, the app's max discharge)``, never below its reserve SoC.
3. The grid supplies the rest, and carries the grid's carbon intensity.

Explicit charging from the grid (``set_battery_charge_rate``) is extra grid load, limited by the remaining
charge headroom (C-rate and free capacity, after solar charging) and by the app's grid share. While an app
charges from the grid (charge rate > 0) its battery does not discharge in that tick: a battery is either being
charged or discharged, and the explicit command wins.

Round-trip efficiency is applied entirely on charge: putting ``E`` kWh in stores ``eta * E`` kWh; taking
``E`` kWh out removes exactly ``E``. So stored energy changes by ``(eta * charge - discharge) * dt_h`` and the
loss ``(1 - eta) * charge * dt_h`` is the only battery loss.

The balance that holds every tick (tested to 1e-9)::

    solar + battery_discharge + grid = load + charging (solar + grid) + curtailment

Carbon: grid energy carries the grid's intensity at the time it is drawn (also when it charges the battery);
energy later discharged from the battery is carbon-free at use (its carbon was counted when charged).
The grid share is a soft limit: load the other sources cannot serve is still drawn from the grid (a
container's power is physical), and the excess is reported as ``grid_over_share_kw``; grid charging never
exceeds the share.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from cicm.errors import InputError


@dataclass(frozen=True)
class BatterySpec:
    capacity_kwh: float
    reserve_soc: float
    max_charge_kw: float
    max_discharge_kw: float
    efficiency: float  # round-trip, applied on charge

    def __post_init__(self):
        _nonneg("capacity_kwh", self.capacity_kwh)
        _nonneg("max_charge_kw", self.max_charge_kw)
        _nonneg("max_discharge_kw", self.max_discharge_kw)
        if not 0 <= self.reserve_soc <= 1:
            raise InputError("reserve_soc", "must be in [0, 1]")
        if not 0 < self.efficiency <= 1:
            raise InputError("efficiency", "must be in (0, 1]")

    @property
    def reserve_kwh(self) -> float:
        return self.reserve_soc * self.capacity_kwh


@dataclass(frozen=True)
class StepInput:
    dt_h: float
    load_kw: float
    solar_kw: float
    battery: BatterySpec
    battery_energy_kwh: float
    grid_gco2_per_kwh: float
    grid_charge_kw: float = 0.0  # set_battery_charge_rate
    max_discharge_kw: float = math.inf  # set_battery_max_discharge
    grid_share_kw: float = math.inf

    def __post_init__(self):
        if not (self.dt_h > 0 and math.isfinite(self.dt_h)):
            raise InputError("dt_h", "must be a finite number > 0")
        for name in ("load_kw", "solar_kw", "battery_energy_kwh", "grid_gco2_per_kwh", "grid_charge_kw"):
            _nonneg(name, getattr(self, name))
        for name in ("max_discharge_kw", "grid_share_kw"):
            v = getattr(self, name)
            if v != v or v < 0:
                raise InputError(name, "must be >= 0")
        if self.battery_energy_kwh > self.battery.capacity_kwh * (1 + 1e-9) + 1e-12:
            raise InputError("battery_energy_kwh", "exceeds battery capacity")


@dataclass(frozen=True)
class StepResult:
    dt_h: float
    load_kw: float
    solar_kw: float
    solar_to_load_kw: float
    solar_to_battery_kw: float
    curtailed_kw: float
    battery_discharge_kw: float
    grid_to_load_kw: float
    grid_to_battery_kw: float
    grid_kw: float
    grid_over_share_kw: float
    battery_energy_before_kwh: float
    battery_energy_kwh: float
    battery_loss_kwh: float
    grid_gco2_per_kwh: float
    carbon_kgco2: float
    carbon_load_kgco2: float  # carbon of the grid energy that served load
    carbon_charging_kgco2: float  # carbon of the grid energy that charged the battery

    @property
    def charging_kw(self) -> float:
        return self.solar_to_battery_kw + self.grid_to_battery_kw

    def balance_error_kw(self) -> float:
        """supply - use; zero up to rounding."""
        return (self.solar_kw + self.battery_discharge_kw + self.grid_kw) - (
            self.load_kw + self.charging_kw + self.curtailed_kw
        )

    def as_dict(self) -> dict:
        d = asdict(self)
        d["charging_kw"] = self.charging_kw
        return d


def _nonneg(name: str, v: float) -> None:
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
        raise InputError(name, f"must be a finite number >= 0, got {v!r}")


def available_discharge_kw(battery: BatterySpec, energy_kwh: float, dt_h: float, max_discharge_kw: float = math.inf) -> float:
    """Largest average discharge power over ``dt_h`` that keeps the battery at or above reserve."""
    above_reserve = max(0.0, energy_kwh - battery.reserve_kwh)
    return max(0.0, min(battery.max_discharge_kw, max_discharge_kw, above_reserve / dt_h))


def charge_headroom_kw(battery: BatterySpec, energy_kwh: float, dt_h: float) -> float:
    """Largest average charging input power over ``dt_h`` (before efficiency) that does not overfill."""
    room = max(0.0, battery.capacity_kwh - energy_kwh)
    return max(0.0, min(battery.max_charge_kw, room / (battery.efficiency * dt_h)))


def step(inp: StepInput) -> StepResult:
    """One tick of one application's virtual energy system."""
    b, dt = inp.battery, inp.dt_h
    load, solar = float(inp.load_kw), float(inp.solar_kw)

    solar_to_load = min(solar, load)
    excess = solar - solar_to_load
    headroom = charge_headroom_kw(b, inp.battery_energy_kwh, dt)
    solar_to_batt = min(excess, headroom)
    curtailed = excess - solar_to_batt
    residual = load - solar_to_load

    charging_from_grid = inp.grid_charge_kw > 0
    if charging_from_grid:
        discharge = 0.0
    else:
        discharge = min(residual, available_discharge_kw(b, inp.battery_energy_kwh, dt, inp.max_discharge_kw))
    grid_to_load = residual - discharge

    grid_to_batt = 0.0
    if charging_from_grid:
        share_left = max(0.0, inp.grid_share_kw - grid_to_load)
        grid_to_batt = max(0.0, min(inp.grid_charge_kw, headroom - solar_to_batt, share_left))
    grid = grid_to_load + grid_to_batt

    charge_in = solar_to_batt + grid_to_batt
    energy_after = inp.battery_energy_kwh + (b.efficiency * charge_in - discharge) * dt
    energy_after = min(b.capacity_kwh, max(0.0, energy_after))
    ci = inp.grid_gco2_per_kwh
    carbon_load = grid_to_load * dt * ci / 1000.0
    carbon_chg = grid_to_batt * dt * ci / 1000.0
    return StepResult(
        dt_h=dt,
        load_kw=load,
        solar_kw=solar,
        solar_to_load_kw=solar_to_load,
        solar_to_battery_kw=solar_to_batt,
        curtailed_kw=curtailed,
        battery_discharge_kw=discharge,
        grid_to_load_kw=grid_to_load,
        grid_to_battery_kw=grid_to_batt,
        grid_kw=grid,
        grid_over_share_kw=max(0.0, grid - inp.grid_share_kw),
        battery_energy_before_kwh=inp.battery_energy_kwh,
        battery_energy_kwh=energy_after,
        battery_loss_kwh=(1.0 - b.efficiency) * charge_in * dt,
        grid_gco2_per_kwh=ci,
        carbon_kgco2=carbon_load + carbon_chg,
        carbon_load_kgco2=carbon_load,
        carbon_charging_kgco2=carbon_chg,
    )


# --------------------------------------------------------------------------------------------------------------
# Carbon library functions (Table 2): set_carbon_rate / set_carbon_budget become power caps.


def budget_rate_gco2_per_h(budget_kgco2: float, used_kgco2: float, hours_left: float | None) -> float:
    """Pacing of a carbon budget: the remaining budget spread evenly over the time left (g/h).

    Without an end (``hours_left`` None) the budget only binds once it is spent (rate 0 then, else unlimited).
    """
    remaining_g = max(0.0, (budget_kgco2 - used_kgco2) * 1000.0)
    if remaining_g <= 0:
        return 0.0
    if hours_left is None:
        return math.inf
    if hours_left <= 0:
        return 0.0
    return remaining_g / hours_left


def carbon_limited_caps(
    caps_kw: dict[str, float],
    idle_kw: dict[str, float],
    clean_supply_kw: float,
    grid_gco2_per_kwh: float,
    rate_gco2_per_h: float,
) -> tuple[dict[str, float], bool]:
    """Scale container power caps so that the app's carbon rate stays within ``rate_gco2_per_h``.

    The app may draw ``rate / intensity`` kW from the grid (g/h / (g/kWh) = kW) on top of its carbon-free supply
    (solar share + available battery discharge). If the caps add up to more, the dynamic part of every cap
    (cap - idle) is scaled by one factor in [0, 1]. Returns (caps, met): ``met`` is False when even idle power
    exceeds the allowance (caps are then at idle, the lowest a CPU limit can reach).
    """
    if not math.isfinite(rate_gco2_per_h):
        return dict(caps_kw), True
    allowed_grid = math.inf if grid_gco2_per_kwh <= 0 else max(0.0, rate_gco2_per_h) / grid_gco2_per_kwh
    budget = clean_supply_kw + allowed_grid
    total = sum(caps_kw.values())
    if total <= budget:
        return dict(caps_kw), True
    idle_total = sum(idle_kw[k] for k in caps_kw)
    dyn = total - idle_total
    if budget <= idle_total or dyn <= 0:
        return {k: idle_kw[k] for k in caps_kw}, budget >= idle_total
    f = (budget - idle_total) / dyn
    return {k: idle_kw[k] + f * (caps_kw[k] - idle_kw[k]) for k in caps_kw}, True
