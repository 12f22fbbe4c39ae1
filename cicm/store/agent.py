"""Named reads and writes for the enforcement agent (``cicm.enforce``: its plan source, audit and correction).

Every function takes an open ``cicm.store.Store`` (the agent opens it per call, read-only where it only reads)
and returns a frame whose columns are listed in its docstring, or the scalar it names. Writes go into the
caller's transaction.
"""
from __future__ import annotations

from datetime import date

import pandas as pd

# ------------------------------------------------------------------------------------------------ plans


def plan_dates_covering(store, cluster: str, hour: pd.Timestamp) -> pd.DataFrame:
    """The plan day(s) in force whose VCCs cover the cluster's UTC ``hour`` (normally none or one).

    Columns: plan_date."""
    return store.query("SELECT plan_date FROM current_vccs WHERE cluster = ? AND hour = ?", [cluster, hour])


def newest_plan_date(store, cluster: str):
    """The cluster's newest day with a plan in force, or None (NULL / NaT) without one."""
    return store.query("SELECT max(plan_date) AS d FROM current_plans WHERE cluster = ?", [cluster])["d"].iloc[0]


def plan_run_in_force(store, cluster: str, plan_date: date) -> pd.DataFrame:
    """The run whose plan is in force for the cluster-day (no row without a plan).

    Columns: run_id."""
    return store.query("SELECT run_id FROM current_plans WHERE cluster = ? AND plan_date = ?", [cluster, plan_date])


def storage_plan_in_force(store, cluster: str, plan_date: date) -> pd.DataFrame:
    """The storage plan of the cluster's campus on ``plan_date``, from the run whose plan is in force for the
    cluster-day (only succeeded runs: ``current_vcc_status``); no row when that run stored none (a campus without a
    battery or solar, a ceiling plan, a run before issue 16). One row per hour, ordered by hour.

    Columns: run_id, plan_date, campus, hour, hour_index, load_kw, solar_kw, solar_used_kw, curtailed_kw,
    charge_kw, discharge_kw, energy_kwh (at the hour's end), energy_before_kwh (at its start: the previous hour's
    energy_kwh; NULL for the first hour), grid_kw, status."""
    return store.query(
        "SELECT s.run_id, s.plan_date, s.campus, s.hour, s.hour_index, s.load_kw, s.solar_kw, s.solar_used_kw,"
        " s.curtailed_kw, s.charge_kw, s.discharge_kw, s.energy_kwh,"
        " lag(s.energy_kwh) OVER (ORDER BY s.hour_index) AS energy_before_kwh, s.grid_kw, s.status"
        " FROM storage_plans s JOIN current_vcc_status v"
        " ON v.run_id = s.run_id AND v.campus = s.campus AND v.plan_date = s.plan_date"
        " WHERE v.cluster = ? AND v.plan_date = ? ORDER BY s.hour_index", [cluster, plan_date])


def run_started_and_params(store, run_id: str) -> pd.DataFrame:
    """When the run started and its parameters (JSON text); no row for an unknown run.

    Columns: started_at, params."""
    return store.query("SELECT started_at, params FROM runs WHERE run_id = ?", [run_id])


def inflexible_upper_forecast(store, run_id: str, cluster: str) -> pd.DataFrame:
    """The run's hourly upper bound of the cluster's inflexible usage forecast.

    Columns: hour, inflexible_upper_cpu_cores."""
    return store.query("SELECT hour, inflexible_upper_cpu_cores FROM load_forecasts WHERE run_id = ? AND "
                       "cluster = ?", [run_id, cluster])


def power_models_of_run(store, run_id: str, cluster: str) -> pd.DataFrame:
    """The power models the run fitted for the cluster's domains (``model``: JSON text, NULL when it fell back).

    Columns: domain, status, model."""
    return store.query("SELECT domain, status, model FROM power_models WHERE run_id = ? AND cluster = ?",
                       [run_id, cluster])


def latest_carbon_forecast(store, zone: str, start: pd.Timestamp, end: pd.Timestamp,
                           issued_before: pd.Timestamp | None = None) -> pd.DataFrame:
    """Newest vintage per target hour in [start, end), optionally issued before a time; ordered by target_hour.

    Columns: zone, target_hour, issued_at, gco2_per_kwh, provider."""
    return store.query(
        """SELECT zone, target_hour, issued_at, gco2_per_kwh, provider FROM carbon_forecasts
           WHERE zone = ? AND target_hour >= ? AND target_hour < ? AND issued_at <= ?
           QUALIFY row_number() OVER (PARTITION BY target_hour ORDER BY issued_at DESC) = 1
           ORDER BY target_hour""",
        [zone, start, end, issued_before or pd.Timestamp.max.tz_localize("UTC")],
    )


# ------------------------------------------------------------------------------------------------ audit


def ensure_agent_run(store, run_id: str, params_json: str, code_version: str | None) -> None:
    """Record an agent run (kind 'agent', status 'running') unless the runs table has it already."""
    store.con.execute(
        "INSERT OR IGNORE INTO runs (run_id, kind, plan_date, started_at, status, params, code_version)"
        " VALUES (?, 'agent', NULL, now(), 'running', ?, ?)",
        [run_id, params_json, code_version],
    )


def write_actions(store, frame: pd.DataFrame, run_id: str) -> int:
    """Upsert audit rows into ``agent_actions`` (the table's columns but run_id; key: cluster, acted_at)."""
    return store.upsert("agent_actions", frame, run_id)


def clear_deviation(store, cluster: str, hour: pd.Timestamp) -> None:
    """Remove the cluster-hour's stored deviation, if any."""
    store.con.execute("DELETE FROM intraday_deviations WHERE cluster = ? AND hour = ?", [cluster, hour])


def write_deviation(store, frame: pd.DataFrame, run_id: str) -> int:
    """Upsert deviations into ``intraday_deviations`` (the table's columns but run_id; key: cluster, hour)."""
    return store.upsert("intraday_deviations", frame, run_id)


def last_acted_at(store, cluster: str):
    """The cluster's newest ``agent_actions.acted_at``, or None (NULL / NaT) without one."""
    return store.query("SELECT max(acted_at) AS t FROM agent_actions WHERE cluster = ?", [cluster])["t"].iloc[0]


def deviations(store, cluster: str | None = None) -> pd.DataFrame:
    """Stored intraday deviations (all clusters, or one), unordered.

    Columns: the ``intraday_deviations`` table's (run_id, cluster, hour, plan_date, acted_at, plan_cores,
    applied_cores, vcc_cores, reason, detail, recorded_at)."""
    return store.query("SELECT * FROM intraday_deviations WHERE (? IS NULL OR cluster = ?)", [cluster, cluster])


def recent_actions(store, cluster: str | None = None, limit: int = 50) -> pd.DataFrame:
    """The newest ``limit`` audit rows (all clusters, or one), newest first.

    Columns: the ``agent_actions`` table's (run_id, cluster, acted_at, hour, plan_date, mode, reason, vcc_cores,
    flexible_allowance_cores, caps, battery_charge_kw, battery_max_discharge_kw, result, detail)."""
    return store.query(
        "SELECT * FROM agent_actions WHERE (? IS NULL OR cluster = ?) ORDER BY acted_at DESC LIMIT ?",
        [cluster, cluster, limit])
