"""The VCC program: one batched linear program per campus (all its clusters, H hours).

Notation (per cluster c, hour h of the H-hour local day; see docs/optimizer.md for the full derivation):

- Theta = T_R * (1 + q97)                         capacity requirement, reservation core-hours
- alpha s.t. sum_h (U_IF(h) + alpha*T_UF/H) * R(h) = Theta, then alpha := max(alpha, 1);  tau = alpha * T_UF
- M(h) = max(U_IF(h), U_IF_upper(h))              inflexible usage the cap must always admit
- VCC(h) = (M(h) + (1 + delta(h)) * tau/H) * R(h) reservation cores
- power(h) = P_c(U_nom(h)) + pi_c * delta(h) * tau/H,  U_nom = U_IF + tau/H

LP (variables delta in R^{C x H}, y in R^C):
  min  lambda_e * sum eta(h) * power(c,h) / 1000  +  lambda_p * sum_c y(c)  (+ a tiny L1 tie-break on delta)
  s.t. sum_h delta(c,h) = 0
       delta_min <= delta(c,h) <= delta_max
       (1+delta)*tau/H <= power_capped_capacity(h) - M(h)
       VCC(c,h) <= capacity(h)
       sum_h VCC(c,h) >= Theta                         (coverage; redundant when R is flat)
       y(c) >= power(c,h)                              (only if lambda_p > 0 or the contract is finite)
       sum_c y(c) <= contract_limit - sum of the flat peaks of fallback clusters
       |delta(c,h) - delta(c,h-1)| <= ramp_limit       (optional)

Everything is built from (C, H) numpy arrays into one cvxpy problem with matrix variables; there are no per-cluster
Python loops. An infeasible campus costs at most two more batched LPs per round: min sum of peaks without the
contract (is it the contract?) and an elastic LP (which clusters are infeasible on their own?).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import cvxpy as cp
import numpy as np
import pandas as pd

from cicm.optimize.fallback import (
    REASON_INFEASIBLE,
    REASON_NO_FLEXIBLE_WORK,
    REASON_SOLVER_ERROR,
    REASON_TOO_FULL,
    STATUS_FALLBACK,
    STATUS_SHAPED,
    too_full_reasons,
)
from cicm.optimize.inputs import CampusInput

#: Relative size of the L1 tie-break on delta, as a fraction of each cluster's objective change per unit delta.
#: It breaks ties towards the flat plan (flat carbon => delta = 0) and creates a dead band: work moves between two
#: hours only when their carbon intensities differ by more than ~2 * TIE_BREAK relative.
TIE_BREAK = 1e-5

#: Options per solver. Clarabel's duality-gap tolerance is tightened from 1e-8: with an interior-point method the
#: tie-break only pins delta to within ~gap/tie, and 1e-11 keeps a flat-carbon plan flat to ~1e-7 (costs 1-3
#: iterations). HiGHS' simplex returns a vertex, exact to its feasibility tolerance.
SOLVER_OPTIONS: dict[str, dict] = {"CLARABEL": {"tol_gap_abs": 1e-11, "tol_gap_rel": 1e-11}}

#: Relative tolerance of the post-solve checks of a solution (the tests check invariants at 1e-6).
CHECK_RTOL = 1e-7

HOURLY_COLUMNS = [
    "campus", "cluster", "hour_index", "hour", "status", "delta", "vcc_cores", "flexible_cpu_cores",
    "inflexible_cpu_cores", "inflexible_upper_cpu_cores", "power_kw", "carbon_gco2_per_kwh", "carbon_kgco2",
]
CLUSTER_COLUMNS = [
    "campus", "cluster", "status", "reason", "reason_detail", "theta_core_hours", "tau_core_hours", "alpha",
    "expected_kgco2", "flat_kgco2", "saving_pct", "flexible_saving_pct", "peak_kw", "flat_peak_kw",
]


@dataclass(frozen=True, eq=False)
class CampusPlan:
    """The plan of one campus for one day.

    - ``hourly``: tidy frame, one row per (cluster, hour), columns :data:`HOURLY_COLUMNS`. ``vcc_cores`` is the
      cap in reservation cores; ``flexible_cpu_cores`` the planned flexible usage (1+delta)*tau/H;
      ``inflexible_cpu_cores`` the forecast U_IF; ``power_kw`` the planned power; ``carbon_kgco2`` its emissions
      over the hour at the forecast intensity. ``hour`` is the passed-through timestamp (NaT if none was given).
    - ``clusters``: one row per cluster, columns :data:`CLUSTER_COLUMNS`. ``reason`` is ``None`` for shaped
      clusters; ``saving_pct`` is the cut in the cluster's whole expected carbon vs the flat plan (delta = 0);
      ``flexible_saving_pct`` the cut in the carbon of its flexible work alone (pi*(1+delta)*tau/H), the figure
      comparable to the DESIGN ceiling table.
    - ``solver``: the cvxpy solver used (``"none"`` if no LP was needed).
    - ``lp_status``: ``"optimal"``, ``"no-lp"`` (nothing to shape), ``"infeasible"``, ``"solver-error"``.
    - ``objective``: lambda_e * (campus kgCO2) + lambda_p * (sum of cluster peaks, kW) of the whole plan, fallback
      clusters at their flat values (without the tie-break term).
    - ``solve_seconds``: wall time in cvxpy (building, canonicalising and solving) summed over all solves;
      ``plan_seconds``: wall time of the whole :func:`plan_campus` call.
    - ``campus_peak_kw``: sum over clusters of each cluster's planned peak; ``contract_ok`` whether it is within
      the contract; ``message``: campus-level notes (empty if none).
    """

    campus: str
    hourly: pd.DataFrame
    clusters: pd.DataFrame
    solver: str
    lp_status: str
    objective: float
    solve_seconds: float
    plan_seconds: float
    campus_peak_kw: float
    contract_limit_kw: float
    contract_ok: bool
    message: str = ""


# --------------------------------------------------------------------------------------------------------------
# Preparation: stack the inputs into (C, H) arrays and derive Theta, alpha, tau, bounds.


@dataclass
class _Prep:
    names: list[str]
    n_hours: int
    eta: np.ndarray  # (H,)
    u: np.ndarray  # (C,H) U_IF
    u_upper: np.ndarray  # (C,H) upper quantile as given
    m: np.ndarray  # (C,H) max(U_IF, upper)
    r: np.ndarray  # (C,H)
    cap: np.ndarray  # (C,H)
    nom: np.ndarray  # (C,H) P_c(U_nom)
    slope: np.ndarray  # (C,)
    theta: np.ndarray  # (C,)
    alpha: np.ndarray  # (C,)
    tau: np.ndarray  # (C,)
    f: np.ndarray  # (C,) tau / H
    k: np.ndarray  # (C,) slope * tau / H  (kW per unit delta)
    hi: np.ndarray  # (C,H) upper bound of delta
    need: np.ndarray  # (C,) sum_h R*f*delta >= need  (coverage)
    reason: list = field(default_factory=list)
    detail: list = field(default_factory=list)


def _prepare(campus: CampusInput) -> _Prep:
    cl = campus.clusters
    n_h = campus.n_hours
    u = np.stack([c.inflexible_cpu_cores for c in cl])
    u_up = np.stack([c.inflexible_upper_cpu_cores for c in cl])
    m = np.maximum(u, u_up)
    r = np.stack([c.reservation_ratio for c in cl])
    cap = np.stack([np.broadcast_to(c.capacity_cores, (n_h,)) for c in cl]).astype(float)
    pcc = np.stack([np.broadcast_to(c.power_capped_capacity_cores, (n_h,)) for c in cl]).astype(float)
    t_uf = np.array([c.flexible_core_hours for c in cl])
    t_r = np.array([c.reservations_core_hours for c in cl])
    q = np.array([c.reservations_rel_error_q97 for c in cl])

    theta = t_r * (1.0 + q)
    base = (u * r).sum(axis=1)
    sum_r = r.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha_raw = np.where(t_uf > 0, (theta - base) / (t_uf / n_h * sum_r), 1.0)
    alpha = np.maximum(alpha_raw, 1.0)  # never plan less flexible work than forecast
    tau = alpha * t_uf
    f = tau / n_h

    nom = np.empty_like(u)
    slope = np.empty(len(cl))
    for i, c in enumerate(cl):  # O(C) scalar work; the curve case needs tau first
        u_nom = u[i] + f[i]
        nom[i] = c.nominal_power_kw if c.power_curve is None else c.power_curve(u_nom)
        if c.slope_kw_per_core is not None:
            slope[i] = c.slope_kw_per_core
        else:
            slope[i] = float(c.power_curve.slope_at(u_nom.mean()))
    k = slope * f

    with np.errstate(divide="ignore", invalid="ignore"):
        fcol = f[:, None]
        hi_power = np.where(fcol > 0, (pcc - m) / fcol - 1.0, np.inf)
        hi_capacity = np.where(fcol > 0, (cap / r - m) / fcol - 1.0, np.inf)
    hi = np.minimum(np.minimum(hi_power, hi_capacity), campus.delta_max)
    need = theta - ((m + f[:, None]) * r).sum(axis=1)

    prep = _Prep(names=[c.name for c in cl], n_hours=n_h, eta=campus.carbon_gco2_per_kwh, u=u, u_upper=u_up, m=m,
                 r=r, cap=cap, nom=nom, slope=slope, theta=theta, alpha=alpha, tau=tau, f=f, k=k, hi=hi, need=need,
                 reason=[None] * len(cl), detail=[None] * len(cl))

    labels = [str(ts) for ts in campus.hours] if campus.hours is not None else None
    full = too_full_reasons(theta=theta, capacity=cap, hi=hi, hi_capacity=hi_capacity,
                            hi_power=hi_power, delta_min=campus.delta_min, hour_labels=labels)
    for i, c in enumerate(cl):
        if c.fallback_reason is not None:
            prep.reason[i] = c.fallback_reason
            prep.detail[i] = c.fallback_detail or "preset by the caller"
        elif t_uf[i] <= 0:
            prep.reason[i] = REASON_NO_FLEXIBLE_WORK
            prep.detail[i] = "forecast flexible usage T_UF is 0: nothing to shape"
        elif full[i] is not None:
            prep.reason[i] = REASON_TOO_FULL
            prep.detail[i] = full[i]
    # Bounds of the candidates are consistent after the pre-check; clamp rounding noise.
    prep.hi = np.maximum(hi, campus.delta_min)
    return prep


# --------------------------------------------------------------------------------------------------------------
# The batched LP.


def _delta_block(prep: _Prep, idx: np.ndarray, campus: CampusInput):
    """delta for clusters ``idx`` with its bounds and ramp rows: (delta expr, |delta| expr, value getter, cons).

    The bounds go to the solver as variable bounds (HiGHS takes them natively: no constraint rows). With HiGHS,
    delta = p - q with p, q >= 0 makes the L1 tie-break |delta| = p + q free of extra rows (up to ~3x faster with
    HiGHS' simplex); Clarabel is faster with cp.abs on a single variable.
    """
    n, n_h = len(idx), prep.n_hours
    hi, dmin = prep.hi[idx], campus.delta_min
    if campus.solver == "HIGHS":
        p = cp.Variable((n, n_h), name="delta_up", bounds=[np.zeros((n, n_h)), np.maximum(hi, 0.0)])
        q = cp.Variable((n, n_h), name="delta_down", bounds=[np.maximum(-hi, 0.0), np.full((n, n_h), -dmin)])
        d, abs_d = p - q, p + q

        def value():
            return None if p.value is None or q.value is None else p.value - q.value
    else:
        v = cp.Variable((n, n_h), name="delta", bounds=[np.full((n, n_h), dmin), hi])
        d, abs_d = v, cp.abs(v)

        def value():
            return v.value
    cons = []
    if campus.ramp_limit is not None and n_h > 1:
        dd = d[:, 1:] - d[:, :-1]
        cons += [dd <= campus.ramp_limit, dd >= -campus.ramp_limit]
    return d, abs_d, value, cons


def _run(prob: cp.Problem, solver: str) -> str | None:
    """Solve; return None, or the error text if the solver raised."""
    try:
        with warnings.catch_warnings():  # "solution may be inaccurate": the status says it, and we check
            warnings.simplefilter("ignore", UserWarning)
            prob.solve(solver=solver, **SOLVER_OPTIONS.get(solver, {}))
    except Exception as exc:  # noqa: BLE001 - any solver failure becomes a visible fallback
        return f"{solver}: {type(exc).__name__}: {exc}"
    return None


def _infeasible_alone(prep: _Prep, idx: np.ndarray, campus: CampusInput) -> tuple[str, np.ndarray | None, str,
                                                                                  float]:
    """Which clusters of ``idx`` have no feasible delta on their own? One batched elastic LP.

    After the pre-checks every cluster's box [delta_min, hi] is non-empty and delta = delta_min satisfies box and
    ramp, so only "sum_h delta = 0" and the coverage row can conflict with them. Both get non-negative slacks
    (the sum in units of delta, the coverage relative to Theta); a cluster is infeasible alone iff its minimal
    total slack is positive. Returns (status "optimal" | "error", bool mask or None, message, seconds).
    """
    t0 = time.perf_counter()
    n = len(idx)
    d, _, _, cons = _delta_block(prep, idx, campus)
    s_up, s_dn, s_cov = (cp.Variable(n, nonneg=True) for _ in range(3))
    theta = np.maximum(prep.theta[idx], 1.0)
    rk = prep.r[idx] * prep.f[idx][:, None] / theta[:, None]
    cons += [cp.sum(d, axis=1) + s_up - s_dn == 0,
             cp.sum(cp.multiply(rk, d), axis=1) + s_cov >= prep.need[idx] / theta]
    prob = cp.Problem(cp.Minimize(cp.sum(s_up + s_dn + s_cov)), cons)
    err = _run(prob, campus.solver)
    if err is not None:
        return "error", None, err, time.perf_counter() - t0
    if prob.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or s_up.value is None:
        return "error", None, f"{campus.solver}: status {prob.status!r} in the feasibility check", \
            time.perf_counter() - t0
    slack = s_up.value + s_dn.value + s_cov.value
    return "optimal", slack > 1e-6, "", time.perf_counter() - t0


@dataclass
class _LPResult:
    status: str  # "optimal" | "infeasible" | "error"
    delta: np.ndarray | None
    message: str
    seconds: float


def _solve_lp(prep: _Prep, idx: np.ndarray, campus: CampusInput, *, contract_rhs: float | None, mode: str,
              tie_rel: float) -> _LPResult:
    """Build and solve the LP for clusters ``idx`` (mode "plan": the objective; "peak": minimise the sum of the
    peaks, used to diagnose a contract). ``contract_rhs``: kW available to these clusters' summed peaks, or None."""
    t0 = time.perf_counter()
    n, n_h = len(idx), prep.n_hours
    if contract_rhs is not None and contract_rhs < 0:
        return _LPResult("infeasible", None, "flat peaks of the fallback clusters alone exceed the contract",
                         time.perf_counter() - t0)
    hi = prep.hi[idx]
    r, f, k, nom = prep.r[idx], prep.f[idx], prep.k[idx], prep.nom[idx]
    need = prep.need[idx]
    dmin = campus.delta_min

    d, abs_d, d_value, cons = _delta_block(prep, idx, campus)
    cons.append(cp.sum(d, axis=1) == 0)

    rk = r * f[:, None]
    # Coverage is implied by sum(delta)=0 when R is flat over the day and need <= 0; keep only the other rows.
    flat_r = np.ptp(r, axis=1) <= 1e-12 * r.max(axis=1)
    cov_rows = np.flatnonzero(~(flat_r & (need <= 0)))
    if cov_rows.size:
        cons.append(cp.sum(cp.multiply(rk[cov_rows], d[cov_rows, :]), axis=1) >= need[cov_rows])

    w = campus.lambda_e * prep.eta[None, :] * k[:, None] / 1000.0 if mode == "plan" else np.zeros((n, n_h))
    lam_p = campus.lambda_p if mode == "plan" else 1.0
    need_y = mode == "peak" or (mode == "plan" and (lam_p > 0 or contract_rhs is not None))
    y_scale = np.maximum(np.maximum(nom.max(axis=1), k), 1.0)  # y = y_scale * ys keeps ys ~ 1
    scale = max(float(np.abs(w).max(initial=0.0)), float((lam_p * y_scale).max(initial=0.0)), 1e-300)
    if scale <= 1e-300:
        scale = 1.0
    # Tie-break weight per cluster: tie_rel x the cluster's objective change per unit delta. A cluster whose delta
    # does not move the objective (zero slope, or lambda_e = lambda_p = 0) gets tie_rel x the largest weight, so
    # its delta is still pinned at 0 well above the solver's optimality tolerance.
    per_delta = (np.abs(w).mean(axis=1) + lam_p * k) / scale
    ref = float(per_delta.max(initial=0.0))
    if ref <= 0:
        tie = np.ones(n)  # the tie-break is the whole objective
    else:
        tie = tie_rel * np.where(per_delta > 0, np.maximum(per_delta, 1e-3 * ref), ref)

    obj = cp.sum(cp.multiply(w / scale, d)) + cp.sum(cp.multiply(tie[:, None], abs_d))
    if need_y:
        ys = cp.Variable(n, name="peak_scaled")
        cons.append(cp.reshape(ys, (n, 1), order="C") >= nom / y_scale[:, None]
                    + cp.multiply((k / y_scale)[:, None], d))
        if contract_rhs is not None and math.isfinite(contract_rhs):
            cons.append(y_scale @ ys <= contract_rhs)
        if lam_p > 0:
            obj = obj + cp.sum(cp.multiply(lam_p * y_scale / scale, ys))
    prob = cp.Problem(cp.Minimize(obj), cons)
    err = _run(prob, campus.solver)
    if err is not None:
        return _LPResult("error", None, err, time.perf_counter() - t0)
    status = prob.status
    value = d_value()
    if status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) and value is not None:
        delta = np.clip(value, dmin, hi)
        return _LPResult("optimal", delta, status, time.perf_counter() - t0)
    # Every variable is bounded and the objective is bounded below, so 'infeasible or unbounded' is infeasible.
    if isinstance(status, str) and status.startswith("infeasible"):
        return _LPResult("infeasible", None, f"{campus.solver}: {status}", time.perf_counter() - t0)
    return _LPResult("error", None, f"{campus.solver}: status {status!r}, no usable solution",
                     time.perf_counter() - t0)


def _violations(prep: _Prep, idx: np.ndarray, delta: np.ndarray, campus: CampusInput,
                contract_rhs: float | None) -> list[str]:
    """Check a solution against the constraints (relative tolerance CHECK_RTOL); return the violations."""
    out = []
    n_h = prep.n_hours
    tol = CHECK_RTOL
    s = np.abs(delta.sum(axis=1))
    if (s > tol * n_h).any():
        out.append(f"sum_h delta = 0 off by {s.max():.3g}")
    f, r, m = prep.f[idx], prep.r[idx], prep.m[idx]
    vcc = (m + (1 + delta) * f[:, None]) * r
    short = prep.theta[idx] - vcc.sum(axis=1)
    if (short > tol * np.maximum(prep.theta[idx], 1.0)).any():
        out.append(f"sum_h VCC >= Theta short by {short.max():.3g} core-hours")
    if campus.ramp_limit is not None:
        jump = np.abs(np.diff(delta, axis=1)).max(initial=0.0)
        if jump > campus.ramp_limit * (1 + tol) + tol:
            out.append(f"ramp limit exceeded: {jump:.6g} > {campus.ramp_limit:.6g}")
    if contract_rhs is not None and math.isfinite(contract_rhs):
        peaks = (prep.nom[idx] + prep.k[idx][:, None] * delta).max(axis=1).sum()
        if peaks > contract_rhs + tol * max(campus.contract_limit_kw, 1.0):
            out.append(f"contract exceeded: {peaks:.6g} kW > {contract_rhs:.6g} kW")
    return out


# --------------------------------------------------------------------------------------------------------------
# Planning one campus.


def plan_campus(campus: CampusInput, *, tie_break: float = TIE_BREAK) -> CampusPlan:
    """Plan one campus for one day: one batched LP for all its shapeable clusters, with visible fallbacks.

    Never raises for an infeasible or failing program: the affected clusters fall back (full capacity, flat
    flexible plan) with a reason. Raises :class:`cicm.errors.InputError` only for malformed input, and that
    already happens when the :class:`CampusInput` is built.
    """
    if not isinstance(campus, CampusInput):
        from cicm.errors import InputError

        raise InputError("campus", f"must be a CampusInput, got {type(campus).__name__}")
    t_start = time.perf_counter()
    prep = _prepare(campus)
    n_c, n_h = len(prep.names), prep.n_hours
    delta = np.zeros((n_c, n_h))
    limit = campus.contract_limit_kw
    finite_contract = math.isfinite(limit)
    solve_seconds = 0.0
    lp_status = "no-lp"
    messages: list[str] = []
    solver_used = "none"

    def flat_peak_of_fallbacks() -> float:
        fb = [i for i in range(n_c) if prep.reason[i] is not None]
        return float(prep.nom[fb].max(axis=1).sum()) if fb else 0.0

    def mark(ids, reason, detail):
        for i in ids:
            prep.reason[i] = reason
            prep.detail[i] = detail

    cand = np.array([i for i in range(n_c) if prep.reason[i] is None], dtype=int)
    while cand.size:
        solver_used = campus.solver
        rhs = (limit - flat_peak_of_fallbacks()) if finite_contract else None
        res = _solve_lp(prep, cand, campus, contract_rhs=rhs, mode="plan", tie_rel=tie_break)
        solve_seconds += res.seconds
        if res.status == "optimal":
            bad = _violations(prep, cand, res.delta, campus, rhs)
            if bad:
                lp_status = "solver-error"
                mark(cand, REASON_SOLVER_ERROR, "solution failed the checks: " + "; ".join(bad))
            else:
                lp_status = "optimal"
                delta[cand] = res.delta
            break
        if res.status == "error":
            lp_status = "solver-error"
            mark(cand, REASON_SOLVER_ERROR, res.message)
            break
        # Infeasible: is it the campus contract, or some clusters on their own?
        lp_status = "infeasible"
        if finite_contract:
            res2 = _solve_lp(prep, cand, campus, contract_rhs=None, mode="peak", tie_rel=tie_break)
            solve_seconds += res2.seconds
            if res2.status == "optimal":
                lowest = float((prep.nom[cand] + prep.k[cand][:, None] * res2.delta).max(axis=1).sum())
                fb = flat_peak_of_fallbacks()
                msg = (f"campus contract {limit:.6g} kW is below the lowest achievable sum of cluster peaks "
                       f"{lowest + fb:.6g} kW ({lowest:.6g} kW for the {cand.size} shapeable cluster(s) at their "
                       f"lowest peaks + {fb:.6g} kW flat peaks of the fallback clusters)")
                mark(cand, REASON_INFEASIBLE, msg)
                messages.append(msg)
                break
            if res2.status == "error":
                lp_status = "solver-error"
                mark(cand, REASON_SOLVER_ERROR, res2.message)
                break
        # Some clusters are infeasible on their own (rare: e.g. a ramp limit with a forced dip). Find them with
        # one elastic LP, drop them, and plan the others again.
        st_, mask, msg, secs = _infeasible_alone(prep, cand, campus)
        solve_seconds += secs
        if st_ == "error":
            lp_status = "solver-error"
            mark(cand, REASON_SOLVER_ERROR, msg)
            break
        found = [int(i) for i in cand[mask]]
        mark(found, REASON_INFEASIBLE, "no delta satisfies the bounds, sum_h delta = 0, the coverage "
                                       "sum_h VCC >= Theta and the ramp limit together")
        if not found:  # jointly infeasible without a contract cannot happen; do not loop forever
            mark(cand, REASON_INFEASIBLE, f"the campus program is infeasible ({res.message}) although every "
                                          "cluster is feasible alone")
            break
        cand = np.array([i for i in cand if i not in set(found)], dtype=int)

    return _assemble(prep, campus, delta, solver_used, lp_status, solve_seconds, t_start, messages)


def _assemble(prep: _Prep, campus: CampusInput, delta: np.ndarray, solver_used: str, lp_status: str,
              solve_seconds: float, t_start: float, messages: list[str]) -> CampusPlan:
    n_c, n_h = len(prep.names), prep.n_hours
    shaped = np.array([r is None for r in prep.reason])
    delta = np.where(shaped[:, None], delta, 0.0)
    flex = (1.0 + delta) * prep.f[:, None]
    vcc = np.where(shaped[:, None], (prep.m + flex) * prep.r, prep.cap)
    power = prep.nom + prep.k[:, None] * delta
    carbon = power * prep.eta[None, :] / 1000.0
    flat_carbon = prep.nom * prep.eta[None, :] / 1000.0
    expected = carbon.sum(axis=1)
    flat = flat_carbon.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        saving = np.where(flat > 0, 100.0 * (flat - expected) / flat, 0.0)
        flex_flat = (prep.k[:, None] * prep.eta[None, :]).sum(axis=1)
        flex_saving = np.where(flex_flat > 0,
                               -100.0 * (prep.k[:, None] * delta * prep.eta[None, :]).sum(axis=1) / flex_flat, 0.0)
    peak = power.max(axis=1)
    campus_peak = float(peak.sum())
    limit = campus.contract_limit_kw
    contract_ok = campus_peak <= limit * (1 + 1e-6) + 1e-9 if math.isfinite(limit) else True
    if not contract_ok and not any("contract" in msg for msg in messages):
        messages.append(f"campus peak {campus_peak:.6g} kW (all clusters) exceeds the contract {limit:.6g} kW")
    status = np.where(shaped, STATUS_SHAPED, STATUS_FALLBACK)

    hours = (pd.DatetimeIndex(campus.hours) if campus.hours is not None
             else pd.DatetimeIndex([pd.NaT] * n_h, tz="UTC"))
    hourly = pd.DataFrame({
        "campus": campus.name,
        "cluster": np.repeat(np.array(prep.names, dtype=object), n_h),
        "hour_index": np.tile(np.arange(n_h), n_c),
        "hour": hours.take(np.tile(np.arange(n_h), n_c)),
        "status": np.repeat(status, n_h),
        "delta": delta.ravel(),
        "vcc_cores": vcc.ravel(),
        "flexible_cpu_cores": flex.ravel(),
        "inflexible_cpu_cores": prep.u.ravel(),
        "inflexible_upper_cpu_cores": prep.u_upper.ravel(),
        "power_kw": power.ravel(),
        "carbon_gco2_per_kwh": np.tile(prep.eta, n_c),
        "carbon_kgco2": carbon.ravel(),
    }, columns=HOURLY_COLUMNS)
    clusters = pd.DataFrame({
        "campus": campus.name,
        "cluster": prep.names,
        "status": status,
        "reason": pd.Series(prep.reason, dtype=object),
        "reason_detail": pd.Series(prep.detail, dtype=object),
        "theta_core_hours": prep.theta,
        "tau_core_hours": prep.tau,
        "alpha": prep.alpha,
        "expected_kgco2": expected,
        "flat_kgco2": flat,
        "saving_pct": saving,
        "flexible_saving_pct": flex_saving,
        "peak_kw": peak,
        "flat_peak_kw": prep.nom.max(axis=1),
    }, columns=CLUSTER_COLUMNS)
    objective = campus.lambda_e * float(expected.sum()) + campus.lambda_p * campus_peak
    return CampusPlan(campus=campus.name, hourly=hourly, clusters=clusters, solver=solver_used,
                      lp_status=lp_status, objective=objective, solve_seconds=solve_seconds,
                      plan_seconds=time.perf_counter() - t_start, campus_peak_kw=campus_peak,
                      contract_limit_kw=limit, contract_ok=bool(contract_ok), message="; ".join(messages))


def plan_fleet(campuses: Iterable[CampusInput], *, tie_break: float = TIE_BREAK) -> list[CampusPlan]:
    """Plan several campuses (independent programs), in order."""
    return [plan_campus(c, tie_break=tie_break) for c in campuses]


def concat_plans(plans: Iterable[CampusPlan]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stack the ``hourly`` and ``clusters`` frames of several plans."""
    plans = list(plans)
    if not plans:
        return pd.DataFrame(columns=HOURLY_COLUMNS), pd.DataFrame(columns=CLUSTER_COLUMNS)
    return (pd.concat([p.hourly for p in plans], ignore_index=True),
            pd.concat([p.clusters for p in plans], ignore_index=True))


def campus_targets(campus: CampusInput) -> pd.DataFrame:
    """Per cluster, the derived day targets without solving: Theta, alpha, tau, the flat power peak and whether the
    pre-checks already force a fallback (``reason``: preset, "no-flexible-work" or "too-full")."""
    prep = _prepare(campus)
    return pd.DataFrame({
        "campus": campus.name, "cluster": prep.names, "theta_core_hours": prep.theta, "alpha": prep.alpha,
        "tau_core_hours": prep.tau, "slope_kw_per_core": prep.slope, "flat_peak_kw": prep.nom.max(axis=1),
        "reason": pd.Series(prep.reason, dtype=object), "reason_detail": pd.Series(prep.detail, dtype=object),
    })
