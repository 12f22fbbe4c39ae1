"""CSV forecast source."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from cicm.carbon.csvsource import read_csv_forecast, read_raw_csv
from cicm.carbon.providers import fetch_forecast
from cicm.errors import InputError

START = pd.Timestamp("2026-11-23T00:00Z")
END = pd.Timestamp("2026-11-24T00:00Z")
NOW = pd.Timestamp("2026-11-22T18:00Z")


def write(tmp_path, rows, header="target_hour,gco2_per_kwh,issued_at", name="f.csv"):
    path = tmp_path / name
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def hourly_rows(n=24, value=lambda i: 200 + i, issued="2026-11-22T17:00:00Z", start=START):
    return [f"{(start + pd.Timedelta(hours=i)).isoformat()},{value(i)},{issued}" for i in range(n)]


def test_ok(tmp_path):
    out = read_csv_forecast(write(tmp_path, hourly_rows()), zone="CISO", start=START, end=END, now=NOW)
    assert len(out) == 24 and (out["zone"] == "CISO").all() and (out["provider"] == "csv").all()
    np.testing.assert_allclose(out["gco2_per_kwh"], 200 + np.arange(24))
    assert (out["issued_at"] == pd.Timestamp("2026-11-22T17:00Z")).all()


def test_z_suffix_and_offsets_accepted(tmp_path):
    rows = [f"{(START + pd.Timedelta(hours=i)).tz_convert('Europe/Berlin').isoformat()},300," for i in range(24)]
    rows = [r + "2026-11-22T17:00:00Z" for r in rows]
    out = read_csv_forecast(write(tmp_path, rows), zone="Z", start=START, end=END, now=NOW)
    assert out["target_hour"].iloc[0] == START


def test_via_dispatcher(tmp_path):
    out = fetch_forecast("csv", "Z", START, END, now=NOW, path=write(tmp_path, hourly_rows()))
    assert len(out) == 24


def test_dispatcher_needs_path():
    with pytest.raises(InputError) as e:
        fetch_forecast("csv", "Z", START, END, now=NOW)
    assert e.value.field == "path"


def test_missing_file(tmp_path):
    with pytest.raises(InputError) as e:
        read_raw_csv(tmp_path / "nope.csv", zone="Z")
    assert e.value.field == "path"


def test_missing_required_column(tmp_path):
    path = write(tmp_path, ["2026-11-23T00:00:00Z,300"], header="target_hour,value")
    with pytest.raises(InputError) as e:
        read_raw_csv(path, zone="Z")
    assert e.value.field == "gco2_per_kwh"


def test_naive_timestamps_rejected(tmp_path):
    rows = [f"{(START + pd.Timedelta(hours=i)).tz_localize(None).isoformat()},300,2026-11-22T17:00:00Z"
            for i in range(24)]
    with pytest.raises(InputError) as e:
        read_raw_csv(write(tmp_path, rows), zone="Z")
    assert e.value.field == "target_hour" and "naive" in e.value.message


def test_blank_value_is_nan_named(tmp_path):
    rows = hourly_rows(value=lambda i: "" if i == 4 else 300)
    with pytest.raises(InputError) as e:
        read_csv_forecast(write(tmp_path, rows), zone="Z", start=START, end=END, now=NOW)
    assert e.value.field == "gco2_per_kwh" and "2026-11-23T04:00Z" in e.value.message


def test_junk_value_rejected(tmp_path):
    rows = hourly_rows(value=lambda i: "lots" if i == 4 else 300)
    with pytest.raises(InputError) as e:
        read_raw_csv(write(tmp_path, rows), zone="Z")
    assert e.value.field == "gco2_per_kwh" and "lots" in e.value.message


def test_stale_issued_at(tmp_path):
    rows = hourly_rows(issued="2026-11-20T00:00:00Z")
    with pytest.raises(InputError) as e:
        read_csv_forecast(write(tmp_path, rows), zone="Z", start=START, end=END, now=NOW)
    assert e.value.field == "issued_at"


def test_without_issued_at_uses_argument_then_mtime(tmp_path):
    rows = [r.rsplit(",", 1)[0] for r in hourly_rows()]
    path = write(tmp_path, rows, header="target_hour,gco2_per_kwh")
    out = read_csv_forecast(path, zone="Z", start=START, end=END, now=NOW, issued_at=NOW - pd.Timedelta(hours=1))
    assert (out["issued_at"] == NOW - pd.Timedelta(hours=1)).all()
    old = (NOW - pd.Timedelta(days=10)).timestamp()
    os.utime(path, (old, old))
    with pytest.raises(InputError) as e:  # mtime 10 days before now: stale
        read_csv_forecast(path, zone="Z", start=START, end=END, now=NOW)
    assert e.value.field == "issued_at"


def test_zone_column_must_match(tmp_path):
    rows = [f"{r},DE" for r in hourly_rows()]
    path = write(tmp_path, rows, header="target_hour,gco2_per_kwh,issued_at,zone")
    assert len(read_csv_forecast(path, zone="DE", start=START, end=END, now=NOW)) == 24
    with pytest.raises(InputError) as e:
        read_raw_csv(path, zone="FR")
    assert e.value.field == "zone"


def test_half_hourly_csv_is_averaged(tmp_path):
    rows = [f"{(START + pd.Timedelta(minutes=30 * i)).isoformat()},{100 if i % 2 else 200},2026-11-22T17:00:00Z"
            for i in range(48)]
    out = read_csv_forecast(write(tmp_path, rows), zone="Z", start=START, end=END, now=NOW)
    np.testing.assert_allclose(out["gco2_per_kwh"], 150.0)


def test_duplicate_and_missing_rows(tmp_path):
    rows = hourly_rows()
    with pytest.raises(InputError) as e:
        read_csv_forecast(write(tmp_path, rows + [rows[3]]), zone="Z", start=START, end=END, now=NOW)
    assert e.value.field == "target_hour" and "duplicate" in e.value.message
    with pytest.raises(InputError) as e:
        read_csv_forecast(write(tmp_path, rows[:3] + rows[4:]), zone="Z", start=START, end=END, now=NOW)
    assert e.value.field == "target_hour" and "2026-11-23T03:00Z" in e.value.message
