"""Readers for the bundled real traces (cicm/demo/data/SOURCES.md). Plain pandas/numpy, values unchanged."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd

from cicm.errors import InputError
from cicm.paths import bundled_data_dir

TRACE_YEAR_START = pd.Timestamp("2022-01-01", tz="UTC")
FIVE_MINUTES_PER_HOUR = 12


def _hourly_means(values: np.ndarray) -> np.ndarray:
    whole = len(values) // FIVE_MINUTES_PER_HOUR * FIVE_MINUTES_PER_HOUR
    return values[:whole].reshape(-1, FIVE_MINUTES_PER_HOUR).mean(axis=1)


@lru_cache(maxsize=None)
def inflexible_profile(trace: str) -> np.ndarray:
    """Hourly CPU usage profile of an aggregate cluster trace, whole weeks only, scaled so its max is 1.

    google2019: mean CPU usage of all Borg instances (row i = i x 300 s).
    azure2019: summed VM CPU readings (timestamp seconds, 300 s step).
    alibaba2018: fleet mean machine CPU percent (300 s step).
    """
    folder = bundled_data_dir() / "datacenter_load"
    if trace == "google2019":
        five_min = pd.read_csv(folder / "google2019__instance_usage_grouped_300_seconds_month.csv")["avg_cpu"]
    elif trace == "azure2019":
        frame = pd.read_csv(folder / "azure_v2__vm_cpu_readings_month_aggregated_cpu_mem.csv")
        five_min = frame.sort_values("timestamp")["cpu_usage"]
    elif trace == "alibaba2018":
        five_min = pd.read_csv(folder / "alibaba2018__machine_usage_days_1_to_8_grouped_300_seconds.csv")[
            "cpu_util_percent"
        ]
    else:
        raise InputError("inflexible_trace", f"unknown trace {trace!r}")
    if five_min.isna().any():
        five_min = five_min.interpolate(limit=6)
    hourly = _hourly_means(five_min.to_numpy(dtype=float))
    weeks = len(hourly) // 168
    if weeks < 1:
        raise InputError("inflexible_trace", f"{trace} holds less than one week of data")
    hourly = hourly[: weeks * 168]
    return hourly / hourly.max()


@lru_cache(maxsize=None)
def batch_jobs(trace: str) -> pd.DataFrame:
    """Batch jobs (umassos/GAIA): arrival_time in hours since 2022-01-01 00:00 UTC, length in hours, cpus."""
    if trace not in ("pai", "azure"):
        raise InputError("flexible_trace", f"unknown batch trace {trace!r}")
    jobs = pd.read_csv(bundled_data_dir() / "datacenter_load" / f"{trace}-100k.csv.gz")
    bad = jobs[["arrival_time", "length", "cpus"]].isna().any(axis=1)
    return jobs[~bad].reset_index(drop=True)
