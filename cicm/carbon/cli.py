"""`cicm carbon fetch`: fetch, validate and (optionally) store one zone's carbon-intensity forecast."""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import pandas as pd
import typer

from cicm.clikit import ExitCode, fail, interruptible
from cicm.carbon.providers import PROVIDERS, fetch_forecast
from cicm.carbon.validate import format_time, require_utc_timestamp
from cicm.errors import InputError, ProviderError

if TYPE_CHECKING:
    from cicm.store.core import StoreLocked

carbon_app = typer.Typer(help="Carbon-intensity forecasts: fetch, validate, store.", no_args_is_help=True)


@carbon_app.callback()
def _carbon_group() -> None:
    """Carbon-intensity forecasts: fetch, validate, store."""

#: When no --now is given for the trace provider and only --start/--end: pretend it was issued this long before.
TRACE_DEFAULT_LEAD = pd.Timedelta(hours=6)


def parse_utc_option(value: str, field: str) -> pd.Timestamp:
    try:
        ts = pd.Timestamp(datetime.datetime.fromisoformat(value.strip()))
    except (ValueError, TypeError) as exc:
        raise InputError(field, f"not an ISO-8601 timestamp: {value!r}") from exc
    return require_utc_timestamp(ts, field)


def local_day_window(day: str, tz: str) -> tuple[pd.Timestamp, pd.Timestamp]:
    """[start, end) in UTC of the local calendar day ``day`` in ``tz``: its whole UTC hours (cicm.timeutil)."""
    from cicm.timeutil import check_timezone, local_day_window as window

    check_timezone(tz, "tz")
    try:
        day_date = datetime.date.fromisoformat(day.strip())
    except (ValueError, TypeError, AttributeError) as exc:
        raise InputError("date", f"not a calendar date: {day!r} (use YYYY-MM-DD)") from exc
    return window(day_date, tz)


def resolve_window(
    date: str | None, start: str | None, end: str | None, tz: str
) -> tuple[pd.Timestamp, pd.Timestamp]:
    if date is not None:
        if start is not None or end is not None:
            raise InputError("date", "give either --date or --start/--end, not both")
        return local_day_window(date, tz)
    if start is None or end is None:
        raise InputError("date", "give --date D, or both --start and --end")
    return parse_utc_option(start, "start"), parse_utc_option(end, "end")


def default_now(provider: str, start: pd.Timestamp, date: str | None, tz: str) -> pd.Timestamp:
    """Live providers: the wall clock. Trace replay: the evening before (18:00 local for --date, else start-6h)."""
    if provider != "trace":
        return pd.Timestamp.now(tz="UTC")
    if date is not None:
        eve = pd.Timestamp(date).normalize() - pd.Timedelta(days=1) + pd.Timedelta(hours=18)
        return eve.tz_localize(tz).tz_convert("UTC")
    return start - TRACE_DEFAULT_LEAD


def summary_line(df: pd.DataFrame) -> str:
    values = df["gco2_per_kwh"]
    return (
        f"{df['provider'].iloc[0]} {df['zone'].iloc[0]}: {len(df)} h "
        f"{format_time(df['target_hour'].iloc[0])}..{format_time(df['target_hour'].iloc[-1])}, "
        f"issued {format_time(df['issued_at'].max())}, gCO2/kWh min {values.min():.1f} "
        f"mean {values.mean():.1f} max {values.max():.1f}"
    )


def store_forecast(db: Path, fetch, params: dict) -> tuple[pd.DataFrame, str]:
    """Fetch first, then open the store and write in one short transaction: the store (DuckDB's one-writer lock)
    is never held while the network is asked. A failed (or interrupted) fetch is recorded as a failed run with its
    reason, in its own short write; a store that stays locked raises :class:`~cicm.store.core.StoreLocked`."""
    from cicm.clikit import Interrupted
    from cicm.store import Store
    from cicm.store.core import StoreLocked

    started_at = pd.Timestamp.now(tz="UTC")  # the run's duration is the fetch's and the write's
    try:
        frame = fetch()
    except (InputError, ProviderError, Interrupted) as exc:
        record_failed_fetch(db, params, exc, started_at)
        raise
    try:
        with Store(db) as st, st.run("carbon-fetch", params, started_at=started_at) as run:  # status with the rows
            st.write_carbon_forecast(frame, run.run_id)  # one INSERT: all rows or none
            run_id = run.run_id
    except StoreLocked as exc:
        exc.frame = frame  # type: ignore[attr-defined]  # the caller still prints what was fetched
        raise
    return frame, run_id


def record_failed_fetch(db: Path, params: dict, exc: BaseException, started_at: pd.Timestamp | None = None) -> None:
    """Record a failed fetch as a failed carbon-fetch run. A locked store cannot take it: say so on stderr (the
    fetch's own error is the command's)."""
    import sys

    from cicm.store import Store
    from cicm.store.core import StoreLocked

    try:
        with Store(db) as st:
            st.failed_run("carbon-fetch", params, None, exc, started_at=started_at)
    except StoreLocked as locked:
        print(f"warning: the failed carbon-fetch run was not recorded: {locked}", file=sys.stderr, flush=True)


@carbon_app.command("fetch")
def fetch(
    provider: str = typer.Option("trace", "--provider", help=f"One of: {', '.join(PROVIDERS)}."),
    zone: str = typer.Option(..., "--zone", help="Grid zone / region, e.g. CISO, DE, CAISO_NORTH."),
    date: Optional[str] = typer.Option(None, "--date", help="Planning day YYYY-MM-DD (local day in --tz)."),
    tz: str = typer.Option("UTC", "--tz", help="Time zone of --date's local day (23/25 h on DST days)."),
    start: Optional[str] = typer.Option(None, "--start", help="Window start, ISO-8601 with offset."),
    end: Optional[str] = typer.Option(None, "--end", help="Window end (exclusive), ISO-8601 with offset."),
    now: Optional[str] = typer.Option(None, "--now", help="Planning time for staleness checks (default: see docs)."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="Override the provider's API base URL."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="CSV file for --provider csv."),
    seed: int = typer.Option(0, "--seed", help="Seed of the trace provider's simulated forecast errors."),
    max_age_hours: float = typer.Option(36.0, "--max-age-hours", help="Reject forecasts older than this."),
    db: Optional[Path] = typer.Option(None, "--db", help="Store the forecast in this DuckDB file."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the forecast as CSV here."),
) -> None:
    """Fetch and validate one zone's hourly forecast for a day (or --start/--end); print, store, export."""
    try:
        if provider not in PROVIDERS:
            raise InputError("provider", f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        window_start, window_end = resolve_window(date, start, end, tz)
        now_ts = parse_utc_option(now, "now") if now is not None else default_now(provider, window_start, date, tz)

        def do_fetch() -> pd.DataFrame:
            return fetch_forecast(
                provider, zone, window_start, window_end, now=now_ts, base_url=base_url, path=csv, seed=seed,
                max_age=pd.Timedelta(hours=max_age_hours),
            )

        params = {"provider": provider, "zone": zone, "start": str(window_start), "end": str(window_end),
                  "now": str(now_ts), "seed": seed, "base_url": base_url, "csv": str(csv) if csv else None}
        locked: StoreLocked | None = None
        if db is not None:
            from cicm.store.core import StoreLocked
            with interruptible():  # SIGTERM/SIGINT: rolled back, recorded, exit 2
                try:
                    frame, run_id = store_forecast(db, do_fetch, params)
                except StoreLocked as exc:  # fetched, but the store stayed locked: print it, store nothing
                    locked, frame, run_id = exc, exc.frame, None  # type: ignore[attr-defined]
        else:
            frame, run_id = do_fetch(), None
    except (InputError, ProviderError) as exc:
        fail(exc)
    typer.echo(summary_line(frame))
    for row in frame.itertuples(index=False):
        typer.echo(f"  {format_time(row.target_hour)}  {row.gco2_per_kwh:8.1f}")
    if out is not None:
        frame.to_csv(out, index=False, date_format="%Y-%m-%dT%H:%M:%SZ")
        typer.echo(f"wrote {out}")
    if run_id is not None:
        typer.echo(f"stored in {db} (run {run_id})")
    if locked is not None:
        fail(f"{locked.field}: the carbon-fetch run and its {len(frame)} hours cannot be recorded in a locked "
             f"store: {locked.message}", ExitCode.DEGRADED)
