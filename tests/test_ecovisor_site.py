"""Site file validation, the grid carbon trace (gaps, replay) and the solar model."""
from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest

from cicm.ecovisor.carbon import CarbonTrace, eia_trace_path, load_carbon
from cicm.ecovisor.site import CarbonSource, Location, Solar, load_site, parse_site
from cicm.ecovisor.solar import PvlibClearSky, load_solar
from cicm.ecovisor.testing import TEST_SITE
from cicm.errors import InputError

EXAMPLE = Path(__file__).resolve().parent.parent / "cicm/ecovisor/examples/site.toml"


def test_example_site_loads():
    s = load_site(EXAMPLE)
    assert s.grid.carbon.zone == "CISO" and s.battery.reserve_soc == 0.3
    assert [c.name for c in s.containers] == ["batch-1", "batch-2", "serving-1"]
    assert s.containers[1].power.kind == "piecewise"


@pytest.mark.parametrize(
    "path,value,field",
    [
        (("battery", "reserve_soc"), 1.5, "battery.reserve_soc"),
        (("battery", "capacity_kwh"), -1, "battery.capacity_kwh"),
        (("battery", "round_trip_efficiency"), 0, "battery.round_trip_efficiency"),
        (("location", "latitude"), 91, "location.latitude"),
        (("location", "timezone"), "Mars/Olympus", "location.timezone"),
        (("solar", "tilt_deg"), 120, "solar.tilt_deg"),
        (("grid", "capacity_kw"), 0, "grid.capacity_kw"),
        (("tick_seconds",), 0, "tick_seconds"),
        (("backend", "kind"), "docker", "backend.kind"),
        (("sim_start",), "2022-06-21T00:00:00", "sim_start"),
        (("grid", "carbon", "source"), "csv", "grid.carbon"),  # csv without a path
        (("unexpected",), 1, "unexpected"),
    ],
)
def test_bad_site_values_name_the_field(path, value, field):
    d = copy.deepcopy(TEST_SITE)
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(InputError) as e:
        parse_site(d)
    assert e.value.field == field


def test_bad_power_models_are_rejected():
    d = copy.deepcopy(TEST_SITE)
    d["containers"][0]["power"] = {"kind": "linear", "idle_kw": 2, "max_kw": 1}
    with pytest.raises(InputError) as e:
        parse_site(d)
    assert e.value.field.startswith("containers.0")
    d = copy.deepcopy(TEST_SITE)
    d["containers"][1]["power"] = {"kind": "piecewise", "points": [[0, 0.2], [1, 0.5], [3, 0.6]]}  # 3 != 2 cores
    with pytest.raises(InputError):
        parse_site(d)
    d = copy.deepcopy(TEST_SITE)
    d["containers"].append(copy.deepcopy(d["containers"][0]))
    with pytest.raises(InputError):
        parse_site(d)


def test_missing_or_broken_site_file(tmp_path):
    with pytest.raises(InputError):
        load_site(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("name = ")
    with pytest.raises(InputError):
        load_site(tmp_path / "bad.toml")


def _raw(zone: str) -> pd.Series:
    df = pd.read_csv(eia_trace_path(zone))
    return pd.Series(df["avg_CI"].to_numpy(), index=pd.to_datetime(df["timestamp"], utc=True))


def test_eia_trace_short_gap_is_interpolated():
    raw = _raw("CISO")
    gap = pd.Timestamp("2022-01-05T10:00Z")
    assert pd.isna(raw[gap])
    tr = load_carbon(CarbonSource(source="eia", zone="CISO"))
    v = tr.at(gap + pd.Timedelta(minutes=30))
    assert v.quality == "interpolated"
    lo, hi = raw[gap - pd.Timedelta(hours=1)], raw[gap + pd.Timedelta(hours=1)]
    assert v.gco2_per_kwh == pytest.approx((lo + hi) / 2)
    m = tr.at(pd.Timestamp("2022-06-21T12:59Z"))
    assert m.quality == "measured" and m.gco2_per_kwh == pytest.approx(raw[pd.Timestamp("2022-06-21T12:00Z")])


def test_eia_trace_long_gap_takes_the_previous_day_and_says_so():
    raw = _raw("PJM")
    tr = load_carbon(CarbonSource(source="eia", zone="PJM", max_gap_hours=3))
    t = pd.Timestamp("2022-03-13T15:00Z")  # inside a 22-hour gap
    assert pd.isna(raw[t])
    v = tr.at(t)
    assert v.quality == "filled-previous-day"
    assert v.gco2_per_kwh == pytest.approx(raw[t - pd.Timedelta(days=1)])
    assert tr.hourly().notna().all()


def test_trace_replays_other_years_and_holds_outside_range(tmp_path):
    tr = load_carbon(CarbonSource(source="eia", zone="CISO"))
    a = tr.at(pd.Timestamp("2025-06-21T12:10Z"))
    assert a.quality == "replayed" and a.gco2_per_kwh == tr.at(pd.Timestamp("2022-06-21T12:00Z")).gco2_per_kwh
    leap = tr.at(pd.Timestamp("2024-02-29T05:00Z"))
    assert leap.trace_hour.isoformat().startswith("2022-02-28T05")
    p = tmp_path / "ci.csv"
    p.write_text("ts,g\n2023-01-01T00:00Z,100\n2023-01-01T01:00Z,\n2023-01-01T02:00Z,300\n")
    src = CarbonSource(source="csv", path=str(p), timestamp_column="ts", column="g", replay="hold")
    tr2 = load_carbon(src)
    assert tr2.at(pd.Timestamp("2023-01-01T01:30Z")).gco2_per_kwh == pytest.approx(200)
    late = tr2.at(pd.Timestamp("2024-01-01T00:00Z"))
    assert late.quality == "held-nearest" and late.gco2_per_kwh == 300


def test_bad_traces_are_rejected(tmp_path):
    p = tmp_path / "ci.csv"
    p.write_text("timestamp,avg_CI\n2023-01-01T00:00Z,-5\n")
    with pytest.raises(InputError):
        load_carbon(CarbonSource(source="csv", path=str(p)))
    with pytest.raises(InputError) as e:
        load_carbon(CarbonSource(source="csv", path=str(p), column="nope"))
    assert e.value.field == "grid.carbon.column"
    with pytest.raises(InputError) as e:
        load_carbon(CarbonSource(source="eia", zone="XXXX"))
    assert e.value.field == "grid.carbon.zone"
    with pytest.raises(InputError):
        CarbonTrace(pd.Series([1.0, 2.0], index=pd.date_range("2022-01-01", periods=2, freq="h")))  # naive


def test_pvlib_clear_sky_day():
    loc = Location(latitude=37.39, longitude=-122.08, timezone="America/Los_Angeles", altitude_m=30)
    m = PvlibClearSky(loc, Solar(array_kwp=10, tilt_deg=25, azimuth_deg=180))
    midnight = pd.Timestamp("2022-06-21T07:00Z")  # local
    noon = pd.Timestamp("2022-06-21T20:00Z")  # 13:00 PDT, close to solar noon
    assert m.power_kw(midnight) == 0
    p = m.power_kw(noon)
    assert 5.0 < p < 10.0  # clear sky on a 10 kWp array with 14% losses
    day = [m.mean_power_kw(midnight + pd.Timedelta(hours=h), midnight + pd.Timedelta(hours=h + 1)) for h in range(24)]
    assert 40 < sum(day) < 80  # kWh/day on a June clear day
    assert max(range(24), key=lambda h: day[h]) in (12, 13)  # peak at local 12-14 h (solar noon ~13:10 PDT)
    assert day[0] == day[1] == day[23] == 0
    winter = [m.mean_power_kw(pd.Timestamp("2022-12-21T08:00Z") + pd.Timedelta(hours=h),
                              pd.Timestamp("2022-12-21T09:00Z") + pd.Timedelta(hours=h)) for h in range(24)]
    assert sum(winter) < sum(day)


def test_solar_trace(tmp_path):
    p = tmp_path / "pv.csv"
    p.write_text("timestamp,power_kw\n2022-06-21T12:00Z,0\n2022-06-21T13:00Z,4\n")
    loc = Location(latitude=0, longitude=0)
    m = load_solar(loc, Solar(source="csv", path=str(p)))
    assert m.power_kw(pd.Timestamp("2022-06-21T12:30Z")) == pytest.approx(2)
    assert m.power_kw(pd.Timestamp("2022-06-22T12:30Z")) == 0
    assert m.mean_power_kw(pd.Timestamp("2022-06-21T12:00Z"), pd.Timestamp("2022-06-21T13:00Z")) == pytest.approx(2)
