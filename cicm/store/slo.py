"""Named reads and writes for the SLO check and its feedback loop (``cicm.planning.slo``, ``cicm slo``).

Every function takes an open ``cicm.store.Store`` and returns a frame whose columns are listed in its docstring.
The fleet-wide reads (``fleet_*``) are one query each, whatever the number of clusters: they join the named
clusters as ``k(cluster, ci)``, ``ci`` being the cluster's position in ``clusters``, and return ``ci`` instead
of the name. Writes go into the caller's transaction (``Store.run``).
"""
from __future__ import annotations

from datetime import date

import pandas as pd

# the named clusters and their positions, as a relation k(cluster, ci)
_CLUSTERS_CTE = "WITH k AS (SELECT unnest(?::VARCHAR[]) AS cluster, unnest(?::INTEGER[]) AS ci)"


def _keys(clusters: list[str]) -> list:
    return [list(clusters), list(range(len(clusters)))]


# ------------------------------------------------------------------------------------------------ one cluster


def cluster_usage(store, cluster: str, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    """The cluster's usage rows in [start, end), ordered by hour.

    Columns: cluster, hour, inflexible_cpu_cores, flexible_cpu_cores, reserved_cpu_cores,
    flexible_arrived_core_hours."""
    return store.query(
        "SELECT * EXCLUDE (run_id) FROM usage_history WHERE cluster = ? AND hour >= ? AND hour < ? ORDER BY hour",
        [cluster, start, end],
    )


def cluster_plan_hours(store, cluster: str, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    """The hours in [start, end) of the cluster's plans in force, with the plan's status and the reservation
    ratio its load forecast used (NULL when the plan has none), ordered by hour.

    Columns: hour, plan_date, vcc_cores, status, theta_core_hours, capacity_cores, reservation_ratio."""
    return store.query(
        """SELECT v.hour, v.plan_date, v.vcc_cores, s.status, s.theta_core_hours, s.capacity_cores,
                  lf.reservation_ratio
           FROM current_vccs v JOIN current_vcc_status s ON s.run_id = v.run_id AND s.cluster = v.cluster
           LEFT JOIN load_forecasts lf ON lf.run_id = v.run_id AND lf.cluster = v.cluster AND lf.hour = v.hour
           WHERE v.cluster = ? AND v.hour >= ? AND v.hour < ? ORDER BY v.hour""",
        [cluster, start, end],
    )


def cluster_plan_status(store, cluster: str, first: date, last: date) -> pd.DataFrame:
    """The cluster's plans in force for the days first..last (inclusive).

    Columns: plan_date, status, theta_core_hours."""
    return store.query(
        "SELECT plan_date, status, theta_core_hours FROM current_vcc_status"
        " WHERE cluster = ? AND plan_date >= ? AND plan_date <= ?",
        [cluster, first, last],
    )


# ------------------------------------------------------------------------------------------------ the fleet


def fleet_usage(store, clusters: list[str], start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    """Usage rows of the named clusters in [start, end), unordered; ``us`` is the hour in epoch microseconds.

    Columns: ci, us, inflexible_cpu_cores, flexible_cpu_cores, reserved_cpu_cores, flexible_arrived_core_hours."""
    return store.query(
        f"""{_CLUSTERS_CTE}
            SELECT k.ci, epoch_us(u.hour) AS us, u.inflexible_cpu_cores, u.flexible_cpu_cores, u.reserved_cpu_cores,
                   u.flexible_arrived_core_hours
            FROM usage_history u JOIN k ON k.cluster = u.cluster WHERE u.hour >= ? AND u.hour < ?""",
        [*_keys(clusters), start, end])


def fleet_plan_hours(store, clusters: list[str], start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    """The hours in [start, end) of the named clusters' plans in force, unordered; ``shaped``: the plan's status
    is 'shaped'; ``reservation_ratio`` from the plan's load forecast (NULL when it has none).

    Columns: ci, us, vcc_cores, shaped, reservation_ratio."""
    return store.query(
        f"""{_CLUSTERS_CTE}
            SELECT k.ci, epoch_us(v.hour) AS us, v.vcc_cores, s.status = 'shaped' AS shaped, lf.reservation_ratio
            FROM current_vccs v JOIN current_vcc_status s ON s.run_id = v.run_id AND s.cluster = v.cluster
            LEFT JOIN load_forecasts lf ON lf.run_id = v.run_id AND lf.cluster = v.cluster AND lf.hour = v.hour
            JOIN k ON k.cluster = v.cluster
            WHERE v.hour >= ? AND v.hour < ?""",
        [*_keys(clusters), start, end])


def fleet_plan_status(store, clusters: list[str], first: date, last: date) -> pd.DataFrame:
    """The named clusters' plans in force for the days first..last (inclusive); ``di`` is the plan date's
    offset in days from ``first``.

    Columns: ci, di, theta_core_hours."""
    return store.query(
        f"""{_CLUSTERS_CTE}
            SELECT k.ci, datediff('day', ?::DATE, s.plan_date) AS di, s.theta_core_hours
            FROM current_vcc_status s JOIN k ON k.cluster = s.cluster
            WHERE s.plan_date >= ? AND s.plan_date <= ?""",
        [*_keys(clusters), first, first, last])


# ------------------------------------------------------------------------------------------------ feedback


def last_switch_offs(store, clusters: list[str], reason_prefix: str, plan_date: date) -> pd.DataFrame:
    """Per named cluster with one: the start of its newest switch-off on or before ``plan_date`` whose reason
    starts with ``reason_prefix``.

    Columns: cluster, d (disabled_from)."""
    return store.query(
        "SELECT cluster, max(disabled_from) AS d FROM shaping_state WHERE cluster IN (SELECT unnest(?::VARCHAR[]))"
        " AND reason LIKE ? AND disabled_from <= ? GROUP BY cluster",
        [list(clusters), f"{reason_prefix}%", plan_date])


def events_between(store, clusters: list[str], start: date, end: date) -> pd.DataFrame:
    """The stored SLO verdicts of the named clusters for start <= day < end, ordered by cluster and day.

    Columns: cluster, day, violated, close."""
    return store.query(
        "SELECT cluster, day, violated, close FROM slo_events WHERE cluster IN (SELECT unnest(?::VARCHAR[]))"
        " AND day >= ? AND day < ? ORDER BY cluster, day",
        [list(clusters), start, end])


def write_events(store, events: pd.DataFrame, run_id: str) -> int:
    """Upsert SLO verdicts (columns: cluster, day, demand_core_hours, served_core_hours, theta_core_hours,
    violated, close); a cluster-day's newer verdict replaces the older."""
    return store.upsert("slo_events", events, run_id)


def write_switch_offs(store, shaping: pd.DataFrame, run_id: str) -> int:
    """Upsert switch-offs (columns: cluster, disabled_from, disabled_until, reason)."""
    return store.upsert("shaping_state", shaping, run_id)


# ------------------------------------------------------------------------------------------------ status


def newest_plan_date(store) -> date | None:
    """The newest day with a plan in force, or None (NULL / NaT) in a store without plans."""
    return store.query("SELECT max(plan_date) AS d FROM current_plans")["d"].iloc[0]


def event_totals(store) -> pd.DataFrame:
    """Per cluster with stored verdicts: how many days, violated and close days, and the first, last and last
    violating day.

    Columns: cluster, days, violated, close, first_day, last_day, last_violation."""
    return store.query(
        """SELECT cluster, count(*) AS days, sum(violated::INT) AS violated, sum(close::INT) AS close,
                  min(day) AS first_day, max(day) AS last_day,
                  max(CASE WHEN violated THEN day END) AS last_violation
           FROM slo_events GROUP BY cluster""")


def switch_offs_ending_from(store, as_of: date) -> pd.DataFrame:
    """Per cluster: its earliest switch-off that has not ended before ``as_of`` (in force or to come).

    Columns: cluster, disabled_from, disabled_until, reason."""
    return store.query(
        """SELECT cluster, disabled_from, disabled_until, reason FROM shaping_state WHERE disabled_until >= ?
           QUALIFY row_number() OVER (PARTITION BY cluster ORDER BY disabled_from) = 1""", [as_of])


def planned_clusters(store) -> pd.Series:
    """Every cluster with a plan in force on some day (a Series named ``cluster``)."""
    return store.query("SELECT DISTINCT cluster FROM current_plans")["cluster"]
