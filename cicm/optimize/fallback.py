"""Fallback vocabulary and the per-cluster checks that decide, before any solve, that a cluster cannot be shaped.

A fallback cluster is planned without shaping: its VCC is the full machine capacity every hour and its flexible
usage is planned flat (delta = 0). Its flat power still counts against the campus contract. The reason is always
recorded as a short code (``reason``) plus a human-readable ``reason_detail``; it is never swallowed.
"""
from __future__ import annotations

import numpy as np

from cicm.reasons import ClusterStatus, FallbackCode

STATUS_SHAPED = ClusterStatus.SHAPED
STATUS_FALLBACK = ClusterStatus.FALLBACK

#: Reason codes set by the program (cicm.reasons). Callers may preset any other non-empty code (passed through).
REASON_INSUFFICIENT_HISTORY = FallbackCode.INSUFFICIENT_HISTORY  # typically preset by the caller
REASON_SLO_FEEDBACK = FallbackCode.SLO_FEEDBACK  # typically preset by the caller
REASON_NO_FLEXIBLE_WORK = FallbackCode.NO_FLEXIBLE_WORK  # T_UF = 0: nothing to shape
REASON_TOO_FULL = FallbackCode.TOO_FULL  # Theta > capacity*H, or the floor does not fit, or tau does not fit
REASON_INFEASIBLE = FallbackCode.INFEASIBLE  # no delta satisfies the constraints (per cluster, or the contract)
REASON_SOLVER_ERROR = FallbackCode.SOLVER_ERROR  # the solver raised, returned no solution, or a bad solution

#: Relative tolerance used by the pre-checks (so that a floor exactly at capacity is not "too full").
PRECHECK_RTOL = 1e-9


def too_full_reasons(*, theta: np.ndarray, capacity: np.ndarray, hi: np.ndarray,
                     hi_capacity: np.ndarray, hi_power: np.ndarray, delta_min: float,
                     hour_labels: list[str] | None = None) -> list[str | None]:
    """Per cluster: ``None`` if the cluster may be shaped, else the detail text of a "too-full" fallback.

    All arrays are (C, H) except ``theta`` (C,). ``hi_capacity`` / ``hi_power`` are the per-hour upper bounds on
    delta from machine capacity and from the power cap, ``hi`` the combined upper bound (with delta_max).
    Checked in this order: Theta > sum_h capacity; the floor (inflexible upper quantile plus the flexible floor
    (1+delta_min)*tau/H) above machine capacity or above the power-capped capacity in some hour; tau not fitting
    in the day under the caps (sum_h of the upper bounds < 0, i.e. sum_h (1+hi)*tau/H < tau).
    """
    tol = PRECHECK_RTOL
    n_c, n_h = hi.shape
    cap_day = capacity.sum(axis=1)
    floor_tol = delta_min - tol * max(1.0, abs(delta_min))
    over = theta > cap_day * (1 + tol)
    bad_cap = hi_capacity < floor_tol  # (C, H)
    bad_pow = hi_power < floor_tol
    room = np.maximum(hi, delta_min).sum(axis=1)
    no_room = room < -tol * n_h
    flagged = over | bad_cap.any(axis=1) | bad_pow.any(axis=1) | no_room

    def label(h: int) -> str:
        return hour_labels[h] if hour_labels else f"hour {h}"

    out: list[str | None] = [None] * n_c
    for c in np.flatnonzero(flagged):  # texts only for the flagged clusters
        if over[c]:
            out[c] = (f"capacity requirement Theta={theta[c]:.6g} core-hours exceeds the day's machine capacity "
                      f"{cap_day[c]:.6g} core-hours")
        elif bad_cap[c].any():
            hrs = np.flatnonzero(bad_cap[c])
            out[c] = (f"inflexible upper quantile plus the flexible floor (1+delta_min)*tau/H exceeds machine "
                      f"capacity in {hrs.size} hour(s), first at {label(int(hrs[0]))}")
        elif bad_pow[c].any():
            hrs = np.flatnonzero(bad_pow[c])
            out[c] = (f"inflexible upper quantile plus the flexible floor (1+delta_min)*tau/H exceeds the "
                      f"power-capped capacity in {hrs.size} hour(s), first at {label(int(hrs[0]))}")
        else:
            out[c] = (f"the day's flexible work tau does not fit under the capacity and power caps "
                      f"(at most {100 * (1 + room[c] / n_h):.3g}% of tau fits)")
    return out
