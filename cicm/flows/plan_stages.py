"""The nightly plan's stages as plain functions: inputs in, frames out. The Prefect flow (nightly.py) wraps
each in a task; tests call them directly.

Per-item trouble (one zone's forecast, one cluster's history) becomes a visible fallback with its reason, stored
with the plan. Only a bug or a failed write fails the run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date

import numpy as np
import pandas as pd

from cicm.config import Campus, Fleet
from cicm.errors import InputError, ProviderError
from cicm.timeutil import local_day_hours_utc, planning_time_utc


@dataclass
class StageReport:
    name: str
    status: str  # "ran" | "degraded" | "failed" | "not-built"
    detail: str = ""


@dataclass
class CampusDay:
    campus: Campus
    hours: pd.DatetimeIndex
    planned_at: pd.Timestamp


@dataclass
class CarbonResult:
    forecasts: pd.DataFrame  # canonical forecast rows of every zone that succeeded
    by_campus: dict[str, pd.Series]  # campus -> gco2_per_kwh over its day's hours
    problems: dict[str, str] = field(default_factory=dict)  # campus -> reason its forecast is missing


def campus_days(fleet: Fleet, plan_date: date) -> list[CampusDay]:
    return [
        CampusDay(c, local_day_hours_utc(plan_date, c.timezone), planning_time_utc(plan_date, c.timezone))
        for c in fleet.campuses
    ]


def fetch_campus_carbon(day: CampusDay, provider: str, seed: int, now: pd.Timestamp | None = None,
                        **provider_options) -> pd.DataFrame:
    """The campus zone's forecast over the campus's local day, issued at planning time (validated)."""
    from cicm.carbon.providers import fetch_forecast

    return fetch_forecast(
        provider,
        day.campus.grid_zone,
        day.hours[0],
        day.hours[-1] + pd.Timedelta(hours=1),
        now=now if now is not None else day.planned_at,
        seed=seed,
        **provider_options,
    )


def collect_carbon(days: list[CampusDay], fetched: dict[str, pd.DataFrame | Exception]) -> CarbonResult:
    """Turn per-campus fetch results (a frame or the exception it raised) into the plan's carbon input."""
    frames, by_campus, problems = [], {}, {}
    for day in days:
        result = fetched[day.campus.name]
        if isinstance(result, (InputError, ProviderError)):
            problems[day.campus.name] = f"no-carbon-forecast: {result}"
            continue
        if isinstance(result, Exception):
            raise result
        frames.append(result)
        series = result.set_index("target_hour")["gco2_per_kwh"].reindex(day.hours)
        if series.isna().any():
            problems[day.campus.name] = "no-carbon-forecast: forecast does not cover the local day"
            continue
        by_campus[day.campus.name] = series
    forecasts = pd.concat(frames, ignore_index=True).drop_duplicates() if frames else pd.DataFrame()
    return CarbonResult(forecasts, by_campus, problems)


def carbon_report(carbon: CarbonResult, days: list[CampusDay]) -> StageReport:
    got = f"{len(carbon.by_campus)}/{len(days)} campuses"
    if carbon.problems:
        detail = "; ".join(f"{k}: {v}" for k, v in carbon.problems.items())
        return StageReport("carbon-forecast", "degraded", f"{got}; {detail}")
    return StageReport("carbon-forecast", "ran", f"{got}, {len(carbon.forecasts)} hourly rows")


# ---------------------------------------------------------------------------------------------- models

POWER_WINDOW_DAYS = 7
LOAD_HISTORY_DAYS = 182


@dataclass
class ClusterModels:
    """What the models stage produced for one cluster: stored rows plus the optimiser's inputs."""

    power_rows: pd.DataFrame
    power_curve: object | None  # cicm.optimize.inputs.PowerCurve
    power_problem: str | None
    load: object  # cicm.models.load.LoadForecast


def fit_cluster_power(cluster, telemetry: pd.DataFrame, now: pd.Timestamp):
    """Fit each power domain on its last 7 days; combine into the cluster's piecewise-linear P(u)."""
    from cicm.models.power import cluster_power_kw, fit_power_model
    from cicm.optimize.inputs import PowerCurve

    rows, models, shares, problems = [], [], [], []
    for domain in cluster.power_domains:
        data = telemetry[telemetry["domain"] == domain.name].set_index("hour")
        row = {"cluster": cluster.name, "domain": domain.name, "fitted_at": now}
        try:
            model = fit_power_model(data["cpu_cores"], data["power_kw"], now, window_days=POWER_WINDOW_DAYS)
        except InputError as exc:
            problems.append(f"{domain.name}: {exc}")
            rows.append({**row, "status": "failed", "reason": str(exc), "model": None, "r2": None,
                         "mape_pct": None, "n_samples": len(data)})
            continue
        rows.append({**row, "status": "ok", "reason": None, "model": json.dumps(model.to_dict()),
                     "r2": model.r2, "mape_pct": model.mape_pct, "n_samples": model.n_samples})
        models.append(model)
        shares.append(domain.capacity_cores / cluster.capacity_cores)
    frame = pd.DataFrame(rows)
    if problems:
        return frame, None, "no-power-model: " + "; ".join(problems)
    knots = {0.0, float(cluster.capacity_cores)}
    for model, share in zip(models, shares):
        knots.update(b / share for b in model.breakpoints_cpu_cores)
    cpu = np.array(sorted(k for k in knots if 0.0 <= k <= cluster.capacity_cores))
    power = np.maximum(np.asarray(cluster_power_kw(models, shares, cpu), dtype=float), 0.0)
    return frame, PowerCurve(cpu_cores=cpu, power_kw=power), None


def forecast_cluster_load(history: pd.DataFrame, day: CampusDay, gamma: float):
    from cicm.models.load import forecast_load

    frame = history.set_index("hour")[["inflexible_cpu_cores", "flexible_cpu_cores", "reserved_cpu_cores"]]
    return forecast_load(frame, day.hours, day.campus.timezone, gamma, day.planned_at)


def cluster_models(store, cluster, day: CampusDay, gamma: float) -> ClusterModels:
    telemetry = store.power_telemetry(cluster.name, before=day.planned_at, days=POWER_WINDOW_DAYS + 1)
    power_rows, curve, problem = fit_cluster_power(cluster, telemetry, day.planned_at)
    history = store.usage_history(cluster.name, before=day.planned_at, days=LOAD_HISTORY_DAYS)
    return ClusterModels(power_rows, curve, problem, forecast_cluster_load(history, day, gamma))


def load_rows(cluster: str, plan_date: date, load) -> tuple[pd.DataFrame, pd.DataFrame]:
    day = pd.DataFrame([{
        "plan_date": plan_date, "cluster": cluster, "status": load.status, "reason": load.reason,
        "flexible_core_hours": load.flexible_core_hours, "reservations_core_hours": load.reservations_core_hours,
        "theta_core_hours": load.theta_core_hours, "reservations_rel_error_q97": load.reservations_rel_error_q97,
        "params": json.dumps(load.parameters, default=str),
    }])
    if not load.ok:
        return pd.DataFrame(), day
    hourly = pd.DataFrame({
        "plan_date": plan_date, "cluster": cluster, "hour": load.target_hours,
        "inflexible_cpu_cores": load.inflexible_cpu_cores.to_numpy(),
        "inflexible_upper_cpu_cores": load.inflexible_upper_cpu_cores.to_numpy(),
        "reservation_ratio": load.reservation_ratio.to_numpy(),
    })
    return hourly, day
