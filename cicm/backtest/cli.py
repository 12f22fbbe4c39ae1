"""`cicm backtest`: closed-loop backtests on the real traces (the lead mounts :func:`backtest_command`).

    cicm backtest --zone CISO --start 2022-05-01 --days 60 [--json] [--out DIR]
    cicm backtest --carbon-csv de_2023.csv --zone DE --timezone Europe/Berlin --start 2023-04-01 \
        [--forecast-csv de_forecasts.csv]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cicm.clikit import fleet_option
from cicm.errors import InputError, ProviderError
from cicm.stdio import stdout_to_stderr


def _zones(value: str, from_csv: bool) -> list[str]:
    from cicm.config import GRID_ZONES

    if from_csv:
        if "," in value or value.lower() == "all" or not value.strip():
            raise InputError("zone", f"--carbon-csv holds one zone; name it (got {value!r})")
        return [value.strip()]
    if value.lower() == "all":
        return list(GRID_ZONES)
    zones = [z.strip().upper() for z in value.split(",") if z.strip()]
    bad = [z for z in zones if z not in GRID_ZONES]
    if bad or not zones:
        raise InputError("zone", f"unknown zone(s) {bad or value!r}; choose from {', '.join(GRID_ZONES)} or all")
    return zones


def backtest_command(
    zone: str = typer.Option(..., "--zone", help="grid zone (CISO, BPAT, ...), a comma list, or 'all'; with "
                                                "--carbon-csv, the CSV's zone (any name)"),
    start: str = typer.Option(..., "--start", help="first local day YYYY-MM-DD"),
    days: int = typer.Option(60, "--days", min=1, help="number of local days"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON instead of tables"),
    out: Optional[Path] = typer.Option(None, "--out", help="report folder (default: $CICM_HOME/backtests/...)"),
    fleet: Optional[Path] = fleet_option(),
    campus: Optional[str] = typer.Option(None, "--campus",
                                         help="campus to move into the zone (default: the zone's own campus, "
                                              "else the fleet's first)"),
    seed: int = typer.Option(0, help="seed of the demo telemetry, forecast errors and the experiment"),
    experiment: bool = typer.Option(True, "--experiment/--no-experiment", help="run the randomised experiment"),
    no_plots: bool = typer.Option(False, "--no-plots", help="write the JSON/CSV report without PNG plots"),
    db: Optional[Path] = typer.Option(None, "--db", help="also store the results in this DuckDB store "
                                                          "(the dashboard shows them)"),
    carbon_csv: Optional[Path] = typer.Option(None, "--carbon-csv",
                                              help="hourly actual carbon intensity of any zone (target_hour or "
                                                   "timestamp with UTC offset, gco2_per_kwh or avg_CI)"),
    timezone: Optional[str] = typer.Option(None, "--timezone", help="IANA time zone of the campus (required "
                                                                      "with --carbon-csv for a non-bundled zone)"),
    forecast_csv: Optional[Path] = typer.Option(None, "--forecast-csv",
                                                help="forecast vintages for --carbon-csv (target_hour, gco2_per_kwh, "
                                                     "optional issued_at); default: simulated from the actuals "
                                                     "with the calibrated lead-time error model"),
) -> None:
    """Backtest carbon-agnostic, threshold, planner and oracle policies on the real traces; write a report."""
    from cicm.backtest import report as R
    from cicm.backtest.carbon_input import ZoneCarbon
    from cicm.backtest.runner import BacktestOptions, progress_steps, run_backtest
    from cicm.config import load_fleet
    from cicm.paths import home_dir
    from cicm.timeutil import parse_plan_date

    console = Console(stderr=as_json, width=None if sys.stdout.isatty() else 160)
    try:
        if forecast_csv and not carbon_csv:
            raise InputError("forecast_csv", "--forecast-csv goes with --carbon-csv")
        zones = _zones(zone, carbon_csv is not None)
        first = parse_plan_date(start)
        fleet_cfg = load_fleet(fleet)
        options = BacktestOptions(seed=seed, experiment=experiment)
        options.validate()
        carbon = ZoneCarbon.from_csv(carbon_csv, zones[0], forecast_csv) if carbon_csv else None
    except InputError as exc:
        console.print(f"[bold red]error[/]: {exc}")
        raise typer.Exit(1)
    docs, failed = [], False
    with stdout_to_stderr(as_json):
        for z in zones:
            folder = (out / z if len(zones) > 1 else out) if out else \
                home_dir() / "backtests" / f"{z}_{first}_{days}d_seed{seed}"
            try:
                with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=console, transient=True) as bar:
                    task = bar.add_task(f"backtest {z}", total=progress_steps(days, options))
                    bt = run_backtest(z, first, days, options, fleet=fleet_cfg, campus=campus, carbon=carbon,
                                      timezone=timezone,
                                      progress=lambda label, n: bar.update(task, advance=n,
                                                                           description=f"{z}: {label}"))
                    bar.update(task, description=f"{z}: metrics and report")
                    ev = R.evaluate(bt)
                    if no_plots:
                        folder.mkdir(parents=True, exist_ok=True)
                        doc = R.summary(bt, ev)
                        (folder / "summary.json").write_text(json.dumps(doc, indent=2))
                        ev["table"].to_csv(folder / "policies.csv", index=False)
                        (folder / "report.md").write_text(R.markdown(bt, ev))
                    else:
                        R.write_report(bt, ev, folder)
            except (InputError, ProviderError) as exc:
                console.print(f"[bold red]error[/] ({z}): {exc}")
                raise typer.Exit(1)
            doc = R.summary(bt, ev)
            doc["report_dir"] = str(folder)
            docs.append(doc)
            if db:
                _store_results(db, bt, ev["table"], first, days, seed, folder)
            failed |= not doc["hard_checks_ok"]
            if not as_json:
                _print(console, bt, ev, folder)
    if as_json:
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    if failed:
        raise typer.Exit(3)


def _store_results(db: Path, bt, table, first, days: int, seed: int, folder: Path) -> None:
    """One row per policy in `backtest_results`, in one run; a re-run of the same window replaces its rows."""
    from cicm.store import Store

    rows = table.assign(zone=bt.zone, campus=bt.campus.name, start_day=first, days=days, seed=seed,
                        report_dir=str(folder))
    with Store(db) as store, store.run("backtest", {"zone": bt.zone, "start": first, "days": days,
                                                    "seed": seed}) as run:
        store.upsert("backtest_results", rows, run.run_id)


def _print(console: Console, bt, ev: dict, folder: Path) -> None:
    from cicm.backtest import report as R

    t = ev["table"]
    n_sim = sum(len(s.days) for s in bt.segments)
    table = Table(title=f"Backtest {bt.zone} ({bt.campus.name}): {n_sim} days from {bt.start}, "
                        f"{len(bt.campus.clusters)} clusters, {bt.seconds:.0f} s")
    for col, head in R.TABLE_COLUMNS:
        if col == "policy":
            table.add_column(head, justify="left", no_wrap=True, min_width=15)
        else:
            table.add_column(head, justify="right")
    for row in t.to_dict("records"):
        table.add_row(*[R._fmt(row.get(c), c) for c, _ in R.TABLE_COLUMNS])
    console.print(table)
    ceil = ev["ceilings"]
    console.print(f"SLO violations out of {int(t['cluster_days'].iloc[0])} cluster-days. Perfect-foresight bound "
                  f"{t['bound_reduction_pct'].iloc[0]:.1f}% below carbon-agnostic; {bt.zone} ceiling "
                  f"{R.design_ceiling_text(ceil)}this window {ceil['window_pct']:.1f}%.")
    for c in ev["checks"]:
        colour, mark = ("green", "✓") if c.ok else (("yellow", "⚠") if c.name.startswith("oracle:") else ("red", "✗"))
        console.print(f"[{colour}]{mark}[/] {c.name}: {c.detail}")
    e = ev["effect"]
    if e:
        console.print(f"Experiment: {e['n_treated']}/{e['n']} cluster-days treated; power in the top-carbon hours "
                      f"[bold]{e['effect_pct']:+.2f}%[/] (95% CI {e['ci_low_pct']:+.2f} to {e['ci_high_pct']:+.2f}%; "
                      f"simulator truth {e['true_effect_pct']:+.2f}%; paper −1 to −2%).")
    console.print(f"Report: {folder}")
