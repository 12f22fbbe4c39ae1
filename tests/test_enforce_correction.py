"""The agent's hourly correction (cicm/enforce/correction.py) and its backlog source (cicm/enforce/backlog.py).

The correction re-plans the rest of the horizon with the queue program from the live backlog, against the plan of
record; these tests give it real numbers: a 102,400-core cluster (the demo's sj-a), 40,000 cores of inflexible
usage (upper quantile 44,000: room 58,400), forecast arrivals of 1,000 core-hours an hour, deadlines 24 h after
arrival planned 6 h early. The agent itself, against a real ecovisor, is in tests/test_enforce_agent.py.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cicm.enforce.backlog import BacklogUnavailable, StaticBacklogSource, StoreBacklogSource, BacklogSnapshot, \
    fifo_items
from cicm.enforce.correction import (
    REASON_BELOW, REASON_CATCH_UP, REASON_DEADLINE, REASON_DEFERRED, CorrectionInput, WorkItem, carry_core_hours,
    correct_hour, queue_cluster,
)
from cicm.errors import InputError
from cicm.optimize.inputs import PowerCurve

START = pd.Timestamp("2022-06-14T07:00:00Z")
H = pd.Timedelta(hours=1)
CAPACITY = 102400.0
LINEAR = PowerCurve(np.array([0.0, CAPACITY]), np.array([120.0, 560.0]))
CONVEX = PowerCurve(np.array([0.0, 50000.0, CAPACITY]), np.array([100.0, 300.0, 600.0]))
REPO = Path(__file__).resolve().parent.parent


def inputs(n=24, plan=None, backlog=(), carbon=None, arrivals=1000.0, curve=LINEAR, **kw) -> CorrectionInput:
    hours = pd.date_range(START, periods=n, freq="h")
    return CorrectionInput(
        hours=hours, plan_cpu_cores=np.full(n, 5000.0) if plan is None else np.asarray(plan, float),
        inflexible_cpu_cores=np.full(n, 40000.0), inflexible_upper_cpu_cores=np.full(n, 44000.0),
        capacity_cores=CAPACITY, power_curve=curve,
        carbon_gco2_per_kwh=np.full(n, 300.0) if carbon is None else np.asarray(carbon, float),
        backlog=tuple(backlog), arrivals_core_hours=np.full(n, arrivals), **kw)


def due(hours: float) -> pd.Timestamp:
    return START + pd.Timedelta(hours=hours)


# ---------------------------------------------------------------------------------------------- decisions


def test_flat_carbon_without_deadline_pressure_never_exceeds_the_plan_over_a_day():
    """A day in closed loop: each hour the correction re-plans from the queue left by the hours before; the queue
    (a 60,000 core-hour backlog due tomorrow evening, plus 1,000 core-hours arriving an hour) never needs more
    than the plan releases, so no hour's allowance is above the plan, and short hours say below-plan."""
    plan = np.array([0.0] * 6 + [8000.0] * 12 + [2000.0] * 6)
    queue = [WorkItem(60000.0, 20000.0, due(40))]
    reasons = []
    for h in range(24):
        hz = slice(h, 24)
        inp = CorrectionInput(
            hours=pd.date_range(START + h * H, periods=24 - h, freq="h"), plan_cpu_cores=plan[hz],
            inflexible_cpu_cores=np.full(24 - h, 40000.0), inflexible_upper_cpu_cores=np.full(24 - h, 44000.0),
            capacity_cores=CAPACITY, power_curve=CONVEX, carbon_gco2_per_kwh=np.full(24 - h, 300.0),
            backlog=tuple(queue), arrivals_core_hours=np.full(24 - h, 1000.0))
        c = correct_hour(inp)
        assert c.status == "optimal"
        assert c.allowance_cores <= plan[h] + 1e-9, (h, c.allowance_cores, plan[h])
        assert c.deviation is None or c.deviation.reason in (REASON_BELOW, REASON_DEFERRED)
        reasons.append(c.deviation.reason if c.deviation else None)
        # run the hour: the queue drains first-in first-out within the allowance, then the hour's arrivals queue
        run = c.allowance_cores
        left = []
        for item in queue:
            take = min(item.remaining_core_hours, run, item.width_cores)
            run -= take
            if item.remaining_core_hours - take > 1e-9:
                left.append(WorkItem(item.remaining_core_hours - take, item.width_cores, item.deadline))
        queue = left + [WorkItem(1000.0, 1000.0, due(h + 24))]
    assert reasons[:6] == [None] * 6  # the plan holds work in the first six hours, and so does the correction
    assert all(r is None for r in reasons[6:13])  # the backlog fills the plan's release while it lasts
    assert REASON_BELOW in reasons[13:]  # then only the arrivals are left: less than the plan releases


def test_a_deadline_before_the_plans_next_release_releases_work_early():
    plan = [0.0] * 10 + [20000.0] * 14  # the plan of record releases nothing for ten hours
    backlog = [WorkItem(30000.0, 30000.0, due(8))]  # due in 8 h: planned (6 h early) by the end of hour 2
    c = correct_hour(inputs(plan=plan, backlog=backlog))
    assert c.allowance_cores == pytest.approx(30000.0, rel=1e-6)  # flat carbon, linear power: now, at once
    d = c.deviation
    assert d is not None and d.reason == REASON_DEADLINE
    assert d.plan_cores == 0.0 and d.applied_cores == pytest.approx(30000.0, rel=1e-6)
    assert "2022-06-14 15:00Z" in d.detail and "releases nothing before 2022-06-14 17:00Z" in d.detail
    # only the deadline's work runs ahead of the plan: the arrivals wait for the plan's release
    assert c.service_cpu_cores[2:10].sum() == pytest.approx(0.0, abs=1e-3)


def test_a_deadline_release_goes_to_the_cleanest_hour_before_the_deadline():
    plan = [0.0] * 10 + [20000.0] * 14
    carbon = [420.0, 180.0] + [300.0] * 22  # the hour after this one is cleaner, and still before the deadline
    c = correct_hour(inputs(plan=plan, backlog=[WorkItem(30000.0, 30000.0, due(8))], carbon=carbon))
    assert c.allowance_cores == pytest.approx(0.0, abs=1e-3) and c.deviation is None  # at plan this hour
    assert c.service_cpu_cores[1] == pytest.approx(30000.0, rel=1e-6)  # released next hour instead


def test_work_that_cannot_make_its_deadline_lifts_the_cap():
    backlog = [WorkItem(200000.0, 200000.0, due(1))]  # more than the room of the hour, due within it
    c = correct_hour(inputs(plan=[1000.0] * 24, backlog=backlog))
    assert c.late_core_hours.max() > 0
    assert c.allowance_cores == CAPACITY  # saturated: no cap (the room is only a forecast)
    assert c.deviation.reason == REASON_DEADLINE and "no cap this hour" in c.deviation.detail


def test_catch_up_runs_what_the_plan_released_earlier_and_no_more():
    backlog = [WorkItem(50000.0, 50000.0, due(30))]
    c = correct_hour(inputs(plan=[4000.0] * 24, backlog=backlog, carry_core_hours=6000.0))
    assert c.allowance_cores == pytest.approx(10000.0, rel=1e-6)  # the hour's 4,000 + the 6,000 not run before
    assert c.deviation.reason == REASON_CATCH_UP and c.carry_core_hours == 6000.0


def test_below_plan_and_deferred():
    below = correct_hour(inputs(plan=[5000.0] * 24))  # no backlog: only this hour's 1,000 arrivals can run
    assert below.allowance_cores == pytest.approx(1000.0, rel=1e-6)
    assert below.deviation.reason == REASON_BELOW and "allow 1,000 core-hours" in below.deviation.detail
    # the plan releases 5,000 cores in a dirty hour; the live backlog's deadline lets it wait for a clean one
    carbon = [500.0] + [500.0] * 5 + [100.0] * 18
    held = correct_hour(inputs(plan=[5000.0] * 24, carbon=carbon, backlog=[WorkItem(20000.0, 20000.0, due(30))]))
    assert held.allowance_cores == pytest.approx(0.0, abs=1e-3)
    assert held.deviation.reason == REASON_DEFERRED and "100 gCO2/kWh" in held.deviation.detail


def test_no_plan_of_record_beyond_the_plan_leaves_only_the_room():
    plan = [0.0] * 4 + [np.nan] * 20  # tomorrow is not planned yet
    c = correct_hour(inputs(plan=plan, backlog=[WorkItem(10000.0, 10000.0, due(20))]))
    assert c.allowance_cores == 0.0 and c.deviation is None
    assert c.service_cpu_cores[4] > 0  # planned against the room alone after the plan's hours


def test_carry_counts_only_hours_with_known_usage():
    assert carry_core_hours([5000.0, 5000.0, 5000.0], [1000.0, np.nan, 7000.0]) == 2000.0
    assert carry_core_hours([0.0, 0.0], [3000.0, 0.0]) == 0.0  # running ahead never makes a negative carry
    assert carry_core_hours([], []) == 0.0


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, field", [
    (dict(backlog=[WorkItem(100.0, 10.0, due(5)), WorkItem(float("nan"), 10.0, due(5))]),
     "backlog[1].remaining_core_hours"),
    (dict(backlog=[WorkItem(-5.0, 10.0, due(5))]), "backlog[0].remaining_core_hours"),
    (dict(backlog=[WorkItem(100.0, -10.0, due(5))]), "backlog[0].width_cores"),
    (dict(backlog=[WorkItem(100.0, 0.0, due(5))]), "backlog[0].width_cores"),
    (dict(backlog=[WorkItem(100.0, float("inf"), due(5))]), "backlog[0].width_cores"),
    (dict(backlog=[WorkItem(100.0, 10.0, pd.Timestamp("2022-06-14 12:00"))]), "backlog[0].deadline"),
    (dict(backlog=[WorkItem(100.0, 10.0, pd.NaT)]), "backlog[0].deadline"),
    (dict(backlog=["a job"]), "backlog[0]"),
    (dict(arrivals=float("nan")), "arrivals_core_hours"),
    (dict(arrivals=-1.0), "arrivals_core_hours"),
    (dict(plan=[np.nan] + [5000.0] * 23), "plan_cpu_cores"),
    (dict(plan=[-1.0] * 24), "plan_cpu_cores"),
    (dict(carry_core_hours=float("nan")), "carry_core_hours"),
    (dict(carbon=[np.nan] * 24), "carbon_gco2_per_kwh"),
])
def test_bad_input_raises_input_error_naming_the_field(change, field):
    with pytest.raises(InputError) as err:
        correct_hour(inputs(**change))
    assert err.value.field == field


# ---------------------------------------------------------------------------------------------- property


def _greedy_meets_deadlines(inp: CorrectionInput) -> bool:
    """Independent of the LP: can the plan of record alone (its cumulative release, the room, what is available)
    serve every planning deadline? Run-on-arrival within the plan maximises what is served by every hour."""
    qc = queue_cluster(inp)
    room = qc.room_cpu_cores
    lim = np.where(np.isfinite(inp.plan_cpu_cores), np.minimum(inp.plan_cpu_cores, room), room)
    cap = inp.carry_core_hours + np.cumsum(lim)
    served = 0.0
    for h in range(len(inp.hours)):
        served += max(0.0, min(room[h], qc.avail_core_hours[h] - served, cap[h] - served))
        if served < qc.must_core_hours[h] - 1e-6 * max(float(room.max()), 1.0):
            return False
    return True


@st.composite
def correction_cases(draw):
    n = draw(st.integers(3, 12))
    plan = np.array(draw(st.lists(st.sampled_from([0.0, 500.0, 4000.0, 12000.0, 30000.0]), min_size=n,
                                  max_size=n)))
    carbon = np.array(draw(st.lists(st.floats(50.0, 800.0), min_size=n, max_size=n)))
    upper = np.array(draw(st.lists(st.floats(20000.0, 90000.0), min_size=n, max_size=n)))
    soon, later = st.floats(-3.0, 14.0), st.floats(14.0, 60.0)  # due within the horizon (planned 6 h early), or not
    items = draw(st.lists(st.tuples(st.floats(0.0, 40000.0), st.floats(500.0, 40000.0),
                                    st.one_of(soon, later)), min_size=1, max_size=4))
    arrivals = np.array(draw(st.lists(st.floats(0.0, 5000.0), min_size=n, max_size=n)))
    carry = draw(st.sampled_from([0.0, 0.0, 3000.0]))
    curve = draw(st.sampled_from([LINEAR, CONVEX]))
    return CorrectionInput(
        hours=pd.date_range(START, periods=n, freq="h"), plan_cpu_cores=plan, inflexible_cpu_cores=upper * 0.9,
        inflexible_upper_cpu_cores=upper, capacity_cores=CAPACITY, power_curve=curve, carbon_gco2_per_kwh=carbon,
        backlog=tuple(WorkItem(r, w, due(d)) for r, w, d in items), arrivals_core_hours=arrivals,
        carry_core_hours=carry)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(correction_cases())
def test_property_never_above_the_plan_without_a_deadline_that_needs_it(inp):
    c = correct_hour(inp)
    plan0 = float(inp.plan_cpu_cores[0])
    assert 0.0 <= c.allowance_cores <= CAPACITY
    if _greedy_meets_deadlines(inp):  # the plan of record alone meets every deadline: no release above it
        assert c.allowance_cores <= plan0 + inp.carry_core_hours + 1e-9
        if inp.carry_core_hours == 0.0:
            assert c.allowance_cores <= plan0
        assert c.deviation is None or c.deviation.reason != REASON_DEADLINE
    if c.allowance_cores > plan0 + inp.carry_core_hours + 1e-9:  # above the plan: only ever for a deadline
        assert c.deviation is not None and c.deviation.reason == REASON_DEADLINE
    if c.deviation is None:
        assert c.allowance_cores == plan0  # no deviation recorded: the plan of record exactly
    else:
        assert c.deviation.applied_cores == c.allowance_cores != plan0
        assert (c.deviation.applied_cores > plan0) == (c.deviation.reason in (REASON_DEADLINE, REASON_CATCH_UP))


# ---------------------------------------------------------------------------------------------- backlog source


def usage_rows(cluster: str, end: pd.Timestamp, days: int = 35) -> pd.DataFrame:
    """5 weeks of hourly usage: 1,000 core-hours arrive and run every hour, except in the last 48 h, where
    30,000 core-hours arrive 22 h before ``end`` and nothing runs."""
    hours = pd.date_range(end - pd.Timedelta(days=days), end, freq="h", inclusive="left")
    arrived = np.full(len(hours), 1000.0)
    served = np.full(len(hours), 1000.0)
    last = hours >= end - pd.Timedelta(hours=48)
    arrived[last] = 0.0
    served[last] = 0.0
    arrived[hours == end - pd.Timedelta(hours=22)] = 30000.0
    return pd.DataFrame({"cluster": cluster, "hour": hours, "inflexible_cpu_cores": 40000.0,
                         "flexible_cpu_cores": served, "reserved_cpu_cores": 55000.0,
                         "flexible_arrived_core_hours": arrived})


def write_usage(db: Path, frame: pd.DataFrame) -> None:
    from cicm.data.store import Store

    with Store(db) as store, store.run("telemetry-import") as run:
        store.upsert("usage_history", frame, run.run_id)


def test_store_backlog_is_the_fifo_queue_of_the_usage_history(db_path):
    write_usage(db_path, usage_rows("sj-a", START))
    source = StoreBacklogSource(db_path, "sj-a")
    hours = pd.date_range(START, periods=24, freq="h")
    snap = source.snapshot(START, hours)
    assert snap.as_of == START
    assert snap.items == (WorkItem(30000.0, 30000.0, START + pd.Timedelta(hours=2)),)  # arrived at -22 h, due +2 h
    assert snap.arrivals_core_hours.shape == (24,) and (snap.arrivals_core_hours > 0).all()
    assert snap.served_cpu_cores.index.max() == START - H and "usage history" in source.describe()
    # with that backlog the correction releases it at once: it is overdue at its planning deadline
    c = correct_hour(inputs(plan=[0.0] * 24, backlog=snap.items, arrivals=0.0))
    assert c.deviation.reason == REASON_DEADLINE and c.allowance_cores == pytest.approx(30000.0, rel=1e-6)


def test_store_backlog_unavailable_and_bad_rows(db_path, tmp_path):
    hours = pd.date_range(START, periods=4, freq="h")
    with pytest.raises(BacklogUnavailable, match="no database"):
        StoreBacklogSource(tmp_path / "none.duckdb", "sj-a").snapshot(START, hours)
    write_usage(db_path, usage_rows("sj-b", START))
    with pytest.raises(BacklogUnavailable, match="no usage history for sj-a"):
        StoreBacklogSource(db_path, "sj-a").snapshot(START, hours)
    rows = usage_rows("sj-a", START)
    rows.loc[rows.index[-22], "flexible_arrived_core_hours"] = -30000.0  # a broken telemetry row
    write_usage(db_path, rows)
    with pytest.raises(InputError) as err:
        StoreBacklogSource(db_path, "sj-a").snapshot(START, hours)
    assert err.value.field == "flexible_arrived_core_hours" and "2022-06-13 09:00Z" in str(err.value)
    # the same row through the FIFO queue straight into the correction: rejected, naming the item
    idx = pd.date_range(START - 4 * H, periods=4, freq="h")
    items = fifo_items(pd.Series([100.0, -300.0, np.nan, 50.0], index=idx), pd.Series(0.0, index=idx), START)
    with pytest.raises(InputError) as err:
        correct_hour(inputs(n=4, plan=[0.0] * 4, backlog=items))
    assert err.value.field == "backlog[1].remaining_core_hours"


def test_fifo_items_and_the_static_seam():
    idx = pd.date_range(START - 4 * H, periods=4, freq="h")
    items = fifo_items(pd.Series([100.0, 200.0, 300.0, 0.0], index=idx), pd.Series([250.0, 0.0, 0.0, 0.0], index=idx),
                       START)
    assert [(i.remaining_core_hours, i.deadline) for i in items] == [(50.0, idx[1] + pd.Timedelta(hours=24)),
                                                                       (300.0, idx[2] + pd.Timedelta(hours=24))]
    snap = BacklogSnapshot(START, items, np.array([5.0, 6.0]))
    got = StaticBacklogSource(snap).snapshot(START, pd.date_range(START, periods=4, freq="h"))
    assert got.items == items and list(got.arrivals_core_hours) == [5.0, 6.0, 0.0, 0.0]
    assert got.backlog_core_hours == 350.0


# ---------------------------------------------------------------------------------------------- architecture


def test_the_correction_is_pure():
    path = REPO / "cicm" / "enforce" / "correction.py"
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            assert not name.split(".")[0] in ("prefect", "duckdb", "dask"), name
            assert not name.startswith(("cicm.backtest", "cicm.planning", "flows", "cicm.data", "cicm.ecovisor")), name
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, cicm.enforce.correction, cicm.enforce.backlog; print(' '.join(m for m in "
                               "sys.modules if m.split('.')[0] in ('prefect', 'duckdb') or m.startswith(("
                               "'cicm.backtest', 'cicm.planning', 'flows', 'cicm.data'))))"],
        capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()
    assert loaded == ""
