"""`cicm`: the command line of the planner."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from cicm.planning.options import PlanOptions
from cicm.clikit import db_option, exit_degraded_unless, fail, fleet_option, interruptible, use_exit_code_table
from cicm.errors import InputError, ProviderError
from cicm.paths import default_db_path
from cicm.timeutil import parse_plan_date

app = typer.Typer(no_args_is_help=True, help="Carbon-aware day-ahead capacity planner (CICM).")
vcc_app = typer.Typer(no_args_is_help=True, help="Virtual Capacity Curves.")
app.add_typer(vcc_app, name="vcc")
console = Console(width=None if sys.stdout.isatty() else 160)

use_exit_code_table()
DbOption = db_option()
_D = PlanOptions  # the planner's defaults: one source (cicm.planning.options.PlanOptions)
FleetOption = fleet_option()


def _mount_subcommands() -> None:
    from cicm.carbon.cli import carbon_app

    from cicm.backtest.cli import backtest_command
    from cicm.dashboards.cli import dashboard_app
    from cicm.ecovisor.cli import ecovisor_app
    from cicm.enforce.cli import agent_app
    from cicm.planning.slo_cli import slo_app

    app.add_typer(carbon_app, name="carbon", help="Carbon-intensity forecasts.")
    app.add_typer(ecovisor_app, name="ecovisor", help="The ecovisor: virtual grid, battery, solar, power caps.")
    app.add_typer(dashboard_app, name="dashboard", help="The operators' web dashboard.")
    app.add_typer(agent_app, name="agent", help="The enforcement agent: applies the VCC hourly via the ecovisor.")
    app.add_typer(slo_app, name="slo", help="The SLO feedback loop: violations and shaping state.")
    from cicm.planning.shaping_cli import shaping_app

    app.add_typer(shaping_app, name="shaping", help="Operator controls: pause and resume shaping.")
    app.command("backtest")(backtest_command)
    app.add_typer(__import__("cicm.data.retention", fromlist=["store_app"]).store_app, name="store", help="The store: size, compaction of cold history to Parquet.")


demo_app = typer.Typer(no_args_is_help=True, help="The bundled demo: real traces turned into a fleet's telemetry.")
app.add_typer(demo_app, name="demo")


@demo_app.command("seed")
def demo_seed(
    db: Optional[Path] = DbOption,
    fleet: Optional[Path] = FleetOption,
    seed: int = typer.Option(0, help="seed of the derived demo telemetry"),
    force: bool = typer.Option(False, "--force", help="import again even if the store already holds the fleet's"),
) -> None:
    """Create the demo store: the demo fleet's usage and power telemetry derived from the bundled traces, the
    zones' actual carbon and the trace provider's day-ahead forecasts over the history. One run."""
    from cicm.config import load_fleet
    from cicm.planning.ingest import import_demo_telemetry
    from cicm.store import Store
    from cicm.store import plan as plan_reads

    try:
        fleet_cfg = load_fleet(fleet)
        path = db or default_db_path()
        with Store(path) as store:
            names = [c.name for c in fleet_cfg.clusters()]
            if not force and plan_reads.clusters_with_usage(store, names) == set(names):
                console.print(f"{path}: already holds telemetry for every cluster of {fleet_cfg.name} "
                              "(--force imports again)")
                return
            info = import_demo_telemetry(store, fleet_cfg, seed=seed)
    except InputError as exc:
        fail(exc)
    console.print(f"{path}: seeded {fleet_cfg.name} — {info['usage_rows']:,} usage and {info['power_rows']:,} "
                  f"power rows, carbon of {', '.join(info['zones'])} (run {info['run_id']})")


@app.command()
def plan(
    date: Optional[str] = typer.Option(None, "--date", help="local planning day YYYY-MM-DD (default: the fleet's)"),
    db: Optional[Path] = DbOption,
    fleet: Optional[Path] = FleetOption,
    provider: str = typer.Option(_D.provider, help="carbon forecast provider: trace, electricitymaps, watttime, csv"),
    base_url: Optional[str] = typer.Option(None, help="provider base URL"),
    csv: Optional[Path] = typer.Option(None, help="CSV forecast file for --provider csv"),
    seed: int = typer.Option(_D.seed, help="seed of the trace forecast errors"),
    gamma: float = typer.Option(_D.gamma, help="inflexible usage must fit under its (1-gamma) quantile"),
    lambda_e: float = typer.Option(_D.lambda_e, help="weight of carbon (per kgCO2)"),
    lambda_p: float = typer.Option(_D.lambda_p, help="weight of peak power (per kW)"),
    delta_min: float = typer.Option(_D.delta_min, help="lowest flexible deviation from flat"),
    delta_max: float = typer.Option(_D.delta_max, help="highest flexible deviation from flat"),
    solver: str = typer.Option(_D.solver, help="HIGHS or CLARABEL"),
    min_forecast_value_pct: float = typer.Option(
        _D.min_forecast_value_pct, help="shape a campus only if following its zone's forecasts cut flexible carbon by this much (%)"
                  " over the last 28 days"),
    telemetry: Optional[Path] = typer.Option(
        None, help="folder of new usage*.parquet / power*.parquet telemetry to ingest before planning"),
    runner: str = typer.Option(_D.runner, help="where the campus partitions run: local (this process), dask, or"
                                            " auto (dask if --dask-address is given or the fleet is very large)"),
    dask_address: Optional[str] = typer.Option(None, help="Dask scheduler, e.g. tcp://10.0.0.5:8786 (default with"
                                                          " --runner dask: a local cluster)"),
    dask_workers: int = typer.Option(_D.dask_workers, help="worker processes of the local Dask cluster"),
    program: str = typer.Option(_D.program, help="the VCC program: queue (plans when flexible work runs, with a"
                                              " look-ahead; docs/optimizer.md) or ceiling (CICM's, a baseline)"),
    horizon_hours: int = typer.Option(_D.horizon_hours, help="queue program: look-ahead from planning time, in hours (only the"
                                               " planning day is committed)"),
    rewrite_history: bool = typer.Option(False, "--rewrite-history", help="let the night's telemetry replace "
                                         "stored hours with other values (each rewrite is recorded in its run); "
                                         "without it such a drop is refused"),
    as_of: Optional[str] = typer.Option(None, "--as-of", help="plan as if the clock read this time (ISO-8601 with"
                                        " offset), e.g. to re-run a missed night: telemetry is read up to it and "
                                        "live forecasts are judged against it"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Run the nightly plan: forecasts, models, VCCs for every cluster; store them; print a summary."""
    from cicm.config import load_fleet
    from cicm.planning.options import PlanOptions
    from cicm.planning.runner import plan_in_process, uses_prefect

    try:
        fleet_cfg = load_fleet(fleet)
        if date:
            plan_date = parse_plan_date(date)
        elif fleet_cfg.default_plan_date is not None:
            plan_date = fleet_cfg.default_plan_date
        else:
            raise InputError("date", "the fleet has no default_plan_date; pass --date")
        options = PlanOptions(provider=provider, base_url=base_url, csv_path=str(csv) if csv else None, seed=seed,
                              gamma=gamma, lambda_e=lambda_e, lambda_p=lambda_p, delta_min=delta_min,
                              delta_max=delta_max, solver=solver, min_forecast_value_pct=min_forecast_value_pct,
                              runner=runner, dask_address=dask_address, dask_workers=dask_workers,
                              telemetry_dir=str(telemetry) if telemetry else None, program=program,
                              horizon_hours=horizon_hours, as_of=as_of, rewrite_history=rewrite_history)
        options.validate()
        from cicm.stdio import stdout_to_stderr

        with interruptible(), stdout_to_stderr(as_json):  # SIGTERM/SIGINT: rolled back, recorded, exit 2
            if uses_prefect(options, len(fleet_cfg.clusters())):  # a Prefect server, or Dask workers
                from flows.nightly import run_nightly_plan

                outcome = run_nightly_plan(plan_date, db or default_db_path(), fleet, options)
            else:  # the same stages here, recorded in the store as ever, without starting a Prefect server
                outcome = plan_in_process(plan_date, db or default_db_path(), fleet, options)
    except (InputError, ProviderError) as exc:
        fail(exc)
    if as_json:
        print(json.dumps({"plan_date": str(outcome.plan_date), "run_id": outcome.run_id, "status": outcome.status,
                          "stages": [s.__dict__ for s in outcome.stages],
                          "clusters": outcome.clusters.to_dict("records")}, default=str, indent=2))
    else:
        _print_plan(outcome)
    exit_degraded_unless(outcome.status == "ok")


def _print_plan(outcome) -> None:
    stages = Table(title=f"Nightly plan for {outcome.plan_date} — run {outcome.run_id} — {outcome.status}")
    for col in ("stage", "status", "detail"):
        stages.add_column(col)
    for s in outcome.stages:
        colour = {"ran": "green", "degraded": "yellow", "failed": "red"}.get(s.status, "white")
        stages.add_row(s.name, f"[{colour}]{s.status}[/]", s.detail)
    console.print(stages)
    if outcome.clusters.empty:
        return
    table = Table(title="Clusters")
    for col in outcome.clusters.columns:
        table.add_column(col, justify="right" if outcome.clusters[col].dtype.kind in "fi" else "left")
    for row in outcome.clusters.itertuples(index=False):
        table.add_row(*[_fmt(v) for v in row])
    console.print(table)
    shaped = outcome.clusters["status"] == "shaped"
    plan_kg, flat_kg = outcome.clusters["plan_kgco2"].sum(), outcome.clusters["flat_kgco2"].sum()
    if flat_kg > 0:
        console.print(
            f"{int(shaped.sum())}/{len(shaped)} clusters shaped; expected {plan_kg:,.0f} kgCO2 against "
            f"{flat_kg:,.0f} unshaped: {flat_kg - plan_kg:,.0f} kgCO2 ({100 * (1 - plan_kg / flat_kg):.1f}%) saved."
        )


def _fmt(value) -> str:
    if isinstance(value, float):
        return "—" if value != value else f"{value:,.1f}"
    return "—" if value is None else str(value)


@vcc_app.command("show")
def vcc_show(
    cluster: str = typer.Option(..., "--cluster"),
    date: str = typer.Option(..., "--date"),
    db: Optional[Path] = DbOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Print a cluster's VCC for a day: hourly caps, status, reason, expected carbon against flat."""
    from cicm.store import Store

    try:
        plan_date = parse_plan_date(date)
        with Store(db or default_db_path(), read_only=True) as store:
            hours, status = store.plan(cluster, plan_date)
    except InputError as exc:
        fail(exc)
    if status.empty:
        fail(InputError("cluster", f"no plan for cluster {cluster!r} on {plan_date}"))
    info = status.iloc[0].to_dict()
    if as_json:
        doc = {
            "cluster": cluster, "plan_date": str(plan_date), "run_id": info["run_id"], "status": info["status"],
            "reason": info["reason"], "expected_kgco2": float(info["expected_kgco2"]),
            "flat_kgco2": float(info["flat_kgco2"]), "saving_pct": float(info["saving_pct"]),
            "theta_core_hours": float(info["theta_core_hours"]),
            "hours": [
                {"hour": h.isoformat(), "vcc_cores": float(v), "flexible_cpu_cores": float(f),
                 "gco2_per_kwh": float(g)}
                for h, v, f, g in zip(hours["hour"], hours["vcc_cores"], hours["flexible_cpu_cores"],
                                      hours["gco2_per_kwh"])
            ],
        }
        doc = {k: _finite_or_none(v) for k, v in doc.items()}
        doc["hours"] = [{k: _finite_or_none(v) for k, v in h.items()} for h in doc["hours"]]
        print(json.dumps(doc, default=_json_default, indent=2))
        return
    table = Table(title=f"VCC {cluster} {plan_date}: {info['status']}"
                  + (f" ({info['reason']})" if info["reason"] else "")
                  + f" — expected {_fmt(float(info['expected_kgco2']))} kgCO2 vs flat {_fmt(float(info['flat_kgco2']))}")
    for col in ("hour (UTC)", "VCC cores", "flexible cores", "gCO2/kWh"):
        table.add_column(col, justify="right")
    for h, v, f, g in zip(hours["hour"], hours["vcc_cores"], hours["flexible_cpu_cores"], hours["gco2_per_kwh"]):
        table.add_row(h.strftime("%Y-%m-%d %H:%M"), _fmt(float(v)), _fmt(float(f)), _fmt(float(g)))
    console.print(table)


def _json_default(value):
    return str(value)


def _finite_or_none(value):
    """JSON has no NaN: missing numbers print as null."""
    if isinstance(value, float) and value != value:
        return None
    return value


scale_app = typer.Typer(no_args_is_help=True)
app.add_typer(scale_app, name="scale", help="Scale runs: generated fleets of any size from the demo traces.")


@scale_app.command("generate")
def scale_generate(
    clusters: int = typer.Option(..., help="number of clusters"),
    out: Path = typer.Option(..., help="folder for fleet.toml, cicm.duckdb and telemetry/"),
    seed: int = typer.Option(0, help="seed of scales, phases and noise"),
    per_campus: int = typer.Option(100, help="clusters per campus"),
) -> None:
    """Generate an N-cluster fleet, a store with its history, and its next night's telemetry."""
    from cicm.planning.scale import prepare_scale_run

    try:
        info = prepare_scale_run(out, clusters, seed=seed, clusters_per_campus=per_campus)
    except InputError as exc:
        fail(exc)
    except OSError as exc:
        fail(InputError("out", f"cannot write to {out}: {exc.strerror or exc}"))
    console.print(f"{info['clusters']} clusters in {info['campuses']} campuses; {info['usage_rows']:,} usage rows "
                  f"stored in {info['db']}. Plan it with:\n  cicm plan --fleet {info['fleet']} --db {info['db']} "
                  f"--telemetry {info['telemetry']}")


@app.command()
def runs(db: Optional[Path] = DbOption, limit: int = typer.Option(20)) -> None:
    """List the recorded runs, newest first."""
    from cicm.store import Store

    try:
        with Store(db or default_db_path(), read_only=True) as store:
            frame = store.runs(limit)
    except InputError as exc:
        fail(exc)
    table = Table(title="Runs")
    for col in ("run_id", "kind", "plan_date", "status", "started_at", "message"):
        table.add_column(col)
    for row in frame.itertuples():
        table.add_row(row.run_id, row.kind, str(row.plan_date)[:10] if row.plan_date == row.plan_date else "—", row.status, str(row.started_at)[:19],
                      _fmt(row.message))
    console.print(table)


@app.command()
def schedule(db: Optional[Path] = DbOption, fleet: Optional[Path] = FleetOption) -> None:
    """Serve the nightly deployment (cron 18:00 in the earliest campus's evening) until stopped."""
    from prefect import serve

    from flows.nightly import nightly_deployment

    try:
        deployment = nightly_deployment(str(db or default_db_path()), str(fleet) if fleet else None)
    except InputError as exc:
        fail(exc)
    serve(deployment)


_mount_subcommands()

if __name__ == "__main__":
    sys.exit(app())
