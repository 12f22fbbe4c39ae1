"""Power curves in the VCC program: the LP sees the curve (its lower convex hull over the reachable usage), and the
plan reports the true curve at the planned usage.

The invariants of tests/test_optimize.py (``check_invariants``) hold with curves too; on top of them: the hull is
right (vectorised vs a scalar monotone chain), an affine curve gives the slope model's plan, a convex curve moves
less work than the single-slope model when the carbon spread is small, a convex plan never emits more (true curve)
than the flat plan with lambda_p = 0, the fill formulation has the optimum of a plain epigraph LP, and the campus
contract holds under the true curve even when the curve is not convex.
"""
from __future__ import annotations

import dataclasses
import math

import cvxpy as cp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cicm.optimize import CampusInput, ClusterInput, PowerCurve, campus_targets, plan_campus
from cicm.optimize import program as P
from cicm.optimize.curves import CurveTable, lower_hulls

from test_optimize import RTOL, _ciso_days, check_invariants, make_cluster

SHAPES = ("convex", "nonconvex", "affine", "collinear")


def with_twins(curve: PowerCurve, rng: np.random.Generator) -> PowerCurve:
    """The same curve with some breakpoints doubled one ulp apart, as fit_cluster_power's curves have them (one
    knot per power domain, the domains' hinges at the same load)."""
    x, y = list(curve.cpu_cores), list(curve.power_kw)
    for i in sorted(rng.choice(np.arange(1, len(x) - 1), size=min(2, len(x) - 2), replace=False), reverse=True):
        x.insert(i + 1, np.nextafter(x[i], np.inf))
        y.insert(i + 1, y[i])
    return PowerCurve(np.array(x), np.array(y))


def make_curve(rng: np.random.Generator, x_max: float, shape: str) -> PowerCurve:
    """A power curve on [0, x_max] (extended linearly beyond): idle 20-50% of its top, 3-9 breakpoints."""
    n = int(rng.integers(3, 10))
    x = np.r_[0.0, np.sort(rng.uniform(0.02, 0.98, n - 2)) * x_max, x_max]
    x = np.unique(x)
    idle = float(rng.uniform(5, 50))
    top = idle / rng.uniform(0.2, 0.5)
    slopes = rng.uniform(0.2, 2.0, x.size - 1)
    if shape == "convex":
        slopes = np.sort(slopes)
    elif shape in ("affine", "collinear"):
        slopes = np.full(x.size - 1, slopes[0])
        if shape == "affine":
            x = x[[0, -1]]
            slopes = slopes[:1]
    y = idle + np.r_[0.0, np.cumsum(slopes * np.diff(x))]
    y = idle + (y - idle) / (y[-1] - idle) * (top - idle)
    return PowerCurve(x, y)


def with_curve(c: ClusterInput, rng: np.random.Generator, shape: str) -> ClusterInput:
    """The same cluster with a power curve over a range that covers what its plan can reach."""
    f = c.flexible_core_hours / c.hours
    x_max = float(np.max(np.maximum(c.inflexible_cpu_cores, c.inflexible_upper_cpu_cores)) + 4 * f * 1.5) + 1.0
    curve = make_curve(rng, x_max, shape)
    if shape != "affine" and rng.random() < 0.3:
        curve = with_twins(curve, rng)
    return dataclasses.replace(c, nominal_power_kw=None, slope_kw_per_core=None, power_curve=curve)


# ---------------------------------------------------------------------------------------------------------------
# The hull and the packed curves.


def _scalar_hull(x, y):
    keep = []
    for i in range(len(x)):
        while len(keep) >= 2:
            o, a = keep[-2], keep[-1]
            if (x[a] - x[o]) * (y[i] - y[o]) - (y[a] - y[o]) * (x[i] - x[o]) > 1e-12 * abs(y).max() * (x[-1] - x[0]):
                break
            keep.pop()
        keep.append(i)
    return np.array(keep)


@settings(deadline=None, max_examples=60)
@given(st.integers(0, 2**32 - 1))
def test_packed_curves_and_hulls_match_the_scalar_ones(seed):
    rng = np.random.default_rng(seed)
    curves = [make_curve(rng, float(rng.uniform(100, 5000)), str(rng.choice(SHAPES))) for _ in range(7)]
    curves = [with_twins(c, rng) if c.cpu_cores.size > 2 and rng.random() < 0.4 else c for c in curves]
    curves.insert(3, None)  # a linear cluster's row
    table = CurveTable.pack(curves)
    x_max = np.array([1.0 if c is None else c.cpu_cores[-1] for c in curves])
    u = rng.uniform(-0.2, 1.2, (len(curves), 30)) * x_max[:, None]  # also beyond both ends
    got = table(u)
    for i, c in enumerate(curves):
        if c is not None:
            np.testing.assert_allclose(got[i], c(u[i]), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(table.slope_at(u)[i], c.slope_at(u[i]), rtol=1e-12)
    lo = rng.uniform(-0.1, 0.5, len(curves)) * x_max
    hi = lo + rng.uniform(0.01, 0.9, len(curves)) * x_max
    hulls = lower_hulls(table, lo, hi, convex_rtol=1e-9)
    for i, c in enumerate(curves):
        a, b = hulls.a[hulls.start[i]:hulls.start[i + 1]], hulls.b[hulls.start[i]:hulls.start[i + 1]]
        if c is None:
            assert a.size == 0
            continue
        xs = np.r_[lo[i], c.cpu_cores[(c.cpu_cores > lo[i]) & (c.cpu_cores < hi[i])], hi[i]]
        ys = c(xs)
        keep = _scalar_hull(xs, ys)
        assert a.size == keep.size - 1
        np.testing.assert_allclose(hulls.x0[hulls.start[i]:hulls.start[i + 1]], xs[keep][:-1])
        assert (np.diff(b) > 0).all() and (np.abs(b) < 1e6).all()  # convex: slopes strictly increase
        grid = np.linspace(lo[i], hi[i], 400)
        hull = np.max(a[None, :] + b[None, :] * grid[:, None], axis=1)
        true = c(grid)
        scale = np.abs(true).max()
        assert (hull <= true + 1e-9 * scale).all()  # a lower bound of the curve...
        np.testing.assert_allclose(hull[[0, -1]], true[[0, -1]], rtol=1e-9)  # ...touching it at the ends
        gap = float(np.max(ys - np.max(a[None, :] + b[None, :] * xs[:, None], axis=1)))
        assert hulls.gap[i] == pytest.approx(gap if gap > 1e-9 * np.abs(ys).max() else 0.0, abs=1e-9 * scale)
        if (np.diff(np.diff(ys) / np.diff(xs)) >= -1e-12).all():
            assert hulls.gap[i] == 0.0  # convex on the range: the hull is the curve
            np.testing.assert_allclose(hull, true, rtol=1e-9)


def test_a_convex_fitted_curve_with_twin_breakpoints_is_its_own_hull():
    """Regression: fit_cluster_power's curve of the demo cluster ml-b on 2022-06-15 (twin knots one ulp apart,
    convex). Judging both twins against each other dropped both, and the hull became the chord."""
    x = np.array([0.0, 23769.680702, 35446.453801, np.nextafter(35446.453801, np.inf), 47123.226901,
                  np.nextafter(47123.226901, np.inf), 58800.0])
    y = np.array([72.049034, 96.476667, 108.476656, 108.476656, 128.079928, 128.079928, 150.865547])
    curve = PowerCurve(x, y)
    hulls = lower_hulls(CurveTable.pack([curve]), np.array([23567.35]), np.array([56046.13]), convex_rtol=1e-9)
    assert hulls.gap[0] == 0.0 and hulls.a.size == 3
    grid = np.linspace(23567.35, 56046.13, 200)
    np.testing.assert_allclose(np.max(hulls.a + hulls.b * grid[:, None], axis=1), curve(grid), rtol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Every plan with curves keeps the guarantees.


@st.composite
def curve_campuses(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    h = draw(st.sampled_from([23, 24, 25]))
    n = draw(st.integers(1, 4))
    clusters = []
    for i in range(n):
        c = make_cluster(rng, h, name=f"c{i}", flat=draw(st.booleans()), roomy=rng.random() < 0.3)
        kind = draw(st.sampled_from(("linear",) + SHAPES))
        clusters.append(c if kind == "linear" else with_curve(c, rng, kind))
    if draw(st.booleans()):
        i = draw(st.integers(0, n - 1))
        clusters[i] = dataclasses.replace(clusters[i], fallback_reason="slo-feedback")
    eta = rng.uniform(50, 800, h) if draw(st.booleans()) else np.round(rng.uniform(50, 800, h), -2)
    probe = CampusInput(clusters=clusters, carbon_gco2_per_kwh=eta)
    flat_peaks = float(campus_targets(probe)["flat_peak_kw"].sum())
    contract = draw(st.sampled_from([math.inf, math.inf, 0.5, 0.98, 1.0, 1.02, 1.2])) * flat_peaks
    return CampusInput(
        clusters=clusters, carbon_gco2_per_kwh=eta, contract_limit_kw=contract,
        lambda_e=draw(st.sampled_from([1.0, 1.0, 3.0, 0.0])), lambda_p=draw(st.sampled_from([0.0, 0.0, 0.1, 10.0])),
        delta_min=draw(st.sampled_from([-1.0, -1.0, -0.5, 0.0])),
        delta_max=draw(st.sampled_from([1.0, 1.0, 0.5, 3.0, 0.0])),
        ramp_limit=draw(st.sampled_from([None, None, 0.05, 0.3])),
        solver=draw(st.sampled_from(["HIGHS", "CLARABEL"])),
    )


@settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.too_slow])
@given(curve_campuses())
def test_every_plan_with_curves_keeps_the_guarantees(campus):
    plan = plan_campus(campus)
    check_invariants(campus, plan)
    prep = P._prepare(campus)
    delta = np.stack([plan.hourly[plan.hourly["cluster"] == c.name].sort_values("hour_index")["delta"].to_numpy()
                      for c in campus.clusters])
    model = P._model_power(prep, np.arange(len(campus.clusters)), delta)
    true = P._true_power(prep, delta)
    scale = np.maximum(np.abs(true).max(axis=1, keepdims=True), 1.0)
    # The LP's power is the curve's hull: never above the true curve, equal to it when the curve is convex there.
    assert (model <= true + 1e-9 * scale).all()
    exact = np.array([m != P.POWER_CURVE_HULL for m in prep.power_model])
    np.testing.assert_allclose(model[exact], true[exact], rtol=1e-9, atol=1e-9)
    for i, c in enumerate(campus.clusters):
        if c.power_curve is None:
            assert prep.power_model[i] == P.POWER_LINEAR
        elif c.power_curve.cpu_cores.size == 2 or (np.diff(np.diff(c.power_curve.power_kw)
                                                            / np.diff(c.power_curve.cpu_cores)) >= -1e-12).all():
            assert prep.power_model[i] == P.POWER_CURVE_CONVEX
    # Per cluster with lambda_p = 0 and no contract (clusters independent): a curve that is convex over the range
    # never gives more carbon than the flat plan, under the true curve.
    if campus.lambda_p == 0 and not math.isfinite(campus.contract_limit_kw):
        cl = plan.clusters
        ok = (cl["status"] == "shaped") & (cl["power_model"] != P.POWER_CURVE_HULL)
        if ok.any():
            assert (cl.loc[ok, "expected_kgco2"] <= cl.loc[ok, "flat_kgco2"] * (1 + RTOL) + RTOL).all()


# ---------------------------------------------------------------------------------------------------------------
# What the curve changes.


def _flat_cluster(n_hours=24, **kw):
    base = dict(name="c0", inflexible_cpu_cores=np.full(n_hours, 1000.0),
                inflexible_upper_cpu_cores=np.full(n_hours, 1050.0), flexible_core_hours=24 * 400.0,
                reservations_core_hours=24 * 1400.0 * 1.5, reservation_ratio=np.full(n_hours, 1.5),
                reservations_rel_error_q97=0.0, capacity_cores=1e6, power_capped_capacity_cores=np.inf)
    base.update(kw)
    return ClusterInput(**base)


def _as_linear(c: ClusterInput, campus_kw=None) -> ClusterInput:
    """The single-slope model of a curve cluster, as the program used it before curves were modelled: nominal
    power = the curve at U_nom, slope = the curve's slope at the day's mean U_nom."""
    prep = P._prepare(CampusInput(clusters=[c], carbon_gco2_per_kwh=np.full(c.hours, 100.0), **(campus_kw or {})))
    u_nom = c.inflexible_cpu_cores + prep.f[0]
    return dataclasses.replace(c, power_curve=None, nominal_power_kw=c.power_curve(u_nom),
                               slope_kw_per_core=float(c.power_curve.slope_at(u_nom.mean())))


@pytest.mark.parametrize("solver", ["HIGHS", "CLARABEL"])
def test_convex_curve_moves_less_work_than_the_single_slope_model(solver):
    """U_nom sits at a kink of a strictly convex curve (0.5 kW per 100 cores below, 1.5 above) and the carbon
    spread is small (+-3%): moving work to cleaner hours costs more energy than it saves carbon, so the curve
    plan stays flat while the single-slope model shifts everything it can; under the true curve that shift
    *raises* carbon (the backtests' finding)."""
    h = np.arange(24)
    eta = 300 + 9 * np.sin(2 * np.pi * h / 24)
    c = _flat_cluster(power_curve=PowerCurve([0.0, 1400.0, 4000.0], [40.0, 47.0, 86.0]))
    assert P._prepare(CampusInput(clusters=[c], carbon_gco2_per_kwh=eta)).f[0] == pytest.approx(400.0)
    curve_plan = plan_campus(CampusInput(clusters=[c], carbon_gco2_per_kwh=eta, solver=solver))
    lin = _as_linear(c)
    lin_plan = plan_campus(CampusInput(clusters=[lin], carbon_gco2_per_kwh=eta, solver=solver))
    d_curve, d_lin = curve_plan.hourly["delta"].to_numpy(), lin_plan.hourly["delta"].to_numpy()
    assert np.abs(d_curve).max() <= 1e-6
    assert np.abs(d_lin).sum() > 10  # the slope model moves (almost) all of it
    row = curve_plan.clusters.iloc[0]
    assert row["power_model"] == P.POWER_CURVE_CONVEX and row["expected_kgco2"] == pytest.approx(row["flat_kgco2"])
    # The single-slope plan, charged on the true curve, emits more than flat.
    flex = (1 + d_lin) * 400.0
    true_lin = float((c.power_curve(1000.0 + flex) * eta).sum() / 1000)
    assert true_lin > row["flat_kgco2"] * 1.01


@pytest.mark.parametrize("solver", ["HIGHS", "CLARABEL"])
def test_convex_curve_with_a_wider_spread_still_shifts_but_less(solver):
    """A gentler kink (0.9 vs 1.1) and a wide carbon spread: the curve plan shifts work, less than the slope
    model's all-or-nothing plan, and saves true carbon; the slope model's plan saves less under the true curve."""
    rng = np.random.default_rng(3)
    eta = rng.uniform(100, 600, 24)
    c = _flat_cluster(power_curve=PowerCurve([0.0, 1400.0, 4000.0], [40.0, 52.6, 81.2]))
    plan = plan_campus(CampusInput(clusters=[c], carbon_gco2_per_kwh=eta, solver=solver))
    lin_plan = plan_campus(CampusInput(clusters=[_as_linear(c)], carbon_gco2_per_kwh=eta, solver=solver))
    d_curve, d_lin = plan.hourly["delta"].to_numpy(), lin_plan.hourly["delta"].to_numpy()
    assert 0 < np.abs(d_curve).sum() < np.abs(d_lin).sum()
    row = plan.clusters.iloc[0]
    true_lin = float((c.power_curve(1000.0 + (1 + d_lin) * 400.0) * eta).sum() / 1000)
    assert row["expected_kgco2"] < row["flat_kgco2"] and row["expected_kgco2"] <= true_lin + 1e-9


@pytest.mark.parametrize("solver", ["HIGHS", "CLARABEL"])
@pytest.mark.parametrize("shape", ["affine", "collinear"])
@pytest.mark.parametrize("lambda_p, headroom", [(0.0, math.inf), (0.1, math.inf), (0.1, 1.0)])
def test_an_affine_curve_gives_the_slope_models_plan(solver, shape, lambda_p, headroom):
    rng = np.random.default_rng(12)
    eta = rng.uniform(50, 800, 24)
    base = [make_cluster(rng, name=f"c{i}", roomy=True) for i in range(3)]
    curved = [with_curve(c, rng, shape) for c in base]
    linear = [_as_linear(c) for c in curved]
    contract = headroom * float(campus_targets(CampusInput(clusters=linear, carbon_gco2_per_kwh=eta))
                                ["flat_peak_kw"].sum())
    kw = dict(carbon_gco2_per_kwh=eta, lambda_p=lambda_p, contract_limit_kw=contract, solver=solver)
    a, b = plan_campus(CampusInput(clusters=curved, **kw)), plan_campus(CampusInput(clusters=linear, **kw))
    assert (a.clusters["power_model"] == P.POWER_CURVE_CONVEX).all()
    assert (campus_targets(CampusInput(clusters=curved, carbon_gco2_per_kwh=eta))["hull_segments"] == 1).all()
    np.testing.assert_allclose(a.hourly["delta"], b.hourly["delta"], atol=1e-6)
    for col in ("power_kw", "carbon_kgco2", "vcc_cores"):
        np.testing.assert_allclose(a.hourly[col], b.hourly[col], rtol=1e-7, atol=1e-7)
    for col in ("expected_kgco2", "flat_kgco2", "peak_kw", "flexible_saving_pct"):
        np.testing.assert_allclose(a.clusters[col], b.clusters[col], rtol=1e-7, atol=1e-6)


@settings(deadline=None, max_examples=25)
@given(st.integers(0, 2**32 - 1), st.sampled_from([23, 24, 25]), st.sampled_from(["HIGHS", "CLARABEL"]),
       st.booleans())
def test_flat_carbon_and_flat_load_give_a_flat_plan_with_convex_curves(seed, n_hours, solver, with_peak):
    """Flat carbon, flat inflexible load: by convexity (Jensen) no shift lowers power, so delta = 0."""
    rng = np.random.default_rng(seed)
    clusters = [with_curve(make_cluster(rng, n_hours, name=f"c{i}", roomy=True, flat=True), rng, "convex")
                for i in range(3)]
    campus = CampusInput(clusters=clusters, carbon_gco2_per_kwh=np.full(n_hours, rng.uniform(10, 900)),
                         lambda_p=1.0 if with_peak else 0.0, solver=solver)
    plan = plan_campus(campus)
    check_invariants(campus, plan)
    assert (plan.clusters["status"] == "shaped").all()
    assert plan.hourly["delta"].abs().max() <= 1e-6


@pytest.mark.parametrize("solver", ["HIGHS", "CLARABEL"])
def test_flat_carbon_with_a_diurnal_load_fills_the_valley(solver):
    """With a convex curve and a varying inflexible load, flat carbon is not a reason to stay flat: moving
    flexible work into the low-load hours lowers the day's energy (and carbon), and the plan does so."""
    h = np.arange(24)
    u = 1000.0 * (1 + 0.3 * np.cos(2 * np.pi * (h - 14) / 24))
    c = _flat_cluster(inflexible_cpu_cores=u, inflexible_upper_cpu_cores=u * 1.05,
                      power_curve=PowerCurve([0.0, 1000.0, 1400.0, 1800.0, 4000.0], [40, 45, 48, 52, 80]))
    plan = plan_campus(CampusInput(clusters=[c], carbon_gco2_per_kwh=np.full(24, 300.0), solver=solver))
    d = plan.hourly["delta"].to_numpy()
    row = plan.clusters.iloc[0]
    assert row["expected_kgco2"] < row["flat_kgco2"] * (1 - 1e-4)
    assert d[np.argmin(u)] > 0 > d[np.argmax(u)]


@settings(deadline=None, max_examples=30)
@given(st.integers(0, 2**32 - 1), st.sampled_from([23, 24, 25]), st.sampled_from(["HIGHS", "CLARABEL"]),
       st.sampled_from([(-1.0, 1.0), (-0.5, 0.5), (-0.3, 2.0)]), st.booleans())
def test_cleaner_hour_never_gets_less_flexible_work_with_convex_curves(seed, n_hours, solver, bounds, ties):
    """Flat load and equal bounds in every hour: swapping two hours' flexible work never lowers power, so a
    cleaner hour never gets less (a convex curve only damps the shift)."""
    rng = np.random.default_rng(seed)
    eta = rng.uniform(20, 900, n_hours)
    if ties:
        eta = np.round(eta, -2)
    clusters = [with_curve(make_cluster(rng, n_hours, name=f"c{i}", flat=True, roomy=rng.random() < 0.5), rng,
                           "convex") for i in range(2)]
    campus = CampusInput(clusters=clusters, carbon_gco2_per_kwh=eta, lambda_p=float(rng.choice([0.0, 0.5])),
                         delta_min=bounds[0], delta_max=bounds[1], solver=solver)
    plan = plan_campus(campus)
    check_invariants(campus, plan)
    for name, hh in plan.hourly.groupby("cluster"):
        flex = hh.sort_values("hour_index")["flexible_cpu_cores"].to_numpy()
        scale = max(flex.max(), 1.0)
        cleaner = eta[:, None] < eta[None, :]
        assert (flex[:, None] >= flex[None, :] - 1e-6 * scale)[cleaner].all()


def _specpower_like(capacity: float) -> PowerCurve:
    """A SPECpower-shaped server curve (steeper at high load), convex above 10% load."""
    x = np.linspace(0.0, capacity, 11)
    incr = np.r_[2.0, np.linspace(0.6, 1.9, 9)]
    y = 30.0 + np.r_[0.0, np.cumsum(incr / incr.sum() * 70.0)]
    return PowerCurve(x, y)


def test_on_real_carbon_a_convex_curve_plan_never_emits_more_than_flat():
    """CISO 2022, every 7th day, lambda_p = 0: under the true (SPECpower-like) curve the curve plan's carbon never
    exceeds the flat plan's; the single-slope plan of the same cluster does on some days."""
    days = _ciso_days()[::7]
    c = _flat_cluster(inflexible_cpu_cores=np.full(24, 2000.0), inflexible_upper_cpu_cores=np.full(24, 2100.0),
                      flexible_core_hours=24 * 1200.0, reservations_core_hours=24 * 3200.0 * 1.5,
                      capacity_cores=6000.0 * 1.5, power_capped_capacity_cores=6000.0,
                      power_curve=_specpower_like(6000.0))
    lin = _as_linear(c)
    worse = 0
    for v in days:
        eta = v.to_numpy()
        row = plan_campus(CampusInput(clusters=[c], carbon_gco2_per_kwh=eta, lambda_p=0.0)).clusters.iloc[0]
        assert row["status"] == "shaped" and row["power_model"] == P.POWER_CURVE_CONVEX
        assert row["expected_kgco2"] <= row["flat_kgco2"] * (1 + 1e-9)
        d = plan_campus(CampusInput(clusters=[lin], carbon_gco2_per_kwh=eta, lambda_p=0.0)).hourly["delta"]
        true_lin = float((c.power_curve(2000.0 + (1 + d.to_numpy()) * 1200.0) * eta).sum() / 1000)
        assert row["expected_kgco2"] <= true_lin * (1 + 1e-9)
        worse += true_lin > row["flat_kgco2"]
    assert worse > 0


# ---------------------------------------------------------------------------------------------------------------
# Non-convex curves: the hull is a lower bound; what the plan reports is the truth, and the contract holds.


def test_non_convex_curve_reports_the_true_curve_and_keeps_the_contract():
    rng = np.random.default_rng(21)
    eta = rng.uniform(100, 700, 24)
    curve = PowerCurve([0.0, 1100.0, 1300.0, 1600.0, 4000.0], [40.0, 50.0, 53.5, 54.5, 80.0])  # a bump
    clusters = [_flat_cluster(name=f"c{i}", power_curve=curve) for i in range(3)]
    targets = campus_targets(CampusInput(clusters=clusters, carbon_gco2_per_kwh=eta))
    assert (targets["power_model"] == P.POWER_CURVE_HULL).all() and (targets["hull_gap_kw"] > 0.1).all()
    flat_peaks = float(targets["flat_peak_kw"].sum())
    for solver in ("HIGHS", "CLARABEL"):
        campus = CampusInput(clusters=clusters, carbon_gco2_per_kwh=eta, contract_limit_kw=flat_peaks * 1.03,
                             lambda_p=0.0, solver=solver)
        plan = plan_campus(campus)
        check_invariants(campus, plan)  # incl. the contract on the true peaks
        assert (plan.clusters["status"] == "shaped").all() and plan.contract_ok
        hh = plan.hourly[plan.hourly["cluster"] == "c0"]
        np.testing.assert_allclose(hh["power_kw"], curve(1000.0 + hh["flexible_cpu_cores"].to_numpy()))
        # Without a contract the plan may use the hull's optimism; what it reports is still the true curve.
        free = plan_campus(dataclasses.replace(campus, contract_limit_kw=math.inf))
        hh = free.hourly[free.hourly["cluster"] == "c0"]
        np.testing.assert_allclose(hh["carbon_kgco2"], curve(1000.0 + hh["flexible_cpu_cores"].to_numpy())
                                   * eta / 1000)


# ---------------------------------------------------------------------------------------------------------------
# The fill formulation has the optimum of the plain epigraph LP.


def _epigraph_optimum(campus: CampusInput) -> float:
    """min lambda_e*sum eta*p/1000 + lambda_p*sum y over delta, with p >= a_k + b_k*u for every hull segment k:
    the textbook epigraph, one cluster at a time, no tie-break (clusters independent: no contract)."""
    prep = P._prepare(campus)
    total = 0.0
    for i in range(len(campus.clusters)):
        lo, hi = prep.seg_start[i], prep.seg_start[i + 1]
        a, b = prep.seg_a[lo:hi], prep.seg_b[lo:hi]
        d = cp.Variable(prep.n_hours)
        p = cp.Variable(prep.n_hours)
        y = cp.Variable()
        u = prep.u[i] + (1 + d) * prep.f[i]
        cons = [cp.sum(d) == 0, d >= campus.delta_min, d <= prep.hi[i], y >= p,
                cp.sum(cp.multiply(prep.r[i] * prep.f[i], d)) >= prep.need[i]]
        cons += [p >= a[k] + b[k] * u for k in range(a.size)]
        if campus.ramp_limit is not None:
            cons += [cp.abs(cp.diff(d)) <= campus.ramp_limit]
        prob = cp.Problem(cp.Minimize(campus.lambda_e * prep.eta @ p / 1000 + campus.lambda_p * y), cons)
        prob.solve(solver="HIGHS")
        total += prob.value
    return total


@settings(deadline=None, max_examples=30)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["HIGHS", "CLARABEL"]), st.sampled_from([0.0, 0.1, 2.0]),
       st.sampled_from([None, 0.2]), st.sampled_from([(-1.0, 1.0), (-0.5, 3.0)]))
def test_the_fill_formulation_matches_the_epigraph(seed, solver, lambda_p, ramp, bounds):
    rng = np.random.default_rng(seed)
    eta = rng.uniform(50, 800, 24)
    clusters = [with_curve(make_cluster(rng, name=f"c{i}", roomy=rng.random() < 0.5), rng, "convex")
                for i in range(3)]
    campus = CampusInput(clusters=clusters, carbon_gco2_per_kwh=eta, lambda_p=lambda_p, ramp_limit=ramp,
                         delta_min=bounds[0], delta_max=bounds[1], solver=solver)
    plan = plan_campus(campus)
    if (plan.clusters["status"] != "shaped").any():
        return  # too full or infeasible alone: nothing to compare
    want = _epigraph_optimum(campus)
    got = plan.objective  # the true curve at the plan = its hull (convex), peaks included
    # The plan is the epigraph's optimum up to the tie-break (which may cost ~1e-5 of the shifted carbon).
    assert want * (1 - 1e-7) - 1e-6 <= got <= want * (1 + 1e-5) + 1e-6


def test_a_curve_cluster_infeasible_on_its_own_does_not_sink_the_campus():
    """The elastic feasibility LP works on fill variables too (a forced dip plus a tight ramp)."""
    rng = np.random.default_rng(4)
    good = with_curve(make_cluster(rng, name="good", roomy=True), rng, "convex")
    tight = with_curve(make_cluster(rng, name="tight", roomy=True, flat=True), rng, "convex")
    f = P._prepare(CampusInput(clusters=[tight], carbon_gco2_per_kwh=np.full(24, 100.0))).f[0]
    pcc = np.full(24, np.inf)
    pcc[0] = float(np.max(tight.inflexible_upper_cpu_cores)) + 0.4 * f  # delta(0) <= -0.6
    tight = dataclasses.replace(tight, power_capped_capacity_cores=pcc)
    for solver in ("HIGHS", "CLARABEL"):
        campus = CampusInput(clusters=[good, tight], carbon_gco2_per_kwh=200 + 150 * np.sin(np.arange(24) / 4),
                             ramp_limit=0.01, solver=solver, contract_limit_kw=1e9)
        plan = plan_campus(campus)
        check_invariants(campus, plan)
        assert list(plan.clusters["status"]) == ["shaped", "fallback"]
        assert plan.clusters.loc[1, "reason"] == "infeasible"
        # Without the ramp the dip is just a bound, and the curve cluster is shaped within it.
        free = dataclasses.replace(campus, ramp_limit=None)
        plan = plan_campus(free)
        check_invariants(free, plan)
        assert list(plan.clusters["status"]) == ["shaped", "shaped"]
        assert plan.hourly[plan.hourly["cluster"] == "tight"]["delta"].iloc[0] <= -0.6 + 1e-7
