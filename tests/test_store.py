from datetime import date

import duckdb
import pandas as pd
import pytest

from cicm.errors import InputError
from cicm.store import SCHEMA_VERSION, Store

HOUR = pd.Timestamp("2022-06-01", tz="UTC")


def forecast_rows(value: float, issued: str = "2022-05-31 18:00") -> pd.DataFrame:
    return pd.DataFrame({
        "provider": "trace", "zone": "CISO",
        "target_hour": pd.date_range(HOUR, periods=24, freq="h"),
        "issued_at": pd.Timestamp(issued, tz="UTC"), "gco2_per_kwh": value,
    })


def test_schema_created_on_first_use_and_versioned(db_path):
    with Store(db_path) as store:
        assert store.schema_version() == SCHEMA_VERSION
        tables = set(store.query("SELECT table_name FROM information_schema.tables")["table_name"])
    for name in ("runs", "carbon_forecasts", "usage_history", "power_telemetry", "power_models",
                 "load_forecasts", "vccs", "slo_events", "shaping_state"):
        assert name in tables


def test_failed_run_leaves_nothing_half_written_and_is_recorded(db_path):
    with Store(db_path) as store:
        with store.run("fetch") as run:
            store.write_carbon_forecast(forecast_rows(100.0), run.run_id)
        with pytest.raises(RuntimeError, match="boom"):
            with store.run("fetch") as run:
                store.write_carbon_forecast(forecast_rows(999.0, "2022-05-31 19:00"), run.run_id)
                raise RuntimeError("boom")
        rows = store.query("SELECT * FROM carbon_forecasts")
        runs = store.runs()
    assert len(rows) == 24 and (rows["gco2_per_kwh"] == 100.0).all()
    assert sorted(runs["status"]) == ["failed", "ok"]
    assert "boom" in runs.loc[runs["status"] == "failed", "message"].iloc[0]


def test_every_forecast_vintage_is_kept_and_latest_is_read(db_path):
    with Store(db_path) as store:
        for value, issued in ((100.0, "2022-05-31 06:00"), (120.0, "2022-05-31 18:00")):
            with store.run("fetch") as run:
                store.write_carbon_forecast(forecast_rows(value, issued), run.run_id)
        assert len(store.query("SELECT * FROM carbon_forecasts")) == 48
        latest = store.latest_carbon_forecast("CISO", HOUR, HOUR + pd.Timedelta(days=1))
        before = store.latest_carbon_forecast("CISO", HOUR, HOUR + pd.Timedelta(days=1),
                                              issued_before=pd.Timestamp("2022-05-31 12:00", tz="UTC"))
    assert (latest["gco2_per_kwh"] == 120.0).all() and len(latest) == 24
    assert (before["gco2_per_kwh"] == 100.0).all()


def test_replanning_a_day_replaces_its_plan_but_keeps_both_runs(db_path):
    day = HOUR.date()

    def plan(cap: float, hours: int):
        vccs = pd.DataFrame({
            "plan_date": day, "cluster": "c1", "hour": pd.date_range(HOUR, periods=hours, freq="h"),
            "hour_index": range(hours), "vcc_cores": cap, "flexible_cpu_cores": 1.0, "inflexible_cpu_cores": 1.0,
            "power_kw": 1.0, "carbon_kgco2": 1.0, "gco2_per_kwh": 1.0,
        })
        status = pd.DataFrame([{"plan_date": day, "cluster": "c1", "campus": "x", "status": "shaped", "reason": None,
                                "capacity_cores": 10.0, "theta_core_hours": 1.0, "tau_core_hours": 1.0,
                                "expected_kgco2": 1.0, "flat_kgco2": 1.0, "saving_pct": 0.0, "peak_kw": 1.0}])
        return vccs, status

    with Store(db_path) as store:
        for cap, hours in ((5.0, 25), (7.0, 24)):
            with store.run("plan", plan_date=day) as run:
                vccs, status = plan(cap, hours)
                store.replace_plan(day, vccs, status, run.run_id)
        hours, status = store.plan("c1", day)
        assert len(hours) == 24 and (hours["vcc_cores"] == 7.0).all()
        assert len(store.runs()) == 2
        assert len(store.query("SELECT * FROM vccs")) == 49  # the first run's 25 hours are kept


def test_upsert_rejects_frame_missing_a_column(db_path):
    with Store(db_path) as store, pytest.raises(InputError, match="gco2_per_kwh"):
        with store.run("fetch") as run:
            store.write_carbon_forecast(forecast_rows(1.0).drop(columns="gco2_per_kwh"), run.run_id)


def test_read_only_store_refuses_missing_file(tmp_path):
    with pytest.raises(InputError, match="no database"):
        Store(tmp_path / "absent.duckdb", read_only=True)


def test_newer_schema_is_refused(db_path):
    Store(db_path).close()
    con = duckdb.connect(str(db_path))
    con.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(InputError, match="schema version 999"):
        Store(db_path)


def test_a_version_1_file_is_migrated_and_keeps_its_rows(db_path):
    """Version 2 stores fallback reasons as a code and a detail in their own columns; a version-1 file gains them,
    split from its stored text, in one transaction, and its plan in force reads the same."""
    from cicm.store.core import SCHEMA_V1

    con = duckdb.connect(str(db_path))
    con.execute(SCHEMA_V1)
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    for cluster, reason in (("a", "low-benefit: 0.4% (perfect 1.6%): below the 3% needed"), ("b", None),
                            ("c", "too-full")):
        con.execute("INSERT OR IGNORE INTO runs (run_id, kind, started_at, status) VALUES "
                    "('r1', 'plan', now(), 'ok')")
        con.execute("INSERT INTO vcc_status (run_id, plan_date, cluster, campus, status, reason) VALUES "
                    "('r1', DATE '2022-06-15', ?, 'x', 'fallback', ?)", [cluster, reason])
        con.execute("INSERT INTO current_plans VALUES ('r1', DATE '2022-06-15', ?)", [cluster])
    con.close()
    with Store(db_path) as store:
        assert store.schema_version() == SCHEMA_VERSION
        rows = store.query("SELECT cluster, reason, reason_code, reason_detail FROM current_vcc_status"
                           " ORDER BY cluster").set_index("cluster")
    assert rows.loc["a", "reason_code"] == "low-benefit"
    assert rows.loc["a", "reason_detail"] == "0.4% (perfect 1.6%): below the 3% needed"
    assert rows.loc["b", "reason_code"] is None or pd.isna(rows.loc["b", "reason_code"])
    assert rows.loc["c", "reason_code"] == "too-full" and pd.isna(rows.loc["c", "reason_detail"])


def test_a_stored_plan_carries_its_reason_code_and_detail(db_path):
    from cicm.reasons import FallbackCode, join_reason, split_reason

    reason = join_reason(FallbackCode.NO_POWER_MODEL, "sj-a-pd1: 3 samples")
    assert split_reason(reason) == ("no-power-model", "sj-a-pd1: 3 samples")
    status = pd.DataFrame([{"plan_date": date(2022, 6, 15), "cluster": "sj-a", "campus": "ca-sj", "status": "fallback",
                            "reason": reason, "capacity_cores": 1.0, "theta_core_hours": None,
                            "tau_core_hours": None, "expected_kgco2": None, "flat_kgco2": None,
                            "saving_pct": None, "peak_kw": None}])
    with Store(db_path) as store, store.run("plan", plan_date=date(2022, 6, 15)) as run:
        store.replace_plan(date(2022, 6, 15), pd.DataFrame(), status, run.run_id)
    with Store(db_path, read_only=True) as store:
        row = store.query("SELECT reason_code, reason_detail FROM current_vcc_status").iloc[0]
    assert (row["reason_code"], row["reason_detail"]) == ("no-power-model", "sj-a-pd1: 3 samples")


# -- the store package: old import paths, named reads and their documented columns ----------------------------


def test_old_import_paths_are_the_store_package():
    import cicm.dashboards.reader
    import cicm.data.retention
    import cicm.data.store
    import cicm.store.core
    import cicm.store.reader
    import cicm.store.retention

    assert cicm.data.store is cicm.store.core  # one module: patching cicm.data.store patches the store
    assert cicm.data.retention.compact_history is cicm.store.retention.compact_history
    assert cicm.dashboards.reader.StoreReader is cicm.store.reader.StoreReader


def _documented_columns(function) -> list[str] | None:
    """The column list after 'Columns:' in the docstring; None when it names a table's columns instead."""
    import inspect
    import re

    doc = " ".join((inspect.getdoc(function) or "").split())
    text = doc.split("Columns:", 1)[1].strip()
    if text.startswith(("the ", "as ")):
        return None
    text = re.sub(r"\([^)]*\)", "", text).strip().rstrip(".")
    return [c.strip() for c in text.split(",")]


def _named_reads():
    from datetime import date

    from cicm.store import agent, dashboard, plan, slo

    day, hour = date(2022, 6, 1), HOUR
    end = HOUR + pd.Timedelta(days=1)
    return [
        (plan.usage_histories, (["c1"], end, 7)), (plan.power_telemetries, (["c1"], end, 8)),
        (plan.shaping_switched_off, (["c1"], day)),
        (slo.cluster_usage, ("c1", hour, end)), (slo.cluster_plan_hours, ("c1", hour, end)),
        (slo.cluster_plan_status, ("c1", day, day)), (slo.fleet_usage, (["c1", "c2"], hour, end)),
        (slo.fleet_plan_hours, (["c1"], hour, end)), (slo.fleet_plan_status, (["c1"], day, day)),
        (slo.last_switch_offs, (["c1"], "slo-feedback", day)), (slo.events_between, (["c1"], day, day)),
        (slo.event_totals, ()), (slo.switch_offs_ending_from, (day,)),
        (agent.plan_dates_covering, ("c1", hour)), (agent.plan_run_in_force, ("c1", day)),
        (agent.run_started_and_params, ("r1",)), (agent.inflexible_upper_forecast, ("r1", "c1")),
        (agent.power_models_of_run, ("r1", "c1")), (agent.latest_carbon_forecast, ("CISO", hour, end)),
        (dashboard.plan_dates, ()), (dashboard.planned_clusters, (day,)), (dashboard.shaping_off, (day,)),
        (dashboard.slo_by_cluster, (day, day)), (dashboard.slo_events_between, (day, day)),
        (dashboard.cluster_day_hours, ("c1", day)), (dashboard.newest_carbon_forecast, ("CISO", hour, end)),
        (dashboard.carbon_actuals, ("CISO", hour, end)), (dashboard.intraday_deviations, ("c1", day)),
        (dashboard.domain_power_telemetry, ("d1", hour, end)), (dashboard.load_forecast_errors, ("c1",)),
        (dashboard.carbon_forecast_errors, ("CISO", "c1")), (dashboard.cluster_plan_history, ("c1",)),
        (dashboard.vcc_export_rows, (day,)),
    ]


def test_named_reads_return_the_columns_they_document(db_path):
    with Store(db_path) as store:
        checked = 0
        for function, args in _named_reads():
            columns = _documented_columns(function)
            frame = function(store, *args)
            if columns is not None:
                assert list(frame.columns) == columns, function.__qualname__
                checked += 1
    assert checked >= 25


def test_dashboard_reads_take_the_dashboards_reading(db_path):
    from cicm.store import dashboard
    from cicm.store.reader import StoreReader

    with Store(db_path) as store, store.run("fetch") as run:
        store.write_carbon_forecast(forecast_rows(100.0), run.run_id)
    with StoreReader(db_path).read() as reading:
        runs = dashboard.runs(reading)
        forecast = dashboard.newest_carbon_forecast(reading, "CISO", HOUR, HOUR + pd.Timedelta(days=1))
    assert runs["kind"].tolist() == ["fetch"] and len(forecast) == 24


def _version_2_file(db_path) -> None:
    """A file as version-2 code left it: a plan run 'p1' (ok) in force for cluster a, then a plan run 'p2' killed
    after its data committed and before its status did ('running', owning the plan in force of a and b)."""
    from cicm.store.core import MIGRATIONS, SCHEMA_V1

    con = duckdb.connect(str(db_path))
    con.execute(SCHEMA_V1)
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.execute(MIGRATIONS[2])
    con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    for run_id, status, started in (("p1", "ok", "2022-06-14 01:00"), ("p2", "running", "2022-06-15 01:00"),
                                    ("agent-1", "running", "2022-06-15 02:00")):
        kind = "agent" if run_id.startswith("agent") else "plan"
        con.execute("INSERT INTO runs (run_id, kind, started_at, status) VALUES (?, ?, ?, ?)",
                    [run_id, kind, pd.Timestamp(started, tz="UTC"), status])
    for run_id, cluster in (("p1", "a"), ("p2", "a"), ("p2", "b")):
        con.execute("INSERT INTO vcc_status (run_id, plan_date, cluster, campus, status) VALUES "
                    "(?, DATE '2022-06-15', ?, 'x', 'shaped')", [run_id, cluster])
    con.execute("INSERT INTO current_plans VALUES ('p2', DATE '2022-06-15', 'a'), ('p2', DATE '2022-06-15', 'b')")
    con.close()


def test_a_version_2_file_migrates_and_its_stuck_runs_are_abandoned(db_path):
    """Issue 20, item 2: version 3 records each run's writer (pid, hostname); migrating a version-2 file abandons
    the runs earlier code left 'running' (not the agent's), and the plan in force goes back to the newest
    succeeded plan run (or none)."""
    _version_2_file(db_path)
    with Store(db_path) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert {"pid", "hostname"} <= set(store.columns("runs"))
        runs = store.query("SELECT run_id, status, message FROM runs").set_index("run_id")
        current = store.query("SELECT run_id, cluster FROM current_plans ORDER BY cluster")
        shown = store.query("SELECT run_id, cluster FROM current_vcc_status ORDER BY cluster")
        assert store.plans_of_unsucceeded_runs().empty
    assert runs.loc["p2", "status"] == "abandoned" and "earlier version" in runs.loc["p2", "message"]
    assert runs.loc["p1", "status"] == "ok" and runs.loc["agent-1", "status"] == "running"
    assert current.values.tolist() == [["p1", "a"]]  # b had no succeeded plan: none in force
    assert shown.values.tolist() == [["p1", "a"]]


def test_runs_of_dead_processes_are_abandoned_live_ones_kept(db_path):
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    with Store(db_path) as store:
        mine = store.begin_run("plan")
        other = store.begin_run("carbon-fetch")
        store.con.execute("UPDATE runs SET pid = ? WHERE run_id = ?", [dead_pid, other])
    with Store(db_path) as store:  # reopening for writing: the dead writer's run is abandoned, with the reason
        runs = store.query("SELECT run_id, status, message, pid, hostname FROM runs").set_index("run_id")
    assert runs.loc[mine, "status"] == "running"  # this (live) process's run is not touched
    assert runs.loc[mine, "pid"] == os.getpid() and runs.loc[mine, "hostname"] == socket.gethostname()
    assert runs.loc[other, "status"] == "abandoned"
    assert f"process {dead_pid} on {socket.gethostname()} is gone" in runs.loc[other, "message"]
    with Store(db_path, read_only=True) as store:  # a reader changes nothing
        assert store.query("SELECT count(*) AS n FROM runs WHERE status = 'running'")["n"].iloc[0] == 1


def test_a_runs_status_commits_with_its_data(db_path):
    """The final status is written inside the run's transaction: a failure at commit time leaves neither the
    data nor an 'ok' status; a success lands both at once."""
    with Store(db_path) as store:
        with store.run("fetch") as run:
            store.write_carbon_forecast(forecast_rows(100.0), run.run_id)
            inside = store.query("SELECT status FROM runs WHERE run_id = ?", [run.run_id])["status"].iloc[0]
        after = store.query("SELECT status, finished_at FROM runs WHERE run_id = ?", [run.run_id]).iloc[0]
        failed = store.failed_run("fetch", {}, None, RuntimeError("no"))
        row = store.query("SELECT status, message, finished_at, pid FROM runs WHERE run_id = ?", [failed]).iloc[0]
    assert inside == "running" and after["status"] == "ok" and not pd.isna(after["finished_at"])
    assert row["status"] == "failed" and row["message"] == "RuntimeError: no" and not pd.isna(row["finished_at"])
