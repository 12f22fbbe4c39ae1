"""The nightly Prefect flow end to end, on one session-scoped Prefect test server (each start costs ~10 s)."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cicm.config import load_fleet
from cicm.data.store import Store
from cicm.timeutil import parse_plan_date

PLAN_DATE = parse_plan_date("2022-06-15")


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def planned_db(prefect_server, tmp_path_factory):
    from flows.nightly import run_nightly_plan

    from cicm.planning.ingest import import_demo_telemetry

    path = tmp_path_factory.mktemp("plan") / "cicm.duckdb"
    with Store(path) as store:  # what `cicm demo seed` does
        import_demo_telemetry(store, load_fleet())
    outcome = run_nightly_plan(PLAN_DATE, path)
    return path, outcome


@pytest.fixture
def planned_copy(planned_db, tmp_path):
    path = tmp_path / "copy.duckdb"
    shutil.copy(planned_db[0], path)
    return path


def test_plan_stores_every_stage_for_every_cluster(planned_db):
    path, outcome = planned_db
    fleet = load_fleet()
    names = sorted(c.name for c in fleet.clusters())
    assert outcome.status == "ok", outcome.stages
    assert [s.name for s in outcome.stages] == [
        "telemetry", "carbon-actuals", "carbon-forecast", "slo-feedback", "forecast-value", "power-models", "load-forecast", "vcc-program"]
    with Store(path, read_only=True) as store:
        run = store.query("SELECT * FROM runs WHERE run_id = ?", [outcome.run_id]).iloc[0]
        assert run["status"] == "ok" and run["code_version"] and json.loads(run["params"])["provider"] == "trace"
        zones = store.query("SELECT DISTINCT zone FROM carbon_forecasts WHERE run_id = ?", [outcome.run_id])
        assert sorted(zones["zone"]) == sorted(c.grid_zone for c in fleet.campuses)
        assert sorted(store.query("SELECT DISTINCT cluster FROM current_vcc_status")["cluster"]) == names
        models = store.query("SELECT * FROM power_models WHERE run_id = ?", [outcome.run_id])
        assert len(models) == sum(len(c.power_domains) for c in fleet.clusters())
        assert (models["status"] == "ok").all() and (models["r2"] > 0.9).all()
        days = store.query("SELECT * FROM load_forecast_days WHERE run_id = ?", [outcome.run_id])
        assert sorted(days["cluster"]) == names and (days["status"] == "ok").all()


def test_shaped_plans_cut_expected_carbon_and_respect_capacity(planned_db):
    """The default (queue) program: the VCC admits the inflexible quantile plus the plan of record (planned
    service plus its risk margin); flexible work moves towards cleaner hours, and where it can wait it is held
    back in dirty hours; fallbacks keep the full machines and their reason."""
    path, outcome = planned_db
    fleet = load_fleet()
    with Store(path, read_only=True) as store:
        status = store.query("SELECT * FROM current_vcc_status").set_index("cluster")
        vccs = store.query("SELECT * FROM current_vccs")
        loads = store.query("SELECT * FROM load_forecasts WHERE plan_date = ? AND run_id = ?",
                            [PLAN_DATE, outcome.run_id])
    shaped = status[status["status"] == "shaped"]
    assert set(shaped["campus"]) == {"ca-sj", "tx-midlothian"}  # CISO and ERCO; BPAT, MISO: low-benefit
    assert (shaped["expected_kgco2"] < shaped["flat_kgco2"]).all()
    gated = status[status["campus"].isin(["or-dalles", "ia-council"])]
    assert gated["reason"].str.startswith("low-benefit").all()
    held_somewhere = False
    for cluster in fleet.clusters():
        rows = vccs[vccs["cluster"] == cluster.name].sort_values("hour").reset_index(drop=True)
        assert len(rows) == 24, cluster.name  # 2022-06-15 is a 24-hour day in every campus
        if status.loc[cluster.name, "status"] != "shaped":
            assert (rows["vcc_cores"] == status.loc[cluster.name, "capacity_cores"]).all()
            continue
        load = loads[loads["cluster"] == cluster.name].sort_values("hour").reset_index(drop=True)
        floor = load["inflexible_upper_cpu_cores"] * load["reservation_ratio"]
        assert (rows["vcc_cores"] >= np.minimum(floor, status.loc[cluster.name, "capacity_cores"]) - 1e-6).all()
        assert (rows["flexible_cpu_cores"] >= -1e-9).all()
        # flexible work moves towards cleaner hours: allowance and carbon are negatively correlated
        corr = np.corrcoef(rows["flexible_cpu_cores"], rows["gco2_per_kwh"])[0, 1]
        assert corr < 0, (cluster.name, corr)
        held = rows["flexible_cpu_cores"] < 1e-6 * rows["flexible_cpu_cores"].max()
        if held.any():
            held_somewhere = True
            assert rows.loc[held, "gco2_per_kwh"].mean() > rows.loc[~held, "gco2_per_kwh"].mean(), cluster.name
    assert held_somewhere  # some clusters' work can wait: it is held back entirely in dirty hours

def test_replanning_keeps_every_run_and_replaces_the_plan_in_force(planned_copy, prefect_server):
    from flows.nightly import run_nightly_plan

    second = run_nightly_plan(PLAN_DATE, planned_copy)
    with Store(planned_copy, read_only=True) as store:
        plans = store.query("SELECT DISTINCT run_id FROM vcc_status")
        current = store.query("SELECT DISTINCT run_id FROM current_plans")
        runs = store.query("SELECT * FROM runs WHERE kind = 'plan'")
    assert len(plans) == 2 and list(current["run_id"]) == [second.run_id] and len(runs) == 2


def test_bad_carbon_payload_falls_back_visibly(planned_copy, prefect_server, tmp_path):
    from flows.nightly import PlanOptions, run_nightly_plan

    bad = tmp_path / "bad.csv"
    hours = pd.date_range("2022-06-15 05:00", periods=30, freq="h", tz="UTC")
    values = np.full(len(hours), 300.0)
    values[7] = np.nan
    pd.DataFrame({"target_hour": hours.strftime("%Y-%m-%dT%H:%M:%SZ"), "gco2_per_kwh": values,
                  "issued_at": "2022-06-14T18:00:00Z"}).to_csv(bad, index=False)
    outcome = run_nightly_plan(PLAN_DATE, planned_copy, options=PlanOptions(provider="csv", csv_path=str(bad)))
    assert outcome.status == "degraded"
    carbon = next(s for s in outcome.stages if s.name == "carbon-forecast")
    assert carbon.status == "degraded" and "gco2_per_kwh" in carbon.detail
    with Store(planned_copy, read_only=True) as store:
        status = store.query("SELECT * FROM current_vcc_status")
    assert (status["status"] == "fallback").all()
    assert status["reason"].str.startswith("no-carbon-forecast").all()


def test_cli_plan_and_vcc_show(planned_copy, prefect_server):
    from cicm.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["vcc", "show", "--cluster", "sj-a", "--date", "2022-06-15", "--db",
                                str(planned_copy), "--json"])
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.output)
    assert doc["status"] == "shaped" and len(doc["hours"]) == 24
    assert doc["expected_kgco2"] < doc["flat_kgco2"]
    missing = runner.invoke(app, ["vcc", "show", "--cluster", "nope", "--date", "2022-06-15", "--db",
                                  str(planned_copy)])
    assert missing.exit_code == 1 and "nope" in missing.output
    bad_date = runner.invoke(app, ["plan", "--date", "2022-13-45", "--db", str(planned_copy)])
    assert bad_date.exit_code == 1 and "date" in bad_date.output


def test_dst_day_plans_25_hours(planned_copy, prefect_server):
    from flows.nightly import run_nightly_plan

    outcome = run_nightly_plan(parse_plan_date("2022-11-06"), planned_copy)
    with Store(planned_copy, read_only=True) as store:
        counts = store.query("SELECT cluster, count(*) AS n FROM current_vccs WHERE plan_date = '2022-11-06'"
                             " GROUP BY cluster")
    assert outcome.status == "ok"
    assert (counts["n"] == 25).all() and len(counts) == 10


def test_deployment_has_nightly_cron_in_campus_evening():
    from flows.nightly import earliest_campus_timezone, nightly_deployment, tomorrow_in

    fleet = load_fleet()
    assert earliest_campus_timezone(fleet) == "America/Chicago"
    deployment = nightly_deployment("/tmp/x.duckdb")
    schedule = deployment.schedules[0].schedule
    assert schedule.cron == "0 18 * * *" and schedule.timezone == "America/Chicago"
    assert str(tomorrow_in("America/Chicago", pd.Timestamp("2022-06-15 04:00", tz="UTC"))) == "2022-06-15"


def test_the_ceiling_program_covers_theta(planned_copy):
    """`--program ceiling` (CICM's VCC program, the baseline): the daily VCC area covers the forecast Θ and the
    allowance follows clean hours."""
    from flows.nightly import PlanOptions, run_nightly_plan

    outcome = run_nightly_plan(PLAN_DATE, planned_copy, options=PlanOptions(program="ceiling"))
    assert outcome.status == "ok", outcome.stages
    with Store(planned_copy, read_only=True) as store:
        status = store.query("SELECT * FROM current_vcc_status").set_index("cluster")
        vccs = store.query("SELECT * FROM current_vccs")
    shaped = status[status["status"] == "shaped"]
    assert set(shaped["campus"]) == {"ca-sj", "tx-midlothian"}
    assert (shaped["expected_kgco2"] < shaped["flat_kgco2"]).all()
    for name in shaped.index:
        rows = vccs[vccs["cluster"] == name]
        assert rows["vcc_cores"].sum() >= status.loc[name, "theta_core_hours"] * (1 - 1e-6)
        corr = np.corrcoef(rows["flexible_cpu_cores"], rows["gco2_per_kwh"])[0, 1]
        assert corr < 0, (name, corr)

def test_plan_json_is_clean_on_stdout(planned_copy):
    """As a user runs it: the console script in a subprocess; stdout must be one JSON document (no solver
    banner before it)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cicm = Path(sys.executable).with_name("cicm")
    proc = subprocess.run([str(cicm), "plan", "--db", str(planned_copy), "--json"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["plan_date"] == str(PLAN_DATE) and doc["status"] == "ok"
    assert {c["status"] for c in doc["clusters"]} == {"shaped", "fallback"}


def test_provider_credentials_come_from_prefect_secret_blocks(prefect_server, tmp_path, monkeypatch):
    """An unset provider variable is filled from its Prefect Secret block for this process, and only for the
    providers the fleet's campuses use; a set variable is left as it is."""
    from prefect.blocks.system import Secret

    from flows.nightly import load_provider_secrets
    from cicm.planning.options import PlanOptions

    monkeypatch.delenv("ELECTRICITYMAPS_TOKEN", raising=False)
    monkeypatch.delenv("WATTTIME_USERNAME", raising=False)
    Secret(value="em-from-block").save("electricitymaps-token", overwrite=True)
    Secret(value="wt-user-from-block").save("watttime-username", overwrite=True)
    demo = load_fleet()
    assert load_provider_secrets(demo, PlanOptions()) == []  # the trace needs no credentials
    assert "ELECTRICITYMAPS_TOKEN" not in os.environ
    text = (load_fleet.__globals__["default_fleet_path"]()).read_text().replace(
        'grid_zone = "CISO"', 'grid_zone = "US-CAL-CISO"', 1).replace(
        "  [[campuses.clusters]]", '  [campuses.carbon]\n  provider = "electricitymaps"\n  [[campuses.clusters]]', 1)
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    fleet = load_fleet(path)
    assert load_provider_secrets(fleet, PlanOptions()) == ["ELECTRICITYMAPS_TOKEN"]
    assert os.environ["ELECTRICITYMAPS_TOKEN"] == "em-from-block"
    monkeypatch.setenv("ELECTRICITYMAPS_TOKEN", "from-env")
    assert load_provider_secrets(fleet, PlanOptions()) == []
    assert os.environ["ELECTRICITYMAPS_TOKEN"] == "from-env"
