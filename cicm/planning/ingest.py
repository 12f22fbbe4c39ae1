"""Glue for ingestion: demo telemetry and carbon actuals into the store. Plain functions; flows call them."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cicm.config import Fleet
from cicm.store import Store
from cicm.demo.telemetry import demo_power_telemetry, demo_usage_history
from cicm.errors import InputError
from cicm.telemetry_sources.schema import POWER_FILE_COLUMNS, USAGE_FILE_COLUMNS


def trace_forecast_history(zone: str, start: pd.Timestamp, end: pd.Timestamp, seed: int) -> pd.DataFrame:
    """The trace provider's day-ahead forecasts of every UTC day in [start, end), each issued at 18:00 UTC the
    evening before: the vintages a planner that had been running would have stored."""
    from cicm.carbon.trace import trace_forecast
    from cicm.errors import InputError

    try:
        frame = trace_forecast(zone, start, end, start - pd.Timedelta(hours=6), seed=seed)
    except InputError:  # a long gap in the actual trace (PJM, March 13-14): keep the days that have data
        days = []
        for day in pd.date_range(start, end, freq="D", inclusive="left"):
            try:
                days.append(trace_forecast(zone, day, day + pd.Timedelta(days=1), day - pd.Timedelta(hours=6),
                                           seed=seed))
            except InputError:
                continue
        frame = pd.concat(days, ignore_index=True)
    frame["issued_at"] = frame["target_hour"].dt.floor("D") - pd.Timedelta(hours=6)
    return frame


def import_demo_telemetry(store: Store, fleet: Fleet, seed: int = 0) -> dict:
    """Derive the fleet's telemetry from the bundled traces and store it, with the zones' actual carbon and the
    trace provider's day-ahead forecasts over the history (so forecast skill can be measured from day one).

    One run, one transaction. Rows are keyed by (cluster|domain|zone, hour), so a re-import replaces them.
    A fleet without the demo fields is refused naming the first one missing.
    """
    fleet.require_demo("cicm demo seed")
    usage = demo_usage_history(fleet, seed=seed)
    power = demo_power_telemetry(fleet, usage, seed=seed)
    zones = sorted({c.grid_zone for c in fleet.campuses})
    params = {"fleet": fleet.name, "seed": seed, "start": fleet.history_start, "days": fleet.history_days}
    with store.run("telemetry-import", params) as run:
        store.upsert("usage_history", usage, run.run_id)
        store.upsert("power_telemetry", power, run.run_id)
        import_carbon_history(store, zones, fleet.history_start, fleet.history_end, seed, run.run_id)
    return {"run_id": run.run_id, "usage_rows": len(usage), "power_rows": len(power), "zones": zones}


def import_carbon_history(store: Store, zones: list[str], start: pd.Timestamp, end: pd.Timestamp, seed: int,
                          run_id: str) -> None:
    """The zones' actual carbon intensity (the whole bundled year) and the trace provider's day-ahead forecasts
    over [start, end). Call inside the caller's run."""
    from cicm.carbon.trace import load_actual_intensity

    for zone in zones:
        series = load_actual_intensity(zone, drop_long_gaps=True)  # PJM: a real 22-hour gap stays a gap
        store.upsert("carbon_actuals", pd.DataFrame(
            {"zone": zone, "hour": series.index, "gco2_per_kwh": series.to_numpy(), "source": "eia930"}), run_id)
        store.write_carbon_forecast(trace_forecast_history(zone, start, end, seed), run_id)


def import_scale_telemetry(store: Store, fleet: Fleet, seed: int = 0, held_back_days: int = 1) -> dict:
    """Seed a store for a `scale_fleet`: usage over its history and power over the last 14 days, except the last
    `held_back_days` (which the timed nightly ingestion then brings in), and the zones' carbon history.
    Written campus by campus (bounded memory) in one run."""
    from cicm.demo.scale_fleet import POWER_TELEMETRY_DAYS, scale_power_telemetry, scale_usage_history

    fleet.require_demo("seeding a scale fleet")
    end = fleet.history_end - pd.Timedelta(days=held_back_days)
    power_start = fleet.history_end - pd.Timedelta(days=POWER_TELEMETRY_DAYS)
    zones = sorted({c.grid_zone for c in fleet.campuses})
    params = {"fleet": fleet.name, "seed": seed, "clusters": len(fleet.clusters()), "end": end}
    usage_rows = power_rows = 0
    with store.run("telemetry-import", params) as run:
        for campus in fleet.campuses:
            usage = scale_usage_history(fleet, seed, end=end, campuses=[campus.name])
            power = scale_power_telemetry(fleet, usage[usage["hour"] >= power_start], seed)
            usage_rows += store.upsert("usage_history", usage, run.run_id)
            power_rows += store.upsert("power_telemetry", power, run.run_id)
        import_carbon_history(store, zones, fleet.history_start, fleet.history_end, seed, run.run_id)
    return {"run_id": run.run_id, "usage_rows": usage_rows, "power_rows": power_rows, "zones": zones}




def read_telemetry_dir(path: Path | str, fleet: Fleet | None = None,
                       now: pd.Timestamp | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """New telemetry dropped by the monitoring pipeline: `usage*.parquet` and `power*.parquet` in one folder,
    with the usage_history / power_telemetry columns (hour in UTC). Validated: a bad file raises an InputError
    naming the column, and nothing is stored. With a fleet, every cluster and power domain must be one of its own
    (and each domain in its own cluster); with `now`, no hour may have started after it."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputError("telemetry", f"{folder} is not a folder")
    usage_files, power_files = sorted(folder.glob("usage*.parquet")), sorted(folder.glob("power*.parquet"))
    if not usage_files and not power_files:
        raise InputError("telemetry", f"no usage*.parquet or power*.parquet in {folder}")
    usage = _read_parquet(usage_files, USAGE_FILE_COLUMNS, ("cluster", "hour"))
    power = _read_parquet(power_files, POWER_FILE_COLUMNS, ("domain", "hour"))
    if usage.empty and power.empty:
        raise InputError("telemetry", f"the files in {folder} hold no rows")
    check_telemetry_rows(usage, power, fleet, now)
    return usage, power


def check_telemetry_rows(usage: pd.DataFrame, power: pd.DataFrame, fleet: Fleet | None = None,
                         now: pd.Timestamp | None = None) -> None:
    """The checks every source's rows get before they are stored (the drop's and Prometheus's): with `now`, no
    hour may have started after it; with a fleet, every cluster must be one of its own and every power domain one
    of its cluster's. Raises InputError naming the column."""
    if now is not None:
        for frame in (usage, power):
            if len(frame) and frame["hour"].max() > now:
                raise InputError("hour", f"hours in the future (up to {frame['hour'].max()}, now is {now})")
    if fleet is not None:
        clusters = {c.name: {d.name for d in c.power_domains} for c in fleet.clusters()}
        unknown = sorted(set(usage["cluster"]) - clusters.keys()) + sorted(set(power["cluster"]) - clusters.keys())
        if unknown:
            raise InputError("cluster", f"not in fleet {fleet.name!r}: {', '.join(unknown[:5])}")
        pairs = power[["cluster", "domain"]].drop_duplicates()
        wrong = [f"{d} (in {c})" for c, d in pairs.itertuples(index=False) if d not in clusters[c]]
        if wrong:
            raise InputError("domain", f"not a power domain of its cluster: {', '.join(wrong[:5])}")


def _read_parquet(files: list[Path], columns: tuple[str, ...], key: tuple[str, ...]) -> pd.DataFrame:
    import numpy as np

    if not files:
        return pd.DataFrame(columns=list(columns))
    try:
        frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a broken file
        raise InputError("telemetry", f"cannot read {', '.join(f.name for f in files)}: {exc}") from exc
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(missing[0], f"column missing from {files[0].name}")
    frame = frame[list(columns)]
    hours = frame["hour"]
    if not pd.api.types.is_datetime64_any_dtype(hours) or getattr(hours.dt, "tz", None) is None:
        raise InputError("hour", "must be tz-aware UTC timestamps")
    frame["hour"] = hours.dt.tz_convert("UTC")
    if (frame["hour"] != frame["hour"].dt.floor("h")).any():
        raise InputError("hour", "must start on a whole hour")
    for column in columns:
        if column in ("cluster", "domain"):
            if not (pd.api.types.is_string_dtype(frame[column]) or pd.api.types.is_object_dtype(frame[column])) \
                    or not frame[column].map(lambda v: isinstance(v, str) and v != "").all():
                raise InputError(column, "must be non-empty text")
            continue
        if column == "hour":
            continue
        if not pd.api.types.is_float_dtype(frame[column]) and not pd.api.types.is_integer_dtype(frame[column]) \
                or pd.api.types.is_bool_dtype(frame[column]):
            raise InputError(column, f"must be numbers, not {frame[column].dtype}")
        values = frame[column].to_numpy(dtype=float)
        if not np.isfinite(values).all():
            raise InputError(column, f"{int((~np.isfinite(values)).sum())} NaN, infinite or non-numeric values")
        if (values < 0).any():
            raise InputError(column, "negative values")
        frame[column] = values
    duplicated = frame.duplicated(list(key))
    if duplicated.any():
        first = frame.loc[duplicated, list(key)].iloc[0].to_dict()
        raise InputError(key[0], f"{int(duplicated.sum())} duplicate rows, e.g. {first}")
    return frame


def ingest_telemetry(store: Store, usage: pd.DataFrame, power: pd.DataFrame, source: str) -> dict:
    """The nightly ingestion: new usage and power rows (the usage_history / power_telemetry columns) in one run.
    Rows are keyed by (cluster|domain, hour), so re-ingesting a day replaces it."""
    with store.run("telemetry-ingest", {"source": source, "usage_rows": len(usage), "power_rows": len(power)}) as run:
        store.upsert("usage_history", usage, run.run_id)
        store.upsert("power_telemetry", power, run.run_id)
    return {"run_id": run.run_id, "usage_rows": len(usage), "power_rows": len(power)}
