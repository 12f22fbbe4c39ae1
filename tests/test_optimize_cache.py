"""Issue 19, item 2: the ceiling program's compiled-program cache (cicm/optimize/cache.py) and its row dropping.

- A program compiled once per structure and re-solved with new values hands HiGHS the same LP, bit for bit, as a
  fresh program with the numbers as constants, and the plans are the same (hypothesis, random campuses).
- The cache is bounded, and a structure change never re-uses a program compiled for another structure (not even
  when the digests collide).
- The post-solve check that the plan respects the contract fires when the peak rows are dropped although they
  were needed.
"""
from __future__ import annotations

import dataclasses

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings, strategies as st

from cicm.optimize import cache as cache_mod
from cicm.optimize import program
from cicm.optimize.cache import CACHE, MatrixLP, ProgramCache
from cicm.optimize.highs import HIGHS
from cicm.optimize.synthetic import synthetic_campus


@pytest.fixture(autouse=True)
def _fresh_cache():
    CACHE.clear()
    yield
    CACHE.clear()


def _eta(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 250 + 120 * np.sin(2 * np.pi * (np.arange(n) - rng.uniform(0, 24)) / 24) + rng.uniform(-30, 30, n)


def _campus(seed: int, n_clusters: int, n_hours: int, case: str, curve: str, ramp: float | None):
    lam_p = 0.1 if case == "peak" else 0.0
    campus = synthetic_campus(_eta(seed, n_hours), n_clusters, seed=seed, lambda_p=lam_p, curve=curve,
                              contract_headroom=np.inf if case == "none" else 1.02, ramp_limit=ramp)
    if case == "cap":
        campus = dataclasses.replace(campus, contract_limit_kw=sum(
            float(c.power_curve(np.max(c.capacity_cores))) for c in campus.clusters))
    if case == "linear":  # every other cluster on the linear power model
        campus = dataclasses.replace(campus, clusters=[
            dataclasses.replace(c, power_curve=None, nominal_power_kw=c.power_curve(c.inflexible_cpu_cores + 1.0),
                                slope_kw_per_core=0.01) if i % 2 else c for i, c in enumerate(campus.clusters)])
    return campus


def _lp_data(campus):
    """(plan, the HiGHS data of every LP the plan solved)."""
    seen = []
    orig = cp.Problem.solve

    def spy(self, *args, **kwargs):
        seen.append((self, {k: kwargs[k] for k in ("canon_backend", "ignore_dpp") if k in kwargs}))
        return orig(self, *args, **kwargs)

    cp.Problem.solve = spy
    try:
        plan = program.plan_campus(campus)
    finally:
        cp.Problem.solve = orig
    return plan, [p.get_problem_data(cp.HIGHS, **kw)[0] for p, kw in seen]


def _assert_same_data(a: dict, b: dict) -> None:
    for key in ("c", "b", "lower_bounds", "upper_bounds"):
        np.testing.assert_array_equal(a[key], b[key])
    x, y = a["A"].tocsc(), b["A"].tocsc()
    assert x.shape == y.shape
    np.testing.assert_array_equal(x.indptr, y.indptr)
    np.testing.assert_array_equal(x.indices, y.indices)
    np.testing.assert_array_equal(x.data, y.data)
    assert (a["dims"].zero, a["dims"].nonneg) == (b["dims"].zero, b["dims"].nonneg)


def _assert_same_plan(p, q) -> None:
    assert list(p.hourly.columns) == program.HOURLY_COLUMNS and list(p.clusters.columns) == program.CLUSTER_COLUMNS
    assert p.lp_status == q.lp_status
    assert p.objective == q.objective
    assert p.hourly.equals(q.hourly)
    assert p.clusters.equals(q.clusters)


@settings(max_examples=25)
@given(seed=st.integers(0, 10_000), n_clusters=st.integers(1, 6), n_hours=st.sampled_from([23, 24, 25]),
       case=st.sampled_from(["peak", "none", "cap", "binding", "linear"]),
       curve=st.sampled_from(["concave", "specpower"]), ramp=st.sampled_from([None, 0.3]))
def test_cached_and_fresh_programs_give_the_same_lp_and_plan(seed, n_clusters, n_hours, case, curve, ramp):
    campus = _campus(seed, n_clusters, n_hours, case, curve, ramp)
    CACHE.clear()
    fresh_plan, fresh = _lp_data(campus)  # first sight: a fresh program
    assert CACHE.stats.hits == 0
    _lp_data(campus)  # second sight: compiled
    hit_plan, hit = _lp_data(campus)  # re-used
    if max(d["A"].shape[1] + d["A"].nnz for d in fresh) <= cache_mod.MAX_ENTRIES:  # small enough to cache
        assert CACHE.stats.compiled >= 1 and CACHE.stats.hits >= 1
    assert len(hit) == len(fresh)
    for a, b in zip(hit, fresh):
        _assert_same_data(a, b)
    _assert_same_plan(hit_plan, fresh_plan)
    program.CACHE_PROGRAMS = False
    try:
        _assert_same_plan(program.plan_campus(campus), fresh_plan)
    finally:
        program.CACHE_PROGRAMS = True


def _random_lp(rng: np.random.Generator, n: int, m_eq: int, m_in: int, density: float):
    eq = sp.random(m_eq, n, density=density, random_state=rng, format="csr") + sp.eye(m_eq, n, format="csr")
    ineq = sp.random(m_in, n, density=density, random_state=rng, format="csr")
    lower = -rng.uniform(0.1, 2.0, n)
    upper = rng.uniform(0.1, 2.0, n)
    lower[rng.random(n) < 0.1] = -np.inf
    upper[rng.random(n) < 0.1] = np.inf
    return rng.standard_normal(n), eq.tocsr(), ineq.tocsr(), rng.uniform(0.0, 1.0, m_in), lower, upper


@settings(max_examples=20)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 60), m_eq=st.integers(1, 5), m_in=st.integers(1, 30),
       density=st.floats(0.05, 0.5))
def test_a_parametrised_program_compiles_to_the_constant_programs_lp(seed, n, m_eq, m_in, density):
    rng = np.random.default_rng(seed)
    c, eq, ineq, h, lo, hi = _random_lp(rng, n, m_eq, m_in, density)
    prog = MatrixLP(n, eq, ineq)
    assert prog.problem.is_dcp(dpp=True)
    for _ in range(2):  # re-assigned with new values of the same structure
        eq.data = rng.uniform(-1, 1, eq.nnz)
        ineq.data = rng.uniform(-1, 1, ineq.nnz)
        c, h = rng.standard_normal(n), rng.uniform(0.0, 1.0, m_in)
        prog.assign(c, eq, ineq, h, lo, hi)
        x = cp.Variable(n, bounds=[lo, hi])
        const = cp.Problem(cp.Minimize(cp.sum(cp.multiply(c, x))), [eq @ x == 0, ineq @ x <= h])
        _assert_same_data(prog.problem.get_problem_data(cp.HIGHS)[0],
                          const.get_problem_data(cp.HIGHS, ignore_dpp=True)[0])


def _small_lp(rng, pattern_seed: int):
    prng = np.random.default_rng(pattern_seed)
    n = 8
    eq = sp.csr_matrix(np.ones((1, n)))
    mask = prng.random((4, n)) < 0.5
    mask[:, 0] = True
    ineq = sp.csr_matrix(np.where(mask, rng.uniform(0.5, 1.5, (4, n)), 0.0))
    return rng.standard_normal(n), eq, ineq, np.ones(4), -np.ones(n), np.ones(n)


def test_the_cache_is_bounded():
    cache = ProgramCache(max_programs=2, max_seen=3)
    rng = np.random.default_rng(0)
    lps = [_small_lp(rng, k) for k in range(6)]
    for c, eq, ineq, *_ in lps:  # first sight of six structures: remembered, at most 3
        assert cache.lookup(c.size, eq, ineq, "HIGHS") is None
    assert len(cache.seen) <= 3
    for c, eq, ineq, *_ in lps:  # again: compiled (or first sight again, if forgotten); at most 2 kept
        cache.lookup(c.size, eq, ineq, "HIGHS")
        cache.lookup(c.size, eq, ineq, "HIGHS")
        assert len(cache.programs) <= 2
    assert cache.stats.evicted >= 1
    big = ProgramCache(max_entries=10)
    c, eq, ineq, *_ = lps[0]
    for _ in range(3):  # too many entries: never compiled
        assert big.lookup(c.size, eq, ineq, "HIGHS") is None
    assert big.stats.compiled == 0 and not big.programs


def test_a_structure_change_never_reuses_a_wrong_program(monkeypatch):
    rng = np.random.default_rng(1)
    a = _small_lp(rng, 1)
    b = _small_lp(rng, 2)
    assert a[2].nnz != b[2].nnz or not np.array_equal(a[2].indices, b[2].indices)
    monkeypatch.setattr(cache_mod, "structure_key", lambda *args: ("collide",))  # every digest the same
    cache = ProgramCache()
    assert cache.lookup(8, a[1], a[2], "HIGHS") is None
    prog_a = cache.lookup(8, a[1], a[2], "HIGHS")
    assert prog_a is not None and prog_a.matches(8, a[1], a[2])
    prog_b = cache.lookup(8, b[1], b[2], "HIGHS")  # same key, other pattern: a new program, not prog_a
    assert prog_b is not None and prog_b is not prog_a and prog_b.matches(8, b[1], b[2])
    assert not prog_b.matches(8, a[1], a[2])
    # and it solves b's LP, as a constant program does
    c, eq, ineq, h, lo, hi = b
    prog_b.assign(c, eq, ineq, h, lo, hi)
    prog_b.problem.solve(solver=HIGHS)
    x = cp.Variable(8, bounds=[lo, hi])
    const = cp.Problem(cp.Minimize(cp.sum(cp.multiply(c, x))), [eq @ x == 0, ineq @ x <= h])
    const.solve(solver=HIGHS, ignore_dpp=True)
    assert prog_b.problem.value == pytest.approx(const.value, rel=1e-9, abs=1e-9)


def test_a_campus_with_a_different_structure_gets_its_own_program():
    """Two campuses of the same size whose LPs differ in structure (hull segments, hours) do not share a
    program; each plan equals its fresh plan."""
    a = _campus(3, 2, 24, "none", "specpower", None)
    b = _campus(4, 2, 24, "none", "specpower", None)
    plans = {}
    for campus in (a, b, a, b, a, b):
        plans.setdefault(campus is a, []).append(program.plan_campus(campus))
    for key, ps in plans.items():
        for p in ps[1:]:
            _assert_same_plan(p, ps[0])
    assert CACHE.stats.hits >= 2


def test_the_post_check_fires_when_needed_peak_rows_were_dropped(monkeypatch):
    """If the bound that decides whether the peak rows can bind were wrong (here: forced to 0 kW), the rows
    would be left out of a campus whose contract binds; the post-solve check then finds the contract exceeded
    and the plan falls back visibly instead of breaking the contract."""
    campus = _campus(7, 5, 24, "binding", "specpower", None)
    campus = dataclasses.replace(campus, lambda_p=0.0)  # the peak rows then serve the contract alone
    good = program.plan_campus(campus)
    assert good.lp_status == "optimal" and good.contract_ok
    monkeypatch.setattr(program, "_peak_bound", lambda *args, **kwargs: 0.0)
    bad = program.plan_campus(campus)
    assert bad.lp_status == "solver-error"
    assert set(bad.clusters["status"]) == {"fallback"}
    assert any("contract exceeded" in str(d) for d in bad.clusters["reason_detail"])


@pytest.mark.parametrize("case,seed", [("none", 11), ("peak", 12), ("cap", 13)])
def test_large_lps_compile_to_the_same_lp_with_the_coo_backend(monkeypatch, case, seed):
    """LPs from COO_BACKEND_COLUMNS columns on are compiled with cvxpy's COO backend: the same LP and plan as with
    its default backend."""
    campus = _campus(seed, 8, 24, case, "specpower", 0.3 if case == "cap" else None)
    program.CACHE_PROGRAMS = False
    try:
        monkeypatch.setattr(program, "COO_BACKEND_COLUMNS", 10**9)
        default_plan, default = _lp_data(campus)
        monkeypatch.setattr(program, "COO_BACKEND_COLUMNS", 0)
        coo_plan, coo = _lp_data(campus)
    finally:
        program.CACHE_PROGRAMS = True
    for a, b in zip(coo, default):
        _assert_same_data(a, b)
    _assert_same_plan(coo_plan, default_plan)


def test_a_too_full_cluster_names_the_hour_by_its_timestamp():
    import pandas as pd

    hours = pd.date_range("2022-06-01", periods=24, freq="h", tz="UTC")
    campus = synthetic_campus(_eta(5, 24), 2, seed=5, hours=hours, contract_headroom=np.inf, lambda_p=0.0)
    c = campus.clusters[0]
    cap = np.full(24, float(np.max(c.capacity_cores)))
    cap[7] = 0.5 * float(c.inflexible_upper_cpu_cores[7] * c.reservation_ratio[7])  # the floor cannot fit at 07:00
    campus = dataclasses.replace(campus, clusters=[dataclasses.replace(c, capacity_cores=cap), campus.clusters[1]])
    plan = program.plan_campus(campus)
    detail = plan.clusters["reason_detail"].iloc[0]
    assert plan.clusters["reason"].iloc[0] == "too-full" and f"first at {hours[7]}" in detail, detail


def _stretched(campus, amplitude: float):
    """The campus with R varying by +-amplitude over the day and the upper quantile at the forecast (need = 0):
    coverage can then bind."""
    n_h = campus.n_hours
    return dataclasses.replace(campus, clusters=[dataclasses.replace(
        c, reservation_ratio=c.reservation_ratio * (1 + amplitude * np.sin(np.arange(n_h) / 3 + i)),
        inflexible_upper_cpu_cores=c.inflexible_cpu_cores) for i, c in enumerate(campus.clusters)])


@settings(max_examples=25)
@given(seed=st.integers(0, 10_000), n_clusters=st.integers(1, 8), case=st.sampled_from(["none", "cap", "peak"]),
       amplitude=st.sampled_from([0.0, 0.05, 0.3]), ramp=st.sampled_from([None, 0.3]))
def test_leaving_out_coverage_rows_that_cannot_bind_keeps_the_plan(seed, n_clusters, case, amplitude, ramp):
    """The coverage rows left out (no peak rows, HiGHS) could not bind: the plan is the one with every row, to
    1e-9 relative (in practice bit for bit or to a few ulps)."""
    campus = _campus(seed, n_clusters, 24, case, "specpower", ramp)
    if amplitude:
        campus = _stretched(campus, amplitude)
    program.CACHE_PROGRAMS = False
    try:
        lean = program.plan_campus(campus)
        program.DROP_SLACK_COVERAGE = False
        full = program.plan_campus(campus)
    finally:
        program.DROP_SLACK_COVERAGE = True
        program.CACHE_PROGRAMS = True
    assert lean.lp_status == full.lp_status
    assert list(lean.clusters["status"]) == list(full.clusters["status"])
    assert lean.objective == pytest.approx(full.objective, rel=1e-9)
    for col in ("delta", "vcc_cores", "power_kw"):
        a, b = lean.hourly[col].to_numpy(), full.hourly[col].to_numpy()
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9 * max(float(np.abs(b).max()), 1.0))


@settings(max_examples=40)
@given(seed=st.integers(0, 10_000), n_h=st.integers(2, 25), dmin=st.sampled_from([-1.0, -0.5, -0.1]))
def test_the_least_coverage_is_that_of_the_lp(seed, n_h, dmin):
    from scipy.optimize import linprog

    rng = np.random.default_rng(seed)
    rk = rng.uniform(0.5, 2.0, (1, n_h))
    hi = rng.uniform(0.0, 2.0, (1, n_h))
    got = program._lowest_coverage(rk, hi, dmin)[0]
    res = linprog(rk[0], A_eq=np.ones((1, n_h)), b_eq=[0.0], bounds=list(zip([dmin] * n_h, hi[0])),
                  method="highs")
    if res.status == 0:
        assert got == pytest.approx(res.fun, rel=1e-9, abs=1e-9)


def test_the_post_check_fires_when_a_needed_coverage_row_was_dropped(monkeypatch):
    """If the least-coverage bound were wrong (here: every row claimed slack), a coverage row that binds would be
    left out; the post-solve check finds the plan short of Theta and the clusters fall back visibly."""
    campus = _stretched(_campus(21, 4, 24, "none", "specpower", None), 0.3)
    good = program.plan_campus(campus)
    assert good.lp_status == "optimal"
    monkeypatch.setattr(program, "_lowest_coverage", lambda rk, hi, dmin: np.full(rk.shape[0], np.inf))
    bad = program.plan_campus(campus)
    assert bad.lp_status == "solver-error"
    assert any("Theta short" in str(d) for d in bad.clusters["reason_detail"])
