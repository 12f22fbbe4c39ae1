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
    load: object | None  # cicm.models.load.LoadForecast; None when the history was rejected
    load_problem: str | None  # "insufficient-history: ..." or "bad-history: ..."


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


def cluster_models_from_frames(cluster, telemetry: pd.DataFrame, history: pd.DataFrame, day: CampusDay,
                                gamma: float) -> ClusterModels:
    """Power models and load forecast of one cluster from its telemetry frames (the backtest calls this too)."""
    power_rows, curve, problem = fit_cluster_power(cluster, telemetry, day.planned_at)
    try:
        load = forecast_cluster_load(history, day, gamma)
    except InputError as exc:  # gaps, NaN, duplicates in telemetry: this cluster is not shaped, and we say why
        return ClusterModels(power_rows, curve, problem, None, f"bad-history: {exc}")
    return ClusterModels(power_rows, curve, problem, load,
                         None if load.ok else f"insufficient-history: {load.reason}")


def cluster_models(store, cluster, day: CampusDay, gamma: float) -> ClusterModels:
    telemetry = store.power_telemetry(cluster.name, before=day.planned_at, days=POWER_WINDOW_DAYS + 1)
    history = store.usage_history(cluster.name, before=day.planned_at, days=LOAD_HISTORY_DAYS)
    return cluster_models_from_frames(cluster, telemetry, history, day, gamma)


def load_rows(cluster: str, plan_date: date, load, problem: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    if load is None:
        return pd.DataFrame(), pd.DataFrame([{
            "plan_date": plan_date, "cluster": cluster, "status": "bad-history", "reason": problem,
            "flexible_core_hours": None, "reservations_core_hours": None, "theta_core_hours": None,
            "reservations_rel_error_q97": None, "params": "{}",
        }])
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


# ---------------------------------------------------------------------------------------------- the program


@dataclass
class PlanClustersResult:
    reports: list[StageReport]
    vccs: pd.DataFrame
    status: pd.DataFrame
    extra_tables: dict[str, pd.DataFrame]


FORECAST_VALUE_WINDOW_DAYS = 28


def campus_forecast_value(store, day: CampusDay, delta: float):
    """What following the zone's day-ahead forecasts would have saved over the last 28 days (None: unknown)."""
    from cicm.models.carbon_skill import forecast_value

    start = day.planned_at - pd.Timedelta(days=FORECAST_VALUE_WINDOW_DAYS)
    forecasts = store.day_ahead_forecasts(day.campus.grid_zone, start, day.planned_at)
    actuals = store.carbon_actuals(day.campus.grid_zone, start, day.planned_at)
    return forecast_value(forecasts, actuals, day.campus.timezone, delta)


def low_benefit_reason(value, min_value_pct: float) -> str | None:
    """Shape only where following the forecast has paid: a planner that risks SLOs to chase noise has the wrong
    priorities. Unknown value (too few stored days) does not block shaping."""
    if value is None or value.realised_cut_pct >= min_value_pct:
        return None
    return f"low-benefit: {value.describe()}, below the {min_value_pct:g}% needed to shape"


def shaping_disabled(store, cluster: str, plan_date: date) -> str | None:
    """The SLO loop's verdict for this cluster and day: None, or why shaping is off."""
    found = store.query(
        "SELECT reason, disabled_until FROM shaping_state WHERE cluster = ? AND disabled_from <= ?"
        " AND disabled_until >= ? ORDER BY disabled_from DESC LIMIT 1",
        [cluster, plan_date, plan_date],
    )
    if found.empty:
        return None
    return f"{found['reason'].iloc[0]} (shaping off until {found['disabled_until'].iloc[0]})"


def unplanned_rows(cluster, campus: str, plan_date: date, hours: pd.DatetimeIndex, reason: str,
                   carbon: pd.Series | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A cluster the program cannot even see (no forecast, no carbon): full capacity, reason stored."""
    code, _, detail = reason.partition(": ")
    vccs = pd.DataFrame({
        "plan_date": plan_date, "cluster": cluster.name, "hour": hours, "hour_index": np.arange(len(hours)),
        "vcc_cores": float(cluster.capacity_cores), "flexible_cpu_cores": np.nan, "inflexible_cpu_cores": np.nan,
        "power_kw": np.nan, "carbon_kgco2": np.nan,
        "gco2_per_kwh": carbon.to_numpy() if carbon is not None else np.nan,
    })
    status = pd.DataFrame([{
        "plan_date": plan_date, "cluster": cluster.name, "campus": campus, "status": "fallback",
        "reason": code if not detail else f"{code}: {detail}", "capacity_cores": float(cluster.capacity_cores),
        "theta_core_hours": np.nan, "tau_core_hours": np.nan, "expected_kgco2": np.nan, "flat_kgco2": np.nan,
        "saving_pct": np.nan, "peak_kw": np.nan,
    }])
    return vccs, status


def cluster_input(cluster, models: ClusterModels, preset: str | None):
    from cicm.optimize.inputs import ClusterInput

    load = models.load
    code, _, detail = (preset or "").partition(": ")
    return ClusterInput(
        name=cluster.name,
        inflexible_cpu_cores=load.inflexible_cpu_cores.to_numpy(),
        inflexible_upper_cpu_cores=load.inflexible_upper_cpu_cores.to_numpy(),
        flexible_core_hours=load.flexible_core_hours,
        reservations_core_hours=load.reservations_core_hours,
        reservation_ratio=load.reservation_ratio.to_numpy(),
        reservations_rel_error_q97=load.reservations_rel_error_q97,
        capacity_cores=float(cluster.capacity_cores) * float(load.reservation_ratio.max()),
        power_capped_capacity_cores=float(cluster.capacity_cores),
        power_curve=models.power_curve,
        fallback_reason=code or None,
        fallback_detail=detail or None,
    )


def campus_input(campus: Campus, inputs: list, carbon_gco2_per_kwh: np.ndarray, hours: pd.DatetimeIndex,
                 options):
    """The campus program's input: its clusters, the carbon forecast and the plan options' knobs."""
    from cicm.optimize.inputs import CampusInput

    return CampusInput(
        clusters=inputs, carbon_gco2_per_kwh=carbon_gco2_per_kwh, contract_limit_kw=campus.contract_limit_kw,
        lambda_e=options.lambda_e, lambda_p=options.lambda_p, delta_min=options.delta_min,
        delta_max=options.delta_max, ramp_limit=options.ramp_limit, solver=options.solver, hours=hours,
        name=campus.name,
    )


def plan_rows(plan, plan_date: date, capacity: dict[str, float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    hourly = plan.hourly
    vccs = pd.DataFrame({
        "plan_date": plan_date, "cluster": hourly["cluster"], "hour": hourly["hour"],
        "hour_index": hourly["hour_index"], "vcc_cores": hourly["vcc_cores"],
        "flexible_cpu_cores": hourly["flexible_cpu_cores"], "inflexible_cpu_cores": hourly["inflexible_cpu_cores"],
        "power_kw": hourly["power_kw"], "carbon_kgco2": hourly["carbon_kgco2"],
        "gco2_per_kwh": hourly["carbon_gco2_per_kwh"],
    })
    c = plan.clusters
    reason = [r if not isinstance(d, str) or not d else f"{r}: {d}" if r else None
              for r, d in zip(c["reason"], c["reason_detail"])]
    status = pd.DataFrame({
        "plan_date": plan_date, "cluster": c["cluster"], "campus": c["campus"], "status": c["status"],
        "reason": reason, "capacity_cores": c["cluster"].map(capacity),
        "theta_core_hours": c["theta_core_hours"], "tau_core_hours": c["tau_core_hours"],
        "expected_kgco2": c["expected_kgco2"], "flat_kgco2": c["flat_kgco2"], "saving_pct": c["saving_pct"],
        "peak_kw": c["peak_kw"],
    })
    return vccs, status


def plan_campus_day(store, day: CampusDay, plan_date: date, carbon: pd.Series | None, options,
                    problem: str | None) -> dict:
    """Models and program for one campus. Returns frames for the store and per-stage notes."""
    from cicm.optimize.program import plan_campus

    out = {"vccs": [], "status": [], "power_models": [], "load_forecasts": [], "load_forecast_days": [],
           "notes": {"forecast-value": [], "power-models": [], "load-forecast": [], "vcc-program": []}}
    inputs = []
    value = campus_forecast_value(store, day, options.delta_max)
    low_benefit = low_benefit_reason(value, options.min_forecast_value_pct)
    out["notes"]["forecast-value"].append(
        f"{day.campus.name} ({day.campus.grid_zone}): "
        + (f"{value.realised_cut_pct:.1f}% (perfect {value.ceiling_cut_pct:.1f}%)" if value else "unknown")
        + (" → not shaped" if low_benefit else ""))
    for cluster in day.campus.clusters:
        models = cluster_models(store, cluster, day, options.gamma)
        out["power_models"].append(models.power_rows)
        hourly, daily = load_rows(cluster.name, plan_date, models.load, models.load_problem)
        out["load_forecasts"].append(hourly)
        out["load_forecast_days"].append(daily)
        if models.power_problem:
            out["notes"]["power-models"].append(f"{cluster.name}: {models.power_problem}")
        if models.load_problem:
            out["notes"]["load-forecast"].append(f"{cluster.name}: {models.load_problem}")
        reason = problem or models.load_problem or models.power_problem
        if reason:
            vccs, status = unplanned_rows(cluster, day.campus.name, plan_date, day.hours, reason, carbon)
            out["vccs"].append(vccs)
            out["status"].append(status)
            continue
        preset = shaping_disabled(store, cluster.name, plan_date) or low_benefit
        inputs.append(cluster_input(cluster, models, preset))
    if inputs:
        plan = plan_campus(campus_input(day.campus, inputs, carbon.to_numpy(), day.hours, options))
        vccs, status = plan_rows(plan, plan_date, {c.name: float(c.capacity_cores) for c in day.campus.clusters})
        out["vccs"].append(vccs)
        out["status"].append(status)
        out["notes"]["vcc-program"].append(
            f"{day.campus.name}: {plan.lp_status} via {plan.solver} in {plan.solve_seconds:.2f} s"
            + (f" ({plan.message})" if plan.message else "")
        )
    return out


def plan_clusters(store, fleet: Fleet, plan_date: date, days: list[CampusDay], carbon: CarbonResult,
                  options) -> PlanClustersResult:
    parts = [
        plan_campus_day(store, day, plan_date, carbon.by_campus.get(day.campus.name), options,
                        carbon.problems.get(day.campus.name))
        for day in days
    ]

    def cat(key: str) -> pd.DataFrame:
        frames = [f for p in parts for f in p[key] if not f.empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    status = cat("status")
    reports = []
    for stage in ("forecast-value", "power-models", "load-forecast", "vcc-program"):
        notes = [n for p in parts for n in p["notes"][stage]]
        degraded = stage in ("power-models", "load-forecast") and notes
        reports.append(StageReport(stage, "degraded" if degraded else "ran", "; ".join(notes) or "all clusters"))
    shaped = int((status["status"] == "shaped").sum()) if not status.empty else 0
    reports[-1].detail = f"{shaped}/{len(status)} clusters shaped; " + reports[-1].detail
    return PlanClustersResult(
        reports, cat("vccs"), status,
        {"power_models": cat("power_models"), "load_forecasts": cat("load_forecasts"),
         "load_forecast_days": cat("load_forecast_days")},
    )


def cluster_summary(status: pd.DataFrame) -> pd.DataFrame:
    """One short row per cluster for the printed summary: reason codes only (details are in the store)."""
    if status.empty:
        return status
    return pd.DataFrame({
        "campus": status["campus"], "cluster": status["cluster"], "status": status["status"],
        "reason": status["reason"].map(lambda r: r.split(":")[0] if isinstance(r, str) else None),
        "theta_kcore_h": status["theta_core_hours"] / 1000.0,
        "plan_kgco2": status["expected_kgco2"], "flat_kgco2": status["flat_kgco2"],
        "saving_pct": status["saving_pct"],
    }).sort_values(["campus", "cluster"]).reset_index(drop=True)
