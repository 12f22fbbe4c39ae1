"""The operators' dashboard, tested in a real headless browser (Debian's chromium driven by Playwright).

One session store is built by the real plan stages, as the nightly flow runs them (two plan dates); the
dashboard runs as a real server (`python -m cicm.dashboards.cli`) in its own process on a free loopback port. Browser tests check that every page
loads without console errors, that the charts hold data, that the pickers change what is shown, that the CSV
export matches the store, and that a writer holding the store gives a "store busy" notice, not a crash.
In-process tests cover what a browser cannot set up cheaply (no snapshot possible, SLO rows, backtest table).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from datetime import date
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from cicm.dashboards.reader import StoreBusy, StoreReader

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PLAN_DATES = (date(2022, 6, 14), date(2022, 6, 15))
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def plan_store(tmp_path_factory) -> Path:
    """A store written by the real plan stages for two plan dates, the newest 2022-06-15: demo telemetry, trace
    carbon forecasts, power models, load forecasts and the VCC program, as `cicm plan` stores them."""
    from cicm.config import load_fleet
    from cicm.data.store import Store
    from cicm.planning.pipeline import PlanOptions, plan_day

    db = tmp_path_factory.mktemp("dashboard-store") / "cicm.duckdb"
    fleet = load_fleet()
    from cicm.planning.ingest import import_demo_telemetry

    with Store(db) as store:
        import_demo_telemetry(store, fleet)  # what `cicm demo seed` does
        for day in PLAN_DATES:
            plan_day(store, fleet, day, PlanOptions())
    return db


def _query(db: Path, sql: str, params: list | None = None) -> pd.DataFrame:
    con = duckdb.connect(str(db), read_only=True)
    try:
        con.execute("SET TimeZone='UTC'")
        return con.execute(sql, params or []).df()
    finally:
        con.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@contextlib.contextmanager
def dashboard_server(db: Path, log: Path, fleet: Path | None = None):
    """`python -m cicm.dashboards.cli --db STORE [--fleet FLEET] --port P` as its own process on a free loopback
    port, its output in `log`; yields its base URL once /api/health answers, and stops it after."""
    port = _free_port()
    args = [sys.executable, "-m", "cicm.dashboards.cli", "--db", str(db), "--port", str(port)]
    if fleet is not None:
        args += ["--fleet", str(fleet)]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dashboard server exited {proc.returncode}:\n{log.read_text()}")
            try:
                status, _ = _get(base + "/api/health", timeout=2)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dashboard server did not answer in 60 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def server(plan_store, tmp_path_factory):
    """The dashboard on the session's plan store; yields its base URL."""
    with dashboard_server(plan_store, tmp_path_factory.mktemp("dashboard-log") / "server.log") as base:
        yield base


@pytest.fixture(scope="module")  # not session: while Playwright's sync API is open, the main thread has a running
def browser():                   # event loop, and later modules' sync code (Prefect's blocks, another Playwright) breaks
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium (run .ci/setup-browser)")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, artifacts_dir, request):
    """A fresh page that records console errors and uncaught exceptions; the test fails on any."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    pg.console_errors = errors
    yield pg
    context.close()
    assert not errors, f"browser errors on {request.node.name}: {errors}"


def _open(pg, url: str, ready: str):
    pg.goto(url)
    pg.wait_for_selector(ready)
    pg.wait_for_load_state("networkidle")


def _plot(pg, graph_id: str) -> dict:
    """Traces of a rendered dcc.Graph, read from plotly's own graph div (after plotly.js drew it)."""
    pg.wait_for_function(
        f"() => {{ const g = document.querySelector('#{graph_id} .js-plotly-plot');"
        " return g && g.calcdata && g.calcdata.length > 0; }")
    return pg.evaluate(
        f"""() => {{
            const g = document.querySelector('#{graph_id} .js-plotly-plot');
            return {{
                traces: g.data.map(t => ({{name: t.name, type: t.type, x: Array.from(t.x || []).map(String),
                                          y: Array.from(t.y || [])}})),
                points: g.calcdata.map(cd => cd.filter(p => p.y !== undefined && p.y !== null
                                                        && !Number.isNaN(p.y)).length),
                drawn: document.querySelectorAll('#{graph_id} .scatterlayer .trace, #{graph_id} .barlayer .trace')
                           .length,
            }};
        }}""")


def _choose(pg, picker_id: str, option: str):
    pg.click(f"#{picker_id}")
    pg.get_by_role("option", name=option, exact=True).click()


# ---------------------------------------------------------------------------------------------- browser tests


def test_overview_answers_the_operator_questions(server, plan_store, page, artifacts_dir):
    _open(page, server + "/", "#fleet-table")
    status = _query(plan_store, "SELECT * FROM current_vcc_status WHERE plan_date = ?", [PLAN_DATES[-1]])
    assert "plan for 2022-06-15 (newest plan in the store)" in page.inner_text("#overview-title")

    # Every cluster is listed under its campus and grid zone.
    rows = page.query_selector_all("#fleet-table tbody tr[data-key]")
    assert sorted(r.get_attribute("data-key") for r in rows) == sorted(status["cluster"])
    groups = page.inner_text("#fleet-table")
    for campus, zone in (("ca-sj", "CISO"), ("or-dalles", "BPAT"), ("ia-council", "MISO"), ("tx-midlothian", "ERCO")):
        assert f"{campus} — grid zone {zone}" in groups

    # Which clusters are shaped, and why the others are not.
    shaped = int((status["status"] == "shaped").sum())
    assert f"{shaped} of {len(status)} clusters" in page.inner_text("#card-shaped")
    shaped_list = page.inner_text("#shaped-list")
    assert all(c in shaped_list for c in status.loc[status["status"] == "shaped", "cluster"])
    assert not any(c in shaped_list.split() for c in status.loc[status["status"] != "shaped", "cluster"])
    fallbacks = status[status["status"] != "shaped"]
    assert len(fallbacks) >= 1, "the demo plan has a fallback cluster (cb-c, too-full)"
    listed = page.inner_text("#not-shaped-list")
    for cluster, reason in zip(fallbacks["cluster"], fallbacks["reason"]):
        assert cluster in listed and reason.split(":")[0] in listed
        row = page.inner_text(f"#fleet-table tr[data-key='{cluster}']")
        assert "fallback" in row and reason.split(":")[0] in row

    # How much carbon the plan should save (sum against flat).
    saved = float((status["flat_kgco2"] - status["expected_kgco2"]).sum())
    flat = float(status["flat_kgco2"].sum())
    carbon = page.inner_text("#card-carbon")
    assert f"{saved:,.1f} kgCO2" in carbon and f"{100 * saved / flat:,.1f}%" in carbon

    # The SLO record: the flow wrote no slo_events, and the page says so rather than showing a clean record.
    assert _query(plan_store, "SELECT count(*) AS n FROM slo_events")["n"].iloc[0] == 0
    assert "no data" in page.inner_text("#card-slo")

    bars = _plot(page, "savings-chart")
    assert bars["traces"][0]["x"] == list(status.sort_values(["campus", "cluster"])["cluster"])
    assert bars["points"][0] == len(status) and bars["drawn"] >= 1
    page.screenshot(path=str(artifacts_dir / "dashboard-overview.png"), full_page=True)


def test_cluster_page_charts_hold_the_store_data(server, plan_store, page, artifacts_dir):
    _open(page, server + "/cluster?cluster=sj-a&date=2022-06-15", "#day-chart")
    assert "Cluster sj-a (ca-sj — grid zone CISO" in page.inner_text("#cluster-title")
    vccs = _query(plan_store, "SELECT * FROM current_vccs WHERE cluster = 'sj-a' AND plan_date = ? ORDER BY hour",
                  [PLAN_DATES[-1]])

    day = _plot(page, "day-chart")
    names = [t["name"] for t in day["traces"]]
    for wanted in ("VCC (reservation cores)", "forecast inflexible usage", "actual inflexible usage",
                   "actual total usage (inflexible + flexible)", "carbon forecast (newest vintage)", "carbon actual"):
        assert wanted in names
    vcc = day["traces"][names.index("VCC (reservation cores)")]
    # One point per hour of the local day, plus the point that closes the last hour's step.
    assert len(vcc["y"]) == len(vccs) + 1
    assert vcc["y"][:-1] == pytest.approx(list(vccs["vcc_cores"]), rel=1e-9)
    assert vcc["x"][0].startswith("2022-06-15") and "00:00" in vcc["x"][0]  # local midnight, Los Angeles
    assert all(n > 0 for n in day["points"]), dict(zip(names, day["points"]))
    assert day["drawn"] == len(names)
    # capacity is drawn in the VCC's unit: the machines' cores x the day's highest reservation ratio
    capacity = day["traces"][names.index("capacity (reservation cores)")]["y"][0]
    ratio = _query(plan_store, "SELECT max(reservation_ratio) AS r FROM load_forecasts l JOIN current_plans c"
                               " USING (run_id, plan_date, cluster) WHERE cluster = 'sj-a' AND plan_date = ?",
                   [PLAN_DATES[-1]])["r"].iloc[0]
    from cicm.config import load_fleet

    assert capacity == pytest.approx(load_fleet().cluster("sj-a").capacity_cores * ratio, rel=1e-9)
    assert max(vcc["y"]) <= capacity * (1 + 1e-9)

    fit = _plot(page, "power-fit")
    models = _query(plan_store, """SELECT m.domain, m.model FROM power_models m JOIN current_plans c
                                   ON c.run_id = m.run_id AND c.cluster = m.cluster
                                   WHERE m.cluster = 'sj-a' AND c.plan_date = ? ORDER BY m.domain""",
                    [PLAN_DATES[-1]])
    assert len(fit["traces"]) == 2 * len(models)  # telemetry scatter + fitted line per power domain
    for domain, model in zip(models["domain"], models["model"]):
        doc = json.loads(model)
        window = _query(plan_store, "SELECT count(*) AS n FROM power_telemetry WHERE domain = ? AND hour >= ?"
                        " AND hour < ?", [domain, doc["window_start"], doc["window_end"]])["n"].iloc[0]
        scatter = next(t for t in fit["traces"] if t["name"].startswith(f"{domain} telemetry"))
        assert len(scatter["y"]) == window > 0
        line = next(t for t in fit["traces"] if t["name"].startswith(f"{domain} fit"))
        assert len(line["y"]) >= 4  # the breakpoints of the piecewise-linear model

    errors = _plot(page, "forecast-errors")
    mape = next(t for t in errors["traces"] if t["name"].startswith("inflexible usage MAPE"))
    assert mape["x"] == [str(d) for d in PLAN_DATES]
    assert all(v is not None and 0 <= v < 100 for v in mape["y"])

    history = page.query_selector_all("#cluster-history tbody tr")
    assert len(history) == len(PLAN_DATES)
    page.screenshot(path=str(artifacts_dir / "dashboard-cluster.png"), full_page=True)


def test_pickers_change_what_is_shown(server, plan_store, page):
    _open(page, server + "/cluster?cluster=sj-a&date=2022-06-15", "#day-chart")
    _plot(page, "day-chart")

    _choose(page, "cluster-picker", "cb-c")
    page.wait_for_function("() => location.search.includes('cluster=cb-c')")
    page.wait_for_selector("text=Cluster cb-c (ia-council — grid zone MISO")
    reason = _query(plan_store, "SELECT reason FROM current_vcc_status WHERE cluster = 'cb-c' AND plan_date = ?",
                    [PLAN_DATES[-1]])["reason"].iloc[0]
    card = page.inner_text("#cluster-status-card")
    assert "fallback" in card and reason.split(":")[0] in card

    _choose(page, "date-picker", "2022-06-14")
    page.wait_for_function("() => location.search.includes('date=2022-06-14')")
    page.wait_for_selector("text=cb-c on 2022-06-14")
    day = _plot(page, "day-chart")
    vcc = next(t for t in day["traces"] if t["name"] == "VCC (reservation cores)")
    expected = _query(plan_store, "SELECT vcc_cores FROM current_vccs WHERE cluster = 'cb-c' AND plan_date = ?"
                      " ORDER BY hour", [PLAN_DATES[0]])["vcc_cores"]
    assert vcc["x"][0].startswith("2022-06-14")
    assert vcc["y"][:-1] == pytest.approx(list(expected), rel=1e-9)

    # The overview follows the date picker too (and keeps it when navigating).
    page.click("#nav-overview")
    page.wait_for_selector("text=Fleet overview — plan for 2022-06-14")
    _choose(page, "date-picker", "2022-06-15")
    page.wait_for_selector("text=Fleet overview — plan for 2022-06-15 (newest plan in the store)")


def test_an_unknown_cluster_or_date_is_not_found_with_links(server, plan_store, page):
    """Never silently another cluster or date: a clear "not found", with links to what the store has."""
    _open(page, server + "/cluster?cluster=nope&date=2022-06-15", "#not-found")
    assert "No cluster 'nope' in the plan for 2022-06-15" in page.inner_text("#not-found-what")
    page.click("#not-found >> text=sj-a")
    page.wait_for_selector("text=Cluster sj-a (ca-sj — grid zone CISO")

    _open(page, server + "/cluster?cluster=sj-a&date=2021-01-01", "#not-found")
    assert "No plan for 2021-01-01" in page.inner_text("#not-found-what")
    links = [a.get_attribute("href") for a in page.query_selector_all("#not-found a")]
    assert links == [f"/cluster?cluster=sj-a&date={d}" for d in sorted(PLAN_DATES, reverse=True)]

    _open(page, server + "/?date=2021-01-01", "#not-found")
    page.click("#not-found >> text=2022-06-14")
    page.wait_for_selector("text=Fleet overview — plan for 2022-06-14")


def test_wide_tables_scroll_inside_the_page(server, plan_store, page):
    """On a narrow screen the fleet table scrolls in its own box; the page itself does not grow sideways."""
    page.set_viewport_size({"width": 480, "height": 900})
    _open(page, server + "/", "#fleet-table")
    widths = page.evaluate("""() => ({page: document.documentElement.scrollWidth, view: window.innerWidth,
        table: document.querySelector('#fleet-table').scrollWidth,
        box: document.querySelector('#fleet-table').parentElement.clientWidth})""")
    assert widths["table"] > widths["box"]  # the table is wider than its box: it scrolls there
    assert widths["page"] <= widths["view"] + 1, widths


def test_runs_page_lists_the_plan_history_and_run_log(server, plan_store, page, artifacts_dir):
    _open(page, server + "/runs", "#runs-table")
    runs = _query(plan_store, "SELECT run_id, kind, status FROM runs ORDER BY started_at DESC")
    keys = [r.get_attribute("data-key") for r in page.query_selector_all("#runs-table tbody tr")]
    assert keys == list(runs["run_id"])
    newest = runs[runs["kind"] == "plan"]["run_id"].iloc[0]  # shown by default: the newest plan's log
    assert newest in page.inner_text("#run-log h2")
    stages = page.inner_text("#run-stages")
    for stage in ("telemetry", "carbon-forecast", "power-models", "load-forecast", "vcc-program"):
        assert stage in stages

    other = runs[runs["kind"] == "telemetry-import"]["run_id"].iloc[0]
    _choose(page, "run-picker", f"{other} (telemetry-import, ok)")
    page.wait_for_selector(f"text=Run log: {other}")
    assert "telemetry-import" in page.inner_text("#run-status")
    assert page.query_selector("#backtest-results") is None  # no backtest_results table in this store
    page.screenshot(path=str(artifacts_dir / "dashboard-runs.png"), full_page=True)


def test_csv_export_matches_the_store(server, plan_store, page, tmp_path):
    _open(page, server + "/", "#export-day")
    with page.expect_download() as info:
        page.click("#export-day")
    download = info.value
    assert download.suggested_filename == "vccs-2022-06-15.csv"
    target = tmp_path / download.suggested_filename
    download.save_as(target)
    exported = pd.read_csv(target)
    store = _query(plan_store, "SELECT * FROM current_vccs WHERE plan_date = ? ORDER BY cluster, hour",
                   [PLAN_DATES[-1]])
    assert len(exported) == len(store)
    exported["hour"] = pd.to_datetime(exported["hour_utc"], utc=True)
    merged = store.merge(exported, on=["cluster", "hour"], suffixes=("", "_csv"), validate="one_to_one")
    assert len(merged) == len(store)
    for col in ("vcc_cores", "flexible_cpu_cores", "power_kw", "carbon_kgco2", "gco2_per_kwh"):
        pd.testing.assert_series_equal(merged[col], merged[f"{col}_csv"], check_names=False, rtol=1e-12)
    assert (merged["run_id"] == merged["run_id_csv"]).all()
    assert set(exported["plan_date"]) == {"2022-06-15"}

    # One cluster's export, from the cluster page.
    _open(page, server + "/cluster?cluster=dl-b&date=2022-06-14", "#export-cluster")
    with page.expect_download() as info:
        page.click("#export-cluster")
    rows = list(csv.DictReader(io.StringIO(Path(info.value.path()).read_text())))
    one = _query(plan_store, "SELECT vcc_cores FROM current_vccs WHERE cluster = 'dl-b' AND plan_date = ?"
                 " ORDER BY hour", [PLAN_DATES[0]])
    assert {r["cluster"] for r in rows} == {"dl-b"}
    assert [float(r["vcc_cores"]) for r in rows] == pytest.approx(list(one["vcc_cores"]), rel=1e-12)


def test_a_writer_holding_the_store_shows_busy_not_a_crash(server, plan_store, page, artifacts_dir):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time, duckdb
            con = duckdb.connect({str(plan_store)!r})  # a read-write connection: the file lock is held
            print("held", flush=True)
            sys.stdin.readline()
            con.close()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        status, body = _get(server + "/api/health")
        assert status == 200 and json.loads(body)["state"] == "snapshot"
        _open(page, server + "/", "#store-busy")
        assert "Store busy, retrying" in page.inner_text("#store-busy")
        assert page.query_selector_all("#fleet-table tbody tr[data-key]"), "the snapshot still shows the fleet"
        page.screenshot(path=str(artifacts_dir / "dashboard-store-busy.png"), full_page=False)
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=10)
    # Once the writer lets go, the retry timer reloads the page from the live store and the notice goes.
    page.wait_for_selector("#store-busy", state="detached", timeout=15_000)
    assert page.query_selector_all("#fleet-table tbody tr[data-key]")
    status, body = _get(server + "/api/health")
    assert status == 200 and json.loads(body)["state"] == "live"


def _write_deviations(db: Path, cluster: str, plan_date: date, run_id: str) -> pd.DataFrame:
    """Two hours' corrections of a cluster-day, written by the agent's own audit writer (one pass each, the
    deviation in the same transaction as its agent_actions row). Returns the plan's hours."""
    from cicm.enforce.audit import StoreAudit

    hours = _query(db, "SELECT hour, vcc_cores, flexible_cpu_cores FROM current_vccs WHERE cluster = ? AND "
                       "plan_date = ? ORDER BY hour", [cluster, plan_date])
    audit = StoreAudit(db, db.with_name(f"{run_id}.jsonl"), run_id)
    for i, reason in ((2, "deadline-release"), (15, "deferred")):
        hour = pd.Timestamp(hours["hour"].iloc[i]).tz_convert("UTC")
        plan = float(hours["flexible_cpu_cores"].iloc[i])
        applied = plan + 12345.0 if reason == "deadline-release" else 0.5 * plan
        row = {"cluster": cluster, "acted_at": hour + pd.Timedelta(seconds=5), "hour": hour, "plan_date": plan_date,
               "mode": "shaped", "reason": None, "vcc_cores": float(hours["vcc_cores"].iloc[i]),
               "flexible_allowance_cores": applied, "caps": "{}", "battery_charge_kw": None,
               "battery_max_discharge_kw": None, "result": "applied", "detail": f"hourly correction {reason}",
               "deviation": {"plan_cores": plan, "applied_cores": applied, "reason": reason,
                             "detail": f"test {reason} at hour {i}", "recorded_at": pd.Timestamp.now(tz="UTC")}}
        assert audit.write(row) == "store", audit.last_error
    return hours


def _drop_agent_run(db: Path, run_id: str) -> None:
    from cicm.data.store import Store

    with Store(db) as store, store.transaction():
        for table in ("intraday_deviations", "agent_actions", "runs"):
            store.con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])


def test_cluster_page_shows_the_days_intraday_deviations(server, plan_store, page, artifacts_dir):
    run_id = "agent-20220615T000000-dashtest"
    try:
        hours = _write_deviations(plan_store, "sj-b", PLAN_DATES[-1], run_id)
        _open(page, server + "/cluster?cluster=sj-b&date=2022-06-15", "#deviations-table")
        rows = page.query_selector_all("#deviations-table tbody tr")
        assert [r.get_attribute("data-key") for r in rows] == ["2022-06-15 02:00", "2022-06-15 15:00"]  # local
        first = page.inner_text("#deviations-table tbody tr:first-child")
        assert "deadline-release" in first and "12,345" in first and "test deadline-release at hour 2" in first
        summary = page.inner_text("#deviations-summary")
        assert "2 hour(s) differ from the plan of record" in summary and "deadline-release 1, deferred 1" in summary

        day = _plot(page, "day-chart")
        markers = {t["name"]: t for t in day["traces"] if t["name"].startswith("hourly correction")}
        assert set(markers) == {"hourly correction: deadline-release", "hourly correction: deferred"}
        release = markers["hourly correction: deadline-release"]
        assert release["x"][0].startswith("2022-06-15") and "02:30" in release["x"][0]  # the middle of the hour
        forecast = _query(plan_store, "SELECT inflexible_cpu_cores FROM load_forecasts f JOIN current_plans c "
                          "USING (run_id, plan_date, cluster) WHERE cluster = 'sj-b' AND plan_date = ? ORDER BY hour",
                          [PLAN_DATES[-1]])["inflexible_cpu_cores"]
        applied = hours["flexible_cpu_cores"].iloc[2] + 12345.0
        assert release["y"] == pytest.approx([forecast.iloc[2] + applied], rel=1e-9)
        assert day["drawn"] == len(day["traces"])
        page.screenshot(path=str(artifacts_dir / "dashboard-deviations.png"), full_page=True)

        # a cluster-day without corrections says so
        _open(page, server + "/cluster?cluster=sj-a&date=2022-06-15", "#deviations-none")
        assert len(hours) == 24
    finally:
        _drop_agent_run(plan_store, run_id)


# ---------------------------------------------------------------------------------------------- in-process tests


def _text(component) -> str:
    """All text in a Dash component tree."""
    if component is None:
        return ""
    if isinstance(component, (str, int, float)):
        return str(component)
    if isinstance(component, (list, tuple)):
        return " ".join(_text(c) for c in component)
    return _text(getattr(component, "children", None))


def _ids(component) -> set[str]:
    found = set()
    if isinstance(component, (list, tuple)):
        for c in component:
            found |= _ids(c)
    elif component is not None and not isinstance(component, (str, int, float)):
        if isinstance(getattr(component, "id", None), str):
            found.add(component.id)
        found |= _ids(getattr(component, "children", None))
    return found


@pytest.fixture
def store_copy(plan_store, tmp_path) -> Path:
    copy = tmp_path / "copy.duckdb"
    shutil.copyfile(plan_store, copy)
    return copy


def test_busy_without_snapshot_gives_a_retry_notice_and_503(store_copy):
    from cicm.dashboards.app import Pages, create_app
    from cicm.config import load_fleet

    reader = StoreReader(store_copy, retries=2, retry_delay_s=0.01, allow_snapshot=False)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, sys; c = duckdb.connect({str(store_copy)!r}); print('held', "
                               "flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreBusy, match="locked by a writer"):
            with reader.read():
                pass
        page, notice, retry_off = Pages(reader, load_fleet()).render("/", "")
        assert "Store busy, retrying" in _text(notice) and retry_off is False
        client = create_app(store_copy, reader=reader).server.test_client()
        resp = client.get("/export/vccs.csv?date=2022-06-15")
        assert resp.status_code == 503 and b"store busy" in resp.data
        assert client.get("/api/health").status_code == 503
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=10)
    with reader.read() as r:  # and it reads again once the writer is gone
        assert r.source == "live"


def test_missing_store_and_bad_requests(tmp_path, store_copy):
    from cicm.dashboards.app import Pages, create_app

    page, notice, _ = Pages(StoreReader(tmp_path / "none.duckdb"), None).render("/", "")
    assert "No store yet" in _text(page) and "cicm plan" in _text(notice)
    client = create_app(store_copy).server.test_client()
    assert client.get("/export/vccs.csv").status_code == 400
    assert client.get("/export/vccs.csv?date=2021-01-01").status_code == 404
    resp = client.get("/export/vccs.csv?date=2022-06-15&cluster=sj-c")
    assert resp.status_code == 200 and resp.mimetype == "text/csv"
    assert len(pd.read_csv(io.BytesIO(resp.data))) == 24


def test_slo_events_shaping_state_and_backtest_results_are_shown(store_copy):
    """Rows another part writes (the SLO loop, a backtest) show up on the pages when present."""
    from cicm.config import load_fleet
    from cicm.dashboards.app import Pages
    from cicm.data.store import Store

    with Store(store_copy) as store:
        with store.run("slo-check") as run:
            store.upsert("slo_events", pd.DataFrame({
                "cluster": ["sj-a", "sj-b", "sj-a", "cb-a"],
                "day": [date(2022, 6, 13), date(2022, 6, 13), date(2022, 6, 14), date(2022, 6, 14)],
                "demand_core_hours": [1.0, 1.0, 1.0, 1.0], "served_core_hours": [1.0, 0.9, 1.0, 0.8],
                "theta_core_hours": [1.0] * 4, "violated": [False, True, False, True],
                "close": [False, False, True, False],
            }), run.run_id)
            store.upsert("shaping_state", pd.DataFrame({
                "cluster": ["cb-a"], "disabled_from": [date(2022, 6, 15)], "disabled_until": [date(2022, 6, 21)],
                "reason": ["slo-feedback: violated on 2022-06-14"],
            }), run.run_id)
        with store.run("backtest") as run:
            store.upsert("backtest_results", pd.DataFrame({
                "zone": ["CISO", "MISO"], "campus": ["ca-sj", "ia-council"],
                "start_day": [date(2022, 6, 1)] * 2, "days": [30, 30], "seed": [0, 0], "policy": ["planner"] * 2,
                "flexible_reduction_pct": [4.2, 3.1],
                **{c: [None, None] for c in (
                    "flexible_kgco2", "total_kgco2", "shift_reduction_pct", "total_reduction_pct", "bound_kgco2",
                    "bound_share_pct", "oracle_share_pct", "kwh_per_kcore_hour", "peak_kw", "slo_violations",
                    "cluster_days", "late_work_pct", "delay_mean_hours", "delay_p95_hours",
                    "unfinished_core_hours", "report_dir")},
            }), run.run_id)

    pages = Pages(StoreReader(store_copy), load_fleet())
    page, notice, live = pages.render("/", "?date=2022-06-15")
    text = _text(page)
    assert notice is None and live is True
    assert "1 violated" in text and "latest day evaluated 2022-06-14: violated by cb-a" in text
    assert "2 violation(s), 1 close call(s) over 2 day(s) recorded" in text
    assert "slo-feedback: violated on 2022-06-14 (until 2022-06-21)" in text

    page, _, _ = pages.render("/runs", "")
    assert "backtest-results" in _ids(page) and "Backtest results" in _text(page)
    page, _, _ = pages.render("/cluster", "?cluster=sj-a&date=2022-06-15")
    assert "cluster-backtest" in _ids(page)
    assert "4.20" in _text(page) and "3.10" not in _text(page)  # filtered to the cluster's campus


def test_cli_mounts_as_cicm_dashboard():
    import typer
    from typer.testing import CliRunner

    from cicm.dashboards.cli import dashboard_app

    app = typer.Typer()
    app.command("noop")(lambda: None)
    app.add_typer(dashboard_app, name="dashboard")
    result = CliRunner().invoke(app, ["dashboard", "--help"])
    assert result.exit_code == 0
    assert "--db" in result.output and "--port" in result.output


def test_intraday_deviations_data_layer(store_copy):
    from cicm.config import load_fleet
    from cicm.dashboards import data
    from cicm.dashboards.app import Pages

    reader = StoreReader(store_copy)
    with reader.read() as r:
        assert data.intraday_deviations(r, "sj-b", PLAN_DATES[-1]).empty
    hours = _write_deviations(store_copy, "sj-b", PLAN_DATES[-1], "agent-x")
    with reader.read() as r:
        dev = data.intraday_deviations(r, "sj-b", PLAN_DATES[-1])
        other_day = data.intraday_deviations(r, "sj-b", PLAN_DATES[0])
        other_cluster = data.intraday_deviations(r, "sj-a", PLAN_DATES[-1])
    assert other_day.empty and other_cluster.empty
    assert list(dev["hour"]) == [hours["hour"].iloc[2], hours["hour"].iloc[15]]
    assert list(dev["reason"]) == ["deadline-release", "deferred"]
    plan = hours["flexible_cpu_cores"].iloc[[2, 15]].to_numpy()
    assert dev["plan_cores"].to_numpy() == pytest.approx(plan)
    assert dev["difference_cores"].to_numpy() == pytest.approx([12345.0, -0.5 * plan[1]])
    assert (dev["run_id"] == "agent-x").all()
    summary = data.deviation_summary(dev)
    assert summary["hours_above_plan"] == 1 and summary["core_hours_above_plan"] == pytest.approx(12345.0)
    assert summary["hours_below_plan"] == 1 and summary["core_hours_below_plan"] == pytest.approx(0.5 * plan[1])
    assert plan[1] > 0

    page, _, _ = Pages(reader, load_fleet()).render("/cluster", "?cluster=sj-b&date=2022-06-15")
    assert "deviations-table" in _ids(page) and "test deferred at hour 15" in _text(page)
    page, _, _ = Pages(reader, load_fleet()).render("/cluster", "?cluster=sj-b&date=2022-06-14")
    assert "deviations-none" in _ids(page)
