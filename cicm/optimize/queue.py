"""The queue-aware program: plan WHEN flexible work runs, one batched cvxpy LP per campus. Pure: arrays in, arrays out.

The CICM ceiling program (:mod:`cicm.optimize.program`) shapes a padded ceiling over a work-conserving queue; held
work then runs in the first open hour, not the cleanest one. This program plans each cluster's hourly flexible
*service* s(c, h) directly, as a fluid queue (docs/optimizer.md has the derivation and the risk model):

- S(c, h) = sum_{j <= h} s(c, j): cumulative service by the end of hour h (core-hours);
- available: S(c, h) <= avail(c, h), the work that has arrived (and could have run) by then;
- deadlines: S(c, h) + late(c, h) >= must(c, h), the work due by then (planning deadlines); late >= 0 is a soft
  slack priced far above any carbon, so the program always returns a plan and reports the lateness it expects;
- room: 0 <= s(c, h) <= room(c, h) = capacity(c, h) - inflexible upper quantile(c, h);
- optional plan of record, as a cumulative release schedule: S(c, h) <= carry(c) + sum_{j <= h} limit(c, j)
  + sum_{j <= h} over(c, j), over >= 0 priced between carbon and lateness (the intraday correction: never run
  ahead of the day-ahead plan, except where a deadline needs it; ``carry`` is what the plan released earlier in
  the day but the cluster did not run, so a shortfall may be made up in a later planned hour);
- power: z(c, h) >= a_k + b_k * (U_IF(c, h) + s(c, h)) for every segment k of the lower convex hull of the
  cluster's power curve (the epigraph; exact for a convex curve);
- peak: y(c) >= z(c, h) over the committed hours; sum_c y(c) <= the campus contract.

Objective: lambda_e * sum_{c,h} eta(h) z(c, h) / 1000 + lambda_p * sum_c y(c)
           + lambda_e * sum_c leftover(c) * eta_term * b_term(c) / 1000      (work deferred past the horizon)
           + penalties (lateness, over-plan) + a tiny price on waiting (ties go to serving early).

``leftover`` is the work still queued at the end of the horizon; it is charged at the horizon's mean carbon and
the hull slope at the mean inflexible usage: deferring work beyond what the program can see is worth what an
average hour costs, no more (otherwise the last hours would always be emptied).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import cvxpy as cp
from cvxpy.utilities import scopes
import numpy as np
import scipy.sparse as sp

from cicm.errors import InputError
from cicm.optimize.compiled import ProgramCache
from cicm.optimize.curves import CurveTable, lower_hulls
from cicm.optimize.highs import solver_for
from cicm.optimize.inputs import PowerCurve, SOLVERS
from cicm.optimize.storage import CampusStorage, StoragePlan, StorageTerms, plan_storage, read_plan, storage_terms

#: Price of one core-hour of lateness per hour late, and of one core-hour served above the plan of record, in
#: units of the campus's dearest core-hour of carbon (lambda_e * max eta * max slope / 1000). Lateness must cost
#: more than any exceedance, and an exceedance more than any carbon it could save.
LATE_PRICE = 1000.0
OVER_PRICE = 10.0
#: Price of one core-hour waiting one hour, same unit: breaks ties between equally clean hours towards serving
#: early (flat carbon and linear power then give run-on-arrival), far too small to move work for carbon.
WAIT_PRICE = 1e-6
#: Tolerance (core-hours, relative to the work) of the input checks must <= avail.
CHECK_RTOL = 1e-6
SOLVER_OPTIONS: dict[str, dict] = {"HIGHS": {}, "CLARABEL": {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10}}


@dataclass(frozen=True, eq=False)
class QueueCluster:
    """One cluster over the planning horizon (N hours). Core-hours are cumulative from the horizon's start.

    - ``inflexible_cpu_cores[N]``: forecast inflexible usage (draws power).
    - ``inflexible_upper_cpu_cores[N]``: its (1 - gamma) quantile, always admitted: room = capacity - this.
    - ``capacity_cores``: usable cores (power-capped), scalar or N values.
    - ``must_core_hours[N]``: cumulative flexible work due by the end of each hour (non-decreasing, >= 0).
    - ``avail_core_hours[N]``: cumulative flexible work that can have run by the end of each hour (non-decreasing,
      >= must): the backlog plus forecast arrivals, each limited by its width.
    - ``power_curve``: cluster power (kW) against usage (cores).
    - ``limit_cpu_cores[N]``: optional plan of record; running ahead of it is priced (intraday correction).
    - ``carry_core_hours``: released by the plan of record earlier but not run (>= 0), added to its schedule.
    - ``fallback_reason``: preset to leave the cluster unshaped (it then serves as early as it can).
    """

    name: str
    inflexible_cpu_cores: np.ndarray
    inflexible_upper_cpu_cores: np.ndarray
    capacity_cores: float | np.ndarray
    must_core_hours: np.ndarray
    avail_core_hours: np.ndarray
    power_curve: PowerCurve
    limit_cpu_cores: np.ndarray | None = None
    carry_core_hours: float = 0.0
    fallback_reason: str | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if not isinstance(self.name, str) or not self.name.strip():
            raise InputError("name", f"must be a non-empty string, got {self.name!r}")
        u = _vector("inflexible_cpu_cores", self.inflexible_cpu_cores, None)
        n = u.size
        set_("inflexible_cpu_cores", u)
        set_("inflexible_upper_cpu_cores", np.maximum(
            _vector("inflexible_upper_cpu_cores", self.inflexible_upper_cpu_cores, n), u))
        cap = np.broadcast_to(np.asarray(self.capacity_cores, dtype=float), (n,)).copy() \
            if np.ndim(self.capacity_cores) == 0 else _vector("capacity_cores", self.capacity_cores, n)
        if np.isnan(cap).any() or (cap <= 0).any() or np.isinf(cap).any():
            raise InputError("capacity_cores", "must be finite and > 0")
        set_("capacity_cores", cap)
        must = _vector("must_core_hours", self.must_core_hours, n)
        avail = _vector("avail_core_hours", self.avail_core_hours, n)
        scale = max(float(avail[-1]), 1.0)
        for name, arr in (("must_core_hours", must), ("avail_core_hours", avail)):
            if (np.diff(arr) < -CHECK_RTOL * scale).any():
                raise InputError(name, "must be cumulative (non-decreasing)")
        if (must > avail + CHECK_RTOL * scale).any():
            h = int(np.argmax(must - avail))
            raise InputError("must_core_hours", f"hour {h}: {must[h]:.6g} core-hours due but only "
                                                f"{avail[h]:.6g} can have run (must <= avail)")
        set_("must_core_hours", np.minimum(np.maximum.accumulate(must), avail))
        set_("avail_core_hours", np.maximum.accumulate(avail))
        if not isinstance(self.power_curve, PowerCurve):
            raise InputError("power_curve", f"must be a PowerCurve, got {type(self.power_curve).__name__}")
        if self.limit_cpu_cores is not None:
            set_("limit_cpu_cores", _vector("limit_cpu_cores", self.limit_cpu_cores, n))
        carry = float(self.carry_core_hours)
        if not np.isfinite(carry) or carry < 0:
            raise InputError("carry_core_hours", f"must be finite and >= 0, got {self.carry_core_hours!r}")
        set_("carry_core_hours", carry)

    @property
    def hours(self) -> int:
        return int(self.inflexible_cpu_cores.size)

    @property
    def room_cpu_cores(self) -> np.ndarray:
        return np.maximum(self.capacity_cores - self.inflexible_upper_cpu_cores, 0.0)


@dataclass(frozen=True, eq=False)
class QueueCampus:
    """A campus over the horizon: its clusters, the carbon forecast, and which hours are committed (the planning
    day; the rest is look-ahead, planned but not enforced). ``contract_kw`` bounds the sum of the clusters' peaks
    over the committed hours (inf = none)."""

    name: str
    clusters: tuple[QueueCluster, ...]
    carbon_gco2_per_kwh: np.ndarray
    committed: np.ndarray | None = None  # (N,) bool; default: every hour
    contract_kw: float = float("inf")
    lambda_e: float = 1.0
    lambda_p: float = 0.0
    solver: str = "HIGHS"
    #: battery and solar (docs/storage_coplan.md): the program then plans the campus meter; None: unchanged
    storage: CampusStorage | None = None

    def __post_init__(self):
        if not self.clusters:
            raise InputError("clusters", "a campus needs at least one cluster")
        n = self.clusters[0].hours
        for i, c in enumerate(self.clusters):
            if c.hours != n:
                raise InputError(f"clusters[{i}].inflexible_cpu_cores", f"has {c.hours} hours, expected {n}")
        names = [c.name for c in self.clusters]
        if len(set(names)) != len(names):
            raise InputError("clusters", "cluster names must be unique in a campus")
        eta = _vector("carbon_gco2_per_kwh", self.carbon_gco2_per_kwh, n)
        object.__setattr__(self, "carbon_gco2_per_kwh", eta)
        com = np.ones(n, bool) if self.committed is None else np.asarray(self.committed, dtype=bool)
        if com.shape != (n,) or not com.any():
            raise InputError("committed", f"must be {n} booleans with at least one True")
        object.__setattr__(self, "committed", com)
        for name in ("lambda_e", "lambda_p"):
            v = getattr(self, name)
            if not np.isfinite(v) or v < 0:
                raise InputError(name, f"must be finite and >= 0, got {v!r}")
        if self.lambda_e == 0 and self.lambda_p == 0:
            raise InputError("lambda_e", "lambda_e and lambda_p cannot both be 0")
        if np.isnan(self.contract_kw) or self.contract_kw <= 0:
            raise InputError("contract_kw", f"must be > 0, got {self.contract_kw!r}")
        if self.solver not in SOLVERS:
            raise InputError("solver", f"unknown solver {self.solver!r}; choose from {', '.join(SOLVERS)}")
        if self.storage is not None:
            if not isinstance(self.storage, CampusStorage):
                raise InputError("storage", f"must be a CampusStorage, got {type(self.storage).__name__}")
            self.storage.check(n)


@dataclass(frozen=True, eq=False)
class QueuePlan:
    """The plan: (C, N) arrays in the campus's cluster order.

    ``service_cpu_cores``: planned flexible usage per hour; ``late_core_hours``: planned shortfall against the
    planning deadlines at the end of each hour (0 when every deadline is met); ``over_cpu_cores``: service above
    the plan of record; ``leftover_core_hours`` (C,): work queued at the horizon's end; ``status``: ``"optimal"``
    or ``"fallback"`` per cluster, ``reason`` its cause (None when shaped); ``room_cpu_cores`` the room the
    program planned within."""

    clusters: tuple[str, ...]
    service_cpu_cores: np.ndarray
    late_core_hours: np.ndarray
    over_cpu_cores: np.ndarray
    leftover_core_hours: np.ndarray
    status: tuple[str, ...]
    reason: tuple[str | None, ...]
    room_cpu_cores: np.ndarray
    solver: str
    solve_seconds: float
    detail: dict = field(default_factory=dict)
    storage: StoragePlan | None = None  # the campus meter, when the campus has storage


def _vector(name: str, value, n: int | None) -> np.ndarray:
    if value is None:
        raise InputError(name, "is required")
    try:
        arr = np.array(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise InputError(name, f"is not numeric ({exc})") from None
    if arr.ndim != 1 or arr.size == 0:
        raise InputError(name, f"must be a non-empty 1-D array, got shape {arr.shape}")
    if n is not None and arr.size != n:
        raise InputError(name, f"has {arr.size} values, expected {n} (one per hour)")
    if not np.isfinite(arr).all():
        raise InputError(name, "contains NaN or an infinite value")
    if (arr < 0).any():
        raise InputError(name, f"must be >= 0, got {arr.min():g}")
    return arr


def greedy_service(must: np.ndarray, avail: np.ndarray, room: np.ndarray) -> np.ndarray:
    """Run-on-arrival: serve whatever is available as soon as the room allows (the carbon-agnostic schedule of
    the fluid queue, and the plan of an unshaped cluster). Arrays (N,) or (clusters, N), hours last."""
    avail = np.asarray(avail, dtype=float)
    room = np.broadcast_to(np.asarray(room, dtype=float), avail.shape)
    served = np.zeros(avail.shape[:-1])
    out = np.zeros_like(avail)
    for h in range(avail.shape[-1]):
        out[..., h] = np.maximum(np.minimum(room[..., h], avail[..., h] - served), 0.0)
        served = served + out[..., h]
    return out


def plan_queue(campus: QueueCampus) -> QueuePlan:
    """Solve the campus's queue program (see the module docstring). Clusters with a preset fallback serve
    run-on-arrival and are not in the LP; a solver failure falls every cluster back the same way, with a reason."""
    t0 = time.perf_counter()
    n = campus.clusters[0].hours
    shaped = [i for i, c in enumerate(campus.clusters) if c.fallback_reason is None]
    n_c = len(campus.clusters)
    service = np.zeros((n_c, n))
    late = np.zeros((n_c, n))
    over = np.zeros((n_c, n))
    status = ["fallback"] * n_c
    reason: list[str | None] = [c.fallback_reason for c in campus.clusters]
    rooms = np.stack([c.room_cpu_cores for c in campus.clusters])
    service[:] = greedy_service(np.stack([c.must_core_hours for c in campus.clusters]),
                                np.stack([c.avail_core_hours for c in campus.clusters]), rooms)
    detail: dict = {}
    st = campus.storage
    if st is not None:  # the unshaped clusters' power is load the program cannot move
        fixed = sum((c.power_curve(c.inflexible_cpu_cores + service[i]) for i, c in enumerate(campus.clusters)
                     if i not in shaped), np.zeros(n))
        st = replace(st, other_load_kw=st.other(n) + fixed)
    terms = None
    if shaped:
        try:
            s, lt, ov, terms = _solve(campus, [campus.clusters[i] for i in shaped], st)
            for k, i in enumerate(shaped):
                service[i], late[i], over[i] = s[k], lt[k], ov[k]
                status[i], reason[i] = "optimal", None
        except _SolveFailed as exc:
            detail["solver_error"] = str(exc)
            for i in shaped:
                reason[i] = "solver-error"
    storage_plan = None
    if st is not None:
        if shaped and terms is None:  # the solver failed: every cluster serves run-on-arrival
            st = replace(st, other_load_kw=st.other(n) + sum(
                (campus.clusters[i].power_curve(campus.clusters[i].inflexible_cpu_cores + service[i])
                 for i in shaped), np.zeros(n)))
        load = sum((campus.clusters[i].power_curve(campus.clusters[i].inflexible_cpu_cores + service[i])
                    for i in shaped if terms is not None), np.zeros(n))
        if not shaped:  # nothing to shape: the battery alone
            storage_plan = plan_storage(np.zeros(n), campus.carbon_gco2_per_kwh, st, committed=campus.committed,
                                        contract_kw=campus.contract_kw, lambda_e=campus.lambda_e,
                                        lambda_p=campus.lambda_p, solver=campus.solver)[0]
        else:
            storage_plan = read_plan(st, terms, load)
    left = np.array([c.avail_core_hours[-1] for c in campus.clusters]) - service.sum(axis=1)
    return QueuePlan(tuple(c.name for c in campus.clusters), service, late, over, np.maximum(left, 0.0),
                     tuple(status), tuple(reason), rooms,
                     campus.solver, time.perf_counter() - t0, detail, storage_plan)


class _SolveFailed(RuntimeError):
    pass


def _solve(campus: QueueCampus, clusters: list[QueueCluster], storage: CampusStorage | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, StorageTerms | None]:
    n_c, n = len(clusters), clusters[0].hours
    u = np.stack([c.inflexible_cpu_cores for c in clusters])
    room = np.stack([c.room_cpu_cores for c in clusters])
    must = np.stack([c.must_core_hours for c in clusters])
    avail = np.stack([c.avail_core_hours for c in clusters])
    eta = campus.carbon_gco2_per_kwh
    table = CurveTable.pack([c.power_curve for c in clusters])
    hulls = lower_hulls(table, u.min(axis=1), (u + room).max(axis=1), convex_rtol=1e-9)
    a, b = hulls.padded()  # (C, K)
    # Scale: core-hours in units of each cluster's largest room (well-conditioned for any cluster size).
    scale = np.maximum(room.max(axis=1), 1e-9)[:, None]
    unit = campus.lambda_e * max(float(eta.max()), 1e-9) * max(float(b.max()), 1e-9) / 1000.0  # per core-hour
    if campus.lambda_e == 0:
        unit = campus.lambda_p * max(float(b.max()), 1e-9)
    # The LP is sparse by construction (2.5x faster in HiGHS than the dense form with cumulative sums as a
    # triangular matrix product and one epigraph row per hull segment, same optimum):
    # - the decision is the cumulative service S (bounds 0 <= S <= avail), the hourly service its difference;
    # - power is the hull filled segment by segment: usage = hull start + sum_k fill_k, 0 <= fill_k <= width_k,
    #   power = P(hull start) + sum_k slope_k fill_k (the hull is convex, so the cheapest fill is in order).
    count = np.diff(hulls.start)
    k_max = int(count.max())
    seg = hulls.start[:-1, None] + np.arange(k_max)[None, :]
    real = np.arange(k_max)[None, :] < count[:, None]
    seg = np.where(real, seg, 0)
    width = np.where(real, hulls.x1[seg] - hulls.x0[seg], 0.0)
    slope = np.where(real, hulls.b[seg], 0.0)
    x_first = hulls.x0[hulls.start[:-1]]
    p_first = hulls.a[hulls.start[:-1]] + hulls.b[hulls.start[:-1]] * x_first
    # One stacked variable X, every row block a sparse matrix (docs/optimizer.md, Speed): cvxpy compiles a few
    # matrix products instead of a tree of atoms. The columns and rows are those the expression form (fill, S,
    # late[, over][, y] as matrix variables, flattened column-major) compiled to, in the same order and with the
    # same coefficients, so HiGHS gets the same LP. The structure (which rows and columns, their 0/±1 pattern) is
    # built once per shape and kept compiled (:func:`_program`); the data below are its parameters.
    lim_list = [c.limit_cpu_cores for c in clusters]
    has_ov = any(lim is not None for lim in lim_list)
    nch = n_c * n  # cluster-hours; (c, h) is column-major index c + n_c * h
    n_fill = nch * k_max  # fill (c * n + h, k) is index (c * n + h) + nch * k
    o_s, o_lat = n_fill, n_fill + nch
    o_ov = o_lat + nch
    n_x = o_ov + (nch if has_ov else 0)
    peak_possible = storage is None and (campus.lambda_p > 0 or np.isfinite(campus.contract_kw))
    ch_rows = (np.arange(n_c)[:, None] * n + np.arange(n)[None, :])  # (C, N) -> fill row c * n + h
    fill_idx = ch_rows[:, :, None] + nch * np.arange(k_max)[None, None, :]  # (C, N, K)
    caps = np.repeat(width / scale, n, axis=0)  # (C * n, K), row c * n + h
    s_hi = (avail / scale).ravel(order="F")
    upper = np.concatenate([caps.ravel(order="F"), s_hi, np.full(n_x - o_lat, np.inf)])
    s_rep = np.repeat(slope * scale, n, axis=0)  # (C * n, K): kW per unit fill
    kw = s_rep[ch_rows]  # (C, N, K)
    c_obj = np.zeros(n_x)
    if storage is None:
        c_obj[fill_idx.ravel()] = campus.lambda_e * ((eta / 1000.0)[None, :, None] * kw).ravel()
    eta_term = float(eta.mean())
    slope_term = table.slope_at(u.mean(axis=1, keepdims=True))[:, 0]
    k_left = campus.lambda_e * eta_term / 1000.0
    k_wait, k_late = unit * WAIT_PRICE, unit * LATE_PRICE
    c_s = np.broadcast_to(-(k_wait * scale), (n_c, n)).copy()
    c_s[:, n - 1] = -(k_left * (slope_term * scale[:, 0])) + c_s[:, n - 1]  # leftover (work queued at the end)
    c_lat = np.broadcast_to(k_late * scale, (n_c, n))
    c_obj[o_s:o_lat] = c_s.ravel(order="F")
    c_obj[o_lat:o_lat + nch] = c_lat.ravel(order="F")
    # The data of the LP: the fill and cumulative-service bounds, the objective, and every right-hand side in one
    # vector (room, must, start[, released][, peak constants, contract]), the order of :class:`_QueueProgram`'s rows.
    rhs = [(room / scale).ravel(order="F"), (must / scale).ravel(order="F"),
           ((u - x_first[:, None]) / scale).ravel(order="F")]
    if has_ov:
        lim = np.stack([room[i] if cap is None else np.minimum(cap, room[i]) for i, cap in enumerate(lim_list)])
        carry = np.array([c.carry_core_hours for c in clusters])[:, None]
        # S(c, h) <= (carry + cumulative plan of record) / scale + sum_{j <= h} over(c, j)
        rhs.append(((carry + np.cumsum(lim, axis=1)) / scale).ravel(order="F"))
        c_obj[o_ov:o_ov + nch] = np.broadcast_to(unit * OVER_PRICE * scale, (n_c, n)).ravel(order="F")
    assert campus.committed is not None  # QueueCampus.__post_init__ fills the default
    com = np.flatnonzero(campus.committed)
    # The contract rows (one per cluster and committed hour) are only added when they can bind: with no price on
    # the peak and the summed peaks bounded below the contract whatever the plan, they cut nothing off. The bound:
    # a cluster serves at most min(room, avail) in an hour, and its hull is convex, so its power in the hour is at
    # most the hull at U_IF or at U_IF + that. The solution is checked against the contract afterwards, and the
    # rows are added and the LP solved again if it fails (it cannot when the fills in order).
    peak_rows = peak_possible
    if peak_rows and campus.lambda_p == 0 and _peak_bound(u, np.minimum(room, avail), a, b, com) \
            <= campus.contract_kw * (1 - CHECK_RTOL):
        peak_rows = False
    kw_com = kw[:, com, :]  # kW per unit fill in the committed hours, (C, ncom, K)
    terms = None
    data: dict[str, Any]
    if storage is not None:  # the campus meter: grid = load - solar - discharge + charge, charged at the carbon
        shape = _Shape(n_c, n, k_max, has_ov, False, False, com.tobytes())
        x_var = cp.Variable(n_x, bounds=[np.zeros(n_x), upper])
        load_rows = np.broadcast_to(np.arange(n)[None, :, None], (n_c, n, k_max)).ravel()
        load = sp.csr_matrix((kw.ravel(), (load_rows, fill_idx.ravel())), shape=(n, n_x)) @ x_var \
            + float(p_first.sum())
        terms = storage_terms(storage, load, eta, np.asarray(campus.committed), campus.contract_kw,
                              campus.lambda_e, campus.lambda_p)
        data = {"upper": upper, "c": c_obj, "rhs": np.concatenate(rhs)}
        prog = _QueueProgram(shape, data, parametric=False, x=x_var, extra=(terms.objective, terms.constraints))
        xv = prog.solve(campus.solver, data)
    else:
        for attempt in range(2):
            contract_row = peak_rows and bool(np.isfinite(campus.contract_kw))
            shape = _Shape(n_c, n, k_max, has_ov, bool(peak_rows), contract_row, com.tobytes())
            data = {"upper": upper, "c": c_obj}
            if peak_rows:
                kw_fill = np.zeros(n_fill)
                kw_fill[fill_idx.ravel()] = kw.ravel()
                data.update(kw_fill=kw_fill, lambda_p=campus.lambda_p)
                data["rhs"] = np.concatenate(rhs + [-np.repeat(p_first[:, None], com.size, axis=1).ravel(order="F")]
                                             + ([np.array([campus.contract_kw])] if contract_row else []))
            else:
                data["rhs"] = np.concatenate(rhs)
            xv = _solve_cached(campus.solver, shape, data)
            if peak_rows or not np.isfinite(campus.contract_kw):
                break
            # z(c, h) over the committed hours, kW (the peak rows' left-hand side, summed over the fills in order)
            z_val = (kw_com * xv[fill_idx[:, com, :]]).sum(axis=2) + p_first[:, None]
            if float(z_val.max(axis=1).sum()) <= campus.contract_kw * (1 + CHECK_RTOL):
                break
            peak_rows = True  # the bound was wrong (it cannot be with fills in order): plan again with the rows
    s_val = xv[o_s:o_lat].reshape((n_c, n), order="F")
    s = np.clip(np.diff(s_val, axis=1, prepend=0.0) * scale, 0.0, room)
    late_v = np.maximum(xv[o_lat:o_lat + nch].reshape((n_c, n), order="F") * scale, 0.0)
    over_v = np.zeros_like(s) if not has_ov else np.maximum(xv[o_ov:o_ov + nch].reshape((n_c, n), order="F")
                                                            * scale, 0.0)
    return s, late_v, over_v, terms


# ------------------------------------------------------------------------------------------ the compiled LP


class _BoundedVariable(cp.Variable):
    """A variable whose bounds are Parameters, and still DPP in products with Parameters.

    cvxpy (1.9) lets bounds be Parameters (they become a parameter-to-bounds map like the rest of the data), but a
    variable with such bounds reports their parameters as its own, so ``parameter @ x`` is not "parameter-affine
    times parameter-free" and the problem is not DPP: it would be compiled again on every solve. The bounds do not
    enter any product, so under the DPP analysis (``scopes.dpp_scope``) this variable is parameter-free; everywhere
    else (the problem's parameters, the bounds map) it reports them as before."""

    def parameters(self):
        return [] if scopes.dpp_scope_active() else super().parameters()


@dataclass(frozen=True)
class _Shape:
    """Everything the queue LP's structure depends on (the key of a compiled program): clusters, hours, hull
    segments (padded), whether there is a plan of record, whether the peak rows and the contract row are built,
    and the committed hours (the peak rows' hours)."""

    n_c: int
    n: int
    k_max: int
    has_ov: bool
    peak_rows: bool
    contract_row: bool
    committed: bytes  # np.flatnonzero(committed).tobytes()

    @property
    def com(self) -> np.ndarray:
        return np.frombuffer(self.committed, dtype=np.intp)

    @property
    def n_x(self) -> int:
        nch = self.n_c * self.n
        return nch * (self.k_max + 2 + (1 if self.has_ov else 0))


class _QueueProgram:
    """The queue LP of one :class:`_Shape` as a cvxpy problem, its data (``upper``: the column bounds, ``c``: the
    objective, ``rhs``: the right-hand sides in row order; with peak rows ``kw_fill``: kW per unit fill, and
    ``lambda_p``) either constants (``parametric=False``: a one-off problem, compiled like any cvxpy problem) or
    ``cp.Parameter`` s (DPP: compiled on the first solve into a parameter-to-LP map, re-solved with new values
    after, see :mod:`cicm.optimize.compiled`). Both give HiGHS the same LP, bit for bit. ``x`` and ``extra`` (the
    storage terms' objective and constraints on ``x``) are for the campus-meter program, always a one-off."""

    def __init__(self, shape: _Shape, data: dict, parametric: bool, x: cp.Variable | None = None,
                 extra: tuple | None = None):
        self.shape = shape
        n_c, n, k_max, nch = shape.n_c, shape.n, shape.k_max, shape.n_c * shape.n
        n_fill, n_x = nch * k_max, shape.n_x
        o_s, o_lat, o_ov = n_fill, n_fill + nch, n_fill + 2 * nch
        com = shape.com
        n_peak = n_c * com.size if shape.peak_rows else 0
        n_rhs = nch * (4 if shape.has_ov else 3) + n_peak + (1 if shape.contract_row else 0)
        self.parametric = parametric
        self.params: dict[str, cp.Parameter] = {}

        def value(name: str, size: int | None = None, **attrs):
            if not parametric:
                return data[name]
            p = cp.Parameter(size, name=name, **attrs) if size is not None else cp.Parameter(name=name, **attrs)
            self.params[name] = p
            return p

        if x is None:
            x = _BoundedVariable(n_x, bounds=[np.zeros(n_x), value("upper", n_x)]) if parametric else \
                cp.Variable(n_x, bounds=[np.zeros(n_x), data["upper"]])
        self.x = X = x
        rhs = value("rhs", n_rhs)
        at = [0]

        def take(size: int):
            at[0] += size
            return rhs[at[0] - size:at[0]]

        csr = lambda vals, r, c, m, cols=n_x: sp.csr_matrix((vals, (r, c)), shape=(m, cols))  # noqa: E731
        cf = (np.arange(n_c)[:, None] + n_c * np.arange(n)[None, :])  # (C, N) -> column-major index
        ch_rows = (np.arange(n_c)[:, None] * n + np.arange(n)[None, :])  # (C, N) -> fill row c * n + h
        fill_idx = ch_rows[:, :, None] + nch * np.arange(k_max)[None, None, :]  # (C, N, K)
        # service / scale: x(c, h) = S(c, h) - S(c, h - 1)
        later = cf[:, 1:].ravel()
        service = csr(np.r_[np.ones(nch), -np.ones(later.size)], np.r_[cf.ravel(), later],
                      np.r_[o_s + cf.ravel(), o_s + cf[:, :-1].ravel()], nch)
        cum_late = csr(np.ones(2 * nch), np.r_[cf.ravel(), cf.ravel()], np.r_[o_s + cf.ravel(), o_lat + cf.ravel()],
                       nch)
        fill_sum = csr(np.ones(n_fill), np.repeat(cf[:, :, None], k_max, axis=2).ravel(), fill_idx.ravel(), nch)
        cons = [service @ X >= 0, service @ X <= take(nch), cum_late @ X >= take(nch),
                (fill_sum - service) @ X == take(nch)]
        if extra is not None:
            cons += extra[1]
        if shape.has_ov:
            hh, jj = np.tril_indices(n)
            rows_ov = (np.arange(n_c)[:, None] + n_c * hh[None, :]).ravel()
            cols_ov = (o_ov + np.arange(n_c)[:, None] + n_c * jj[None, :]).ravel()
            plan_rec = csr(np.r_[np.ones(nch), -np.ones(rows_ov.size)], np.r_[cf.ravel(), rows_ov],
                           np.r_[o_s + cf.ravel(), cols_ov], nch)
            cons.append(plan_rec @ X <= take(nch))
        objective = value("c", n_x) @ X
        if extra is not None:
            objective = extra[0] + objective
        if shape.peak_rows:  # y(c) >= z(c, h) over the committed hours; sum_c y(c) <= the contract
            y = cp.Variable(n_c)
            pc = (np.arange(n_c)[:, None] + n_c * np.arange(com.size)[None, :])  # (C, ncom) column-major
            rows = np.repeat(pc[:, :, None], k_max, axis=2).ravel()
            cols = fill_idx[:, com, :].ravel()
            if parametric:  # z = (0/1 pattern) @ (kW per unit fill * fill): the same coefficients
                z = csr(np.ones(rows.size), rows, cols, n_peak, n_fill) @ cp.multiply(value("kw_fill", n_fill),
                                                                                     X[:n_fill])
            else:
                z = csr(data["kw_fill"][cols], rows, cols, n_peak) @ X
            rep = csr(np.ones(n_peak), np.arange(n_peak), np.tile(np.arange(n_c), com.size), n_peak, n_c)
            cons.append(z - rep @ y <= take(n_peak))
            if shape.contract_row:
                cons.append(cp.sum(y) <= take(1)[0])
            objective = objective + value("lambda_p", nonneg=True) * cp.sum(y)
        assert at[0] == n_rhs
        self.problem = cp.Problem(cp.Minimize(objective), cons)

    def solve(self, solver: str, data: dict) -> np.ndarray:
        """Solve with ``data`` (the parameters' values; a one-off problem has them already) and return X."""
        for name, p in self.params.items():
            v = data[name]
            if np.shape(v) != p.shape:  # a wrong key would re-use a program of another shape
                raise ValueError(f"queue program {self.shape}: {name} has shape {np.shape(v)}, expected {p.shape}")
            p.value = v
        prob = self.problem
        try:
            prob.solve(solver=solver_for(solver), ignore_dpp=not self.parametric,
                       **SOLVER_OPTIONS.get(solver, {}))
        except cp.error.SolverError as exc:
            raise _SolveFailed(f"{solver}: {exc}") from None
        if prob.status not in ("optimal", "optimal_inaccurate") or self.x.value is None:
            raise _SolveFailed(f"{solver} returned {prob.status}")
        return np.asarray(self.x.value)


#: Compiled queue programs by (solver, shape); see :mod:`cicm.optimize.compiled`. A shape is compiled as a DPP
#: program the second time it is solved (the first solve builds a one-off problem: cheaper to compile once, and
#: the backtest's shrinking horizons at a window's end are one-off shapes), and only while its LP has at most
#: ``max_columns`` columns. ``PROGRAMS.maxsize = 0`` turns the cache off.
PROGRAMS: ProgramCache[_QueueProgram] = ProgramCache()
#: A program with peak rows counts this many times its columns against ``PROGRAMS.max_columns``: cvxpy compiles
#: ``R @ multiply(kw, fills)`` (a Parameter times an expression) through a stacked matrix that grows with the fill
#: parameters times the peak rows (compile and memory at 42 hours: 10 clusters 0.25 s / 0.09 GB; 30 clusters
#: 1.9 s / 0.8 GB; 100 clusters 26 s / 11 GB), so only programs up to about 10 clusters are compiled with them.
PEAK_ROWS_WEIGHT = 10


def _solve_cached(solver: str, shape: _Shape, data: dict) -> np.ndarray:
    key = (solver, shape)
    prog = PROGRAMS.take(key)
    columns = shape.n_x * (PEAK_ROWS_WEIGHT if shape.peak_rows else 1)
    if prog is None:
        if not PROGRAMS.compile_now(key, columns):
            return _QueueProgram(shape, data, parametric=False).solve(solver, data)
        prog = _QueueProgram(shape, data, parametric=True)
    xv = prog.solve(solver, data)  # a failed program is not kept: its cvxpy problem may hold a half-done state
    PROGRAMS.put(key, prog, columns)
    return xv


def _peak_bound(u: np.ndarray, most: np.ndarray, a: np.ndarray, b: np.ndarray, com: np.ndarray) -> float:
    """An upper bound of the clusters' summed peaks over the committed hours ``com`` whatever the plan: each
    cluster's convex hull (padded intercepts ``a``, slopes ``b``, (C, K)) is largest at an end of the usage range
    [U_IF, U_IF + most] of each hour."""
    lo, hi = u[:, com], (u + most)[:, com]
    hull = lambda x: (a[:, None, :] + b[:, None, :] * x[:, :, None]).max(axis=2)  # noqa: E731
    return float(np.maximum(hull(lo), hull(hi)).max(axis=1).sum())


# ------------------------------------------------------------------------------------------ queue bounds


def ramps(ends_h: np.ndarray, start_h: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """sum_k weight_k * max(0, e - start_k) for every e in ``ends_h``, in O((K + N) log K). ``start_h`` and
    ``weight`` (K,) give (N,); (C, K) give (C, N), a row per cluster (pad a row with weight 0: it adds nothing)."""
    ends_h = np.asarray(ends_h, dtype=float)
    start, w = np.asarray(start_h, float), np.asarray(weight, float)
    if start.ndim == 1:  # one row: the same sums, with a binary search instead of a comparison per (end, start)
        if start.size == 0:
            return np.zeros(ends_h.size)
        order = np.argsort(start, kind="stable")
        b, c = start[order], w[order]
        cum_c = np.concatenate([[0.0], np.cumsum(c)])
        cum_cb = np.concatenate([[0.0], np.cumsum(c * b)])
        k = np.searchsorted(b, ends_h, side="left")  # starts before each end
        return ends_h * cum_c[k] - cum_cb[k]
    if start.shape[1] == 0:
        return np.zeros((start.shape[0], ends_h.size))
    order = np.argsort(start, axis=1, kind="stable")
    b, c = np.take_along_axis(start, order, axis=1), np.take_along_axis(w, order, axis=1)
    zero = np.zeros((start.shape[0], 1))
    cum_c = np.concatenate([zero, np.cumsum(c, axis=1)], axis=1)
    cum_cb = np.concatenate([zero, np.cumsum(c * b, axis=1)], axis=1)
    k = (b[:, None, :] < ends_h[None, :, None]).sum(axis=2)  # searchsorted(b, ends, "left") per row
    return ends_h * np.take_along_axis(cum_c, k, axis=1) - np.take_along_axis(cum_cb, k, axis=1)


def task_bounds(n_hours: int, arrival_h: np.ndarray, work_h: np.ndarray, cpu_cores: np.ndarray,
                deadline_h: np.ndarray, margin_hours: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (must, avail) core-hours at the end of each of ``n_hours`` hours for known tasks (the measured
    backlog, or every arrival for perfect foresight). Times in hours from the horizon's start (a backlog task has
    arrival <= 0). A task runs at most ``cpu_cores`` wide for ``work_h`` hours: by time e it can have done
    c * clip(e - a, 0, w), and must have done c * clip(e - (d' - w), 0, w) to finish by its planning deadline
    d' = deadline - margin (never earlier than a + w: a margin alone cannot make a task late). Task arrays (K,)
    give (N,) bounds; (C, K) give (C, N), one row per cluster (padding tasks with ``cpu_cores`` 0 add nothing)."""
    a = np.maximum(np.asarray(arrival_h, float), 0.0)
    w = np.asarray(work_h, float)
    c = np.asarray(cpu_cores, float)
    d = np.maximum(np.asarray(deadline_h, float) - margin_hours, a + w)
    ends = np.arange(1, n_hours + 1, dtype=float)
    avail = ramps(ends, a, c) - ramps(ends, a + w, c)
    must = ramps(ends, d - w, c) - ramps(ends, d, c)
    return must, avail


def arrival_bounds(arrivals_core_hours: np.ndarray, deadline_hours: float) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (must, avail) of forecast hourly arrivals (core-hours arriving in each hour, widths unknown):
    available from their hour, due ``deadline_hours`` after it (whole hours, at least 1). (N,) or (C, N)."""
    arr = np.asarray(arrivals_core_hours, float)
    lag = max(int(np.floor(deadline_hours)), 1)
    n = arr.shape[-1]
    avail = np.cumsum(arr, axis=-1)
    must = np.concatenate([np.zeros(arr.shape[:-1] + (min(lag, n),)), avail[..., : max(n - lag, 0)]], axis=-1)
    return must, avail


def risk_margin(service: np.ndarray, room: np.ndarray, extra_core_hours: float) -> np.ndarray:
    """Spread ``extra_core_hours`` (the upper-quantile arrivals beyond the central forecast) over the hours the
    plan releases work, in proportion to the planned service, within the room left. Held hours get none."""
    total = float(service.sum())
    if extra_core_hours <= 0 or total <= 0:
        return np.zeros_like(service)
    return np.minimum(service / total * extra_core_hours, np.maximum(room - service, 0.0))


def correction_cap(service: np.ndarray, late: np.ndarray, room: np.ndarray, rtol: float = 1e-6) -> float:
    """The admission cap of the hour from a re-plan: its first hour's service, or no cap at all when the re-plan
    is saturated (it expects to miss a planning deadline, or runs the hour at the room it assumed): holding
    nothing back then, the machines take what they can, since the room the program assumes is only a forecast."""
    scale = max(float(room.max()), 1.0)
    if late.sum() > rtol * scale or service[0] >= room[0] - rtol * scale:
        return float("inf")
    return float(service[0])


def fifo_backlog(arrived_core_hours: np.ndarray, served_core_hours: np.ndarray) -> np.ndarray:
    """Work still queued from each hour's arrivals when flexible work is served first-in first-out: the hourly
    arrivals and service of a window that began with an empty queue. Pure. (N,) or (C, N), a window per row
    (pad a row with zeros at its end)."""
    arrived = np.asarray(arrived_core_hours, float)
    cum_a = np.cumsum(arrived, axis=-1)
    served = np.sum(served_core_hours, axis=-1, keepdims=arrived.ndim > 1)
    return np.clip(cum_a - np.maximum(served, cum_a - arrived), 0.0, arrived)
