"""What the dashboard shows, as plain frames read from the store (one `Reading`, i.e. one connection).

No Dash here: every function takes an open read-only `Reading` and returns pandas objects, so the numbers on
the pages are testable without a browser. Times in the store are UTC; local times use the campus time zone of
the fleet file. The SQL is in `cicm.store.dashboard`; this module shapes its frames for the pages.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
import pandas as pd

from cicm.reasons import split_reason
from cicm.config import Fleet
from cicm.store import dashboard as reads
from cicm.store.reader import Reading

SLO_WINDOW_DAYS = 30


# ---------------------------------------------------------------------------------------------- fleet


def fleet_frame(fleet: Fleet | None) -> pd.DataFrame:
    """campus, grid_zone, timezone, cluster, capacity_cores of every cluster in the fleet file."""
    rows = []
    if fleet is not None:
        for campus in fleet.campuses:
            for cluster in campus.clusters:
                rows.append({"campus": campus.name, "grid_zone": campus.grid_zone, "timezone": campus.timezone,
                             "cluster": cluster.name, "fleet_capacity_cores": float(cluster.capacity_cores)})
    return pd.DataFrame(rows, columns=["campus", "grid_zone", "timezone", "cluster", "fleet_capacity_cores"])


def cluster_place(fleet: Fleet | None, cluster: str) -> tuple[str | None, str | None, str | None]:
    """(campus, grid_zone, timezone) of a cluster, or Nones when the fleet file does not know it."""
    frame = fleet_frame(fleet)
    hit = frame[frame["cluster"] == cluster]
    if hit.empty:
        return None, None, None
    row = hit.iloc[0]
    return row["campus"], row["grid_zone"], row["timezone"]


# ---------------------------------------------------------------------------------------------- dates


def plan_dates(r: Reading) -> list[date]:
    """Days with a plan in force, newest first."""
    frame = reads.plan_dates(r)
    return [pd.Timestamp(d).date() for d in frame["plan_date"]]


def planned_clusters(r: Reading, plan_date: date) -> list[str]:
    frame = reads.planned_clusters(r, plan_date)
    return list(frame["cluster"])


# ---------------------------------------------------------------------------------------------- overview


def overview(r: Reading, fleet: Fleet | None, plan_date: date) -> pd.DataFrame:
    """One row per cluster (of the fleet file, and of the plan): where it is, whether it is shaped and why not,
    expected carbon against flat, SLO-loop state and the SLO record of the 30 days before the plan date."""
    status = reads.plan_status_on(r, plan_date)
    places = fleet_frame(fleet)
    frame = places.merge(status, on=["cluster"], how="outer", suffixes=("", "_plan"))
    if "campus_plan" in frame:
        frame["campus"] = frame["campus"].fillna(frame["campus_plan"])
        frame = frame.drop(columns=["campus_plan"])
    frame["status"] = frame["status"].fillna("not planned")
    codes = frame["reason"].map(split_reason)
    frame["reason_code"] = [c for c, _ in codes]
    frame["reason_detail"] = [d for _, d in codes]
    frame["saved_kgco2"] = frame["flat_kgco2"] - frame["expected_kgco2"]
    off = shaping_off(r, plan_date)
    frame = frame.merge(off, on="cluster", how="left")
    slo = slo_by_cluster(r, plan_date)
    frame = frame.merge(slo, on="cluster", how="left")
    for col in ("slo_days", "slo_violations", "slo_close"):
        frame[col] = frame[col].fillna(0).astype(int)
    frame["grid_zone"] = frame["grid_zone"].fillna("?")
    return frame.sort_values(["campus", "cluster"], na_position="last").reset_index(drop=True)


def shaping_off(r: Reading, plan_date: date) -> pd.DataFrame:
    """Clusters the SLO loop has switched shaping off for on the plan date, with its reason and end date."""
    frame = reads.shaping_off(r, plan_date)
    return frame if not frame.empty else pd.DataFrame(
        columns=["cluster", "shaping_off_reason", "shaping_off_until"])


def slo_window(plan_date: date) -> tuple[date, date]:
    """The SLO window shown next to a plan: the 30 days that ended the day before the plan date."""
    last = plan_date - timedelta(days=1)
    return last - timedelta(days=SLO_WINDOW_DAYS - 1), last


def slo_by_cluster(r: Reading, plan_date: date) -> pd.DataFrame:
    first, last = slo_window(plan_date)
    frame = reads.slo_by_cluster(r, first, last)
    if frame.empty:
        return pd.DataFrame(columns=["cluster", "slo_days", "slo_violations", "slo_close", "slo_last_day",
                                     "slo_last_violated", "slo_last_close"])
    return frame


@dataclass
class SloSummary:
    window: tuple[date, date]
    days_recorded: int
    violations: int
    close_calls: int
    latest_day: date | None
    latest_met: int
    latest_violated: list[str]
    latest_clusters: int


def slo_summary(r: Reading, plan_date: date) -> SloSummary:
    """The SLO record shown on the overview. The latest evaluated day answers 'did yesterday meet its SLO'."""
    first, last = slo_window(plan_date)
    events = reads.slo_events_between(r, first, last)
    if events.empty:
        return SloSummary((first, last), 0, 0, 0, None, 0, [], 0)
    latest = events["day"].max()
    on_latest = events[events["day"] == latest]
    return SloSummary(
        window=(first, last),
        days_recorded=int(events["day"].nunique()),
        violations=int(events["violated"].sum()),
        close_calls=int((events["close"] & ~events["violated"]).sum()),
        latest_day=pd.Timestamp(latest).date(),
        latest_met=int((~on_latest["violated"]).sum()),
        latest_violated=sorted(on_latest.loc[on_latest["violated"], "cluster"]),
        latest_clusters=len(on_latest),
    )


@dataclass
class CarbonSummary:
    expected_kgco2: float
    flat_kgco2: float
    saved_kgco2: float
    saved_pct: float
    shaped: int
    clusters: int
    without_estimate: list[str]


def carbon_summary(frame: pd.DataFrame) -> CarbonSummary:
    """Expected carbon of the plan against flat, summed over the clusters that have both numbers."""
    planned = frame[frame["status"] != "not planned"]
    known = planned.dropna(subset=["expected_kgco2", "flat_kgco2"])
    expected, flat = float(known["expected_kgco2"].sum()), float(known["flat_kgco2"].sum())
    saved = flat - expected
    return CarbonSummary(
        expected_kgco2=expected, flat_kgco2=flat, saved_kgco2=saved,
        saved_pct=100.0 * saved / flat if flat > 0 else math.nan,
        shaped=int((planned["status"] == "shaped").sum()), clusters=len(planned),
        without_estimate=sorted(set(planned["cluster"]) - set(known["cluster"])),
    )


def run_in_force(r: Reading, plan_date: date) -> pd.DataFrame:
    """The run(s) whose plan is in force on the date (normally one), newest first."""
    return reads.runs_in_force(r, plan_date)


# ---------------------------------------------------------------------------------------------- cluster day


def cluster_status(r: Reading, cluster: str, plan_date: date) -> dict | None:
    frame = reads.cluster_status(r, cluster, plan_date)
    return None if frame.empty else frame.iloc[0].to_dict()


def cluster_day(r: Reading, cluster: str, plan_date: date, zone: str | None) -> pd.DataFrame:
    """Hourly: the VCC in force, its forecast inflexible (and upper bound) and planned flexible usage, the actual
    usage and reservations, and carbon intensity (the plan's, the newest forecast vintage, the actual)."""
    frame = reads.cluster_day_hours(r, cluster, plan_date)
    frame["forecast_gco2_per_kwh"] = np.nan
    frame["actual_gco2_per_kwh"] = np.nan
    if frame.empty or zone is None:
        return frame
    start, end = frame["hour"].min(), frame["hour"].max() + pd.Timedelta(hours=1)
    forecast = reads.newest_carbon_forecast(r, zone, start, end)
    actual = reads.carbon_actuals(r, zone, start, end)
    frame["forecast_gco2_per_kwh"] = frame["hour"].map(forecast.set_index("hour")["gco2_per_kwh"])
    frame["actual_gco2_per_kwh"] = frame["hour"].map(actual.set_index("hour")["gco2_per_kwh"])
    return frame


def storage_day(r: Reading, cluster: str, plan_date: date) -> pd.DataFrame:
    """The campus's storage plan for the cluster-day (hourly: solar forecast, planned charge and discharge, planned
    energy at the hour's end, grid) beside what the agent applied on the battery that hour (charge rate, max
    discharge; NaN where it applied nothing). Empty when the plan in force has no storage."""
    if not r.has_table("storage_plans"):
        return pd.DataFrame()
    plan = reads.storage_plan(r, cluster, plan_date)
    if plan.empty:
        return plan
    plan["hour"] = pd.to_datetime(plan["hour"], utc=True)
    start, end = plan["hour"].min(), plan["hour"].max() + pd.Timedelta(hours=1)
    applied = reads.battery_applied(r, cluster, start, end) if r.has_table("agent_actions") else pd.DataFrame()
    if applied.empty:
        applied = pd.DataFrame(columns=["hour", "battery_charge_kw", "battery_max_discharge_kw", "detail"])
    applied["hour"] = pd.to_datetime(applied["hour"], utc=True)
    return plan.merge(applied, on="hour", how="left")


DEVIATION_COLUMNS = ["hour", "reason", "plan_cores", "applied_cores", "difference_cores", "vcc_cores", "detail",
                     "acted_at", "recorded_at", "run_id"]


def intraday_deviations(r: Reading, cluster: str, plan_date: date) -> pd.DataFrame:
    """The agent's hourly corrections of the cluster-day: each hour whose applied flexible allowance differs from
    the plan of record (cluster cores), with its reason and detail, ordered by hour. Empty when there are none,
    or the store predates the table."""
    if not r.has_table("intraday_deviations"):
        return pd.DataFrame(columns=DEVIATION_COLUMNS)
    frame = reads.intraday_deviations(r, cluster, plan_date)
    return frame[DEVIATION_COLUMNS]


def deviation_summary(deviations: pd.DataFrame) -> dict:
    """Hours and core-hours above and below the plan of record (as the backtests report them per cluster-day)."""
    diff = deviations["difference_cores"].astype(float) if len(deviations) else pd.Series(dtype=float)
    return {"hours": len(deviations), "hours_above_plan": int((diff > 0).sum()),
            "core_hours_above_plan": float(diff[diff > 0].sum()), "hours_below_plan": int((diff < 0).sum()),
            "core_hours_below_plan": float(-diff[diff < 0].sum()),
            "reasons": deviations["reason"].value_counts().to_dict() if len(deviations) else {}}


def to_local(hours: pd.Series, tz: str | None) -> pd.Series:
    """UTC hours as naive local wall-clock times, for chart axes (the axis title names the zone)."""
    hours = pd.to_datetime(hours, utc=True)
    return hours.dt.tz_convert(tz or "UTC").dt.tz_localize(None)


# ---------------------------------------------------------------------------------------------- power models


@dataclass
class DomainFit:
    domain: str
    status: str
    reason: str | None
    r2: float | None
    mape_pct: float | None
    telemetry: pd.DataFrame  # hour, cpu_cores, power_kw within the model's window
    line_cpu: np.ndarray
    line_kw: np.ndarray
    breakpoints: tuple[float, ...]


def power_fits(r: Reading, cluster: str, plan_date: date) -> list[DomainFit]:
    """Each power domain's model of the plan in force, with the telemetry it was fitted on."""
    from cicm.models.power import PowerModel, predict_power_kw

    models = reads.power_models_in_force(r, cluster, plan_date)
    fits = []
    for row in models.itertuples(index=False):
        model = None
        if isinstance(row.model, str) and row.model:
            try:
                model = PowerModel.from_dict(json.loads(row.model))
            except (ValueError, KeyError):
                model = None
        if model is not None:
            start, end = model.window_start, model.window_end
        else:
            end = pd.Timestamp(row.fitted_at)
            start = end - pd.Timedelta(days=7)
        telemetry = reads.domain_power_telemetry(r, row.domain, start, end)
        line_cpu = np.array([])
        line_kw = np.array([])
        breakpoints: tuple[float, ...] = ()
        if model is not None:
            lo = min(model.breakpoints_cpu_cores[0], float(telemetry["cpu_cores"].min())) if len(telemetry) else \
                model.breakpoints_cpu_cores[0]
            hi = max(model.breakpoints_cpu_cores[3], float(telemetry["cpu_cores"].max())) if len(telemetry) else \
                model.breakpoints_cpu_cores[3]
            line_cpu = np.array(sorted({lo, *model.breakpoints_cpu_cores, hi}))
            line_kw = np.asarray(predict_power_kw(model, line_cpu), dtype=float)
            breakpoints = tuple(model.breakpoints_cpu_cores)
        fits.append(DomainFit(row.domain, row.status, row.reason, _num(row.r2), _num(row.mape_pct), telemetry,
                              line_cpu, line_kw, breakpoints))
    return fits


def _num(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


# ---------------------------------------------------------------------------------------------- forecast errors


def forecast_errors(r: Reading, cluster: str, zone: str | None) -> pd.DataFrame:
    """Per plan date stored for the cluster (plan in force): the day-ahead inflexible forecast against actual
    usage (MAPE, bias, share of hours above the upper bound) and the carbon forecast used against actual (MAPE).
    Days whose actual usage is not in the store yet have NaN errors."""
    load = reads.load_forecast_errors(r, cluster)
    if zone is not None:
        carbon = reads.carbon_forecast_errors(r, zone, cluster)
        load = load.merge(carbon, on="plan_date", how="outer").sort_values("plan_date")
    else:
        load["carbon_mape_pct"] = np.nan
    return load.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- history


def cluster_plan_history(r: Reading, cluster: str, limit: int = 60) -> pd.DataFrame:
    """Every plan stored for the cluster (all runs), newest first, marked whether it is the plan in force."""
    return reads.cluster_plan_history(r, cluster, limit)


def runs(r: Reading, limit: int = 100) -> pd.DataFrame:
    frame = reads.runs(r, limit)
    frame["seconds"] = (frame["finished_at"] - frame["started_at"]).dt.total_seconds()
    return frame


def run_record(r: Reading, run_id: str) -> dict | None:
    frame = reads.run_record(r, run_id)
    return None if frame.empty else frame.iloc[0].to_dict()


def parse_json(text) -> dict | list | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def backtest_results(r: Reading, cluster: str | None = None, limit: int = 200) -> pd.DataFrame | None:
    """The stored backtest results (`cicm backtest --db`), newest window first; None when there are none.
    Backtests are per campus, so a cluster's page shows its campus's rows."""
    if not r.has_table("backtest_results"):
        return None
    rows = reads.backtest_results(r, cluster, limit)
    return None if rows.empty else rows


# ---------------------------------------------------------------------------------------------- export


EXPORT_COLUMNS = [
    "plan_date", "campus", "cluster", "status", "reason", "run_id", "hour_utc", "hour_local", "hour_index",
    "vcc_cores", "flexible_cpu_cores", "inflexible_cpu_cores", "power_kw", "carbon_kgco2", "gco2_per_kwh",
]


def vcc_export(r: Reading, fleet: Fleet | None, plan_date: date, cluster: str | None = None) -> pd.DataFrame:
    """The VCCs in force on a day (all clusters, or one), one row per cluster-hour, as the CSV export has them."""
    frame = reads.vcc_export_rows(r, plan_date, cluster)
    tz = dict(zip(fleet_frame(fleet)["cluster"], fleet_frame(fleet)["timezone"]))
    hours = pd.to_datetime(frame["hour"], utc=True)
    frame["hour_utc"] = hours.dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    frame["hour_local"] = [
        h.tz_convert(tz.get(c, "UTC")).isoformat() for h, c in zip(hours, frame["cluster"])
    ]
    frame["plan_date"] = pd.to_datetime(frame["plan_date"]).dt.strftime("%Y-%m-%d")
    return frame[EXPORT_COLUMNS]
