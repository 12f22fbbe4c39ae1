"""Carbon-intensity forecasts from a local CSV file.

Columns: ``target_hour`` (ISO-8601 with an explicit offset, e.g. ``2026-11-23T00:00:00Z``), ``gco2_per_kwh``,
optionally ``issued_at`` (ISO-8601 with offset) and ``zone`` (must then equal the requested zone). Without an
``issued_at`` column the caller's ``issued_at`` is used, else the file's modification time (UTC), so staleness is
still checked. Sub-hourly rows are allowed; validation averages them to hours.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cicm.carbon._parse import parse_utc_timestamps
from cicm.carbon.schema import make_forecast_frame
from cicm.carbon.validate import DEFAULT_MAX_AGE, require_utc_timestamp, validate_forecast
from cicm.errors import InputError

PROVIDER = "csv"
REQUIRED_COLUMNS = ("target_hour", "gco2_per_kwh")


def file_mtime_utc(path: Path) -> pd.Timestamp:
    return pd.Timestamp(path.stat().st_mtime, unit="s", tz="UTC").as_unit("ns")


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputError("path", f"CSV file not found: {path}")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError("path", f"cannot read CSV {path}: {exc}") from exc


def _parse_numbers(texts: pd.Series) -> pd.Series:
    """Strings -> floats; '' / 'nan' become NaN (rejected later, naming the hour); other junk raises now."""
    stripped = texts.str.strip()
    numbers = pd.to_numeric(stripped.where(stripped != "", None), errors="coerce")
    junk = numbers.isna() & ~stripped.str.lower().isin(["", "nan", "na", "null"])
    if junk.any():
        shown = ", ".join(f"row {i + 2}: {v!r}" for i, v in stripped[junk].head(5).items())
        raise InputError("gco2_per_kwh", f"non-numeric value(s) in CSV: {shown}")
    return numbers.astype("float64")


def read_raw_csv(path: str | Path, *, zone: str, issued_at: pd.Timestamp | None = None) -> pd.DataFrame:
    """Read the CSV into a raw (unvalidated) canonical frame."""
    path = Path(path)
    table = _read_table(path)
    for column in REQUIRED_COLUMNS:
        if column not in table.columns:
            raise InputError(column, f"missing column in CSV {path.name} (has {list(table.columns)})")
    if "zone" in table.columns:
        zones = sorted(set(table["zone"].str.strip()))
        if zones != [zone]:
            raise InputError("zone", f"CSV {path.name} holds zone(s) {zones}, expected only {zone!r}")
    if "issued_at" in table.columns:
        texts = table["issued_at"].str.strip()
        issued = parse_utc_timestamps(texts.where(texts != "", None), "issued_at")
    elif issued_at is not None:
        issued = require_utc_timestamp(issued_at, "issued_at")
    else:
        issued = file_mtime_utc(path)
    return make_forecast_frame(
        zone=zone,
        target_times=parse_utc_timestamps(table["target_hour"].str.strip(), "target_hour"),
        issued_at=issued,
        gco2_per_kwh=_parse_numbers(table["gco2_per_kwh"]).to_numpy(),
        provider=PROVIDER,
    )


def read_csv_forecast(
    path: str | Path,
    *,
    zone: str,
    start: pd.Timestamp,
    end: pd.Timestamp,
    now: pd.Timestamp,
    issued_at: pd.Timestamp | None = None,
    max_age: pd.Timedelta = DEFAULT_MAX_AGE,
) -> pd.DataFrame:
    """Read and validate: the canonical hourly forecast for ``[start, end)``."""
    raw = read_raw_csv(path, zone=zone, issued_at=issued_at)
    return validate_forecast(raw, start=start, end=end, now=now, max_age=max_age)
