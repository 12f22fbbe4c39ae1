"""The nightly plan reads its telemetry from the Prometheus its fleet file names (issue 14, item 3).

A small fleet that is not the demo's (one campus in CISO, two clusters, four power domains, the trace carbon
provider) names a real Prometheus in its ``[telemetry]`` table. The Prometheus (tests/prometheus_server.py) is
backfilled with ~6 weeks of hourly OpenMetrics samples of the fleet's series (the demo generators' values, as a
monitoring stack would have exported them); ``plan_day`` (no Prefect) reads them into an empty store, plans, and
the next night reads only the hours since. A Prometheus that is down degrades the telemetry stage, records a
failed telemetry-ingest run, stores nothing, and the plan goes on with the stored history.
"""
from __future__ import annotations

from datetime import date

import pandas as pd
import pytest

from cicm.config import load_fleet
from cicm.demo.telemetry import demo_power_telemetry, demo_usage_history
from cicm.errors import InputError
from cicm.planning.pipeline import PlanOptions, plan_day
from cicm.store import Store
from cicm.timeutil import planning_time_utc

try:
    from tests.prometheus_server import free_port, openmetrics, prometheus_server
except ImportError:
    from prometheus_server import free_port, openmetrics, prometheus_server

TZ = "America/Los_Angeles"
HISTORY_START = "2022-05-06"
HISTORY_DAYS = 42  # samples up to 2022-06-17 00:00 UTC
FIRST_PLAN, NEXT_PLAN = date(2022, 6, 15), date(2022, 6, 16)
LOOKBACK_HOURS = 40 * 24  # the load forecast needs 28 complete local days

FLEET = """
name = "prom-fleet"
history_start = "{start}"
history_days = {days}

[telemetry]
source = "prometheus"
url = "{url}"
lookback_hours = {lookback}

[telemetry.mapping]
inflexible_cpu_cores = {{ query = 'cicm_inflexible_cpu_cores{{cluster="{{cluster}}"}}', hour = "start" }}
flexible_cpu_cores = {{ query = 'cicm_flexible_cpu_cores{{cluster="{{cluster}}"}}', hour = "start" }}
reserved_cpu_cores = {{ query = 'cicm_reserved_cpu_cores{{cluster="{{cluster}}"}}', hour = "start" }}
flexible_arrived_core_hours = {{ query = 'cicm_flexible_arrived_core_hours{{cluster="{{cluster}}"}}', hour = "start" }}
domain_cpu_cores = {{ query = 'cicm_domain_cpu_cores{{domain="{{domain}}"}}', hour = "start" }}
power_kw = {{ query = 'cicm_domain_power_kw{{cluster="{{cluster}}",domain="{{domain}}"}}', hour = "start" }}

[[campuses]]
name = "bay"
grid_zone = "CISO"
timezone = "{tz}"
contract_limit_kw = 600.0

  [[campuses.clusters]]
  name = "web"
  inflexible_trace = "google2019"
  inflexible_peak_share = 0.55
  flexible_trace = "pai"
  flexible_mean_share = 0.20
    [[campuses.clusters.power_domains]]
    name = "web-row1"
    machines = 300
    spec_row = 12
    server_model = "ProLiant DL325 Gen10 Plus"
    [[campuses.clusters.power_domains]]
    name = "web-row2"
    machines = 150
    spec_row = 47
    server_model = "ThinkSystem SR665"

  [[campuses.clusters]]
  name = "batch"
  inflexible_trace = "azure2019"
  inflexible_peak_share = 0.50
  flexible_trace = "azure"
  flexible_mean_share = 0.25
    [[campuses.clusters.power_domains]]
    name = "batch-row1"
    machines = 200
    spec_row = 35
    server_model = "ProLiant DL380 Gen10 Plus"
    [[campuses.clusters.power_domains]]
    name = "batch-row2"
    machines = 200
    spec_row = 50
    server_model = "PRIMERGY RX2530 M6"
"""

def write_fleet(path, url: str):
    path.write_text(FLEET.format(start=HISTORY_START, days=HISTORY_DAYS, url=url, lookback=LOOKBACK_HOURS, tz=TZ))
    return load_fleet(path)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The fleet's telemetry as written to Prometheus: (usage, power) frames over the whole history."""
    fleet = write_fleet(tmp_path_factory.mktemp("fleet") / "fleet.toml", "http://127.0.0.1:9")
    usage = demo_usage_history(fleet, seed=3)
    return usage, demo_power_telemetry(fleet, usage, seed=3)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, written):
    with prometheus_server(tmp_path_factory.mktemp("prometheus"), openmetrics(*written)) as url:
        yield url


def planned_at(day: date) -> pd.Timestamp:
    return planning_time_utc(day, TZ)


def plan(store, fleet, day: date):
    """The nightly plan of `day`, run at its planning time (18:00 local the evening before)."""
    return plan_day(store, fleet, day, PlanOptions(as_of=planned_at(day).isoformat()))


def stored(store, table: str, columns) -> pd.DataFrame:
    keys = ["cluster", "hour"] if table == "usage_history" else ["domain", "hour"]
    frame = store.query(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {', '.join(keys)}")
    frame["hour"] = pd.to_datetime(frame["hour"], utc=True)
    return frame.reset_index(drop=True)


def expected(frame: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp, key: str) -> pd.DataFrame:
    part = frame[(frame["hour"] >= start) & (frame["hour"] < end)]
    return part.sort_values([key, "hour"]).reset_index(drop=True)


def telemetry_runs(store) -> pd.DataFrame:
    return store.query("SELECT status, params, message FROM runs WHERE kind = 'telemetry-ingest' ORDER BY started_at")


def vcc_clusters(store, day: date) -> dict[str, int]:
    rows = store.query("SELECT cluster, count(*) AS n FROM current_vccs WHERE plan_date = ? GROUP BY cluster",
                       [day])
    return dict(zip(rows["cluster"], rows["n"]))


@pytest.fixture(scope="module")
def first_night(prometheus, written, tmp_path_factory):
    """An empty store's first two nights with the fleet's Prometheus up: (db path, fleet, outcomes)."""
    root = tmp_path_factory.mktemp("nightly")
    fleet = write_fleet(root / "fleet.toml", prometheus)
    db = root / "cicm.duckdb"
    with Store(db) as store:
        first = plan(store, fleet, FIRST_PLAN)
        usage_after_first = stored(store, "usage_history", written[0].columns)
        second = plan(store, fleet, NEXT_PLAN)
    return db, fleet, first, usage_after_first, second


def test_the_first_night_reads_lookback_hours_and_plans_both_clusters(first_night, written):
    db, fleet, first, usage_after_first, _ = first_night
    usage, _ = written
    report = first.stages[0]
    assert report.name == "telemetry" and report.status == "ran", report
    end = planned_at(FIRST_PLAN).floor("h")
    start = end - pd.Timedelta(hours=LOOKBACK_HOURS)
    assert fleet.telemetry.url in report.detail and start.isoformat() in report.detail
    # exactly the values written to Prometheus, for exactly the hours [end - lookback_hours, planning time)
    pd.testing.assert_frame_equal(usage_after_first, expected(usage, start, end, "cluster"), check_dtype=False)
    with Store(db) as store:
        vccs = vcc_clusters(store, FIRST_PLAN)
        runs = telemetry_runs(store)
    assert vccs == {"web": 24, "batch": 24}
    assert first.status in ("ok", "degraded")
    status = first.clusters.set_index("cluster")["status"]
    assert set(status.index) == {"web", "batch"}
    assert (status == "shaped").all(), first.clusters  # 40 days of real-looking history: both are planned
    assert list(runs["status"]) == ["ok", "ok"] and fleet.telemetry.url in runs["params"].iloc[0]


def test_the_next_night_reads_only_the_hours_since(first_night, written):
    db, fleet, _, _, second = first_night
    usage, power = written
    assert second.stages[0].status == "ran"
    start = planned_at(FIRST_PLAN).floor("h")
    end = planned_at(NEXT_PLAN).floor("h")
    assert f"[{start.isoformat()}, {end.isoformat()})" in second.stages[0].detail
    assert "48 usage and 96 power rows" in second.stages[0].detail  # 24 h of 2 clusters and 4 domains
    first_hour = end - pd.Timedelta(hours=LOOKBACK_HOURS + 24)
    with Store(db) as store:
        pd.testing.assert_frame_equal(stored(store, "usage_history", usage.columns),
                                      expected(usage, first_hour, end, "cluster"), check_dtype=False)
        pd.testing.assert_frame_equal(stored(store, "power_telemetry", power.columns),
                                      expected(power, first_hour, end, "domain"), check_dtype=False)
        assert vcc_clusters(store, NEXT_PLAN) == {"web": 24, "batch": 24}


def test_a_prometheus_that_is_down_degrades_the_stage_and_the_plan_goes_on(first_night, tmp_path):
    db, _, _, _, _ = first_night
    copy = tmp_path / "cicm.duckdb"
    copy.write_bytes(db.read_bytes())
    closed = f"http://127.0.0.1:{free_port()}"
    fleet = write_fleet(tmp_path / "fleet.toml", closed)
    day = date(2022, 6, 17)
    with Store(copy) as store:
        before = {t: len(store.query(f"SELECT * FROM {t}")) for t in ("usage_history", "power_telemetry")}
        outcome = plan(store, fleet, day)
        after = {t: len(store.query(f"SELECT * FROM {t}")) for t in before}
        runs = telemetry_runs(store)
        vccs = vcc_clusters(store, day)
    report = outcome.stages[0]
    assert report.status == "degraded" and closed in report.detail and "stored history" in report.detail
    assert outcome.status == "degraded"
    assert after == before  # nothing half-written
    assert runs["status"].iloc[-1] == "failed" and closed in runs["message"].iloc[-1]
    assert vccs == {"web": 24, "batch": 24}  # planned on the stored history


def test_a_prometheus_that_is_down_on_an_empty_store_stops_the_plan(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    fleet = write_fleet(tmp_path / "fleet.toml", closed)
    with Store(tmp_path / "cicm.duckdb") as store:
        with pytest.raises(InputError) as err:
            plan(store, fleet, FIRST_PLAN)
        runs = telemetry_runs(store)
        assert len(store.query("SELECT * FROM vccs")) == 0
    assert err.value.field == "telemetry" and "[telemetry]" in err.value.message
    assert f"refused {closed}" in err.value.message and "connection error" in err.value.message
    assert list(runs["status"]) == ["failed"]


def test_a_bad_mapping_stops_the_plan_naming_its_field(tmp_path):
    fleet = write_fleet(tmp_path / "fleet.toml", "http://127.0.0.1:9")
    bad = fleet.model_copy(update={"telemetry": fleet.telemetry.model_copy(
        update={"mapping": {**fleet.telemetry.mapping, "power_kw": 'pdu_kw{room="{room}"}'}})})
    with Store(tmp_path / "cicm.duckdb") as store:
        with pytest.raises(InputError) as err:
            plan(store, bad, FIRST_PLAN)
        assert len(store.query("SELECT * FROM runs")) == 0
    assert err.value.field == "telemetry.mapping.power_kw" and "{room}" in err.value.message
