"""Demo telemetry for a fleet, derived from the real bundled traces, reproducible from a seed.

There is no public flexible/inflexible split of datacenter CPU, so it is built (as cicm/demo/data/SOURCES.md says):
- inflexible CPU: an aggregate cluster trace (Google 2019, Azure 2019 or Alibaba 2018), hourly means, tiled
  week by week over the history, with a slow weekly level random walk (sd 2% per week) and hourly
  multiplicative noise (sd 3%), scaled so its 99th percentile is the cluster's `inflexible_peak_share` of capacity;
- flexible CPU: the batch jobs (Alibaba PAI or Azure, umassos/GAIA) that finish within 24 h, thinned to 70%
  per cluster, each wanting to run from arrival at its CPU count, cores scaled so the mean wanted flexible
  usage is `flexible_mean_share` of capacity; what does not fit beside inflexible work under the machine
  capacity waits in a FIFO fluid queue and runs in the next hours with room (the unshaped usage);
- reservations: total usage × `reservation_ratio`, with 2% hourly noise;
- power per power domain: the domain's share of the cluster's CPU (share = its cores), through the
  SPECpower_ssj2008 curve of its server (linear between the published load points, active idle at 0),
  times its machine count, with 1% Gaussian measurement noise.
"""
from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

from cicm.config import Cluster, Fleet, specpower_table
from cicm.demo.traces import TRACE_YEAR_START, batch_jobs, inflexible_profile

SPEC_LOAD_FRACTIONS = np.linspace(0.0, 1.0, 11)
SPEC_WATT_COLUMNS = ["watts_active_idle"] + [f"watts_{p}pct" for p in range(10, 101, 10)]
FLEXIBLE_KEEP_FRACTION = 0.7
MAX_FLEXIBLE_JOB_HOURS = 24.0


def _rng(seed: int, *names: str) -> np.random.Generator:
    key = zlib.crc32("/".join(names).encode())
    return np.random.default_rng([seed, key])


def history_hours(fleet: Fleet) -> pd.DatetimeIndex:
    fleet.require_demo("demo telemetry")
    return pd.date_range(fleet.history_start, fleet.history_end, freq="h", inclusive="left", name="hour")


def inflexible_cpu_cores(cluster: Cluster, hours: pd.DatetimeIndex, seed: int) -> np.ndarray:
    assert cluster.inflexible_trace is not None and cluster.inflexible_peak_share is not None, "a demo cluster"
    profile = inflexible_profile(cluster.inflexible_trace)
    rng = _rng(seed, "inflexible", cluster.name)
    offset = int(rng.integers(0, len(profile) // 168)) * 168
    tiled = np.resize(np.roll(profile, -offset), len(hours))
    weeks = np.arange(len(hours)) // 168
    weekly_level = np.exp(np.cumsum(rng.normal(0.0, 0.02, weeks.max() + 1)))[weeks]
    noise = np.exp(rng.normal(0.0, 0.03, len(hours)))
    usage = tiled * weekly_level * noise
    return usage / np.quantile(usage, 0.99) * cluster.inflexible_peak_share * cluster.capacity_cores


def cluster_jobs(cluster: Cluster, seed: int) -> pd.DataFrame:
    """The cluster's flexible jobs: arrival (UTC), length_hours, cpu_cores. Unscaled trace CPU counts."""
    assert cluster.flexible_trace is not None, "a demo cluster"
    jobs = batch_jobs(cluster.flexible_trace)
    jobs = jobs[jobs["length"] <= MAX_FLEXIBLE_JOB_HOURS]
    keep = _rng(seed, "flexible", cluster.name).random(len(jobs)) < FLEXIBLE_KEEP_FRACTION
    jobs = jobs[keep]
    return pd.DataFrame(
        {
            "arrival": TRACE_YEAR_START + pd.to_timedelta(jobs["arrival_time"].to_numpy(), unit="h"),
            "length_hours": jobs["length"].to_numpy(float),
            "cpu_cores": jobs["cpus"].to_numpy(float),
        }
    )


def run_on_arrival_cpu_cores(jobs: pd.DataFrame, hours: pd.DatetimeIndex) -> np.ndarray:
    """Hourly mean cores used by jobs that run from arrival for their length (5-minute resolution)."""
    bins_per_hour = 12
    n_bins = len(hours) * bins_per_hour
    start_h = (jobs["arrival"] - hours[0]).dt.total_seconds().to_numpy() / 3600.0
    start = np.floor(start_h * bins_per_hour).astype(int)
    end = np.floor((start_h + jobs["length_hours"].to_numpy()) * bins_per_hour).astype(int)
    start, end = np.clip(start, 0, n_bins), np.clip(np.maximum(end, start + 1), 0, n_bins)
    diff = np.zeros(n_bins + 1)
    np.add.at(diff, start, jobs["cpu_cores"].to_numpy())
    np.add.at(diff, end, -jobs["cpu_cores"].to_numpy())
    return np.cumsum(diff)[:n_bins].reshape(-1, bins_per_hour).mean(axis=1)


def arrived_core_hours(jobs: pd.DataFrame, hours: pd.DatetimeIndex) -> np.ndarray:
    """Core-hours of flexible work arriving in each hour (the demand due within 24 h)."""
    idx = ((jobs["arrival"] - hours[0]).dt.total_seconds() // 3600).astype(int).to_numpy()
    inside = (idx >= 0) & (idx < len(hours))
    out = np.zeros(len(hours))
    np.add.at(out, idx[inside], (jobs["cpu_cores"] * jobs["length_hours"]).to_numpy()[inside])
    return out


def flexible_scale(cluster: Cluster, jobs: pd.DataFrame, hours: pd.DatetimeIndex) -> float:
    raw_mean = run_on_arrival_cpu_cores(jobs, hours).mean()
    assert cluster.flexible_mean_share is not None, "a demo cluster"
    return cluster.flexible_mean_share * cluster.capacity_cores / raw_mean


def scaled_cluster_jobs(cluster: Cluster, hours: pd.DatetimeIndex, seed: int) -> pd.DataFrame:
    jobs = cluster_jobs(cluster, seed)
    jobs["cpu_cores"] *= flexible_scale(cluster, jobs, hours)
    return jobs


def capacity_limited_cpu_cores(wanted_cpu_cores: np.ndarray, room_cpu_cores: np.ndarray) -> np.ndarray:
    """Hourly flexible usage when work beyond the room waits (fluid FIFO queue, 1-hour steps)."""
    served = np.empty_like(wanted_cpu_cores)
    backlog = 0.0
    for h, (wanted, room) in enumerate(zip(wanted_cpu_cores, room_cpu_cores)):
        backlog += wanted
        served[h] = min(backlog, max(room, 0.0))
        backlog -= served[h]
    return served


def cluster_usage_history(cluster: Cluster, hours: pd.DatetimeIndex, seed: int) -> pd.DataFrame:
    jobs = scaled_cluster_jobs(cluster, hours, seed)
    inflexible = inflexible_cpu_cores(cluster, hours, seed)
    flexible = capacity_limited_cpu_cores(
        run_on_arrival_cpu_cores(jobs, hours), cluster.capacity_cores - inflexible
    )
    noise = np.exp(_rng(seed, "reservations", cluster.name).normal(0.0, 0.02, len(hours)))
    return pd.DataFrame(
        {
            "cluster": cluster.name,
            "hour": hours,
            "inflexible_cpu_cores": inflexible,
            "flexible_cpu_cores": flexible,
            "reserved_cpu_cores": (inflexible + flexible) * cluster.reservation_ratio * noise,
            "flexible_arrived_core_hours": arrived_core_hours(jobs, hours),
        }
    )


def demo_usage_history(fleet: Fleet, seed: int = 0) -> pd.DataFrame:
    """Hourly usage for every cluster: cluster, hour (UTC), inflexible/flexible/reserved CPU cores."""
    hours = history_hours(fleet)
    return pd.concat([cluster_usage_history(c, hours, seed) for c in fleet.clusters()], ignore_index=True)


def specpower_watts(spec_row: int, load_fraction: np.ndarray) -> np.ndarray:
    """Watts of one server at the given load fractions, linear between SPECpower's published points."""
    row = specpower_table().iloc[spec_row]
    watts = row[SPEC_WATT_COLUMNS].to_numpy(dtype=float)
    return np.interp(np.clip(load_fraction, 0.0, 1.0), SPEC_LOAD_FRACTIONS, watts)


def cluster_power_telemetry(cluster: Cluster, usage: pd.DataFrame, seed: int) -> pd.DataFrame:
    total_cpu = (usage["inflexible_cpu_cores"] + usage["flexible_cpu_cores"]).to_numpy()
    frames = []
    for domain in cluster.power_domains:
        share = domain.capacity_cores / cluster.capacity_cores
        cpu = total_cpu * share
        assert domain.spec_row is not None and domain.machines is not None, "a demo power domain"
        watts = specpower_watts(domain.spec_row, cpu / domain.capacity_cores) * domain.machines
        noise = 1.0 + _rng(seed, "power", domain.name).normal(0.0, 0.01, len(cpu))
        frames.append(
            pd.DataFrame(
                {
                    "cluster": cluster.name,
                    "domain": domain.name,
                    "hour": usage["hour"].to_numpy(),
                    "cpu_cores": cpu,
                    "power_kw": watts * noise / 1000.0,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def demo_power_telemetry(fleet: Fleet, usage: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    frames = [
        cluster_power_telemetry(c, usage[usage["cluster"] == c.name].reset_index(drop=True), seed)
        for c in fleet.clusters()
    ]
    return pd.concat(frames, ignore_index=True)
