"""`carbon fetch` CLI: printing, storing, exit codes."""
from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from cicm.carbon.cli import carbon_app, local_day_window
from cicm.errors import InputError

try:
    from tests.fakeproviders import EM_TOKEN, NOW, fake, fake_server  # noqa: F401
except ImportError:
    from fakeproviders import EM_TOKEN, NOW, fake, fake_server  # noqa: F401

runner = CliRunner()


def invoke(*args):
    return runner.invoke(carbon_app, ["fetch", *args])


def hour_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("  20")]


def test_trace_utc_day_prints_24_hours():
    r = invoke("--zone", "CISO", "--date", "2022-06-01")
    assert r.exit_code == 0, r.output
    assert len(hour_lines(r.stdout)) == 24
    assert r.stdout.startswith("trace CISO: 24 h 2022-06-01T00:00Z..2022-06-01T23:00Z, issued 2022-05-31T18:00Z")


def test_trace_local_dst_day_has_23_hours():
    r = invoke("--zone", "CISO", "--date", "2022-03-13", "--tz", "America/Los_Angeles")
    assert r.exit_code == 0, r.output
    assert len(hour_lines(r.stdout)) == 23 and "2022-03-13T08:00Z" in r.stdout


def test_start_end_window():
    r = invoke("--zone", "ERCO", "--start", "2022-06-01T06:00Z", "--end", "2022-06-01T12:00Z")
    assert r.exit_code == 0, r.output
    assert len(hour_lines(r.stdout)) == 6


def test_store_and_export(tmp_path):
    from cicm.data.store import Store

    db, out = tmp_path / "c.duckdb", tmp_path / "f.csv"
    r = invoke("--zone", "SOCO", "--date", "2022-06-01", "--seed", "3", "--db", str(db), "--out", str(out))
    assert r.exit_code == 0, r.output
    exported = pd.read_csv(out)
    assert len(exported) == 24 and list(exported.columns) == ["zone", "target_hour", "issued_at", "gco2_per_kwh",
                                                              "provider"]
    with Store(db) as st:
        runs = st.runs()
        stored = st.query("SELECT * FROM carbon_forecasts ORDER BY target_hour")
    assert list(runs["status"]) == ["ok"] and list(runs["kind"]) == ["carbon-fetch"]
    assert len(stored) == 24 and (stored["run_id"] == runs["run_id"][0]).all()
    assert stored["gco2_per_kwh"].to_numpy() == pytest.approx(exported["gco2_per_kwh"].to_numpy())


def test_failure_is_one_line_exit_1_and_recorded(tmp_path):
    from cicm.data.store import Store

    db = tmp_path / "c.duckdb"
    r = invoke("--zone", "PJM", "--date", "2022-03-13", "--db", str(db))
    assert r.exit_code == 1
    assert r.stderr.startswith("error: gco2_per_kwh: PJM") and len(r.stderr.strip().splitlines()) == 1
    with Store(db) as st:
        runs = st.runs()
        n = st.query("SELECT count(*) AS n FROM carbon_forecasts")["n"][0]
    assert list(runs["status"]) == ["failed"] and "PJM" in runs["message"][0] and n == 0


@pytest.mark.parametrize(
    "args, field",
    [
        (["--zone", "CISO", "--date", "2022-06-01", "--start", "2022-06-01T00:00Z"], "date"),
        (["--zone", "CISO"], "date"),
        (["--zone", "CISO", "--start", "2022-06-01T00:00", "--end", "2022-06-02T00:00Z"], "start"),
        (["--zone", "CISO", "--date", "June 1st"], "date"),
        (["--zone", "CISO", "--start", "yesterday", "--end", "2022-06-02T00:00Z"], "start"),
        (["--zone", "CISO", "--date", "2022-06-01", "--now", "0001-01-01T00:00Z"], "now"),
        (["--zone", "CISO", "--date", "2022-06-01", "--tz", "Mars/Olympus"], "tz"),
        (["--zone", "CISO", "--date", "2022-06-01", "--provider", "oracle"], "provider"),
        (["--zone", "XX", "--date", "2022-06-01"], "zone"),
        (["--zone", "CISO", "--date", "2022-06-01", "--provider", "csv"], "path"),
    ],
)
def test_input_errors(args, field):
    r = invoke(*args)
    assert r.exit_code == 1
    assert r.stderr.startswith(f"error: {field}:"), r.stderr


def test_electricitymaps_via_fake(monkeypatch, fake):
    monkeypatch.setenv("ELECTRICITYMAPS_TOKEN", EM_TOKEN)
    r = invoke("--provider", "electricitymaps", "--zone", "DE", "--date", "2026-11-23", "--base-url", fake.url,
               "--now", NOW.isoformat())
    assert r.exit_code == 0, r.output
    assert len(hour_lines(r.stdout)) == 24


def test_provider_error_exit_1(monkeypatch, fake):
    monkeypatch.setenv("ELECTRICITYMAPS_TOKEN", "bad")
    r = invoke("--provider", "electricitymaps", "--zone", "DE", "--date", "2026-11-23", "--base-url", fake.url,
               "--now", NOW.isoformat())
    assert r.exit_code == 1
    assert r.stderr.startswith("error: electricitymaps:") and "HTTP 401" in r.stderr


def test_csv_provider(tmp_path):
    path = tmp_path / "f.csv"
    hours = pd.date_range("2026-11-23", periods=24, freq="h", tz="UTC")
    path.write_text("target_hour,gco2_per_kwh,issued_at\n" + "".join(
        f"{h.isoformat()},{100 + i},2026-11-22T17:00:00Z\n" for i, h in enumerate(hours)))
    r = invoke("--provider", "csv", "--zone", "Z", "--csv", str(path), "--date", "2026-11-23",
               "--now", "2026-11-22T18:00Z")
    assert r.exit_code == 0, r.output
    assert "mean 111.5" in r.stdout


def test_local_day_window_fall_back():
    start, end = local_day_window("2022-11-06", "America/New_York")
    assert (end - start) == pd.Timedelta(hours=25) and start == pd.Timestamp("2022-11-06T04:00Z")
    with pytest.raises(InputError):
        local_day_window("2022-11-06T05:00+00:00", "UTC")
    with pytest.raises(InputError):
        local_day_window("June 1st", "UTC")


@pytest.mark.parametrize("behaviour, field", [("nan_value", "gco2_per_kwh"), ("duplicate_datetime", "target_hour"),
                                              ("malformed_json", "electricitymaps")])
def test_bad_payload_leaves_the_stored_forecasts_unchanged(monkeypatch, fake, tmp_path, behaviour, field):
    from cicm.data.store import Store

    monkeypatch.setenv("ELECTRICITYMAPS_TOKEN", EM_TOKEN)
    db = tmp_path / "c.duckdb"
    args = ["--provider", "electricitymaps", "--zone", "DE", "--date", "2026-11-23", "--base-url", fake.url,
            "--now", NOW.isoformat(), "--db", str(db)]
    assert invoke(*args).exit_code == 0
    with Store(db) as st:
        before = st.query("SELECT * FROM carbon_forecasts ORDER BY target_hour")
    fake.set("electricitymaps", behaviour)
    bad = invoke(*args)
    assert bad.exit_code == 1 and bad.stderr.startswith(f"error: {field}"), bad.stderr
    with Store(db) as st:
        after = st.query("SELECT * FROM carbon_forecasts ORDER BY target_hour")
        runs = st.runs()
    pd.testing.assert_frame_equal(before, after)
    assert sorted(runs["status"]) == ["failed", "ok"]
