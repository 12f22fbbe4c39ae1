"""The one local-day calendar of the code base.

A campus's day is its local calendar day. Planning works in whole UTC hours, and an hour belongs to the local day
on which it **starts**: the day's hours are the UTC hour starts ``t`` with ``midnight(day) <= t <
midnight(day + 1)``. In whole-hour zones that is 23, 24 or 25 hours (DST days); in half-hour and 45-minute zones
(Asia/Kolkata, Australia/Adelaide, Asia/Kathmandu) the first hour starts 30 or 15 minutes after local midnight.
Where DST starts at midnight (America/Santiago, America/Havana, Asia/Beirut) local midnight does not exist, and the
day starts at the first instant that does (01:00); where a midnight is ambiguous, the first (DST) one is used.
"""
from __future__ import annotations

import zoneinfo
from datetime import date

import numpy as np
import pandas as pd

from cicm.errors import InputError

PLANNING_HOUR_LOCAL = 18  # the nightly plan is made at 18:00 local on the eve of the day
_HOUR = pd.Timedelta(hours=1)


def parse_plan_date(value: str | date) -> date:
    try:
        return pd.Timestamp(value).date()
    except (ValueError, TypeError) as exc:
        raise InputError("date", f"not a date: {value!r} (use YYYY-MM-DD)") from exc


def check_timezone(tz: str, field: str = "timezone") -> str:
    """``tz`` if it is an IANA time-zone name, else InputError(field)."""
    if not isinstance(tz, str) or not tz.strip():
        raise InputError(field, f"need an IANA time-zone name, got {tz!r}")
    try:
        zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise InputError(field, f"unknown time zone {tz!r}") from exc
    return tz


def _naive_midnights(days) -> pd.DatetimeIndex:
    index = pd.DatetimeIndex([pd.Timestamp(d) for d in np.atleast_1d(np.asarray(days, dtype=object))])
    if index.tz is not None:
        index = index.tz_localize(None)
    return index.normalize()


def local_midnights_utc(days, tz: str) -> pd.DatetimeIndex:
    """The UTC instants at which the local days ``days`` begin in ``tz`` (see the module docstring)."""
    midnights = _naive_midnights(days)
    check_timezone(tz)
    local = midnights.tz_localize(tz, nonexistent="shift_forward", ambiguous=np.ones(len(midnights), bool))
    return local.tz_convert("UTC")


def local_day_lengths(days, tz: str) -> np.ndarray:
    """How many UTC hours start within each local day of ``days`` in ``tz`` (23, 24 or 25)."""
    midnights = _naive_midnights(days)
    start = local_midnights_utc(midnights, tz).ceil("h")
    end = local_midnights_utc(midnights + pd.Timedelta(days=1), tz).ceil("h")
    return np.round((end - start) / _HOUR).astype(int)


def local_day_hours_utc(plan_date, tz: str) -> pd.DatetimeIndex:
    """The UTC hour starts of the local day ``plan_date`` in ``tz``, in order."""
    midnight = _naive_midnights([plan_date])
    start = local_midnights_utc(midnight, tz)[0].ceil("h")
    end = local_midnights_utc(midnight + pd.Timedelta(days=1), tz)[0].ceil("h")
    return pd.date_range(start, end, freq="h", inclusive="left", name="hour").as_unit("ns")


def local_day_window(plan_date, tz: str) -> tuple[pd.Timestamp, pd.Timestamp]:
    """``[first hour start, last hour end)`` in UTC of the local day ``plan_date``: whole hours."""
    hours = local_day_hours_utc(plan_date, tz)
    return hours[0], hours[-1] + _HOUR


def local_dates(hours: pd.DatetimeIndex, tz: str) -> pd.DatetimeIndex:
    """The local day (naive midnight) each UTC hour start belongs to."""
    check_timezone(tz)
    return pd.DatetimeIndex(hours).tz_convert(tz).tz_localize(None).normalize()


def planning_time_utc(plan_date: date, tz: str) -> pd.Timestamp:
    """When the plan for `plan_date` is made: 18:00 local the evening before. Only data before it is used."""
    eve = pd.Timestamp(plan_date) - pd.Timedelta(days=1) + pd.Timedelta(hours=PLANNING_HOUR_LOCAL)
    check_timezone(tz)
    return eve.tz_localize(tz, nonexistent="shift_forward", ambiguous=True).tz_convert("UTC")
