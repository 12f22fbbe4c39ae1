"""Named reads for the nightly plan (``cicm.planning.stages``, ``cicm.planning.pipeline``) and ``cicm vcc show``.

Every function takes an open ``cicm.store.Store`` (anything with its ``query`` / ``query_bulk``) and returns a
frame whose columns are listed in its docstring. Times are UTC ``TIMESTAMPTZ``; dates are ``DATE``. The plan's
writes go through ``Store.upsert`` / ``Store.replace_plan`` / ``Store.write_carbon_forecast`` inside the plan's
run (one transaction).
"""
from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd


def usage_histories(store, clusters: list[str], before: pd.Timestamp, days: int | None = None) -> pd.DataFrame:
    """Usage rows of the named clusters in [before - days, before) (all before ``before`` without ``days``),
    ordered by cluster and hour: one query for a whole campus.

    Columns: cluster, hour, inflexible_cpu_cores, flexible_cpu_cores, reserved_cpu_cores,
    flexible_arrived_core_hours."""
    start = before - pd.Timedelta(days=days) if days else pd.Timestamp("1970-01-01", tz="UTC")
    return store.query_bulk(
        "SELECT * EXCLUDE (run_id) FROM usage_history WHERE list_contains(?, cluster) AND hour >= ?"
        " AND hour < ? ORDER BY cluster, hour",
        [list(clusters), start, before],
    )


def power_telemetries(store, clusters: list[str], before: pd.Timestamp, days: int) -> pd.DataFrame:
    """Power-domain rows of the named clusters in [before - days, before), ordered by domain and hour.

    Columns: cluster, domain, hour, cpu_cores, power_kw."""
    return store.query_bulk(
        "SELECT * EXCLUDE (run_id) FROM power_telemetry WHERE list_contains(?, cluster) AND hour >= ?"
        " AND hour < ? ORDER BY domain, hour",
        [list(clusters), before - pd.Timedelta(days=days), before],
    )


def has_usage(store, clusters: list[str]) -> bool:
    """Whether every named cluster has at least one usage row."""
    return len(clusters_with_usage(store, clusters)) == len(set(clusters))


def clusters_with_usage(store, clusters: list[str]) -> set[str]:
    """The named clusters that have at least one usage row."""
    # an IN-subquery on a registered frame (a hash semi-join), not list_contains: that is quadratic in the names
    with _registered(store, {"_named_clusters": pd.DataFrame({"cluster": list(clusters)}, dtype=object)}) as cursor:
        rows = cursor.execute("SELECT DISTINCT cluster FROM usage_history"
                              " WHERE cluster IN (SELECT cluster FROM _named_clusters)").fetchall()
    return {r[0] for r in rows}


def day_ahead_forecasts(store, zone: str, start: pd.Timestamp, end: pd.Timestamp,
                        min_lead_hours: float = 6.0) -> pd.Series:
    """Per target hour in [start, end): the newest carbon forecast issued at least ``min_lead_hours`` before it.

    A Series of gCO2/kWh indexed by target_hour."""
    frame = store.query(
        """SELECT target_hour, gco2_per_kwh FROM carbon_forecasts
           WHERE zone = ? AND target_hour >= ? AND target_hour < ?
             AND issued_at <= target_hour - to_microseconds(CAST(? * 3600e6 AS BIGINT))
           QUALIFY row_number() OVER (PARTITION BY target_hour ORDER BY issued_at DESC) = 1
           ORDER BY target_hour""",
        [zone, start, end, min_lead_hours],
    )
    return frame.set_index("target_hour")["gco2_per_kwh"]


def carbon_actuals(store, zone: str, start: pd.Timestamp, end: pd.Timestamp) -> pd.Series:
    """The zone's measured carbon intensity in [start, end): a Series of gCO2/kWh indexed by hour."""
    frame = store.query(
        "SELECT hour, gco2_per_kwh FROM carbon_actuals WHERE zone = ? AND hour >= ? AND hour < ? ORDER BY hour",
        [zone, start, end],
    )
    return frame.set_index("hour")["gco2_per_kwh"]


def newest_actual_hour(store, zone: str) -> pd.Timestamp | None:
    """The newest hour of the zone's stored actuals, or None."""
    newest = store.query("SELECT max(hour) AS h FROM carbon_actuals WHERE zone = ?", [zone])["h"].iloc[0]
    return None if pd.isna(newest) else pd.Timestamp(newest)


def power_domain_owners(store, window_days: int) -> pd.DataFrame:
    """Which cluster each domain's power telemetry is stored under, in the last ``window_days`` before the newest
    stored hour, for every domain there. Columns: domain, cluster (the smallest name), other (the largest: another
    cluster when it differs). (No list filter: ``list_contains`` with a whole fleet's names is quadratic.)"""
    return store.query(
        "SELECT domain, min(cluster) AS cluster, max(cluster) AS other FROM power_telemetry"
        " WHERE hour >= (SELECT max(hour) FROM power_telemetry) - to_days(?) GROUP BY domain", [window_days])


def usage_peaks(store, window_days: int) -> pd.DataFrame:
    """The peak of inflexible + flexible usage of every cluster in the last ``window_days`` before the newest
    stored hour. Columns: cluster, peak (cores)."""
    return store.query(
        "SELECT cluster, max(inflexible_cpu_cores + flexible_cpu_cores) AS peak FROM usage_history"
        " WHERE hour >= (SELECT max(hour) FROM usage_history) - to_days(?) GROUP BY cluster", [window_days])


def domains_with_power(store, domains: list[str]) -> set[str]:
    """The named domains (a few: those without a declared curve) with any power telemetry."""
    with _registered(store, {"_named_domains": pd.DataFrame({"domain": list(domains)}, dtype=object)}) as cursor:
        rows = cursor.execute("SELECT DISTINCT domain FROM power_telemetry"
                              " WHERE domain IN (SELECT domain FROM _named_domains)").fetchall()
    return {r[0] for r in rows}


#: Telemetry tables keyed by (key, hour), for :func:`stored_rows_at`.
TELEMETRY_KEYS = {"usage_history": "cluster", "power_telemetry": "domain"}


def stored_rows_at(store, table: str, incoming: pd.DataFrame, key: str, values: tuple[str, ...]) -> pd.DataFrame:
    """The stored rows of a telemetry table at the (key, hour) pairs of ``incoming``. Columns: key, hour,
    values."""
    if TELEMETRY_KEYS.get(table) != key:
        raise ValueError(f"{table} is not a telemetry table keyed by {key}")
    store.con.register("_incoming_check", incoming)
    try:
        return store.query(
            f"SELECT s.{key}, s.hour, {', '.join('s.' + v for v in values)} FROM {table} s "
            f"JOIN (SELECT DISTINCT {key}, hour FROM _incoming_check) i USING ({key}, hour)")
    finally:
        store.con.unregister("_incoming_check")


def append_new_telemetry(store, table: str, frame: pd.DataFrame, run_id: str) -> int:
    """Insert telemetry rows whose (key, hour) is not stored yet (the caller checked, with :func:`stored_rows_at`,
    inside the same transaction): a plain INSERT, about half the work of ``Store.upsert``'s INSERT OR REPLACE
    (measured on the 10,000-cluster store: 1.1 against 2.1 CPU-s for a night's 720 k rows). A stored key still
    fails the primary key, never silently replaced. Call inside a transaction."""
    if table not in TELEMETRY_KEYS:
        raise ValueError(f"{table} is not a telemetry table")
    if frame.empty:
        return 0
    columns = [c for c in store.columns(table) if c != "run_id"]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        from cicm.errors import InputError

        raise InputError(missing[0], f"missing column for table {table}")
    store.con.register("_incoming_new", frame[columns])
    try:
        names = ", ".join(columns)
        store.con.execute(f"INSERT INTO {table} (run_id, {names}) SELECT ?, {names} FROM _incoming_new", [run_id])
    finally:
        store.con.unregister("_incoming_new")
    return len(frame)


def plan_in_force(store, cluster: str, plan_date: date) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The plan in force for the cluster-day: (hours, status).

    hours columns: the ``vccs`` table's (run_id, plan_date, cluster, hour, hour_index, vcc_cores,
    flexible_cpu_cores, inflexible_cpu_cores, power_kw, carbon_kgco2, gco2_per_kwh), ordered by hour.
    status columns: the ``vcc_status`` table's (run_id, plan_date, cluster, campus, status, reason,
    capacity_cores, theta_core_hours, tau_core_hours, expected_kgco2, flat_kgco2, saving_pct, peak_kw): one row,
    or none without a plan."""
    hours = store.query(
        "SELECT * FROM current_vccs WHERE cluster = ? AND plan_date = ? ORDER BY hour", [cluster, plan_date]
    )
    status = store.query("SELECT * FROM current_vcc_status WHERE cluster = ? AND plan_date = ?",
                         [cluster, plan_date])
    return hours, status


def shaping_switched_off(store, clusters: list[str], plan_date: date) -> pd.DataFrame:
    """The SLO loop's switch-offs in force on ``plan_date`` for the named clusters: the newest per cluster.

    Columns: cluster, reason, disabled_until."""
    with _registered(store, {"_named_clusters": pd.DataFrame({"cluster": list(clusters)}, dtype=object)}) as cursor:
        return cursor.execute(
            "SELECT cluster, reason, disabled_until FROM shaping_state"
            " WHERE cluster IN (SELECT cluster FROM _named_clusters) AND disabled_from <= ? AND disabled_until >= ?"
            " QUALIFY row_number() OVER (PARTITION BY cluster ORDER BY disabled_from DESC) = 1",
            [plan_date, plan_date]).df()


def _registered(store, frames: dict[str, pd.DataFrame]):
    """A cursor of the store's database (its own connection: registering on ``store.con`` is refused while a
    result of it is unfinished) with ``frames`` registered by name, for the ``with`` block."""
    from contextlib import contextmanager

    @contextmanager
    def block():
        cursor = store.con.cursor()
        try:
            for name, frame in frames.items():
                cursor.register(name, frame)
            yield cursor
        finally:
            cursor.close()

    return block()


def usage_history_arrays(store, clusters: list[str], before: pd.Timestamp, days: int) -> dict:
    """Usage rows of the named clusters in [before - days, before) in ONE query (a join with the names, not a
    list filter: ``list_contains`` with thousands of names is quadratic), as numpy columns in no particular order:
    ``pos`` (int32: the row's cluster as its index in ``clusters``), ``hour_us`` (int64: UTC microseconds),
    ``inflexible_cpu_cores``, ``flexible_cpu_cores``, ``reserved_cpu_cores``, ``flexible_arrived_core_hours``
    (float64). No text column is built: a night's read is ~40 M rows for 10,000 clusters."""
    names = pd.DataFrame({"cluster": list(clusters), "pos": np.arange(len(clusters), dtype=np.int32)})
    with _registered(store, {"_read_clusters": names}) as cursor:
        # the range test lets DuckDB skip row groups by their min/max (a store written cluster by cluster)
        return cursor.execute(
            "SELECT n.pos, epoch_us(u.hour) AS hour_us, u.inflexible_cpu_cores, u.flexible_cpu_cores,"
            " u.reserved_cpu_cores, u.flexible_arrived_core_hours FROM usage_history u JOIN _read_clusters n"
            " USING (cluster) WHERE u.hour >= ? AND u.hour < ? AND u.cluster BETWEEN ? AND ?",
            [before - pd.Timedelta(days=days), before, min(clusters), max(clusters)]).fetchnumpy()


def power_telemetry_arrays(store, clusters: list[str], domains: list[str], before: pd.Timestamp, days: int) -> dict:
    """Power rows of the named clusters in [before - days, before), of the named domains only, in ONE query, as
    numpy columns in no particular order: ``cluster_pos`` and ``domain_pos`` (int32: indexes in ``clusters`` and
    ``domains``), ``hour_us`` (int64: UTC microseconds), ``cpu_cores``, ``power_kw`` (float64)."""
    c = pd.DataFrame({"cluster": list(clusters), "cluster_pos": np.arange(len(clusters), dtype=np.int32)})
    d = pd.DataFrame({"domain": list(domains), "domain_pos": np.arange(len(domains), dtype=np.int32)})
    with _registered(store, {"_read_clusters": c, "_read_domains": d}) as cursor:
        return cursor.execute(
            "SELECT c.cluster_pos, d.domain_pos, epoch_us(p.hour) AS hour_us, p.cpu_cores, p.power_kw"
            " FROM power_telemetry p JOIN _read_clusters c USING (cluster) JOIN _read_domains d USING (domain)"
            " WHERE p.hour >= ? AND p.hour < ? AND p.cluster BETWEEN ? AND ?",
            [before - pd.Timedelta(days=days), before, min(clusters), max(clusters)]).fetchnumpy()
