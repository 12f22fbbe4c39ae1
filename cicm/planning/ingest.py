"""Glue for ingestion: demo telemetry and carbon actuals into the store. Plain functions; flows call them."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cicm.config import Fleet
from cicm.store import Store
from cicm.store import plan as reads
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


#: Usage may pass a cluster's (power domain's) physical cores by this share (rounding in the monitoring pipeline);
#: reservations may fall below usage by this share of the capacity.
CAPACITY_TOLERANCE = 0.01
#: Reservations may exceed the physical cores (overcommit), up to this many times them.
MAX_OVERCOMMIT = 10.0
#: Flexible work arriving in one hour: at most this many hours of the whole cluster.
MAX_ARRIVAL_HOURS = 168.0
#: Power drawn by a power domain: at most this many kW per logical CPU of it (servers draw ~0.01-0.08).
MAX_KW_PER_CORE = 1.0
#: Two stored and new values are the same reading when they differ by less than this (relative, or absolute).
SAME_READING = 1e-9
USAGE_VALUES = ("inflexible_cpu_cores", "flexible_cpu_cores", "reserved_cpu_cores", "flexible_arrived_core_hours")
POWER_VALUES = ("cpu_cores", "power_kw")


def read_telemetry_dir(path: Path | str, fleet: Fleet | None = None, now: pd.Timestamp | None = None, *,
                       not_after: pd.Timestamp | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """New telemetry dropped by the monitoring pipeline: `usage*.parquet|csv` and `power*.parquet|csv` in one
    folder, with the usage_history / power_telemetry columns (hour in UTC; in a CSV, ISO-8601 with its offset). Validated: a bad file raises an InputError
    naming the column, and nothing is stored. With a fleet, every cluster and power domain must be one of its own
    (and each domain in its own cluster) and every value within the physical bounds of its cluster
    (:func:`check_telemetry_rows`); with `now`, no hour may have started after it; with `not_after` (the plan's
    start), no hour may start at or after it."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputError("telemetry", f"{folder} is not a folder")
    usage_files = sorted([*folder.glob("usage*.parquet"), *folder.glob("usage*.csv")])
    power_files = sorted([*folder.glob("power*.parquet"), *folder.glob("power*.csv")])
    if not usage_files and not power_files:
        raise InputError("telemetry", f"no usage*.parquet|csv or power*.parquet|csv in {folder}")
    usage = _read_parquet(usage_files, USAGE_FILE_COLUMNS, ("cluster", "hour"))
    power = _read_parquet(power_files, POWER_FILE_COLUMNS, ("domain", "hour"))
    if usage.empty and power.empty:
        raise InputError("telemetry", f"the files in {folder} hold no rows")
    check_telemetry_rows(usage, power, fleet, now, not_after=not_after)
    return usage, power


def check_telemetry_rows(usage: pd.DataFrame, power: pd.DataFrame, fleet: Fleet | None = None,
                         now: pd.Timestamp | None = None, *, not_after: pd.Timestamp | None = None) -> None:
    """The checks every source's rows get before they are stored (the drop's and Prometheus's). Raises InputError
    naming the column (and the cluster or domain, the hour and the bound):

    * with `now`, no hour may have started after it; with `not_after` (the plan's start), no hour may start at or
      after it: telemetry of the planned day cannot have been measured when it is planned;
    * with a fleet, every cluster must be one of its own and every power domain one of its cluster's, and the
      values must be physically possible for the cluster (domain) they describe: inflexible and flexible usage,
      each and together, at most the cluster's cores (``capacity_cores``) + CAPACITY_TOLERANCE; reservations at
      least the usage (less CAPACITY_TOLERANCE of the cores) and at most MAX_OVERCOMMIT x the cores; arrivals at
      most MAX_ARRIVAL_HOURS of the whole cluster; a domain's CPU at most its cores (+ tolerance), its power at
      most MAX_KW_PER_CORE per core."""
    for frame in (usage, power):
        if not len(frame):
            continue
        if now is not None and frame["hour"].max() > now:
            raise InputError("hour", f"hours in the future (up to {frame['hour'].max()}, now is {now})")
        if not_after is not None:
            late = frame["hour"] >= not_after
            if late.any():
                who = "domain" if "domain" in frame.columns else "cluster"
                first = frame.loc[late].iloc[0]
                raise InputError("hour", f"{int(late.sum())} rows for hours at or after the plan's start "
                                         f"{not_after.isoformat()} (up to {frame.loc[late, 'hour'].max().isoformat()},"
                                         f" e.g. {who} {first[who]!r} at {first['hour'].isoformat()}): they cannot "
                                         f"have been measured when the day is planned")
    if fleet is None:
        return
    clusters = {c.name: {d.name for d in c.power_domains} for c in fleet.clusters()}
    unknown = sorted(set(usage["cluster"].unique().tolist()) - clusters.keys()) + \
        sorted(set(power["cluster"].unique().tolist()) - clusters.keys())
    if unknown:
        raise InputError("cluster", f"not in fleet {fleet.name!r}: {', '.join(unknown[:5])}")
    pairs = power[["cluster", "domain"]].drop_duplicates()
    wrong = [f"{d} (in {c})" for c, d in pairs.itertuples(index=False) if d not in clusters[c]]
    if wrong:
        raise InputError("domain", f"not a power domain of its cluster: {', '.join(wrong[:5])}")
    check_physical_bounds(usage, power, fleet)


def _refuse_rows(frame: pd.DataFrame, bad: "pd.Series", field: str, who: str, what: str,
                 value: "pd.Series", bound: "pd.Series", unit: str) -> None:
    """InputError naming ``field``, the first offending row's cluster (domain), hour, value and bound."""
    if not bad.any():
        return
    i = bad.to_numpy().nonzero()[0][0]
    row = frame.iloc[i]
    raise InputError(field, f"{value.iloc[i]:,.6g} {unit} at hour {row['hour'].isoformat()} for {who} "
                            f"{row[who]!r}: {what} {bound.iloc[i]:,.6g} {unit} ({int(bad.sum())} rows in all)")


def check_physical_bounds(usage: pd.DataFrame, power: pd.DataFrame, fleet: Fleet) -> None:
    """The physical bounds of :func:`check_telemetry_rows` (every cluster and domain is the fleet's)."""
    tol = CAPACITY_TOLERANCE
    if len(usage):
        cores = usage["cluster"].map({c.name: float(c.capacity_cores) for c in fleet.clusters()})
        limit = cores * (1 + tol)
        for field in ("inflexible_cpu_cores", "flexible_cpu_cores"):
            _refuse_rows(usage, usage[field] > limit, field, "cluster", f"more than the cluster's capacity "
                         f"(+{tol:.0%}):", usage[field], limit, "cores")
        used = usage["inflexible_cpu_cores"] + usage["flexible_cpu_cores"]
        _refuse_rows(usage, used > limit, "flexible_cpu_cores", "cluster", "inflexible + flexible usage is more than "
                     f"the cluster's capacity (+{tol:.0%}):", used, limit, "cores")
        floor = used - tol * cores
        _refuse_rows(usage, usage["reserved_cpu_cores"] < floor, "reserved_cpu_cores", "cluster",
                     f"reservations below the cores in use (inflexible + flexible, less {tol:.0%} of the capacity):",
                     usage["reserved_cpu_cores"], floor, "cores")
        most = cores * MAX_OVERCOMMIT
        _refuse_rows(usage, usage["reserved_cpu_cores"] > most, "reserved_cpu_cores", "cluster",
                     f"more than {MAX_OVERCOMMIT:g} x the cluster's capacity:", usage["reserved_cpu_cores"], most,
                     "cores")
        most = cores * MAX_ARRIVAL_HOURS
        _refuse_rows(usage, usage["flexible_arrived_core_hours"] > most, "flexible_arrived_core_hours", "cluster",
                     f"more than {MAX_ARRIVAL_HOURS:g} hours of the whole cluster arriving in one hour:",
                     usage["flexible_arrived_core_hours"], most, "core-hours")
    if len(power):
        domain_cores = {d.name: float(d.capacity_cores) for c in fleet.clusters() for d in c.power_domains}
        cores = power["domain"].map(domain_cores)
        limit = cores * (1 + tol)
        _refuse_rows(power, power["cpu_cores"] > limit, "cpu_cores", "domain",
                     f"more than the power domain's capacity (+{tol:.0%}):", power["cpu_cores"], limit, "cores")
        most = cores * MAX_KW_PER_CORE
        _refuse_rows(power, power["power_kw"] > most, "power_kw", "domain",
                     f"more than {MAX_KW_PER_CORE:g} kW per core of the power domain:", power["power_kw"], most, "kW")


_OFFSET = r"(?:Z|[+-]\d\d:?\d\d)$"


def _read_drop_file(path: Path) -> pd.DataFrame:
    """One file of a drop: Parquet as it is; a CSV with its ``hour`` text (ISO-8601 with an offset) parsed to UTC
    and names kept as text. Checks of the columns follow in :func:`_read_parquet`."""
    if path.suffix != ".csv":
        return pd.read_parquet(path)
    frame = pd.read_csv(path, dtype={"cluster": str, "domain": str}, keep_default_na=True)
    if "hour" in frame.columns:
        text = frame["hour"].astype(str).str.strip()
        naive = ~text.str.contains(_OFFSET, regex=True)
        if naive.any():
            raise InputError("hour", f"{path.name} row {int(naive.to_numpy().argmax()) + 2}: {text[naive].iloc[0]!r} "
                                     "has no UTC offset (write e.g. 2026-10-14T00:00:00Z)")
        try:
            frame["hour"] = pd.to_datetime(text, format="ISO8601", utc=True)
        except (ValueError, TypeError) as exc:
            raise InputError("hour", f"{path.name}: not ISO-8601 times: {exc}") from exc
    return frame


def _read_parquet(files: list[Path], columns: tuple[str, ...], key: tuple[str, ...]) -> pd.DataFrame:
    import numpy as np

    if not files:
        return pd.DataFrame(columns=list(columns))
    try:
        frame = pd.concat([_read_drop_file(f) for f in files], ignore_index=True)
    except InputError:
        raise
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
            names = frame[column]
            # every value a str (no None, NaN or number), none empty: vectorised (720 k rows a night at 10,000
            # clusters; a Python check per row took 0.6 s)
            if not (pd.api.types.is_string_dtype(names) or pd.api.types.is_object_dtype(names)) \
                    or bool(names.isna().any()) or pd.api.types.infer_dtype(names, skipna=False) != "string" \
                    or bool((names == "").any()):
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


def ingest_telemetry(store: Store, usage: pd.DataFrame, power: pd.DataFrame, source: str, *,
                     rewrite_history: bool = False, started_at: pd.Timestamp | None = None) -> dict:
    """The nightly ingestion: new usage and power rows (the usage_history / power_telemetry columns) in one run.

    Rows are keyed by (cluster|domain, hour). Re-ingesting hours with the values already stored changes nothing.
    Rows that would overwrite stored hours with *different* values are refused (InputError naming the first
    differing column, the cluster or domain, the hour and both values; the run is recorded as failed and nothing
    is stored) unless ``rewrite_history=True``: then they replace the stored ones and the run records the rewrite
    (``params.rewrite_history``, and in its summary ``rewrites``: per table the rows rewritten, their first and
    last hour and the clusters or domains, and its message says so)."""
    params = {"source": source, "usage_rows": len(usage), "power_rows": len(power),
              "rewrite_history": bool(rewrite_history)}
    with store.run("telemetry-ingest", params, started_at=started_at) as run:  # timed from the read
        rewrites, overlaps = {}, {}
        for table, frame, key, values in (("usage_history", usage, "cluster", USAGE_VALUES),
                                          ("power_telemetry", power, "domain", POWER_VALUES)):
            changed, overlaps[table] = _history_overlap(store, table, frame, key, values)
            if changed is None:
                continue
            if not rewrite_history:
                raise InputError(changed["field"], changed["example"] + f" ({changed['rows']} stored {table} rows "
                                 f"for {changed['first_hour']}..{changed['last_hour']} would change); rewriting "
                                 "history needs the explicit option (rewrite_history=True)")
            rewrites[table] = {k: v for k, v in changed.items() if k not in ("field", "example")}
        for table, frame in (("usage_history", usage), ("power_telemetry", power)):
            if overlaps[table]:
                store.upsert(table, frame, run.run_id)
            else:  # no stored row at these (key, hour)s: a plain INSERT, half the work of INSERT OR REPLACE
                reads.append_new_telemetry(store, table, frame, run.run_id)
        run.summary = {"usage_rows": len(usage), "power_rows": len(power), "rewrites": rewrites}
        if rewrites:
            run.message = "rewrote stored history: " + "; ".join(
                f"{r['rows']} {t} rows for {r['first_hour']}..{r['last_hour']}" for t, r in rewrites.items())
    return {"run_id": run.run_id, "usage_rows": len(usage), "power_rows": len(power), "rewrites": rewrites}


def _changed_history(store: Store, table: str, frame: pd.DataFrame, key: str,
                     values: tuple[str, ...]) -> dict | None:
    """The stored rows of ``table`` that ``frame`` would overwrite with different values (None when none): their
    count, first and last hour, keys, and the first difference (field, and a sentence naming both values)."""
    return _history_overlap(store, table, frame, key, values)[0]


def _history_overlap(store: Store, table: str, frame: pd.DataFrame, key: str,
                     values: tuple[str, ...]) -> tuple[dict | None, int]:
    """(:func:`_changed_history`, the number of stored rows at the (key, hour)s of ``frame``)."""
    import numpy as np

    if frame.empty:
        return None, 0
    incoming = frame[[key, "hour", *values]]
    stored = reads.stored_rows_at(store, table, incoming, key, values)
    if stored.empty:
        return None, 0
    stored["hour"] = pd.to_datetime(stored["hour"], utc=True)
    both = incoming.assign(hour=pd.to_datetime(incoming["hour"], utc=True)).merge(
        stored, on=[key, "hour"], suffixes=("", "_stored"))
    differs = pd.Series(False, index=both.index)
    first_field: dict[int, str] = {}
    for v in values:
        new, old = both[v].to_numpy(dtype=float), both[v + "_stored"].to_numpy(dtype=float)
        diff = ~np.isclose(new, old, rtol=SAME_READING, atol=SAME_READING)
        for j in np.nonzero(diff & ~differs.to_numpy())[0]:
            first_field.setdefault(int(j), v)
        differs |= diff
    if not differs.any():
        return None, len(stored)
    changed = both.loc[differs].sort_values("hour")
    i = int(changed.index[0])
    field = first_field[i]
    row = both.loc[i]
    example = (f"{row[field]:,.6g} at hour {row['hour'].isoformat()} for {key} {row[key]!r} would overwrite the "
               f"stored {row[field + '_stored']:,.6g}")
    return {"field": field, "example": example, "rows": int(len(changed)),
            "first_hour": changed["hour"].min().isoformat(), "last_hour": changed["hour"].max().isoformat(),
            key + "s": sorted(changed[key].unique().tolist())[:20]}, len(stored)
