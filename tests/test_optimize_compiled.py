"""Issue 19 (speed): the queue program compiled once per structure (DPP, cicm.optimize.compiled) and re-solved with
new parameter values gives HiGHS the LP, and so the plan, of a program built afresh for the same data."""
from __future__ import annotations

import dataclasses

import cvxpy as cp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cicm.optimize import queue
from cicm.optimize.compiled import ProgramCache
from cicm.optimize.highs import solver_for
from cicm.optimize.synthetic import synthetic_queue_campus


def _eta(rng: np.random.Generator, n: int) -> np.ndarray:
    h = np.arange(n)
    return 250 + 120 * np.sin(2 * np.pi * (h - rng.uniform(0, 24)) / 24) + rng.uniform(-30, 30, n)


def _campus(seed: int, n_clusters: int, hours: int, contract: str, lambda_p: float, with_limit: bool,
            committed: int):
    rng = np.random.default_rng(seed)
    campus = synthetic_queue_campus(_eta(rng, hours), n_clusters, seed=seed, contract=contract, lambda_p=lambda_p,
                                    committed_hours=min(committed, hours))
    if with_limit:
        campus = dataclasses.replace(campus, clusters=tuple(dataclasses.replace(
            c, limit_cpu_cores=rng.uniform(0.2, 0.9) * c.room_cpu_cores, carry_core_hours=float(rng.uniform(0, 20)))
            for c in campus.clusters))
    return campus


def _new_data(campus, seed: int):
    """The same structure (clusters, hours, power curves, inflexible usage: the same hulls) with other data: the
    carbon forecast, the work due and available, the plan of record."""
    rng = np.random.default_rng(seed + 1000)
    k = rng.uniform(0.3, 1.5)
    clusters = []
    for c in campus.clusters:
        limit = None if c.limit_cpu_cores is None else c.limit_cpu_cores * rng.uniform(0.5, 1.5)
        clusters.append(dataclasses.replace(c, must_core_hours=c.must_core_hours * k * rng.uniform(0.5, 1.0),
                                            avail_core_hours=c.avail_core_hours * k, limit_cpu_cores=limit))
    return dataclasses.replace(campus, clusters=tuple(clusters),
                               carbon_gco2_per_kwh=_eta(rng, campus.carbon_gco2_per_kwh.size))


def _lp(prob: cp.Problem) -> dict:
    data = prob.get_problem_data(solver_for("HIGHS"))[0]
    return {k: data[k] for k in ("c", "A", "b", "lower_bounds", "upper_bounds")}


def _same_lp(a: dict, b: dict) -> None:
    for key in ("c", "b", "lower_bounds", "upper_bounds"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["A"].shape == b["A"].shape and (a["A"] != b["A"]).nnz == 0


@pytest.fixture
def programs(monkeypatch):
    """A fresh cache that compiles on the first solve, so that the second solve of a structure re-uses it."""
    cache = ProgramCache(maxsize=8, compile_after=0)
    monkeypatch.setattr(queue, "PROGRAMS", cache)
    return cache


def _fresh(campus, monkeypatch):
    monkeypatch.setattr(queue, "PROGRAMS", ProgramCache(maxsize=0))  # every solve builds a one-off problem
    return queue.plan_queue(campus)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), n_clusters=st.integers(1, 4), hours=st.integers(2, 48),
       contract=st.sampled_from(["none", "binding", "capacity"]), lambda_p=st.sampled_from([0.0, 0.05]),
       with_limit=st.booleans(), committed=st.integers(1, 24))
def test_a_cached_program_plans_as_a_fresh_one(monkeypatch, seed, n_clusters, hours, contract, lambda_p,
                                               with_limit, committed):
    first = _campus(seed, n_clusters, hours, contract, lambda_p, with_limit, committed)
    second = _new_data(first, seed)
    cache = ProgramCache(maxsize=8, compile_after=0)
    monkeypatch.setattr(queue, "PROGRAMS", cache)
    queue.plan_queue(first)  # compiles the structure with the first campus's data
    hits = cache.hits
    got = queue.plan_queue(second)
    want = _fresh(second, monkeypatch)
    assert got.status == want.status
    for name in ("service_cpu_cores", "late_core_hours", "over_cpu_cores", "leftover_core_hours"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    if contract != "capacity" or lambda_p > 0:  # the same rows then: the second solve re-used the program
        assert cache.hits > hits


@pytest.mark.parametrize("contract,lambda_p,with_limit", [("binding", 0.0, False), ("none", 0.05, True),
                                                          ("capacity", 0.0, True)])
def test_the_compiled_program_hands_highs_the_lp_of_a_fresh_build(contract, lambda_p, with_limit):
    campus = _campus(3, 3, 30, contract, lambda_p, with_limit, 24)
    other = _new_data(campus, 3)
    seen: dict[bool, list] = {True: [], False: []}
    orig = queue._QueueProgram.solve

    def spy(self, solver, data):
        out = orig(self, solver, data)
        seen[self.parametric].append(_lp(self.problem))
        return out

    cache = ProgramCache(compile_after=0)
    try:
        queue._QueueProgram.solve = spy  # type: ignore[method-assign]
        old, queue.PROGRAMS = queue.PROGRAMS, cache
        queue.plan_queue(campus)
        queue.plan_queue(other)  # the compiled program, with other data
        queue.PROGRAMS = ProgramCache(maxsize=0)
        queue.plan_queue(other)  # a one-off problem with constants
    finally:
        queue._QueueProgram.solve = orig  # type: ignore[method-assign]
        queue.PROGRAMS = old
    assert cache.hits >= 1 and len(seen[True]) >= 2 and len(seen[False]) >= 1
    _same_lp(seen[True][-1], seen[False][-1])


def test_the_cache_is_bounded(programs):
    programs.maxsize = 3
    for hours in range(6, 12):  # six structures, each solved twice
        campus = _campus(hours, 2, hours, "none", 0.0, False, 4)
        queue.plan_queue(campus)
        queue.plan_queue(_new_data(campus, hours))
        assert len(programs) <= 3
    assert programs.hits == 6 and len(programs) == 3
    cache = ProgramCache(maxsize=2)
    for key in "abcd":
        cache.put(key, key)
    assert len(cache) == 2 and cache.take("a") is None and cache.take("d") == "d"
    by_columns = ProgramCache(maxsize=10, max_total_columns=100)
    for key in "abcd":
        by_columns.put(key, key, 40)
    assert len(by_columns) == 2 and by_columns.columns == 80 and by_columns.take("b") is None
    by_columns.put("huge", "huge", 101)  # larger than the whole budget: not kept
    assert by_columns.take("huge") is None and len(by_columns) == 2


def test_a_structure_is_compiled_only_when_solved_again_and_small_enough():
    cache: ProgramCache[str] = ProgramCache(maxsize=4, max_columns=100, compile_after=1)
    assert not cache.compile_now("a", 50)  # first solve: a one-off problem
    assert cache.compile_now("a", 50)  # second: compiled
    assert not cache.compile_now("big", 101) and not cache.compile_now("big", 101)
    off: ProgramCache[str] = ProgramCache(maxsize=0, compile_after=0)
    assert not off.compile_now("a", 1)


def test_a_structure_change_does_not_reuse_a_program(programs):
    base = _campus(5, 2, 24, "binding", 0.0, False, 24)
    queue.plan_queue(base)
    variants = [
        _campus(5, 3, 24, "binding", 0.0, False, 24),  # another cluster
        _campus(5, 2, 23, "binding", 0.0, False, 23),  # a shorter horizon
        _campus(5, 2, 24, "binding", 0.0, True, 24),  # a plan of record
        _campus(5, 2, 24, "binding", 0.0, False, 12),  # other committed hours (the peak rows)
        _campus(5, 2, 24, "none", 0.05, False, 24),  # no contract row
    ]
    for campus in variants:
        got = queue.plan_queue(campus)
        monkey = pytest.MonkeyPatch()
        try:
            want = _fresh(campus, monkey)
        finally:
            monkey.undo()
        np.testing.assert_array_equal(got.service_cpu_cores, want.service_cpu_cores)
    assert programs.hits == 0 and len(programs) == 1 + len(variants)


def test_a_program_refuses_data_of_another_shape(programs):
    campus = _campus(7, 2, 24, "none", 0.0, False, 24)
    queue.plan_queue(campus)
    (key, prog), = programs._items.items()
    data = {name: np.zeros(p.size + 1) for name, p in prog.params.items()}
    with pytest.raises(ValueError, match="expected"):
        prog.solve("HIGHS", data)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(0, 200), n=st.integers(1, 80), ties=st.booleans())
def test_one_row_of_ramps_sums_as_the_matrix_form(seed, k, n, ties):
    """The one-row path of ramps (binary search, the backtest's task bounds) gives the matrix form's sums bit for
    bit."""
    rng = np.random.default_rng(seed)
    start = rng.uniform(-10, 80, k)
    if ties:
        start = np.round(start)
    weight = rng.uniform(0, 16, k)
    ends = np.arange(1, n + 1, dtype=float)
    if k == 0:
        np.testing.assert_array_equal(queue.ramps(ends, start, weight), np.zeros(n))
        return
    two_rows = queue.ramps(ends, np.stack([start, start]), np.stack([weight, weight]))
    np.testing.assert_array_equal(queue.ramps(ends, start, weight), two_rows[0])


def test_large_programs_with_peak_rows_are_not_compiled(monkeypatch):
    """cvxpy's parameter map of the peak rows grows with fills x peak rows (100 clusters: 26 s, 11 GB): a program
    with peak rows is compiled only up to about 10 clusters; without them up to about 100."""
    cache = ProgramCache()
    monkeypatch.setattr(queue, "PROGRAMS", cache)
    rng = np.random.default_rng(0)
    for n_clusters, contract, compiled in ((30, "binding", 0), (3, "binding", 1), (30, "capacity", 1)):
        campus = synthetic_queue_campus(_eta(rng, 42), n_clusters, seed=1, contract=contract, committed_hours=24)
        before = cache.compiled
        queue.plan_queue(campus)
        queue.plan_queue(campus)
        assert cache.compiled - before == compiled, (n_clusters, contract)
