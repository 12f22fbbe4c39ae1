"""Fleets of any size for scale runs, built from the demo fleet's real traces. Seeded and reproducible.

`scale_fleet(n)` makes n clusters in campuses of `clusters_per_campus`, spread round-robin over the bundled grid
zones, each in its zone's own time zone (`ZONE_TIMEZONES`). Cluster i copies demo cluster (i mod 10)'s servers
and trace choices, with:
- scale: its machine counts times a log-normal factor (median 1, sd 0.5, clipped to [0.25, 4]);
- phase: its telemetry is the template's derived telemetry moved by a whole number of days (0-27, so the weekly
  phase and the level random walk differ) and by the UTC-offset difference between the template's and its own
  time zone (so the daily shape keeps following local time);
- noise: 2% hourly multiplicative noise on inflexible usage, so no two clusters are equal.

`scale_usage_history` builds the usage rows from the template telemetry (computed once, vectorised per cluster).
Power telemetry goes through the demo's SPECpower path (`cluster_power_telemetry`), so it is the same physics.
"""
from __future__ import annotations

from datetime import date
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from cicm.config import GRID_ZONES, Fleet, load_fleet, specpower_table
from cicm.demo.telemetry import _rng, cluster_power_telemetry, demo_usage_history
from cicm.errors import InputError

ZONE_TIMEZONES = {
    "AZPS": "America/Phoenix", "BPAT": "America/Los_Angeles", "CISO": "America/Los_Angeles",
    "ERCO": "America/Chicago", "MISO": "America/Chicago", "NYIS": "America/New_York",
    "PJM": "America/New_York", "SOCO": "America/New_York",
}
USAGE_COLUMNS = ("inflexible_cpu_cores", "flexible_cpu_cores", "reserved_cpu_cores", "flexible_arrived_core_hours")
MAX_PHASE_DAYS = 28
POWER_TELEMETRY_DAYS = 14


def _utc_offset_hours(tz: str) -> int:
    """Standard-time UTC offset (January), whole hours."""
    return int(pd.Timestamp("2022-01-15 12:00").tz_localize(tz).utcoffset().total_seconds() // 3600)


def scale_fleet(n_clusters: int, seed: int = 0, clusters_per_campus: int = 100,
                plan_date: date = date(2022, 6, 15)) -> Fleet:
    """A validated Fleet of `n_clusters` clusters; history from the trace year's start to `plan_date`."""
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
        raise InputError("n_clusters", f"must be a positive integer, got {n_clusters!r}")
    if isinstance(clusters_per_campus, bool) or not isinstance(clusters_per_campus, int) or clusters_per_campus < 1:
        raise InputError("clusters_per_campus", f"must be a positive integer, got {clusters_per_campus!r}")
    demo = load_fleet(None)
    templates = demo.clusters()
    rng = np.random.default_rng([seed, 9])
    factors = np.clip(rng.lognormal(0.0, 0.5, n_clusters), 0.25, 4.0)
    watts_full = specpower_table()["watts_100pct"].to_numpy(dtype=float)
    campuses = []
    n_campuses = -(-n_clusters // clusters_per_campus)
    for k in range(n_campuses):
        zone = GRID_ZONES[k % len(GRID_ZONES)]
        clusters, peak_kw = [], 0.0
        for i in range(k * clusters_per_campus, min((k + 1) * clusters_per_campus, n_clusters)):
            template = templates[i % len(templates)]
            name = f"c{i:05d}"
            domains = []
            for j, d in enumerate(template.power_domains, start=1):
                machines = max(1, int(round(d.machines * factors[i])))
                peak_kw += machines * watts_full[d.spec_row] / 1000.0
                domains.append({"name": f"{name}-pd{j}", "machines": machines, "spec_row": d.spec_row,
                                "server_model": d.server_model})
            clusters.append({**template.model_dump(exclude={"name", "power_domains"}), "name": name,
                             "power_domains": domains})
        campuses.append({"name": f"{zone.lower()}-{k:03d}", "grid_zone": zone, "timezone": ZONE_TIMEZONES[zone],
                         "contract_limit_kw": round(peak_kw, 1), "clusters": clusters})
    start = demo.history_start
    days = (pd.Timestamp(plan_date, tz="UTC") - start).days
    return Fleet.model_validate({"name": f"scale-{n_clusters}-seed{seed}", "history_start": start,
                                 "history_days": days, "default_plan_date": plan_date, "campuses": campuses})


def write_fleet_toml(fleet: Fleet, path: Path) -> Path:
    import tomli_w

    data = fleet.model_dump(mode="python", exclude_none=True)
    fleet.require_demo("a scale fleet file")
    assert fleet.history_start is not None
    data["history_start"] = fleet.history_start.strftime("%Y-%m-%d")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tomli_w.dumps({k: v for k, v in data.items() if v is not None}).encode())
    return path


@lru_cache(maxsize=2)
def _template_usage(seed: int) -> dict[str, pd.DataFrame]:
    demo = load_fleet(None)
    usage = demo_usage_history(demo, seed=seed)
    tz_of = {c.name: campus.timezone for campus in demo.campuses for c in campus.clusters}
    return {name: (frame.reset_index(drop=True), tz_of[name]) for name, frame in usage.groupby("cluster")}


def _phase_hours(fleet: Fleet, seed: int) -> dict[str, int]:
    rng = np.random.default_rng([seed, 10])
    names = [c.name for c in fleet.clusters()]
    return dict(zip(names, rng.integers(0, MAX_PHASE_DAYS, len(names)) * 24))


def scale_usage_history(fleet: Fleet, seed: int = 0, start: pd.Timestamp | None = None,
                        end: pd.Timestamp | None = None, campuses: list[str] | None = None) -> pd.DataFrame:
    """Hourly usage rows (the usage_history columns) of the clusters of a `scale_fleet` (of the named campuses,
    default all), over [start, end) (default: the fleet's history)."""
    templates = _template_usage(seed)
    demo_names = [c.name for c in load_fleet(None).clusters()]
    start = start if start is not None else fleet.history_start
    end = end if end is not None else fleet.history_end
    phase = _phase_hours(fleet, seed)
    frames = []
    for campus in fleet.campuses:
        if campuses is not None and campus.name not in campuses:
            continue
        for cluster in campus.clusters:
            index = int(cluster.name[1:])
            template, template_tz = templates[demo_names[index % len(demo_names)]]
            shift = phase[cluster.name] + _utc_offset_hours(campus.timezone) - _utc_offset_hours(template_tz)
            hours = template["hour"]
            keep = ((hours >= start) & (hours < end)).to_numpy()
            factor = cluster.capacity_cores / _template_capacity(index % len(demo_names))
            data = {c: np.roll(template[c].to_numpy(), -shift)[keep] * factor for c in USAGE_COLUMNS}
            noise = np.exp(_rng(seed, "scale-inflexible", cluster.name).normal(0.0, 0.02, int(keep.sum())))
            data["inflexible_cpu_cores"] = np.minimum(data["inflexible_cpu_cores"] * noise,
                                                      cluster.capacity_cores - data["flexible_cpu_cores"])
            frames.append(pd.DataFrame({"cluster": cluster.name, "hour": hours[keep].to_numpy(), **data}))
    return pd.concat(frames, ignore_index=True)


@lru_cache(maxsize=1)
def _template_capacities() -> tuple[int, ...]:
    return tuple(c.capacity_cores for c in load_fleet(None).clusters())


def _template_capacity(k: int) -> int:
    return _template_capacities()[k]


def scale_power_telemetry(fleet: Fleet, usage: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per power domain: CPU share and SPECpower watts with 1% noise, as for the demo fleet."""
    clusters = {c.name: c for c in fleet.clusters()}
    frames = [cluster_power_telemetry(clusters[name], part.reset_index(drop=True), seed)
              for name, part in usage.groupby("cluster", sort=False)]
    return pd.concat(frames, ignore_index=True)
