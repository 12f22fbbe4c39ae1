"""Operator controls (issue 17, item 3): `cicm shaping pause|resume|list` through the console script; the next
plan and the agent honour a pause; every pause and resume is an audited run."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import pandas as pd
import pytest

from cicm.config import load_fleet
from cicm.planning.ingest import import_demo_telemetry
from cicm.planning.pipeline import PlanOptions, plan_day
from cicm.store import Store

CICM = Path(sys.executable).with_name("cicm")
DAY = date(2022, 6, 15)


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Path:
    """The demo store with the plan for DAY (made before any pause)."""
    path = tmp_path_factory.mktemp("pause") / "cicm.duckdb"
    with Store(path) as store:
        import_demo_telemetry(store, load_fleet())
        plan_day(store, load_fleet(), DAY, PlanOptions())
    return path


@pytest.fixture
def db(planned, tmp_path) -> Path:
    path = tmp_path / "cicm.duckdb"
    path.write_bytes(planned.read_bytes())
    return path


def shaping(args: list[str], db: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CICM), "shaping", *args, "--db", str(db)], capture_output=True, text=True,
                          timeout=120)


def test_a_pause_is_honoured_by_the_agent_and_the_next_plan(db):
    from cicm.enforce.plans import StorePlanSource

    hour = pd.Timestamp("2022-06-15 20:00", tz="UTC")
    before = StorePlanSource(db, "sj-a").lookup(hour).plan
    assert before.status == "shaped"  # CISO is shaped in the demo plan

    out = shaping(["pause", "--campus", "ca-sj", "--from", "2022-06-15", "--until", "2022-06-16",
                   "--reason", "rack maintenance"], db)
    assert out.returncode == 0, out.stderr
    # the agent, at its next pass: the plan of the day falls back with the operator's reason (caps lifted)
    now = StorePlanSource(db, "sj-a").lookup(hour).plan
    assert now.status == "fallback" and now.reason == "operator-pause: rack maintenance"
    assert now.hours.equals(before.hours)  # the stored plan itself is untouched
    # the next nightly plan: every cluster of the campus falls back with that reason, the others are as before
    with Store(db) as store:
        result = plan_day(store, load_fleet(), date(2022, 6, 16), PlanOptions())
        runs = store.query("SELECT kind, params FROM runs WHERE kind = 'shaping-pause'")
    assert result.status in ("ok", "degraded")
    with Store(db, read_only=True) as store:
        plan16 = store.query("SELECT cluster, campus, status, reason, reason_code FROM current_vcc_status"
                             " WHERE plan_date = DATE '2022-06-16'").set_index("cluster")
    paused = plan16[plan16["campus"] == "ca-sj"]
    assert len(paused) == 3 and (paused["status"] == "fallback").all()
    assert paused["reason"].str.startswith("operator-pause: rack maintenance (shaping off until 2022-06-16").all()
    assert (paused["reason_code"] == "operator-pause").all()
    assert not plan16.loc[plan16["campus"] != "ca-sj", "reason"].fillna("").str.startswith("operator").any()
    assert len(runs) == 1
    params = json.loads(runs["params"].iloc[0])
    assert params["clusters"] == ["sj-a", "sj-b", "sj-c"] and params["reason"] == "rack maintenance"
    assert params["by"]


def test_resume_ends_a_pause_from_today_and_keeps_its_record(db):
    assert shaping(["pause", "--cluster", "sj-b", "--from", "2022-06-15", "--until", "2099-12-31",
                    "--reason", "testing"], db).returncode == 0
    listed = shaping(["list"], db)
    assert listed.returncode == 0 and "sj-b" in listed.stdout and "testing" in listed.stdout
    out = shaping(["resume", "--cluster", "sj-b"], db)
    assert out.returncode == 0 and "1 pause(s) ended" in out.stdout, out.stderr
    with Store(db, read_only=True) as store:
        row = store.query("SELECT disabled_until, reason FROM shaping_state WHERE cluster = 'sj-b'").iloc[0]
        kinds = store.query("SELECT kind FROM runs WHERE kind LIKE 'shaping-%' ORDER BY started_at")["kind"]
    assert pd.Timestamp(row["disabled_until"]).date() < pd.Timestamp.now(tz="UTC").date()
    assert "resumed from" in row["reason"]
    assert list(kinds) == ["shaping-pause", "shaping-resume"]
    assert "sj-b" not in shaping(["list"], db).stdout  # nothing in force any more
    assert "sj-b" in shaping(["list", "--all"], db).stdout


@pytest.mark.parametrize("args, field", [
    (["pause", "--cluster", "nope", "--until", "2099-01-01", "--reason", "x"], "cluster"),
    (["pause", "--campus", "nope", "--until", "2099-01-01", "--reason", "x"], "campus"),
    (["pause", "--until", "2099-01-01", "--reason", "x"], "cluster"),
    (["pause", "--cluster", "sj-a", "--until", "2000-01-01", "--reason", "x"], "until"),
    (["pause", "--cluster", "sj-a", "--until", "2099-01-01", "--reason", " "], "reason"),
])
def test_bad_requests_name_their_field_and_store_nothing(db, args, field):
    out = shaping(args, db)
    assert out.returncode == 1 and out.stderr.startswith(f"error: {field}:"), out.stderr
    with Store(db, read_only=True) as store:
        assert store.query("SELECT count(*) AS n FROM shaping_state")["n"].iloc[0] == 0
