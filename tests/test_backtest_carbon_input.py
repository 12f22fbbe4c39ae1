"""A backtest on any zone's carbon CSV (cicm.backtest.carbon_input), down to `cicm backtest --carbon-csv` run as a
user runs it: a real subprocess whose stdout is one JSON document."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cicm.backtest.carbon_input import ZoneCarbon, read_actuals_csv
from cicm.carbon.trace import read_eia_trace, simulated_forecast_gco2_per_kwh
from cicm.errors import InputError


def _write(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_csv(path, index=False)
    return path


def _hours(start: str, n: int) -> pd.DatetimeIndex:
    return pd.date_range(start, periods=n, freq="h", tz="UTC")


def iso(index: pd.DatetimeIndex) -> list[str]:
    return [t.isoformat() for t in index]


def test_reads_offsets_names_and_sub_hourly_rows(tmp_path):
    quarter = pd.date_range("2023-03-01", periods=4 * 72, freq="15min", tz="UTC")
    values = np.arange(len(quarter), dtype=float) + 100
    local = quarter.tz_convert("Asia/Kolkata")  # offsets other than +00:00 are converted
    path = _write(tmp_path / "q.csv", pd.DataFrame({"Datetime": iso(local), "carbon_intensity": values}))
    hourly = read_actuals_csv(path)
    assert len(hourly) == 72 and hourly.index[0] == pd.Timestamp("2023-03-01T00:00Z")
    assert hourly.iloc[0] == pytest.approx(values[:4].mean())  # hourly mean of the four quarters
    # Electricity Maps' export: naive times in a column that says UTC
    em = _write(tmp_path / "em.csv", pd.DataFrame({"Datetime (UTC)": _hours("2023-01-01", 72).strftime("%Y-%m-%d %H:%M:%S"),
                                                    "Carbon Intensity gCO₂eq/kWh (Life cycle)": 250.0}))
    assert (read_actuals_csv(em) == 250.0).all()


@pytest.mark.parametrize("frame, field, words", [
    (pd.DataFrame({"timestamp": _hours("2023-01-01", 72).strftime("%Y-%m-%d %H:%M"), "avg_CI": 300.0}),
     "target_hour", "offset"),
    (pd.DataFrame({"timestamp": iso(_hours("2023-01-01", 72).append(_hours("2023-01-01", 1))), "avg_CI": 300.0}),
     "target_hour", "duplicate"),
    (pd.DataFrame({"timestamp": iso(_hours("2023-01-01", 72)), "avg_CI": 0.3}), "gco2_per_kwh", "kg/kWh"),
    (pd.DataFrame({"timestamp": iso(_hours("2023-01-01", 72)), "avg_CI": -5.0}), "gco2_per_kwh", "impossible"),
    (pd.DataFrame({"timestamp": iso(_hours("2023-01-01", 72)), "avg_CI": "high"}), "gco2_per_kwh", "non-numeric"),
    (pd.DataFrame({"timestamp": iso(_hours("2023-01-01", 72)), "ci": 300.0}), "gco2_per_kwh", "no gco2_per_kwh"),
    (pd.DataFrame({"timestamp": iso(_hours("2023-01-01", 10)), "avg_CI": 300.0}), "carbon_csv", "weeks"),
])
def test_bad_csv_names_the_field(tmp_path, frame, field, words):
    with pytest.raises(InputError) as e:
        read_actuals_csv(_write(tmp_path / "bad.csv", frame))
    assert e.value.field == field and words in str(e.value)


def test_gaps_short_filled_long_skipped(tmp_path):
    hours = _hours("2023-01-01", 24 * 20)
    values = pd.Series(300.0, index=hours)
    values.iloc[30:33] = np.nan  # 3 h: interpolated
    values.iloc[200:220] = np.nan  # 20 h: never invented
    path = _write(tmp_path / "g.csv", pd.DataFrame({"timestamp": iso(hours), "avg_CI": values.astype(str).replace("nan", "")}))
    zc = ZoneCarbon.from_csv(path, "XX")
    assert zc.actual(hours[24], hours[48]).notna().all()
    assert zc.long_gaps() == [(hours[200], hours[219])]
    with pytest.raises(InputError) as e:
        zc.actual(hours[190], hours[230])
    assert e.value.field == "gco2_per_kwh"
    with pytest.raises(InputError, match="covers"):
        zc.actual(hours[0] - pd.Timedelta(hours=1), hours[10])


def test_forecast_vintages_newest_known_at_the_moment(tmp_path):
    hours = _hours("2023-01-02", 24)
    rows = [(h, h - pd.Timedelta(hours=30), 500.0) for h in hours] + [(h, h - pd.Timedelta(hours=6), 400.0)
                                                                         for h in hours]
    frame = pd.DataFrame(rows, columns=["target_hour", "issued_at", "gco2_per_kwh"])
    frame["target_hour"], frame["issued_at"] = iso(pd.DatetimeIndex(frame["target_hour"])), \
        iso(pd.DatetimeIndex(frame["issued_at"]))
    path = _write(tmp_path / "f.csv", frame)
    act = _write(tmp_path / "a.csv", pd.DataFrame({"target_hour": iso(_hours("2023-01-01", 72)), "gco2_per_kwh": 300.0}))
    zc = ZoneCarbon.from_csv(act, "XX", forecast_csv=path)
    fc = zc.forecaster(hours, seed=0)
    idx = np.arange(24)
    assert (fc.at(hours[0] - pd.Timedelta(hours=12), idx[:6]) == 500.0).all()  # only the old vintage is out
    assert (fc.at(hours[0], idx[:6]) == 400.0).all()  # the newer one is
    with pytest.raises(InputError) as e:
        fc.at(hours[0] - pd.Timedelta(hours=40), idx)  # nothing issued yet
    assert e.value.field == "forecast_csv"


def test_simulated_forecast_matches_the_trace_provider():
    zc = ZoneCarbon.bundled("CISO")
    hours = _hours("2022-06-01", 72)
    issued = pd.Timestamp("2022-05-31T01:00Z")
    got = zc.forecaster(hours, seed=3).at(issued, np.arange(72))
    want = simulated_forecast_gco2_per_kwh(read_eia_trace("CISO").reindex(hours), "CISO", issued, 3)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_cli_backtest_any_zone_csv_half_hour_timezone_and_another_year(tmp_path):
    """2022 ERCO actuals relabelled as 2024 (a leap year), planned for a campus in Asia/Kolkata (UTC+5:30)."""
    trace = read_eia_trace("ERCO")
    moved = trace.index + pd.Timedelta(days=730)
    path = _write(tmp_path / "zone_2024.csv", pd.DataFrame({"timestamp": iso(moved),
                                                            "avg_CI": trace.round(3).astype(str).replace("nan", "")}))
    cicm = Path(sys.executable).with_name("cicm")
    proc = subprocess.run([str(cicm), "backtest", "--carbon-csv", str(path), "--zone", "IN-XX", "--timezone",
                           "Asia/Kolkata", "--start", "2024-05-01", "--days", "2", "--json", "--no-experiment",
                           "--no-plots", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)  # stdout is exactly one JSON document
    assert doc["zone"] == "IN-XX" and doc["timezone"] == "Asia/Kolkata" and doc["carbon_source"] == str(path)
    assert doc["workload_shift_days"] % 7 == 0 and doc["workload_shift_days"] > 700
    assert doc["simulated_days"] == 2 and doc["hard_checks_ok"] is True
    assert {p["policy"] for p in doc["policies"]} >= {"carbon-agnostic", "planner", "oracle"}
    bad = subprocess.run([str(cicm), "backtest", "--carbon-csv", str(path), "--zone", "IN-XX", "--start", "2024-05-01",
                          "--days", "2"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "timezone" in bad.stdout + bad.stderr
