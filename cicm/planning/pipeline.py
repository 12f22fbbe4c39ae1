"""The nightly plan as plain calls: its options and outcome, the telemetry and carbon stages, and ``plan_day``.

Stages: telemetry (the night's drop or the fleet's Prometheus; never invented) → carbon forecasts per campus →
SLO feedback (its own run) → power models → load forecasts → VCC program per campus, all written in one
transaction. No Prefect here: the flow in the top-level ``flows/nightly.py`` wraps these in tasks.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Callable

import pandas as pd

from cicm.reasons import RunStatus, StageStatus
from cicm.config import Fleet, check_fleet_zones, load_fleet
from cicm.store import Store
from cicm.errors import InputError, ProviderError
from cicm.planning import stages
from cicm.planning.options import PROGRAMS, PlanOptions  # noqa: F401  (re-exported: plan_day's options)
from cicm.planning.ingest import check_telemetry_rows, ingest_telemetry, read_telemetry_dir
from cicm.telemetry_sources import PrometheusMapping, parse_mapping, read_prometheus_telemetry


@dataclass
class PlanOutcome:
    plan_date: date
    run_id: str | None
    status: RunStatus
    stages: list[stages.StageReport] = field(default_factory=list)
    clusters: pd.DataFrame = field(default_factory=pd.DataFrame)
    message: str = ""
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each step of plan_day


def ingest_new_telemetry(store: Store, folder: str, fleet: Fleet | None = None,
                         now: pd.Timestamp | None = None, *, not_after: pd.Timestamp | None = None,
                         rewrite_history: bool = False) -> stages.StageReport:
    """The nightly ingestion of the telemetry the monitoring pipeline dropped in `folder` (one run). A refused
    drop (bad rows, hours at or after ``not_after``, the plan's first hour, or different values for stored hours
    without ``rewrite_history``) raises an InputError naming the field, and is recorded as a failed
    telemetry-ingest run."""
    started_at = pd.Timestamp.now(tz="UTC")
    try:
        usage, power = read_telemetry_dir(folder, fleet, now, not_after=not_after)
    except InputError as exc:
        store.failed_run("telemetry-ingest", {"source": str(folder)}, None, exc, started_at=started_at)
        raise
    info = ingest_telemetry(store, usage, power, source=str(folder), rewrite_history=rewrite_history,
                            started_at=started_at)
    return stages.StageReport("telemetry", StageStatus.RAN, f"ingested {info['usage_rows']} usage and {info['power_rows']}"
                                                  f" power rows from {folder} (run {info['run_id']})")


NO_TELEMETRY_HELP = ("for the bundled demo fleet run `cicm demo seed` first (./scripts/plan does); for your own "
                     "fleet pass --telemetry DIR with usage*.parquet and power*.parquet, or name a Prometheus server "
                     "in the fleet file's [telemetry] table (docs/telemetry.md, docs/operations.md)")


def ensure_telemetry(store: Store, fleet: Fleet, seed: int, telemetry_dir: str | None = None, *,
                     now: pd.Timestamp | None = None, not_after: pd.Timestamp | None = None,
                     rewrite_history: bool = False) -> stages.StageReport:
    """Ingest the night's telemetry (the drop in ``telemetry_dir`` if given, else the fleet file's Prometheus if it
    names one) and check the store has history to plan on. It never invents data: a store without any usage
    history of the fleet's clusters is refused (InputError "telemetry"); clusters without history fall back one by
    one (insufficient-history). A refused drop or read is a degraded stage (and a failed telemetry-ingest run):
    the plan goes on with the stored history. ``now`` (default: the clock) and ``not_after`` (the plan's first
    hour) bound the hours read; ``rewrite_history`` lets a drop replace stored hours with other values (audited
    in its run). ``seed`` is unused (kept for the flow's task)."""
    from cicm.store import plan as plan_reads

    now = pd.Timestamp.now(tz="UTC") if now is None else now
    report = None
    source = telemetry_dir or (fleet.telemetry.url if fleet.telemetry is not None else None)
    try:  # bad telemetry must not cost the fleet its plan: plan on the stored history, and say so
        if telemetry_dir:
            report = ingest_new_telemetry(store, telemetry_dir, fleet, now, not_after=not_after,
                                          rewrite_history=rewrite_history)
        elif fleet.telemetry is not None:
            report = ingest_prometheus(store, fleet, now, not_after=not_after, rewrite_history=rewrite_history)
    except (InputError, ProviderError) as exc:
        if isinstance(exc, InputError) and exc.field.startswith("telemetry."):
            raise  # the fleet file's [telemetry] table is wrong: as any bad fleet file, nothing is planned
        report = stages.StageReport("telemetry", StageStatus.DEGRADED, f"refused {source} ({exc}); planned on the stored "
                                                             "history")
    names = [c.name for c in fleet.clusters()]
    have = plan_reads.clusters_with_usage(store, names)
    if not have:
        why = f" ({report.detail.removesuffix('; planned on the stored history')})" if report is not None else ""
        raise InputError("telemetry", f"the store holds no usage history for any cluster of fleet {fleet.name!r}"
                                      f"{why}: " + NO_TELEMETRY_HELP)
    missing = [n for n in names if n not in have]
    if report is not None:
        return report
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        return stages.StageReport("telemetry", StageStatus.DEGRADED, f"no usage history for {shown}: they fall back")
    return stages.StageReport("telemetry", StageStatus.RAN, "store already holds telemetry for every cluster")


#: Stored usage may exceed a cluster's cores by this share before the fleet file is held not to match (rounding of
#: exported gauges).
CAPACITY_TOLERANCE = 0.01
#: Days back from the newest stored hour that the fleet-against-store check reads.
MATCH_WINDOW_DAYS = 2


def _field_of(fleet: Fleet) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """cluster -> its field path; domain -> (its field path, its cluster)."""
    clusters, domains = {}, {}
    for i, campus in enumerate(fleet.campuses):
        for j, cluster in enumerate(campus.clusters):
            clusters[cluster.name] = f"campuses.{i}.clusters.{j}"
            for k, domain in enumerate(cluster.power_domains):
                domains[domain.name] = (f"campuses.{i}.clusters.{j}.power_domains.{k}", cluster.name)
    return clusters, domains


def check_fleet_matches_store(store: Store, fleet: Fleet) -> None:
    """Refuse a fleet file the store's history does not match, before anything is planned, naming the field:

    * a power domain whose stored telemetry belongs to another cluster than the file says;
    * a cluster whose stored usage (inflexible + flexible) in the last 2 stored days peaks above its cores;
    * a power domain with no declared curve (spec_row, power_points) and no power telemetry at all.
    """
    cluster_field, domain_field = _field_of(fleet)
    from cicm.store import plan as reads

    owners = reads.power_domain_owners(store, MATCH_WINDOW_DAYS)
    owners = owners[owners["domain"].isin(domain_field)]
    for domain, cluster, other in owners.itertuples(index=False):
        field, expected = domain_field[domain]
        if other != cluster or cluster != expected:
            raise InputError(f"{field}.name", f"the store holds power domain {domain!r}'s telemetry under cluster "
                                              f"{cluster!r}, the fleet file puts it in {expected!r}: the fleet "
                                              "file does not match the store's history")
    peaks = reads.usage_peaks(store, MATCH_WINDOW_DAYS)
    peaks = peaks[peaks["cluster"].isin(cluster_field)]
    capacity = {c.name: c.capacity_cores for c in fleet.clusters()}
    for cluster, peak in peaks.itertuples(index=False):
        cores = capacity[cluster]
        if peak > cores * (1 + CAPACITY_TOLERANCE):
            raise InputError(f"{cluster_field[cluster]}.power_domains",
                             f"cluster {cluster!r}'s stored usage peaks at {peak:,.0f} cores in the last "
                             f"{MATCH_WINDOW_DAYS} stored days, above the {cores:,} cores the fleet file gives it: "
                             "the fleet file does not match the store's history")
    bare = [d.name for c in fleet.clusters() for d in c.power_domains if not d.has_declared_curve]
    if bare:
        seen = reads.domains_with_power(store, bare)
        for name in bare:
            if name not in seen:
                raise InputError(domain_field[name][0], f"power domain {name!r} has no power curve (spec_row or "
                                                        "power_points) and no power telemetry in the store")


def prometheus_mapping(fleet: Fleet) -> PrometheusMapping:
    """The fleet file's ``[telemetry.mapping]`` parsed; a bad field raises InputError naming
    ``telemetry.mapping.<field>``."""
    raw = fleet.telemetry.mapping if fleet.telemetry is not None else {}
    try:
        return parse_mapping(raw)
    except InputError as exc:
        raise InputError("telemetry.mapping" + exc.field.removeprefix("prometheus"), exc.message) from exc


def prometheus_window(store: Store, fleet: Fleet, now: pd.Timestamp) -> tuple[pd.Timestamp, pd.Timestamp]:
    """The UTC hours [start, end) to read: from the hour after the newest stored usage hour of the fleet's
    clusters (at most ``lookback_hours`` back; all of them on a store without any) to ``now``'s last whole hour."""
    assert fleet.telemetry is not None
    end = now.tz_convert("UTC").floor("h")
    earliest = end - pd.Timedelta(hours=fleet.telemetry.lookback_hours)
    names = [c.name for c in fleet.clusters()]
    for days in sorted({2, -(-fleet.telemetry.lookback_hours // 24)}):  # the last two days usually answer
        hours = store.usage_histories(names, before=end, days=days)["hour"]
        if len(hours):
            return max(earliest, pd.Timestamp(hours.max()) + pd.Timedelta(hours=1)), end
    return earliest, end


def ingest_prometheus(store: Store, fleet: Fleet, now: pd.Timestamp, *, not_after: pd.Timestamp | None = None,
                      rewrite_history: bool = False) -> stages.StageReport:
    """Read the hours the store lacks from the fleet's Prometheus (up to ``now``, and not past ``not_after``, the
    plan's first hour), check them as a drop is checked, and store them (one telemetry-ingest run). The store is
    let go while Prometheus answers. A refused read (InputError, ProviderError) is recorded as a failed run,
    stores nothing and is raised; a bad ``[telemetry]`` table raises InputError ``telemetry.<field>`` before any
    read."""
    assert fleet.telemetry is not None
    url, mapping = fleet.telemetry.url, prometheus_mapping(fleet)
    start, end = prometheus_window(store, fleet, now)
    if not_after is not None:
        end = min(end, not_after)
    if start >= end:
        return stages.StageReport("telemetry", StageStatus.RAN, f"store already holds every hour before {end} ({url})")
    started_at = pd.Timestamp.now(tz="UTC")
    try:
        with store.released():  # no lock held while waiting on Prometheus
            usage, power = read_prometheus_telemetry(url, mapping, fleet.power_domains_by_cluster(), start, end)
        check_telemetry_rows(usage, power, fleet, now, not_after=not_after)
    except (InputError, ProviderError) as exc:
        store.failed_run("telemetry-ingest", {"source": url, "start": str(start), "end": str(end)}, None, exc,
                         started_at=started_at)
        raise
    info = ingest_telemetry(store, usage, power, source=url, rewrite_history=rewrite_history, started_at=started_at)
    missing = sum(usage.attrs.get("missing_hours", {}).values())
    return stages.StageReport("telemetry", StageStatus.RAN, f"read {info['usage_rows']} usage and {info['power_rows']} power "
                                                  f"rows for [{start.isoformat()}, {end.isoformat()}) from {url} "
                                                  f"({missing} cluster-hours missing; run {info['run_id']})")


def fetch_day_carbon(day: stages.CampusDay, options: PlanOptions) -> pd.DataFrame:
    """The campus's forecast from its provider (its own, else the run's), to the look-ahead if the provider
    reaches it, else the day alone. The trace is issued at planning time; a live forecast is judged against the
    planning clock (``options.now()``)."""
    provider, extra = stages.carbon_source(day.campus, options)
    now = None if provider == "trace" else options.now()
    end = stages.carbon_window_end(day, options)
    try:
        return stages.fetch_campus_carbon(day, provider, options.seed, now=now, end=end, **extra)
    except (InputError, ProviderError):
        if end <= day.hours[-1] + pd.Timedelta(hours=1):
            raise
    # the provider cannot reach the look-ahead: plan with the day alone (the program's note says so)
    return stages.fetch_campus_carbon(day, provider, options.seed, now=now, **extra)


#: Days of actuals asked for on a store that holds none of a zone (the forecast-value gate looks back 28 days;
#: Electricity Maps' history answers the last 24 hours whatever is asked).
ACTUALS_LOOKBACK_DAYS = 28


def actuals_sources(fleet: Fleet, options: PlanOptions) -> dict[tuple, tuple[str, dict]]:
    """Each live (provider, zone, where) of the fleet once: key -> (provider, fetch options incl. zone)."""
    from cicm.carbon.actuals import LIVE_PROVIDERS

    out: dict[tuple, tuple[str, dict]] = {}
    for campus in fleet.campuses:
        provider, extra = stages.carbon_source(campus, options)
        if provider not in LIVE_PROVIDERS:
            continue
        fetch = {"zone": campus.grid_zone, "base_url": extra.get("base_url")}
        if provider == "csv":
            fetch["path"] = campus.carbon.actuals_csv if campus.carbon is not None else None
            if fetch["path"] is None:
                continue  # a CSV forecast feed without a measured series: nothing to store
        out[(provider, campus.grid_zone, fetch.get("base_url"), str(fetch.get("path")))] = (provider, fetch)
    return out


def update_carbon_actuals(store: Store, fleet: Fleet, options: PlanOptions) -> stages.StageReport:
    """Fetch each live zone's measured intensity since the newest stored hour (at most 28 days back) and store
    it: one ``carbon-actuals`` run, written after every fetch is in, in one short transaction (the store is let
    go during the network I/O). A provider that fails is a degraded stage naming it; the others are stored."""
    from cicm.carbon.actuals import fetch_actuals
    from cicm.store import plan as reads

    sources = actuals_sources(fleet, options)
    if not sources:
        return stages.StageReport("carbon-actuals", StageStatus.RAN, "no live zones (the trace's are bundled)")
    now = options.now()
    started_at = pd.Timestamp.now(tz="UTC")
    end = now.floor("h")
    starts = {}
    for key, (provider, fetch) in sources.items():
        newest = reads.newest_actual_hour(store, fetch["zone"])
        earliest = end - pd.Timedelta(days=ACTUALS_LOOKBACK_DAYS)
        starts[key] = earliest if newest is None else max(earliest, newest + pd.Timedelta(hours=1))
    frames, problems = [], []
    with store.released():  # no lock held while waiting on providers
        for key, (provider, fetch) in sources.items():
            if starts[key] >= end:
                continue
            try:
                frames.append(fetch_actuals(provider, fetch["zone"], starts[key], end, now=now,
                                            base_url=fetch.get("base_url"), path=fetch.get("path")))
            except (InputError, ProviderError) as exc:
                problems.append(f"{provider} {fetch['zone']}: {exc}")
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    zones = sorted({fetch["zone"] for _, fetch in sources.values()})
    with store.run("carbon-actuals", {"zones": zones, "end": str(end)}, started_at=started_at) as run:
        if len(rows):
            store.upsert("carbon_actuals", rows, run.run_id)
        run.status = RunStatus.DEGRADED if problems else RunStatus.OK
        run.message = "; ".join(problems) or None
        run.summary = {"rows": len(rows), "zones": zones}
    detail = f"{len(rows)} hourly actuals of {', '.join(zones)} stored"
    if problems:
        return stages.StageReport("carbon-actuals", StageStatus.DEGRADED, f"{detail}; failed: {'; '.join(problems)}")
    return stages.StageReport("carbon-actuals", StageStatus.RAN, detail)


def plan_day(store: Store, fleet: Fleet, plan_date: date, options: PlanOptions,
             fetch: Callable[[stages.CampusDay, PlanOptions], pd.DataFrame] = fetch_day_carbon,
             telemetry: Callable[..., stages.StageReport] = ensure_telemetry,
             slo: Callable[[Store, Fleet, date], stages.StageReport] | None = None,
             run_partitions: Callable[[list[stages.PartitionJob]], list[stages.PartitionResult]] | None = None,
             n_partitions: int = 1) -> PlanOutcome:
    """The nightly plan's body, stage by stage, as plain calls. The flow passes its Prefect tasks in.

    The SLO check of the last judged days runs in its own run before the plan, so its verdicts (shaping off for a
    week) bind this plan, and an SLO failure cannot stop the plan from being stored.

    Models and programs run as partitions of campuses that only read the store. By default they run here on
    `store`; `run_partitions` runs them elsewhere (Dask workers), which open the file read-only while this
    process has let go of it. Everything is then written here, by the one writer, in one transaction.
    """
    options.validate()
    check_fleet_zones(fleet, options.provider)
    slo = slo or check_slo
    clock = _Clock()
    started_at = pd.Timestamp.now(tz="UTC")  # the plan run's start: its duration is the whole plan's
    days = stages.campus_days(fleet, plan_date)
    first_hour = min(day.hours[0] for day in days)  # no telemetry of the planned day itself is taken in
    params = {"fleet": fleet.name, **options.__dict__}
    checked = False  # bad input refused by the checks before planning is not a plan run; anything after is
    try:
        reports = [telemetry(store, fleet, options.seed, options.telemetry_dir, now=options.now(),
                             not_after=first_hour, rewrite_history=options.rewrite_history)]
        check_fleet_matches_store(store, fleet)
        checked = True
        clock.lap("telemetry")
        reports.append(update_carbon_actuals(store, fleet, options))
        clock.lap("carbon-actuals")
        fetched, by_zone_day = {}, {}
        with store.released():  # no lock held while waiting on providers
            for day in days:  # campuses in one zone and time zone share their forecast: fetched once
                key = stages.zone_day_key(day)
                if key not in by_zone_day:
                    try:
                        by_zone_day[key] = fetch(day, options)
                    except Exception as exc:  # noqa: BLE001 - collect_carbon decides what is a fallback and what a bug
                        by_zone_day[key] = exc
                fetched[day.campus.name] = by_zone_day[key]
        carbon = stages.collect_carbon(days, fetched)
        reports.append(stages.carbon_report(carbon, days))
        clock.lap("carbon-forecast")
        reports.append(slo(store, fleet, plan_date))
        clock.lap("slo-feedback")
        if run_partitions is None:
            result = stages.plan_clusters(store, fleet, plan_date, days, carbon, options, None, n_partitions)
        else:
            with store.released():
                result = stages.plan_clusters(None, fleet, plan_date, days, carbon, options, run_partitions,
                                              n_partitions)
    except BaseException as exc:  # interrupts and cancellations too: the run log must show the attempt
        if checked or not isinstance(exc, InputError):
            try:
                store.failed_run("plan", params, plan_date, exc, started_at=started_at)
            except BaseException:  # noqa: BLE001 - an unreachable store must not hide what stopped the plan
                pass
        raise
    clock.lap("models-and-programs")
    with store.run("plan", params, plan_date=plan_date, started_at=started_at) as run:
        if not carbon.forecasts.empty:
            store.write_carbon_forecast(carbon.forecasts, run.run_id)
        reports.extend(result.reports)
        store.replace_plan(plan_date, result.vccs, result.status, run.run_id)
        for table, frame in result.extra_tables.items():
            store.upsert(table, frame, run.run_id)
        bad = (StageStatus.DEGRADED, StageStatus.FAILED)
        run.status = RunStatus.DEGRADED if any(r.status in bad for r in reports) else RunStatus.OK
        summary = stages.cluster_summary(result.status)
        run.summary = {"stages": [r.__dict__ for r in reports], "clusters": summary.to_dict("records"),
                       "seconds": {**clock.seconds, **result.seconds}}
    clock.lap("store-write")
    return PlanOutcome(plan_date, run.run_id, run.status, reports, summary, seconds={**clock.seconds,
                                                                                       **result.seconds})


class _Clock:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self._last = now


def check_slo(store: Store, fleet: Fleet, plan_date: date) -> stages.StageReport:
    from cicm.planning.slo import slo_stage

    try:
        result = slo_stage(store, fleet, plan_date)
    except Exception as exc:  # noqa: BLE001 - reported and stored with the run; the plan still goes ahead
        return stages.StageReport("slo-feedback", StageStatus.FAILED, f"{type(exc).__name__}: {exc}")
    return stages.StageReport("slo-feedback", StageStatus.RAN, result["summary"])
