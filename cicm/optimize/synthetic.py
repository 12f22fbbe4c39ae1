"""Synthetic but realistic campus inputs around a (real) carbon day, for benchmarks, demos and tests.

Pure: the caller passes the carbon-intensity day (e.g. one UTC day of the bundled EIA-930 traces); this module only
draws cluster loads and capacities from a seeded generator. Shapes follow the usual datacenter pattern: a diurnal
inflexible load at 30-55% of capacity, a flexible share of 15-40% of usage, reservations 1.2-1.8x usage, and a
power curve that is either

- ``"concave"`` (the default): three segments, 35-50% idle power, kW per core falling by segment; or
- ``"specpower"``: the shape of published SPECpower_ssj2008 server curves, 11 points at 0, 10, ..., 100% load:
  20-35% idle power, a steep first 10%, then slopes rising about threefold from 10% to 100% load, with +-10%
  noise per segment (so, like the real curves, convex only approximately).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cicm.optimize.inputs import CampusInput, ClusterInput, PowerCurve


CURVE_SHAPES = ("concave", "specpower")


def _power_curve(usage_capacity: float, rng: np.random.Generator, shape: str) -> PowerCurve:
    p_max = usage_capacity * rng.uniform(0.008, 0.012)  # kW at full load
    if shape == "concave":
        # Concave 3-segment power curve over [0, usage_capacity]: 35-50% idle, kW per core falling by segment.
        idle = p_max * rng.uniform(0.35, 0.50)
        xs = np.linspace(0.0, usage_capacity, 4)
        incr = np.array([1.2, 1.0, 0.8])
    elif shape == "specpower":
        idle = p_max * rng.uniform(0.20, 0.35)
        xs = np.linspace(0.0, usage_capacity, 11)
        incr = np.concatenate([[rng.uniform(1.5, 2.5)], np.linspace(0.6, 1.9, 9) * rng.uniform(0.9, 1.1, 9)])
    else:
        raise ValueError(f"curve must be one of {CURVE_SHAPES}, got {shape!r}")
    ys = idle + np.concatenate([[0.0], np.cumsum(incr / incr.sum() * (p_max - idle))])
    return PowerCurve(xs, ys)


def synthetic_cluster(name: str, n_hours: int, rng: np.random.Generator, *, power_capped: bool | None = None,
                      curve: str = "concave") -> ClusterInput:
    """One cluster with plausible forecasts, capacity and power curve (``curve``: one of :data:`CURVE_SHAPES`)."""
    h = np.arange(n_hours)
    capacity = float(rng.lognormal(np.log(20_000), 0.5))  # reservation cores
    r_mean = rng.uniform(1.2, 1.8)
    r = r_mean * (1 + 0.03 * np.sin(2 * np.pi * (h - rng.uniform(0, 24)) / 24))
    usage_capacity = capacity / r_mean
    base = rng.uniform(0.30, 0.55) * usage_capacity * 0.8
    amp = rng.uniform(0.05, 0.25)
    peak_hour = rng.uniform(0, 24)
    u_if = base * (1 + amp * np.cos(2 * np.pi * (h - peak_hour) / 24)) * (1 + 0.02 * rng.standard_normal(n_hours))
    u_if = np.maximum(u_if, 0.0)
    upper = u_if * (1 + rng.uniform(0.03, 0.12))
    share = rng.uniform(0.15, 0.40)
    t_uf = share / (1 - share) * float(u_if.sum())
    t_r = float(((u_if + t_uf / n_hours) * r).sum()) * rng.uniform(0.97, 1.03)
    q97 = rng.uniform(0.03, 0.15)
    power_curve = _power_curve(usage_capacity, rng, curve)
    if power_capped is None:
        power_capped = rng.random() < 0.3
    pcc = usage_capacity * rng.uniform(0.85, 0.98) if power_capped else np.inf
    return ClusterInput(
        name=name, inflexible_cpu_cores=u_if, inflexible_upper_cpu_cores=upper, flexible_core_hours=t_uf,
        reservations_core_hours=t_r, reservation_ratio=r, reservations_rel_error_q97=q97,
        capacity_cores=capacity, power_capped_capacity_cores=pcc, power_curve=power_curve,
    )


def synthetic_campus(carbon_gco2_per_kwh, n_clusters: int, *, seed: int | np.random.Generator = 0,
                     name: str = "campus", hours: pd.DatetimeIndex | None = None, contract_headroom: float = 1.02,
                     lambda_e: float = 1.0, lambda_p: float = 0.1, delta_min: float = -1.0, delta_max: float = 1.0,
                     ramp_limit: float | None = None, solver: str = "HIGHS", curve: str = "concave"
                     ) -> CampusInput:
    """A campus of ``n_clusters`` synthetic clusters planned against ``carbon_gco2_per_kwh`` (H values).

    The contract is ``contract_headroom`` x the sum of the clusters' flat (unshaped) peaks, so with a headroom
    near 1 the contract constraint is active; ``inf`` for no contract.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    eta = np.asarray(carbon_gco2_per_kwh, dtype=float)
    clusters = [synthetic_cluster(f"{name}-c{i:05d}", eta.shape[0], rng, curve=curve) for i in range(n_clusters)]
    contract = float("inf")
    if np.isfinite(contract_headroom):
        probe = CampusInput(clusters=clusters, carbon_gco2_per_kwh=eta)
        from cicm.optimize.program import campus_targets  # flat peaks need tau, which the program derives

        contract = float(campus_targets(probe)["flat_peak_kw"].sum()) * contract_headroom
    return CampusInput(clusters=clusters, carbon_gco2_per_kwh=eta, contract_limit_kw=contract, lambda_e=lambda_e,
                       lambda_p=lambda_p, delta_min=delta_min, delta_max=delta_max, ramp_limit=ramp_limit,
                       solver=solver, hours=hours, name=name)


def synthetic_queue_campus(carbon_gco2_per_kwh, n_clusters: int, *, seed: int | np.random.Generator = 0,
                           name: str = "campus", committed_hours: int = 24, deadline_hours: float = 18.0,
                           contract: str = "capacity", lambda_p: float = 0.0, curve: str = "specpower"):
    """A :class:`~cicm.optimize.queue.QueueCampus` of ``n_clusters`` synthetic clusters over the N hours of
    ``carbon_gco2_per_kwh`` (the nightly shape: N = 42-48, the first ``committed_hours`` committed): the clusters of
    :func:`synthetic_cluster`, their flexible work arriving hour by hour (diurnal, noisy) and due
    ``deadline_hours`` later (:func:`cicm.optimize.queue.arrival_bounds`), half a day's backlog at the start.

    ``contract``: ``"capacity"`` (the campus contract sized to the clusters' summed power at full capacity, as a
    real one is: it never binds), ``"binding"`` (the summed committed peaks of run-on-arrival: shifting work into
    fewer clean hours would exceed it, so it binds), or ``"none"``.
    """
    from cicm.optimize.queue import QueueCampus, QueueCluster, arrival_bounds, greedy_service

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    eta = np.asarray(carbon_gco2_per_kwh, dtype=float)
    n = eta.size
    h = np.arange(n)
    out = []
    for i in range(n_clusters):
        c = synthetic_cluster(f"{name}-q{i:05d}", 24, rng, curve=curve)  # a day, repeated over the horizon
        assert c.power_curve is not None
        usage_capacity = float(c.power_curve.cpu_cores[-1])
        cap = min(usage_capacity, float(np.min(c.power_capped_capacity_cores)))
        mean_rate = c.flexible_core_hours / 24
        arrivals = mean_rate * (1 + 0.5 * np.sin(2 * np.pi * (h - rng.uniform(0, 24)) / 24)) \
            * rng.uniform(0.5, 1.5, n)
        must, avail = arrival_bounds(arrivals, deadline_hours)
        backlog = 12 * mean_rate
        avail = avail + backlog
        must = must + backlog * np.clip((h + 1) / deadline_hours, 0, 1)
        out.append(QueueCluster(c.name, np.resize(c.inflexible_cpu_cores, n),
                                np.resize(c.inflexible_upper_cpu_cores, n), cap, must, avail, c.power_curve))
    committed = h < committed_hours
    limit = float("inf")
    if contract == "capacity":
        limit = float(sum(float(c.power_curve(np.max(c.capacity_cores))) for c in out))
    elif contract == "binding":
        s = greedy_service(np.stack([c.must_core_hours for c in out]), np.stack([c.avail_core_hours for c in out]),
                           np.stack([c.room_cpu_cores for c in out]))
        limit = float(sum(np.max(c.power_curve(c.inflexible_cpu_cores + s[i])[committed]) for i, c in enumerate(out)))
    elif contract != "none":
        raise ValueError(f"contract must be capacity, binding or none, got {contract!r}")
    return QueueCampus(name, tuple(out), eta, committed=committed, contract_kw=limit, lambda_p=lambda_p)
