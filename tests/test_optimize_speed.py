"""Issue 19, item 2 (speed): the faster builds of both programs give the plans of the programs before them.

The programs as of commit f852f37 (before this work) are loaded from git and run on the same campuses: the queue
program's schedule and carbon, and the ceiling program's objective and VCCs, agree to 1e-6 relative. Where the
contract rows were left out (they cannot bind), the plan still respects the contract.
"""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from cicm.optimize import program, queue
from cicm.optimize.synthetic import synthetic_campus, synthetic_queue_campus

REPO = Path(__file__).resolve().parent.parent
BEFORE = "f852f37"
RTOL = 1e-6


def _module_at(commit: str, path: str, name: str) -> types.ModuleType | None:
    try:
        text = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType(name)
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    try:
        exec(compile(text, f"{name}.py", "exec"), mod.__dict__)
    finally:
        del sys.modules[mod.__name__]
    return mod


@pytest.fixture(scope="module")
def queue_before():
    mod = _module_at(BEFORE, "cicm/optimize/queue.py", "queue_before_speed")
    if mod is None:
        pytest.skip("the git history is not available")
    return mod


@pytest.fixture(scope="module")
def program_before():
    mod = _module_at(BEFORE, "cicm/optimize/program.py", "program_before_speed")
    if mod is None:
        pytest.skip("the git history is not available")
    return mod


def _eta(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = np.arange(n)
    return 250 + 120 * np.sin(2 * np.pi * (h - rng.uniform(0, 24)) / 24) + rng.uniform(-30, 30, n)


def _queue_carbon(campus, service: np.ndarray) -> float:
    return float(sum(c.power_curve(c.inflexible_cpu_cores + service[i]) @ campus.carbon_gco2_per_kwh
                     for i, c in enumerate(campus.clusters)))


@pytest.mark.parametrize("contract,lambda_p", [("capacity", 0.0), ("binding", 0.0), ("none", 0.0),
                                               ("capacity", 0.05), ("none", 0.1)])
@pytest.mark.parametrize("n_clusters,seed", [(1, 0), (3, 1), (10, 2)])
def test_queue_plans_are_those_of_the_program_before(queue_before, contract, lambda_p, n_clusters, seed):
    campus = synthetic_queue_campus(_eta(seed, 42), n_clusters, seed=seed, contract=contract, lambda_p=lambda_p)
    old_campus = queue_before.QueueCampus(
        campus.name, tuple(queue_before.QueueCluster(
            c.name, c.inflexible_cpu_cores, c.inflexible_upper_cpu_cores, c.capacity_cores, c.must_core_hours,
            c.avail_core_hours, c.power_curve) for c in campus.clusters),
        campus.carbon_gco2_per_kwh, committed=campus.committed, contract_kw=campus.contract_kw,
        lambda_p=campus.lambda_p)
    new, old = queue.plan_queue(campus), queue_before.plan_queue(old_campus)
    assert new.status == old.status == ("optimal",) * n_clusters
    scale = max(float(np.max(new.room_cpu_cores)), 1.0)
    np.testing.assert_allclose(new.service_cpu_cores, old.service_cpu_cores, rtol=0, atol=RTOL * scale)
    np.testing.assert_allclose(new.late_core_hours, old.late_core_hours, rtol=0, atol=RTOL * scale)
    assert _queue_carbon(campus, new.service_cpu_cores) == pytest.approx(
        _queue_carbon(campus, old.service_cpu_cores), rel=RTOL)
    if np.isfinite(campus.contract_kw):
        peaks = sum(np.max(c.power_curve(c.inflexible_cpu_cores + new.service_cpu_cores[i])[campus.committed])
                    for i, c in enumerate(campus.clusters))
        old_peaks = sum(np.max(c.power_curve(c.inflexible_cpu_cores + old.service_cpu_cores[i])[campus.committed])
                        for i, c in enumerate(campus.clusters))
        assert peaks <= max(campus.contract_kw, old_peaks) * (1 + RTOL)


def test_the_queue_contract_rows_are_left_out_only_when_they_cannot_bind(monkeypatch):
    campus = synthetic_queue_campus(_eta(5, 42), 4, seed=5, contract="capacity")
    seen = []
    orig = queue.cp.Problem.solve

    def spy(self, *args, **kwargs):
        seen.append(len(self.constraints))
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(queue.cp.Problem, "solve", spy)
    queue.plan_queue(campus)
    tight = synthetic_queue_campus(_eta(5, 42), 4, seed=5, contract="binding")
    queue.plan_queue(tight)
    assert len(seen) == 2 and seen[0] < seen[1]  # the binding contract keeps its rows


@pytest.mark.parametrize("headroom,lambda_p", [(1.02, 0.1), (np.inf, 0.0), (np.inf, 0.1), ("cap", 0.0),
                                               (1.02, 0.0)])
@pytest.mark.parametrize("n_clusters,seed,curve", [(1, 0, "specpower"), (4, 1, "concave"), (12, 2, "specpower")])
def test_ceiling_plans_are_those_of_the_program_before(program_before, headroom, lambda_p, n_clusters, seed, curve):
    eta = _eta(seed, 24)
    campus = synthetic_campus(eta, n_clusters, seed=seed, lambda_p=lambda_p, curve=curve,
                              contract_headroom=1.02 if headroom == "cap" else headroom)
    if headroom == "cap":
        import dataclasses

        limit = sum(float(c.power_curve(np.max(c.capacity_cores))) for c in campus.clusters)
        campus = dataclasses.replace(campus, contract_limit_kw=limit)
    new, old = program.plan_campus(campus), program_before.plan_campus(campus)
    assert new.lp_status == old.lp_status
    assert list(new.clusters["status"]) == list(old.clusters["status"])
    assert new.objective == pytest.approx(old.objective, rel=RTOL)
    vcc_new, vcc_old = new.hourly["vcc_cores"].to_numpy(), old.hourly["vcc_cores"].to_numpy()
    np.testing.assert_allclose(vcc_new, vcc_old, rtol=RTOL, atol=RTOL * float(np.max(vcc_old)))
    assert new.contract_ok == old.contract_ok


def _lp_data(plan, campus):
    import cvxpy as cp

    seen = []
    orig = cp.Problem.solve

    def spy(self, *args, **kwargs):
        seen.append(self)
        return orig(self, *args, **kwargs)

    cp.Problem.solve = spy
    try:
        plan(campus)
    finally:
        cp.Problem.solve = orig
    return [p.get_problem_data(cp.HIGHS)[0] for p in seen]


@pytest.mark.parametrize("seed", range(4))
def test_the_queue_program_hands_highs_the_same_lp_as_before(queue_before, seed):
    """The matrix build of the queue program gives HiGHS the LP the expression build gave it, bit for bit (same
    columns, rows and coefficients), so its plans are the same bit for bit too."""
    import dataclasses

    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 48))
    campus = synthetic_queue_campus(rng.uniform(50, 500, n), int(rng.integers(1, 4)), seed=seed,
                                    contract=("binding", "none")[seed % 2], lambda_p=(0.0, 0.05)[seed // 2],
                                    committed_hours=min(24, n))
    if seed == 3:  # with a plan of record (the intraday correction)
        campus = dataclasses.replace(campus, clusters=tuple(dataclasses.replace(
            c, limit_cpu_cores=0.5 * c.room_cpu_cores, carry_core_hours=10.0) for c in campus.clusters))
    old_campus = queue_before.QueueCampus(
        campus.name, tuple(queue_before.QueueCluster(
            c.name, c.inflexible_cpu_cores, c.inflexible_upper_cpu_cores, c.capacity_cores, c.must_core_hours,
            c.avail_core_hours, c.power_curve, c.limit_cpu_cores, c.carry_core_hours) for c in campus.clusters),
        campus.carbon_gco2_per_kwh, committed=campus.committed, contract_kw=campus.contract_kw,
        lambda_p=campus.lambda_p)
    new, old = _lp_data(queue.plan_queue, campus), _lp_data(queue_before.plan_queue, old_campus)
    assert len(new) == len(old) == 1
    for key in ("c", "b", "lower_bounds", "upper_bounds"):
        np.testing.assert_array_equal(new[0][key], old[0][key])
    assert (new[0]["A"] != old[0]["A"]).nnz == 0
    np.testing.assert_array_equal(queue.plan_queue(campus).service_cpu_cores,
                                  queue_before.plan_queue(old_campus).service_cpu_cores)


def test_the_ceiling_peak_rows_are_left_out_only_when_they_cannot_bind():
    import dataclasses

    campus = synthetic_campus(_eta(7, 24), 5, seed=7, lambda_p=0.0, curve="specpower")  # contract 1.02x flat
    roomy = dataclasses.replace(campus, contract_limit_kw=sum(
        float(c.power_curve(np.max(c.capacity_cores))) for c in campus.clusters))
    rows = []
    for c in (roomy, campus):
        seen = _lp_data(program.plan_campus, c)
        rows.append(sum(d["A"].shape[0] for d in seen))
        plan = program.plan_campus(c)
        assert plan.lp_status == "optimal" and plan.contract_ok
    assert rows[0] < rows[1]  # the tight contract keeps its peak rows (one per cluster and hour)
