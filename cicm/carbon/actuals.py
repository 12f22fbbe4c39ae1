"""Measured grid carbon intensity ("actuals") of a zone from its provider, for the store's ``carbon_actuals``.

The nightly plan keeps each live zone's actuals so that forecast skill, the forecast-value gate and the
dashboard's forecast-against-actual view work on live zones, not only on the bundled trace:

* ``electricitymaps``: ``/v3/carbon-intensity/history`` (the last 24 hours, hourly);
* ``watttime``: ``/v3/historical`` (5-minute co2_moer points over any window up to 32 days, averaged to hours);
* ``csv``: the campus's ``actuals_csv`` (``target_hour``, ``gco2_per_kwh``), the hours before ``now``;
* ``trace``: the bundled EIA-930 year, stored by ``cicm demo seed`` (nothing to fetch).

:func:`fetch_actuals` returns one row per whole hour in ``[start, min(end, now))``: columns zone, hour,
gco2_per_kwh, source. An hour that is missing or partial stays missing (a gap, never filled). A NaN, negative or
implausible value, or a duplicated hour with two values, raises InputError naming the field and the hour.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import requests

from cicm.carbon import csvsource, electricitymaps, watttime
from cicm.carbon.http import DEFAULT_POLICY, RetryPolicy
from cicm.carbon.validate import check_intensity_values, check_window, require_utc_timestamp, to_hourly
from cicm.errors import InputError

ACTUALS_COLUMNS = ["zone", "hour", "gco2_per_kwh", "source"]
#: Providers whose actuals the nightly plan fetches (the trace's are bundled).
LIVE_PROVIDERS = ("electricitymaps", "watttime", "csv")


def fetch_actuals(provider: str, zone: str, start: pd.Timestamp, end: pd.Timestamp, *, now: pd.Timestamp,
                  base_url: str | None = None, path: str | Path | None = None,
                  policy: RetryPolicy = DEFAULT_POLICY, session: requests.Session | None = None) -> pd.DataFrame:
    """The zone's measured hourly intensity over ``[start, end)``, hours ending by ``now``. InputError for bad
    data or arguments (naming the field), ProviderError for HTTP trouble."""
    start = require_utc_timestamp(start, "start")
    end = min(require_utc_timestamp(end, "end"), require_utc_timestamp(now, "now").floor("h"))
    if end <= start:
        return pd.DataFrame(columns=ACTUALS_COLUMNS)
    check_window(start, end)
    if provider == "electricitymaps":
        raw = electricitymaps.fetch_raw_history(zone, base_url=base_url, policy=policy, session=session)
    elif provider == "watttime":
        raw = watttime.fetch_raw_historical(zone, start, end, base_url=base_url, policy=policy, session=session)
    elif provider == "csv":
        if path is None:
            raise InputError("actuals_csv", "the csv provider's actuals need a CSV path (actuals_csv)")
        raw = csvsource.read_raw_csv(path, zone=zone, issued_at=now)
    else:
        raise InputError("provider", f"no actuals to fetch from {provider!r}; live providers are "
                                     f"{', '.join(LIVE_PROVIDERS)}")
    return hourly_actuals(raw, start, end, source=provider)


def hourly_actuals(raw: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp, *, source: str) -> pd.DataFrame:
    """Pure: a provider's raw canonical frame -> hourly actuals in ``[start, end)``. Points outside the window
    are ignored; the ones inside are checked (NaN, negative, implausible, a repeated time with two values)."""
    inside = raw[(raw["target_hour"] >= start) & (raw["target_hour"] < end)]
    repeated = inside[inside.duplicated("target_hour", keep=False)]
    if len(repeated) and repeated.groupby("target_hour")["gco2_per_kwh"].nunique().max() > 1:
        first = repeated["target_hour"].min()
        raise InputError("target_hour", f"hour {first.isoformat()} is given twice with different values")
    inside = inside.drop_duplicates("target_hour")
    check_intensity_values(inside)
    hourly = to_hourly(inside)
    return pd.DataFrame({"zone": hourly["zone"], "hour": hourly["target_hour"],
                         "gco2_per_kwh": hourly["gco2_per_kwh"], "source": source})[ACTUALS_COLUMNS]
