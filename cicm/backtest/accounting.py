"""Power and carbon accounting of simulated usage, and the within-day shifting ceiling. Pure.

Power comes from the SPECpower-derived cluster curve (the same curve the demo power telemetry is generated from,
without its measurement noise): every power domain carries the cluster's load fraction u / capacity, so
P(u) = sum_d machines_d * W_d(u / capacity) / 1000 kW, W_d linear between SPECpower's published load points.

Flexible work is charged its marginal power: P(inflexible + flexible) - P(inflexible). Carbon is power times the
REAL hourly EIA-930 intensity (never the forecast).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cicm.config import Cluster
from cicm.demo.telemetry import SPEC_LOAD_FRACTIONS
from cicm.errors import InputError
from cicm.optimize.inputs import PowerCurve

#: DESIGN.md's ceiling table: best cut (%) in flexible-work carbon from within-day shifting, 2022 EIA-930.
DESIGN_CEILING_PCT = {
    "CISO": (20.6, 10.3), "ERCO": (9.1, 4.6), "AZPS": (7.1, 3.6), "BPAT": (6.5, 3.2),
    "MISO": (4.3, 2.1), "NYIS": (4.2, 2.1), "SOCO": (3.0, 1.5), "PJM": (2.8, 1.4),
}


class ClusterPower:
    """The true (noise-free) cluster power curve P(u), kW, as a callable and as a PowerCurve."""

    def __init__(self, cluster: Cluster):
        self.capacity = float(cluster.capacity_cores)
        watts = np.zeros(len(SPEC_LOAD_FRACTIONS))
        for d in cluster.power_domains:  # each domain's declared curve at the same load fraction
            curve = d.declared_curve_kw()
            if curve is None:
                raise InputError(d.name, "the backtest needs a declared power curve (spec_row or power_points)")
            watts += 1000.0 * np.interp(SPEC_LOAD_FRACTIONS * d.capacity_cores, *curve)
        self.knots_cpu = SPEC_LOAD_FRACTIONS * self.capacity
        self.knots_kw = np.asarray(watts, dtype=float) / 1000.0

    def __call__(self, cpu_cores) -> np.ndarray:
        # Beyond capacity (never reached by the simulator) the last segment is extended.
        u = np.asarray(cpu_cores, dtype=float)
        x, y = self.knots_cpu, self.knots_kw
        inside = np.interp(u, x, y)
        hi_slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
        return np.where(u > x[-1], y[-1] + hi_slope * (u - x[-1]), inside)

    def curve(self) -> PowerCurve:
        return PowerCurve(cpu_cores=self.knots_cpu, power_kw=self.knots_kw)


def window_ceiling_pct(actual_gco2_per_kwh: pd.Series, delta: float = 1.0) -> float:
    """DESIGN's ceiling recomputed on a window: mean over its complete UTC days of the cut in flexible carbon from
    moving delta x flat usage from the 12 dirtiest to the 12 cleanest hours (perfect foresight, no limits)."""
    s = actual_gco2_per_kwh.dropna()
    days = s.groupby(s.index.floor("D"))
    cuts = []
    for _, v in days:
        if len(v) != 24:
            continue
        x = np.sort(v.to_numpy())
        total = x.sum()
        if total > 0:
            cuts.append(delta * (x[12:].sum() - x[:12].sum()) / total)
    return 100.0 * float(np.mean(cuts)) if cuts else float("nan")


def daily_shift_bound_pct(actual_gco2_per_kwh: np.ndarray, flexible_kw: np.ndarray, t0: pd.Timestamp) -> float:
    """The same ceiling computed for a given flexible power trace instead of flat usage: each UTC day's flexible
    energy E_d moved (x 2 in the 12 cleanest hours, 0 in the 12 dirtiest) against that trace's own carbon.
    Used for the report: how far run-on-arrival arrivals already sit from flat."""
    eta = np.asarray(actual_gco2_per_kwh, dtype=float)
    p = np.asarray(flexible_kw, dtype=float)
    hours = pd.date_range(t0, periods=len(eta), freq="h")
    frame = pd.DataFrame({"eta": eta, "p": p, "day": hours.floor("D")})
    base = best = 0.0
    for _, g in frame.groupby("day"):
        if len(g) != 24:
            continue
        e = g["p"].sum()
        base += float((g["p"] * g["eta"]).sum())
        best += float(np.sort(g["eta"].to_numpy())[:12].sum() * e / 12.0)
    return 100.0 * (1.0 - best / base) if base > 0 else float("nan")
