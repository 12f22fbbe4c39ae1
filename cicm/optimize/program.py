"""The VCC program: one batched linear program per campus (all its clusters, H hours).

Notation (per cluster c, hour h of the H-hour local day; see docs/optimizer.md for the full derivation):

- Theta = T_R * (1 + q97)                         capacity requirement, reservation core-hours
- alpha s.t. sum_h (U_IF(h) + alpha*T_UF/H) * R(h) = Theta, then alpha := max(alpha, 1);  tau = alpha * T_UF
- M(h) = max(U_IF(h), U_IF_upper(h))              inflexible usage the cap must always admit
- VCC(h) = (M(h) + (1 + delta(h)) * tau/H) * R(h) reservation cores
- u(h) = U_IF(h) + (1 + delta(h)) * tau/H         usage drawn (the forecast U_IF, not the quantile, draws power)
- power(h):
    linear clusters (nominal_power_kw + slope_kw_per_core):  P_c(U_nom(h)) + pi_c * delta(h) * tau/H
    curve clusters (power_curve):  the lower convex hull of the curve over the usage the plan can reach, at u(h)
    (the curve itself when it is convex there; a lower bound of it otherwise)

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

The hull of a curve cluster enters the LP in its incremental ("fill") form, equivalent to the epigraph
p >= a_k + b_k*u for every segment k (same optimum, tested) and much faster to solve: delta(c,h) is the sum over
the hull segments of fill variables bounded by what each segment holds within the hour's reachable usage, and the
power is P_hull(U_nom(h)) + tau/H * sum_k b_k * fill_k; the increasing slopes of a convex hull make filling the
segments in order optimal. With a finite contract, the peak rows of a non-convex curve carry its hull gap (the
most the curve rises above its hull), so the true peaks stay within the contract. Reported power and carbon always
come from the true curve at the planned (and the flat) usage.

Everything is built from (C, H) numpy arrays into one cvxpy problem with matrix variables; there are no per-cluster
Python loops. An infeasible campus costs at most two more batched LPs per round: min sum of peaks without the
contract (is it the contract?) and an elastic LP (which clusters are infeasible on their own?).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, cast

import cvxpy as cp
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cicm.optimize.fallback import (
    REASON_INFEASIBLE,
    REASON_NO_FLEXIBLE_WORK,
    REASON_SOLVER_ERROR,
    REASON_TOO_FULL,
    STATUS_FALLBACK,
    STATUS_SHAPED,
    too_full_reasons,
)
from cicm.optimize.cache import CACHE, run_problem
from cicm.optimize.curves import CurveTable, lower_hulls
from cicm.optimize.highs import solver_for
from cicm.optimize.inputs import CampusInput

#: Relative size of the L1 tie-break on delta, as a fraction of each cluster's objective change per unit delta.
#: It breaks ties towards the flat plan (flat carbon => delta = 0) and creates a dead band: work moves between two
#: hours only when their carbon intensities differ by more than ~2 * TIE_BREAK relative.
TIE_BREAK = 1e-5

#: Options per solver. Clarabel's duality-gap tolerance is tightened from 1e-8: with an interior-point method the
#: tie-break only pins delta to within ~gap/tie, and 1e-11 keeps a flat-carbon plan flat to ~1e-7 (costs 1-3
#: iterations). HiGHS' simplex returns a vertex, exact to its feasibility tolerance; its presolve is off: the LP
#: has no redundant rows to remove (bounds are variable bounds) and presolve cost 10-35% of the plan time
#: (bench/optimize_speed.py).
SOLVER_OPTIONS: dict[str, dict] = {"CLARABEL": {"tol_gap_abs": 1e-11, "tol_gap_rel": 1e-11},
                                   "HIGHS": {"presolve": "off"}}

#: Relative tolerance of the post-solve checks of a solution (the tests check invariants at 1e-6).
CHECK_RTOL = 1e-7

HOURLY_COLUMNS = [
    "campus", "cluster", "hour_index", "hour", "status", "delta", "vcc_cores", "flexible_cpu_cores",
    "inflexible_cpu_cores", "inflexible_upper_cpu_cores", "power_kw", "carbon_gco2_per_kwh", "carbon_kgco2",
]
CLUSTER_COLUMNS = [
    "campus", "cluster", "status", "reason", "reason_detail", "theta_core_hours", "tau_core_hours", "alpha",
    "expected_kgco2", "flat_kgco2", "saving_pct", "flexible_saving_pct", "peak_kw", "flat_peak_kw", "power_model",
]

#: ``power_model`` values: the linear model (nominal_power_kw + slope_kw_per_core), a power curve that is convex
#: over the usage the plan can reach (the LP sees the curve exactly), or a non-convex curve (the LP sees its lower
#: convex hull: its power estimate is a lower bound; the reported figures still come from the true curve).
POWER_LINEAR, POWER_CURVE_CONVEX, POWER_CURVE_HULL = "linear", "curve", "curve-hull"

#: A curve counts as convex over the reachable range if it lies within this fraction of its largest power (on the
#: range) above its lower convex hull.
CONVEX_RTOL = 1e-9


@dataclass(frozen=True, eq=False)
class CampusPlan:
    """The plan of one campus for one day.

    - ``hourly``: tidy frame, one row per (cluster, hour), columns :data:`HOURLY_COLUMNS`. ``vcc_cores`` is the
      cap in reservation cores; ``flexible_cpu_cores`` the planned flexible usage (1+delta)*tau/H;
      ``inflexible_cpu_cores`` the forecast U_IF; ``power_kw`` the planned power; ``carbon_kgco2`` its emissions
      over the hour at the forecast intensity. ``hour`` is the passed-through timestamp (NaT if none was given).
    - ``clusters``: one row per cluster, columns :data:`CLUSTER_COLUMNS`. ``reason`` is ``None`` for shaped
      clusters; ``saving_pct`` is the cut in the cluster's whole expected carbon vs the flat plan (delta = 0);
      ``flexible_saving_pct`` the cut in the carbon of its flexible work alone (its marginal power
      P(U_IF + flexible) - P(U_IF); pi*(1+delta)*tau/H in the linear model), the figure comparable to the DESIGN
      ceiling table. ``power_model``: :data:`POWER_LINEAR`, :data:`POWER_CURVE_CONVEX` or
      :data:`POWER_CURVE_HULL`. Power, carbon and peaks of curve clusters are the true curve at the planned usage.
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
    nom: np.ndarray  # (C,H) P_c(U_nom): the true power of the flat plan
    slope: np.ndarray  # (C,) pi_c as given, or the curve's slope at the mean U_nom (informational for curves)
    theta: np.ndarray  # (C,)
    alpha: np.ndarray  # (C,)
    tau: np.ndarray  # (C,)
    f: np.ndarray  # (C,) tau / H
    k: np.ndarray  # (C,) kW per unit delta: slope * tau / H (linear); the hull's slope at mean U_nom * tau/H (curve)
    pi_h: np.ndarray  # (C,H) the LP's kW per core at U_nom(h): slope (linear); the hull's segment there (curve)
    hi: np.ndarray  # (C,H) upper bound of delta
    need: np.ndarray  # (C,) sum_h R*f*delta >= need  (coverage)
    # Power curves (see cicm.optimize.curves): which clusters use one, the packed curves, and the segments of each
    # curve's lower convex hull over the usage its plan can reach, stored flat (cluster i owns the segments
    # seg_start[i]:seg_start[i+1]; none for linear clusters).
    curve: np.ndarray  # (C,) bool
    table: CurveTable  # the curves packed (dummy rows for linear clusters)
    hull_nom: np.ndarray  # (C,H) the LP's power at delta = 0 (= nom, except for a non-convex curve)
    gap: np.ndarray  # (C,) max over the reachable range of true curve - hull, kW (0: convex or linear)
    seg_start: np.ndarray  # (C+1,)
    seg_a: np.ndarray  # (S,) intercepts, kW
    seg_b: np.ndarray  # (S,) slopes, kW per core
    seg_x0: np.ndarray  # (S,) where each segment starts and ends on the hull, cores
    seg_x1: np.ndarray
    power_model: list = field(default_factory=list)
    reason: list = field(default_factory=list)
    detail: list = field(default_factory=list)

    @property
    def unom(self) -> np.ndarray:
        return self.u + self.f[:, None]


class _Labels:
    """str(hours[h]) on demand, as a sequence."""

    def __init__(self, hours):
        self.hours = hours

    def __len__(self) -> int:
        return len(self.hours)

    def __getitem__(self, h: int) -> str:
        return str(self.hours[h])


def _prepare(campus: CampusInput) -> _Prep:
    cl = campus.clusters
    n_h = campus.n_hours
    u = np.stack([c.inflexible_cpu_cores for c in cl])
    u_up = np.stack([c.inflexible_upper_cpu_cores for c in cl])
    m = np.maximum(u, u_up)
    r = np.stack([c.reservation_ratio for c in cl])
    cap = np.empty((len(cl), n_h))
    pcc = np.empty((len(cl), n_h))
    for i, c in enumerate(cl):  # a scalar or H values each (filling is much cheaper than np.broadcast_to + stack)
        cap[i] = c.capacity_cores
        pcc[i] = c.power_capped_capacity_cores
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

    with np.errstate(divide="ignore", invalid="ignore"):
        fcol = f[:, None]
        hi_power = np.where(fcol > 0, (pcc - m) / fcol - 1.0, np.inf)
        hi_capacity = np.where(fcol > 0, (cap / r - m) / fcol - 1.0, np.inf)
    hi = np.minimum(np.minimum(hi_power, hi_capacity), campus.delta_max)
    need = theta - ((m + f[:, None]) * r).sum(axis=1)

    # Power. Linear clusters: nominal power and slope as given. Curve clusters: the curve at U_nom, and the
    # segments of its lower convex hull over the usage the plan can reach (delta in [delta_min, hi(h)], hi clamped
    # as below; and U_nom itself); all clusters at once on padded arrays (cicm.optimize.curves).
    n_c = len(cl)
    u_nom = u + f[:, None]
    u_lo = np.minimum(u.min(axis=1) + (1.0 + campus.delta_min) * f, u_nom.min(axis=1))
    u_hi = np.maximum((u + (1.0 + np.maximum(hi, campus.delta_min)) * f[:, None]).max(axis=1), u_nom.max(axis=1))
    is_curve = np.array([c.power_curve is not None for c in cl])
    table = CurveTable.pack([c.power_curve for c in cl])
    hulls = lower_hulls(table, u_lo, u_hi, convex_rtol=CONVEX_RTOL)
    lin_nom = np.zeros((n_c, n_h))
    for i, c in enumerate(cl):
        if c.nominal_power_kw is not None:
            lin_nom[i] = c.nominal_power_kw
    given_slope = np.array([np.nan if c.slope_kw_per_core is None else c.slope_kw_per_core for c in cl])
    nom = np.where(is_curve[:, None], table(u_nom), lin_nom)
    mean_nom = u_nom.mean(axis=1, keepdims=True)
    # slope: informational for curves (the curve's slope at the day's mean U_nom unless one was given).
    slope = np.where(np.isnan(given_slope), table.slope_at(mean_nom)[:, 0], given_slope)
    a_pad, b_pad = hulls.padded()  # (C, K)
    at_nom = a_pad[:, None, :] + b_pad[:, None, :] * u_nom[:, :, None]  # (C, H, K)
    hull_nom = np.where(is_curve[:, None], at_nom.max(axis=2), nom)
    pi_h = np.where(is_curve[:, None], np.take_along_axis(b_pad, at_nom.argmax(axis=2), 1), slope[:, None])
    # k: kW per unit delta near U_nom, the LP's scale (for a curve: the hull's slope at the mean U_nom; any
    # positive figure would do).
    ref = np.take_along_axis(b_pad, (a_pad + b_pad * mean_nom).argmax(axis=1)[:, None], 1)[:, 0]
    ref = np.where(ref > 0, ref, np.abs(b_pad).max(axis=1))
    k = np.where(is_curve, np.where(ref > 0, ref, 1.0) * np.where(f > 0, f, 1.0), slope * f)
    gap = hulls.gap
    models = [POWER_LINEAR if not is_curve[i] else POWER_CURVE_CONVEX if gap[i] == 0.0 else POWER_CURVE_HULL
              for i in range(n_c)]

    prep = _Prep(names=[c.name for c in cl], n_hours=n_h, eta=campus.carbon_gco2_per_kwh, u=u, u_upper=u_up, m=m,
                 r=r, cap=cap, nom=nom, slope=slope, theta=theta, alpha=alpha, tau=tau, f=f, k=k, pi_h=pi_h, hi=hi,
                 need=need, curve=is_curve, table=table, hull_nom=hull_nom, gap=gap, seg_start=hulls.start,
                 seg_a=hulls.a, seg_b=hulls.b, seg_x0=hulls.x0, seg_x1=hulls.x1, power_model=models,
                 reason=[None] * n_c, detail=[None] * n_c)

    # The hours' labels only for the texts of too-full clusters (formatting H timestamps costs more than the check).
    labels = cast("list[str]", _Labels(campus.hours)) if campus.hours is not None else None
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
# Power: the LP's model and the truth.


def _segments_of(prep: _Prep, idx: np.ndarray):
    """The hull segments of the curve clusters among ``idx``, flat: (rows, seg) where ``rows[s]`` is the position
    in ``idx`` of the cluster owning segment ``seg[s]`` (an index into prep.seg_a / seg_b). Vectorised (a ragged
    arange), no loop over clusters."""
    rows = np.flatnonzero(prep.curve[idx])
    owners = idx[rows]
    counts = prep.seg_start[owners + 1] - prep.seg_start[owners]
    total = int(counts.sum())
    first = np.repeat(prep.seg_start[owners], counts)
    offset = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(rows, counts), first + offset


def _model_power(prep: _Prep, idx: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """The power the LP sees (kW, len(idx) x H): pi-linear for linear clusters, the hull of the curve at the
    planned usage for curve clusters (the true curve when it is convex over the range)."""
    power = prep.nom[idx] + prep.k[idx][:, None] * delta
    rows, seg = _segments_of(prep, idx)
    if seg.size:
        u = prep.u[idx] + (1.0 + delta) * prep.f[idx][:, None]
        vals = prep.seg_a[seg][:, None] + prep.seg_b[seg][:, None] * u[rows]
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        power[rows[starts]] = np.maximum.reduceat(vals, starts, axis=0)
    return power


def _true_power(prep: _Prep, delta: np.ndarray, *, inflexible_only: bool = False) -> np.ndarray:
    """The true power (kW, C x H) at the planned usage U_IF + (1+delta)*tau/H, or at U_IF alone."""
    if inflexible_only:
        power, usage = prep.nom - prep.k[:, None], prep.u  # linear model: P(U_IF) = P(U_nom) - pi*tau/H
    else:
        power, usage = prep.nom + prep.k[:, None] * delta, prep.u + (1.0 + delta) * prep.f[:, None]
    if prep.curve.any():
        power = np.where(prep.curve[:, None], prep.table(usage), power)
    return power


# --------------------------------------------------------------------------------------------------------------
# The batched LP.


@dataclass
class _Delta:
    """delta of the clusters ``idx`` of one LP, with its bounds (as variable bounds) and ramp rows.

    - ``d``: the (n, H) delta expression; ``value()``: its value after the solve (None if there is none).
    - ``lin``: rows (positions in ``idx``) of linear clusters, whose delta is a variable; ``abs_lin``: |delta| of
      those rows for the tie-break.
    - ``cur``: rows of curve clusters. Their delta is the sum of fill variables: for each hull segment s and
      hour h, an "up" fill (>= 0) is the usage (in units of tau/H) added on s above U_nom(h) and a "down" fill
      (<= 0) the usage taken off s below it, each bounded by what the segment holds within the hour's reachable
      range. So u(h) = U_nom(h) + tau/H * sum_s fill, |delta| <= sum_s |fill| (equal at the optimum), and the
      hull power is P_hull(U_nom) + tau/H * sum_s b_s * fill when the segments are filled in order, which the
      convex hull's increasing slopes make optimal; any other fill only over-states power. Only the (segment,
      hour, direction) triples whose bound is not 0 get an entry of ``fill``; ``fill_row``, ``fill_h``,
      ``fill_seg`` and ``fill_sign`` (+1 up, -1 down) say which.
    """

    cons: list
    lin: np.ndarray
    abs_lin: cp.Expression | None  # None when there are no linear rows
    cur: np.ndarray
    # Set by _delta_block: ``d`` and ``value`` always, the fill fields when there are curve rows (``cur.size``).
    d: cp.Expression = field(init=False)
    value: Callable[[], np.ndarray | None] = field(init=False)
    fill: cp.Variable = field(init=False)
    fill_row: np.ndarray = field(init=False)
    fill_h: np.ndarray = field(init=False)
    fill_seg: np.ndarray = field(init=False)
    fill_sign: np.ndarray = field(init=False)

    def fill_expr(self, weight: np.ndarray, n: int, n_h: int):
        """The (n, H) expression sum_s weight * fill per row and hour (0 on the linear rows)."""
        a = sp.csr_matrix((weight, (self.fill_row * n_h + self.fill_h, np.arange(self.fill_row.size))),
                          shape=(n * n_h, self.fill_row.size))
        return cp.reshape(a @ self.fill, (n, n_h), order="C")


def _delta_block(prep: _Prep, idx: np.ndarray, campus: CampusInput) -> _Delta:
    """delta for clusters ``idx`` with its bounds and ramp rows (see :class:`_Delta`).

    The bounds go to the solver as variable bounds (HiGHS takes them natively: no constraint rows). With HiGHS,
    delta = p - q with p, q >= 0 makes the L1 tie-break |delta| = p + q free of extra rows (up to ~3x faster with
    HiGHS' simplex); Clarabel is faster with cp.abs on a single variable. A curve cluster's delta is the sum of its
    fill variables, whose bounds imply delta's.
    """
    n, n_h = len(idx), prep.n_hours
    hi, dmin = prep.hi[idx], campus.delta_min
    curve = prep.curve[idx]
    lin, cur = np.flatnonzero(~curve), np.flatnonzero(curve)
    getters = []  # (rows, value getter) per part
    abs_lin = None
    if lin.size:
        m, h_lin = lin.size, hi[lin]
        if campus.solver == "HIGHS":
            p = cp.Variable((m, n_h), name="delta_up", bounds=[np.zeros((m, n_h)), np.maximum(h_lin, 0.0)])
            q = cp.Variable((m, n_h), name="delta_down", bounds=[np.maximum(-h_lin, 0.0), np.full((m, n_h), -dmin)])
            d_lin, abs_lin = p - q, p + q
            getters.append((lin, lambda: None if p.value is None or q.value is None else p.value - q.value))
        else:
            v = cp.Variable((m, n_h), name="delta", bounds=[np.full((m, n_h), dmin), h_lin])
            d_lin, abs_lin = v, cp.abs(v)
            getters.append((lin, lambda: v.value))
    out = _Delta(cons=[], lin=lin, abs_lin=abs_lin, cur=cur)
    if cur.size:
        rows, seg = _segments_of(prep, idx)
        owner = idx[rows]
        f = prep.f[owner][:, None]
        x0 = prep.seg_x0[seg][:, None]
        width = (prep.seg_x1[seg] - prep.seg_x0[seg])[:, None]
        fill_at = lambda uu: np.clip(uu - x0, 0.0, width)  # noqa: E731  core-hours held by each segment at uu
        at_nom = fill_at(prep.unom[owner])
        to_hi = (fill_at(prep.u[owner] + (1.0 + hi[rows]) * f) - at_nom) / f  # (n_seg, H)
        to_lo = (fill_at(prep.u[owner] + (1.0 + dmin) * f) - at_nom) / f  # <= 0 (delta_min <= 0)
        # An hour whose upper bound is below 0 (a power cap forcing a dip) must empty the segments between its
        # upper bound and U_nom: there dn <= to_hi < 0.
        tiny = 1e-12
        ui, uh = np.nonzero(to_hi > tiny)
        di, dh = np.nonzero(to_lo < -tiny)
        lower = np.concatenate([np.zeros(ui.size), to_lo[di, dh]])
        upper = np.concatenate([to_hi[ui, uh], np.minimum(to_hi[di, dh], 0.0)])
        fill = cp.Variable(lower.size, name="fill", bounds=[lower, upper])
        out.fill = fill
        out.fill_row, out.fill_h = rows[np.r_[ui, di]], np.r_[uh, dh]
        out.fill_seg, out.fill_sign = seg[np.r_[ui, di]], np.r_[np.ones(ui.size), -np.ones(di.size)]
        d_all = out.fill_expr(np.ones(lower.size), n, n_h)  # curve rows; 0 on linear rows

        def cur_value():
            if fill.value is None:
                return None
            val = np.bincount(out.fill_row * n_h + out.fill_h, weights=fill.value, minlength=n * n_h)
            return val.reshape(n, n_h)[cur]

        getters.append((cur, cur_value))
        if not lin.size:
            out.d = d_all
        else:
            out.d = d_all + sp.csr_matrix((np.ones(lin.size), (lin, np.arange(lin.size))), shape=(n, lin.size)) @ d_lin
    else:
        out.d = d_lin

    def value():
        res = np.zeros((n, n_h))
        for rows_, get in getters:
            v = get()
            if v is None:
                return None
            res[rows_] = v
        return res

    out.value = value
    if campus.ramp_limit is not None and n_h > 1:
        dd = out.d[:, 1:] - out.d[:, :-1]
        out.cons += [dd <= campus.ramp_limit, dd >= -campus.ramp_limit]
    return out


@dataclass
class _DeltaMatrix:
    """delta of the clusters ``idx`` of one LP as a sparse matrix on the stacked columns of one variable:
    delta (row-major, row c * H + h) = D @ x[:n_x]. The columns are, in order: for linear clusters with HiGHS,
    p then q (delta = p - q, |delta| = p + q, both >= 0; ``lin_split``), with Clarabel v (delta = v, |delta| =
    abs(v)), one per (linear row, hour), row-major (``lin_cols``, ``lin_cols2``); then the fills of the curve
    clusters (``fill_cols``; see :class:`_Delta` for what a fill is). ``lower``/``upper``: the columns' bounds;
    ``col_rows``: the delta entry each column adds to."""

    D: sp.csr_matrix
    lin: np.ndarray
    cur: np.ndarray
    lin_split: bool
    lin_cols: np.ndarray
    lin_cols2: np.ndarray
    fill_cols: np.ndarray
    fill_row: np.ndarray
    fill_h: np.ndarray
    fill_seg: np.ndarray
    fill_sign: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    col_rows: np.ndarray
    col_ids: np.ndarray
    col_signs: np.ndarray  # the entry of D in each column (+1, or -1 for q)
    n: int
    n_h: int

    def value_of(self, x: np.ndarray | None) -> np.ndarray | None:
        """delta (n, H) from the LP's solution ``x`` (None if there is none)."""
        if x is None:
            return None
        return np.asarray(self.D @ x[: self.D.shape[1]]).reshape(self.n, self.n_h)


def _fills(prep: _Prep, idx: np.ndarray, hi: np.ndarray, dmin: float):
    """The fill columns of the curve clusters among ``idx`` (see :class:`_Delta`): (row, hour, segment, sign,
    lower, upper) per fill, only for the (segment, hour, direction) triples whose bound is not 0."""
    rows, seg = _segments_of(prep, idx)
    owner = idx[rows]
    f = prep.f[owner][:, None]
    x0 = prep.seg_x0[seg][:, None]
    width = (prep.seg_x1[seg] - prep.seg_x0[seg])[:, None]
    fill_at = lambda uu: np.clip(uu - x0, 0.0, width)  # noqa: E731  core-hours held by each segment at uu
    at_nom = fill_at(prep.unom[owner])
    to_hi = (fill_at(prep.u[owner] + (1.0 + hi[rows]) * f) - at_nom) / f  # (n_seg, H)
    to_lo = (fill_at(prep.u[owner] + (1.0 + dmin) * f) - at_nom) / f  # <= 0 (delta_min <= 0)
    # An hour whose upper bound is below 0 (a power cap forcing a dip) must empty the segments between its
    # upper bound and U_nom: there dn <= to_hi < 0.
    tiny = 1e-12
    ui, uh = np.nonzero(to_hi > tiny)
    di, dh = np.nonzero(to_lo < -tiny)
    lower = np.concatenate([np.zeros(ui.size), to_lo[di, dh]])
    upper = np.concatenate([to_hi[ui, uh], np.minimum(to_hi[di, dh], 0.0)])
    return (rows[np.r_[ui, di]], np.r_[uh, dh], seg[np.r_[ui, di]],
            np.r_[np.ones(ui.size), -np.ones(di.size)], lower, upper)


def _delta_matrix(prep: _Prep, idx: np.ndarray, campus: CampusInput) -> _DeltaMatrix:
    """delta for clusters ``idx`` as a sparse matrix on stacked columns with their bounds (see
    :class:`_DeltaMatrix`); vectorised, no loop over clusters."""
    n, n_h = len(idx), prep.n_hours
    hi, dmin = prep.hi[idx], campus.delta_min
    curve = prep.curve[idx]
    lin, cur = np.flatnonzero(~curve), np.flatnonzero(curve)
    split = campus.solver == "HIGHS"
    m = lin.size * n_h
    lin_rows = (lin[:, None] * n_h + np.arange(n_h)).ravel()
    h_lin = hi[lin].ravel()
    if split:
        lin_cols, lin_cols2 = np.arange(m), m + np.arange(m)
        lower = [np.zeros(m), np.maximum(-h_lin, 0.0)]
        upper = [np.maximum(h_lin, 0.0), np.full(m, -dmin)]
        col_rows, signs = [lin_rows, lin_rows], [np.ones(m), -np.ones(m)]
    else:
        lin_cols, lin_cols2 = np.arange(m), np.arange(0)
        lower, upper = [np.full(m, dmin)], [h_lin]
        col_rows, signs = [lin_rows], [np.ones(m)]
    start = (2 if split else 1) * m
    if cur.size:
        f_row, f_h, f_seg, f_sign, f_lo, f_hi = _fills(prep, idx, hi, dmin)
    else:
        f_row = f_h = f_seg = np.zeros(0, dtype=int)
        f_sign = f_lo = f_hi = np.zeros(0)
    fill_cols = start + np.arange(f_row.size)
    lower.append(f_lo)
    upper.append(f_hi)
    col_rows.append(f_row * n_h + f_h)
    signs.append(np.ones(f_row.size))
    rows_all = np.concatenate(col_rows).astype(int)
    n_x = start + f_row.size
    ids = np.arange(n_x)
    col_signs = np.concatenate(signs)
    d_mat = sp.csr_matrix((col_signs, (rows_all, ids)), shape=(n * n_h, n_x))
    return _DeltaMatrix(D=d_mat, lin=lin, cur=cur, lin_split=split, lin_cols=lin_cols, lin_cols2=lin_cols2,
                        fill_cols=fill_cols, fill_row=f_row, fill_h=f_h, fill_seg=f_seg, fill_sign=f_sign,
                        lower=np.concatenate(lower), upper=np.concatenate(upper), col_rows=rows_all, col_ids=ids,
                        col_signs=col_signs,
                        n=n, n_h=n_h)


def _diff_rows(n: int, n_h: int) -> sp.csr_matrix:
    """(n * (H-1), n * H): x[c, h+1] - x[c, h] of a row-major (n, H) array, row-major."""
    r = np.arange(n * (n_h - 1))
    c0 = (r // (n_h - 1)) * n_h + r % (n_h - 1)
    return sp.csr_matrix((np.r_[np.ones(r.size), -np.ones(r.size)], (np.r_[r, r], np.r_[c0 + 1, c0])),
                         shape=(r.size, n * n_h))


#: LPs of at least this many columns are compiled with cvxpy's COO canonicalisation backend instead of its default
#: (C++): the same LP, 10-28% faster to compile from 100 clusters on (bench/optimize_speed.py; 1,000 clusters
#: without peak rows 88 -> 63 ms); below, the two are within noise.
COO_BACKEND_COLUMNS = 5_000


def _run(prob: cp.Problem, solver: str, n_cols: int = 0) -> str | None:
    """Solve; return None, or the error text if the solver raised."""
    try:
        with warnings.catch_warnings():  # "solution may be inaccurate": the status says it, and we check
            warnings.simplefilter("ignore", UserWarning)
            # No cvxpy Parameters: skipping the DPP analysis saves a third of the compilation.
            backend = {"canon_backend": "COO"} if n_cols >= COO_BACKEND_COLUMNS else {}
            prob.solve(solver=solver_for(solver), ignore_dpp=True, **backend, **SOLVER_OPTIONS.get(solver, {}))
    except Exception as exc:  # noqa: BLE001 - any solver failure becomes a visible fallback
        return f"{solver}: {type(exc).__name__}: {exc}"
    return None


#: Solve HiGHS LPs with the program compiled once per structure (cicm.optimize.cache) when a structure recurs.
#: Off: every LP is a fresh cvxpy program (the plans are the same either way).
CACHE_PROGRAMS = True


def _solve_matrix_lp(c: np.ndarray, eq: sp.csr_matrix, ineq: sp.csr_matrix | None, rhs: np.ndarray | None,
                     lower: np.ndarray, upper: np.ndarray, solver: str) -> tuple[str | None, str, np.ndarray | None]:
    """min c @ x s.t. eq @ x = 0, ineq @ x <= rhs, lower <= x <= upper, as a cvxpy program; returns (error text or
    None, cvxpy status, x or None).

    With HiGHS, a structure (columns and sparsity patterns) seen before is solved by its DPP-parametrised program,
    compiled once and cached (:mod:`cicm.optimize.cache`); the first time it is a fresh program with the numbers
    as constants (faster to compile once). Both hand HiGHS the same LP, bit for bit.

    The objective is written sum(c * x), not c @ x: cvxpy evaluates the objective after the solve, and a BLAS dot
    product right after HiGHS' run stalls while HiGHS' worker threads still spin (1-24 ms of CPU and wall on 2
    cores; elementwise numpy does not use BLAS). It compiles to the same LP coefficients."""
    if solver == "HIGHS" and CACHE_PROGRAMS:
        prog = CACHE.lookup(c.size, eq, ineq, solver)
        if prog is not None:
            with prog.lock:
                prog.assign(c, eq, ineq, rhs, lower, upper)
                err = run_problem(prog.problem, solver_for(solver), SOLVER_OPTIONS.get(solver, {}))
                value = prog.x.value
                # cvxpy clips a variable with constant bounds into them when it hands back the solution (HiGHS' may
                # lie outside by its feasibility tolerance), not one with Parameter bounds: clip the same way.
                return err, prog.problem.status, None if value is None else np.clip(value, lower, upper)
    x = cp.Variable(c.size, name="lp", bounds=[lower, upper])
    cons = [eq @ x == 0] + ([ineq @ x <= rhs] if ineq is not None else [])
    prob = cp.Problem(cp.Minimize(cp.sum(cp.multiply(c, x))), cons)
    err = _run(prob, solver, c.size)
    return err, prob.status, None if x.value is None else np.asarray(x.value)


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
    blk = _delta_block(prep, idx, campus)
    d, cons = blk.d, blk.cons
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
              tie_rel: float, margin: bool = False) -> _LPResult:
    """Build and solve the LP for clusters ``idx`` (mode "plan": the objective; "peak": minimise the sum of the
    peaks, used to diagnose a contract). ``contract_rhs``: kW available to these clusters' summed peaks, or None.
    ``margin``: add each non-convex curve's hull gap to its peak rows (then its true peak is within y)."""
    t0 = time.perf_counter()
    n, n_h = len(idx), prep.n_hours
    if contract_rhs is not None and contract_rhs < 0:
        return _LPResult("infeasible", None, "flat peaks of the fallback clusters alone exceed the contract",
                         time.perf_counter() - t0)
    hi = prep.hi[idx]
    r, f, k, nom = prep.r[idx], prep.f[idx], prep.k[idx], prep.hull_nom[idx]
    need = prep.need[idx]
    dmin = campus.delta_min

    # The LP as sparse matrices on one stacked variable (docs/optimizer.md, Speed): delta = D @ x, and every row
    # block a matrix built here in numpy/scipy, so cvxpy compiles a handful of matrix products, not a tree of atoms.
    blk = _delta_matrix(prep, idx, campus)
    D, lin, cur = blk.D, blk.lin, blk.cur
    n_x = D.shape[1]
    rows_of = lambda m: sp.csr_matrix(m)  # noqa: E731
    # sum_h delta = 0: each column's entry of D in its cluster's row (the (n, n * H) row sums times D, built directly).
    cons_eq = sp.csr_matrix((blk.col_signs, (blk.col_rows // n_h, blk.col_ids)), shape=(n, n_x))

    rk = r * f[:, None]
    # Coverage is implied by sum(delta)=0 when R is flat over the day and need <= 0; keep only the other rows.
    flat_r = np.ptp(r, axis=1) <= 1e-12 * r.max(axis=1)
    cov_rows = np.flatnonzero(~(flat_r & (need <= 0)))

    # Power relative to the LP's flat power P_hull(U_nom), per unit of delta or of fill: pi*tau/H for linear
    # clusters, b_s*tau/H on hull segment s for curve clusters.
    eta_w = campus.lambda_e * prep.eta / 1000.0 if mode == "plan" else np.zeros(n_h)
    lam_p = campus.lambda_p if mode == "plan" else 1.0
    # The peak rows (one per cluster and hour) and the contract row are only built when they can matter: with no
    # price on the peaks they serve the contract alone, and when even the highest power each cluster can reach
    # (its LP power is linear in delta, or a convex hull, in each hour: largest at delta_min or at the upper bound)
    # sums to within the contract, they cut nothing off. The scaling below still treats the LP as coupled, so the
    # LP is the same up to rows that are never active; the post-solve checks verify the contract either way.
    need_y = mode == "peak" or (mode == "plan" and (lam_p > 0 or (
        contract_rhs is not None and _peak_bound(prep, idx, dmin, margin) > contract_rhs * (1 - CHECK_RTOL))))
    if DROP_SLACK_COVERAGE and campus.solver == "HIGHS" and not need_y and cov_rows.size:
        # A coverage row cannot bind either when even the least coverage any delta within the bounds with
        # sum_h delta = 0 reaches is enough (the ramp rows only shrink that set); the post-solve checks verify
        # coverage either way. Only without peak rows: the clusters' LPs are then independent, each with one
        # optimum (the tie-break), which HiGHS' simplex finds with or without the row. With peak rows the LP's
        # optimal face is nearly flat across clusters, and leaving out rows that are never active moved plans
        # by up to 1e-5 of the objective (docs/optimizer.md); an interior-point solver's iterates would move too.
        low = _lowest_coverage(rk[cov_rows], hi[cov_rows], dmin)
        slack = low - need[cov_rows]
        cov_rows = cov_rows[~(slack > COVERAGE_MARGIN * np.maximum(np.abs(prep.theta[idx][cov_rows]), 1.0))]
    y_scale = np.maximum(np.maximum(nom.max(axis=1), k), 1.0)  # y = y_scale * ys keeps ys ~ 1
    tangent = prep.pi_h[idx] * f[:, None]  # kW per unit delta at U_nom(h), (n, H)
    w = eta_w[None, :] * tangent  # objective per unit delta near the flat plan
    fill_kw = prep.seg_b[blk.fill_seg] * f[blk.fill_row]  # kW per unit fill

    # Scaling: the objective is divided by its largest coefficient. Without a contract the clusters are
    # independent LPs solved in one batch, so each cluster's terms are divided by its own objective change per
    # unit delta instead: every cluster's objective is then O(1) and the tie-break below is equally sharp for a
    # small cluster next to a big one (an interior-point solver's optimality tolerance is absolute).
    unit = np.abs(w).mean(axis=1) + lam_p * k  # objective change per unit delta, per cluster
    scale = max(float(np.abs(w).max(initial=0.0)), float((lam_p * y_scale).max(initial=0.0)), 1e-300)
    if cur.size:
        scale = max(scale, float((eta_w.max() * fill_kw).max(initial=0.0)))
    if scale <= 1e-300:
        scale = 1.0
    coupled = contract_rhs is not None and math.isfinite(contract_rhs)
    row_scale = np.full(n, scale) if coupled else np.where(unit > 0, unit, scale)
    # Tie-break weight per cluster: tie_rel x the cluster's objective change per unit delta. A cluster whose delta
    # does not move the objective (zero slope, or lambda_e = lambda_p = 0) gets tie_rel x the largest weight, so
    # its delta is still pinned at 0 well above the solver's optimality tolerance.
    per_delta = unit / row_scale
    ref = float(per_delta.max(initial=0.0))
    if ref <= 0:
        tie = np.ones(n)  # the tie-break is the whole objective
    else:
        tie = tie_rel * np.where(per_delta > 0, np.maximum(per_delta, 1e-3 * ref), ref)

    # sum_h delta = 0, so a constant per cluster can be taken off its weights per unit delta (or fill): centred,
    # they are exactly 0 under flat carbon (and a flat slope), and the tie-break alone then pins delta = 0 (also
    # for interior-point solvers, whose residual in sum_h delta = 0 would otherwise trade against the tie-break).
    centre = w.mean(axis=1)
    n_y = n if need_y else 0
    c = np.zeros(n_x + n_y)
    if lin.size:
        wl = ((w[lin] - centre[lin, None]) / row_scale[lin, None]).ravel()
        tl = np.repeat(tie[lin], n_h)
        if blk.lin_split:  # delta = p - q, |delta| = p + q
            c[blk.lin_cols] = wl + tl
            c[blk.lin_cols2] = -wl + tl
        else:  # delta = v, |delta| = abs(v)
            c[blk.lin_cols] = wl
    if cur.size:
        # The fills' own costs, centred, plus the tie-break on |delta| = sum_s |fill|.
        row = blk.fill_row
        c[blk.fill_cols] = (eta_w[blk.fill_h] * fill_kw - centre[row]) / row_scale[row] + blk.fill_sign * tie[row]
    n_cols = n_x + n_y
    lower, upper = np.r_[blk.lower, np.full(n_y, -np.inf)], np.r_[blk.upper, np.full(n_y, np.inf)]
    pad = (lambda m: sp.hstack([m, sp.csr_matrix((m.shape[0], n_y))], format="csr")) if n_y else rows_of  # noqa: E731
    # Two row blocks: E x = 0 and G x <= h. Every ">=" row is written negated, as cvxpy writes it for the solver,
    # and the blocks are stacked in the order the separate constraints had, so the solver gets the same LP.
    eq = pad(cons_eq)
    g_rows: list = []
    h_rows: list = []
    if cov_rows.size:
        # coverage: sum_h rk * delta >= need; the columns of the clusters with a row, rk of their hour times
        # their entry of D (what the (rows, n * H) matrix of rk times D is, built directly).
        pos = np.full(n, -1)
        pos[cov_rows] = np.arange(cov_rows.size)
        row_of = pos[blk.col_rows // n_h]
        keep = row_of >= 0
        cov_d = sp.csr_matrix((rk.ravel()[blk.col_rows[keep]] * blk.col_signs[keep],
                               (row_of[keep], blk.col_ids[keep])), shape=(cov_rows.size, n_x))
        g_rows.append(-pad(cov_d))
        h_rows.append(-need[cov_rows])
    if campus.ramp_limit is not None and n_h > 1:
        ramp = pad(_diff_rows(n, n_h) @ D)  # -limit <= delta(h+1) - delta(h) <= limit
        g_rows += [ramp, -ramp]
        h_rows += [np.full(ramp.shape[0], float(campus.ramp_limit)), np.full(ramp.shape[0], float(campus.ramp_limit))]
    if need_y:
        base = nom / y_scale[:, None]
        if margin:
            base = base + (prep.gap[idx] / y_scale)[:, None]
        # Per unit of each column, the LP power / y_scale: tangent on linear rows, the fill's kW on curve rows.
        per_col = np.zeros(n_x)
        slope_lin = (tangent / y_scale[:, None])[lin].ravel()
        if lin.size:
            per_col[blk.lin_cols] = slope_lin
            if blk.lin_split:
                per_col[blk.lin_cols2] = -slope_lin
        per_col[blk.fill_cols] = fill_kw / y_scale[blk.fill_row]
        dev = sp.csr_matrix((per_col[blk.col_ids], (blk.col_rows, blk.col_ids)), shape=(n * n_h, n_x))
        ys_rep = sp.csr_matrix((np.ones(n * n_h), (np.arange(n * n_h), np.repeat(np.arange(n), n_h))),
                               shape=(n * n_h, n))
        g_rows.append(sp.hstack([dev, -ys_rep], format="csr"))  # ys >= base + dev
        h_rows.append(-base.ravel())
        if coupled:
            assert contract_rhs is not None
            g_rows.append(sp.csr_matrix(np.r_[np.zeros(n_x), y_scale][None, :]))  # sum of the peaks
            h_rows.append(np.array([contract_rhs], dtype=float))
        if lam_p > 0:
            c[n_x:] = lam_p * y_scale / row_scale
    ineq = sp.vstack(g_rows, format="csr") if g_rows else None
    rhs = np.concatenate(h_rows) if h_rows else None
    x_value: np.ndarray | None
    if lin.size and not blk.lin_split:  # Clarabel: |delta| of the linear rows as cp.abs
        x = cp.Variable(n_cols, name="lp", bounds=[lower, upper])
        obj = cp.sum(cp.multiply(c, x)) + cp.sum(cp.multiply(np.repeat(tie[lin], n_h), cp.abs(x[blk.lin_cols])))
        cons = [eq @ x == 0] + ([ineq @ x <= rhs] if ineq is not None else [])
        prob = cp.Problem(cp.Minimize(obj), cons)
        err = _run(prob, campus.solver)
        status, x_value = prob.status, None if x.value is None else np.asarray(x.value)
    else:
        err, status, x_value = _solve_matrix_lp(c, eq, ineq, rhs, lower, upper, campus.solver)
    if err is not None:
        return _LPResult("error", None, err, time.perf_counter() - t0)
    value = blk.value_of(x_value)
    if status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) and value is not None:
        delta = np.clip(value, dmin, hi)
        return _LPResult("optimal", delta, status, time.perf_counter() - t0)
    # Every variable is bounded and the objective is bounded below, so 'infeasible or unbounded' is infeasible.
    if isinstance(status, str) and status.startswith("infeasible"):
        return _LPResult("infeasible", None, f"{campus.solver}: {status}", time.perf_counter() - t0)
    return _LPResult("error", None, f"{campus.solver}: status {status!r}, no usable solution",
                     time.perf_counter() - t0)


#: Leave out the coverage rows that cannot bind (HiGHS, no peak rows; see _solve_lp).
DROP_SLACK_COVERAGE = True
#: ... when the least coverage reachable exceeds the need by more than this fraction of Theta (core-hours).
COVERAGE_MARGIN = 1e-7


def _lowest_coverage(rk: np.ndarray, hi: np.ndarray, dmin: float) -> np.ndarray:
    """Per row, the least sum_h rk(h) * delta(h) over dmin <= delta(h) <= hi(h) with sum_h delta(h) = 0: a lower
    bound of the coverage the LP can reach (its ramp rows only shrink the set). Greedy and vectorised: every hour
    starts at dmin, and the -H * dmin units that sum_h delta = 0 needs go to the hours of least rk first."""
    n_h = rk.shape[1]
    order = np.argsort(rk, axis=1, kind="stable")
    r_sorted = np.take_along_axis(rk, order, 1)
    room = np.maximum(np.take_along_axis(hi, order, 1) - dmin, 0.0)  # what each hour takes above dmin
    before = np.cumsum(room, axis=1) - room
    fill = np.clip(-n_h * dmin - before, 0.0, room)
    return dmin * rk.sum(axis=1) + (r_sorted * fill).sum(axis=1)


def _peak_bound(prep: _Prep, idx: np.ndarray, dmin: float, margin: bool) -> float:
    """An upper bound of the summed peaks (as the LP sees them, with the hull gaps if ``margin``) of the clusters
    ``idx`` over every delta within their bounds."""
    lo = _model_power(prep, idx, np.full((len(idx), prep.n_hours), dmin))
    hi = _model_power(prep, idx, prep.hi[idx])
    return float((np.maximum(lo, hi).max(axis=1) + (prep.gap[idx] if margin else 0.0)).sum())


def _violations(prep: _Prep, idx: np.ndarray, delta: np.ndarray, campus: CampusInput,
                contract_rhs: float | None, margin: bool = False) -> list[str]:
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
        peaks = _model_peaks(prep, idx, delta, margin).sum()
        if peaks > contract_rhs + tol * max(campus.contract_limit_kw, 1.0):
            out.append(f"contract exceeded: {peaks:.6g} kW > {contract_rhs:.6g} kW")
    return out


def _model_peaks(prep: _Prep, idx: np.ndarray, delta: np.ndarray, margin: bool) -> np.ndarray:
    """Each cluster's peak as the LP sees it (with the hull-gap margin if ``margin``)."""
    return _model_power(prep, idx, delta).max(axis=1) + (prep.gap[idx] if margin else 0.0)


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
    # With a contract, the peak rows of a non-convex curve carry its hull gap: the hull under-estimates the true
    # power by at most that much, so the true peaks are then within the contract too.
    margin = finite_contract
    while cand.size:
        solver_used = campus.solver
        rhs = (limit - flat_peak_of_fallbacks()) if finite_contract else None
        res = _solve_lp(prep, cand, campus, contract_rhs=rhs, mode="plan", tie_rel=tie_break, margin=margin)
        solve_seconds += res.seconds
        if res.status == "optimal":
            assert res.delta is not None  # _solve_lp returns a delta with "optimal"
            bad = _violations(prep, cand, res.delta, campus, rhs, margin)
            if bad:
                lp_status = "solver-error"
                mark(cand, REASON_SOLVER_ERROR, "solution failed the checks: " + "; ".join(bad))
                break
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
            res2 = _solve_lp(prep, cand, campus, contract_rhs=None, mode="peak", tie_rel=tie_break, margin=margin)
            solve_seconds += res2.seconds
            if res2.status == "optimal":
                assert res2.delta is not None
                lowest = float(_model_peaks(prep, cand, res2.delta, margin).sum())
                fb = flat_peak_of_fallbacks()
                msg = (f"campus contract {limit:.6g} kW is below the lowest achievable sum of cluster peaks "
                       f"{lowest + fb:.6g} kW ({lowest:.6g} kW for the {cand.size} shapeable cluster(s) at their "
                       f"lowest peaks + {fb:.6g} kW flat peaks of the fallback clusters)"
                       + (", counting the hull gaps of non-convex power curves" if margin else ""))
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


#: The dtype pandas infers for a column of Python strings (pandas 3: its "str" dtype).
_TEXT_DTYPE = pd.Series(["x"]).dtype


def _text(values: list) -> pd.api.extensions.ExtensionArray | np.ndarray:
    """``values`` (strings) as the array a frame column of them would be (object if the strings are not text)."""
    if all(isinstance(v, str) for v in values):
        return pd.array(values, dtype=_TEXT_DTYPE)
    return np.array(values, dtype=object)


def _assemble(prep: _Prep, campus: CampusInput, delta: np.ndarray, solver_used: str, lp_status: str,
              solve_seconds: float, t_start: float, messages: list[str]) -> CampusPlan:
    n_c, n_h = len(prep.names), prep.n_hours
    shaped = np.array([r is None for r in prep.reason])
    delta = np.where(shaped[:, None], delta, 0.0)
    flex = (1.0 + delta) * prep.f[:, None]
    vcc = np.where(shaped[:, None], (prep.m + flex) * prep.r, prep.cap)
    # True power at the planned and at the flat usage (for curve clusters the curve itself, not the LP's hull).
    power = _true_power(prep, delta)
    eta = prep.eta[None, :]
    carbon = power * eta / 1000.0
    flat_carbon = prep.nom * eta / 1000.0
    expected = carbon.sum(axis=1)
    flat = flat_carbon.sum(axis=1)
    # Flexible work's carbon: its marginal power P(U_IF + flexible) - P(U_IF) (pi*(1+delta)*tau/H when linear).
    base = _true_power(prep, delta, inflexible_only=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        saving = np.where(flat > 0, 100.0 * (flat - expected) / flat, 0.0)
        flex_flat = ((prep.nom - base) * eta).sum(axis=1)
        flex_saving = np.where(flex_flat > 0, 100.0 * ((prep.nom - power) * eta).sum(axis=1) / flex_flat, 0.0)
    peak = power.max(axis=1)
    campus_peak = float(peak.sum())
    limit = campus.contract_limit_kw
    contract_ok = campus_peak <= limit * (1 + 1e-6) + 1e-9 if math.isfinite(limit) else True
    if not contract_ok and not any("contract" in msg for msg in messages):
        messages.append(f"campus peak {campus_peak:.6g} kW (all clusters) exceeds the contract {limit:.6g} kW")
    status = np.where(shaped, STATUS_SHAPED, STATUS_FALLBACK)

    hours = (pd.DatetimeIndex(campus.hours) if campus.hours is not None
             else pd.DatetimeIndex([pd.NaT] * n_h, tz="UTC"))
    # The text columns as the frame would infer them from Python strings, built per cluster and repeated per hour
    # (inferring them from C x H Python strings cost more than the rest of the frame).
    names, statuses = _text(prep.names), _text(status.tolist())
    per_hour = np.repeat(np.arange(n_c), n_h)
    hourly = pd.DataFrame({
        "campus": _text([campus.name]).take(np.zeros(n_c * n_h, dtype=np.intp)),
        "cluster": names.take(per_hour),
        "hour_index": np.tile(np.arange(n_h), n_c),
        "hour": hours.take(np.tile(np.arange(n_h), n_c)),
        "status": statuses.take(per_hour),
        "delta": delta.ravel(),
        "vcc_cores": vcc.ravel(),
        "flexible_cpu_cores": flex.ravel(),
        "inflexible_cpu_cores": prep.u.ravel(),
        "inflexible_upper_cpu_cores": prep.u_upper.ravel(),
        "power_kw": power.ravel(),
        "carbon_gco2_per_kwh": np.tile(prep.eta, n_c),
        "carbon_kgco2": carbon.ravel(),
    })  # in the order of HOURLY_COLUMNS
    clusters = pd.DataFrame({
        "campus": _text([campus.name]).take(np.zeros(n_c, dtype=np.intp)),
        "cluster": names,
        "status": statuses,
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
        "power_model": pd.Series(prep.power_model, dtype=object),
    })  # in the order of CLUSTER_COLUMNS
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
    """Per cluster, the derived day targets without solving: Theta, alpha, tau, the flat power peak, the power model
    (``power_model``; ``hull_segments``: segments the LP uses for a curve; ``hull_gap_kw``: how far a non-convex
    curve rises above its hull on the reachable range) and whether the pre-checks already force a fallback
    (``reason``: preset, "no-flexible-work" or "too-full")."""
    prep = _prepare(campus)
    return pd.DataFrame({
        "campus": campus.name, "cluster": prep.names, "theta_core_hours": prep.theta, "alpha": prep.alpha,
        "tau_core_hours": prep.tau, "slope_kw_per_core": prep.slope, "flat_peak_kw": prep.nom.max(axis=1),
        "power_model": pd.Series(prep.power_model, dtype=object), "hull_segments": np.diff(prep.seg_start),
        "hull_gap_kw": prep.gap,
        "reason": pd.Series(prep.reason, dtype=object), "reason_detail": pd.Series(prep.detail, dtype=object),
    })
