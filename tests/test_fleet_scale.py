"""Fleet scale: the generated fleets, the nightly telemetry ingestion, and the Dask runner's plan equal to the
in-process plan (a real local Dask cluster of several worker processes, through prefect-dask)."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cicm.config import load_fleet
from cicm.demo.scale_fleet import ZONE_TIMEZONES, scale_fleet, scale_usage_history, write_fleet_toml
from cicm.data.store import Store
from cicm.errors import InputError

N_CLUSTERS = 24


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory):
    from cicm.planning.scale import prepare_scale_run

    folder = tmp_path_factory.mktemp("scale")
    info = prepare_scale_run(folder, N_CLUSTERS, seed=3, clusters_per_campus=4)
    return folder, info


# ------------------------------------------------------------------------------------------- the generator


def test_scale_fleet_is_seeded_and_varied():
    a, b, c = scale_fleet(40, seed=1), scale_fleet(40, seed=1), scale_fleet(40, seed=2)
    assert a == b and a != c
    assert len(a.clusters()) == 40 and len(a.campuses) == 1
    capacities = np.array([cl.capacity_cores for cl in a.clusters()])
    assert capacities.max() / capacities.min() > 3  # scale varies (log-normal, sd 0.5)
    fleet = scale_fleet(20, seed=1, clusters_per_campus=2)
    assert [campus.grid_zone for campus in fleet.campuses[:8]] == ["AZPS", "BPAT", "CISO", "ERCO", "MISO", "NYIS",
                                                                   "PJM", "SOCO"]
    assert all(campus.timezone == ZONE_TIMEZONES[campus.grid_zone] for campus in fleet.campuses)


@pytest.mark.parametrize("args,field", [(["--clusters", "0"], "n_clusters"), (["--clusters", "3"], "out")])
def test_scale_generate_refuses_bad_input_by_name(tmp_path, args, field):
    from typer.testing import CliRunner

    from cicm.cli import app

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(app, ["scale", "generate", *args, "--out", str(blocker / "run")])
    assert result.exit_code == 1 and f"{field}:" in result.output
    assert blocker.read_text() == "not a folder"


def test_scale_fleet_round_trips_through_toml(tmp_path):
    fleet = scale_fleet(30, seed=4, clusters_per_campus=7)
    assert load_fleet(write_fleet_toml(fleet, tmp_path / "fleet.toml")) == fleet


@pytest.mark.parametrize("field,kwargs", [("n_clusters", {"n_clusters": 0}),
                                          ("clusters_per_campus", {"n_clusters": 5, "clusters_per_campus": 0})])
def test_scale_fleet_rejects_bad_sizes(field, kwargs):
    with pytest.raises(InputError) as err:
        scale_fleet(**kwargs)
    assert err.value.field == field


def test_generated_usage_keeps_local_daily_shape_and_phase():
    """Clusters copy a demo cluster moved to their own time zone: the daily shape follows local time, the phase
    in days differs, and the usage never exceeds capacity."""
    fleet = scale_fleet(20, seed=5, clusters_per_campus=10)  # 2 campuses: AZPS (Phoenix), BPAT (Los Angeles)
    usage = scale_usage_history(fleet, seed=5)
    first, twin = "c00000", "c00010"  # same template (demo cluster 0, in Los Angeles), different zones
    peaks = {}
    for name, campus in ((first, fleet.campuses[0]), (twin, fleet.campuses[1])):
        rows = usage[usage["cluster"] == name]
        local_hour = rows["hour"].dt.tz_convert(campus.timezone).dt.hour
        peaks[name] = rows.groupby(local_hour)["inflexible_cpu_cores"].mean().idxmax()
        capacity = fleet.cluster(name).capacity_cores
        assert (rows["inflexible_cpu_cores"] + rows["flexible_cpu_cores"] <= capacity + 1e-6).all()
    assert abs(peaks[first] - peaks[twin]) <= 1
    a = usage[usage["cluster"] == first]["flexible_cpu_cores"].to_numpy()
    b = usage[usage["cluster"] == twin]["flexible_cpu_cores"].to_numpy()
    assert not np.allclose(a / a.mean(), b / b.mean())  # different phase in days


# -------------------------------------------------------------------------------------------- ingestion


def _telemetry_dir(scale_run, tmp_path, change=None) -> Path:
    folder = tmp_path / "telemetry"
    shutil.copytree(scale_run[0] / "telemetry", folder)
    if change:
        usage = pd.read_parquet(folder / "usage.parquet")
        change(usage).to_parquet(folder / "usage.parquet", index=False)
    return folder


@pytest.mark.parametrize("field,change", [
    ("flexible_cpu_cores", lambda u: u.assign(flexible_cpu_cores=u["flexible_cpu_cores"].where(u.index != 5))),
    ("reserved_cpu_cores", lambda u: u.assign(reserved_cpu_cores=-u["reserved_cpu_cores"])),
    ("cluster", lambda u: pd.concat([u, u.iloc[:3]], ignore_index=True)),
    ("hour", lambda u: u.assign(hour=u["hour"].dt.tz_localize(None))),
    ("hour", lambda u: u.assign(hour=u["hour"] + pd.Timedelta(minutes=30))),
    ("inflexible_cpu_cores", lambda u: u.drop(columns="inflexible_cpu_cores")),
])
def test_bad_telemetry_is_refused_by_name_and_nothing_is_stored(scale_run, tmp_path, field, change):
    from cicm.planning.pipeline import ingest_new_telemetry

    folder = _telemetry_dir(scale_run, tmp_path, change)
    db = tmp_path / "db.duckdb"
    shutil.copy(scale_run[0] / "cicm.duckdb", db)
    fleet = load_fleet(scale_run[0] / "fleet.toml")
    with Store(db) as store:
        before = store.query("SELECT count(*) AS n, max(hour) AS newest FROM usage_history")
        with pytest.raises(InputError) as err:
            ingest_new_telemetry(store, str(folder), fleet, pd.Timestamp("2022-06-16", tz="UTC"))
        assert err.value.field == field
        pd.testing.assert_frame_equal(store.query("SELECT count(*) AS n, max(hour) AS newest FROM usage_history"),
                                      before)
        failed = store.query("SELECT status, message FROM runs WHERE kind = 'telemetry-ingest'")
        assert list(failed["status"]) == ["failed"] and field in failed["message"].iloc[0]


@pytest.mark.parametrize("field,change", [
    ("cluster", lambda u: u.assign(cluster=u["cluster"].where(u.index != 7, "not-ours"))),
    ("cluster", lambda u: u.assign(cluster=np.arange(len(u)))),
    ("cluster", lambda u: u.assign(cluster=u["cluster"].where(u.index != 7, ""))),
    ("hour", lambda u: u.assign(hour=u["hour"] + pd.Timedelta(days=400))),
    ("flexible_cpu_cores", lambda u: u.assign(flexible_cpu_cores=u["flexible_cpu_cores"].astype(str))),
    ("telemetry", lambda u: u.iloc[:0]),
])
def test_telemetry_must_belong_to_the_fleet_and_the_past(scale_run, tmp_path, field, change):
    from cicm.planning.ingest import read_telemetry_dir

    folder = _telemetry_dir(scale_run, tmp_path, change)
    if field == "telemetry":
        (folder / "power.parquet").unlink()
    with pytest.raises(InputError) as err:
        read_telemetry_dir(folder, load_fleet(scale_run[0] / "fleet.toml"), pd.Timestamp("2022-06-16", tz="UTC"))
    assert err.value.field == field


def test_a_refused_drop_degrades_the_plan_but_the_fleet_is_still_planned(scale_run, tmp_path):
    from cicm.planning.pipeline import PlanOptions, plan_day

    folder, info = scale_run
    bad = _telemetry_dir(scale_run, tmp_path, lambda u: u.assign(cluster="not-ours"))
    db = tmp_path / "db.duckdb"
    shutil.copy(folder / "cicm.duckdb", db)
    fleet = load_fleet(folder / "fleet.toml")
    with Store(db) as store:
        outcome = plan_day(store, fleet, pd.Timestamp(info["plan_date"]).date(),
                           PlanOptions(telemetry_dir=str(bad)))
        plans = store.query("SELECT count(*) AS n FROM current_vcc_status")["n"].iloc[0]
    assert outcome.status == "degraded"
    assert outcome.stages[0].status == "degraded" and "not-ours" in outcome.stages[0].detail
    assert plans == N_CLUSTERS


def test_a_failing_partition_is_recorded_and_the_store_stays_usable(scale_run, tmp_path):
    """Partitions that run elsewhere (here: a runner that fails after the store was let go) leave a failed plan
    run, no plan rows, and a store connection that works."""
    from cicm.planning.pipeline import PlanOptions, plan_day

    folder, info = scale_run
    db = tmp_path / "db.duckdb"
    shutil.copy(folder / "cicm.duckdb", db)

    def failing(jobs):
        with Store(db, read_only=True):  # the file can be opened by others meanwhile
            raise RuntimeError("worker lost")

    with Store(db) as store:
        with pytest.raises(RuntimeError, match="worker lost"):
            plan_day(store, load_fleet(folder / "fleet.toml"), pd.Timestamp(info["plan_date"]).date(),
                     PlanOptions(), run_partitions=failing, n_partitions=3)
        runs = store.query("SELECT status, message FROM runs WHERE kind = 'plan'")
        assert list(runs["status"]) == ["failed"] and "worker lost" in runs["message"].iloc[0]
        assert store.query("SELECT count(*) AS n FROM vccs")["n"].iloc[0] == 0


def test_ingestion_brings_in_the_night_and_is_idempotent(scale_run, tmp_path):
    from cicm.planning.pipeline import ingest_new_telemetry

    folder, info = scale_run
    db = tmp_path / "db.duckdb"
    shutil.copy(folder / "cicm.duckdb", db)
    night = pd.read_parquet(folder / "telemetry" / "usage.parquet")
    with Store(db) as store:
        before = store.query("SELECT count(*) AS n FROM usage_history")["n"].iloc[0]
        ingest_new_telemetry(store, str(folder / "telemetry"))
        ingest_new_telemetry(store, str(folder / "telemetry"))
        after = store.query("SELECT count(*) AS n, max(hour) AS newest FROM usage_history")
    assert after["n"].iloc[0] == before + len(night) == info["usage_rows"] + len(night)
    assert after["newest"].iloc[0] == night["hour"].max()


# ------------------------------------------------------------------------------------------------- runners


def test_fleet_files_are_read_by_content(tmp_path):
    path = write_fleet_toml(scale_fleet(12, seed=1, clusters_per_campus=6), tmp_path / "fleet.toml")
    first = load_fleet(path)
    stat = path.stat()
    path.write_text(path.read_text().replace('grid_zone = "AZPS"', 'grid_zone = "ERCO"'))
    import os

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: still read again
    second = load_fleet(path)
    assert first.campuses[0].grid_zone == "AZPS" and second.campuses[0].grid_zone == "ERCO"
    assert load_fleet(path) == second and load_fleet(path) is not second


def test_remote_dask_needs_a_prefect_api(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.nightly import shared_prefect_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(updates={PREFECT_API_URL: None}):
        with pytest.raises(InputError) as err:
            with shared_prefect_api(remote=True):
                pass
    assert err.value.field == "dask_address"


def test_choose_runner():
    from flows.nightly import DASK_AUTO_MIN_CLUSTERS, PlanOptions, choose_runner

    assert choose_runner(PlanOptions(runner="auto"), 10) == "local"
    assert choose_runner(PlanOptions(runner="auto", dask_address="tcp://127.0.0.1:8786"), 10) == "dask"
    assert choose_runner(PlanOptions(runner="dask"), 10) == "dask"
    assert choose_runner(PlanOptions(runner="local"), DASK_AUTO_MIN_CLUSTERS * 10) == "local"
    for field, options in (("runner", PlanOptions(runner="spark")), ("dask_workers", PlanOptions(dask_workers=0))):
        with pytest.raises(InputError) as err:
            choose_runner(options, 10)
        assert err.value.field == field


def test_partitions_keep_campuses_whole_and_in_order():
    from datetime import date

    from cicm.planning import stages
    from cicm.planning.pipeline import PlanOptions

    fleet = scale_fleet(23, seed=0, clusters_per_campus=3)
    days = stages.campus_days(fleet, date(2022, 6, 15))
    carbon = stages.CarbonResult(pd.DataFrame(), {}, {d.campus.name: "no-carbon-forecast: test" for d in days})
    for n in (1, 2, 3, 5, 100):
        jobs = stages.partition_jobs(days, carbon, date(2022, 6, 15), PlanOptions(), n)
        assert len(jobs) == min(n, len(days))
        assert [d.campus.name for job in jobs for d in job.days] == [d.campus.name for d in days]
        sizes = [sum(len(d.campus.clusters) for d in job.days) for job in jobs]
        assert max(sizes) - min(sizes) <= 2 * 3  # balanced to within a campus or two


TABLES = {"current_vccs": "cluster, hour", "current_vcc_status": "cluster", "load_forecasts": "cluster, hour",
          "load_forecast_days": "cluster", "power_models": "domain"}


def _plan_tables(db: Path) -> dict[str, pd.DataFrame]:
    with Store(db, read_only=True) as store:
        return {t: store.query(f"SELECT * EXCLUDE (run_id) FROM {t} ORDER BY {order}") for t, order in TABLES.items()}


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_dask_plan_equals_the_in_process_plan(scale_run, tmp_path, prefect_api):
    """The same flow with its campus partitions on Dask (a local cluster of 3 worker processes it starts, and a
    running 2-worker cluster given by its scheduler address) stores the same plan, bit for bit, as the in-process
    run; the partitions really ran as Prefect tasks."""
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    from flows.nightly import PARTITIONS_PER_WORKER, PlanOptions, run_nightly_plan

    from distributed import LocalCluster

    folder, info = scale_run
    outcomes = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        runs = {"local": PlanOptions(runner="local"), "dask": PlanOptions(runner="dask", dask_workers=3),
                "address": PlanOptions(runner="auto", dask_address=cluster.scheduler_address)}
        for name, options in runs.items():
            db = tmp_path / f"{name}.duckdb"
            shutil.copy(folder / "cicm.duckdb", db)
            options.telemetry_dir = str(folder / "telemetry")
            outcomes[name] = run_nightly_plan(pd.Timestamp(info["plan_date"]).date(), db, folder / "fleet.toml",
                                              options)
    local = _plan_tables(tmp_path / "local.duckdb")
    for name in ("dask", "address"):
        other = _plan_tables(tmp_path / f"{name}.duckdb")
        for table in TABLES:
            assert len(local[table]) > 0, table
            pd.testing.assert_frame_equal(local[table], other[table], check_exact=True, obj=f"{name}: {table}")
        assert outcomes[name].status == outcomes["local"].status
    status = local["current_vcc_status"]
    assert len(status) == N_CLUSTERS and (status["status"] == "shaped").any()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="plan-partition")))
    n_campuses = info["campuses"]  # 3 local workers, then 2 workers behind the address: 4 partitions per worker
    assert len(runs) == min(PARTITIONS_PER_WORKER * 3, n_campuses) + min(PARTITIONS_PER_WORKER * 2, n_campuses)
    assert all(r.state.is_completed() for r in runs)


# ------------------------------------------------------------------------------------------ same plans


@pytest.mark.parametrize("block", [300, 5])
def test_plan_equals_the_recorded_plan(scale_run, monkeypatch, block):
    """The in-process plan of the 24-cluster scale run equals the one recorded before the partition reads and the
    load forecasts were batched (tests/golden/make_fleet_plan_golden.py): every number to 1e-9 relative, every
    text (statuses, reasons, JSON parameters and models as text only where they are not numbers) the same; whether the
    partition reads its 6 campuses in one query or campus by campus (``READ_BLOCK_CLUSTERS``)."""
    import json
    import sys

    from cicm.planning import stages

    monkeypatch.setattr(stages, "READ_BLOCK_CLUSTERS", block)

    sys.path.insert(0, str(Path(__file__).parent / "golden"))
    from make_fleet_plan_golden import GOLDEN, long_form, plan_tables

    folder, _ = scale_run
    want = pd.read_parquet(GOLDEN)
    got = long_form(plan_tables(folder))
    assert list(got[["table", "row", "column"]].itertuples(index=False)) == \
        list(want[["table", "row", "column"]].itertuples(index=False))
    numeric = want["number"].notna() | got["number"].notna()
    np.testing.assert_allclose(got.loc[numeric, "number"], want.loc[numeric, "number"], rtol=1e-9, atol=1e-12)
    as_json = want["column"].isin(["params", "model"])  # JSON numbers: least-squares fits differ in the last bits
    text = ~numeric & ~as_json                           # across CPUs' BLAS kernels, so they compare to 1e-9
    bad = got.loc[text, "value"] != want.loc[text, "value"]
    assert not bad.any(), want.loc[text][bad.to_numpy()].head()

    def close(a, b):
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return isinstance(b, list) and len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
        if isinstance(a, float) and isinstance(b, float):
            return bool(np.isclose(a, b, rtol=1e-9, atol=1e-12, equal_nan=True))
        return a == b

    for g, w in zip(got.loc[as_json, "value"], want.loc[as_json, "value"]):
        assert close(json.loads(g), json.loads(w)), (g, w)


def test_seeding_in_several_runs_stores_the_same_history(tmp_path):
    """`seed_scale_store` writes the history in runs of at most ``clusters_per_run`` clusters (bounded memory); the
    stored rows are those of one run, and every run is recorded as succeeded."""
    from cicm.planning.scale import seed_scale_store

    fleet = scale_fleet(12, seed=2, clusters_per_campus=4)
    tables = {}
    for per_run in (4, 100):
        with Store(tmp_path / f"s{per_run}.duckdb") as store:
            info = seed_scale_store(store, fleet, seed=2, clusters_per_run=per_run)
            assert len(info["runs"]) == (3 if per_run == 4 else 1)
            runs = store.runs()
            assert set(runs.loc[runs["run_id"].isin(info["runs"]), "status"]) == {"ok"}
            tables[per_run] = {t: store.query(f"SELECT * EXCLUDE (run_id) FROM {t} ORDER BY ALL")
                               for t in ("usage_history", "power_telemetry", "carbon_actuals")}
    assert info["usage_rows"] == len(tables[100]["usage_history"]) > 0
    for table, frame in tables[100].items():
        pd.testing.assert_frame_equal(tables[4][table], frame, obj=table)
