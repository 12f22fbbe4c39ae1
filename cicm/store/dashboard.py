"""Named reads for the dashboard (``cicm.dashboards.data``).

Every function takes an open source with ``query(sql, params)``: the dashboard's ``cicm.store.reader.Reading``
(one short-lived read-only connection per page) or a ``cicm.store.Store``. Each returns a frame whose columns
are listed in its docstring. Times are UTC ``TIMESTAMPTZ``; dates are ``DATE``. "In force": the newest plan run's
rows for a (day, cluster), i.e. the views ``current_vccs`` / ``current_vcc_status`` and the table
``current_plans``.
"""
from __future__ import annotations

from datetime import date

import pandas as pd

# ---------------------------------------------------------------------------------------------- plans in force


def plan_dates(src) -> pd.DataFrame:
    """Days with a plan in force, newest first. Columns: plan_date."""
    return src.query("SELECT DISTINCT plan_date FROM current_plans ORDER BY plan_date DESC")


def planned_clusters(src, plan_date: date) -> pd.DataFrame:
    """Clusters with a plan in force on the day, by campus and name. Columns: cluster."""
    return src.query("SELECT cluster FROM current_vcc_status WHERE plan_date = ? ORDER BY campus, cluster",
                     [plan_date])


def plan_status_on(src, plan_date: date) -> pd.DataFrame:
    """The status rows of the plans in force on the day, unordered.

    Columns: the ``vcc_status`` table's (run_id, plan_date, cluster, campus, status, reason, capacity_cores,
    theta_core_hours, tau_core_hours, expected_kgco2, flat_kgco2, saving_pct, peak_kw)."""
    return src.query("SELECT * FROM current_vcc_status WHERE plan_date = ?", [plan_date])


def cluster_status(src, cluster: str, plan_date: date) -> pd.DataFrame:
    """The status row of the cluster's plan in force on the day (none without a plan).

    Columns: as ``plan_status_on``."""
    return src.query("SELECT * FROM current_vcc_status WHERE cluster = ? AND plan_date = ?", [cluster, plan_date])


def runs_in_force(src, plan_date: date) -> pd.DataFrame:
    """The run(s) whose plan is in force on the day (normally one), newest first.

    Columns: the ``runs`` table's (run_id, kind, plan_date, started_at, finished_at, status, params,
    code_version, message, summary)."""
    return src.query(
        """SELECT r.* FROM runs r WHERE r.run_id IN (SELECT run_id FROM current_plans WHERE plan_date = ?)
           ORDER BY r.started_at DESC""",
        [plan_date],
    )


# ---------------------------------------------------------------------------------------------- SLO loop


def shaping_off(src, plan_date: date) -> pd.DataFrame:
    """Clusters whose shaping the SLO loop has switched off on the day: the newest switch-off per cluster.

    Columns: cluster, shaping_off_reason, shaping_off_until."""
    return src.query(
        """SELECT cluster, reason AS shaping_off_reason, disabled_until AS shaping_off_until FROM shaping_state
           WHERE disabled_from <= ? AND disabled_until >= ?
           QUALIFY row_number() OVER (PARTITION BY cluster ORDER BY disabled_from DESC) = 1""",
        [plan_date, plan_date],
    )


def slo_by_cluster(src, first: date, last: date) -> pd.DataFrame:
    """Per cluster, its SLO record for the days first..last (inclusive): days judged, violations, close calls
    (close and not violated), and the newest day judged with its verdict.

    Columns: cluster, slo_days, slo_violations, slo_close, slo_last_day, slo_last_violated, slo_last_close."""
    return src.query(
        """SELECT cluster, count(*) AS slo_days, count(*) FILTER (WHERE violated) AS slo_violations,
                  count(*) FILTER (WHERE close AND NOT violated) AS slo_close, max(day) AS slo_last_day,
                  arg_max(violated, day) AS slo_last_violated, arg_max(close, day) AS slo_last_close
           FROM slo_events WHERE day BETWEEN ? AND ? GROUP BY cluster""",
        [first, last],
    )


def slo_events_between(src, first: date, last: date) -> pd.DataFrame:
    """The SLO verdicts of the days first..last (inclusive), unordered. Columns: cluster, day, violated, close."""
    return src.query("SELECT cluster, day, violated, close FROM slo_events WHERE day BETWEEN ? AND ?", [first, last])


# ---------------------------------------------------------------------------------------------- cluster day


def cluster_day_hours(src, cluster: str, plan_date: date) -> pd.DataFrame:
    """Hourly, for the cluster's plan in force on the day (ordered by hour): the VCC and planned flexible usage,
    the forecast inflexible usage (the plan run's load forecast, else the plan's own) with its upper bound and
    reservation ratio, the plan's power, carbon and intensity, and the measured usage (NULL where not stored).

    Columns: hour, hour_index, vcc_cores, planned_flexible_cpu_cores, forecast_inflexible_cpu_cores,
    forecast_inflexible_upper_cpu_cores, reservation_ratio, power_kw, carbon_kgco2, plan_gco2_per_kwh,
    actual_inflexible_cpu_cores, actual_flexible_cpu_cores, actual_reserved_cpu_cores."""
    return src.query(
        """SELECT v.hour, v.hour_index, v.vcc_cores, v.flexible_cpu_cores AS planned_flexible_cpu_cores,
                  coalesce(f.inflexible_cpu_cores, v.inflexible_cpu_cores) AS forecast_inflexible_cpu_cores,
                  f.inflexible_upper_cpu_cores AS forecast_inflexible_upper_cpu_cores, f.reservation_ratio,
                  v.power_kw, v.carbon_kgco2, v.gco2_per_kwh AS plan_gco2_per_kwh,
                  u.inflexible_cpu_cores AS actual_inflexible_cpu_cores,
                  u.flexible_cpu_cores AS actual_flexible_cpu_cores,
                  u.reserved_cpu_cores AS actual_reserved_cpu_cores
           FROM current_vccs v
           LEFT JOIN load_forecasts f ON f.run_id = v.run_id AND f.cluster = v.cluster AND f.hour = v.hour
           LEFT JOIN usage_history u ON u.cluster = v.cluster AND u.hour = v.hour
           WHERE v.cluster = ? AND v.plan_date = ? ORDER BY v.hour""",
        [cluster, plan_date],
    )


def newest_carbon_forecast(src, zone: str, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    """The zone's newest carbon forecast vintage per hour in [start, end), unordered.

    Columns: hour (the target hour), gco2_per_kwh."""
    return src.query(
        """SELECT target_hour AS hour, gco2_per_kwh FROM carbon_forecasts
           WHERE zone = ? AND target_hour >= ? AND target_hour < ?
           QUALIFY row_number() OVER (PARTITION BY target_hour ORDER BY issued_at DESC) = 1""",
        [zone, start, end],
    )


def carbon_actuals(src, zone: str, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    """The zone's measured carbon intensity in [start, end), unordered. Columns: hour, gco2_per_kwh."""
    return src.query("SELECT hour, gco2_per_kwh FROM carbon_actuals WHERE zone = ? AND hour >= ? AND hour < ?",
                     [zone, start, end])


def storage_plan(src, cluster: str, plan_date: date) -> pd.DataFrame:
    """The storage plan of the cluster's campus in the run in force for the cluster-day (succeeded runs only),
    ordered by hour; empty without one. Columns: hour, solar_kw, charge_kw, discharge_kw, energy_kwh, grid_kw."""
    return src.query(
        "SELECT s.hour, s.solar_kw, s.charge_kw, s.discharge_kw, s.energy_kwh, s.grid_kw FROM storage_plans s"
        " JOIN current_vcc_status v ON v.run_id = s.run_id AND v.campus = s.campus AND v.plan_date = s.plan_date"
        " WHERE v.cluster = ? AND v.plan_date = ? ORDER BY s.hour", [cluster, plan_date])


def battery_applied(src, cluster: str, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    """What the cluster's agent set on the battery, per hour in [start, end): its last applied pass of the hour.
    Columns: hour, battery_charge_kw, battery_max_discharge_kw, detail."""
    return src.query(
        "SELECT hour, battery_charge_kw, battery_max_discharge_kw, detail FROM agent_actions"
        " WHERE cluster = ? AND hour >= ? AND hour < ? AND result = 'applied'"
        " AND (battery_charge_kw IS NOT NULL OR battery_max_discharge_kw IS NOT NULL)"
        " QUALIFY row_number() OVER (PARTITION BY hour ORDER BY acted_at DESC) = 1 ORDER BY hour",
        [cluster, start, end])


def intraday_deviations(src, cluster: str, plan_date: date) -> pd.DataFrame:
    """The agent's stored deviations from the plan of record for the cluster-day (rows without a plan date count
    when their hour is one of the plan in force), ordered by hour. Call only when the store has the table.

    Columns: hour, reason, plan_cores, applied_cores, difference_cores (applied - plan), vcc_cores, detail,
    acted_at, recorded_at, run_id."""
    return src.query(
        """SELECT d.hour, d.reason, d.plan_cores, d.applied_cores, d.applied_cores - d.plan_cores AS difference_cores,
                  d.vcc_cores, d.detail, d.acted_at, d.recorded_at, d.run_id
           FROM intraday_deviations d
           WHERE d.cluster = ? AND (d.plan_date = ? OR (d.plan_date IS NULL AND d.hour IN (
               SELECT hour FROM current_vccs WHERE cluster = ? AND plan_date = ?)))
           ORDER BY d.hour""",
        [cluster, plan_date, cluster, plan_date],
    )


# ---------------------------------------------------------------------------------------------- power models


def power_models_in_force(src, cluster: str, plan_date: date) -> pd.DataFrame:
    """The power models of the cluster's domains fitted by the run whose plan is in force on the day, by domain.

    Columns: the ``power_models`` table's (run_id, cluster, domain, fitted_at, status, reason, model, r2,
    mape_pct, n_samples)."""
    return src.query(
        """SELECT m.* FROM power_models m
           WHERE m.cluster = ? AND m.run_id IN (SELECT run_id FROM current_plans WHERE plan_date = ? AND cluster = ?)
           ORDER BY m.domain""",
        [cluster, plan_date, cluster],
    )


def domain_power_telemetry(src, domain: str, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    """The power domain's telemetry in [start, end), ordered by hour. Columns: hour, cpu_cores, power_kw."""
    return src.query(
        "SELECT hour, cpu_cores, power_kw FROM power_telemetry WHERE domain = ? AND hour >= ? AND hour < ?"
        " ORDER BY hour",
        [domain, start, end],
    )


# ---------------------------------------------------------------------------------------------- forecast errors


def load_forecast_errors(src, cluster: str) -> pd.DataFrame:
    """Per plan date of the cluster (plan in force), the day-ahead inflexible forecast against measured usage:
    MAPE and bias (%), the share of hours above the upper bound (%), hours with measured usage, and hours.
    Errors are NULL for days without measured usage; ordered by plan date.

    Columns: plan_date, inflexible_mape_pct, inflexible_bias_pct, hours_above_upper_pct, hours_with_actuals,
    hours."""
    return src.query(
        """SELECT f.plan_date,
                  avg(abs(u.inflexible_cpu_cores - f.inflexible_cpu_cores) / nullif(u.inflexible_cpu_cores, 0))
                      * 100 AS inflexible_mape_pct,
                  (sum(f.inflexible_cpu_cores - u.inflexible_cpu_cores)
                      / nullif(sum(u.inflexible_cpu_cores), 0)) * 100 AS inflexible_bias_pct,
                  avg(CASE WHEN u.inflexible_cpu_cores > f.inflexible_upper_cpu_cores THEN 1.0 ELSE 0.0 END)
                      * 100 AS hours_above_upper_pct,
                  count(u.hour) AS hours_with_actuals, count(*) AS hours
           FROM load_forecasts f
           JOIN current_plans c ON c.run_id = f.run_id AND c.plan_date = f.plan_date AND c.cluster = f.cluster
           LEFT JOIN usage_history u ON u.cluster = f.cluster AND u.hour = f.hour
           WHERE f.cluster = ? GROUP BY f.plan_date ORDER BY f.plan_date""",
        [cluster],
    )


def carbon_forecast_errors(src, zone: str, cluster: str) -> pd.DataFrame:
    """Per plan date of the cluster (plan in force), the MAPE (%) of the carbon intensity the plan used against
    the zone's measured intensity, unordered. Columns: plan_date, carbon_mape_pct."""
    return src.query(
        """SELECT c.plan_date,
                  avg(abs(v.gco2_per_kwh - a.gco2_per_kwh) / nullif(a.gco2_per_kwh, 0)) * 100
                      AS carbon_mape_pct
           FROM current_vccs v JOIN current_plans c USING (run_id, plan_date, cluster)
           LEFT JOIN carbon_actuals a ON a.zone = ? AND a.hour = v.hour
           WHERE v.cluster = ? GROUP BY c.plan_date""",
        [zone, cluster],
    )


# ---------------------------------------------------------------------------------------------- history


def cluster_plan_history(src, cluster: str, limit: int = 60) -> pd.DataFrame:
    """Every plan stored for the cluster (all runs), newest plan date and run first, marked whether it is the
    plan in force.

    Columns: plan_date, run_id, started_at, status, reason, expected_kgco2, flat_kgco2, saving_pct, in_force."""
    return src.query(
        """SELECT s.plan_date, s.run_id, r.started_at, s.status, s.reason, s.expected_kgco2, s.flat_kgco2,
                  s.saving_pct, (c.run_id IS NOT NULL) AS in_force
           FROM vcc_status s LEFT JOIN runs r USING (run_id)
           LEFT JOIN current_plans c ON c.run_id = s.run_id AND c.plan_date = s.plan_date AND c.cluster = s.cluster
           WHERE s.cluster = ? ORDER BY s.plan_date DESC, r.started_at DESC LIMIT ?""",
        [cluster, limit],
    )


def runs(src, limit: int = 100) -> pd.DataFrame:
    """The newest runs first. Columns: as ``runs_in_force``."""
    return src.query("SELECT * FROM runs ORDER BY started_at DESC LIMIT ?", [limit])


def run_record(src, run_id: str) -> pd.DataFrame:
    """The run (no row for an unknown id). Columns: as ``runs_in_force``."""
    return src.query("SELECT * FROM runs WHERE run_id = ?", [run_id])


def backtest_results(src, cluster: str | None = None, limit: int = 200) -> pd.DataFrame:
    """Stored backtest results, newest window first (then zone, policy): all, or the rows of the cluster's campus
    (backtests are per campus). Call only when the store has the table.

    Columns: the ``backtest_results`` table's but run_id (zone, campus, start_day, days, seed, policy,
    flexible_kgco2, total_kgco2, flexible_reduction_pct, shift_reduction_pct, total_reduction_pct, bound_kgco2,
    bound_share_pct, oracle_share_pct, kwh_per_kcore_hour, peak_kw, slo_violations, cluster_days,
    late_work_pct, delay_mean_hours, delay_p95_hours, unfinished_core_hours, report_dir)."""
    where, params = "", []
    if cluster is not None:
        where, params = "WHERE campus = (SELECT campus FROM current_vcc_status WHERE cluster = ? LIMIT 1)", [cluster]
    return src.query(f"SELECT * EXCLUDE (run_id) FROM backtest_results {where} ORDER BY start_day DESC, zone, policy"
                     f" LIMIT {int(limit)}", params)


# ---------------------------------------------------------------------------------------------- export


def vcc_export_rows(src, plan_date: date, cluster: str | None = None) -> pd.DataFrame:
    """The VCCs in force on the day (all clusters, or one), one row per cluster-hour, by campus, cluster, hour.

    Columns: plan_date, campus, cluster, status, reason, run_id, hour, hour_index, vcc_cores, flexible_cpu_cores,
    inflexible_cpu_cores, power_kw, carbon_kgco2, gco2_per_kwh."""
    sql = """SELECT v.plan_date, s.campus, v.cluster, s.status, s.reason, v.run_id, v.hour, v.hour_index,
                    v.vcc_cores, v.flexible_cpu_cores, v.inflexible_cpu_cores, v.power_kw, v.carbon_kgco2,
                    v.gco2_per_kwh
             FROM current_vccs v JOIN current_vcc_status s USING (run_id, plan_date, cluster)
             WHERE v.plan_date = ?"""
    params: list = [plan_date]
    if cluster:
        sql += " AND v.cluster = ?"
        params.append(cluster)
    return src.query(sql + " ORDER BY s.campus, v.cluster, v.hour", params)
