"""Local planning days and UTC hours. A campus's day is its local calendar day: 23, 24 or 25 UTC hours."""
from __future__ import annotations

from datetime import date

import pandas as pd

from cicm.errors import InputError

PLANNING_HOUR_LOCAL = 18  # the nightly plan is made at 18:00 local on the eve of the day


def parse_plan_date(value: str | date) -> date:
    try:
        return pd.Timestamp(value).date()
    except (ValueError, TypeError) as exc:
        raise InputError("date", f"not a date: {value!r} (use YYYY-MM-DD)") from exc


def local_day_hours_utc(plan_date: date, tz: str) -> pd.DatetimeIndex:
    """UTC hour starts of the local day `plan_date` in `tz` (23 or 25 of them on DST days)."""
    start = pd.Timestamp(plan_date).tz_localize(tz)
    end = (pd.Timestamp(plan_date) + pd.Timedelta(days=1)).tz_localize(tz)
    return pd.date_range(start.tz_convert("UTC"), end.tz_convert("UTC"), freq="h", inclusive="left", name="hour")


def planning_time_utc(plan_date: date, tz: str) -> pd.Timestamp:
    """When the plan for `plan_date` is made: 18:00 local the evening before. Only data before it is used."""
    eve = pd.Timestamp(plan_date) - pd.Timedelta(days=1) + pd.Timedelta(hours=PLANNING_HOUR_LOCAL)
    return eve.tz_localize(tz).tz_convert("UTC")
