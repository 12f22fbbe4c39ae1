"""Storage evidence (cicm.backtest.storage): the hourly site model conserves energy and keeps the battery in
bounds; a short CISO run of every policy closes its balance every hour and orders as it must."""
from __future__ import annotations

from datetime import date

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cicm.backtest.storage import POLICIES, SiteSpec, run_site, run_storage_backtest
from cicm.errors import InputError
from cicm.optimize.storage import Battery
from tests.test_storage_plan import check_plan


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 72), rte=st.floats(0.5, 1.0), reserve=st.floats(0, 0.9))
def test_the_site_model_conserves_energy_and_respects_the_battery(seed, n, rte, reserve):
    rng = np.random.default_rng(seed)
    cap = rng.uniform(1, 2000)
    bat = Battery.from_site(cap, rte, rng.uniform(0.05, 2), rng.uniform(0.05, 2), reserve_soc=reserve,
                            initial_soc=rng.uniform(reserve, 1.0))
    load = rng.uniform(0, 1000, n)
    solar = rng.uniform(0, 1500, n) * (rng.random(n) < 0.5)
    charge = rng.uniform(0, 1500, n) * (rng.random(n) < 0.3)
    discharge = rng.uniform(0, 1500, n) * (rng.random(n) < 0.5)
    plan = run_site(load, solar, bat, charge, discharge)
    check_plan(plan, bat, max(cap, 1500.0))
    assert (plan.grid_kw >= 0).all()
    idle = run_site(load, solar, None, charge, discharge)
    check_plan(idle, None, 1500.0)


@pytest.fixture(scope="module")
def short_run():
    return run_storage_backtest("CISO", date(2022, 6, 1), 2, SiteSpec(solar_kwp_per_kw=2.0))


def test_every_policy_closes_its_balance_every_hour(short_run):
    bt = short_run
    assert set(bt.runs) == set(POLICIES)
    for name, run in bt.runs.items():
        bat = None if name == "no-battery" else bt.battery
        check_plan(run.site, bat, max(bt.battery.capacity_kwh, bt.mean_load_kw))
        np.testing.assert_allclose(run.site.solar_kw, bt.solar_actual_kw)
        assert run.late_core_hours <= 1e-6 * bt.mean_load_kw  # every deadline met
    table = bt.table()
    assert (table["max_balance_error_kw"] <= 1e-9 * bt.mean_load_kw).all()


def test_the_policies_order_as_they_must(short_run):
    t = short_run.table()["total_kgco2"]
    assert t["heuristic"] < t["no-battery"]
    assert t["co-plan"] < t["no-battery"]
    assert t["bound"] <= min(t["co-plan"], t["co-plan-oracle"], t["battery-plan"], t["heuristic"]) * (1 + 1e-3)
    # co-planning knows the sun: it curtails less of it than the schedule that does not
    c = short_run.table()["curtailed_mwh"]
    assert c["co-plan"] <= c["heuristic"] + 1e-9


def test_unknown_policies_and_zones_are_refused():
    with pytest.raises(InputError, match="policies"):
        run_storage_backtest("CISO", date(2022, 6, 1), 1, policies=("nope",))
    with pytest.raises(InputError, match="zone"):
        run_storage_backtest("XXXX", date(2022, 6, 1), 1)
