"""The one local-day calendar: every IANA zone, half-hour and 45-minute offsets, DST at midnight."""
from __future__ import annotations

from datetime import date, timedelta

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cicm.errors import InputError
from cicm.timeutil import local_dates, local_day_hours_utc, local_day_lengths, local_day_window, planning_time_utc

ZONES = ["UTC", "America/Los_Angeles", "Asia/Kolkata", "Australia/Adelaide", "Asia/Kathmandu", "America/Santiago",
         "America/Havana", "Asia/Beirut", "Australia/Lord_Howe", "Pacific/Chatham", "Europe/London"]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(ZONES), st.dates(date(2015, 1, 1), date(2030, 12, 31)))
def test_local_days_tile_utc_hours(tz, day):
    hours = local_day_hours_utc(day, tz)
    nxt = local_day_hours_utc(day + timedelta(days=1), tz)
    assert 23 <= len(hours) <= 25
    assert (hours == hours.floor("h")).all()
    assert nxt[0] == hours[-1] + pd.Timedelta(hours=1)  # consecutive days abut: no hour lost or counted twice
    assert (local_dates(hours, tz) == pd.Timestamp(day)).all()  # an hour belongs to the day it starts in
    assert local_day_lengths([day], tz)[0] == len(hours)
    assert local_day_window(day, tz) == (hours[0], hours[-1] + pd.Timedelta(hours=1))
    assert planning_time_utc(day, tz) < hours[0]


def test_half_hour_zone_day_starts_after_local_midnight():
    hours = local_day_hours_utc(date(2022, 6, 1), "Asia/Kolkata")  # UTC+5:30: midnight is 18:30 UTC
    assert hours[0] == pd.Timestamp("2022-05-31T19:00Z") and len(hours) == 24
    assert local_day_hours_utc(date(2022, 6, 1), "Asia/Kathmandu")[0] == pd.Timestamp("2022-05-31T19:00Z")


def test_dst_at_midnight_days():
    # America/Santiago: clocks jump from 00:00 to 01:00 on 2022-09-11, so the day has 23 hours from 04:00 UTC.
    hours = local_day_hours_utc(date(2022, 9, 11), "America/Santiago")
    assert len(hours) == 23 and hours[0] == pd.Timestamp("2022-09-11T04:00Z")
    assert len(local_day_hours_utc(date(2022, 3, 27), "Asia/Beirut")) == 23
    assert len(local_day_hours_utc(date(2022, 11, 6), "America/Havana")) == 25


def test_unknown_zone_is_named():
    with pytest.raises(InputError, match="timezone"):
        local_day_hours_utc(date(2022, 6, 1), "Mars/Olympus")
