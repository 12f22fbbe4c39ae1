"""The day-ahead storage plan (cicm.optimize.storage) and its co-planning in the queue program: the battery's
state of charge, C-rates and reserve, no simultaneous charge and discharge, the energy balance every hour, and a
campus without storage planned exactly as before."""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cicm.errors import InputError
from cicm.optimize.queue import QueueCampus, QueueCluster, arrival_bounds, greedy_service, plan_queue
from cicm.optimize.storage import Battery, CampusStorage, StoragePlan, plan_storage
from tests.test_optimize_queue import CONVEX, LINEAR, cluster

REPO = Path(__file__).resolve().parent.parent
BALANCE = 1e-9


def check_plan(plan: StoragePlan, bat: Battery | None, scale: float = 1.0) -> None:
    """Every invariant a plan must hold, to 1e-9 (kW, kWh) relative to ``scale``."""
    tol = BALANCE * max(scale, 1.0)
    assert plan.balance_error_kw() <= tol
    for arr in (plan.solar_used_kw, plan.curtailed_kw, plan.charge_kw, plan.discharge_kw, plan.grid_kw):
        assert (arr >= -tol).all()
    assert (np.minimum(plan.charge_kw, plan.discharge_kw) <= tol).all()  # never both in one hour
    if bat is not None:
        assert (plan.energy_kwh >= bat.reserve_kwh - tol).all() and (plan.energy_kwh <= bat.capacity_kwh + tol).all()
        assert (plan.charge_kw <= bat.max_charge_kw + tol).all()
        assert (plan.discharge_kw <= bat.max_discharge_kw + tol).all()
    # energy is conserved over the horizon, losses counted
    e_in = plan.grid_kw.sum() + plan.solar_kw.sum()
    e_out = plan.load_kw.sum() + plan.curtailed_kw.sum() + plan.loss_kwh.sum() + plan.energy_kwh[-1] - plan.initial_kwh
    assert abs(e_in - e_out) <= tol * plan.load_kw.size


def sine_carbon(n: int, base=250.0, amp=120.0) -> np.ndarray:
    return base + amp * np.sin(np.arange(n) / 24 * 2 * np.pi)


def test_battery_inputs_are_checked_and_the_round_trip_is_split():
    b = Battery.from_site(100.0, 0.81, 0.5, 0.25, reserve_soc=0.3, initial_soc=0.5)
    assert b.charge_efficiency == pytest.approx(0.9) and b.discharge_efficiency == pytest.approx(0.9)
    assert b.max_charge_kw == 50.0 and b.max_discharge_kw == 25.0 and b.reserve_kwh == pytest.approx(30.0)
    with pytest.raises(InputError, match="charge_efficiency"):
        Battery(100, 10, 10, charge_efficiency=1.2)
    with pytest.raises(InputError, match="initial_soc"):
        Battery(100, 10, 10, reserve_soc=0.5, initial_soc=0.2)
    with pytest.raises(InputError, match="capacity_kwh"):
        Battery(float("nan"), 10, 10)
    with pytest.raises(InputError, match="solar_kw"):
        CampusStorage(solar_kw=np.array([1.0, -1.0]))
    with pytest.raises(InputError, match="storage.solar_kw"):
        QueueCampus("x", (cluster(np.full(24, 10.0)),), np.full(24, 100.0), storage=CampusStorage(solar_kw=np.ones(5)))


def test_the_battery_shifts_grid_energy_from_dirty_to_clean_hours():
    n = 48
    eta = sine_carbon(n)
    load = np.full(n, 500.0)
    bat = Battery.from_site(1000.0, 0.85, 0.25, 0.25, reserve_soc=0.2, initial_soc=0.2)
    plan, _ = plan_storage(load, eta, CampusStorage(bat))
    check_plan(plan, bat, 1000.0)
    dirty, clean = eta > np.quantile(eta, 0.75), eta < np.quantile(eta, 0.25)
    assert plan.discharge_kw[dirty].sum() > 0.5 * plan.discharge_kw.sum()
    assert plan.charge_kw[clean].sum() > 0.5 * plan.charge_kw.sum()
    idle, _ = plan_storage(load, eta, CampusStorage(None))
    assert plan.carbon_kg(eta) < idle.carbon_kg(eta)


def test_no_cycling_when_the_spread_does_not_pay_for_the_losses():
    n = 24
    eta = np.where(np.arange(n) < 12, 100.0, 115.0)  # 15% spread, round trip 0.8: cycling loses carbon
    bat = Battery.from_site(1000.0, 0.8, 0.5, 0.5, reserve_soc=0.1, initial_soc=0.1)
    plan, _ = plan_storage(np.full(n, 300.0), eta, CampusStorage(bat, terminal_gco2_per_kwh=0.0))
    check_plan(plan, bat, 1000.0)
    assert plan.charge_kw.max() < 1e-6 and plan.discharge_kw.max() < 1e-6


def test_lossless_battery_in_zero_carbon_hours_never_charges_and_discharges_at_once():
    n = 24
    eta = np.where(np.arange(n) % 6 < 3, 0.0, 300.0)
    bat = Battery(500.0, 200.0, 200.0, 1.0, 1.0, 0.0, 0.5)
    plan, _ = plan_storage(np.full(n, 150.0), eta, CampusStorage(bat, solar_kw=np.full(n, 100.0)))
    check_plan(plan, bat, 500.0)


def test_solar_serves_the_load_and_its_surplus_is_stored_or_curtailed():
    n = 24
    solar = np.where((np.arange(n) >= 8) & (np.arange(n) < 16), 800.0, 0.0)
    bat = Battery.from_site(1000.0, 0.9, 0.5, 0.5, reserve_soc=0.3, initial_soc=0.3)
    eta = np.full(n, 300.0)
    plan, _ = plan_storage(np.full(n, 400.0), eta, CampusStorage(bat, solar_kw=solar, terminal_gco2_per_kwh=0.0))
    check_plan(plan, bat, 1000.0)
    assert plan.grid_kw[solar > 0].max() < 1e-6  # the sun covers the day hours
    assert plan.charge_kw.sum() > 0 and plan.curtailed_kw.sum() > 0  # the battery fills, the rest is curtailed
    assert plan.discharge_kw[solar == 0].sum() > 0  # and it is discharged at night


def test_the_contract_bounds_the_grid_import():
    n = 24
    load = 300.0 + 200.0 * (np.arange(n) >= 18)
    bat = Battery.from_site(1000.0, 0.9, 0.3, 0.3, reserve_soc=0.1, initial_soc=0.9)
    plan, _ = plan_storage(load, np.full(n, 300.0), CampusStorage(bat), contract_kw=400.0, lambda_p=0.0)
    check_plan(plan, bat, 1000.0)
    assert plan.grid_kw.max() <= 400.0 + 1e-6


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(6, 72), rte=st.floats(0.5, 1.0), solar=st.booleans(),
       reserve=st.floats(0.0, 0.6), terminal=st.sampled_from([None, 0.0, 500.0]))
def test_storage_plans_hold_every_invariant(seed, n, rte, solar, reserve, terminal):
    rng = np.random.default_rng(seed)
    eta = rng.uniform(0, 600, n) * (rng.random(n) < 0.9)
    load = rng.uniform(0, 1000, n)
    cap = rng.uniform(10, 3000)
    bat = Battery.from_site(cap, rte, rng.uniform(0.05, 2), rng.uniform(0.05, 2), reserve_soc=reserve,
                            initial_soc=rng.uniform(reserve, 1.0))
    pv = rng.uniform(0, 1500, n) * (rng.random(n) < 0.5) if solar else None
    st_ = CampusStorage(bat, pv, terminal_gco2_per_kwh=terminal)
    plan, _ = plan_storage(load, eta, st_)
    assert plan.status == "optimal"
    check_plan(plan, bat, max(cap, 1000.0))
    # never worse than holding the battery (the LP's objective, terminal value included)
    idle = plan_storage(load, eta, CampusStorage(None, pv))[0]
    t = float(eta.mean()) if terminal is None else terminal
    value = lambda p: p.carbon_kg(eta) - t * bat.discharge_efficiency * (p.energy_kwh[-1] - p.initial_kwh) / 1000  # noqa: E731
    assert value(plan) <= idle.carbon_kg(eta) + 1e-6 * (1 + idle.carbon_kg(eta))


# ------------------------------------------------------------------------------------------------ co-planning


def _campus(seed: int, n: int, storage=None, **kw) -> QueueCampus:
    rng = np.random.default_rng(seed)
    clusters = tuple(cluster(rng.uniform(0, 250, n) * (rng.random(n) < 0.7), room=rng.uniform(300, 900),
                             curve=LINEAR if i % 2 else CONVEX, deadline=int(rng.integers(4, 24)), name=f"c{i}")
                     for i in range(int(rng.integers(1, 4))))
    return QueueCampus("x", clusters, rng.uniform(50, 600, n), storage=storage, **kw)


def test_a_campus_without_storage_is_planned_exactly_as_before():
    for seed in range(5):
        campus = _campus(seed, 36, contract_kw=np.inf if seed % 2 else 5000.0, lambda_p=0.01 * (seed % 3))
        a, b = plan_queue(campus), plan_queue(_campus(seed, 36, storage=None, contract_kw=campus.contract_kw,
                                                      lambda_p=campus.lambda_p))
        assert a.storage is None and b.storage is None
        for f in ("service_cpu_cores", "late_core_hours", "over_cpu_cores", "leftover_core_hours"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def _module_at(commit: str) -> types.ModuleType | None:
    try:
        text = subprocess.run(["git", "show", f"{commit}:cicm/optimize/queue.py"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType("queue_before_storage")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    try:
        exec(compile(text, "queue_before_storage.py", "exec"), mod.__dict__)
    finally:
        del sys.modules[mod.__name__]
    return mod


def test_without_storage_the_result_is_identical_to_the_program_before_storage():
    before = _module_at("d64c852")  # the queue program just before issue 16
    if before is None:
        pytest.skip("the git history is not available")
    for seed in range(6):
        campus = _campus(seed, 30, contract_kw=np.inf if seed % 2 else 4000.0, lambda_p=0.01 * (seed % 3))
        old_campus = before.QueueCampus("x", tuple(before.QueueCluster(
            c.name, c.inflexible_cpu_cores, c.inflexible_upper_cpu_cores, c.capacity_cores, c.must_core_hours,
            c.avail_core_hours, c.power_curve) for c in campus.clusters), campus.carbon_gco2_per_kwh,
            contract_kw=campus.contract_kw, lambda_p=campus.lambda_p)
        new, old = plan_queue(campus), before.plan_queue(old_campus)
        np.testing.assert_array_equal(new.service_cpu_cores, old.service_cpu_cores)
        np.testing.assert_array_equal(new.late_core_hours, old.late_core_hours)
        assert new.status == old.status


def test_empty_storage_gives_the_same_schedule():
    for seed in range(4):
        a = plan_queue(_campus(seed, 30))
        b = plan_queue(_campus(seed, 30, storage=CampusStorage()))
        scale = max(a.service_cpu_cores.max(), 1.0)
        np.testing.assert_allclose(b.service_cpu_cores, a.service_cpu_cores, atol=1e-5 * scale)
        assert b.storage is not None and b.storage.charge_kw.max() == 0.0


def test_flexible_work_moves_into_the_sun_under_flat_carbon():
    n = 24
    arrivals = np.where(np.arange(n) < 6, 300.0, 0.0)  # early work, 18 h deadlines
    c = cluster(arrivals, curve=LINEAR, deadline=18)
    solar = np.where((np.arange(n) >= 10) & (np.arange(n) < 15), 300.0, 0.0)
    flat = np.full(n, 300.0)
    plain = plan_queue(QueueCampus("x", (c,), flat))
    sunny = plan_queue(QueueCampus("x", (c,), flat, storage=CampusStorage(solar_kw=solar)))
    in_sun = solar > 0
    assert sunny.service_cpu_cores[0][in_sun].sum() > plain.service_cpu_cores[0][in_sun].sum() + 500.0
    assert sunny.storage is not None
    check_plan(sunny.storage, None, 1000.0)
    assert sunny.storage.carbon_kg(flat) < (LINEAR(300.0 + plain.service_cpu_cores[0]) - np.minimum(
        solar, LINEAR(300.0 + plain.service_cpu_cores[0]))).sum() * 0.3


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(12, 49), rte=st.floats(0.6, 1.0), reserve=st.floats(0, 0.5),
       contract=st.booleans())
def test_co_planned_campuses_hold_every_invariant(seed, n, rte, reserve, contract):
    rng = np.random.default_rng(seed + 1)
    cap = rng.uniform(50, 3000)
    bat = Battery.from_site(cap, rte, rng.uniform(0.1, 1), rng.uniform(0.1, 1), reserve_soc=reserve,
                            initial_soc=rng.uniform(reserve, 1.0))
    hours = np.arange(n) % 24
    solar = np.clip(np.sin((hours - 6) / 12 * np.pi), 0, None) * rng.uniform(0, 800)
    base = _campus(seed, n)
    committed = np.arange(n) < min(24, n)
    plain = plan_queue(QueueCampus("x", base.clusters, base.carbon_gco2_per_kwh, committed=committed))
    limit = float("inf")
    if contract:
        loads = sum(c.power_curve(c.inflexible_cpu_cores + plain.service_cpu_cores[i])
                    for i, c in enumerate(base.clusters))
        limit = float(np.max(loads)) * 1.05
    campus = QueueCampus("x", base.clusters, base.carbon_gco2_per_kwh, committed=committed, contract_kw=limit,
                         storage=CampusStorage(bat, solar))
    plan = plan_queue(campus)
    assert plan.storage is not None and plan.storage.status == "optimal"
    check_plan(plan.storage, bat, max(cap, 2000.0))
    loads = sum(c.power_curve(c.inflexible_cpu_cores + plan.service_cpu_cores[i])
                for i, c in enumerate(campus.clusters))
    np.testing.assert_allclose(plan.storage.load_kw, loads, rtol=1e-12)
    if contract:
        assert (plan.storage.grid_kw[committed] <= limit * (1 + 1e-6)).all()
    for i, c in enumerate(campus.clusters):  # the schedule's own constraints still hold
        s = plan.service_cpu_cores[i]
        sc = max(c.avail_core_hours[-1], 1.0)
        assert (s >= -1e-6 * sc).all() and (s <= c.room_cpu_cores + 1e-6 * sc).all()
        assert (np.cumsum(s) <= c.avail_core_hours + 1e-5 * sc).all()


def test_a_hurdle_stops_cycling_on_a_spread_below_it():
    n = 24
    eta = np.where(np.arange(n) < 12, 100.0, 160.0)  # a kWh charged at 100 g gives 0.9 kWh that save 144 g
    bat = Battery.from_site(1000.0, 0.9, 0.5, 0.5, reserve_soc=0.1, initial_soc=0.1)
    load = np.full(n, 300.0)
    free = plan_storage(load, eta, CampusStorage(bat, terminal_gco2_per_kwh=0.0))[0]
    held = plan_storage(load, eta, CampusStorage(bat, terminal_gco2_per_kwh=0.0, hurdle_gco2_per_kwh=50.0))[0]  # 45 g on 0.9 kWh
    assert free.discharge_kw.sum() > 100.0 and held.discharge_kw.max() < 1e-6
    check_plan(held, bat, 1000.0)
    with pytest.raises(InputError, match="hurdle_gco2_per_kwh"):
        CampusStorage(bat, hurdle_gco2_per_kwh=-1.0)


def test_unshaped_clusters_draw_their_power_and_a_solver_failure_holds_the_battery(monkeypatch):
    import cicm.optimize.queue as Q

    n = 24
    bat = Battery.from_site(500.0, 0.9, 0.5, 0.5, reserve_soc=0.2, initial_soc=0.5)
    solar = np.clip(np.sin((np.arange(n) - 6) / 12 * np.pi), 0, None) * 300.0
    shaped = cluster(np.full(n, 50.0), name="a")
    preset = cluster(np.full(n, 80.0), name="b", fallback_reason="insufficient-history")
    campus = QueueCampus("x", (shaped, preset), sine_carbon(n), storage=CampusStorage(bat, solar))
    plan = plan_queue(campus)
    assert plan.status == ("optimal", "fallback") and plan.storage is not None
    expected = sum(c.power_curve(c.inflexible_cpu_cores + plan.service_cpu_cores[i])
                   for i, c in enumerate(campus.clusters))
    np.testing.assert_allclose(plan.storage.load_kw, expected, rtol=1e-12)
    check_plan(plan.storage, bat, 1000.0)

    def boom(*args, **kwargs):
        raise Q._SolveFailed("HIGHS returned infeasible")

    monkeypatch.setattr(Q, "_solve", boom)
    failed = plan_queue(campus)
    assert failed.reason == ("solver-error", "insufficient-history")
    assert failed.storage is not None and failed.storage.status == "idle"
    assert failed.storage.charge_kw.max() == 0 and failed.storage.discharge_kw.max() == 0
    np.testing.assert_allclose(failed.storage.load_kw, sum(
        c.power_curve(c.inflexible_cpu_cores + failed.service_cpu_cores[i]) for i, c in enumerate(campus.clusters)),
        rtol=1e-12)
    check_plan(failed.storage, bat, 1000.0)
