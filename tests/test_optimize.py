"""Invariants of the VCC program (cicm.optimize): guarantees, fallbacks, DST days, the DESIGN ceiling.

Hypothesis draws campuses of random but plausible clusters (some too full, some power-capped, varying reservation
ratios, both solvers, 23/24/25-hour days) and checks the guarantees of every plan in ``check_invariants``.
"""
from __future__ import annotations

import dataclasses
import math
import re

import cvxpy as cp
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cicm.optimize import CampusInput, CampusPlan, ClusterInput, PowerCurve, plan_campus, plan_fleet, concat_plans
from cicm.optimize import program as P
from cicm.paths import bundled_data_dir

SETTINGS = settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.too_slow])
RTOL = 1e-6


def make_cluster(rng: np.random.Generator, n_hours: int = 24, name: str = "c0", *, flat: bool = False,
                 roomy: bool = False, **overrides) -> ClusterInput:
    """A random but plausible cluster. ``flat``: every hourly input constant over the day. ``roomy``: capacities
    so large that the flat plan and every delta in [-1, 1] fit."""
    h = np.arange(n_hours)
    cap = float(rng.uniform(500, 5000))
    r0 = float(rng.uniform(1.0, 2.0))
    r = np.full(n_hours, r0) if flat else r0 * (1 + rng.uniform(0, 0.3) * np.sin(2 * np.pi * (h - rng.uniform(0, 24)) / 24))
    share = float(rng.uniform(0.1, 0.9))
    base = cap / r0 * share * rng.uniform(0.3, 0.9)
    u = np.full(n_hours, base) if flat else base * (1 + rng.uniform(0, 0.4) * np.cos(2 * np.pi * (h - rng.uniform(0, 24)) / 24))
    upper = u * (1 + rng.uniform(0, 0.2)) if rng.random() < 0.8 else u * rng.uniform(0.9, 1.0)
    if flat:
        upper = np.full(n_hours, upper[0])
    t_uf = float(rng.uniform(0.05, 1.0) * u.sum())
    t_r = float(((u + t_uf / n_hours) * r).sum() * rng.uniform(0.8, 1.3))
    q97 = float(rng.uniform(-0.05, 0.3))
    pcc = float("inf") if rng.random() < 0.5 else float(cap / r0 * rng.uniform(0.5, 1.2))
    slope = float(rng.uniform(0.001, 0.02))
    nom = slope * (u + t_uf / n_hours) + rng.uniform(5, 50)
    if flat:
        nom = np.full(n_hours, nom[0])
    if roomy:
        cap = float(((np.maximum(u, upper) + 4 * t_uf / n_hours) * r).max() * 2 + 10 * t_r)
        pcc = float("inf")
    kw = dict(name=name, inflexible_cpu_cores=u, inflexible_upper_cpu_cores=upper, flexible_core_hours=t_uf,
              reservations_core_hours=t_r, reservation_ratio=r, reservations_rel_error_q97=q97, capacity_cores=cap,
              power_capped_capacity_cores=pcc, slope_kw_per_core=slope, nominal_power_kw=nom)
    kw.update(overrides)
    return ClusterInput(**kw)


def flat_feasible(campus: CampusInput) -> bool:
    """True if delta = 0 satisfies every constraint of every shapeable cluster and the campus contract."""
    prep = P._prepare(campus)
    shaped = np.array([r is None for r in prep.reason])
    if shaped.any() and (prep.hi[shaped] < -1e-12).any():
        return False
    if math.isfinite(campus.contract_limit_kw):
        # The LP's own flat peaks: for a non-convex curve its hull plus the hull gap.
        return (prep.hull_nom.max(axis=1) + prep.gap).sum() <= campus.contract_limit_kw
    return True


def check_invariants(campus: CampusInput, plan: CampusPlan) -> None:
    """The guarantees of every plan (see docs/optimizer.md, "Guarantees")."""
    prep = P._prepare(campus)
    n_c, n_h = len(campus.clusters), campus.n_hours
    hourly, clusters = plan.hourly, plan.clusters
    assert len(hourly) == n_c * n_h and len(clusters) == n_c
    assert list(clusters["cluster"]) == [c.name for c in campus.clusters]
    assert not hourly.drop(columns=["hour"]).isna().any().any()
    for i, c in enumerate(campus.clusters):
        row = clusters.iloc[i]
        hh = hourly[hourly["cluster"] == c.name].sort_values("hour_index")
        vcc = hh["vcc_cores"].to_numpy()
        delta = hh["delta"].to_numpy()
        flex = hh["flexible_cpu_cores"].to_numpy()
        cap = np.broadcast_to(c.capacity_cores, (n_h,))
        tau, theta = row["tau_core_hours"], row["theta_core_hours"]
        assert row["status"] in ("shaped", "fallback")
        # VCC never above machine capacity.
        assert (vcc <= cap * (1 + RTOL)).all()
        # Planned flexible usage totals tau; delta within bounds.
        assert abs(flex.sum() - tau) <= RTOL * max(tau, 1.0)
        assert (delta >= campus.delta_min - RTOL).all() and (delta <= campus.delta_max + RTOL).all()
        # power = P(U_nom) + pi * delta * tau / H (linear model), or the true curve at U_IF + flexible;
        # carbon = power * eta / 1000
        power = hh["power_kw"].to_numpy()
        if c.power_curve is None:
            np.testing.assert_allclose(power, prep.nom[i] + prep.k[i] * delta, rtol=1e-9, atol=1e-9)
        else:
            np.testing.assert_allclose(power, c.power_curve(c.inflexible_cpu_cores + flex), rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(prep.nom[i], c.power_curve(c.inflexible_cpu_cores + tau / n_h), rtol=1e-12)
        np.testing.assert_allclose(hh["carbon_kgco2"].to_numpy(), power * campus.carbon_gco2_per_kwh / 1000,
                                   rtol=1e-9, atol=1e-12)
        if row["status"] == "shaped":
            assert row["reason"] is None
            upper = np.maximum(c.inflexible_cpu_cores, c.inflexible_upper_cpu_cores)
            floor = (upper + (1 + campus.delta_min) * tau / n_h) * c.reservation_ratio
            # The cap always admits the inflexible upper quantile plus the flexible floor.
            assert (vcc >= floor * (1 - RTOL)).all()
            assert (vcc >= upper * c.reservation_ratio * (1 - RTOL)).all()
            # Power caps: flexible + inflexible upper within the power-capped capacity.
            pcc = np.broadcast_to(c.power_capped_capacity_cores, (n_h,))
            assert (flex + upper <= pcc * (1 + RTOL) + RTOL).all()
            # Coverage: the area under the VCC covers Theta.
            assert vcc.sum() >= theta * (1 - RTOL)
            if campus.ramp_limit is not None:
                assert (np.abs(np.diff(delta)) <= campus.ramp_limit + RTOL).all()
        else:
            assert isinstance(row["reason"], str) and row["reason"]
            assert isinstance(row["reason_detail"], str) and row["reason_detail"]
            np.testing.assert_allclose(vcc, cap)
            assert np.abs(delta).max() == 0.0
            if c.fallback_reason is not None:
                assert row["reason"] == c.fallback_reason
    # Campus contract.
    if math.isfinite(campus.contract_limit_kw):
        peaks = hourly.groupby("cluster")["power_kw"].max().sum()
        assert abs(peaks - plan.campus_peak_kw) <= 1e-9 * max(peaks, 1.0)
        if (clusters["status"] == "shaped").any():
            assert peaks <= campus.contract_limit_kw * (1 + RTOL) + RTOL
            assert plan.contract_ok
        elif not plan.contract_ok:
            # Nobody is shaped and the contract is broken: the program must have said why.
            assert "contract" in plan.message
    # Carbon and objective never worse than the flat plan when the flat plan is feasible (with power curves:
    # when they are convex over the plan's range; the LP sees a non-convex curve's hull, a lower bound).
    if flat_feasible(campus) and (clusters["power_model"] != P.POWER_CURVE_HULL).all():
        flat_obj = (campus.lambda_e * clusters["flat_kgco2"].sum()
                    + campus.lambda_p * clusters["flat_peak_kw"].sum())
        assert plan.objective <= flat_obj + RTOL * max(abs(flat_obj), 1.0)
        if campus.lambda_p == 0:
            assert (clusters["expected_kgco2"] <= clusters["flat_kgco2"] * (1 + RTOL) + RTOL).all()


# ---------------------------------------------------------------------------------------------------------------
# Hypothesis: random campuses.


@st.composite
def campuses(draw, *, solver=None, n_hours=None):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    h = n_hours or draw(st.sampled_from([23, 24, 25]))
    n = draw(st.integers(1, 5))
    clusters = [make_cluster(rng, h, name=f"c{i}", flat=draw(st.booleans()), roomy=rng.random() < 0.3)
                for i in range(n)]
    if draw(st.booleans()):
        i = draw(st.integers(0, n - 1))
        clusters[i] = make_cluster(rng, h, name=f"c{i}", fallback_reason=draw(
            st.sampled_from(["insufficient-history", "slo-feedback", "maintenance"])))
    eta = rng.uniform(50, 800, h) if draw(st.booleans()) else np.round(rng.uniform(50, 800, h), -2)
    probe = CampusInput(clusters=clusters, carbon_gco2_per_kwh=eta)
    flat_peaks = float(P._prepare(probe).nom.max(axis=1).sum())
    contract = draw(st.sampled_from([math.inf, math.inf, 0.5, 0.95, 0.98, 1.0, 1.2, 1.5])) * flat_peaks
    ramp = draw(st.sampled_from([None, None, 0.05, 0.3, 1.0]))
    return CampusInput(
        clusters=clusters, carbon_gco2_per_kwh=eta, contract_limit_kw=contract,
        lambda_e=draw(st.sampled_from([1.0, 1.0, 3.0, 0.0])), lambda_p=draw(st.sampled_from([0.0, 0.0, 0.1, 10.0])),
        delta_min=draw(st.sampled_from([-1.0, -1.0, -0.5, 0.0])),
        delta_max=draw(st.sampled_from([1.0, 1.0, 0.5, 3.0, 0.0])),
        ramp_limit=ramp, solver=solver or draw(st.sampled_from(["HIGHS", "CLARABEL"])),
        hours=pd.date_range("2024-03-31", periods=h, freq="h", tz="UTC") if draw(st.booleans()) else None,
    )


@SETTINGS
@given(campuses())
def test_every_plan_keeps_the_guarantees(campus):
    plan = plan_campus(campus)
    check_invariants(campus, plan)


@settings(deadline=None, max_examples=25)
@given(st.integers(0, 2**32 - 1), st.sampled_from([23, 24, 25]), st.sampled_from(["HIGHS", "CLARABEL"]),
       st.booleans())
def test_flat_carbon_gives_a_flat_plan(seed, n_hours, solver, with_peak):
    """Flat carbon and no other incentive (lambda_p = 0, or flat nominal power) => delta = 0 (the tie-break)."""
    rng = np.random.default_rng(seed)
    clusters = [make_cluster(rng, n_hours, name=f"c{i}", roomy=True, flat=with_peak) for i in range(3)]
    campus = CampusInput(clusters=clusters, carbon_gco2_per_kwh=np.full(n_hours, rng.uniform(10, 900)),
                         lambda_p=1.0 if with_peak else 0.0, solver=solver)
    plan = plan_campus(campus)
    check_invariants(campus, plan)
    assert (plan.clusters["status"] == "shaped").all()
    assert plan.hourly["delta"].abs().max() <= 1e-6


@settings(deadline=None, max_examples=30)
@given(st.integers(0, 2**32 - 1), st.sampled_from([23, 24, 25]), st.sampled_from(["HIGHS", "CLARABEL"]),
       st.sampled_from([(-1.0, 1.0), (-0.5, 0.5), (-0.3, 2.0)]), st.booleans())
def test_cleaner_hour_never_gets_less_flexible_work(seed, n_hours, solver, bounds, ties):
    """Equal slopes and bounds in every hour: eta(a) < eta(b) => flexible(a) >= flexible(b)."""
    rng = np.random.default_rng(seed)
    eta = rng.uniform(20, 900, n_hours)
    if ties:
        eta = np.round(eta, -2)
    clusters = [make_cluster(rng, n_hours, name=f"c{i}", flat=True, roomy=rng.random() < 0.5) for i in range(2)]
    campus = CampusInput(clusters=clusters, carbon_gco2_per_kwh=eta, lambda_p=float(rng.choice([0.0, 0.5])),
                         delta_min=bounds[0], delta_max=bounds[1], solver=solver)
    plan = plan_campus(campus)
    check_invariants(campus, plan)
    for name, hh in plan.hourly.groupby("cluster"):
        flex = hh.sort_values("hour_index")["flexible_cpu_cores"].to_numpy()
        scale = max(flex.max(), 1.0)
        cleaner = eta[:, None] < eta[None, :]
        assert (flex[:, None] >= flex[None, :] - 1e-6 * scale)[cleaner].all()


# ---------------------------------------------------------------------------------------------------------------
# Fallbacks: never an exception, always a reason.


def _campus(clusters, n_hours=24, **kw):
    eta = kw.pop("eta", 200 + 150 * np.sin(np.arange(n_hours) / n_hours * 2 * np.pi))
    return CampusInput(clusters=clusters, carbon_gco2_per_kwh=eta, **kw)


def test_contract_infeasible_for_the_campus_falls_back_with_the_reason():
    rng = np.random.default_rng(1)
    clusters = [make_cluster(rng, name=f"c{i}", roomy=True) for i in range(3)]
    probe = _campus(clusters)
    flat = P._prepare(probe).nom.max(axis=1).sum()
    for solver in ("HIGHS", "CLARABEL"):
        campus = _campus(clusters, contract_limit_kw=0.5 * flat, solver=solver, lambda_p=0.1)
        plan = plan_campus(campus)
        check_invariants(campus, plan)
        assert (plan.clusters["status"] == "fallback").all()
        assert (plan.clusters["reason"] == "infeasible").all()
        assert plan.clusters["reason_detail"].str.contains("contract").all()
        assert not plan.contract_ok and "contract" in plan.message and plan.lp_status == "infeasible"
        # The reported lowest achievable sum of peaks is right: just above it, the campus is shaped.
        detail = plan.clusters.loc[0, "reason_detail"]
        lowest = float(re.search(r"lowest achievable sum of cluster peaks ([0-9.e+]+) kW", detail).group(1))
        assert 0.5 * flat < lowest <= flat * (1 + 1e-9)
        ok = _campus(clusters, contract_limit_kw=lowest * 1.001, solver=solver, lambda_p=0.1)
        plan = plan_campus(ok)
        check_invariants(ok, plan)
        assert (plan.clusters["status"] == "shaped").all() and plan.contract_ok
        assert plan.campus_peak_kw <= lowest * 1.001 * (1 + 1e-6)
        bad = _campus(clusters, contract_limit_kw=lowest * 0.999, solver=solver, lambda_p=0.1)
        assert (plan_campus(bad).clusters["reason"] == "infeasible").all()


def test_preset_fallbacks_count_against_the_contract():
    rng = np.random.default_rng(2)
    a = make_cluster(rng, name="a", roomy=True)
    b = make_cluster(rng, name="b", roomy=True, fallback_reason="slo-feedback", fallback_detail="2 misses")
    prep = P._prepare(_campus([a, b]))
    peak_a, peak_b = prep.nom.max(axis=1)
    # Room for b's flat peak and a's flat peak: fine.
    plan = plan_campus(_campus([a, b], contract_limit_kw=peak_a + peak_b, lambda_p=0.0))
    assert list(plan.clusters["status"]) == ["shaped", "fallback"]
    assert plan.clusters.loc[1, "reason"] == "slo-feedback" and plan.clusters.loc[1, "reason_detail"] == "2 misses"
    assert plan.contract_ok
    # b's flat peak alone is above the contract: a cannot be shaped within it.
    plan = plan_campus(_campus([a, b], contract_limit_kw=0.9 * peak_b))
    assert list(plan.clusters["reason"]) == ["infeasible", "slo-feedback"]
    assert "fallback clusters" in plan.clusters.loc[0, "reason_detail"]


def test_too_full_clusters():
    rng = np.random.default_rng(3)
    ok = make_cluster(rng, name="ok", roomy=True)
    base = make_cluster(rng, name="x", roomy=True)
    cap = float(np.max(base.capacity_cores))
    # Theta above the day's capacity.
    over = dataclasses.replace(base, name="over", reservations_core_hours=cap * 24 * 1.01,
                               reservations_rel_error_q97=0.0)
    # The floor (upper quantile + flexible floor) above capacity in one hour.
    u = base.inflexible_upper_cpu_cores.copy()
    u[5] = max(u[5], cap / base.reservation_ratio[5])
    floor = dataclasses.replace(base, name="floor", inflexible_upper_cpu_cores=u)
    # The flexible floor above the power-capped capacity.
    pcap = dataclasses.replace(base, name="pcap",
                               power_capped_capacity_cores=float(np.max(np.maximum(
                                   base.inflexible_upper_cpu_cores, base.inflexible_cpu_cores))))
    campus = _campus([ok, over, floor, pcap], delta_min=-0.5)
    plan = plan_campus(campus)
    check_invariants(campus, plan)
    got = dict(zip(plan.clusters["cluster"], plan.clusters["reason"]))
    assert got == {"ok": None, "over": "too-full", "floor": "too-full", "pcap": "too-full"}
    detail = dict(zip(plan.clusters["cluster"], plan.clusters["reason_detail"]))
    assert "Theta" in detail["over"] and "machine capacity" in detail["floor"] and "power" in detail["pcap"]


def test_a_cluster_infeasible_on_its_own_does_not_sink_the_campus():
    """A forced dip (power cap in hour 0 below flat) plus a tight ramp cannot sum to zero."""
    rng = np.random.default_rng(4)
    good = make_cluster(rng, name="good", roomy=True)
    tight = make_cluster(rng, name="tight", roomy=True, flat=True)
    f = P._prepare(_campus([tight])).f[0]
    upper = float(np.max(tight.inflexible_upper_cpu_cores))
    pcc = np.full(24, np.inf)
    pcc[0] = upper + 0.4 * f  # delta(0) <= -0.6
    tight = dataclasses.replace(tight, power_capped_capacity_cores=pcc)  # same tau: only the power cap changes
    for solver in ("HIGHS", "CLARABEL"):
        campus = _campus([good, tight], ramp_limit=0.01, solver=solver, contract_limit_kw=1e9)
        plan = plan_campus(campus)
        check_invariants(campus, plan)
        assert list(plan.clusters["status"]) == ["shaped", "fallback"]
        assert plan.clusters.loc[1, "reason"] == "infeasible"
        assert "ramp" in plan.clusters.loc[1, "reason_detail"]


def test_no_flexible_work_falls_back():
    rng = np.random.default_rng(5)
    c = make_cluster(rng, name="idle", flexible_core_hours=0.0)
    plan = plan_campus(_campus([c]))
    assert plan.clusters.loc[0, "reason"] == "no-flexible-work"
    assert plan.lp_status == "no-lp" and plan.solver == "none"


@pytest.mark.parametrize("solver", ["HIGHS", "CLARABEL"])
def test_solver_exception_becomes_solver_error(monkeypatch, solver):
    def boom(self, *a, **k):
        raise cp.error.SolverError("numerical trouble at iteration 7")

    monkeypatch.setattr(cp.Problem, "solve", boom)
    rng = np.random.default_rng(6)
    campus = _campus([make_cluster(rng, name=f"c{i}", roomy=True) for i in range(2)], solver=solver)
    plan = plan_campus(campus)
    check_invariants(campus, plan)
    assert (plan.clusters["reason"] == "solver-error").all()
    assert plan.clusters["reason_detail"].str.contains("numerical trouble at iteration 7").all()
    assert plan.lp_status == "solver-error"


def test_solver_without_a_solution_becomes_solver_error(monkeypatch):
    def no_solution(self, *a, **k):
        self._status = cp.USER_LIMIT
        return None

    monkeypatch.setattr(cp.Problem, "solve", no_solution)
    rng = np.random.default_rng(7)
    plan = plan_campus(_campus([make_cluster(rng, roomy=True)]))
    assert plan.clusters.loc[0, "reason"] == "solver-error"
    assert "user_limit" in plan.clusters.loc[0, "reason_detail"]


@pytest.mark.parametrize("n_hours", [23, 25])
def test_dst_days(n_hours):
    rng = np.random.default_rng(n_hours)
    hours = pd.date_range("2024-10-27" if n_hours == 25 else "2024-03-31", periods=n_hours, freq="h", tz="UTC")
    campus = _campus([make_cluster(rng, n_hours, name=f"c{i}") for i in range(3)], n_hours=n_hours, hours=hours)
    plan = plan_campus(campus)
    check_invariants(campus, plan)
    assert plan.hourly["hour_index"].max() == n_hours - 1
    assert (plan.hourly.groupby("cluster")["hour"].apply(lambda s: list(s)) .map(lambda l: l == list(hours))).all()


def test_power_curve_gives_the_nominal_power_at_the_nominal_usage():
    rng = np.random.default_rng(8)
    base = make_cluster(rng, roomy=True)
    curve = PowerCurve([0.0, 1000.0, 2000.0, 3000.0], [40.0, 50.0, 58.0, 64.0])
    c = make_cluster(np.random.default_rng(8), roomy=True, nominal_power_kw=None, power_curve=curve,
                     slope_kw_per_core=None)
    prep = P._prepare(_campus([c]))
    u_nom = c.inflexible_cpu_cores + prep.f[0]
    np.testing.assert_allclose(prep.nom[0], np.interp(u_nom, curve.cpu_cores, curve.power_kw))
    assert prep.slope[0] == pytest.approx(float(curve.slope_at(u_nom.mean())))
    assert curve(4000.0) == pytest.approx(70.0) and curve(-1000.0) == pytest.approx(30.0)
    check_invariants(_campus([c]), plan_campus(_campus([c])))


def test_alpha_is_at_least_one_and_matches_theta():
    rng = np.random.default_rng(9)
    c = make_cluster(rng, roomy=True, reservations_rel_error_q97=0.1)
    plan = plan_campus(_campus([c]))
    row = plan.clusters.iloc[0]
    tau_raw_sum = ((c.inflexible_cpu_cores + row["alpha"] * c.flexible_core_hours / 24) * c.reservation_ratio).sum()
    assert row["theta_core_hours"] == pytest.approx(c.reservations_core_hours * 1.1)
    if row["alpha"] > 1:
        assert tau_raw_sum == pytest.approx(row["theta_core_hours"])
    assert row["tau_core_hours"] == pytest.approx(row["alpha"] * c.flexible_core_hours)
    # A tiny reservation forecast: alpha would be < 1; it is clamped to 1 (plan at least the forecast).
    small = make_cluster(rng, roomy=True, reservations_core_hours=1.0)
    row = plan_campus(_campus([small])).clusters.iloc[0]
    assert row["alpha"] == 1.0 and row["tau_core_hours"] == pytest.approx(small.flexible_core_hours)


def test_fleet_helpers_and_frames():
    rng = np.random.default_rng(10)
    campuses_ = [_campus([make_cluster(rng, name=f"k{j}c{i}") for i in range(2)], name=f"k{j}") for j in range(3)]
    plans = plan_fleet(campuses_)
    hourly, clusters = concat_plans(plans)
    assert list(hourly.columns) == P.HOURLY_COLUMNS and list(clusters.columns) == P.CLUSTER_COLUMNS
    assert len(hourly) == 3 * 2 * 24 and set(clusters["campus"]) == {"k0", "k1", "k2"}
    assert all(isinstance(p, CampusPlan) and p.plan_seconds >= p.solve_seconds >= 0 for p in plans)


# ---------------------------------------------------------------------------------------------------------------
# The DESIGN ceiling, on real carbon (CISO 2022, UTC days, perfect foresight).


def _ciso_days():
    path = bundled_data_dir() / "carbon_intensity" / "CISO_2022_hourly_mix_and_ci.csv.gz"
    s = pd.read_csv(path, usecols=["timestamp", "avg_CI"], parse_dates=["timestamp"]).set_index("timestamp")["avg_CI"]
    days = []
    for _, v in s.groupby(s.index.floor("D")):
        if len(v) == 24 and not v.isna().any():
            days.append(v)
    return days


def _oracle_pct(eta, d):
    a = np.sort(eta)
    return 100 * d * (a[12:].sum() - a[:12].sum()) / a.sum()


@pytest.mark.parametrize("d, ceiling, stride", [(1.0, 20.6, 1), (0.5, 10.3, 3)])
def test_saving_never_exceeds_the_design_ceiling(d, ceiling, stride):
    days = _ciso_days()
    assert len(days) >= 360
    rng = np.random.default_rng(11)
    cluster = make_cluster(rng, roomy=True, flat=True)
    oracle_all = np.mean([_oracle_pct(v.to_numpy(), d) for v in days])
    assert oracle_all == pytest.approx(ceiling, abs=0.05)  # the DESIGN table, reproduced
    got, oracle = [], []
    for v in days[::stride]:
        campus = CampusInput(clusters=[cluster], carbon_gco2_per_kwh=v.to_numpy(), delta_min=-d, delta_max=d,
                             lambda_p=0.0, hours=pd.DatetimeIndex(v.index))
        row = plan_campus(campus).clusters.iloc[0]
        assert row["status"] == "shaped"
        got.append(row["flexible_saving_pct"])
        oracle.append(_oracle_pct(v.to_numpy(), d))
    got, oracle = np.array(got), np.array(oracle)
    assert (got <= oracle + 1e-6).all()  # no day beats its own oracle
    assert (got >= oracle - 0.01).all()  # and without caps the LP *is* the oracle (up to the tie-break dead band)
    if stride == 1:
        assert got.mean() <= ceiling + 0.05
