"""A fleet file for a real fleet (issue 14): zones as providers name them, domains without SPECpower rows, demo
fields optional; a fleet file that does not match the store refused naming the field; actuals from each live
provider turned into hourly rows. The end-to-end plan of such a fleet is tests/test_real_fleet_e2e.py."""
from __future__ import annotations

import json
import threading
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cicm.carbon.actuals import fetch_actuals, hourly_actuals
from cicm.carbon.schema import make_forecast_frame
from cicm.carbon.watttime import lbs_per_mwh_to_gco2_per_kwh
from cicm.config import check_fleet_zones, load_fleet
from cicm.errors import InputError
from cicm.planning.ingest import import_demo_telemetry
from cicm.planning.pipeline import PlanOptions, check_fleet_matches_store, plan_day
from cicm.store import Store

BASE = """
name = "acme"

[[campuses]]
name = "muc"
grid_zone = "{zone}"
timezone = "{tz}"
contract_limit_kw = 900.0
{carbon}
  [[campuses.clusters]]
  name = "muc-a"
{cluster_extra}
    [[campuses.clusters.power_domains]]
    name = "muc-a-r1"
{domain}
"""
CARBON_EM = '  [campuses.carbon]\n  provider = "electricitymaps"\n'


def fleet_file(tmp_path, *, zone="DE", tz="Europe/Berlin", carbon=CARBON_EM, cluster_extra="",
               domain="    cores = 512\n"):
    path = tmp_path / "fleet.toml"
    path.write_text(BASE.format(zone=zone, tz=tz, carbon=carbon, cluster_extra=cluster_extra, domain=domain))
    return path


def refused(path) -> InputError:
    with pytest.raises(InputError) as err:
        load_fleet(path)
    return err.value


# ---------------------------------------------------------------------------------------------- the file


def test_a_real_fleet_needs_no_demo_fields(tmp_path):
    fleet = load_fleet(fleet_file(tmp_path, domain="    cores = 512\n    power_points = [[0, 40], [256, 90], "
                                                   "[512, 150]]\n"))
    assert not fleet.is_demo and fleet.history_start is None
    assert fleet.cluster("muc-a").capacity_cores == 512
    assert fleet.campuses[0].provider("trace") == "electricitymaps"
    assert fleet.cluster("muc-a").power_domains[0].declared_curve_kw() == ([0, 256, 512], [40, 90, 150])
    with pytest.raises(InputError) as err:
        fleet.require_demo("cicm demo seed")
    assert err.value.field == "history_start"


@pytest.mark.parametrize("zone, provider_table, field, words", [
    ("Germany", CARBON_EM, "campuses.0.grid_zone", "not a electricitymaps zone"),
    ("de", CARBON_EM, "campuses.0.grid_zone", "not a electricitymaps zone"),
    ("caiso north", '  [campuses.carbon]\n  provider = "watttime"\n', "campuses.0.grid_zone", "not a watttime zone"),
    ("DE", '  [campuses.carbon]\n  provider = "trace"\n', "campuses.0.grid_zone", "bundled zones are"),
    ("DE", '  [campuses.carbon]\n  provider = "csv"\n', "campuses.0.carbon.forecast_csv", "needs forecast_csv"),
    ("DE", '  [campuses.carbon]\n  provider = "electricitymaps"\n  base_url = "ftp://x"\n',
     "campuses.0.carbon.base_url", "http(s) URL"),
    ("DE", '  [campuses.carbon]\n  provider = "electricitymaps"\n  token = "abc"\n', "campuses.0.carbon.token",
     "Extra inputs"),
])
def test_unknown_zones_and_bad_carbon_tables_name_the_field(tmp_path, zone, provider_table, field, words):
    err = refused(fleet_file(tmp_path, zone=zone, carbon=provider_table))
    assert err.field == field and words in err.message


@pytest.mark.parametrize("tz", ["Asia/Kolkata", "Asia/Kathmandu", "America/Santiago", "Asia/Beirut",
                                "Australia/Lord_Howe"])
def test_any_iana_time_zone_is_accepted(tmp_path, tz):
    assert load_fleet(fleet_file(tmp_path, tz=tz)).campuses[0].timezone == tz


def test_an_unknown_time_zone_names_the_field(tmp_path):
    err = refused(fleet_file(tmp_path, tz="Mars/Olympus_Mons"))
    assert err.field == "campuses.0.timezone" and "Mars/Olympus_Mons" in err.message


@pytest.mark.parametrize("domain, field, words", [
    ("", "campuses.0.clusters.0.power_domains.0.cores", "give the domain's cores"),
    ("    machines = 10\n", "campuses.0.clusters.0.power_domains.0.spec_row", "together"),
    ("    cores = 512\n    power_points = [[10, 40], [512, 150]]\n", "campuses.0.clusters.0.power_domains.0."
     "power_points", "from 0 to the domain's 512 cores"),
    ("    cores = 512\n    power_points = [[0, 40], [300, 90], [200, 100], [512, 150]]\n",
     "campuses.0.clusters.0.power_domains.0.power_points", "increase strictly"),
    ("    cores = 512\n    power_points = [[0, 90], [512, 40]]\n", "campuses.0.clusters.0.power_domains.0.power_points",
     "must not fall"),
    ("    cores = 512\n    power_points = [[0, 40], [512, nan]]\n", "campuses.0.clusters.0.power_domains.0."
     "power_points.1.1", "finite"),
    ("    machines = 10\n    spec_row = 12\n    server_model = \"ProLiant DL325 Gen10 Plus\"\n    cores = 7\n",
     "campuses.0.clusters.0.power_domains.0.cores", "have 1280"),
])
def test_bad_power_domains_name_the_field(tmp_path, domain, field, words):
    err = refused(fleet_file(tmp_path, domain=domain))
    assert err.field == field and words in err.message


def test_cluster_cores_must_add_up_and_demo_fields_come_together(tmp_path):
    err = refused(fleet_file(tmp_path, cluster_extra="  cores = 1000\n"))
    assert err.field == "campuses.0.clusters.0.cores" and "512" in err.message
    err = refused(fleet_file(tmp_path, cluster_extra='  inflexible_trace = "google2019"\n'))
    assert err.field == "campuses.0.clusters.0.inflexible_peak_share"


def test_a_campus_without_a_carbon_table_is_checked_against_the_runs_provider(tmp_path):
    fleet = load_fleet(fleet_file(tmp_path, zone="US-CAL-CISO", carbon=""))
    check_fleet_zones(fleet, "electricitymaps")
    with pytest.raises(InputError) as err:
        check_fleet_zones(fleet, "trace")
    assert err.value.field == "campuses.0.grid_zone" and "US-CAL-CISO" in err.value.message


def test_csv_paths_are_relative_to_the_fleet_file(tmp_path):
    carbon = '  [campuses.carbon]\n  provider = "csv"\n  forecast_csv = "feeds/f.csv"\n  actuals_csv = "/abs/a.csv"\n'
    fleet = load_fleet(fleet_file(tmp_path, zone="IN-SO", tz="Asia/Kolkata", carbon=carbon))
    assert fleet.campuses[0].carbon.forecast_csv == tmp_path.resolve() / "feeds" / "f.csv"
    assert str(fleet.campuses[0].carbon.actuals_csv) == "/abs/a.csv"


# ---------------------------------------------------------------------------------- fleet against the store


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "cicm.duckdb"
    with Store(path) as store:
        import_demo_telemetry(store, load_fleet())
    return path


def _edited_demo(tmp_path, old: str, new: str):
    text = load_fleet.__globals__["default_fleet_path"]().read_text()
    assert old in text
    path = tmp_path / "fleet.toml"
    path.write_text(text.replace(old, new, 1))
    return load_fleet(path)


def _runs(path) -> int:
    with Store(path, read_only=True) as store:
        return int(store.query("SELECT count(*) AS n FROM runs")["n"].iloc[0])


def test_the_demo_fleet_matches_its_store(demo_store):
    with Store(demo_store, read_only=True) as store:
        check_fleet_matches_store(store, load_fleet())


def test_a_domain_moved_to_another_cluster_is_refused(demo_store, tmp_path):
    # sj-a-pd2's telemetry is stored under sj-a; this file renames sj-b's first domain to it (and sj-a's away)
    fleet = _edited_demo(tmp_path, 'name = "sj-a-pd2"', 'name = "sj-a-pdx"')
    text = (tmp_path / "fleet.toml").read_text()
    i = text.index('name = "sj-b"')
    text = text[:i] + text[i:].replace('name = "sj-b-pd1"', 'name = "sj-a-pd2"', 1)
    (tmp_path / "fleet.toml").write_text(text)
    fleet = load_fleet(tmp_path / "fleet.toml")
    with Store(demo_store, read_only=True) as store:
        with pytest.raises(InputError) as err:
            check_fleet_matches_store(store, fleet)
    assert err.value.field == "campuses.0.clusters.1.power_domains.0.name"
    assert "'sj-a'" in err.value.message and "does not match the store's history" in err.value.message


def test_a_cluster_smaller_than_its_stored_usage_is_refused_and_nothing_is_planned(demo_store, tmp_path):
    fleet = _edited_demo(tmp_path, "machines = 400", "machines = 40")  # sj-a-pd1: a tenth of its machines
    copy = tmp_path / "copy.duckdb"
    copy.write_bytes(demo_store.read_bytes())
    before = _runs(copy)
    with Store(copy) as store:
        with pytest.raises(InputError) as err:
            plan_day(store, fleet, date(2022, 6, 15), PlanOptions())
    assert err.value.field == "campuses.0.clusters.0.power_domains"
    assert "stored usage peaks at" in err.value.message
    assert _runs(copy) == before  # nothing recorded as a plan


def test_a_domain_without_curve_or_telemetry_is_refused(demo_store, tmp_path):
    fleet = _edited_demo(tmp_path, 'name = "sj-a-pd1"\n    machines = 400\n    spec_row = 12\n'
                                   '    server_model = "ProLiant DL325 Gen10 Plus"',
                         'name = "sj-a-new"\n    cores = 51200')
    with Store(demo_store, read_only=True) as store:
        with pytest.raises(InputError) as err:
            check_fleet_matches_store(store, fleet)
    assert err.value.field == "campuses.0.clusters.0.power_domains.0"
    assert "no power curve" in err.value.message


# ------------------------------------------------------------------------------------------------ actuals

T0 = pd.Timestamp("2026-10-14T00:00Z")


def _raw(times, values, provider="csv"):
    return make_forecast_frame(zone="Z", target_times=pd.DatetimeIndex(times), issued_at=T0, gco2_per_kwh=values,
                               provider=provider)


def test_sub_hourly_actuals_become_hourly_means_and_partial_hours_stay_missing():
    times = pd.date_range(T0, periods=12 * 3 - 4, freq="5min")  # 2 whole hours and 8 points of the third
    values = np.arange(len(times), dtype=float) + 100
    rows = hourly_actuals(_raw(times, values), T0, T0 + pd.Timedelta(hours=3), source="watttime")
    assert list(rows["hour"]) == [T0, T0 + pd.Timedelta(hours=1)]
    assert rows["gco2_per_kwh"].tolist() == [values[:12].mean(), values[12:24].mean()]


def test_actuals_refuse_conflicting_repeats_and_impossible_values():
    with pytest.raises(InputError, match="twice with different values"):
        hourly_actuals(_raw([T0, T0], [300.0, 310.0]), T0, T0 + pd.Timedelta(hours=1), source="csv")
    same = hourly_actuals(_raw([T0, T0], [300.0, 300.0]), T0, T0 + pd.Timedelta(hours=1), source="csv")
    assert same["gco2_per_kwh"].tolist() == [300.0]
    with pytest.raises(InputError, match="negative"):
        hourly_actuals(_raw([T0], [-1.0]), T0, T0 + pd.Timedelta(hours=1), source="csv")
    with pytest.raises(InputError, match="wrong units"):
        hourly_actuals(_raw([T0], [90000.0]), T0, T0 + pd.Timedelta(hours=1), source="csv")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1500, allow_nan=False), min_size=1, max_size=48), st.integers(0, 47))
def test_csv_actuals_keep_only_hours_before_the_clock(tmp_path_factory, values, clock_hours):
    folder = tmp_path_factory.mktemp("csv")
    hours = pd.date_range(T0, periods=len(values), freq="h")
    pd.DataFrame({"target_hour": [h.isoformat() for h in hours], "gco2_per_kwh": values}).to_csv(
        folder / "a.csv", index=False)
    now = T0 + pd.Timedelta(hours=clock_hours, minutes=30)
    rows = fetch_actuals("csv", "Z", T0 - pd.Timedelta(days=1), T0 + pd.Timedelta(days=3), now=now,
                         path=folder / "a.csv")
    kept = [h for h in hours if h < now.floor("h")]
    assert list(rows["hour"]) == kept
    assert rows["gco2_per_kwh"].tolist() == pytest.approx(values[: len(kept)])


class _WattTime:
    """A loopback WattTime v3: /login and /v3/historical (5-minute points in lbs/MWh)."""

    def __init__(self):
        self.queries: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                outer.queries.append(self.path)
                if self.path.startswith("/login"):
                    return self._send({"token": "t"})
                points = pd.date_range(T0, periods=24, freq="5min")
                return self._send({"data": [{"point_time": p.isoformat(), "value": 900.0 + i}
                                            for i, p in enumerate(points)],
                                   "meta": {"region": "CAISO_NORTH", "signal_type": "co2_moer",
                                            "units": "lbs_co2_per_mwh"}})

            def _send(self, payload):
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_watttime_historical_actuals_in_grams(monkeypatch):
    monkeypatch.setenv("WATTTIME_USERNAME", "u")
    monkeypatch.setenv("WATTTIME_PASSWORD", "p")
    wt = _WattTime()
    try:
        rows = fetch_actuals("watttime", "CAISO_NORTH", T0, T0 + pd.Timedelta(hours=2), now=T0 + pd.Timedelta(days=1),
                             base_url=wt.url)
    finally:
        wt.server.shutdown()
    assert list(rows["hour"]) == [T0, T0 + pd.Timedelta(hours=1)]
    expected = [lbs_per_mwh_to_gco2_per_kwh(900.0 + np.arange(12)).mean(),
                lbs_per_mwh_to_gco2_per_kwh(912.0 + np.arange(12)).mean()]
    assert rows["gco2_per_kwh"].tolist() == pytest.approx(expected, rel=1e-12)
    assert any("/v3/historical" in q and "signal_type=co2_moer" in q and "start=2026-10-14" in q for q in wt.queries)


def test_a_provider_that_is_down_makes_its_campus_fall_back_visibly(demo_store, tmp_path, monkeypatch):
    """ca-sj asks an Electricity Maps that is down (a closed loopback port): it falls back to full capacity
    with the reason, the carbon-actuals stage is degraded naming the provider, and the other campuses (the
    trace) are shaped."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    monkeypatch.setenv("ELECTRICITYMAPS_TOKEN", "t")
    fleet = _edited_demo(tmp_path, 'grid_zone = "CISO"', 'grid_zone = "US-CAL-CISO"')
    text = (tmp_path / "fleet.toml").read_text().replace(
        "  [[campuses.clusters]]", f'  [campuses.carbon]\n  provider = "electricitymaps"\n  base_url = '
                                   f'"http://127.0.0.1:{port}"\n  [[campuses.clusters]]', 1)
    (tmp_path / "fleet.toml").write_text(text)
    fleet = load_fleet(tmp_path / "fleet.toml")
    copy = tmp_path / "copy.duckdb"
    copy.write_bytes(demo_store.read_bytes())
    with Store(copy) as store:
        outcome = plan_day(store, fleet, date(2022, 6, 15), PlanOptions(as_of="2022-06-15T01:00Z"))
        runs = store.query("SELECT status, message FROM runs WHERE kind = 'carbon-actuals'")
    stages = {s.name: s for s in outcome.stages}
    assert stages["carbon-actuals"].status == "degraded" and "electricitymaps US-CAL-CISO" in stages[
        "carbon-actuals"].detail
    assert stages["carbon-forecast"].status == "degraded"
    clusters = outcome.clusters.set_index("cluster")
    sj = [c.name for c in fleet.campuses[0].clusters]
    assert all(clusters.loc[n, "status"] == "fallback" and clusters.loc[n, "reason"].startswith(
        "no-carbon-forecast") for n in sj)
    others = clusters.drop(index=sj)
    assert (others["status"] == "shaped").any()
    assert runs["status"].tolist() == ["degraded"] and "electricitymaps" in runs["message"].iloc[0]


def test_a_plan_runs_duration_is_the_whole_plans(demo_store, tmp_path):
    """The runs table times the plan from its first stage, not only its final write (issue 17)."""
    copy = tmp_path / "copy.duckdb"
    copy.write_bytes(demo_store.read_bytes())
    with Store(copy) as store:
        outcome = plan_day(store, load_fleet(), date(2022, 6, 15), PlanOptions())
        run = store.query("SELECT started_at, finished_at FROM runs WHERE run_id = ?", [outcome.run_id]).iloc[0]
    seconds = (pd.Timestamp(run["finished_at"]) - pd.Timestamp(run["started_at"])).total_seconds()
    steps = ("telemetry", "carbon-actuals", "carbon-forecast", "slo-feedback", "models-and-programs", "store-write")
    whole = sum(outcome.seconds[k] for k in steps)
    assert whole > 2 * outcome.seconds["store-write"]  # the write is a small part of the plan
    assert seconds == pytest.approx(whole, rel=0.2, abs=0.5)


def test_a_csv_drop_reads_as_the_parquet_drop_and_naive_hours_are_refused(tmp_path):
    from cicm.demo.telemetry import demo_power_telemetry, demo_usage_history
    from cicm.planning.ingest import read_telemetry_dir

    fleet = load_fleet()
    usage = demo_usage_history(fleet)
    usage = usage[usage["hour"] < usage["hour"].min() + pd.Timedelta(hours=6)].reset_index(drop=True)
    power = demo_power_telemetry(fleet, usage)
    parquet, csv = tmp_path / "parquet", tmp_path / "csv"
    parquet.mkdir()
    csv.mkdir()
    usage.to_parquet(parquet / "usage.parquet")
    power.to_parquet(parquet / "power.parquet")
    usage.assign(hour=usage["hour"].map(lambda h: h.isoformat())).to_csv(csv / "usage-0.csv", index=False)
    power.assign(hour=power["hour"].map(lambda h: h.tz_convert("Asia/Kolkata").isoformat())).to_csv(
        csv / "power-0.csv", index=False)
    from_parquet, from_csv = read_telemetry_dir(parquet, fleet), read_telemetry_dir(csv, fleet)
    pd.testing.assert_frame_equal(from_csv[0], from_parquet[0], check_dtype=False)
    pd.testing.assert_frame_equal(from_csv[1], from_parquet[1], check_dtype=False)
    (csv / "usage-0.csv").write_text((csv / "usage-0.csv").read_text().replace("+00:00", "", 1))
    with pytest.raises(InputError) as err:
        read_telemetry_dir(csv, fleet)
    assert err.value.field == "hour" and "no UTC offset" in err.value.message


def test_an_interruption_before_the_models_is_recorded_as_a_failed_plan_run(demo_store, tmp_path):
    """A signal (or a bug) in any stage after the checks leaves a failed 'plan' run with its reason; bad input
    refused by the checks leaves none (test_a_cluster_smaller_than_its_stored_usage_...)."""
    from cicm.clikit import Interrupted

    copy = tmp_path / "copy.duckdb"
    copy.write_bytes(demo_store.read_bytes())

    def slo(store, fleet, plan_date):
        raise Interrupted("interrupted by SIGTERM")

    with Store(copy) as store:
        with pytest.raises(Interrupted):
            plan_day(store, load_fleet(), date(2022, 6, 15), PlanOptions(), slo=slo)
        runs = store.query("SELECT status, message FROM runs WHERE kind = 'plan'")
    assert runs.to_dict("records") == [{"status": "failed", "message": "Interrupted: interrupted by SIGTERM"}]
