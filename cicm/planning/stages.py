"""The nightly plan's stages as plain functions: inputs in, frames out. The Prefect flow (nightly.py) wraps
each in a task; tests call them directly.

Per-item trouble (one zone's forecast, one cluster's history) becomes a visible fallback with its reason, stored
with the plan. Only a bug or a failed write fails the run.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import date

import numpy as np
import pandas as pd

from cicm.reasons import StageStatus, join_reason, split_reason
from typing import TYPE_CHECKING

from cicm.config import Campus, Fleet
from cicm.errors import InputError, ProviderError
from cicm.timeutil import local_day_hours_utc, planning_time_utc

if TYPE_CHECKING:
    from cicm.models.load import LoadForecast
    from cicm.optimize.inputs import PowerCurve

_H = pd.Timedelta(hours=1)


@dataclass
class StageReport:
    name: str
    status: StageStatus
    detail: str = ""


@dataclass
class CampusDay:
    campus: Campus
    hours: pd.DatetimeIndex
    planned_at: pd.Timestamp


@dataclass
class CarbonResult:
    forecasts: pd.DataFrame  # canonical forecast rows of every zone that succeeded
    by_campus: dict[str, pd.Series]  # campus -> gco2_per_kwh over its day's hours and any look-ahead
    problems: dict[str, str] = field(default_factory=dict)  # campus -> reason its forecast is missing


def zone_day_key(day: CampusDay) -> tuple:
    """Campuses with equal keys have the same carbon forecast and forecast value (same source, zone, hours,
    issue time)."""
    return day.campus.carbon, day.campus.grid_zone, day.hours[0], len(day.hours), day.planned_at


def carbon_source(campus: Campus, options) -> tuple[str, dict]:
    """(provider, its options: base_url, path) of a campus's forecasts: its own ``[campuses.carbon]`` table,
    else the run's ``--provider`` with ``--base-url`` and ``--csv``."""
    if campus.carbon is not None:
        src = campus.carbon
        return src.provider, {k: v for k, v in (("base_url", src.base_url), ("path", src.forecast_csv)) if v}
    extra = {k: v for k, v in (("base_url", options.base_url), ("path", options.csv_path)) if v}
    return options.provider, extra


def campus_days(fleet: Fleet, plan_date: date) -> list[CampusDay]:
    return [
        CampusDay(c, local_day_hours_utc(plan_date, c.timezone), planning_time_utc(plan_date, c.timezone))
        for c in fleet.campuses
    ]


def carbon_window_end(day: CampusDay, options) -> pd.Timestamp:
    """Where the campus's carbon forecast must reach: the local day's end, or for the queue program its
    look-ahead (``horizon_hours`` from planning time), whichever is later."""
    day_end = day.hours[-1] + _H
    if getattr(options, "program", "ceiling") != "queue":
        return day_end
    return max(day_end, day.planned_at.floor("h") + pd.Timedelta(hours=int(options.horizon_hours)))


def fetch_campus_carbon(day: CampusDay, provider: str, seed: int, now: pd.Timestamp | None = None,
                        end: pd.Timestamp | None = None, **provider_options) -> pd.DataFrame:
    """The campus zone's forecast from the start of the campus's local day to ``end`` (default: the day's end),
    issued at planning time (validated)."""
    from cicm.carbon.providers import fetch_forecast

    return fetch_forecast(
        provider,
        day.campus.grid_zone,
        day.hours[0],
        end if end is not None else day.hours[-1] + _H,
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
        series = covered_forecast(result.set_index("target_hour")["gco2_per_kwh"], day.hours[0])
        if len(series) < len(day.hours):
            problems[day.campus.name] = "no-carbon-forecast: forecast does not cover the local day"
            continue
        by_campus[day.campus.name] = series
    forecasts = pd.concat(frames, ignore_index=True).drop_duplicates() if frames else pd.DataFrame()
    return CarbonResult(forecasts, by_campus, problems)


def covered_forecast(gco2_per_kwh: pd.Series, start: pd.Timestamp) -> pd.Series:
    """The forecast's unbroken hourly run from ``start``: it stops at the first missing or NaN hour."""
    if gco2_per_kwh.empty:
        return gco2_per_kwh.iloc[:0]
    hours = pd.date_range(start, max(gco2_per_kwh.index.max(), start), freq="h")
    series = gco2_per_kwh[~gco2_per_kwh.index.duplicated(keep="last")].reindex(hours)
    missing = np.flatnonzero(series.isna().to_numpy())
    return series.iloc[: missing[0] if missing.size else len(series)]


def carbon_report(carbon: CarbonResult, days: list[CampusDay]) -> StageReport:
    got = f"{len(carbon.by_campus)}/{len(days)} campuses"
    if carbon.problems:
        detail = "; ".join(f"{k}: {v}" for k, v in carbon.problems.items())
        return StageReport("carbon-forecast", StageStatus.DEGRADED, f"{got}; {detail}")
    return StageReport("carbon-forecast", StageStatus.RAN, f"{got}, {len(carbon.forecasts)} hourly rows")


# ---------------------------------------------------------------------------------------------- models

POWER_WINDOW_DAYS = 7
LOAD_HISTORY_DAYS = 182


@dataclass
class ClusterModels:
    """What the models stage produced for one cluster: stored rows plus the optimiser's inputs."""

    power_rows: pd.DataFrame
    power_curve: PowerCurve | None
    power_problem: str | None
    load: LoadForecast | None  # None when the history was rejected
    load_problem: str | None  # "insufficient-history: ..." or "bad-history: ..."


def fit_domain_power_models(telemetry: pd.DataFrame, now: pd.Timestamp) -> dict:
    """Every power domain's model on its last 7 days (domain -> PowerModel, or the InputError saying why not),
    all domains in one batch."""
    from cicm.models.power import fit_power_models_batch

    if telemetry.empty:
        return {}
    return fit_power_models_batch(telemetry, now, window_days=POWER_WINDOW_DAYS)


@dataclass(frozen=True)
class DeclaredFit:
    """A domain planned on its declared curve (SPECpower row or its own points) because no fit was possible."""

    model: object  # PowerModel of the declared curve
    reason: str


def with_declared_curves(clusters, fits: dict, now: pd.Timestamp) -> dict:
    """``fits`` where every domain without a fit (failed, or no telemetry) but with a declared curve gets that
    curve's model, as a :class:`DeclaredFit` saying why. Domains with neither keep their InputError."""
    from cicm.models.power import power_model_from_curve

    out = dict(fits)
    for cluster in clusters:
        for domain in cluster.power_domains:
            fit = fits.get(domain.name, InputError("cpu_cores", "no power telemetry in the window"))
            curve = domain.declared_curve_kw() if isinstance(fit, InputError) else None
            if curve is not None:
                source = "power_points" if domain.power_points is not None else f"SPECpower row {domain.spec_row}"
                cpu_cores, power_kw = curve
                out[domain.name] = DeclaredFit(power_model_from_curve(cpu_cores, power_kw, now),
                                               f"declared curve ({source}) used: {fit}")
    return out


def _fitted(model):
    return model.model if isinstance(model, DeclaredFit) else model


def power_model_rows(cluster, fits: dict, telemetry_rows: dict[str, int], now: pd.Timestamp) -> list[dict]:
    """The power_models rows of one cluster's domains (a domain with no telemetry has no fit: it failed; one
    planned on its declared curve is ``ok`` with the reason saying so)."""
    rows = []
    for domain in cluster.power_domains:
        row = {"cluster": cluster.name, "domain": domain.name, "fitted_at": now}
        found = fits.get(domain.name, InputError("cpu_cores", "no power telemetry in the window"))
        if isinstance(found, InputError):
            rows.append({**row, "status": "failed", "reason": str(found), "model": None, "r2": None,
                         "mape_pct": None, "n_samples": telemetry_rows.get(domain.name, 0)})
            continue
        model = _fitted(found)
        reason = found.reason if isinstance(found, DeclaredFit) else None
        n_samples = telemetry_rows.get(domain.name, 0) if reason else model.n_samples
        rows.append({**row, "status": "ok", "reason": reason, "model": json.dumps(model.to_dict()),
                     "r2": model.r2, "mape_pct": model.mape_pct, "n_samples": n_samples})
    return rows


def declared_notes(cluster, fits: dict) -> list[str]:
    """One note per domain of the cluster planned on its declared curve."""
    return [f"{d.name}: {fits[d.name].reason}" for d in cluster.power_domains
            if isinstance(fits.get(d.name), DeclaredFit)]


def cluster_power_curve(cluster, fits: dict):
    """The cluster's piecewise-linear P(u) from its domains' models, or (None, "no-power-model: ...")."""
    from cicm.models.power import cluster_power_kw
    from cicm.optimize.inputs import PowerCurve

    missing = InputError("cpu_cores", "no power telemetry in the window")
    problems = [f"{d.name}: {fits.get(d.name, missing)}" for d in cluster.power_domains
                if isinstance(fits.get(d.name, missing), InputError)]
    if problems:
        return None, "no-power-model: " + "; ".join(problems)
    models = [_fitted(fits[d.name]) for d in cluster.power_domains]
    shares = [d.capacity_cores / cluster.capacity_cores for d in cluster.power_domains]
    knots = {0.0, float(cluster.capacity_cores)}
    for model, share in zip(models, shares):
        knots.update(b / share for b in model.breakpoints_cpu_cores)
    cpu = np.array(sorted(k for k in knots if 0.0 <= k <= cluster.capacity_cores))
    power = np.maximum(np.asarray(cluster_power_kw(models, shares, cpu), dtype=float), 0.0)
    return PowerCurve(cpu_cores=cpu, power_kw=power), None


def fit_cluster_power(cluster, telemetry: pd.DataFrame, now: pd.Timestamp):
    """One cluster's power_models rows, its P(u) curve and the problem (None if both domains fitted)."""
    fits = with_declared_curves([cluster], fit_domain_power_models(telemetry, now), now)
    counts = telemetry.groupby("domain").size().to_dict() if len(telemetry) else {}
    curve, problem = cluster_power_curve(cluster, fits)
    return pd.DataFrame(power_model_rows(cluster, fits, counts, now)), curve, problem


def forecast_cluster_load(history: pd.DataFrame, day: CampusDay, gamma: float):
    from cicm.models.load import forecast_load

    frame = history.set_index("hour")[["inflexible_cpu_cores", "flexible_cpu_cores", "reserved_cpu_cores"]]
    return forecast_load(frame, day.hours, day.campus.timezone, gamma, day.planned_at)


def forecast_campus_load(usage: pd.DataFrame, day: CampusDay, gamma: float, clusters: list[str]) -> dict:
    """Each named cluster's LoadForecast, or the InputError its history raised (cluster -> either), all in one
    batch; a cluster with no rows at all is forecast from an empty history (insufficient)."""
    from cicm.models.load import forecast_load_batch

    columns = ["cluster", "hour", "inflexible_cpu_cores", "flexible_cpu_cores", "reserved_cpu_cores"]
    out = forecast_load_batch(usage[columns], day.hours, day.campus.timezone, gamma, day.planned_at) \
        if len(usage) else {}
    for name in clusters:
        if name not in out:
            try:
                out[name] = forecast_cluster_load(usage[columns].iloc[:0], day, gamma)
            except InputError as exc:
                out[name] = exc
    return {name: out[name] for name in clusters}


def forecast_campus_load_arrays(reads: "CampusReads", day: CampusDay, gamma: float) -> dict:
    """:func:`forecast_campus_load` on a campus's rows as the partition read them (numpy columns, no frame): each
    cluster's LoadForecast or InputError, in the campus's order."""
    from cicm.models.load import forecast_load_arrays

    return forecast_load_arrays(reads.usage_codes, reads.names, reads.usage_hour_ns, reads.usage_values, day.hours,
                                day.campus.timezone, gamma, day.planned_at)


def load_problem(load) -> str | None:
    if isinstance(load, InputError):
        return f"bad-history: {load}"
    return None if load.ok else f"insufficient-history: {load.reason}"


def cluster_models_from_frames(cluster, telemetry: pd.DataFrame, history: pd.DataFrame, day: CampusDay,
                                gamma: float) -> ClusterModels:
    """Power models and load forecast of one cluster from its telemetry frames (the backtest calls this)."""
    power_rows, curve, problem = fit_cluster_power(cluster, telemetry, day.planned_at)
    load = forecast_campus_load(history.assign(cluster=cluster.name), day, gamma, [cluster.name])[cluster.name]
    return ClusterModels(power_rows, curve, problem, None if isinstance(load, InputError) else load,
                         load_problem(load))


def load_day_row(cluster: str, plan_date: date, load) -> dict:
    """The load_forecast_days row of one cluster (its forecast's daily figures, or why there is none)."""
    if isinstance(load, InputError):
        return {"plan_date": plan_date, "cluster": cluster, "status": "bad-history", "reason": load_problem(load),
                "flexible_core_hours": None, "reservations_core_hours": None, "theta_core_hours": None,
                "reservations_rel_error_q97": None, "params": "{}"}
    return {"plan_date": plan_date, "cluster": cluster, "status": load.status, "reason": load.reason,
            "flexible_core_hours": load.flexible_core_hours, "reservations_core_hours": load.reservations_core_hours,
            "theta_core_hours": load.theta_core_hours, "reservations_rel_error_q97": load.reservations_rel_error_q97,
            "params": json.dumps(load.parameters, default=str)}


def load_hour_rows(plan_date: date, loads: dict) -> pd.DataFrame:
    """The load_forecasts rows (hourly) of every cluster whose forecast is ok, as one frame."""
    ok = [(name, load) for name, load in loads.items() if not isinstance(load, InputError) and load.ok]
    if not ok:
        return pd.DataFrame()
    n = [len(load.target_hours) for _, load in ok]
    return pd.DataFrame({
        "plan_date": plan_date, "cluster": np.repeat([name for name, _ in ok], n),
        "hour": np.concatenate([load.target_hours.as_unit("ns").asi8 for _, load in ok]).view("datetime64[ns]"),
        "inflexible_cpu_cores": np.concatenate([load.inflexible_values for _, load in ok]),
        "inflexible_upper_cpu_cores": np.concatenate([load.inflexible_upper_values for _, load in ok]),
        "reservation_ratio": np.concatenate([load.ratio_values for _, load in ok]),
    }).assign(hour=lambda f: pd.to_datetime(f["hour"], utc=True))


# ---------------------------------------------------------------------------------------------- the program


@dataclass
class PlanClustersResult:
    reports: list[StageReport]
    vccs: pd.DataFrame
    status: pd.DataFrame
    extra_tables: dict[str, pd.DataFrame]
    seconds: dict[str, float] = field(default_factory=dict)  # per step, summed over partitions


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
    return shaping_disabled_many(store, [cluster], plan_date).get(cluster)


def shaping_disabled_many(store, clusters: list[str], plan_date: date) -> dict[str, str]:
    """Why shaping is off on `plan_date`, for each named cluster whose shaping the SLO loop switched off."""
    from cicm.store.plan import shaping_switched_off

    found = shaping_switched_off(store, clusters, plan_date)
    return {r.cluster: f"{r.reason} (shaping off until {r.disabled_until})" for r in found.itertuples()}


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
    assert load is not None, "cluster_input needs the cluster's load forecast"
    flexible, reservations, q97 = load.flexible_core_hours, load.reservations_core_hours, \
        load.reservations_rel_error_q97
    assert flexible is not None and reservations is not None and q97 is not None, "an ok forecast has its figures"
    code, detail = split_reason(preset)
    return ClusterInput(
        name=cluster.name,
        inflexible_cpu_cores=load.inflexible_values,
        inflexible_upper_cpu_cores=load.inflexible_upper_values,
        flexible_core_hours=flexible,
        reservations_core_hours=reservations,
        reservation_ratio=load.ratio_values,
        reservations_rel_error_q97=q97,
        capacity_cores=float(cluster.capacity_cores) * float(load.ratio_values.max()),
        power_capped_capacity_cores=float(cluster.capacity_cores),
        power_curve=models.power_curve,
        fallback_reason=code,
        fallback_detail=detail,
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


@dataclass
class PartitionJob:
    """A share of the nightly plan that runs on its own (in this process, or as a task on a Dask worker): the
    days of some campuses, with their carbon forecasts. It reads the store and returns frames; it never writes."""

    plan_date: date
    days: list[CampusDay]
    carbon: dict[str, pd.Series]  # campus -> forecast over its day's hours and any look-ahead
    problems: dict[str, str]  # campus -> why it has no forecast
    options: object  # cicm.planning.pipeline.PlanOptions


def partition_jobs(days: list[CampusDay], carbon: CarbonResult, plan_date: date, options,
                   n_partitions: int) -> list[PartitionJob]:
    """Split the campuses into at most `n_partitions` contiguous groups of about equal cluster counts (a
    campus is one program, so it is never split). The order of campuses is kept, so results concatenate the same
    whatever the split."""
    sizes = np.array([len(d.campus.clusters) for d in days])
    n = max(1, min(int(n_partitions), len(days)))
    bounds = np.searchsorted(np.cumsum(sizes), np.linspace(0, sizes.sum(), n + 1)[1:-1], side="left") + 1
    groups = [g for g in np.split(np.arange(len(days)), bounds) if len(g)]
    return [
        PartitionJob(plan_date, [days[i] for i in g],
                     {days[i].campus.name: carbon.by_campus[days[i].campus.name]
                      for i in g if days[i].campus.name in carbon.by_campus},
                     {days[i].campus.name: carbon.problems[days[i].campus.name]
                      for i in g if days[i].campus.name in carbon.problems}, options)
        for g in groups
    ]


#: A partition reads the usage history and power telemetry of this many clusters (whole campuses) per query (all of
#: it when it is smaller). 200 clusters' history is ~0.9 M rows, ~7 MB per column. Measured on 3,000 clusters of
#: the 10,000-cluster store: per-campus queries 2.84 CPU-s; blocks of 200-300 clusters 1.5-1.75; of 1,000, 3.6
#: (fresh 35 MB arrays cost a page fault per 4 KiB; smaller ones reuse the allocator's memory); the whole fleet in
#: one query took 4.6 GiB. Two blocks are held at once (the next is read while one is planned).
READ_BLOCK_CLUSTERS = 200


@dataclass
class CampusReads:
    """A campus's rows, cut from its partition's reads: usage ordered by cluster name and hour, power telemetry by
    domain name and hour (the orders of the per-campus queries before), as numpy columns and as the frames the
    power fits and the queue program take."""

    names: list[str]  # the campus's clusters, in the fleet's order
    usage_codes: np.ndarray  # (N,) index into names
    usage_hour_ns: np.ndarray  # (N,) UTC hour start, ns
    usage_values: np.ndarray  # (3, N): HISTORY_COLUMNS (inflexible, flexible, reserved)
    usage: pd.DataFrame  # cluster (categorical), hour, flexible_cpu_cores, flexible_arrived_core_hours
    telemetry: pd.DataFrame  # cluster, domain, hour, cpu_cores, power_kw
    disabled: dict[str, str]  # cluster -> why the SLO loop switched its shaping off (shaping_disabled_many)


def _read_blocks(days: list[CampusDay], limit: int | None = None) -> list[list[CampusDay]]:
    """Consecutive campuses in groups of at most ``limit`` (default READ_BLOCK_CLUSTERS) clusters (a bigger campus
    alone)."""
    limit = READ_BLOCK_CLUSTERS if limit is None else limit
    blocks: list[list[CampusDay]] = []
    size = 0
    for day in days:
        n = len(day.campus.clusters)
        if blocks and size + n <= limit:
            blocks[-1].append(day)
            size += n
        else:
            blocks.append([day])
            size = n
    return blocks


def _filled(column) -> np.ndarray:
    """A fetched float column as float64 with NaN for NULL."""
    return np.ma.filled(np.ma.asarray(column, dtype=float), np.nan) if np.ma.isMaskedArray(column) \
        else np.asarray(column, dtype=float)


def _sorted_rows(key: np.ndarray) -> np.ndarray | None:
    """The permutation that sorts ``key`` (stable), or None when it is sorted already."""
    return None if len(key) < 2 or bool((key[1:] >= key[:-1]).all()) else np.argsort(key, kind="stable")


def read_campuses(store, days: list[CampusDay], plan_date: date) -> dict[str, CampusReads]:
    """One usage-history query, one power-telemetry query and one shaping-state query for these campuses (``cicm.store.plan``'s array
    reads), cut per campus by index ranges: each campus gets the rows of its clusters in ITS windows
    ([planned_at - LOAD_HISTORY_DAYS, planned_at) and [planned_at - POWER_WINDOW_DAYS - 1, planned_at)), in the
    order the per-campus queries gave (cluster name, hour; domain name, hour)."""
    from cicm.store.plan import power_telemetry_arrays, usage_history_arrays

    ns_per_us, ns_per_h = 1000, 3_600_000_000_000
    # clusters campus by campus, by name within a campus: the order of the rows
    by_name = [sorted(c.name for c in day.campus.clusters) for day in days]
    clusters = [n for names in by_name for n in names]
    campus_of = np.repeat(np.arange(len(days)), [len(n) for n in by_name])
    starts = np.r_[0, np.cumsum([len(n) for n in by_name])]
    domains_by = [sorted(d.name for c in day.campus.clusters for d in c.power_domains) for day in days]
    domains = [d for names in domains_by for d in names]
    latest = max(day.planned_at for day in days)
    earliest = min(day.planned_at for day in days)
    out: dict[str, CampusReads] = {}

    usage = usage_history_arrays(store, clusters, latest, LOAD_HISTORY_DAYS + int(np.ceil(
        (latest - earliest) / pd.Timedelta(days=1))))
    hour_ns = np.asarray(usage["hour_us"], dtype=np.int64) * ns_per_us
    pos = np.asarray(usage["pos"], dtype=np.int64)
    h0 = int(hour_ns.min()) if len(hour_ns) else 0
    order = _sorted_rows(pos * (1 << 32) + (hour_ns - h0) // ns_per_h)
    columns = ("inflexible_cpu_cores", "flexible_cpu_cores", "reserved_cpu_cores", "flexible_arrived_core_hours")
    if order is not None:
        pos, hour_ns = pos[order], hour_ns[order]
    values = np.empty((len(columns), len(pos)))
    for i, c in enumerate(columns):
        if order is None:
            values[i] = _filled(usage[c])
        else:
            np.take(_filled(usage[c]), order, out=values[i])
    del usage
    bounds = np.asarray(np.searchsorted(pos, starts))

    power = power_telemetry_arrays(store, clusters, domains, latest, POWER_WINDOW_DAYS + 1 + int(np.ceil(
        (latest - earliest) / pd.Timedelta(days=1))))
    p_hour = np.asarray(power["hour_us"], dtype=np.int64) * ns_per_us
    p_campus = campus_of[np.asarray(power["cluster_pos"], dtype=np.int64)]
    p_cluster = np.asarray(power["cluster_pos"], dtype=np.int64)
    p_domain = np.asarray(power["domain_pos"], dtype=np.int64)
    ph0 = int(p_hour.min()) if len(p_hour) else 0
    p_order = _sorted_rows((p_campus * len(domains) + p_domain) * (1 << 24) + (p_hour - ph0) // ns_per_h)
    p_cols = [p_campus, p_cluster, p_domain, p_hour, _filled(power["cpu_cores"]), _filled(power["power_kw"])]
    if p_order is not None:
        p_cols = [c[p_order] for c in p_cols]
    p_campus, p_cluster, p_domain, p_hour, p_cpu, p_kw = p_cols
    del power
    p_bounds = np.searchsorted(p_campus, np.arange(len(days) + 1))
    cluster_names = np.array(clusters, dtype=object)
    domain_names = np.array(domains, dtype=object)
    off = shaping_disabled_many(store, clusters, plan_date)

    for k, day in enumerate(days):
        fleet_order = [c.name for c in day.campus.clusters]
        lo, hi = bounds[k], bounds[k + 1]
        mine = slice(lo, hi)
        h = hour_ns[mine]
        start = (day.planned_at - pd.Timedelta(days=LOAD_HISTORY_DAYS)).value
        inside = (h >= start) & (h < day.planned_at.value)
        local = pos[mine] - starts[k]  # index into by_name[k]
        if not inside.all():
            h, local = h[inside], local[inside]
            v = values[:, mine][:, inside]
        else:
            v = values[:, mine]
        to_fleet = pd.Index(fleet_order).get_indexer(by_name[k])
        hours = pd.DatetimeIndex(h.view("datetime64[ns]")).tz_localize("UTC")
        usage_frame = pd.DataFrame({  # what the queue program reads (a copy of every column cost ~0.3 s at 10k)
            "cluster": pd.Categorical.from_codes(local, categories=by_name[k]), "hour": hours,
            "flexible_cpu_cores": v[1], "flexible_arrived_core_hours": v[3]})
        plo, phi = p_bounds[k], p_bounds[k + 1]
        ph = p_hour[plo:phi]
        p_in = (ph >= (day.planned_at - pd.Timedelta(days=POWER_WINDOW_DAYS + 1)).value) & (ph < day.planned_at.value)
        rows = np.arange(plo, phi)[p_in]
        telemetry = pd.DataFrame({
            "cluster": cluster_names[p_cluster[rows]], "domain": domain_names[p_domain[rows]],
            "hour": pd.DatetimeIndex(p_hour[rows].view("datetime64[ns]")).tz_localize("UTC"),
            "cpu_cores": p_cpu[rows], "power_kw": p_kw[rows]})
        out[day.campus.name] = CampusReads(fleet_order, to_fleet[local], h, v[:3], usage_frame, telemetry,
                                           {n: off[n] for n in fleet_order if n in off})
    return out


@dataclass
class _ReaderStore:
    """What the named reads of :func:`read_campuses` use of a Store (its ``con``), on a cursor of the store's database
    of its own, so that a reader thread never shares a connection with the thread that plans."""

    con: object


def plan_partition(store, job: PartitionJob) -> "PartitionResult":
    """Models and programs of a partition's campuses, merged in campus order. Its usage history, power telemetry and
    shaping state are read in blocks of READ_BLOCK_CLUSTERS clusters (:func:`read_campuses`), each block read on a
    thread of its own (and its own cursor) while the previous block is planned: DuckDB's scan runs without the GIL,
    so on 2 cores it overlaps the models' numpy work. ``store-reads`` is the time planning waited for them."""
    from concurrent.futures import ThreadPoolExecutor

    values: dict = {}  # zone_day_key -> forecast value, shared by the campuses of a zone and time zone
    parts: list[PartitionResult] = []
    blocks = _read_blocks(job.days)
    if not blocks:
        return merge_parts(parts)
    cursor = store.con.cursor()
    try:
        reader = _ReaderStore(cursor)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cicm-partition-read") as pool:
            ahead = pool.submit(read_campuses, reader, blocks[0], job.plan_date)
            for k, block in enumerate(blocks):
                read = PartitionResult()
                started = time.perf_counter()
                reads = ahead.result()
                read.seconds["store-reads"] += time.perf_counter() - started
                if k + 1 < len(blocks):
                    ahead = pool.submit(read_campuses, reader, blocks[k + 1], job.plan_date)
                parts.append(read)
                parts += [plan_campus_day(store, day, job.plan_date, job.carbon.get(day.campus.name), job.options,
                                          job.problems.get(day.campus.name), values, reads.pop(day.campus.name))
                          for day in block]
                del reads
    finally:
        cursor.close()
    return merge_parts(parts)


def plan_partition_from_file(db_path: str, job: PartitionJob) -> "PartitionResult":
    """`plan_partition` on a read-only connection of its own: what a Dask worker runs."""
    from cicm.store import Store

    with Store(db_path, read_only=True) as store:
        return plan_partition(store, job)


PART_FRAMES = ("vccs", "status", "power_models", "load_forecasts", "load_forecast_days", "storage_plans")
STAGE_NOTES = ("forecast-value", "power-models", "load-forecast", "vcc-program")
TIMED_STEPS = ("store-reads", "forecast-value", "power-models", "load-forecast", "vcc-program")


@dataclass
class PartitionResult:
    """What the models and programs of one or more campuses produced: frames for the store (``PART_FRAMES``),
    notes per stage (``STAGE_NOTES``) and wall seconds per step (``TIMED_STEPS``)."""

    frames: dict[str, list[pd.DataFrame]] = field(default_factory=lambda: {k: [] for k in PART_FRAMES})
    notes: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in STAGE_NOTES})
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMED_STEPS, 0.0))

    def add(self, key: str, frame: pd.DataFrame) -> None:
        self.frames[key].append(frame)

    def frame(self, key: str) -> pd.DataFrame:
        """One table's rows, concatenated in order (empty without any)."""
        frames = [f for f in self.frames[key] if not f.empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def merge_parts(parts: list[PartitionResult]) -> PartitionResult:
    """Partitions' results concatenated in order; their step seconds summed (CPU-seconds across workers)."""
    out = PartitionResult()
    for key in PART_FRAMES:
        frames = [f for p in parts for f in p.frames[key] if not f.empty]
        out.frames[key] = [pd.concat(frames, ignore_index=True)] if frames else []
    out.notes = {stage: [n for p in parts for n in p.notes[stage]] for stage in STAGE_NOTES}
    out.seconds = {step: sum(p.seconds[step] for p in parts) for step in TIMED_STEPS}
    return out


class _Timer:
    def __init__(self, seconds: dict[str, float]):
        self.seconds, self._last = seconds, time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] += now - self._last
        self._last = now


def plan_campus_day(store, day: CampusDay, plan_date: date, carbon: pd.Series | None, options,
                    problem: str | None, values: dict | None = None,
                    reads: CampusReads | None = None) -> PartitionResult:
    """Models and program for one campus: a constant number of store reads, whatever its size (none for its
    history when its partition read it: ``reads``). ``carbon`` covers the day and any look-ahead. Returns frames
    for the store and per-stage notes."""
    from cicm.optimize.program import plan_campus

    ahead, carbon = carbon, (None if carbon is None else carbon.iloc[:len(day.hours)])
    out = PartitionResult()
    timer = _Timer(out.seconds)
    values = {} if values is None else values
    key = zone_day_key(day)
    if key not in values:
        values[key] = campus_forecast_value(store, day, options.delta_max)
    value = values[key]
    low_benefit = low_benefit_reason(value, options.min_forecast_value_pct)
    out.notes["forecast-value"].append(
        f"{day.campus.name} ({day.campus.grid_zone}): "
        + (f"{value.realised_cut_pct:.1f}% (perfect {value.ceiling_cut_pct:.1f}%)" if value else "unknown")
        + (" → not shaped" if low_benefit else ""))
    timer.lap("forecast-value")
    clusters = day.campus.clusters
    names = [c.name for c in clusters]
    if reads is None:
        reads = read_campuses(store, [day], plan_date)[day.campus.name]
    telemetry, usage = reads.telemetry, reads.usage
    disabled = reads.disabled
    timer.lap("store-reads")
    fits = with_declared_curves(clusters, fit_domain_power_models(telemetry, day.planned_at), day.planned_at)
    counts = telemetry.groupby("domain").size().to_dict() if len(telemetry) else {}
    curves = {c.name: cluster_power_curve(c, fits) for c in clusters}
    timer.lap("power-models")
    loads = forecast_campus_load_arrays(reads, day, options.gamma)
    timer.lap("load-forecast")
    out.add("power_models", pd.DataFrame(
        [row for c in clusters for row in power_model_rows(c, fits, counts, day.planned_at)]))
    out.add("load_forecasts", load_hour_rows(plan_date, loads))
    out.add("load_forecast_days", pd.DataFrame([load_day_row(n, plan_date, loads[n]) for n in names]))
    inputs = []
    for cluster in clusters:
        load = loads[cluster.name]
        curve, power_problem = curves[cluster.name]
        problem_load = load_problem(load)
        if power_problem:
            out.notes["power-models"].append(f"{cluster.name}: {power_problem}")
        out.notes["power-models"].extend(f"{cluster.name}: {note}" for note in declared_notes(cluster, fits))
        if problem_load:
            out.notes["load-forecast"].append(f"{cluster.name}: {problem_load}")
        reason = problem or problem_load or power_problem
        if reason:
            vccs, status = unplanned_rows(cluster, day.campus.name, plan_date, day.hours, reason, carbon)
            out.add("vccs", vccs)
            out.add("status", status)
            continue
        preset = disabled.get(cluster.name) or low_benefit
        inputs.append(cluster_input(cluster, ClusterModels(pd.DataFrame(), curve, None, load, None), preset))
    if inputs and getattr(options, "program", "ceiling") == "queue":
        vccs, status, note, storage_rows = queue_plan_rows(day, plan_date, inputs, usage, ahead, options)
        out.add("storage_plans", storage_rows)
        out.add("vccs", vccs)
        out.add("status", status)
        out.notes["vcc-program"].append(note)
    elif inputs:
        assert carbon is not None  # a campus without a carbon forecast has a problem: no inputs
        plan = plan_campus(campus_input(day.campus, inputs, carbon.to_numpy(), day.hours, options))
        vccs, status = plan_rows(plan, plan_date, {c.name: float(c.capacity_cores) for c in clusters})
        out.add("vccs", vccs)
        out.add("status", status)
        out.notes["vcc-program"].append(
            f"{day.campus.name}: {plan.lp_status} via {plan.solver} in {plan.solve_seconds:.2f} s"
            + (f" ({plan.message})" if plan.message else "")
        )
    timer.lap("vcc-program")
    return out


BACKLOG_WINDOW_HOURS = 48  # the FIFO backlog is measured over this window (assumed empty before it)


def queue_cluster(cluster_input, rows: pd.DataFrame, day: CampusDay, hours: pd.DatetimeIndex, options):
    """One cluster's queue-program input: :func:`queue_campus_clusters` with one cluster. Returns (QueueCluster,
    the upper-quantile extra core-hours of the planning day); raises the InputError of a bad history."""
    built, extras, problems = queue_campus_clusters([cluster_input], rows.assign(cluster=cluster_input.name), day,
                                                    hours, options)
    if cluster_input.name in problems:
        raise problems[cluster_input.name]
    return built[0], extras[cluster_input.name]


def _arrival_history_problems(codes: np.ndarray, n: int, hour_ns: np.ndarray, arrived: np.ndarray) -> list:
    """What ``_check_history`` would raise for each cluster's arrival history (rows by code), or None."""
    out: list = [None] * n
    bad = np.zeros(n, bool)
    if len(codes):
        bad[codes[arrived < 0]] = True
    for c in np.flatnonzero(bad):
        out[c] = InputError("flexible_arrived_core_hours", "arrival history contains negative values")
    # duplicate hours: the store's rows are ordered by cluster and hour, then a pass finds them
    same = codes[1:] == codes[:-1]
    if len(codes) > 1 and not (np.all(codes[1:] >= codes[:-1]) and np.all(hour_ns[1:][same] > hour_ns[:-1][same])):
        order = np.lexsort((hour_ns, codes))
        sc, sh = codes[order], hour_ns[order]
        dup = (sc[1:] == sc[:-1]) & (sh[1:] == sh[:-1])
        for c in np.unique(sc[1:][dup]):
            out[c] = InputError("hour", "arrival history has duplicate hours")
    return out


def queue_campus_clusters(inputs: list, usage: pd.DataFrame, day: CampusDay, hours: pd.DatetimeIndex, options):
    """Every cluster's queue-program input over ``hours`` (the planning day, then any look-ahead), from the
    campus's stored usage (rows of any cluster; the store's order, by cluster and hour, is the fast path), as
    (clusters x hours) arrays: the FIFO backlog at planning time (each arrival hour's remaining work, due 24 h
    after it), forecast hourly arrivals (:func:`cicm.models.arrivals.forecast_arrivals_grid`, THE EWMA forecast),
    and the load forecast's inflexible usage and quantile (the day's profile repeated over the look-ahead).
    Returns (QueueClusters of the good clusters in input order, name -> the upper-quantile extra core-hours of the
    planning day, name -> the InputError of a bad arrival history)."""
    from cicm.models.arrivals import WEEK, forecast_arrivals_grid
    from cicm.models.load.history import factorize_clusters
    from cicm.optimize.queue import QueueCluster, arrival_bounds, fifo_backlog, task_bounds

    names = [ci.name for ci in inputs]
    n, n_day, n_c = len(hours), len(day.hours), len(inputs)
    weeks, error_days = 4, 28  # forecast_arrivals' defaults
    h0 = int(hours[:1].tz_convert("UTC").as_unit("ns").asi8[0])
    past_start = hours[0].floor("D") - pd.Timedelta(days=error_days)
    window_start = day.planned_at - pd.Timedelta(hours=BACKLOG_WINDOW_HOURS)
    first = min(pd.Timestamp(hours[0]), past_start, window_start) - weeks * WEEK
    n_grid = -(-(h0 - int(first.tz_convert("UTC").as_unit("ns").value)) // 3_600_000_000_000)
    start_ns = h0 - n_grid * 3_600_000_000_000  # the grid ends at hours[0] and is on its phase
    arrived_grid = np.full((n_c, n_grid), np.nan)
    served_grid = np.zeros((n_c, n_grid))
    problems: dict[str, Exception] = {}
    if len(usage):
        codes_u, seen = factorize_clusters(usage["cluster"])
        to_input = pd.Index(names).get_indexer(seen)
        codes = to_input[codes_u]
        hour_ns = pd.DatetimeIndex(usage["hour"]).tz_convert("UTC").as_unit("ns").asi8
        arrived = np.nan_to_num(usage["flexible_arrived_core_hours"].to_numpy(float, na_value=np.nan), nan=0.0)
        served = np.nan_to_num(usage["flexible_cpu_cores"].to_numpy(float, na_value=np.nan), nan=0.0)
        mine = codes >= 0
        for c, exc in enumerate(_arrival_history_problems(codes[mine], n_c, hour_ns[mine], arrived[mine])):
            if exc is not None:
                problems[names[c]] = exc
        rel = hour_ns - start_ns
        col = rel // 3_600_000_000_000
        ok = mine & (rel % 3_600_000_000_000 == 0) & (col >= 0) & (col < n_grid)
        arrived_grid[codes[ok], col[ok]] = arrived[ok]
        served_grid[codes[ok], col[ok]] = served[ok]
    fc = forecast_arrivals_grid(arrived_grid, start_ns, hours, weeks=weeks, quantile=options.arrival_quantile,
                                error_days=error_days)
    # the FIFO backlog of the last BACKLOG_WINDOW_HOURS (assumed empty before); missing hours neither arrive nor run
    w0 = max(int(np.ceil((window_start.value - start_ns) / 3_600_000_000_000)), 0)
    backlog = fifo_backlog(np.nan_to_num(arrived_grid[:, w0:], nan=0.0), served_grid[:, w0:])
    rel_h = (np.arange(w0, n_grid) - n_grid).astype(float)  # hours from hours[0]
    # a backlog bucket may run within one hour (its width is unknown): work 1 h at width = its core-hours
    k = np.broadcast_to(rel_h, backlog.shape)
    must, avail = task_bounds(n, np.minimum(k, 0.0), np.ones(backlog.shape), np.where(backlog > 0, backlog, 0.0),
                              k + 24.0, options.planning_margin_hours)
    m2, a2 = arrival_bounds(np.nan_to_num(fc.core_hours), 24.0 - options.planning_margin_hours)
    extra = fc.upper_core_hours[:, :n_day].sum(axis=1) - fc.core_hours[:, :n_day].sum(axis=1)
    built, extras = [], {}
    for i, ci in enumerate(inputs):
        problem = fc.problems[i]
        if ci.name not in problems and problem is not None:
            problems[ci.name] = problem
        if ci.name in problems:
            continue
        physical = float(np.max(ci.power_capped_capacity_cores))
        built.append(QueueCluster(ci.name, np.resize(ci.inflexible_cpu_cores, n),
                                  np.resize(ci.inflexible_upper_cpu_cores, n), physical, must[i] + m2[i],
                                  avail[i] + a2[i], ci.power_curve, fallback_reason=ci.fallback_reason))
        extras[ci.name] = float(extra[i])
    return built, extras, problems


def too_full_reason(late_core_hours: np.ndarray, room_cpu_cores: np.ndarray, rtol: float = 1e-6) -> str | None:
    """Why a queue plan is not enforced: it expects flexible work to miss its planning deadlines within the day
    (the room cannot carry the queue). Such a cluster gets the full machines, as the agent's hourly correction
    would give it (``correction_cap``): holding back anything then only adds lateness."""
    late = float(np.max(late_core_hours, initial=0.0))
    if late <= rtol * max(float(np.max(room_cpu_cores, initial=0.0)), 1.0):
        return None
    return f"too-full: the plan expects {late:,.0f} core-hours of flexible work past its deadlines (planned " \
           "early by the margin) within the day"


def queue_plan_rows(day: CampusDay, plan_date: date, inputs: list, usage: pd.DataFrame, carbon: pd.Series,
                    options) -> tuple[pd.DataFrame, pd.DataFrame, str, pd.DataFrame]:
    """The campus's plan from the queue-aware program, as vccs and vcc_status rows (the ceiling program's
    columns), a note, and the day's storage plan rows (empty without battery or solar: see
    cicm.planning.storage). ``carbon`` covers the day and any look-ahead (planned, not committed). The plan of record
    (``flexible_cpu_cores``) is the planned service plus the risk margin; VCC = (inflexible upper quantile + plan
    of record) x R. A fallback cluster keeps the full machine capacity, with its reason."""
    from cicm.optimize.queue import QueueCampus, greedy_service, plan_queue, risk_margin
    from cicm.planning.storage import campus_storage, storage_plan_rows

    n_day = len(day.hours)
    hours = pd.DatetimeIndex(carbon.index)
    built, extras, bad = queue_campus_clusters(inputs, usage, day, hours, options)
    problems = {name: f"bad-history: {exc}" for name, exc in bad.items()}
    status_rows: list[dict] = []
    eta_all = carbon.to_numpy(float)
    eta = eta_all[:n_day]
    plan = None
    storage, storage_note = None, ""
    try:
        storage = campus_storage(day.campus, hours)
    except InputError as exc:  # the flexible plan goes ahead; the battery is not co-planned tonight, visibly
        storage_note = f"; storage not planned: {exc}"
    if built:
        plan = plan_queue(QueueCampus(day.campus.name, tuple(built), eta_all, committed=np.arange(len(hours)) < n_day,
                                      contract_kw=day.campus.contract_limit_kw, lambda_e=options.lambda_e,
                                      lambda_p=options.lambda_p, solver=options.solver, storage=storage))
    built_names = {b.name: k for k, b in enumerate(built)}
    flat_all = greedy_service(np.stack([b.must_core_hours for b in built]), np.stack([b.avail_core_hours for b in built]),
                              np.stack([b.room_cpu_cores for b in built]))[:, :n_day] if built else None
    plan_index = {name: i for i, name in enumerate(plan.clusters)} if plan is not None else {}
    cols: dict[str, list] = {key: [] for key in ("vcc_cores", "flexible_cpu_cores", "inflexible_cpu_cores",
                                                 "power_kw", "carbon_kgco2")}
    for ci in inputs:
        ratio = ci.reservation_ratio
        capacity_res = float(np.max(ci.capacity_cores))
        i = plan_index.get(ci.name, -1)
        preset = join_reason(ci.fallback_reason, ci.fallback_detail) if ci.fallback_reason else None
        reason = problems.get(ci.name) or preset or (plan.reason[i] if plan is not None and i >= 0 else "no-plan")
        shaped = plan is not None and i >= 0 and plan.status[i] == "optimal"
        if shaped:
            assert plan is not None
            reason = too_full_reason(plan.late_core_hours[i][:n_day], plan.room_cpu_cores[i][:n_day])
            shaped = reason is None
        u = ci.inflexible_cpu_cores
        curve = ci.power_curve
        known = ci.name in built_names
        if shaped:
            assert plan is not None and flat_all is not None
            qc = built[built_names[ci.name]]
            service = plan.service_cpu_cores[i][:n_day]
            room = qc.room_cpu_cores[:n_day]
            s = service + risk_margin(service, room, extras[ci.name])
            flat = flat_all[built_names[ci.name]]
            vcc = np.minimum((ci.inflexible_upper_cpu_cores + s) * ratio, capacity_res)
            power = curve(u + service)
            kg = power * eta / 1000.0
            flat_power = curve(u + flat)
            base_power = curve(u)
            flat_kg = flat_power * eta / 1000.0
            flex_kg = float(((power - base_power) * eta).sum() / 1000.0)
            flat_flex_kg = float(((flat_power - base_power) * eta).sum() / 1000.0)
        elif known:  # unshaped: it runs work as it comes, so expected = flat, saving 0
            assert flat_all is not None
            s = np.full(len(u), np.nan)
            vcc = np.full(len(u), capacity_res)
            power = curve(u + flat_all[built_names[ci.name]])
            kg = flat_kg = power * eta / 1000.0
            flex_kg = flat_flex_kg = np.nan
        else:
            s = np.full(len(u), np.nan)
            vcc = np.full(len(u), capacity_res)
            power = kg = np.full(len(u), np.nan)
            flat_kg = np.full(len(u), np.nan)
            flex_kg = flat_flex_kg = np.nan
        for key, value in (("vcc_cores", vcc), ("flexible_cpu_cores", s), ("inflexible_cpu_cores", u),
                           ("power_kw", power), ("carbon_kgco2", kg)):
            cols[key].append(np.asarray(value, dtype=float))
        status_rows.append({
            "plan_date": plan_date, "cluster": ci.name, "campus": day.campus.name,
            "status": "shaped" if shaped else "fallback", "reason": None if shaped else reason,
            "capacity_cores": capacity_res, "theta_core_hours": np.nan,
            "tau_core_hours": float(np.nansum(s)) if shaped else np.nan,
            "expected_kgco2": float(np.sum(kg)) if known else np.nan,
            "flat_kgco2": float(np.sum(flat_kg)) if known else np.nan,
            "saving_pct": (100 * (1 - flex_kg / flat_flex_kg) if flat_flex_kg > 0 else np.nan) if shaped
            else (0.0 if known else np.nan),
            "peak_kw": float(np.max(power)) if known else np.nan})
    n_in = len(inputs)
    vccs = pd.DataFrame({
        "plan_date": [plan_date] * (n_in * n_day), "cluster": np.repeat([ci.name for ci in inputs], n_day),
        "hour": day.hours[np.tile(np.arange(n_day), n_in)], "hour_index": np.tile(np.arange(n_day), n_in),
        **{key: np.concatenate(values) if values else np.zeros(0) for key, values in cols.items()},
        "gco2_per_kwh": np.tile(eta, n_in)})
    note = (f"{day.campus.name}: queue program over {len(hours)} h ({n_day} committed), "
            f"{sum(r['status'] == 'shaped' for r in status_rows)}/{len(status_rows)} shaped"
            + (f" via {plan.solver} in {plan.solve_seconds:.2f} s" if plan else ""))
    storage_rows = pd.DataFrame()
    if plan is not None and plan.storage is not None:
        storage_rows = storage_plan_rows(plan_date, day.campus.name, day.hours, plan.storage)
        note += f"; storage {plan.storage.status}: {float(np.sum(plan.storage.charge_kw[:n_day])):,.0f} kWh charged, " \
                f"{float(np.sum(plan.storage.discharge_kw[:n_day])):,.0f} kWh discharged"
    return vccs, pd.DataFrame(status_rows), note + storage_note, storage_rows


def plan_clusters(store, fleet: Fleet, plan_date: date, days: list[CampusDay], carbon: CarbonResult,
                  options, run_partitions=None, n_partitions: int = 1) -> PlanClustersResult:
    """Every campus's models and program. `run_partitions(jobs)` returns each job's `plan_partition` result
    (e.g. as Dask tasks); by default the jobs run here, one after another, on `store`."""
    jobs = partition_jobs(days, carbon, plan_date, options, n_partitions)
    parts = run_partitions(jobs) if run_partitions else [plan_partition(store, job) for job in jobs]
    merged = merge_parts(parts)
    cat = merged.frame
    status = cat("status")
    reports = []
    for stage in STAGE_NOTES:
        notes = merged.notes[stage]
        degraded = stage in ("power-models", "load-forecast") and notes
        reports.append(StageReport(stage, StageStatus.DEGRADED if degraded else StageStatus.RAN,
                                   "; ".join(notes) or "all clusters"))
    shaped = int((status["status"] == "shaped").sum()) if not status.empty else 0
    reports[-1].detail = f"{shaped}/{len(status)} clusters shaped; " + reports[-1].detail
    return PlanClustersResult(
        reports, cat("vccs"), status,
        {"power_models": cat("power_models"), "load_forecasts": cat("load_forecasts"),
         "load_forecast_days": cat("load_forecast_days"), "storage_plans": cat("storage_plans")},
        merged.seconds,
    )


def cluster_summary(status: pd.DataFrame) -> pd.DataFrame:
    """One short row per cluster for the printed summary: reason codes only (details are in the store)."""
    if status.empty:
        return status
    return pd.DataFrame({
        "campus": status["campus"], "cluster": status["cluster"], "status": status["status"],
        "reason": status["reason"].map(lambda r: split_reason(r)[0]),
        "theta_kcore_h": status["theta_core_hours"] / 1000.0,
        "plan_kgco2": status["expected_kgco2"], "flat_kgco2": status["flat_kgco2"],
        "saving_pct": status["saving_pct"],
    }).sort_values(["campus", "cluster"]).reset_index(drop=True)
