"""The ecovisor's parts on their own: the clock protocol, the carbon policies (pure), the settings checks, the
app registry and auth, and the power-cap controller against the simulated backend."""
from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pytest

from cicm.ecovisor import policy, settings
from cicm.ecovisor.backends import BackendError, make_backend
from cicm.ecovisor.caps import CapController
from cicm.ecovisor.carbon import CarbonValue
from cicm.ecovisor.clock import Clock, ManualClock, RealClock, SimulatedClock, as_utc, clock_mode, is_simulated
from cicm.ecovisor.energy import BatterySpec
from cicm.ecovisor.errors import AuthError, ConflictError, NotFoundError
from cicm.ecovisor.registry import AppRegistry, token_sha256
from cicm.ecovisor.schemas import AppRegistration
from cicm.ecovisor.solar import SolarModel
from cicm.ecovisor.state import AppState, containers_from_site
from cicm.store.ecovisor import Telemetry
from cicm.ecovisor.testing import test_site
from cicm.errors import InputError

T0 = datetime(2022, 6, 21, 7, tzinfo=timezone.utc)


# ------------------------------------------------------------------------------------------------- clock
def test_clocks_follow_the_protocol():
    assert isinstance(RealClock(), Clock) and not isinstance(RealClock(), ManualClock)
    manual = SimulatedClock(T0)
    assert isinstance(manual, ManualClock)
    assert manual.advance(300) == T0 + timedelta(minutes=5)
    assert is_simulated(manual) and not is_simulated(RealClock())
    assert clock_mode(object()) == "?"


def test_as_utc():
    assert as_utc(datetime(2022, 6, 21, 0, tzinfo=timezone(timedelta(hours=-7)))) == T0
    with pytest.raises(InputError) as e:
        as_utc(datetime(2022, 6, 21))
    assert e.value.field == "time"


# ------------------------------------------------------------------------------------------------- policy
def app_state(**kw) -> AppState:
    b = BatterySpec(capacity_kwh=10.0, reserve_soc=0.3, max_charge_kw=10.0, max_discharge_kw=10.0, efficiency=0.9)
    base = dict(name="app", token_sha256="x", spec={}, containers=[], grid_share_kw=5.0, solar_fraction=0.5,
                battery_fraction=0.5, callback_url=None, battery=b, battery_energy_kwh=5.0, registered_at=T0)
    return AppState(**(base | kw))


def test_rate_limit_paces_the_budget_and_takes_the_lower_limit():
    # 1 kg budget, 0.4 kg used, 10 h left: 600 g / 10 h = 60 g/h.
    budget = {"kgco2": 1.0, "start": T0, "end": T0 + timedelta(hours=10), "used_kgco2": 0.4}
    assert policy.rate_limit_gco2_per_h(app_state(carbon_budget=budget), T0) == pytest.approx(60.0)
    assert policy.rate_limit_gco2_per_h(app_state(carbon_budget=budget, carbon_rate_gco2_per_h=50.0), T0) == 50.0
    assert policy.rate_limit_gco2_per_h(app_state(carbon_budget=budget), T0 + timedelta(hours=10)) == math.inf
    assert policy.rate_limit_gco2_per_h(app_state(), T0) == math.inf


def test_clean_supply_is_solar_share_plus_battery_unless_charging():
    # 0.5 x 4 kW solar; the battery could give 2 kWh above reserve in 5 min (24 kW) but its C-rate allows 10 kW.
    assert policy.clean_supply_kw(app_state(), 4.0, 1 / 12) == pytest.approx(12.0)
    assert policy.clean_supply_kw(app_state(max_discharge_kw=1.0), 4.0, 1 / 12) == pytest.approx(3.0)
    assert policy.clean_supply_kw(app_state(charge_rate_kw=1.0), 4.0, 1 / 12) == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------------- settings
def test_settings_checks_name_the_field():
    app = app_state()
    assert settings.check_charge_rate_kw(app, 2) == 2.0
    for bad in (-1.0, math.nan, 11.0):
        with pytest.raises(InputError):
            settings.check_charge_rate_kw(app, bad)
    with pytest.raises(InputError, match="grid share"):
        settings.check_charge_rate_kw(app, 6.0)
    assert settings.check_carbon_rate_gco2_per_h(None) is None
    with pytest.raises(InputError) as e:
        settings.check_budget_window(1.0, T0, T0, T0)
    assert e.value.field == "end"
    assert settings.check_budget_window(1.0, None, None, T0) == (1.0, T0, None)


# ------------------------------------------------------------------------------------------------- registry
@pytest.fixture
def parts():
    site = test_site()
    store = Telemetry(None)
    containers = containers_from_site(site)
    registry = AppRegistry(site, store, containers, SimulatedClock(T0))
    yield site, store, containers, registry
    store.close()


def test_registry_registers_authenticates_and_guards_containers(parts):
    site, store, containers, registry = parts
    app, token = registry.register(AppRegistration(name="a", grid_fraction=0.25, battery_fraction=0.5,
                                                   containers=["a-batch"]))
    assert app.grid_share_kw == 5.0  # 0.25 of the site's 20 kW
    assert app.battery.capacity_kwh == 10.0 and app.battery_energy_kwh == 5.0  # initial SoC 0.5
    assert app.token_sha256 == token_sha256(token) != token
    assert containers["a-batch"].app == "a"
    assert registry.authenticate(token) is app
    with pytest.raises(AuthError):
        registry.authenticate("not-a-token")
    with pytest.raises(NotFoundError):
        registry.container_of(app, "b-batch")
    with pytest.raises(ConflictError):
        registry.register(AppRegistration(name="a", grid_kw=1.0))
    with pytest.raises(InputError) as e:
        registry.register(AppRegistration(name="b", grid_kw=16.0))  # 5 + 16 > 20 kW
    assert e.value.field == "grid_kw" and list(registry.apps) == ["a"]
    assert [r["name"] for r in store.load_apps()] == ["a"]


def test_registry_restores_apps_and_their_caps(parts):
    site, store, containers, registry = parts
    app, token = registry.register(AppRegistration(name="a", grid_kw=2.0, containers=["a-batch"]))
    containers["a-batch"].powercap_kw = 1.2
    registry.persist(app)  # write-behind: only marked ...
    assert store.load_apps()[0]["state"]["powercaps_kw"]["a-batch"] != 1.2
    assert registry.flush() == 1 and registry.flush() == 0  # ... and stored by the flush, once
    fresh = containers_from_site(site)
    again = AppRegistry(site, store, fresh, SimulatedClock(T0))
    again.restore(T0)
    assert again.authenticate(token).name == "a"
    assert fresh["a-batch"].app == "a" and fresh["a-batch"].powercap_kw == 1.2


# ------------------------------------------------------------------------------------------------- caps
class FlatSolar(SolarModel):
    def __init__(self, kw: float):
        self.kw = kw

    def power_kw(self, t: datetime) -> float:
        return self.kw


class FlatCarbon:
    name = "flat"

    def __init__(self, g: float):
        self.g = g

    def at(self, t: datetime) -> CarbonValue:
        return CarbonValue(self.g, "measured", t)


def controller(parts, backend=None, g=500.0):
    site, _store, containers, registry = parts
    be = backend or make_backend(site)
    return CapController(be, containers, registry.apps, FlatCarbon(g), FlatSolar(0.0), 300.0,
                         SimulatedClock(T0)), be


def test_carbon_rate_scales_the_dynamic_part_of_the_caps(parts):
    _site, _store, containers, registry = parts
    caps, be = controller(parts)
    app, _ = registry.register(AppRegistration(name="a", grid_kw=5.0, containers=["a-batch", "b-batch"]))
    # Caps 1.5 + 3.0 kW, idle 0.5 + 1.0 kW. 1000 g/h at 500 g/kWh allows 2 kW: dynamic 0.5 of 3 kW, factor 1/6.
    caps.set_policy(app, "carbon_rate_gco2_per_h", 1000.0)
    assert containers["a-batch"].effective_powercap_kw == pytest.approx(0.5 + 1.0 / 6)
    assert containers["b-batch"].effective_powercap_kw == pytest.approx(1.0 + 2.0 / 6)
    assert be.get_cpu_limit("a-batch") == pytest.approx(containers["a-batch"].cpu_limit_cores)
    assert app.carbon_policy_met
    caps.set_policy(app, "carbon_rate_gco2_per_h", 100.0)  # 0.2 kW < 1.5 kW idle: capped at idle, not met
    assert not app.carbon_policy_met
    assert containers["a-batch"].effective_powercap_kw == 0.5


def test_a_backend_error_restores_the_old_cap(parts):
    _site, _store, containers, registry = parts

    class Failing:
        kind = "failing"

        def set_cpu_limit(self, container, cores):
            raise BackendError("limit not writable")

    caps, _ = controller(parts, backend=Failing())
    app, _ = registry.register(AppRegistration(name="a", grid_kw=5.0, containers=["a-batch"]))
    with pytest.raises(BackendError):
        caps.set_powercap(app, containers["a-batch"], 1.0)
    assert containers["a-batch"].powercap_kw == 1.5
    assert containers["a-batch"].last_error == "limit not writable"
    with pytest.raises(BackendError):
        caps.set_policy(app, "carbon_rate_gco2_per_h", 10.0)
    assert app.carbon_rate_gco2_per_h is None
