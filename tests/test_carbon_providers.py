"""The dispatcher: argument checks that apply to every provider."""
from __future__ import annotations

import pandas as pd
import pytest

import cicm.carbon as carbon
from cicm.carbon.providers import PROVIDERS, fetch_forecast, horizon_hours_needed
from cicm.errors import InputError

START, END = pd.Timestamp("2022-06-01T00:00Z"), pd.Timestamp("2022-06-02T00:00Z")
NOW = pd.Timestamp("2022-05-31T18:00Z")


def test_provider_names():
    assert PROVIDERS == ("trace", "electricitymaps", "watttime", "csv")
    assert set(carbon.__all__) >= {"fetch_forecast", "validate_forecast", "to_hourly", "FORECAST_COLUMNS"}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(provider="oracle"), "provider"),
        (dict(zone=""), "zone"),
        (dict(start=START.tz_localize(None)), "start"),
        (dict(end=END.tz_localize(None)), "end"),
        (dict(now=NOW.tz_localize(None)), "now"),
        (dict(start=START + pd.Timedelta(minutes=15)), "start"),
        (dict(end=START), "end"),
    ],
)
def test_argument_errors_name_the_field(kwargs, field):
    args = dict(provider="trace", zone="CISO", start=START, end=END, now=NOW) | kwargs
    with pytest.raises(InputError) as e:
        fetch_forecast(args.pop("provider"), args.pop("zone"), args.pop("start"), args.pop("end"), **args)
    assert e.value.field == field


def test_non_utc_aware_window_is_converted():
    start = START.tz_convert("America/Chicago")
    out = fetch_forecast("trace", "MISO", start, END.tz_convert("Asia/Tokyo"), now=NOW)
    assert out["target_hour"].iloc[0] == START and str(out["target_hour"].dt.tz) == "UTC"


def test_horizon_choice():
    assert horizon_hours_needed(START, START + pd.Timedelta(hours=24)) is None
    assert horizon_hours_needed(START, START + pd.Timedelta(hours=25)) == 48
    assert horizon_hours_needed(START, START + pd.Timedelta(hours=49)) == 72
    assert horizon_hours_needed(START, START + pd.Timedelta(hours=100)) == 72
