"""``cicm slo``: the SLO feedback loop's state (the lead mounts ``slo_app``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from cicm.clikit import db_option, fail, fleet_option
from cicm.errors import InputError

slo_app = typer.Typer(no_args_is_help=True, help="The SLO check and its feedback loop (shaping on/off per cluster).")
console = Console(width=None if sys.stdout.isatty() else 160)

DbOption = db_option()


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    try:
        import pandas as pd

        if pd.isna(v):
            return "—"
    except (TypeError, ValueError):
        pass
    if isinstance(v, float):
        return f"{v:,.1f}"
    return str(v)[:10] if hasattr(v, "isoformat") else str(v)


@slo_app.command("status")
def status(
    db: Optional[Path] = DbOption,
    as_of: Optional[str] = typer.Option(None, "--as-of", help="day for on/off (default: the newest plan day)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Per cluster: checked days, violations, close days, and whether shaping is on or off (and why)."""
    from cicm.store import Store
    from cicm.planning.slo import slo_status
    from cicm.paths import default_db_path
    from cicm.timeutil import parse_plan_date

    try:
        day = parse_plan_date(as_of) if as_of else None
        with Store(db or default_db_path(), read_only=True) as store:
            frame = slo_status(store, day)
    except InputError as exc:
        fail(exc)
    totals = {"clusters": int(len(frame)), "cluster_days": int(frame["days"].sum()),
              "violated": int(frame["violated"].sum()), "close": int(frame["close"].sum()),
              "shaping_off": int((frame["shaping"] == "off").sum())}
    if as_json:
        records = [{k: (None if v is None or (not isinstance(v, str) and _isna(v)) else
                        v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()}
                   for r in frame.to_dict("records")]
        print(json.dumps({"totals": totals, "clusters": records}, default=str, indent=2))
        return
    table = Table(title=f"SLO status as of {frame['as_of'].iloc[0] if len(frame) else '—'}: "
                        f"{totals['violated']} violated and {totals['close']} close of {totals['cluster_days']} "
                        f"cluster-days; shaping off for {totals['shaping_off']}/{totals['clusters']} clusters")
    for col in ("cluster", "shaping", "until", "days", "violated", "close", "viol %", "last day", "reason"):
        table.add_column(col, justify="right" if col in ("days", "violated", "close", "viol %") else "left")
    for r in frame.itertuples():
        colour = "green" if r.shaping == "on" else "yellow"
        table.add_row(r.cluster, f"[{colour}]{r.shaping}[/]", _fmt(r.disabled_until), str(r.days), str(r.violated),
                      str(r.close), _fmt(r.violation_pct), _fmt(r.last_day), _fmt(r.reason))
    console.print(table)


def _isna(v) -> bool:
    try:
        import pandas as pd

        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


@slo_app.command("check")
def check(
    date: str = typer.Option(..., "--date", help="the plan day the check is for (checks the days before it)"),
    db: Optional[Path] = DbOption,
    fleet: Optional[Path] = fleet_option(),
    window_days: int = typer.Option(7, "--window-days"),
    close_fraction: float = typer.Option(0.95, "--close-fraction", help="close: reservations >= this x Theta"),
    disable_days: int = typer.Option(7, "--disable-days"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run the SLO stage by hand (the nightly flow runs it before planning): store slo_events and switch
    shaping off where the SLO says so."""
    from cicm.config import load_fleet
    from cicm.store import Store
    from cicm.planning.slo import slo_stage
    from cicm.paths import default_db_path
    from cicm.timeutil import parse_plan_date

    try:
        plan_date = parse_plan_date(date)
        fleet_cfg = load_fleet(fleet)
        with Store(db or default_db_path()) as store:
            out = slo_stage(store, fleet_cfg, plan_date, window_days=window_days, close_fraction=close_fraction,
                            disable_days=disable_days)
    except InputError as exc:
        fail(exc)
    if as_json:
        print(json.dumps({"summary": out["summary"], "run_id": out["run_id"],
                          "clusters": out["clusters"].to_dict("records")}, default=str, indent=2))
        return
    console.print(out["summary"])


if __name__ == "__main__":  # pragma: no cover
    slo_app()
