"""The ecovisor's physical energy model (pure functions): conservation, limits, order of supply, carbon."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cicm.ecovisor import energy
from cicm.ecovisor.energy import BatterySpec, StepInput, step
from cicm.ecovisor.power import PowerModel
from cicm.errors import InputError

kw = st.floats(min_value=0, max_value=500, allow_nan=False)
frac = st.floats(min_value=0, max_value=1, allow_nan=False)


@st.composite
def step_inputs(draw):
    cap = draw(st.floats(min_value=0, max_value=1000, allow_nan=False))
    reserve = draw(frac)
    b = BatterySpec(
        capacity_kwh=cap,
        reserve_soc=reserve,
        max_charge_kw=draw(st.floats(min_value=0, max_value=3, allow_nan=False)) * cap,
        max_discharge_kw=draw(st.floats(min_value=0, max_value=3, allow_nan=False)) * cap,
        efficiency=draw(st.floats(min_value=0.5, max_value=1, allow_nan=False)),
    )
    e0 = cap * draw(frac)
    return StepInput(
        dt_h=draw(st.floats(min_value=1 / 3600, max_value=1, allow_nan=False)),
        load_kw=draw(kw),
        solar_kw=draw(kw),
        battery=b,
        battery_energy_kwh=e0,
        grid_gco2_per_kwh=draw(st.floats(min_value=0, max_value=1500, allow_nan=False)),
        grid_charge_kw=draw(st.one_of(st.just(0.0), kw)),
        max_discharge_kw=draw(st.one_of(st.just(math.inf), kw)),
        grid_share_kw=draw(st.one_of(st.just(math.inf), kw)),
    )


@settings(max_examples=400, deadline=None)
@given(step_inputs())
def test_energy_is_conserved_every_tick(inp):
    r = step(inp)
    assert abs(r.balance_error_kw()) <= 1e-9 * max(1.0, inp.load_kw, inp.solar_kw)
    # every flow is non-negative
    for name in ("solar_to_load_kw", "solar_to_battery_kw", "curtailed_kw", "battery_discharge_kw",
                 "grid_to_load_kw", "grid_to_battery_kw", "grid_kw", "grid_over_share_kw"):
        assert getattr(r, name) >= -1e-12, name
    # solar is split exactly into load, charging and curtailment
    assert abs(r.solar_to_load_kw + r.solar_to_battery_kw + r.curtailed_kw - inp.solar_kw) <= 1e-9 * max(1, inp.solar_kw)
    # the load is fully served
    assert abs(r.solar_to_load_kw + r.battery_discharge_kw + r.grid_to_load_kw - inp.load_kw) <= 1e-9 * max(1, inp.load_kw)


@settings(max_examples=400, deadline=None)
@given(step_inputs())
def test_battery_limits_and_bookkeeping(inp):
    r = step(inp)
    b = inp.battery
    tol = 1e-9 * max(1.0, b.capacity_kwh)
    # C-rates and the app's max discharge
    assert r.charging_kw <= b.max_charge_kw + 1e-9
    assert r.battery_discharge_kw <= min(b.max_discharge_kw, inp.max_discharge_kw) + 1e-9
    # never below reserve (when it started at or above reserve), never above capacity
    if inp.battery_energy_kwh >= b.reserve_kwh:
        assert r.battery_energy_kwh >= b.reserve_kwh - tol
    else:
        assert r.battery_discharge_kw == 0
    assert r.battery_energy_kwh <= b.capacity_kwh + tol
    # stored energy changes by eta * charge - discharge (efficiency on charge)
    expect = inp.battery_energy_kwh + (b.efficiency * r.charging_kw - r.battery_discharge_kw) * inp.dt_h
    assert abs(r.battery_energy_kwh - expect) <= tol
    assert abs(r.battery_loss_kwh - (1 - b.efficiency) * r.charging_kw * inp.dt_h) <= tol
    # charging and discharging never at once
    assert r.charging_kw == 0 or r.battery_discharge_kw == 0 or inp.grid_charge_kw == 0
    # grid charging respects the share
    assert r.grid_to_battery_kw <= max(0.0, inp.grid_share_kw - r.grid_to_load_kw) + 1e-9


@settings(max_examples=300, deadline=None)
@given(step_inputs())
def test_carbon_is_grid_energy_times_intensity(inp):
    r = step(inp)
    assert math.isclose(r.carbon_kgco2, r.grid_kw * inp.dt_h * inp.grid_gco2_per_kwh / 1000, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(r.carbon_load_kgco2 + r.carbon_charging_kgco2, r.carbon_kgco2, rel_tol=1e-9, abs_tol=1e-12)


def _bat(cap=10.0, reserve=0.3, c_chg=0.5, c_dis=1.0, eff=0.9):
    return BatterySpec(cap, reserve, c_chg * cap, c_dis * cap, eff)


def test_order_solar_then_battery_then_grid():
    b = _bat()
    # solar covers part of the load, battery the next part up to its limit, grid the rest
    r = step(StepInput(dt_h=1, load_kw=20, solar_kw=4, battery=b, battery_energy_kwh=10, grid_gco2_per_kwh=400,
                       max_discharge_kw=5))
    assert (r.solar_to_load_kw, r.battery_discharge_kw, r.grid_kw) == (4, 5, 11)
    assert r.carbon_kgco2 == pytest.approx(11 * 400 / 1000)
    # excess solar charges up to the C-rate (5 kW), the rest is curtailed, the grid is not touched
    r = step(StepInput(dt_h=1, load_kw=1, solar_kw=10, battery=b, battery_energy_kwh=3, grid_gco2_per_kwh=400))
    assert (r.solar_to_load_kw, r.solar_to_battery_kw, r.curtailed_kw, r.grid_kw) == (1, 5, 4, 0)
    assert r.battery_energy_kwh == pytest.approx(3 + 0.9 * 5)


def test_reserve_soc_is_never_crossed():
    b = _bat(reserve=0.3)
    r = step(StepInput(dt_h=1, load_kw=100, solar_kw=0, battery=b, battery_energy_kwh=4, grid_gco2_per_kwh=1))
    assert r.battery_discharge_kw == pytest.approx(1.0)  # only 1 kWh above the 3 kWh reserve
    assert r.battery_energy_kwh == pytest.approx(3.0)
    r2 = step(StepInput(dt_h=1, load_kw=100, solar_kw=0, battery=b, battery_energy_kwh=3, grid_gco2_per_kwh=1))
    assert r2.battery_discharge_kw == 0 and r2.grid_kw == 100


def test_grid_charging_is_grid_load_and_stops_discharge():
    b = _bat()
    r = step(StepInput(dt_h=0.5, load_kw=2, solar_kw=0, battery=b, battery_energy_kwh=5, grid_gco2_per_kwh=300,
                       grid_charge_kw=4))
    assert r.battery_discharge_kw == 0
    assert r.grid_to_battery_kw == 4 and r.grid_kw == 6
    assert r.carbon_charging_kgco2 == pytest.approx(4 * 0.5 * 300 / 1000)
    assert r.battery_energy_kwh == pytest.approx(5 + 0.9 * 4 * 0.5)
    # limited by the grid share
    r = step(StepInput(dt_h=0.5, load_kw=2, solar_kw=0, battery=b, battery_energy_kwh=5, grid_gco2_per_kwh=300,
                       grid_charge_kw=4, grid_share_kw=3))
    assert r.grid_to_battery_kw == 1 and r.grid_over_share_kw == 0
    # and by free capacity
    r = step(StepInput(dt_h=1, load_kw=0, solar_kw=0, battery=b, battery_energy_kwh=9.55, grid_gco2_per_kwh=300,
                       grid_charge_kw=5))
    assert r.battery_energy_kwh == pytest.approx(10.0)
    assert r.grid_to_battery_kw == pytest.approx(0.5)


def test_bad_inputs_are_rejected_by_name():
    b = _bat()
    with pytest.raises(InputError) as e:
        StepInput(dt_h=1, load_kw=-1, solar_kw=0, battery=b, battery_energy_kwh=5, grid_gco2_per_kwh=1)
    assert e.value.field == "load_kw"
    with pytest.raises(InputError) as e:
        StepInput(dt_h=1, load_kw=1, solar_kw=float("nan"), battery=b, battery_energy_kwh=5, grid_gco2_per_kwh=1)
    assert e.value.field == "solar_kw"
    with pytest.raises(InputError) as e:
        StepInput(dt_h=1, load_kw=1, solar_kw=0, battery=b, battery_energy_kwh=50, grid_gco2_per_kwh=1)
    assert e.value.field == "battery_energy_kwh"
    with pytest.raises(InputError) as e:
        BatterySpec(10, 1.5, 1, 1, 0.9)
    assert e.value.field == "reserve_soc"


def test_carbon_limited_caps_scale_the_dynamic_part():
    caps = {"a": 0.3, "b": 0.3}
    idle = {"a": 0.1, "b": 0.1}
    # 0.1 kW of clean supply + 40 g/h at 400 g/kWh = 0.1 kW grid -> 0.2 kW budget, i.e. idle only
    eff, met = energy.carbon_limited_caps(caps, idle, 0.0, 400.0, 80.0)
    assert met and sum(eff.values()) == pytest.approx(0.2) and eff == {"a": 0.1, "b": 0.1}
    eff, met = energy.carbon_limited_caps(caps, idle, 0.1, 400.0, 80.0)
    assert met and sum(eff.values()) == pytest.approx(0.3)
    assert eff["a"] == pytest.approx(0.15)
    eff, met = energy.carbon_limited_caps(caps, idle, 0.0, 400.0, 0.0)
    assert not met and eff == idle
    eff, met = energy.carbon_limited_caps(caps, idle, 5.0, 400.0, 0.0)
    assert met and eff == caps


def test_budget_pacing():
    assert energy.budget_rate_gco2_per_h(1.0, 0.5, 10) == pytest.approx(50.0)
    assert energy.budget_rate_gco2_per_h(1.0, 1.0, 10) == 0.0
    assert energy.budget_rate_gco2_per_h(1.0, 0.2, None) == math.inf


@settings(max_examples=200, deadline=None)
@given(
    pts=st.lists(st.tuples(st.floats(0.01, 4), st.floats(0, 0.5)), min_size=1, max_size=5),
    idle=st.floats(0, 0.2),
    p=st.floats(0, 1),
)
def test_power_model_inverse(pts, idle, p):
    xs = sorted({round(x, 6) for x, _ in pts})
    ys = sorted(y for _, y in pts)[: len(xs)]
    ys = [idle + y for y in ys]
    model = PowerModel.piecewise([(0.0, idle)] + list(zip(xs, ys)))
    cap = idle + p * (model.max_kw - idle)
    c = model.cores_for_power(cap)
    assert 0 <= c <= model.cores
    assert model.power_kw(c) <= cap + 1e-9  # the CPU limit enforces the cap
    if model.power_kw(model.cores) > cap + 1e-9:  # and is the largest such usage (within a hair)
        assert model.power_kw(min(model.cores, c + 1e-6)) >= cap - 1e-6


def test_power_model_linear_and_rejections():
    m = PowerModel.linear(4, 0.1, 0.3)
    assert m.power_kw(2) == pytest.approx(0.2)
    assert m.cores_for_power(0.2) == pytest.approx(2)
    assert m.cpu_limit_for_cap(0.1) == pytest.approx(0.01)  # floor: a CPU limit cannot be 0
    with pytest.raises(InputError) as e:
        m.cores_for_power(0.05)
    assert e.value.field == "kw"
