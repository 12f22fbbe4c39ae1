"""The nightly planning flow: one Prefect flow run per target day, one task per stage, over the plain pipeline
(:mod:`cicm.planning.pipeline`), plus its schedule and deployment.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import replace
from datetime import date
from pathlib import Path

import pandas as pd

import flows  # noqa: F401  (configures Prefect before it is imported)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from cicm.clikit import reinstate_interrupt_handler
from cicm.config import Fleet, load_fleet
from cicm.data.store import Store
from cicm.ops.metrics import write_plan_metrics
from cicm.planning import stages
from cicm.planning.pipeline import PlanOptions, PlanOutcome, check_slo, ensure_telemetry, fetch_day_carbon, plan_day

__all__ = ["PlanOptions", "PlanOutcome", "plan_day", "run_nightly_plan", "nightly_plan", "scheduled_nightly_plan",
           "nightly_deployment"]

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


#: Prefect Secret blocks that stand in for a provider's environment variable when it is unset.
SECRET_BLOCKS = {"ELECTRICITYMAPS_TOKEN": "electricitymaps-token", "WATTTIME_USERNAME": "watttime-username",
                 "WATTTIME_PASSWORD": "watttime-password"}
PROVIDER_ENV = {"electricitymaps": ("ELECTRICITYMAPS_TOKEN",), "watttime": ("WATTTIME_USERNAME", "WATTTIME_PASSWORD")}


def load_provider_secrets(fleet: Fleet, options: PlanOptions) -> list[str]:
    """Put each credential the fleet's live providers need and the environment lacks into this process's
    environment from its Prefect Secret block (``electricitymaps-token``, ``watttime-username``,
    ``watttime-password``), if the Prefect API holds one. The value is never logged, stored or returned: the
    names of the variables filled are. A missing block leaves the variable unset (the provider then says so)."""
    from prefect.blocks.system import Secret

    needed = {env for campus in fleet.campuses for env in PROVIDER_ENV.get(campus.provider(options.provider), ())}
    filled = []
    for env in sorted(needed):
        if os.environ.get(env, "").strip():
            continue
        try:
            value = Secret.load(SECRET_BLOCKS[env]).get()
        except (ValueError, KeyError):  # no such block
            continue
        if isinstance(value, str) and value.strip():
            os.environ[env] = value
            filled.append(env)
    return filled


partition_task = task(stages.plan_partition_from_file, name="plan-partition", cache_policy=NO_CACHE)

# Where the plan runs (in process, or this flow on Dask) is decided in cicm.planning.runner; re-exported here.
from cicm.planning.runner import DASK_AUTO_MIN_CLUSTERS, DASK_AUTO_MIN_CORES, PARTITIONS_PER_WORKER  # noqa: E402,F401
from cicm.planning.runner import choose_runner  # noqa: E402


def _submit_partitions(db_path: str):
    def run(jobs: list[stages.PartitionJob]) -> list[stages.PartitionResult]:
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
    filled = load_provider_secrets(fleet, options)
    if filled:
        get_run_logger().info("credentials %s read from Prefect Secret blocks", ", ".join(filled))
    # Prefect's SIGTERM handler (its TerminationSignal) is swapped back for `cicm plan`'s own while the plan runs:
    # raised inside a DuckDB query, Prefect's became 'RuntimeError: Query interrupted' and the signal was lost.
    with reinstate_interrupt_handler(), Store(db_path) as store:
        outcome = plan_day(store, fleet, plan_date, options, fetch=fetch, telemetry=telemetry_task, slo=slo_task,
                           run_partitions=_submit_partitions(db_path) if on_dask else None,
                           n_partitions=n_partitions)
    create_markdown_artifact(_markdown(outcome), key=f"nightly-plan-{plan_date}", description="nightly plan")
    get_run_logger().info("plan %s stored as run %s (%s)", plan_date, outcome.run_id, outcome.status)
    write_plan_metrics(outcome)  # the textfile at $CICM_METRICS_TEXTFILE, if set (docs/metrics.md)
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
