"""``cicm shaping``: operators pause and resume shaping of clusters or campuses.

A pause covers whole local days of each cluster's campus, from today (or ``--from``) through ``--until``. The next
nightly plan gives a paused cluster the full machines with reason ``operator-pause: <reason>``, and the agent
lifts its caps at its next pass (within the hour). Each pause and resume is a run of its own, with who asked and
why in its parameters; the dashboard shows pauses in force beside the SLO loop's switch-offs.
"""
from __future__ import annotations

import getpass
import sys
from datetime import date
from pathlib import Path
from typing import Optional

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from cicm.clikit import db_option, fail, fleet_option
from cicm.errors import InputError
from cicm.timeutil import parse_plan_date

shaping_app = typer.Typer(no_args_is_help=True, help="Operator controls: pause and resume shaping.")
console = Console(width=None if sys.stdout.isatty() else 160)

ClusterOption = typer.Option([], "--cluster", help="a cluster (repeat)")
CampusOption = typer.Option([], "--campus", help="every cluster of a campus (repeat)")


def chosen_clusters(fleet, clusters: list[str], campuses: list[str]) -> dict[str, str]:
    """cluster -> its campus's time zone, for the named clusters and every cluster of the named campuses."""
    if not clusters and not campuses:
        raise InputError("cluster", "name at least one --cluster or --campus")
    known = {c.name: campus for campus in fleet.campuses for c in campus.clusters}
    by_campus = {campus.name: campus for campus in fleet.campuses}
    out: dict[str, str] = {}
    for name in clusters:
        if name not in known:
            raise InputError("cluster", f"{name!r} is not in fleet {fleet.name!r}")
        out[name] = known[name].timezone
    for name in campuses:
        if name not in by_campus:
            raise InputError("campus", f"{name!r} is not in fleet {fleet.name!r}")
        out.update({c.name: by_campus[name].timezone for c in by_campus[name].clusters})
    return out


def local_today(tz: str) -> date:
    return pd.Timestamp.now(tz="UTC").tz_convert(tz).date()


@shaping_app.command("pause")
def pause(
    cluster: list[str] = ClusterOption,
    campus: list[str] = CampusOption,
    until: str = typer.Option(..., "--until", help="the last local day of the pause, YYYY-MM-DD"),
    start: Optional[str] = typer.Option(None, "--from", help="the first local day (default: today in each campus)"),
    reason: str = typer.Option(..., "--reason", help="why (stored with the pause and shown with the fallback)"),
    db: Optional[Path] = db_option(),
    fleet: Optional[Path] = fleet_option(),
) -> None:
    """Pause shaping: the next plan and the agent give these clusters their full machines."""
    from cicm.config import load_fleet
    from cicm.paths import default_db_path
    from cicm.store import Store, operator

    try:
        if not reason.strip():
            raise InputError("reason", "say why the clusters are paused")
        names = chosen_clusters(load_fleet(fleet), cluster, campus)
        last = parse_plan_date(until)
        firsts = {n: parse_plan_date(start) if start else local_today(tz) for n, tz in names.items()}
        if any(first > last for first in firsts.values()):
            raise InputError("until", f"{last} is before the pause's first day")
        params = {"clusters": sorted(names), "from": start or "today", "until": str(last), "reason": reason,
                  "by": getpass.getuser()}
        with Store(db or default_db_path()) as store, store.run("shaping-pause", params) as run:
            for first in sorted(set(firsts.values())):
                group = [n for n, f in firsts.items() if f == first]
                operator.write_pauses(store, group, first, last, reason.strip(), run.run_id)
    except InputError as exc:
        fail(exc)
    console.print(f"paused shaping of {', '.join(sorted(names))} through {last}: {reason} (run {run.run_id})")


@shaping_app.command("resume")
def resume(
    cluster: list[str] = ClusterOption,
    campus: list[str] = CampusOption,
    db: Optional[Path] = db_option(),
    fleet: Optional[Path] = fleet_option(),
) -> None:
    """End the operator pauses of these clusters from today (local to each campus); their rows stay, marked."""
    from cicm.config import load_fleet
    from cicm.paths import default_db_path
    from cicm.store import Store, operator

    try:
        names = chosen_clusters(load_fleet(fleet), cluster, campus)
        by = getpass.getuser()
        with Store(db or default_db_path()) as store, \
                store.run("shaping-resume", {"clusters": sorted(names), "by": by}) as run:
            ended = 0
            for name, tz in names.items():
                today = local_today(tz)
                ended += operator.end_pauses(store, [name], today, f"resumed from {today} by {by}, run {run.run_id}")
    except InputError as exc:
        fail(exc)
    console.print(f"resumed shaping of {', '.join(sorted(names))}: {ended} pause(s) ended (run {run.run_id})")


@shaping_app.command("list")
def list_pauses(db: Optional[Path] = db_option(),
                all_: bool = typer.Option(False, "--all", help="also pauses that have ended")) -> None:
    """Operator pauses in force or to come (with --all: every one)."""
    from cicm.paths import default_db_path
    from cicm.store import Store, operator

    try:
        with Store(db or default_db_path(), read_only=True) as store:
            frame = operator.pauses(store, None if all_ else pd.Timestamp.now(tz="UTC").date())
    except InputError as exc:
        fail(exc)
    table = Table(title="Operator pauses")
    for col in ("cluster", "from", "until", "reason", "run"):
        table.add_column(col)
    for row in frame.itertuples(index=False):
        table.add_row(row.cluster, str(row.disabled_from)[:10], str(row.disabled_until)[:10], row.reason, row.run_id)
    console.print(table)
