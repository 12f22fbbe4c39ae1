"""``cicm agent``: the enforcement agent's command line (the lead mounts ``agent_app``)."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from cicm.clikit import ExitCode, db_option, fail, fleet_option
from cicm.errors import InputError

agent_app = typer.Typer(no_args_is_help=True,
                        help="The enforcement agent: applies each hour's VCC through the ecovisor's HTTP API.")
console = Console(width=None if sys.stdout.isatty() else 160, stderr=False)

TOKEN_ENV = "CICM_ECOVISOR_TOKEN"


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    return f"{v:,.0f}" if isinstance(v, float) else str(v)


def _default_audit_file(db: Path | None, plan_file: Path | None, cluster: str) -> Path:
    from cicm.paths import home_dir

    if db is not None:
        return db.with_name(f"{db.name}.agent-{cluster}.jsonl")
    return home_dir() / f"agent-{cluster}.audit.jsonl"


def build_agent(*, cluster: str, ecovisor: str | None, token: str | None, db: Path | None, plan_file: Path | None,
                audit_file: Path | None, fleet: Path | None, flexible: list[str], flexible_pattern: str,
                cluster_cores_per_core: float | None, on_missing_plan: str, max_plan_age_hours: float | None,
                battery: bool, battery_hours: int, retry_base_s: float, retry_max_s: float,
                reconcile_every_s: float, request_retries: int = 2, clock=None, correction: bool = True,
                max_backlog_age_hours: float = 2.0, enforce: str = "ecovisor", slurm_partition: str = "flex",
                slurm_inflexible: tuple[str, ...] | list[str] = (), slurm_conf: Path | None = None,
                slurm_deadline_slack_s: float = 600.0, slurm_lift_on_exit: bool = True, slurm_json: bool = True):
    """Wire an Agent from CLI-style options (also used by tests). With a store, queue plans are corrected every
    hour from the usage history's backlog (``correction``); a plan file is applied as it is. ``enforce``:
    ``ecovisor`` (power caps of flexible containers) or ``slurm`` (the flexible partition's MaxCPUsPerNode; the
    backlog is then Slurm's queue, with the usage history's arrivals)."""
    from cicm.store import new_run_id
    from cicm.enforce.agent import Agent, AgentConfig
    from cicm.enforce.audit import JsonlAudit, StoreAudit
    from cicm.enforce.backlog import StoreBacklogSource
    from cicm.enforce.client import EcovisorClient
    from cicm.enforce.clock import RealClock
    from cicm.enforce.plans import FilePlanSource, StorePlanSource
    from cicm.paths import default_db_path

    if db is not None and plan_file is not None:
        raise InputError("plan-file", "give either --db or --plan-file, not both")
    if enforce not in ("ecovisor", "slurm"):
        raise InputError("enforce", f"must be 'ecovisor' or 'slurm', not {enforce!r}")
    if enforce == "ecovisor" and not ecovisor:
        raise InputError("ecovisor", "the ecovisor's URL is needed with --enforce ecovisor")
    capacity = None
    cluster_config = None  # the fleet's entry: capacity, and the power domains the correction's curve needs
    zone = None  # its campus's grid zone: the correction's newest carbon forecast
    campus_battery_kwh = None  # its campus's battery (fleet file): the storage plan's scale to the app's battery
    try:
        from cicm.config import load_fleet

        known = load_fleet(fleet)
        cluster_config = known.cluster(cluster)
        campus_of = known.campus_of(cluster)
        zone = campus_of.grid_zone
        if campus_of.battery is not None:  # storage plans are in campus kW: scale them to the app's battery
            campus_battery_kwh = float(campus_of.battery.capacity_kwh)
    except InputError:
        if fleet is not None:
            raise
    if cluster_cores_per_core is None and cluster_config is not None:
        capacity = float(cluster_config.capacity_cores)
    config = AgentConfig(
        cluster=cluster, flexible=tuple(n for item in flexible for n in item.split(",") if n),
        flexible_pattern=flexible_pattern, cluster_cores_per_core=cluster_cores_per_core, capacity_cores=capacity,
        on_missing_plan=on_missing_plan, max_plan_age_hours=max_plan_age_hours, battery=battery,
        battery_hours=battery_hours, retry_base_s=retry_base_s, retry_max_s=retry_max_s,
        reconcile_every_s=reconcile_every_s, correction=correction, max_backlog_age_hours=max_backlog_age_hours,
        campus_battery_kwh=campus_battery_kwh,
    )
    slurm = None
    if enforce == "slurm":
        from cicm.enforce.slurm import SlurmAdmission, SlurmClient, SlurmConfig

        inflexible = tuple(n for item in slurm_inflexible for n in item.split(",") if n)
        slurm = SlurmAdmission(SlurmClient(slurm_conf, use_json=slurm_json), SlurmConfig(
            partition=slurm_partition, inflexible_partitions=inflexible, cluster_cores_per_cpu=cluster_cores_per_core,
            deadline_slack_s=slurm_deadline_slack_s, lift_on_exit=slurm_lift_on_exit))
    run_id = new_run_id("agent")
    params = {"cluster": cluster, "ecovisor": ecovisor, "plan_file": str(plan_file) if plan_file else None,
              "enforce": enforce, **({"slurm": slurm.describe()} if slurm is not None else {}),
              **{k: v for k, v in config.__dict__.items() if k != "cluster"}}
    backlog: Any = None  # a cicm.enforce.backlog.BacklogSource, or None: no hourly correction
    plans: FilePlanSource | StorePlanSource
    audit: JsonlAudit | StoreAudit
    if plan_file is not None:
        plans = FilePlanSource(plan_file, cluster)
        audit = JsonlAudit(audit_file or _default_audit_file(None, plan_file, cluster), run_id)
    else:
        db = db or default_db_path()
        plans = StorePlanSource(db, cluster, cluster_config, zone)
        audit = StoreAudit(db, audit_file or _default_audit_file(db, None, cluster), run_id, params)
        backlog = StoreBacklogSource(db, cluster) if correction else None
    clock = clock or RealClock()
    if slurm is not None and correction:  # the live queue; arrivals and served usage from the usage history
        from cicm.enforce.slurm import SlurmBacklogSource

        to_agent = getattr(clock, "to_agent", None)
        backlog = SlurmBacklogSource(slurm.client, slurm_partition, cluster_cores_per_cpu=cluster_cores_per_core,
                                     capacity_cores=capacity, history=backlog, wall_to_agent=to_agent,
                                     agent_seconds_per_wall_second=float(getattr(clock, "rate", 1.0)))
    client = EcovisorClient(ecovisor, token, retries=request_retries) if ecovisor else None
    return Agent(config, client, plans, audit, clock, backlog=backlog, slurm=slurm)


@agent_app.command("run")
def run(
    cluster: str = typer.Option(..., "--cluster", help="the cluster this agent enforces"),
    ecovisor: Optional[str] = typer.Option(None, "--ecovisor", help="ecovisor base URL, e.g. http://127.0.0.1:8700 "
                                                                    "(needed with --enforce ecovisor)"),
    enforce: str = typer.Option("ecovisor", "--enforce", help="ecovisor (power caps of flexible containers) | slurm "
                                                              "(MaxCPUsPerNode of the flexible partition)"),
    slurm_partition: str = typer.Option("flex", "--slurm-partition", help="the flexible work's Slurm partition"),
    slurm_inflexible: List[str] = typer.Option([], "--slurm-inflexible",
                                               help="inflexible partition(s), never limited; repeat or comma-separate"),
    slurm_conf: Optional[Path] = typer.Option(None, "--slurm-conf", help="slurm.conf (default: $SLURM_CONF or "
                                                                         "Slurm's own)"),
    slurm_deadline_slack_s: float = typer.Option(600.0, "--slurm-deadline-slack-s",
                                                 help="release a job whose latest start is before the next pass + this"),
    slurm_lift_on_exit: bool = typer.Option(True, "--slurm-lift-on-exit/--slurm-keep-on-exit",
                                            help="a stopping agent (not --once) lifts the limit"),
    once: bool = typer.Option(False, "--once", help="one pass (reconcile the current hour) and exit"),
    db: Optional[Path] = db_option("read VCCs from this store (default: var/cicm.duckdb, or $CICM_HOME/cicm.duckdb)"),
    plan_file: Optional[Path] = typer.Option(None, "--plan-file", help="read VCCs from a `cicm vcc show --json` file"),
    audit_file: Optional[Path] = typer.Option(None, "--audit-file",
                                              help="JSONL audit (plan-file mode) or spool while the store is locked"),
    fleet: Optional[Path] = fleet_option(),
    flexible: List[str] = typer.Option([], "--flexible", help="flexible container name(s); repeat or comma-separate"),
    flexible_pattern: str = typer.Option("batch-*", "--flexible-pattern",
                                         help="glob for flexible containers when --flexible is not given"),
    cluster_cores_per_core: Optional[float] = typer.Option(
        None, "--cluster-cores-per-core", help="cluster cores one container core stands for (default: capacity / "
                                               "all the app's container cores; 1 when the containers are the cluster)"),
    on_missing_plan: str = typer.Option("lift", "--on-missing-plan",
                                        help="lift | keep caps when there is no usable VCC"),
    max_plan_age_hours: float = typer.Option(48.0, "--max-plan-age-hours", help="older plans count as stale (0: off)"),
    battery: bool = typer.Option(True, "--battery/--no-battery", help="drive the app's virtual battery"),
    battery_hours: int = typer.Option(4, "--battery-hours",
                                      help="charge in the n cleanest, discharge in the n dirtiest hours"),
    retry_base_s: float = typer.Option(5.0, "--retry-base-s"),
    retry_max_s: float = typer.Option(300.0, "--retry-max-s"),
    reconcile_every_s: float = typer.Option(3600.0, "--reconcile-every-s", help="re-check within the hour this often"),
    correction: bool = typer.Option(True, "--correction/--no-correction",
                                    help="queue plans: re-plan every hour from the live backlog (store usage "
                                         "history); never above the plan unless a deadline needs it"),
    max_backlog_age_hours: float = typer.Option(2.0, "--max-backlog-age-hours",
                                                help="an older backlog is not live: apply the plan as it is"),
    clock: str = typer.Option("real", "--clock", help="real (wall time) | ecovisor (follow the ecovisor's clock, "
                                                      "e.g. a simulated one)"),
    events: bool = typer.Option(True, "--events/--no-events",
                                help="subscribe to the ecovisor's events: wait for the hour on tick events (--clock "
                                     "ecovisor) and re-apply the storage plan's hour on battery_full/empty and "
                                     "solar_change"),
    log_level: str = typer.Option("info", "--log-level"),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", min=1, max=65535,
                                               help="serve Prometheus metrics on this port (all interfaces; "
                                                    "default: off; docs/metrics.md)"),
    metrics_textfile: Optional[Path] = typer.Option(None, "--metrics-textfile",
                                                    help="rewrite Prometheus metrics to this file after each pass "
                                                         "(node_exporter's textfile collector, *.prom)"),
) -> None:
    """Apply the cluster's VCC hour by hour. The ecovisor token comes from $CICM_ECOVISOR_TOKEN."""
    from cicm.enforce.agent import AgentConfigError
    from cicm.enforce.clock import EcovisorClock, RealClock

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = os.environ.get(TOKEN_ENV)
    if not token and (enforce != "slurm" or ecovisor):
        fail(f"{TOKEN_ENV}: set it to the app's ecovisor bearer token")
    stop = threading.Event()
    try:
        agent = build_agent(
            cluster=cluster, ecovisor=ecovisor, token=token, db=db, plan_file=plan_file, audit_file=audit_file,
            fleet=fleet, flexible=flexible, flexible_pattern=flexible_pattern,
            cluster_cores_per_core=cluster_cores_per_core, on_missing_plan=on_missing_plan,
            max_plan_age_hours=max_plan_age_hours or None, battery=battery, battery_hours=battery_hours,
            retry_base_s=retry_base_s, retry_max_s=retry_max_s, reconcile_every_s=reconcile_every_s,
            clock=RealClock(stop), correction=correction, max_backlog_age_hours=max_backlog_age_hours,
            enforce=enforce, slurm_partition=slurm_partition, slurm_inflexible=slurm_inflexible,
            slurm_conf=slurm_conf, slurm_deadline_slack_s=slurm_deadline_slack_s,
            slurm_lift_on_exit=slurm_lift_on_exit,
        )
        stream = None
        if events and not once and agent.client is not None and ecovisor and token:
            from cicm.enforce.events import EcovisorEvents

            stream = EcovisorEvents(ecovisor, token)
        if clock == "ecovisor":
            if agent.client is None:
                raise InputError("clock", "--clock ecovisor needs --ecovisor")
            agent.clock = EcovisorClock(agent.client, stop=stop, events=stream)
        elif clock != "real":
            raise InputError("clock", f"must be 'real' or 'ecovisor', not {clock!r}")
        else:
            agent.clock = RealClock(stop, events=stream)
        if stream is not None:
            stream.start()
        if metrics_port is not None or metrics_textfile is not None:
            from cicm.ops.agent_metrics import AgentMetrics

            agent.metrics = AgentMetrics(cluster, textfile=metrics_textfile)
            if metrics_port is not None:
                try:
                    agent.metrics.serve(metrics_port)
                except OSError as exc:
                    raise InputError("metrics-port", f"cannot serve metrics on port {metrics_port}: {exc}") from exc
    except (InputError, ValueError) as exc:
        fail(exc)
    target = agent.slurm.describe() if agent.slurm is not None else f"ecovisor {ecovisor}"
    console.print(f"agent for {cluster}: plans from {agent.plans.describe()}, audit to {agent.audit.describe()}, "
                  f"{target}, hourly correction "
                  + (f"from the {agent.backlog.describe()}" if agent.backlog is not None else "off"))

    def _stop(signum, _frame):
        console.print(f"signal {signum}: stopping after this pass")
        stop.set()

    if not once:
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    status = "ok"
    try:
        out = agent.run(once=once, stop=stop)
        console.print(out.line())
        if once and not out.ok:
            status = "failed"
            raise typer.Exit(int(ExitCode.DEGRADED))
        status = "stopped" if not once else "ok"
    except AgentConfigError as exc:
        status = "failed"
        fail(exc)
    finally:
        if status == "stopped":
            agent.shutdown()  # --enforce slurm: the limit does not outlive the agent (--slurm-keep-on-exit: it does)
        agent.audit.close(status, {"passes": len(agent.passes),
                                   "failed": sum(not p.ok for p in agent.passes)})
        if agent.client is not None:
            agent.client.close()
        events_stream = getattr(agent.clock, "events", None)
        if events_stream is not None:
            events_stream.close()
        if agent.metrics is not None:
            agent.metrics.close()


@agent_app.command("actions")
def actions(
    cluster: Optional[str] = typer.Option(None, "--cluster"),
    db: Optional[Path] = db_option(),
    audit_file: Optional[Path] = typer.Option(None, "--audit-file", help="also read this JSONL audit/spool file"),
    limit: int = typer.Option(30, "--limit"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show the agent's recent audited actions (store and JSONL spool), newest first."""
    from cicm.enforce.audit import read_actions
    from cicm.paths import default_db_path

    db = db or default_db_path()
    spool = audit_file or (db.with_name(f"{db.name}.agent-{cluster}.jsonl") if cluster else None)
    try:
        frame = read_actions(db, spool, cluster, limit)
    except InputError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(json.loads(frame.to_json(orient="records", date_format="iso")), indent=2))
        return
    table = Table(title=f"Agent actions{' for ' + cluster if cluster else ''}")
    for col in ("acted_at", "cluster", "hour", "mode", "result", "allowance", "reason", "source"):
        table.add_column(col)
    for r in frame.itertuples():
        table.add_row(str(r.acted_at)[:19], r.cluster, str(r.hour)[:16], r.mode, r.result,
                      _fmt(r.flexible_allowance_cores), _fmt(r.reason)[:60], r.source)
    console.print(table)


@agent_app.command("deviations")
def deviations(
    cluster: Optional[str] = typer.Option(None, "--cluster"),
    db: Optional[Path] = db_option(),
    audit_file: Optional[Path] = typer.Option(None, "--audit-file", help="also read this JSONL audit/spool file"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show the hourly correction's deviations from the plan of record (store and JSONL audit), by hour."""
    from cicm.enforce.audit import read_deviations
    from cicm.paths import default_db_path

    db = db or default_db_path()
    spool = audit_file or (db.with_name(f"{db.name}.agent-{cluster}.jsonl") if cluster else None)
    try:
        frame = read_deviations(db, spool, cluster)
    except InputError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(json.loads(frame.to_json(orient="records", date_format="iso")), indent=2))
        return
    table = Table(title=f"Intraday deviations{' of ' + cluster if cluster else ''}")
    for col in ("hour", "cluster", "reason", "plan", "applied", "detail", "source"):
        table.add_column(col)
    for r in frame.itertuples():
        table.add_row(str(r.hour)[:16], r.cluster, r.reason, _fmt(r.plan_cores), _fmt(r.applied_cores),
                      _fmt(r.detail)[:80], r.source)
    console.print(table)


if __name__ == "__main__":  # pragma: no cover
    agent_app()
