"""The dispatcher: argument checks that apply to every provider."""
from __future__ import annotations

import pandas as pd
import pytest

import cicm.carbon as carbon
from cicm.carbon import providers
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


def test_registry_maps_names_to_protocol_classes():
    assert tuple(providers.REGISTRY) == PROVIDERS
    for name, cls in providers.REGISTRY.items():
        assert cls.name == name
        if name != "csv":  # csv needs a path
            assert isinstance(providers.make_provider(name), providers.CarbonProvider)
    csv = providers.make_provider("csv", providers.ProviderOptions(path="x.csv"))
    assert isinstance(csv, providers.CsvProvider) and isinstance(csv, providers.CarbonProvider)


@pytest.mark.parametrize("name", ["oracle", "Trace", "", None])
def test_unknown_provider_lists_the_valid_names(name):
    with pytest.raises(InputError) as e:
        providers.provider_class(name)
    assert e.value.field == "provider"
    assert "trace, electricitymaps, watttime, csv" in e.value.message and repr(name) in e.value.message


def test_csv_provider_without_path_names_the_field():
    with pytest.raises(InputError) as e:
        providers.make_provider("csv")
    assert e.value.field == "path"


def test_a_registered_class_is_found_by_name(monkeypatch):
    class Flat:
        name = "flat"

        def __init__(self, options):
            self.options = options

        def fetch_raw(self, zone, start, end, *, now):
            hours = pd.date_range(start, end, freq="h", inclusive="left")
            return pd.DataFrame({"zone": zone, "target_hour": hours, "issued_at": now, "gco2_per_kwh": 100.0,
                                 "provider": self.name})

    monkeypatch.setitem(providers.REGISTRY, "flat", Flat)
    out = fetch_forecast("flat", "Z", START, END, now=NOW)
    assert len(out) == 24 and (out["gco2_per_kwh"] == 100.0).all() and (out["provider"] == "flat").all()


def test_trace_provider_matches_the_dispatcher():
    direct = providers.TraceProvider(providers.ProviderOptions(seed=3)).fetch_raw("CISO", START, END, now=NOW)
    via = fetch_forecast("trace", "CISO", START, END, now=NOW, seed=3)
    assert (direct.set_index("target_hour").loc[via["target_hour"], "gco2_per_kwh"].to_numpy()
            == via["gco2_per_kwh"].to_numpy()).all()


def test_non_utc_aware_window_is_converted():
    start = START.tz_convert("America/Chicago")
    out = fetch_forecast("trace", "MISO", start, END.tz_convert("Asia/Tokyo"), now=NOW)
    assert out["target_hour"].iloc[0] == START and str(out["target_hour"].dt.tz) == "UTC"


def test_horizon_choice():
    assert horizon_hours_needed(START, START + pd.Timedelta(hours=24)) is None
    assert horizon_hours_needed(START, START + pd.Timedelta(hours=25)) == 48
    assert horizon_hours_needed(START, START + pd.Timedelta(hours=49)) == 72
    assert horizon_hours_needed(START, START + pd.Timedelta(hours=100)) == 72
