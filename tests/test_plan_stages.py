"""The plan's stages without Prefect: per-cluster trouble becomes a visible, stored fallback."""
import pandas as pd
import numpy as np
import pytest

from cicm.config import load_fleet
from cicm.data.store import Store
from cicm.planning import stages
from cicm.planning.ingest import import_demo_telemetry
from cicm.planning.pipeline import PlanOptions
from cicm.timeutil import parse_plan_date

PLAN_DATE = parse_plan_date("2022-06-15")


@pytest.fixture(scope="module")
def fleet():
    return load_fleet()


@pytest.fixture(scope="module")
def telemetry_db(fleet, tmp_path_factory):
    path = tmp_path_factory.mktemp("stages") / "cicm.duckdb"
    with Store(path) as store:
        import_demo_telemetry(store, fleet)
    return path


def plan(store, fleet, **options):
    days = stages.campus_days(fleet, PLAN_DATE)
    fetched = {d.campus.name: stages.fetch_campus_carbon(d, "trace", seed=0) for d in days}
    carbon = stages.collect_carbon(days, fetched)
    # every campus may be shaped here (no forecast-value gate), so other fallbacks show alone
    return stages.plan_clusters(store, fleet, PLAN_DATE, days, carbon, PlanOptions(min_forecast_value_pct=0.0, **options))


@pytest.mark.parametrize("program", ["queue", "ceiling"])
def test_short_and_broken_histories_fall_back_with_reasons(fleet, telemetry_db, tmp_path, program):
    path = tmp_path / "db.duckdb"
    path.write_bytes(telemetry_db.read_bytes())
    with Store(path) as store:
        store.con.execute("DELETE FROM usage_history WHERE cluster = 'sj-a' AND hour < '2022-06-01'")
        store.con.execute("UPDATE usage_history SET inflexible_cpu_cores = 'NaN'::DOUBLE"
                          " WHERE cluster = 'dl-a' AND hour = '2022-06-10 05:00:00+00'")
        result = plan(store, fleet, program=program)
    status = result.status.set_index("cluster")
    assert status.loc["sj-a", "status"] == "fallback"
    assert status.loc["sj-a", "reason"].startswith("insufficient-history")
    assert status.loc["dl-a", "status"] == "fallback"
    assert status.loc["dl-a", "reason"].startswith("bad-history") and "inflexible_cpu_cores" in status.loc["dl-a", "reason"]
    # fallback VCC is the full machine capacity every hour
    for name in ("sj-a", "dl-a"):
        caps = result.vccs[result.vccs["cluster"] == name]["vcc_cores"]
        assert (caps == fleet.cluster(name).capacity_cores).all() and len(caps) == 24
    if program == "ceiling":
        assert status.loc["cb-c", "reason"].startswith("too-full")  # Θ above the day's machine capacity
        assert (status.drop(index=["sj-a", "dl-a", "cb-c"])["status"] == "shaped").all()
    else:  # the queue program carries cb-c's work across midnight: nothing is planned late
        assert (status.drop(index=["sj-a", "dl-a"])["status"] == "shaped").all()
    load_report = next(r for r in result.reports if r.name == "load-forecast")
    assert load_report.status == "degraded" and "sj-a" in load_report.detail and "dl-a" in load_report.detail


def test_slo_disabled_cluster_is_not_shaped(fleet, telemetry_db, tmp_path):
    path = tmp_path / "db.duckdb"
    path.write_bytes(telemetry_db.read_bytes())
    with Store(path) as store:
        with store.run("slo") as run:
            store.upsert("shaping_state", pd.DataFrame([{
                "cluster": "sj-b", "disabled_from": parse_plan_date("2022-06-14"),
                "disabled_until": parse_plan_date("2022-06-20"), "reason": "slo-feedback: 2 violating days"}]),
                run.run_id)
        result = plan(store, fleet)
    status = result.status.set_index("cluster")
    assert status.loc["sj-b", "status"] == "fallback" and status.loc["sj-b", "reason"].startswith("slo-feedback")
    assert status.loc["sj-a", "status"] == "shaped"


def test_missing_power_telemetry_falls_back(fleet, telemetry_db, tmp_path):
    path = tmp_path / "db.duckdb"
    path.write_bytes(telemetry_db.read_bytes())
    with Store(path) as store:
        store.con.execute("DELETE FROM power_telemetry WHERE domain = 'ml-b-pd1' AND hour > '2022-06-01'")
        result = plan(store, fleet)
    status = result.status.set_index("cluster")
    assert status.loc["ml-b", "reason"].startswith("no-power-model") and "ml-b-pd1" in status.loc["ml-b", "reason"]


def test_zones_where_forecasts_have_not_paid_are_not_shaped(fleet, telemetry_db, tmp_path):
    path = tmp_path / "db.duckdb"
    path.write_bytes(telemetry_db.read_bytes())
    days = stages.campus_days(fleet, PLAN_DATE)
    with Store(path) as store:
        values = {d.campus.grid_zone: stages.campus_forecast_value(store, d, 1.0) for d in days}
        fetched = {d.campus.name: stages.fetch_campus_carbon(d, "trace", seed=0) for d in days}
        result = stages.plan_clusters(store, fleet, PLAN_DATE, days, stages.collect_carbon(days, fetched),
                                      PlanOptions(min_forecast_value_pct=3.0, program="ceiling"))
    # measured from the stored day-ahead vintages and actuals of the 28 days before planning
    assert values["CISO"].realised_cut_pct > 10 and values["BPAT"].realised_cut_pct < 3
    assert all(v.realised_cut_pct <= v.ceiling_cut_pct for v in values.values())
    status = result.status.merge(pd.DataFrame(
        {"campus": [c.name for c in fleet.campuses], "zone": [c.grid_zone for c in fleet.campuses]}), on="campus")
    for zone, group in status.groupby("zone"):
        if values[zone].realised_cut_pct < 3.0:
            assert (group["status"] == "fallback").all() and group["reason"].str.startswith("low-benefit").all()
            assert (group["expected_kgco2"] == group["flat_kgco2"]).all()
        else:
            assert not group["reason"].fillna("").str.startswith("low-benefit").any()


def test_a_plan_that_fails_midway_writes_nothing_and_keeps_the_plan_in_force(fleet, telemetry_db, tmp_path,
                                                                             monkeypatch):
    from cicm.planning.pipeline import plan_day

    path = tmp_path / "db.duckdb"
    path.write_bytes(telemetry_db.read_bytes())
    with Store(path) as store:
        good = plan_day(store, fleet, PLAN_DATE, PlanOptions())
        before = store.query("SELECT * FROM current_vccs ORDER BY cluster, hour")
        counts = {t: len(store.query(f"SELECT * FROM {t}")) for t in ("vccs", "power_models", "load_forecasts")}

        original = store.upsert

        def failing_upsert(table, frame, run_id):  # the VCCs land, then the next write breaks
            if table == "current_plans":
                raise OSError("disk full")
            return original(table, frame, run_id)

        monkeypatch.setattr(store, "upsert", failing_upsert)
        with pytest.raises(OSError, match="disk full"):
            plan_day(store, fleet, PLAN_DATE, PlanOptions())
        monkeypatch.undo()
        after = store.query("SELECT * FROM current_vccs ORDER BY cluster, hour")
        runs = store.query("SELECT * FROM runs WHERE kind = 'plan' ORDER BY started_at")
        assert {t: len(store.query(f"SELECT * FROM {t}")) for t in counts} == counts
    pd.testing.assert_frame_equal(before, after)
    assert list(runs["status"]) == [good.status, "failed"] and "disk full" in runs["message"].iloc[-1]


def test_a_queue_plan_that_expects_late_work_is_not_enforced():
    """Planned lateness within the day means the room cannot carry the queue: full machines, with the reason."""
    room = np.full(24, 100.0)
    assert stages.too_full_reason(np.zeros(24), room) is None
    assert stages.too_full_reason(np.full(24, 1e-5), room) is None  # solver noise
    late = np.r_[np.zeros(20), [5.0, 10.0, 40.0, 40.0]]
    assert stages.too_full_reason(late, room).startswith("too-full: the plan expects 40 core-hours")


def test_the_queue_program_fetches_its_look_ahead_and_commits_only_the_day(fleet):
    from cicm.planning.pipeline import PlanOptions, fetch_day_carbon

    day = next(d for d in stages.campus_days(fleet, PLAN_DATE) if d.campus.grid_zone == "CISO")
    # planned at 18:00 PDT the evening before: 48 h from then reach 42 h past the local day's start
    ahead = fetch_day_carbon(day, PlanOptions())
    assert ahead["target_hour"].min() == day.hours[0] and len(ahead) == 42
    assert len(fetch_day_carbon(day, PlanOptions(program="ceiling"))) == 24
    carbon = stages.collect_carbon([day], {day.campus.name: ahead})
    assert len(carbon.by_campus[day.campus.name]) == 42


def test_a_forecast_is_used_up_to_its_first_gap():
    start = pd.Timestamp("2022-06-15 07:00", tz="UTC")
    hours = pd.date_range(start, periods=40, freq="h")
    values = pd.Series(np.arange(40.0) + 100, index=hours)
    assert len(stages.covered_forecast(values, start)) == 40
    assert len(stages.covered_forecast(values.drop(hours[30]), start)) == 30
    values.iloc[26] = np.nan
    assert len(stages.covered_forecast(values, start)) == 26
    assert len(stages.covered_forecast(values, start - pd.Timedelta(hours=1))) == 0  # the first hour is missing
