"""The nightly planning flow: one Prefect flow run per target day, one task per stage.

Stages: telemetry (import the demo telemetry when the store has none) → carbon forecasts per campus (retried) →
SLO feedback (its own run) → power models → load forecasts → VCC program per campus, all written in one
transaction → markdown artifact.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Callable

import pandas as pd

import cicm.flows  # noqa: F401  (configures Prefect before it is imported)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from cicm.config import Fleet, load_fleet
from cicm.data.store import Store
from cicm.errors import InputError, ProviderError
from cicm.flows import plan_stages as stages
from cicm.flows.ingest import import_demo_telemetry, ingest_telemetry, read_telemetry_dir


@dataclass
class PlanOptions:
    provider: str = "trace"
    base_url: str | None = None
    csv_path: str | None = None
    seed: int = 0
    gamma: float = 0.05
    lambda_e: float = 1.0
    lambda_p: float = 0.0
    delta_min: float = -1.0
    delta_max: float = 1.0
    ramp_limit: float | None = None
    solver: str = "HIGHS"
    min_forecast_value_pct: float = 3.0
    fetch_retries: int = 2
    fetch_retry_delay_seconds: float = 2.0
    runner: str = "auto"  # "local" | "dask" | "auto" (see choose_runner)
    dask_address: str | None = None  # tcp://scheduler:8786; None with runner dask: a local cluster
    dask_workers: int = 2  # worker processes of a local Dask cluster
    telemetry_dir: str | None = None  # new usage*/power*.parquet to ingest before planning
    program: str = "queue"  # "queue" (the queue-aware program) | "ceiling" (CICM's VCC program, a baseline)
    horizon_hours: int = 48  # queue program: look-ahead from planning time (only the planning day is committed)
    planning_margin_hours: float = 6.0  # queue program: deadlines planned this much early
    arrival_quantile: float = 0.9  # queue program: upper quantile of arrivals behind the VCC's margin


@dataclass
class PlanOutcome:
    plan_date: date
    run_id: str | None
    status: str  # "ok" | "degraded" | "failed"
    stages: list[stages.StageReport] = field(default_factory=list)
    clusters: pd.DataFrame = field(default_factory=pd.DataFrame)
    message: str = ""
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each step of plan_day


def ingest_new_telemetry(store: Store, folder: str, fleet: Fleet | None = None,
                         now: pd.Timestamp | None = None) -> stages.StageReport:
    """The nightly ingestion of the telemetry the monitoring pipeline dropped in `folder` (one run). A refused
    drop raises an InputError naming the field, and is recorded as a failed telemetry-ingest run."""
    try:
        usage, power = read_telemetry_dir(folder, fleet, now)
    except InputError as exc:
        store.failed_run("telemetry-ingest", {"source": str(folder)}, None, exc)
        raise
    info = ingest_telemetry(store, usage, power, source=str(folder))
    return stages.StageReport("telemetry", "ran", f"ingested {info['usage_rows']} usage and {info['power_rows']}"
                                                  f" power rows from {folder} (run {info['run_id']})")


def ensure_telemetry(store: Store, fleet: Fleet, seed: int, telemetry_dir: str | None = None) -> stages.StageReport:
    if telemetry_dir:  # a bad drop must not cost the fleet its plan: plan on the stored history, and say so
        try:
            return ingest_new_telemetry(store, telemetry_dir, fleet, pd.Timestamp.now(tz="UTC"))
        except InputError as exc:
            return stages.StageReport("telemetry", "degraded", f"refused {telemetry_dir} ({exc}); planned on the "
                                                               "stored history")
    names = [c.name for c in fleet.clusters()]
    if store.has_usage(names):
        return stages.StageReport("telemetry", "ran", "store already holds telemetry for every cluster")
    info = import_demo_telemetry(store, fleet, seed=seed)
    return stages.StageReport("telemetry", "ran", f"imported {info['usage_rows']} usage rows (run {info['run_id']})")


def fetch_day_carbon(day: stages.CampusDay, options: PlanOptions) -> pd.DataFrame:
    extra = {}
    if options.base_url:
        extra["base_url"] = options.base_url
    if options.csv_path:
        extra["path"] = options.csv_path
    now = None if options.provider == "trace" else pd.Timestamp.now(tz="UTC")
    end = stages.carbon_window_end(day, options)
    try:
        return stages.fetch_campus_carbon(day, options.provider, options.seed, now=now, end=end, **extra)
    except (InputError, ProviderError):
        if end <= day.hours[-1] + pd.Timedelta(hours=1):
            raise
    # the provider cannot reach the look-ahead: plan with the day alone (the program's note says so)
    return stages.fetch_campus_carbon(day, options.provider, options.seed, now=now, **extra)


def plan_day(store: Store, fleet: Fleet, plan_date: date, options: PlanOptions,
             fetch: Callable[[stages.CampusDay, PlanOptions], pd.DataFrame] = fetch_day_carbon,
             telemetry: Callable[..., stages.StageReport] = ensure_telemetry,
             slo: Callable[[Store, Fleet, date], stages.StageReport] | None = None,
             run_partitions: Callable[[list[stages.PartitionJob]], list[dict]] | None = None,
             n_partitions: int = 1) -> PlanOutcome:
    """The nightly plan's body, stage by stage, as plain calls. The flow passes its Prefect tasks in.

    The SLO check of the last judged days runs in its own run before the plan, so its verdicts (shaping off for a
    week) bind this plan, and an SLO failure cannot stop the plan from being stored.

    Models and programs run as partitions of campuses that only read the store. By default they run here on
    `store`; `run_partitions` runs them elsewhere (Dask workers), which open the file read-only while this
    process has let go of it. Everything is then written here, by the one writer, in one transaction.
    """
    slo = slo or check_slo
    clock = _Clock()
    reports = [telemetry(store, fleet, options.seed, options.telemetry_dir)]
    clock.lap("telemetry")
    days = stages.campus_days(fleet, plan_date)
    fetched, by_zone_day = {}, {}
    for day in days:  # campuses in one zone and time zone share their forecast: fetched once
        key = stages.zone_day_key(day)
        if key not in by_zone_day:
            try:
                by_zone_day[key] = fetch(day, options)
            except Exception as exc:  # noqa: BLE001 - collect_carbon decides what is a fallback and what a bug
                by_zone_day[key] = exc
        fetched[day.campus.name] = by_zone_day[key]
    carbon = stages.collect_carbon(days, fetched)
    reports.append(stages.carbon_report(carbon, days))
    clock.lap("carbon-forecast")
    reports.append(slo(store, fleet, plan_date))
    clock.lap("slo-feedback")
    params = {"fleet": fleet.name, **options.__dict__}
    try:
        if run_partitions is None:
            result = stages.plan_clusters(store, fleet, plan_date, days, carbon, options, None, n_partitions)
        else:
            with store.released():
                result = stages.plan_clusters(None, fleet, plan_date, days, carbon, options, run_partitions,
                                              n_partitions)
    except BaseException as exc:  # interrupts and cancellations too: the run log must show the attempt
        try:
            store.failed_run("plan", params, plan_date, exc)
        except Exception:  # noqa: BLE001 - an unreachable store must not hide the error that stopped the plan
            pass
        raise
    clock.lap("models-and-programs")
    with store.run("plan", params, plan_date=plan_date) as run:
        if not carbon.forecasts.empty:
            store.write_carbon_forecast(carbon.forecasts, run.run_id)
        reports.extend(result.reports)
        store.replace_plan(plan_date, result.vccs, result.status, run.run_id)
        for table, frame in result.extra_tables.items():
            store.upsert(table, frame, run.run_id)
        run.status = "degraded" if any(r.status in ("degraded", "failed") for r in reports) else "ok"
        summary = stages.cluster_summary(result.status)
        run.summary = {"stages": [r.__dict__ for r in reports], "clusters": summary.to_dict("records"),
                       "seconds": {**clock.seconds, **result.seconds}}
    clock.lap("store-write")
    return PlanOutcome(plan_date, run.run_id, run.status, reports, summary, seconds={**clock.seconds,
                                                                                       **result.seconds})


class _Clock:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self._last = now


def check_slo(store: Store, fleet: Fleet, plan_date: date) -> stages.StageReport:
    from cicm.flows.slo import slo_stage

    try:
        result = slo_stage(store, fleet, plan_date)
    except Exception as exc:  # noqa: BLE001 - reported and stored with the run; the plan still goes ahead
        return stages.StageReport("slo-feedback", "failed", f"{type(exc).__name__}: {exc}")
    return stages.StageReport("slo-feedback", "ran", result["summary"])


telemetry_task = task(ensure_telemetry, name="telemetry", cache_policy=NO_CACHE)
fetch_carbon_task = task(fetch_day_carbon, name="fetch-carbon", cache_policy=NO_CACHE)
slo_task = task(check_slo, name="slo-feedback", cache_policy=NO_CACHE)


MARKDOWN_MAX_CLUSTERS = 200


def _markdown(outcome: PlanOutcome) -> str:
    lines = [f"# Nightly plan {outcome.plan_date}", "", f"run `{outcome.run_id}`, status **{outcome.status}**", ""]
    lines += ["| stage | status | detail |", "|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.detail} |" for s in outcome.stages]
    if not outcome.clusters.empty:
        table = outcome.clusters.head(MARKDOWN_MAX_CLUSTERS).round(1).astype(str)
        lines += ["", "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
        if len(outcome.clusters) > MARKDOWN_MAX_CLUSTERS:
            lines += ["", f"… and {len(outcome.clusters) - MARKDOWN_MAX_CLUSTERS} more clusters: `cicm vcc show`"]
    return "\n".join(lines)


partition_task = task(stages.plan_partition_from_file, name="plan-partition", cache_policy=NO_CACHE)

# "auto" and a local Dask cluster (docs/scale.md): on 2 cores a local cluster never paid (10,000 clusters: 63.6 s
# against 62.7 s in-process; it costs ~10-15 s to start and its workers share the flow's 2 cores). It is chosen
# only for big fleets on machines with cores to spare; a given --dask-address always means Dask.
DASK_AUTO_MIN_CLUSTERS = 20_000
DASK_AUTO_MIN_CORES = 8
PARTITIONS_PER_WORKER = 4


def choose_runner(options: PlanOptions, n_clusters: int) -> str:
    """'dask' or 'local'. auto: Dask when a scheduler address is given or the fleet is large."""
    if options.runner not in ("auto", "local", "dask"):
        from cicm.errors import InputError

        raise InputError("runner", f"must be auto, local or dask, got {options.runner!r}")
    if isinstance(options.dask_workers, bool) or not isinstance(options.dask_workers, int) or options.dask_workers < 1:
        from cicm.errors import InputError

        raise InputError("dask_workers", f"must be a positive integer, got {options.dask_workers!r}")
    if options.runner != "auto":
        return options.runner
    if options.dask_address:
        return "dask"
    big = n_clusters >= DASK_AUTO_MIN_CLUSTERS and (os.cpu_count() or 1) >= DASK_AUTO_MIN_CORES
    return "dask" if big else "local"


def _submit_partitions(db_path: str):
    def run(jobs: list[stages.PartitionJob]) -> list[dict]:
        from prefect.futures import wait

        futures = [partition_task.submit(db_path, job) for job in jobs]
        wait(futures)  # all of them, even if one failed: their read-only handles must be closed before we write
        return [future.result() for future in futures]

    return run


@flow(name="nightly-plan", flow_run_name="nightly-plan-{plan_date}")
def nightly_plan(plan_date: date, db_path: str, fleet_path: str | None = None,
                 options: PlanOptions | None = None, n_partitions: int = 1) -> PlanOutcome:
    """The nightly plan. Under a DaskTaskRunner (see run_nightly_plan) the campus partitions are tasks on the
    Dask workers; otherwise they run here."""
    from prefect.context import get_run_context

    options = options or PlanOptions()
    fleet = load_fleet(fleet_path)
    fetch = fetch_carbon_task.with_options(
        retries=options.fetch_retries, retry_delay_seconds=options.fetch_retry_delay_seconds
    )
    on_dask = type(get_run_context().task_runner).__name__ == "DaskTaskRunner"
    with Store(db_path) as store:
        outcome = plan_day(store, fleet, plan_date, options, fetch=fetch, telemetry=telemetry_task, slo=slo_task,
                           run_partitions=_submit_partitions(db_path) if on_dask else None,
                           n_partitions=n_partitions)
    create_markdown_artifact(_markdown(outcome), key=f"nightly-plan-{plan_date}", description="nightly plan")
    get_run_logger().info("plan %s stored as run %s (%s)", plan_date, outcome.run_id, outcome.status)
    return outcome


def dask_worker_count(options: PlanOptions) -> int:
    """Workers of the Dask cluster the plan will run on: a remote cluster has as many as its operators gave it."""
    if not options.dask_address:
        return options.dask_workers
    from distributed import Client

    try:
        with Client(options.dask_address, timeout="30s") as client:
            return max(1, len(client.scheduler_info().get("workers", {})))
    except (OSError, TimeoutError) as exc:
        from cicm.errors import InputError

        raise InputError("dask_address", f"no Dask scheduler at {options.dask_address}: {exc}") from exc


def dask_task_runner(options: PlanOptions):
    """prefect-dask's DaskTaskRunner: on the scheduler at `dask_address`, or on a local cluster of worker
    processes (one thread each: the models and HiGHS are CPU-bound and hold the GIL in places)."""
    from prefect_dask import DaskTaskRunner

    if options.dask_address:
        return DaskTaskRunner(address=options.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": options.dask_workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": ":0"})


def run_nightly_plan(plan_date: date, db_path: Path | str, fleet_path: Path | str | None = None,
                     options: PlanOptions | None = None) -> PlanOutcome:
    options = options or PlanOptions()
    fleet = load_fleet(fleet_path)
    args = (plan_date, str(Path(db_path).resolve()), str(fleet_path) if fleet_path else None, options)
    if choose_runner(options, len(fleet.clusters())) == "local":
        return nightly_plan(*args)
    if options.runner == "auto" and not options.dask_address:  # a big fleet on a big machine: use its cores
        options = replace(options, dask_workers=max(options.dask_workers, os.cpu_count() or 1))
    with shared_prefect_api(remote=bool(options.dask_address) and not _is_loopback(options.dask_address)):
        return nightly_plan.with_options(task_runner=dask_task_runner(options))(
            *args, n_partitions=PARTITIONS_PER_WORKER * dask_worker_count(options))


def _is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "127.0.0.1", "::1")


@contextmanager
def shared_prefect_api(remote: bool = False):
    """Dask workers report their task runs to the flow's Prefect API, which they find in PREFECT_API_URL. A
    configured API (a Prefect server, or a test harness) is handed to them as it is. Offline there is none (each
    process would start its own ephemeral server, ~10 s each), so one local server is started for the flow and
    its local workers."""
    import os

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, started = PREFECT_API_URL.value(), None
    if not url and remote:
        from cicm.errors import InputError

        raise InputError("dask_address", "workers on other machines report to a Prefect API: set PREFECT_API_URL "
                                         "to a Prefect server they can reach")
    if not url:
        started = SubprocessASGIServer()
        started.start()
        url = started.api_url
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:  # a server started here stops at exit, after the flow's last log batch is sent
        if previous is None:
            del os.environ["PREFECT_API_URL"]
        else:
            os.environ["PREFECT_API_URL"] = previous


NIGHTLY_CRON = "0 18 * * *"


def earliest_campus_timezone(fleet: Fleet) -> str:
    """The campus whose day starts first (the most eastern): the nightly run must finish before its midnight."""
    probe = pd.Timestamp("2022-01-15")
    return min((c.timezone for c in fleet.campuses), key=lambda tz: probe.tz_localize(tz).tz_convert("UTC"))


def tomorrow_in(tz: str, now: pd.Timestamp | None = None) -> date:
    now = now if now is not None else pd.Timestamp.now(tz="UTC")
    return (now.tz_convert(tz) + pd.Timedelta(days=1)).date()


@flow(name="nightly-plan-scheduled", flow_run_name="nightly-plan-scheduled")
def scheduled_nightly_plan(db_path: str, fleet_path: str | None = None, provider: str = "trace",
                           telemetry_dir: str | None = None, runner: str = "auto",
                           dask_address: str | None = None) -> PlanOutcome:
    """What the deployment runs every evening: plan tomorrow (in the earliest campus's time zone)."""
    fleet = load_fleet(fleet_path)
    options = PlanOptions(provider, telemetry_dir=telemetry_dir, runner=runner, dask_address=dask_address)
    return run_nightly_plan(tomorrow_in(earliest_campus_timezone(fleet)), db_path, fleet_path, options)


def nightly_deployment(db_path: str, fleet_path: str | None = None):
    """A Prefect deployment with a nightly cron at 18:00 in the earliest campus's evening."""
    from prefect.schedules import Cron

    fleet = load_fleet(fleet_path)
    return scheduled_nightly_plan.to_deployment(
        name="nightly",
        parameters={"db_path": db_path, "fleet_path": fleet_path},
        schedules=[Cron(NIGHTLY_CRON, timezone=earliest_campus_timezone(fleet))],
        description="Carbon-aware day-ahead plan for tomorrow",
        _sync=True,  # always the deployment, even when called under a running event loop
    )
