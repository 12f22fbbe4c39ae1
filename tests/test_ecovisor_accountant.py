"""The ecovisor's accountant (pure): a tick's energy and carbon per app and per container, the budget's share,
and the rows and summary that record them. Worked examples first, then properties."""
from __future__ import annotations

import copy
import math
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cicm.ecovisor import accountant
from cicm.ecovisor.accountant import Interval
from cicm.ecovisor.carbon import CarbonValue
from cicm.ecovisor.energy import BatterySpec
from cicm.ecovisor.power import PowerModel
from cicm.ecovisor.state import AppState, ContainerState

T0 = datetime(2022, 6, 21, 7, tzinfo=timezone.utc)
FIVE_MIN = Interval(T0, T0 + timedelta(minutes=5))


def battery(capacity_kwh=10.0, reserve_soc=0.3, c_rate=1.0, efficiency=0.9) -> BatterySpec:
    return BatterySpec(capacity_kwh=capacity_kwh, reserve_soc=reserve_soc, max_charge_kw=c_rate * capacity_kwh,
                       max_discharge_kw=c_rate * capacity_kwh, efficiency=efficiency)


def make_app(containers=("a", "b"), *, solar_fraction=0.0, batt=None, energy_kwh=0.0, charge_rate_kw=0.0,
             max_discharge_kw=None, grid_share_kw=10.0, budget=None) -> AppState:
    return AppState(
        name="app", token_sha256="x", spec={}, containers=list(containers), grid_share_kw=grid_share_kw,
        solar_fraction=solar_fraction, battery_fraction=0.0, callback_url=None,
        battery=batt or battery(capacity_kwh=0.0), battery_energy_kwh=energy_kwh, registered_at=T0,
        charge_rate_kw=charge_rate_kw, max_discharge_kw=max_discharge_kw, carbon_budget=budget,
    )


# ------------------------------------------------------------------------------------------------- examples
def test_interval_units():
    assert FIVE_MIN.dt_s == 300.0
    assert FIVE_MIN.dt_h == pytest.approx(1 / 12)
    assert FIVE_MIN.mid == T0 + timedelta(seconds=150)


def test_grid_only_app_pays_for_its_load_and_splits_it_by_energy():
    # 1.0 + 0.5 kW for 5 min = 0.125 kWh from the grid at 240 g/kWh = 0.03 kg, split 2:1.
    acc = accountant.account_app(make_app(), {"a": 1.0, "b": 0.5, "other": 9.0}, 0.0, 240.0, FIVE_MIN)
    assert acc.step.load_kw == 1.5
    assert acc.step.grid_kw == 1.5
    assert acc.step.carbon_kgco2 == pytest.approx(0.03)
    assert acc.container_carbon_kgco2 == {"a": pytest.approx(0.02), "b": pytest.approx(0.01)}
    assert acc.budget_used_kgco2 is None


def test_solar_then_battery_serve_the_load_carbon_free():
    # Load 2 kW; half of 1 kW site solar = 0.5 kW; the battery gives 1.5 kW for 1/12 h = 0.125 kWh.
    app = make_app(solar_fraction=0.5, batt=battery(), energy_kwh=5.0)
    acc = accountant.account_app(app, {"a": 1.5, "b": 0.5}, 1.0, 300.0, FIVE_MIN)
    assert acc.step.solar_to_load_kw == 0.5
    assert acc.step.battery_discharge_kw == 1.5
    assert acc.step.grid_kw == 0.0
    assert acc.step.battery_energy_kwh == pytest.approx(4.875)
    assert acc.step.carbon_kgco2 == 0.0
    assert acc.container_carbon_kgco2 == {"a": 0.0, "b": 0.0}
    assert app.battery_energy_kwh == 5.0  # the accountant does not touch the app


def test_budget_counts_only_the_part_of_the_tick_inside_its_window():
    # The budget starts 2 of 5 minutes into the tick: 3/5 of the tick's 1.0 kg falls inside.
    budget = {"kgco2": 5.0, "start": T0 + timedelta(minutes=2), "end": None, "used_kgco2": 0.25}
    assert accountant.budget_share_kgco2(budget, FIVE_MIN, 1.0) == pytest.approx(0.6)
    assert accountant.budget_used_after_kgco2(budget, FIVE_MIN, 1.0) == pytest.approx(0.85)
    ended = {**budget, "start": T0 - timedelta(hours=1), "end": T0}
    assert accountant.budget_share_kgco2(ended, FIVE_MIN, 1.0) == 0.0
    assert accountant.budget_used_after_kgco2(ended, FIVE_MIN, 1.0) == 0.25
    assert accountant.budget_used_after_kgco2(None, FIVE_MIN, 1.0) is None


def test_zero_load_carries_no_container_carbon():
    assert accountant.split_by_energy_kgco2(0.0, {"a": 0.0, "b": 0.0}, 1 / 12) == {"a": 0.0, "b": 0.0}
    assert accountant.split_by_energy_kgco2(0.7, {}, 1 / 12) == {}


def test_rows_and_summary():
    app = make_app(batt=battery(capacity_kwh=8.0), energy_kwh=4.0)
    acc = accountant.account_app(app, {"a": 1.0, "b": 0.5}, 0.0, 400.0, FIVE_MIN)
    row = accountant.app_row(7, FIVE_MIN, acc, 8.0, math.inf, True)
    assert row["tick_id"] == 7 and row["dt_s"] == 300.0 and row["app"] == "app"
    assert row["carbon_rate_limit_gco2_per_h"] is None  # no limit
    assert row["battery_soc"] == pytest.approx(acc.step.battery_energy_kwh / 8.0)
    assert set(row) == {"tick_id", "interval_start", "interval_end", "dt_s", "app", "battery_soc",
                        "carbon_rate_limit_gco2_per_h", "carbon_policy_met"} | accountant.APP_FIELDS
    model = PowerModel.linear(4, 0.5, 1.5)
    owned = ContainerState("a", 4, model, app="app", power_kw=1.0)
    free = ContainerState("spare", 1, model, power_kw=0.6)
    rows = [accountant.container_row(7, FIVE_MIN, cs, acc.container_carbon_kgco2.get(cs.name, 0.0))
            for cs in (owned, free)]
    assert rows[0]["energy_kwh"] == pytest.approx(1 / 12)
    assert rows[1]["carbon_kgco2"] == 0.0
    tick = accountant.tick_row(7, FIVE_MIN, 2.5, CarbonValue(400.0, "measured", T0), "simulated", "simulated", T0)
    s = accountant.tick_summary(tick, [row], rows, {"app": acc}, ["spare: gone"])
    assert s["interval_start"] == T0.isoformat() and s["grid_gco2_per_kwh"] == 400.0
    assert list(s["apps"]["app"]["containers"]) == ["a"]  # the unowned container is not the app's
    assert s["apps"]["app"]["ci_quality"] == "measured"
    assert s["apps"]["app"]["balance_error_kw"] == pytest.approx(0.0, abs=1e-12)
    assert s["errors"] == ["spare: gone"]


# ------------------------------------------------------------------------------------------------- properties
kw = st.floats(min_value=0, max_value=50, allow_nan=False)
frac = st.floats(min_value=0, max_value=1, allow_nan=False)
names = ["a", "b", "c"]


@st.composite
def app_ticks(draw):
    cap = draw(st.floats(min_value=0, max_value=100, allow_nan=False))
    batt = battery(capacity_kwh=cap, reserve_soc=draw(frac), c_rate=draw(st.floats(0, 3, allow_nan=False)),
                   efficiency=draw(st.floats(0.5, 1, allow_nan=False)))
    start_kg = draw(st.floats(0, 10, allow_nan=False))
    budget = draw(st.one_of(st.none(), st.builds(
        lambda s, e, kg: {"kgco2": kg, "start": T0 + timedelta(seconds=s),
                          "end": None if e is None else T0 + timedelta(seconds=s + e), "used_kgco2": start_kg},
        st.integers(-7200, 7200), st.one_of(st.none(), st.integers(1, 7200)), st.floats(0, 10, allow_nan=False))))
    app = make_app(
        names, solar_fraction=draw(frac), batt=batt, energy_kwh=cap * draw(frac),
        charge_rate_kw=draw(st.one_of(st.just(0.0), kw)), max_discharge_kw=draw(st.one_of(st.none(), kw)),
        grid_share_kw=draw(kw), budget=budget,
    )
    power = {c: draw(kw) for c in names}
    interval = Interval(T0, T0 + timedelta(seconds=draw(st.integers(1, 3600))))
    return app, power, draw(kw), draw(st.floats(0, 1500, allow_nan=False)), interval


def close(a: float, b: float, scale: float = 1.0) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, scale)


@given(app_ticks())
def test_energy_is_conserved_in_kwh(t):
    app, power, site_solar_kw, ci, iv = t
    r = accountant.account_app(app, power, site_solar_kw, ci, iv).step
    dt = iv.dt_h
    stored_kwh = r.battery_energy_kwh - r.battery_energy_before_kwh
    energy_in_kwh = (r.solar_kw + r.grid_kw) * dt
    energy_out_kwh = (r.load_kw + r.curtailed_kw) * dt + stored_kwh + r.battery_loss_kwh
    assert close(energy_in_kwh, energy_out_kwh, energy_in_kwh + app.battery.capacity_kwh)
    assert close(r.load_kw, sum(power.values()), r.load_kw)
    assert close(r.solar_kw, app.solar_fraction * site_solar_kw, r.solar_kw)


@given(app_ticks())
def test_flows_and_carbon_are_non_negative_and_bounded(t):
    app, power, site_solar_kw, ci, iv = t
    acc = accountant.account_app(app, power, site_solar_kw, ci, iv)
    r = acc.step
    for k in ("solar_to_load_kw", "solar_to_battery_kw", "curtailed_kw", "battery_discharge_kw", "grid_to_load_kw",
              "grid_to_battery_kw", "grid_kw", "battery_loss_kwh", "carbon_kgco2", "carbon_load_kgco2"):
        assert getattr(r, k) >= 0, k
    assert -1e-12 <= r.battery_energy_kwh <= app.battery.capacity_kwh + 1e-9
    assert r.battery_energy_kwh >= min(r.battery_energy_before_kwh, app.battery.reserve_kwh) - 1e-9
    assert r.grid_to_battery_kw <= max(0.0, app.grid_share_kw - r.grid_to_load_kw) + 1e-9
    assert close(r.carbon_kgco2, r.grid_kw * iv.dt_h * ci / 1000.0, r.carbon_kgco2)
    assert all(v >= 0 for v in acc.container_carbon_kgco2.values())


@given(app_ticks())
def test_container_carbon_adds_up_to_the_load_carbon(t):
    app, power, site_solar_kw, ci, iv = t
    acc = accountant.account_app(app, power, site_solar_kw, ci, iv)
    total = sum(acc.container_carbon_kgco2.values())
    expected = acc.step.carbon_load_kgco2 if sum(power.values()) * iv.dt_h > 0 else 0.0
    assert close(total, expected, expected)
    assert set(acc.container_carbon_kgco2) == set(app.containers)


@given(app_ticks())
def test_budget_grows_by_at_most_the_tick_carbon_and_the_app_is_untouched(t):
    app, power, site_solar_kw, ci, iv = t
    before = copy.deepcopy(app)
    acc = accountant.account_app(app, power, site_solar_kw, ci, iv)
    assert app == before
    if app.carbon_budget is None:
        assert acc.budget_used_kgco2 is None
        return
    grown = acc.budget_used_kgco2 - app.carbon_budget["used_kgco2"]
    assert -1e-12 <= grown <= acc.step.carbon_kgco2 * (1 + 1e-12) + 1e-15
    b = app.carbon_budget
    if b["start"] <= iv.start and (b["end"] is None or iv.end <= b["end"]):
        assert close(grown, acc.step.carbon_kgco2, acc.step.carbon_kgco2)


@given(st.integers(-600, 4200), st.one_of(st.none(), st.integers(1, 4000)), st.integers(1, 3599),
       st.floats(0, 100, allow_nan=False))
def test_budget_share_is_additive_over_a_split_tick(start_s, len_s, split_s, carbon_kgco2):
    budget = {"kgco2": 1.0, "start": T0 + timedelta(seconds=start_s),
              "end": None if len_s is None else T0 + timedelta(seconds=start_s + len_s), "used_kgco2": 0.0}
    whole = Interval(T0, T0 + timedelta(hours=1))
    mid = T0 + timedelta(seconds=split_s)
    first, second = Interval(T0, mid), Interval(mid, whole.end)
    parts = (accountant.budget_share_kgco2(budget, first, carbon_kgco2 * first.dt_s / whole.dt_s)
             + accountant.budget_share_kgco2(budget, second, carbon_kgco2 * second.dt_s / whole.dt_s))
    assert close(parts, accountant.budget_share_kgco2(budget, whole, carbon_kgco2), carbon_kgco2)
    assert 0.0 <= accountant.budget_share_kgco2(budget, whole, carbon_kgco2) <= carbon_kgco2 * (1 + 1e-12)


@given(st.dictionaries(st.sampled_from(names), kw, min_size=1), st.floats(0, 100, allow_nan=False),
       st.floats(1 / 3600, 1, allow_nan=False))
def test_split_is_proportional_to_energy(power_kw, carbon_kgco2, dt_h):
    out = accountant.split_by_energy_kgco2(carbon_kgco2, power_kw, dt_h)
    total_kw = sum(power_kw.values())
    for c, p in power_kw.items():
        expected = carbon_kgco2 * p / total_kw if total_kw > 0 else 0.0
        assert close(out[c], expected, carbon_kgco2)
