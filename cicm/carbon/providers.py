"""One entry point for every carbon-intensity source; its output is always validated and canonical."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, get_args

import httpx
import pandas as pd

from cicm.carbon import csvsource, electricitymaps, trace, watttime
from cicm.carbon.http import DEFAULT_POLICY, RetryPolicy
from cicm.carbon.validate import DEFAULT_MAX_AGE, check_window, require_utc_timestamp, validate_forecast
from cicm.errors import InputError

ProviderName = Literal["trace", "electricitymaps", "watttime", "csv"]
PROVIDERS: tuple[str, ...] = get_args(ProviderName)
#: Horizons we ask live APIs for (both accept up to 72 h); the smallest one reaching ``end`` is used.
LIVE_HORIZONS_HOURS = (24, 48, 72)


def horizon_hours_needed(now: pd.Timestamp, end: pd.Timestamp) -> int | None:
    """Smallest standard horizon covering ``[now, end)``; None when the provider default (24 h) suffices."""
    need = math.ceil((end - now) / pd.Timedelta(hours=1))
    if need <= LIVE_HORIZONS_HOURS[0]:
        return None
    for horizon in LIVE_HORIZONS_HOURS:
        if need <= horizon:
            return horizon
    return LIVE_HORIZONS_HOURS[-1]  # validation will then report the hours beyond reach as missing


def fetch_raw(
    provider: ProviderName,
    zone: str,
    start: pd.Timestamp,
    end: pd.Timestamp,
    *,
    now: pd.Timestamp,
    base_url: str | None = None,
    path: str | Path | None = None,
    seed: int = 0,
    issued_at: pd.Timestamp | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
    client: httpx.Client | None = None,
) -> pd.DataFrame:
    """The provider's unvalidated frame (may be sub-hourly, may extend beyond the window)."""
    if provider == "trace":
        return trace.trace_forecast(zone, start, end, issued_at if issued_at is not None else now, seed)
    if provider == "electricitymaps":
        return electricitymaps.fetch_raw_forecast(
            zone, base_url=base_url, horizon_hours=horizon_hours_needed(now, end), policy=policy, client=client
        )
    if provider == "watttime":
        return watttime.fetch_raw_forecast(
            zone, base_url=base_url, horizon_hours=horizon_hours_needed(now, end), policy=policy, client=client
        )
    if provider == "csv":
        if path is None:
            raise InputError("path", "the csv provider needs a CSV path")
        return csvsource.read_raw_csv(path, zone=zone, issued_at=issued_at)
    raise InputError("provider", f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")


def fetch_forecast(
    provider: ProviderName,
    zone: str,
    start: pd.Timestamp,
    end: pd.Timestamp,
    *,
    now: pd.Timestamp,
    base_url: str | None = None,
    path: str | Path | None = None,
    seed: int = 0,
    issued_at: pd.Timestamp | None = None,
    max_age: pd.Timedelta = DEFAULT_MAX_AGE,
    policy: RetryPolicy = DEFAULT_POLICY,
    client: httpx.Client | None = None,
) -> pd.DataFrame:
    """Hourly carbon-intensity forecast for ``zone`` over ``[start, end)``, validated, in canonical form.

    ``now`` is the planning time (staleness is measured against it). ``issued_at`` is used by ``trace`` (default:
    ``now``) and by ``csv`` files without an ``issued_at`` column (default: the file's mtime). ``seed`` drives the
    trace's simulated errors. Raises InputError (bad input/data, naming the field) or ProviderError (HTTP).
    """
    if provider not in PROVIDERS:
        raise InputError("provider", f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if not isinstance(zone, str) or not zone.strip():
        raise InputError("zone", "a zone/region name is required")
    start = require_utc_timestamp(start, "start")
    end = require_utc_timestamp(end, "end")
    now = require_utc_timestamp(now, "now")
    check_window(start, end)
    raw = fetch_raw(
        provider, zone, start, end, now=now, base_url=base_url, path=path, seed=seed, issued_at=issued_at,
        policy=policy, client=client,
    )
    return validate_forecast(raw, start=start, end=end, now=now, max_age=max_age)
