"""The SLO check and the feedback loop: fluid check, slo_events, shaping switched off in the next real plan."""
from __future__ import annotations

import json
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cicm.config import Fleet, load_fleet
from cicm.data.store import Store
from cicm.planning.slo import feedback_decision, fluid_served_many, slo_stage, slo_status
from cicm.timeutil import local_day_hours_utc

PLAN_DATE = date(2022, 6, 15)


# ------------------------------------------------------------------------------------------------ fluid check


def fluid_served(arrivals, room, deadline_hours=24):
    """The production queue (fleet-wide, ``fluid_served_many``) on one series."""
    return fluid_served_many(np.atleast_2d(arrivals), np.atleast_2d(room), deadline_hours)[0]


def test_fluid_check_serves_fifo_within_the_deadline_and_drops_what_misses_it():
    arrivals = np.array([10.0, 0, 0, 5.0, 0, 0])
    assert fluid_served(arrivals, np.full(6, 10.0), deadline_hours=2).tolist() == [10, 0, 0, 5, 0, 0]
    # 4 per hour, 2-hour deadline: the first 10 get 8 on time; the 5 arriving at 3 get their 2 hours
    assert fluid_served(arrivals, np.full(6, 4.0), deadline_hours=2).tolist() == [8, 0, 0, 5, 0, 0]
    # missed work is dropped, so it does not eat the room of later arrivals
    assert fluid_served(np.array([10.0, 0, 3.0, 0]), np.array([1.0, 1.0, 3.0, 0]), 2).tolist() == [2, 0, 3, 0]
    with pytest.raises(ValueError):
        fluid_served(np.array([-1.0]), np.array([1.0]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0, 100)), min_size=1, max_size=80), st.integers(1, 30))
def test_fluid_check_invariants(pairs, deadline):
    arrivals = np.array([p[0] for p in pairs])
    room = np.array([p[1] for p in pairs])
    served = fluid_served(arrivals, room, deadline)
    assert (served <= arrivals + 1e-9).all() and (served >= 0).all()
    assert served.sum() <= room.sum() + 1e-6
    more = fluid_served(arrivals, room * 2, deadline)
    assert more.sum() >= served.sum() - 1e-6  # more room never serves less
    if (room >= arrivals.sum()).all():
        assert np.allclose(served, arrivals)


def _events(flags):
    days = [date(2022, 6, 1) + timedelta(days=i) for i in range(len(flags))]
    return pd.DataFrame({"day": days, "violated": [f == "v" for f in flags], "close": [f == "c" for f in flags]})


def test_feedback_needs_two_flagged_days_in_a_row_or_recurring_violations():
    assert feedback_decision(_events(".v.c.v"), PLAN_DATE, recur_violations=3) is None
    reason = feedback_decision(_events("..cv."), PLAN_DATE)
    assert reason.startswith("slo-feedback: 2 close or violating days in a row")
    assert "2022-06-03 close" in reason and "2022-06-04 violated" in reason
    assert feedback_decision(_events("v...v"), PLAN_DATE).startswith("slo-feedback: 2 violating days")
    assert feedback_decision(_events("c.c.c"), PLAN_DATE) is None  # close days alone must be consecutive
    assert feedback_decision(_events("cc"), PLAN_DATE, consecutive_days=3) is None


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def small_fleet() -> Fleet:
    demo = load_fleet().model_dump()
    campus = next(c for c in demo["campuses"] if c["name"] == "ca-sj")
    campus["clusters"] = campus["clusters"][:2]  # sj-a, sj-b
    return Fleet.model_validate({**demo, "campuses": [campus]})


@pytest.fixture(scope="module")
def base_db(small_fleet, tmp_path_factory):
    """Demo telemetry and real plans (the real plan glue) for the days the check will look at."""
    from cicm.planning.ingest import import_demo_telemetry

    path = tmp_path_factory.mktemp("slo") / "cicm.duckdb"
    with Store(path) as store:
        import_demo_telemetry(store, small_fleet, seed=0)
        for offset in (5, 4, 3):
            plan_day(store, small_fleet, PLAN_DATE - timedelta(days=offset))
    return path


def plan_day(store, fleet, day: date):
    from cicm.planning import stages
    from cicm.planning.pipeline import PlanOptions

    # The ceiling program: these tests drive the loop's mechanics (surges, days close to Θ). The fluid check
    # replays a plan's VCC as a static cap, which is pessimistic for queue plans (it leaves out the agent's
    # hourly deadline release; docs/design-notes.md).
    options = PlanOptions(program="ceiling")
    days = stages.campus_days(fleet, day)
    carbon = stages.collect_carbon(days, {d.campus.name: stages.fetch_campus_carbon(d, "trace", 0) for d in days})
    with store.run("plan", {"test": True}, plan_date=day) as run:
        result = stages.plan_clusters(store, fleet, day, days, carbon, options)
        store.replace_plan(day, result.vccs, result.status, run.run_id)
        for table, frame in result.extra_tables.items():
            store.upsert(table, frame, run.run_id)
    return result


@pytest.fixture
def db(base_db, tmp_path):
    import shutil

    path = tmp_path / "cicm.duckdb"
    shutil.copy(base_db, path)
    return path


def surge(store, cluster: str, days: list[date], factor: float) -> None:
    """A flash crowd of batch work: the flexible arrivals of these local days times ``factor``."""
    for day in days:
        hours = local_day_hours_utc(day, "America/Los_Angeles")
        store.con.execute(
            "UPDATE usage_history SET flexible_arrived_core_hours = flexible_arrived_core_hours * ?"
            " WHERE cluster = ? AND hour >= ? AND hour < ?",
            [factor, cluster, hours[0], hours[-1] + pd.Timedelta(hours=1)])


def test_a_normal_week_passes_and_only_complete_days_are_checked(db, small_fleet):
    with Store(db) as store:
        out = slo_stage(store, small_fleet, PLAN_DATE)
        events = out["events"]
        # plans exist for P-5..P-3; P-2 and P-1 are not complete at planning time (18:00 on P-1)
        assert sorted(set(events["day"])) == [PLAN_DATE - timedelta(days=k) for k in (5, 4, 3)]
        assert not events["violated"].any()
        assert np.allclose(events["served_core_hours"], events["demand_core_hours"])
        assert out["shaping"].empty and set(out["clusters"]["shaping"]) == {"on"}
        assert out["summary"].startswith("slo: 6 cluster-days checked (2022-06-10..2022-06-12): 0 violated")
        stored = store.query("SELECT * FROM slo_events")
        run = store.query("SELECT * FROM runs WHERE run_id = ?", [out["run_id"]])
    assert len(stored) == 6 and run["kind"].iloc[0] == "slo" and run["status"].iloc[0] == "ok"


def test_violations_two_days_in_a_row_switch_shaping_off_in_the_next_real_plan(db, small_fleet):
    with Store(db) as store:
        surge(store, "sj-a", [PLAN_DATE - timedelta(days=4), PLAN_DATE - timedelta(days=3)], 10.0)
        out = slo_stage(store, small_fleet, PLAN_DATE, disable_days=7)
        ev = out["events"].set_index(["cluster", "day"])
        assert ev.loc[("sj-a", PLAN_DATE - timedelta(days=4)), "violated"]
        assert ev.loc[("sj-a", PLAN_DATE - timedelta(days=3)), "violated"]
        assert not ev.loc["sj-b", "violated"].any()
        shaping = out["shaping"]
        assert shaping["cluster"].tolist() == ["sj-a"]
        assert shaping["disabled_from"].iloc[0] == PLAN_DATE
        assert shaping["disabled_until"].iloc[0] == PLAN_DATE + timedelta(days=6)
        assert shaping["reason"].iloc[0].startswith("slo-feedback: 2 close or violating days in a row")

        # the next plan, made by the real plan glue, falls back for sj-a with that reason; sj-b is shaped
        result = plan_day(store, small_fleet, PLAN_DATE)
        status = result.status.set_index("cluster")
        assert status.loc["sj-a", "status"] == "fallback"
        assert status.loc["sj-a", "reason"].startswith("slo-feedback")
        assert "shaping off until 2022-06-21" in status.loc["sj-a", "reason"]
        assert status.loc["sj-b", "status"] == "shaped"
        vccs = result.vccs[result.vccs["cluster"] == "sj-a"]
        assert np.allclose(vccs["vcc_cores"], vccs["vcc_cores"].iloc[0])  # full capacity all day

        # the next night: still off (not extended, not re-triggered by the same days)
        again = slo_stage(store, small_fleet, PLAN_DATE + timedelta(days=1))
        assert again["shaping"].empty
        assert again["clusters"].set_index("cluster").loc["sj-a", "shaping"] == "off"
        status_now = slo_status(store, as_of=PLAN_DATE)
    row = status_now.set_index("cluster").loc["sj-a"]
    assert row["shaping"] == "off" and row["violated"] == 2 and row["reason"].startswith("slo-feedback")


def test_close_days_in_a_row_also_switch_shaping_off(db, small_fleet):
    with Store(db) as store:
        # reservations at Theta on two days in a row, work still served: close, not violated
        for day in (PLAN_DATE - timedelta(days=4), PLAN_DATE - timedelta(days=3)):
            theta = store.query("SELECT theta_core_hours FROM current_vcc_status"
                                " WHERE cluster = 'sj-b' AND plan_date = ?", [day])["theta_core_hours"].iloc[0]
            hours = local_day_hours_utc(day, "America/Los_Angeles")
            store.con.execute("UPDATE usage_history SET reserved_cpu_cores = ? WHERE cluster = 'sj-b' AND hour >= ?"
                              " AND hour < ?", [theta / len(hours), hours[0], hours[-1] + pd.Timedelta(hours=1)])
        out = slo_stage(store, small_fleet, PLAN_DATE, close_fraction=0.99)
    ev = out["events"].set_index(["cluster", "day"])
    assert ev.loc["sj-b", "close"].tolist() == [False, True, True] and not ev["violated"].any()
    assert out["shaping"]["cluster"].tolist() == ["sj-b"]
    assert "close" in out["shaping"]["reason"].iloc[0]


def test_the_stage_writes_in_the_callers_transaction_when_given_a_run(db, small_fleet):
    with Store(db) as store:
        surge(store, "sj-a", [PLAN_DATE - timedelta(days=4), PLAN_DATE - timedelta(days=3)], 10.0)
        with pytest.raises(RuntimeError, match="boom"):
            with store.run("plan", {}, plan_date=PLAN_DATE) as run:
                slo_stage(store, small_fleet, PLAN_DATE, run_id=run.run_id)
                raise RuntimeError("boom")
        assert store.query("SELECT count(*) AS n FROM shaping_state")["n"].iloc[0] == 0  # rolled back
        with store.run("plan", {}, plan_date=PLAN_DATE) as run:
            out = slo_stage(store, small_fleet, PLAN_DATE, run_id=run.run_id)
        assert out["run_id"] == run.run_id
        assert store.query("SELECT run_id FROM shaping_state")["run_id"].tolist() == [run.run_id]


def test_slo_cli_status_and_check(db, small_fleet, tmp_path):
    from typer.testing import CliRunner

    from cicm.planning.slo_cli import slo_app

    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(_toml(small_fleet))
    runner = CliRunner()
    with Store(db) as store:
        surge(store, "sj-a", [PLAN_DATE - timedelta(days=4), PLAN_DATE - timedelta(days=3)], 10.0)
    res = runner.invoke(slo_app, ["check", "--date", str(PLAN_DATE), "--db", str(db), "--fleet", str(fleet_file)])
    assert res.exit_code == 0, res.output
    assert "shaping switched off for sj-a until 2022-06-21" in res.output
    res = runner.invoke(slo_app, ["status", "--db", str(db), "--json", "--as-of", str(PLAN_DATE)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["totals"] == {"clusters": 2, "cluster_days": 6, "violated": 2, "close": doc["totals"]["close"],
                             "shaping_off": 1}
    by = {c["cluster"]: c for c in doc["clusters"]}
    assert by["sj-a"]["shaping"] == "off" and by["sj-b"]["shaping"] == "on"
    res = runner.invoke(slo_app, ["status", "--db", str(db)])
    assert res.exit_code == 0 and "sj-a" in res.output
    res = runner.invoke(slo_app, ["status", "--db", str(tmp_path / "nope.duckdb")])
    assert res.exit_code == 1 and "no database" in res.output


def _toml(fleet: Fleet) -> str:
    lines = [f'name = "{fleet.name}"', f'history_start = "{fleet.history_start.date()}"',
             f"history_days = {fleet.history_days}"]
    for campus in fleet.campuses:
        lines += ["[[campuses]]", f'name = "{campus.name}"', f'grid_zone = "{campus.grid_zone}"',
                  f'timezone = "{campus.timezone}"', f"contract_limit_kw = {campus.contract_limit_kw}"]
        for c in campus.clusters:
            lines += ["[[campuses.clusters]]", f'name = "{c.name}"', f'inflexible_trace = "{c.inflexible_trace}"',
                      f"inflexible_peak_share = {c.inflexible_peak_share}", f'flexible_trace = "{c.flexible_trace}"',
                      f"flexible_mean_share = {c.flexible_mean_share}", f"reservation_ratio = {c.reservation_ratio}"]
            for d in c.power_domains:
                lines += ["[[campuses.clusters.power_domains]]", f'name = "{d.name}"', f"machines = {d.machines}",
                          f"spec_row = {d.spec_row}", f'server_model = "{d.server_model}"']
    return "\n".join(lines) + "\n"


def test_status_of_a_store_with_plans_but_no_judged_days(tmp_path):
    """Right after the first plan nothing is judged yet: every planned cluster shows shaping on, 0 days."""
    import pandas as pd
    from datetime import date as _date

    from cicm.data.store import Store
    from cicm.planning.slo import slo_status

    with Store(tmp_path / "s.duckdb") as store:
        with store.run("plan") as run:
            store.upsert("current_plans", pd.DataFrame({"plan_date": [_date(2022, 6, 15)] * 2,
                                                        "cluster": ["a", "b"]}), run.run_id)
        status = slo_status(store)
    assert list(status["cluster"]) == ["a", "b"]
    assert (status["shaping"] == "on").all() and (status["days"] == 0).all()
