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


def test_missing_power_telemetry_uses_the_declared_curve_or_falls_back(fleet, telemetry_db, tmp_path):
    path = tmp_path / "db.duckdb"
    path.write_bytes(telemetry_db.read_bytes())
    with Store(path) as store:
        store.con.execute("DELETE FROM power_telemetry WHERE domain = 'ml-b-pd1' AND hour > '2022-06-01'")
        result = plan(store, fleet)
    # ml-b-pd1 names a SPECpower row: with no fit, its declared curve plans it, and the power_models row says so
    status = result.status.set_index("cluster")
    assert status.loc["ml-b", "status"] == "shaped"
    rows = result.extra_tables["power_models"].set_index("domain")
    assert rows.loc["ml-b-pd1", "status"] == "ok" and rows.loc["ml-b-pd1", "reason"].startswith(
        "declared curve (SPECpower row")
    assert pd.isna(rows.loc["ml-b-pd2", "reason"])  # the other domain still has its fit
    report = next(r for r in result.reports if r.name == "power-models")
    assert "ml-b-pd1" in report.detail and "declared curve" in report.detail

    # a domain with telemetry only (no spec_row, no power_points) and no fit: the cluster falls back
    bare = fleet.model_copy(deep=True)
    cluster = bare.cluster("ml-b")
    object.__setattr__(cluster.power_domains[0], "spec_row", None)
    object.__setattr__(cluster.power_domains[0], "cores", fleet.cluster("ml-b").power_domains[0].capacity_cores)
    with Store(path) as store:
        result = plan(store, bare)
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


def _old_queue_cluster(ci, rows, day, hours, options):
    """The per-cluster pandas path the campus batch replaced (kept here as the reference)."""
    from cicm.models.arrivals import forecast_arrivals
    from cicm.optimize.queue import arrival_bounds, fifo_backlog, task_bounds

    arrived = pd.Series(rows["flexible_arrived_core_hours"].to_numpy(float),
                        index=pd.DatetimeIndex(rows["hour"])).fillna(0.0)
    served = pd.Series(rows["flexible_cpu_cores"].to_numpy(float), index=arrived.index).fillna(0.0)
    recent = arrived.index >= day.planned_at - pd.Timedelta(hours=stages.BACKLOG_WINDOW_HOURS)
    backlog = fifo_backlog(arrived[recent].to_numpy(), served[recent].to_numpy())
    rel = ((arrived.index[recent] - hours[0]) / pd.Timedelta(hours=1)).to_numpy(float)
    keep = backlog > 0
    must, avail = task_bounds(len(hours), np.minimum(rel[keep], 0.0), np.ones(keep.sum()), backlog[keep],
                              rel[keep] + 24.0, options.planning_margin_hours)
    fc = forecast_arrivals(arrived, hours, quantile=options.arrival_quantile)
    m2, a2 = arrival_bounds(fc.core_hours, 24.0 - options.planning_margin_hours)
    return must + m2, avail + a2, float(fc.upper_core_hours[:len(day.hours)].sum() - fc.core_hours[:len(day.hours)].sum())


def test_the_campus_batch_of_queue_inputs_equals_each_cluster_alone():
    """queue_campus_clusters (numpy over the campus) gives what the per-cluster pandas path gave, whatever the
    row order; a cluster with a bad or missing history gets its own problem without touching the others."""
    from types import SimpleNamespace

    from cicm.optimize.inputs import PowerCurve

    rng = np.random.default_rng(7)
    tz = "America/Los_Angeles"
    day_hours = pd.date_range(pd.Timestamp("2022-06-15", tz=tz), periods=24, freq="h")
    day = SimpleNamespace(hours=day_hours, planned_at=day_hours[0] - pd.Timedelta(hours=6))
    hours = pd.date_range(day_hours[0], periods=42, freq="h")
    curve = PowerCurve(np.array([0.0, 1000.0]), np.array([100.0, 400.0]))
    frames, inputs = [], []
    for i in range(6):
        length = int(rng.integers(24 * 20, 24 * 80))
        idx = pd.date_range(day.planned_at.tz_convert("UTC") - pd.Timedelta(hours=length), periods=length, freq="h")
        arrived = rng.gamma(2.0, 20.0, length) * (rng.random(length) > 0.2)
        frame = pd.DataFrame({"cluster": f"c{i}", "hour": idx, "flexible_arrived_core_hours": arrived,
                              "flexible_cpu_cores": arrived * rng.uniform(0.6, 1.1, length)})
        if i == 1:
            frame = frame.drop(frame.index[rng.choice(length, length // 6, replace=False)])  # gaps
        if i == 2:
            frame.loc[frame.index[5], "flexible_arrived_core_hours"] = np.nan  # counts as 0
        if i == 4:
            frame.loc[frame.index[3], "flexible_arrived_core_hours"] = -1.0  # bad history
        frames.append(frame)
        inputs.append(SimpleNamespace(name=f"c{i}", inflexible_cpu_cores=np.full(24, 200.0),
                                      inflexible_upper_cpu_cores=np.full(24, 250.0),
                                      power_capped_capacity_cores=np.full(24, 900.0), power_curve=curve,
                                      fallback_reason=None))
    inputs.append(SimpleNamespace(**{**vars(inputs[0]), "name": "empty"}))  # no rows at all
    usage = pd.concat(frames, ignore_index=True)
    options = PlanOptions()
    for frame in (usage, usage.sample(frac=1.0, random_state=1)):
        built, extras, problems = stages.queue_campus_clusters(inputs, frame, day, hours, options)
        assert sorted(problems) == ["c4", "empty"]
        assert "negative" in str(problems["c4"]) and "no arrival history" in str(problems["empty"])
        assert [b.name for b in built] == ["c0", "c1", "c2", "c3", "c5"]
        for qc in built:
            rows = usage[usage["cluster"] == qc.name]
            must, avail, extra = _old_queue_cluster(inputs[int(qc.name[1])], rows, day, hours, options)
            np.testing.assert_allclose(qc.must_core_hours, np.minimum(np.maximum.accumulate(must), avail),
                                       rtol=1e-9, atol=1e-6)
            np.testing.assert_allclose(qc.avail_core_hours, avail, rtol=1e-9, atol=1e-6)
            assert extras[qc.name] == pytest.approx(extra, rel=1e-9, abs=1e-6)
        one, extra_one = stages.queue_cluster(inputs[0], usage[usage["cluster"] == "c0"].drop(columns="cluster"),
                                              day, hours, options)
        np.testing.assert_allclose(one.avail_core_hours, built[0].avail_core_hours, rtol=1e-12)
        assert extra_one == pytest.approx(extras["c0"], rel=1e-12)
