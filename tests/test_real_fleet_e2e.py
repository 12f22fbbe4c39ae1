"""A fleet that is not the demo's, planned end to end from real inputs (issue 14, "done when").

Two campuses: ``fra`` in Electricity Maps zone ``DE`` (Europe/Berlin), whose forecasts and history come from a
loopback server speaking the Electricity Maps v3 wire format, and ``blr`` in ``IN-SO`` (Asia/Kolkata, UTC+05:30),
whose forecasts and actuals come from CSV feeds. No cluster names a demo trace; the power domains are a SPECpower
row, a domain given by its cores with telemetry only, and one with its own (CPU, kW) points. Telemetry is read from
a real Prometheus (Debian's, backfilled with promtool). Two nights are planned through the real CLI, each at its
planning clock (``--as-of``); the second night's actuals cover the first night's day, so the dashboard (a real
server, read in a real browser) shows forecast against actual carbon for both campuses.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import duckdb
import pandas as pd
import pytest

from cicm.config import load_fleet
from cicm.demo.telemetry import demo_power_telemetry, demo_usage_history

try:
    from tests.prometheus_server import openmetrics, prometheus_server
    from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS, _open, _plot, dashboard_server
except ImportError:
    from prometheus_server import openmetrics, prometheus_server
    from test_dashboard import CHROMIUM, CHROMIUM_ARGS, _open, _plot, dashboard_server

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TOKEN = "em-token-never-stored-4c1f"
NIGHTS = {date(2026, 10, 15): pd.Timestamp("2026-10-14T12:00Z"),  # plan day -> the planning clock
          date(2026, 10, 16): pd.Timestamp("2026-10-15T12:00Z")}
FIRST_DAY = date(2026, 10, 15)

MAPPING = """
[telemetry]
source = "prometheus"
url = "{url}"
lookback_hours = 960

[telemetry.mapping]
inflexible_cpu_cores = {{ query = 'cicm_inflexible_cpu_cores{{cluster="{{cluster}}"}}', hour = "start" }}
flexible_cpu_cores = {{ query = 'cicm_flexible_cpu_cores{{cluster="{{cluster}}"}}', hour = "start" }}
reserved_cpu_cores = {{ query = 'cicm_reserved_cpu_cores{{cluster="{{cluster}}"}}', hour = "start" }}
flexible_arrived_core_hours = {{ query = 'cicm_flexible_arrived_core_hours{{cluster="{{cluster}}"}}', hour = "start" }}
domain_cpu_cores = {{ query = 'cicm_domain_cpu_cores{{domain="{{domain}}"}}', hour = "start" }}
power_kw = {{ query = 'cicm_domain_power_kw{{cluster="{{cluster}}",domain="{{domain}}"}}', hour = "start" }}
"""

# The fleet whose telemetry the demo generators derive (what the monitoring stack would have recorded), on the
# traces' 2022 calendar; moved by SHIFT (208 weeks, weekdays kept) to 2026-08-26 .. 2026-10-17.
SHIFT = pd.Timedelta(weeks=208)
GENERATOR_FLEET = """
name = "generator"
history_start = "2022-08-31"
history_days = 52

[[campuses]]
name = "fra"
grid_zone = "CISO"
timezone = "Europe/Berlin"
contract_limit_kw = 600.0
  [[campuses.clusters]]
  name = "fra-web"
  inflexible_trace = "google2019"
  inflexible_peak_share = 0.55
  flexible_trace = "pai"
  flexible_mean_share = 0.20
    [[campuses.clusters.power_domains]]
    name = "fra-web-r1"
    machines = 300
    spec_row = 12
    server_model = "ProLiant DL325 Gen10 Plus"
    [[campuses.clusters.power_domains]]
    name = "fra-web-r2"
    machines = 150
    spec_row = 47
    server_model = "ThinkSystem SR665"

[[campuses]]
name = "blr"
grid_zone = "CISO"
timezone = "Asia/Kolkata"
contract_limit_kw = 600.0
  [[campuses.clusters]]
  name = "blr-batch"
  inflexible_trace = "azure2019"
  inflexible_peak_share = 0.50
  flexible_trace = "azure"
  flexible_mean_share = 0.25
    [[campuses.clusters.power_domains]]
    name = "blr-batch-r1"
    machines = 200
    spec_row = 35
    server_model = "ProLiant DL380 Gen10 Plus"
    [[campuses.clusters.power_domains]]
    name = "blr-batch-r2"
    machines = 200
    spec_row = 50
    server_model = "PRIMERGY RX2530 M6"
"""

# The operator's own fleet file: no demo fields; zones as their providers name them.
REAL_FLEET = """
name = "acme"
{mapping}
[[campuses]]
name = "fra"
grid_zone = "DE"
timezone = "Europe/Berlin"
contract_limit_kw = 600.0
  [campuses.carbon]
  provider = "electricitymaps"
  base_url = "{em_url}"
  [[campuses.clusters]]
  name = "fra-web"
  reservation_ratio = 1.35
    [[campuses.clusters.power_domains]]
    name = "fra-web-r1"
    machines = 300
    spec_row = 12
    server_model = "ProLiant DL325 Gen10 Plus"
    [[campuses.clusters.power_domains]]
    name = "fra-web-r2"
    cores = {fra_r2_cores}

[[campuses]]
name = "blr"
grid_zone = "IN-SO"
timezone = "Asia/Kolkata"
contract_limit_kw = 600.0
  [campuses.carbon]
  provider = "csv"
  forecast_csv = "feeds/in-so-forecast.csv"
  actuals_csv = "feeds/in-so-actual.csv"
  [[campuses.clusters]]
  name = "blr-batch"
  cores = {blr_cores}
    [[campuses.clusters.power_domains]]
    name = "blr-batch-r1"
    cores = {blr_r1_cores}
    power_points = {blr_r1_points}
    [[campuses.clusters.power_domains]]
    name = "blr-batch-r2"
    machines = 200
    spec_row = 50
    server_model = "PRIMERGY RX2530 M6"
"""


# ------------------------------------------------------------------------------------- the carbon sources

def de_forecast(hour: pd.Timestamp) -> float:
    """What the Electricity Maps-format server forecasts for DE (a midday solar dip)."""
    return round(380.0 - 140.0 * math.exp(-((hour.hour - 11) / 3.5) ** 2), 3)


def de_actual(hour: pd.Timestamp) -> float:
    return round(de_forecast(hour) + 20.0 + 5.0 * (hour.hour % 3), 3)


def in_so_forecast(hour: pd.Timestamp, vintage: int) -> float:
    return round(620.0 - 180.0 * math.exp(-((hour.hour - 7) / 3.0) ** 2) + 4.0 * vintage, 3)


def in_so_actual(hour: pd.Timestamp) -> float:
    return round(in_so_forecast(hour, 0) - 15.0 + 3.0 * (hour.hour % 4), 3)


class ElectricityMapsFormat:
    """A loopback server speaking Electricity Maps v3 (forecast and history) with a clock the test sets."""

    def __init__(self) -> None:
        self.now = pd.Timestamp("2026-10-14T12:00Z")
        self.tokens_seen: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                outer.tokens_seen.append(self.headers.get("auth-token", ""))
                if self.headers.get("auth-token") != TOKEN:
                    return self._json(401, {"message": "invalid auth-token"})
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                if query.get("zone") != "DE":
                    return self._json(404, {"message": f"zone {query.get('zone')} not found"})
                now = outer.now.floor("h")
                if parts.path == "/v3/carbon-intensity/forecast":
                    hours = pd.date_range(now, periods=int(query.get("horizonHours", 24)), freq="h")
                    return self._json(200, {"zone": "DE", "updatedAt": _iso(now), "forecast": [
                        {"carbonIntensity": de_forecast(h), "datetime": _iso(h)} for h in hours]})
                if parts.path == "/v3/carbon-intensity/history":
                    hours = pd.date_range(end=now - pd.Timedelta(hours=1), periods=24, freq="h")
                    return self._json(200, {"zone": "DE", "history": [
                        {"zone": "DE", "carbonIntensity": de_actual(h), "datetime": _iso(h),
                         "updatedAt": _iso(h + pd.Timedelta(hours=1)), "createdAt": _iso(h),
                         "emissionFactorType": "lifecycle", "isEstimated": False, "estimationMethod": None}
                        for h in hours]})
                return self._json(404, {"message": "no such endpoint"})

            def _json(self, status: int, payload) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _iso(ts: pd.Timestamp) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def write_in_so_feeds(folder: Path, issued_at: pd.Timestamp, vintage: int) -> None:
    """The CSV feeds of IN-SO: the forecast issued at ``issued_at`` (to four days ahead) and the measured series
    (the feed holds a few future hours too, as a file written ahead might; only hours before the clock count)."""
    folder.mkdir(parents=True, exist_ok=True)
    hours = pd.date_range(issued_at.floor("D"), periods=4 * 24, freq="h")
    pd.DataFrame({"target_hour": [_iso(h) for h in hours], "gco2_per_kwh": [in_so_forecast(h, vintage) for h in hours],
                  "issued_at": _iso(issued_at)}).to_csv(folder / "in-so-forecast.csv", index=False)
    past = pd.date_range("2026-09-10T00:00Z", "2026-10-17T00:00Z", freq="h", inclusive="left")
    pd.DataFrame({"target_hour": [_iso(h) for h in past], "gco2_per_kwh": [in_so_actual(h) for h in past]}).to_csv(
        folder / "in-so-actual.csv", index=False)


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Prometheus with the fleet's telemetry, the Electricity Maps-format server, the CSV feeds and the
    operator's fleet file: (fleet path, db path, EM server, feeds folder)."""
    root = tmp_path_factory.mktemp("real-fleet")
    generator_path = root / "generator.toml"
    generator_path.write_text(GENERATOR_FLEET)
    generator = load_fleet(generator_path)
    usage = demo_usage_history(generator, seed=5)
    power = demo_power_telemetry(generator, usage, seed=5)
    usage["hour"] += SHIFT
    power["hour"] += SHIFT
    em = ElectricityMapsFormat()
    (root / "prometheus").mkdir()
    with prometheus_server(root / "prometheus", openmetrics(usage, power)) as prom_url:
        r1 = generator.cluster("blr-batch").power_domains[0]
        cpu, kw = r1.declared_curve_kw()
        fleet_path = root / "acme.toml"
        fleet_path.write_text(REAL_FLEET.format(
            mapping=MAPPING.format(url=prom_url), em_url=em.url,
            fra_r2_cores=generator.cluster("fra-web").power_domains[1].capacity_cores,
            blr_cores=generator.cluster("blr-batch").capacity_cores, blr_r1_cores=r1.capacity_cores,
            blr_r1_points="[" + ", ".join(f"[{c}, {k}]" for c, k in zip(cpu, kw)) + "]"))
        try:
            yield fleet_path, root / "acme.duckdb", em, root / "feeds"
        finally:
            em.stop()


def cicm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "ELECTRICITYMAPS_TOKEN": TOKEN, **(env or {})}
    return subprocess.run([sys.executable, "-m", "cicm.cli", *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=full_env)


@pytest.fixture(scope="module")
def nights(world):
    """Both nights planned through the CLI at their planning clocks: the parsed --json outputs."""
    fleet_path, db, em, feeds = world
    outputs = []
    for vintage, (day, clock) in enumerate(NIGHTS.items()):
        em.now = clock
        write_in_so_feeds(feeds, clock - pd.Timedelta(hours=1), vintage)
        done = cicm("plan", "--fleet", str(fleet_path), "--db", str(db), "--date", str(day),
                    "--as-of", clock.isoformat(), "--json")
        assert TOKEN not in done.stdout + done.stderr
        assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"
        outputs.append(json.loads(done.stdout))
    return outputs


def query(db: Path, sql: str, params: list | None = None) -> pd.DataFrame:
    con = duckdb.connect(str(db), read_only=True)
    try:
        con.execute("SET TimeZone='UTC'")
        return con.execute(sql, params or []).df()
    finally:
        con.close()


# --------------------------------------------------------------------------------------------------- tests

def test_both_nights_plan_every_cluster_from_live_inputs(world, nights):
    fleet_path, db, em, _ = world
    for out, day in zip(nights, NIGHTS):
        stages = {s["name"]: s for s in out["stages"]}
        assert stages["telemetry"]["status"] == "ran" and "127.0.0.1" in stages["telemetry"]["detail"]
        assert stages["carbon-forecast"]["status"] == "ran", stages["carbon-forecast"]
        assert stages["carbon-actuals"]["status"] == "ran", stages["carbon-actuals"]
        clusters = {c["cluster"]: c for c in out["clusters"]}
        assert set(clusters) == {"fra-web", "blr-batch"}
        for name, row in clusters.items():
            assert row["status"] == "shaped", row
        vccs = query(db, "SELECT cluster, count(*) AS n, min(vcc_cores) AS lo FROM current_vccs WHERE plan_date = ?"
                         " GROUP BY cluster ORDER BY cluster", [day])
        assert dict(zip(vccs["cluster"], vccs["n"])) == {"blr-batch": 24, "fra-web": 24}
        assert (vccs["lo"] > 0).all()
    # the Kolkata day starts at 18:30 UTC the evening before: it is planned on whole UTC hours (the grid's), from
    # the first one that starts within it (cicm.timeutil.local_day_hours_utc)
    first = query(db, "SELECT min(hour) AS h FROM current_vccs WHERE cluster = 'blr-batch' AND plan_date = ?",
                  [FIRST_DAY])["h"].iloc[0]
    assert pd.Timestamp(first).tz_convert("UTC") == pd.Timestamp("2026-10-14T19:00Z")
    # the domain with its own points and the telemetry-only domain got fitted models from Prometheus' telemetry
    models = query(db, "SELECT domain, status, n_samples FROM power_models m JOIN current_plans c USING (run_id, "
                       "cluster) WHERE c.plan_date = ? ORDER BY domain", [FIRST_DAY])
    assert (models["status"] == "ok").all() and (models["n_samples"] > 24).all()
    assert em.tokens_seen and set(em.tokens_seen) == {TOKEN}
    assert TOKEN.encode() not in db.read_bytes()  # the token is never stored


def test_actuals_and_every_forecast_vintage_are_stored(world, nights):
    _, db, _, _ = world
    de = query(db, "SELECT hour, gco2_per_kwh, source FROM carbon_actuals WHERE zone = 'DE' ORDER BY hour")
    hours = pd.DatetimeIndex(pd.to_datetime(de["hour"], utc=True))
    # night 1 stored the 24 h before its clock, night 2 the 24 h after that: 48 hours without a gap
    assert list(hours) == list(pd.date_range("2026-10-13T12:00Z", "2026-10-15T12:00Z", freq="h", inclusive="left"))
    assert de["gco2_per_kwh"].tolist() == [de_actual(h) for h in hours]
    assert set(de["source"]) == {"electricitymaps"}
    ind = query(db, "SELECT hour, gco2_per_kwh FROM carbon_actuals WHERE zone = 'IN-SO' ORDER BY hour")
    ind_hours = pd.DatetimeIndex(pd.to_datetime(ind["hour"], utc=True))
    assert ind_hours.max() == pd.Timestamp("2026-10-15T11:00Z")  # nothing at or after the second night's clock
    assert ind_hours.min() == pd.Timestamp("2026-10-14T12:00Z") - pd.Timedelta(days=28)
    assert ind["gco2_per_kwh"].tolist() == [in_so_actual(h) for h in ind_hours]
    vintages = query(db, "SELECT zone, provider, count(DISTINCT issued_at) AS n FROM carbon_forecasts GROUP BY ALL"
                         " ORDER BY zone")
    assert vintages.to_dict("records") == [{"zone": "DE", "provider": "electricitymaps", "n": 2},
                                           {"zone": "IN-SO", "provider": "csv", "n": 2}]
    runs = query(db, "SELECT status FROM runs WHERE kind = 'carbon-actuals'")
    assert runs["status"].tolist() == ["ok", "ok"]


@pytest.fixture(scope="module")
def dashboard(world, nights, tmp_path_factory):
    fleet_path, db, _, _ = world
    with dashboard_server(db, tmp_path_factory.mktemp("dashboard") / "server.log", fleet_path) as base:
        yield base


@pytest.fixture(scope="module")
def page(dashboard):
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium (run .ci/setup-browser)")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pg = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        pg.set_default_timeout(20_000)
        yield pg
        browser.close()


@pytest.mark.parametrize("cluster, zone, forecast, actual", [
    ("fra-web", "DE", de_forecast, de_actual),
    ("blr-batch", "IN-SO", lambda h: in_so_forecast(h, 0), in_so_actual),
])
def test_the_dashboard_shows_forecast_against_actual(world, dashboard, page, cluster, zone, forecast, actual):
    _, db, _, _ = world
    _open(page, f"{dashboard}/cluster?cluster={cluster}&date={FIRST_DAY}", "#day-chart")
    assert f"grid zone {zone}" in page.inner_text("#cluster-title")
    chart = _plot(page, "day-chart")
    traces = {t["name"]: t for t in chart["traces"]}
    hours = pd.DatetimeIndex(query(db, "SELECT hour FROM current_vccs WHERE cluster = ? AND plan_date = ? ORDER BY"
                                       " hour", [cluster, FIRST_DAY])["hour"]).tz_convert("UTC")
    shown_forecast = traces["carbon forecast (newest vintage)"]["y"][: len(hours)]
    # the newest vintage issued before the day: for IN-SO the first night's (the second's was issued within it)
    newest = query(db, "SELECT target_hour, gco2_per_kwh FROM carbon_forecasts WHERE zone = ? AND target_hour >= ?"
                       " AND target_hour < ? QUALIFY row_number() OVER (PARTITION BY target_hour ORDER BY issued_at"
                       " DESC) = 1 ORDER BY target_hour", [zone, hours[0], hours[-1] + pd.Timedelta(hours=1)])
    assert shown_forecast == pytest.approx(newest["gco2_per_kwh"].tolist(), rel=1e-9)
    shown_actual = traces["carbon actual"]["y"][: len(hours)]
    clock = NIGHTS[max(NIGHTS)]
    measured = [(h, v) for h, v in zip(hours, shown_actual) if h < clock]
    assert len(measured) >= 12 and all(v == pytest.approx(actual(h), rel=1e-9) for h, v in measured)
    assert all(v is None or v != v for h, v in zip(hours, shown_actual) if h >= clock)  # not measured yet
    assert any(abs(v - forecast(h)) > 1 for h, v in measured)  # forecast and actual are different lines
