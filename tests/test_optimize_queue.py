"""The queue-aware program (cicm.optimize.queue): invariants with real numbers, hypothesis properties, bad input."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cicm.errors import InputError
from cicm.optimize.inputs import PowerCurve
from cicm.optimize.queue import (
    QueueCampus,
    QueueCluster,
    arrival_bounds,
    correction_cap,
    fifo_backlog,
    greedy_service,
    plan_queue,
    risk_margin,
    task_bounds,
)

CONVEX = PowerCurve(np.linspace(0.0, 1000.0, 11), 100.0 + 300.0 * np.linspace(0.0, 1.0, 11) ** 1.6)
LINEAR = PowerCurve(np.array([0.0, 1000.0]), np.array([100.0, 400.0]))
TOL = 1e-5


def cluster(arrivals, *, room=600.0, inflexible=300.0, curve=CONVEX, deadline=20.0, name="c", **kw):
    n = len(arrivals)
    must, avail = arrival_bounds(np.asarray(arrivals, float), deadline)
    return QueueCluster(name, np.full(n, inflexible), np.full(n, inflexible), inflexible + room, must, avail, curve,
                        **kw)


def test_work_runs_in_the_clean_hours_and_meets_its_deadlines():
    n = 48
    eta = 250 + 120 * np.sin(np.arange(n) / 24 * 2 * np.pi)  # dirtiest around hour 6, cleanest around hour 18
    arrivals = np.full(n, 100.0)
    plan = plan_queue(QueueCampus("x", (cluster(arrivals),), eta))
    s = plan.service_cpu_cores[0]
    assert plan.status == ("optimal",) and plan.late_core_hours.max() < TOL
    clean, dirty = eta < np.quantile(eta, 0.3), eta > np.quantile(eta, 0.7)
    assert s[clean].mean() > 3 * s[dirty].mean()
    # against run-on-arrival, the carbon-weighted intensity the work sees drops
    greedy = greedy_service(*arrival_bounds(arrivals, 20.0), np.full(n, 600.0))
    assert (s * eta).sum() / s.sum() < 0.9 * (greedy * eta).sum() / greedy.sum()


def test_flat_carbon_and_linear_power_do_not_delay_work():
    rng = np.random.default_rng(3)
    arrivals = rng.uniform(0, 300, 36)
    c = cluster(arrivals, curve=LINEAR)
    plan = plan_queue(QueueCampus("x", (c,), np.full(36, 300.0)))
    expected = greedy_service(c.must_core_hours, c.avail_core_hours, c.room_cpu_cores)
    np.testing.assert_allclose(plan.service_cpu_cores[0], expected, atol=1e-4 * expected.max())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(24, 49), deadline=st.integers(4, 24),
       linear=st.booleans())
def test_the_plan_meets_every_deadline_it_accepts(seed, n, deadline, linear):
    rng = np.random.default_rng(seed)
    arrivals = rng.uniform(0, 250, n) * (rng.random(n) < 0.7)
    eta = rng.uniform(50, 600, n)
    c = cluster(arrivals, room=rng.uniform(300, 900), deadline=deadline, curve=LINEAR if linear else CONVEX)
    plan = plan_queue(QueueCampus("x", (c,), eta))
    s = plan.service_cpu_cores[0]
    cum = np.cumsum(s)
    scale = max(c.avail_core_hours[-1], 1.0)
    assert (s >= -TOL).all() and (s <= c.room_cpu_cores + TOL * scale).all()
    assert (cum <= c.avail_core_hours + TOL * scale).all()  # never serves work that has not arrived
    # every deadline the room makes reachable is met; where run-on-arrival itself cannot, the shortfall is
    # reported (late), never hidden
    greedy_cum = np.cumsum(greedy_service(c.must_core_hours, c.avail_core_hours, c.room_cpu_cores))
    if (greedy_cum >= c.must_core_hours - TOL * scale).all():
        assert plan.late_core_hours.max() <= TOL * scale
        assert (cum >= c.must_core_hours - TOL * scale).all()
    else:
        assert plan.late_core_hours.max() > 0
    np.testing.assert_allclose(cum + plan.late_core_hours[0] >= c.must_core_hours - TOL * scale, True)


def test_the_plan_of_record_is_exceeded_only_for_a_deadline():
    n = 30
    eta = np.where(np.arange(n) % 10 < 5, 500.0, 100.0)
    arrivals = np.zeros(n)
    arrivals[0] = 2000.0
    base = cluster(arrivals, deadline=8)
    plan = plan_queue(QueueCampus("x", (base,), eta))
    record = plan.service_cpu_cores[0]
    # the same backlog re-planned against its own plan: nothing to correct
    again = cluster(arrivals, deadline=8, limit_cpu_cores=record)
    p2 = plan_queue(QueueCampus("x", (again,), eta))
    assert p2.over_cpu_cores.sum() < TOL * 2000
    # a plan of record that released too little: the deadline forces work above it, and only as much as needed
    tight = cluster(arrivals, deadline=8, limit_cpu_cores=np.full(n, 100.0))
    p3 = plan_queue(QueueCampus("x", (tight,), eta))
    assert p3.late_core_hours.max() < TOL * 2000
    need = 2000.0 - 100.0 * 9  # due by the end of hour 8: the plan released 100 in each of hours 0..8
    assert p3.over_cpu_cores.sum() == pytest.approx(need, rel=1e-4)


def test_a_preset_fallback_runs_on_arrival_and_keeps_its_reason():
    arrivals = np.full(24, 50.0)
    shaped = cluster(arrivals, name="a")
    off = cluster(arrivals, name="b", fallback_reason="slo-feedback")
    plan = plan_queue(QueueCampus("x", (shaped, off), np.linspace(100, 500, 24)))
    assert plan.status == ("optimal", "fallback") and plan.reason == (None, "slo-feedback")
    np.testing.assert_allclose(plan.service_cpu_cores[1], greedy_service(off.must_core_hours, off.avail_core_hours,
                                                                         off.room_cpu_cores))


def test_task_bounds_follow_widths_and_deadlines():
    # one task: 10 cores for 3 h, arrives at 1.5, deadline 10, planned 2 h early (8)
    must, avail = task_bounds(12, np.array([1.5]), np.array([3.0]), np.array([10.0]), np.array([10.0]), 2.0)
    np.testing.assert_allclose(avail, [0, 5, 15, 25, 30, 30, 30, 30, 30, 30, 30, 30])
    np.testing.assert_allclose(must, [0, 0, 0, 0, 0, 10, 20, 30, 30, 30, 30, 30])
    assert (must <= avail + 1e-12).all()
    # a margin never makes a task impossible: deadline 4 with a 2-h margin still leaves it its run time
    must, avail = task_bounds(6, np.array([0.0]), np.array([3.0]), np.array([1.0]), np.array([4.0]), 2.0)
    assert (must <= avail + 1e-12).all() and must[2] == pytest.approx(3.0)


def test_risk_margin_and_correction_cap():
    service = np.array([0.0, 0.0, 100.0, 300.0, 0.0])
    room = np.full(5, 350.0)
    m = risk_margin(service, room, 200.0)
    assert (m[service == 0] == 0).all()  # held hours stay held
    assert (service + m <= room + 1e-12).all()
    assert m.sum() == pytest.approx(50.0 + 50.0)  # 50 in hour 2 (its share), hour 3 clipped at the room
    assert correction_cap(np.array([50.0, 0.0]), np.zeros(2), np.array([100.0, 100.0])) == 50.0
    assert correction_cap(np.array([100.0, 0.0]), np.zeros(2), np.array([100.0, 100.0])) == np.inf  # saturated
    assert correction_cap(np.array([10.0, 0.0]), np.array([0.0, 5.0]), np.array([100.0, 100.0])) == np.inf


@pytest.mark.parametrize("field, kwargs", [
    ("must_core_hours", {"must_core_hours": np.array([0, 0, 500.0])}),
    ("avail_core_hours", {"avail_core_hours": np.array([0, np.nan, 10.0])}),
    ("inflexible_upper_cpu_cores", {"inflexible_upper_cpu_cores": np.ones(2)}),
    ("capacity_cores", {"capacity_cores": 0.0}),
    ("avail_core_hours", {"avail_core_hours": np.array([10.0, 5.0, 10.0])}),
    ("carry_core_hours", {"carry_core_hours": -1.0}),
])
def test_bad_cluster_input_names_the_field(field, kwargs):
    args = dict(name="c", inflexible_cpu_cores=np.ones(3), inflexible_upper_cpu_cores=np.ones(3),
                capacity_cores=10.0, must_core_hours=np.zeros(3), avail_core_hours=np.array([1.0, 2.0, 3.0]),
                power_curve=LINEAR)
    args.update(kwargs)
    with pytest.raises(InputError) as err:
        QueueCluster(**args)
    assert err.value.field == field


def test_bad_campus_input_names_the_field():
    c = cluster(np.ones(5))
    with pytest.raises(InputError, match="carbon_gco2_per_kwh"):
        QueueCampus("x", (c,), np.array([1.0, 2.0, np.nan, 1.0, 1.0]))
    with pytest.raises(InputError, match="carbon_gco2_per_kwh"):
        QueueCampus("x", (c,), np.ones(4))
    with pytest.raises(InputError, match="clusters"):
        QueueCampus("x", (c, c), np.ones(5))
    with pytest.raises(InputError, match="solver"):
        QueueCampus("x", (c,), np.ones(5), solver="GLPK")


def test_fifo_backlog_serves_the_oldest_work_first():
    arrived = np.array([10.0, 0.0, 5.0, 8.0])
    np.testing.assert_allclose(fifo_backlog(arrived, np.array([4.0, 4.0, 4.0, 0.0])), [0.0, 0.0, 3.0, 8.0])
    np.testing.assert_allclose(fifo_backlog(arrived, np.zeros(4)), arrived)
    np.testing.assert_allclose(fifo_backlog(arrived, np.full(4, 100.0)), 0.0)


def test_the_bounds_with_a_cluster_axis_equal_each_cluster_alone():
    """task_bounds, ramps, fifo_backlog, arrival_bounds and greedy_service take (clusters, N) arrays (the
    nightly plan's campus batch); each row equals the 1-D call, and zero padding adds nothing."""
    rng = np.random.default_rng(3)
    n_c, k, n = 5, 12, 30
    arrival = rng.uniform(-20, 10, (n_c, k))
    work = rng.uniform(0.5, 4, (n_c, k))
    cores = rng.uniform(0, 50, (n_c, k)) * (rng.random((n_c, k)) > 0.3)
    deadline = arrival + rng.uniform(4, 30, (n_c, k))
    must, avail = task_bounds(n, arrival, work, cores, deadline, 6.0)
    for i in range(n_c):
        keep = cores[i] > 0
        m1, a1 = task_bounds(n, arrival[i][keep], work[i][keep], cores[i][keep], deadline[i][keep], 6.0)
        np.testing.assert_allclose(must[i], m1, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(avail[i], a1, rtol=1e-12, atol=1e-9)
    arrived = rng.uniform(0, 10, (n_c, n))
    served = rng.uniform(0, 12, (n_c, n))
    back = fifo_backlog(arrived, served)
    m2, a2 = arrival_bounds(arrived, 18.0)
    room = rng.uniform(5, 15, (n_c, n))
    greedy = greedy_service(m2, a2, room)
    for i in range(n_c):
        np.testing.assert_allclose(back[i], fifo_backlog(arrived[i], served[i]), rtol=1e-12, atol=1e-12)
        padded = fifo_backlog(np.r_[arrived[i], np.zeros(4)], np.r_[served[i], np.zeros(4)])
        np.testing.assert_allclose(padded, np.r_[back[i], np.zeros(4)], rtol=1e-12, atol=1e-12)
        mi, ai = arrival_bounds(arrived[i], 18.0)
        np.testing.assert_array_equal(m2[i], mi)
        np.testing.assert_array_equal(a2[i], ai)
        np.testing.assert_array_equal(greedy[i], greedy_service(mi, ai, room[i]))
