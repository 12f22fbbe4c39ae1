"""Storage evidence (issue 16, item 5): a campus with a battery and solar, over days of a bundled zone.

Every policy runs the same campus (the backtest's campus for the zone: its clusters, inflexible usage, the real
batch jobs and the true power curves, :mod:`cicm.backtest.runner`), on the same days, and is charged the same
real carbon; the site's solar is real irradiance. Four ways to run the site, rolling day by day (each local day is
planned at 18:00 the evening before over a 48-hour horizon from the day's start, the day's hours committed):

- ``no-battery``: today's queue program (carbon forecast, no storage); the array's power serves the load first
  and its surplus is curtailed.
- ``heuristic``: the same schedule, and the battery run as the agent runs it today
  (:func:`cicm.enforce.policy.battery_decision`: discharge in the 4 dirtiest forecast hours, grid-charge in the 4
  cleanest if the spread pays for the losses; surplus solar always charges).
- ``battery-plan``: the same schedule, and the battery planned by the storage LP on the forecast
  (:func:`cicm.optimize.storage.plan_storage`): what planning the battery alone adds.
- ``co-plan``: the queue program with the battery and the solar forecast in it (schedule and battery together).
- ``co-plan-actual-solar``, ``co-plan-oracle``: the same, rolling, planned on the actual solar, and on the actual
  solar and carbon: how much of the gap to the bound is each forecast's, and how much the rolling horizon's.
- ``bound``: co-planning with perfect foresight (actual carbon and actual solar, the whole run in one LP).

Each plan is applied through the same hourly site model (the ecovisor's rules: solar serves the load, its surplus
charges the battery within its limits and the rest is curtailed; a grid-charge command blocks discharge; the
battery discharges up to the command, its C-rate and its reserve; the grid supplies the rest), so every policy
meets the same physics; energy is conserved every hour and the losses are counted.

What is known: the flexible work (every task's arrival, width and 24 h deadline) and the inflexible usage, as in
the oracle policy; the carbon forecast is the backtest's (the trace forecast calibrated on GB day-ahead) and the
solar forecast is clear sky x the cloud factor of yesterday's cover, read from a cloud-cover CSV. The forecasts
under test are carbon and solar.

Solar. pvlib ships one year of real hourly irradiance and cloud cover per site (NREL TMY3); none is in
California. The site's actual output is its own clear sky (pvlib, at the campus's coordinates) x the measured
clear-sky index of the Greensboro NC TMY3 at the same local standard time and date (hourly PV ratio; the day's
ratio near sunrise and sunset), and the forecast cloud cover is that TMY's, one day earlier.
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from cicm.backtest.carbon_input import ZoneCarbon
from cicm.backtest.runner import (
    BacktestOptions,
    _segment,
    _simulated_hours,
    campus_for_zone,
    cluster_data,
    workload_shift,
)
from cicm.backtest.segment import Segment, hour_slots
from cicm.backtest.sim import DEADLINE_HOURS
from cicm.enforce.policy import battery_decision
from cicm.errors import InputError
from cicm.models.solar import (
    SolarSite,
    clear_sky_kw,
    measured_pv_kw,
    persistence_cloud,
    read_cloud_csv,
    read_tmy,
    solar_forecast_kw,
    write_cloud_csv,
)
from cicm.optimize.inputs import PowerCurve
from cicm.optimize.queue import QueueCampus, QueueCluster, greedy_service, plan_queue, task_bounds
from cicm.optimize.storage import Battery, CampusStorage, StoragePlan, plan_storage
from cicm.timeutil import local_day_hours_utc, planning_time_utc

_H = pd.Timedelta(hours=1)
POLICIES = ("no-battery", "heuristic", "battery-plan", "co-plan", "co-plan-actual-solar", "co-plan-oracle", "bound")
#: The rolling co-planners: (plans on the actual carbon?, plans on the actual solar?). The last two split the gap
#: to the bound between the two forecasts and the rolling 48-hour horizon.
CO_PLANS = {"co-plan": (False, False), "co-plan-actual-solar": (False, True), "co-plan-oracle": (True, True)}
#: Where each bundled zone's campus stands (a data-centre town of the zone): the solar array's coordinates.
ZONE_SITES = {
    "CISO": (37.34, -121.89), "ERCO": (32.48, -96.99), "BPAT": (45.60, -121.18), "AZPS": (33.45, -112.07),
    "MISO": (41.26, -95.86), "NYIS": (42.65, -73.75), "PJM": (39.04, -77.49), "SOCO": (33.75, -84.39),
}


@dataclass(frozen=True)
class SiteSpec:
    """The battery and the array, sized against the campus's mean power P (the carbon-agnostic schedule's):
    ``battery_hours`` x P kWh, C-rates ``c_rate`` (kW = C x kWh), ``solar_kwp_per_kw`` x P kWp."""

    battery_hours: float = 2.0
    c_rate: float = 0.5
    round_trip_efficiency: float = 0.85
    reserve_soc: float = 0.3
    initial_soc: float = 0.5
    solar_kwp_per_kw: float = 1.0
    tilt_deg: float = 20.0
    azimuth_deg: float = 180.0
    #: the planners' hurdle on cycling, as a share of the horizon's mean forecast carbon (CampusStorage's
    #: hurdle_gco2_per_kwh): a discharge must beat its charge and losses by this much. 0: trust the forecast.
    hurdle: float = 0.1  # chosen on CISO and ERCO from 2022-04-01 and 2022-10-01 (docs/storage_coplan.md)


@dataclass
class StorageRun:
    """One policy's run: the site model's hourly record over the whole run, and its schedule."""

    policy: str
    site: StoragePlan
    service: np.ndarray  # (clusters, hours) flexible core-hours per hour
    late_core_hours: float  # work past its deadline at the run's end (core-hours x hours late, summed)
    solve_seconds: float = 0.0


@dataclass
class StorageBacktest:
    zone: str
    start: date
    n_days: int
    hours: pd.DatetimeIndex
    carbon: np.ndarray  # actual gCO2/kWh
    solar_actual_kw: np.ndarray
    solar_forecast_kw: np.ndarray  # as forecast for each hour by the plan that committed it
    battery: Battery
    solar_site: SolarSite
    mean_load_kw: float
    spec: SiteSpec = field(default_factory=SiteSpec)
    runs: dict[str, StorageRun] = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> pd.DataFrame:
        """Per policy: total carbon (grid energy x actual intensity, charging included), the stored energy left
        at the end credited at the run's mean carbon x eta_d, and the cut against no battery."""
        rows = []
        eta_mean = float(self.carbon.mean())
        for name, run in self.runs.items():
            s = run.site
            kg = s.carbon_kg(self.carbon)
            credit = (s.energy_kwh[-1] - s.initial_kwh) * self.battery.discharge_efficiency * eta_mean / 1000.0
            rows.append({"policy": name, "total_kgco2": kg - credit, "grid_kgco2": kg,
                         "end_energy_credit_kgco2": credit, "grid_mwh": s.grid_kw.sum() / 1000.0,
                         "load_mwh": s.load_kw.sum() / 1000.0, "solar_used_mwh": s.solar_used_kw.sum() / 1000.0,
                         "curtailed_mwh": s.curtailed_kw.sum() / 1000.0, "loss_mwh": s.loss_kwh.sum() / 1000.0,
                         "discharged_mwh": s.discharge_kw.sum() / 1000.0,
                         "max_balance_error_kw": s.balance_error_kw(), "late_core_hours": run.late_core_hours,
                         "solve_seconds": run.solve_seconds})
        out = pd.DataFrame(rows).set_index("policy")
        if "no-battery" in out.index:
            base = out.loc["no-battery", "total_kgco2"]
            out["cut_vs_no_battery_pct"] = 100.0 * (base - out["total_kgco2"]) / base
        return out


# ------------------------------------------------------------------------------------------------ the site model


def run_site(load_kw: np.ndarray, solar_kw: np.ndarray, battery: Battery | None, charge_cmd_kw: np.ndarray,
             discharge_cmd_kw: np.ndarray) -> StoragePlan:
    """The ecovisor's hourly rules (docs/ecovisor.md) on one-hour steps: solar serves the load; its surplus
    charges the battery (C-rate, free capacity) and the rest is curtailed; a grid-charge command > 0 charges from
    the grid within what is left and blocks discharge; otherwise the battery discharges up to the command, its
    C-rate, the energy above the reserve and the load left; the grid supplies the rest."""
    load, solar = np.asarray(load_kw, float), np.asarray(solar_kw, float)
    n = load.size
    su, cur, ch, dis, en, grid = (np.zeros(n) for _ in range(6))
    if battery is None:
        su = np.minimum(solar, load)
        return StoragePlan(load, solar, su, solar - su, ch, dis, en, load - su, 0.0, 1.0, 1.0, "idle")
    b = battery
    ec, ed = b.charge_efficiency, b.discharge_efficiency
    e = b.initial_kwh
    for h in range(n):
        to_load = min(solar[h], load[h])
        surplus = solar[h] - to_load
        head = max(min(b.max_charge_kw, (b.capacity_kwh - e) / ec), 0.0)
        c_solar = min(surplus, head)
        c_grid = min(max(float(charge_cmd_kw[h]), 0.0), head - c_solar)
        d = 0.0
        if c_grid <= 0:
            avail = max((e - b.reserve_kwh) * ed, 0.0)
            d = min(max(float(discharge_cmd_kw[h]), 0.0), b.max_discharge_kw, avail, load[h] - to_load)
            if c_solar > 0 and d > 0:  # never both: solar surplus means no load is left to discharge into
                d = 0.0
        c = c_solar + c_grid
        e_new = e + ec * c - d / ed
        su[h], cur[h] = to_load + c_solar, surplus - c_solar
        ch[h], dis[h], en[h] = c, d, e_new
        grid[h] = load[h] + c - su[h] - d
        e = e_new
    return StoragePlan(load, solar, su, cur, ch, dis, en, grid, b.initial_kwh, ec, ed, "applied")


def commands(plan: StoragePlan, load_kw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A storage plan as the agent would apply it: the grid-charge rate (the planned charging beyond the planned
    solar surplus) and the maximum discharge of each hour."""
    surplus = np.maximum(plan.solar_used_kw - load_kw, 0.0)
    return np.maximum(plan.charge_kw - surplus, 0.0), plan.discharge_kw


def _concat(parts: list[StoragePlan], battery: Battery) -> StoragePlan:
    cat = lambda f: np.concatenate([getattr(p, f) for p in parts])  # noqa: E731
    return StoragePlan(cat("load_kw"), cat("solar_kw"), cat("solar_used_kw"), cat("curtailed_kw"), cat("charge_kw"),
                       cat("discharge_kw"), cat("energy_kwh"), cat("grid_kw"), parts[0].initial_kwh,
                       battery.charge_efficiency, battery.discharge_efficiency, "applied")


# ------------------------------------------------------------------------------------------------ solar at the site


def site_solar(site: SolarSite, hours: pd.DatetimeIndex, tz: str, tmy_path: str | Path | None = None
               ) -> tuple[np.ndarray, pd.Series]:
    """(actual kW per hour, forecast cloud cover per hour) at ``site`` from the TMY3's real weather at the same
    local standard time (see the module docstring)."""
    weather, meta = read_tmy(tmy_path, year=hours[0].year)
    tmy_site = SolarSite(float(meta["latitude"]), float(meta["longitude"]), site.kwp, site.tilt_deg,
                         site.azimuth_deg, float(meta.get("altitude", 0.0)))
    measured = measured_pv_kw(tmy_site, weather)
    clear_tmy = clear_sky_kw(tmy_site, weather.index)
    ratio_h = np.where(clear_tmy > 0.05 * site.kwp, measured / np.maximum(clear_tmy, 1e-9), np.nan)
    day = pd.DatetimeIndex(weather.index).floor("D")
    daily = pd.Series(measured).groupby(day).transform("sum").to_numpy() / np.maximum(
        pd.Series(clear_tmy).groupby(day).transform("sum").to_numpy(), 1e-9)
    ratio = np.clip(np.where(np.isnan(ratio_h), daily, ratio_h), 0.0, 1.5)
    std_site = pd.Timestamp("2022-01-15", tz=tz).utcoffset()
    shift = std_site - pd.Timedelta(hours=float(meta["TZ"]))  # site UTC + shift = the TMY's UTC, same LST
    # hours at the site are hour starts; the TMY's (after read_tmy) too
    tmy_idx = pd.DatetimeIndex(hours) + shift
    k = pd.Series(ratio, index=weather.index).reindex(tmy_idx).ffill().bfill().to_numpy()
    cover = persistence_cloud(weather["cloud_cover"]).reindex(tmy_idx).ffill().bfill()
    actual = clear_sky_kw(site, hours) * k
    return actual, pd.Series(cover.to_numpy(), index=hours)


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class _Cl:
    name: str
    inflexible: np.ndarray
    capacity: float
    curve: PowerCurve
    must: np.ndarray  # cumulative over the run's hours
    avail: np.ndarray


def _clusters(seg: Segment) -> list[_Cl]:
    n = len(seg.hours)
    out = []
    for c in seg.campus.clusters:
        t = seg.tasks[c.name]
        must, avail = task_bounds(n, t.arrival_h, t.work_h, t.cores, t.arrival_h + DEADLINE_HOURS)
        from cicm.backtest.accounting import ClusterPower
        out.append(_Cl(c.name, seg.inflexible[c.name], float(c.capacity_cores), ClusterPower(c).curve(), must, avail))
    return out


def _load(cls: list[_Cl], service: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return sum((c.curve(c.inflexible[idx] + service[i]) for i, c in enumerate(cls)), np.zeros(idx.size))


def _queue_campus(cls: list[_Cl], idx: np.ndarray, served: np.ndarray, carbon: np.ndarray, n_commit: int,
                  storage: CampusStorage | None) -> QueueCampus:
    qc = []
    for i, c in enumerate(cls):
        avail = np.maximum(c.avail[idx] - served[i], 0.0)
        must = np.minimum(np.maximum(c.must[idx] - served[i], 0.0), avail)
        u = c.inflexible[idx]
        qc.append(QueueCluster(c.name, u, u, c.capacity, must, avail, c.curve))
    committed = np.arange(idx.size) < n_commit
    return QueueCampus("site", tuple(qc), carbon, committed=committed, storage=storage)


def _lateness(cls: list[_Cl], service: np.ndarray) -> float:
    return float(sum(np.maximum(c.must - np.cumsum(service[i]), 0.0).sum() for i, c in enumerate(cls)))


def run_storage_backtest(zone: str = "CISO", start: date = date(2022, 6, 1), n_days: int = 14,
                         spec: SiteSpec | None = None, *, seed: int = 0, horizon_hours: int = 48,
                         policies: tuple[str, ...] = POLICIES, tmy_path: str | Path | None = None
                         ) -> StorageBacktest:
    """Run the storage policies over ``n_days`` local days of ``zone`` (a bundled EIA-930 2022 zone)."""
    from cicm.config import load_fleet

    t_start = time.perf_counter()
    spec = spec or SiteSpec()
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise InputError("policies", f"unknown: {', '.join(sorted(unknown))}; choose from {', '.join(POLICIES)}")
    if zone not in ZONE_SITES:
        raise InputError("zone", f"no site for {zone!r}; choose from {', '.join(ZONE_SITES)}")
    options = BacktestOptions(policies=(), experiment=False, seed=seed, drain_hours=horizon_hours)
    fleet = load_fleet()
    carbon = ZoneCarbon.bundled(zone)
    camp = campus_for_zone(fleet, zone)
    tz = camp.timezone
    days = [start + timedelta(days=i) for i in range(n_days)]
    need_start = planning_time_utc(days[0], tz) - pd.Timedelta(days=35)
    need_end = local_day_hours_utc(days[-1], tz)[-1] + (options.drain_hours + 1) * _H
    shift = workload_shift(fleet, start, need_start, need_end)
    moved = fleet.model_copy(update={"history_start": fleet.history_start + shift})
    data = {c.name: cluster_data(fleet, c, seed, shift) for c in camp.clusters}
    from cicm.planning.stages import CampusDay

    day_hours = [local_day_hours_utc(d, tz) for d in days]
    hours = _simulated_hours(moved, days, day_hours, tz, options.drain_hours)
    campus_days = [CampusDay(camp, dh, planning_time_utc(d, tz)) for d, dh in zip(days, day_hours)]
    seg = _segment(camp, days, hours, campus_days, options, data, carbon)
    n = len(hours)
    cls = _clusters(seg)
    # sizing: the carbon-agnostic schedule's mean campus power
    greedy = np.stack([greedy_service(c.must, c.avail, np.maximum(c.capacity - c.inflexible, 0.0)) for c in cls])
    mean_kw = float(_load(cls, greedy, np.arange(n)).mean())
    lat, lon = ZONE_SITES[zone]
    site = SolarSite(lat, lon, spec.solar_kwp_per_kw * mean_kw, spec.tilt_deg, spec.azimuth_deg)
    cap = spec.battery_hours * mean_kw
    battery = Battery.from_site(cap, spec.round_trip_efficiency, spec.c_rate, spec.c_rate, spec.reserve_soc,
                                spec.initial_soc)
    solar_actual, cover = site_solar(site, hours, tz, tmy_path)
    with tempfile.TemporaryDirectory() as tmp:  # the forecast source is a cloud-cover CSV
        cover = read_cloud_csv(write_cloud_csv(cover, Path(tmp) / f"{zone}_cloud_cover.csv"))
    clear = clear_sky_kw(site, hours)
    solar_fc = solar_forecast_kw(site, hours, cover, clear_kw=clear)
    bt = StorageBacktest(zone, start, n_days, hours, seg.carbon, solar_actual, solar_fc, battery, site, mean_kw, spec)

    # planning steps: each window day, then 24-hour blocks of the drain (no new work arrives there)
    blocks = [(hour_slots(hours, cd.hours), cd.planned_at) for cd in campus_days]
    t = int(blocks[-1][0][-1]) + 1
    while t < n:
        idx = np.arange(t, min(t + 24, n))
        blocks.append((idx, hours[t] - pd.Timedelta(hours=6)))
        t += 24

    rolling = [p for p in policies if p != "bound"]
    if rolling:
        _rolling(bt, seg, cls, blocks, rolling, horizon_hours)
    if "bound" in policies:
        t0 = time.perf_counter()
        campus = _queue_campus(cls, np.arange(n), np.zeros(len(cls)), seg.carbon, n,
                               CampusStorage(battery, solar_actual, terminal_gco2_per_kwh=float(seg.carbon.mean())))
        plan = plan_queue(campus)
        assert plan.storage is not None
        load = _load(cls, plan.service_cpu_cores, np.arange(n))
        cmd_c, cmd_d = commands(plan.storage, load)
        bt.runs["bound"] = StorageRun("bound", run_site(load, solar_actual, battery, cmd_c, cmd_d),
                                      plan.service_cpu_cores, _lateness(cls, plan.service_cpu_cores),
                                      time.perf_counter() - t0)
    bt.seconds = time.perf_counter() - t_start
    return bt


def _rolling(bt: StorageBacktest, seg: Segment, cls: list[_Cl], blocks, policies: list[str],
             horizon_hours: int) -> None:
    n = len(bt.hours)
    battery = bt.battery
    plain_service = np.zeros((len(cls), n))  # the no-storage schedule (no-battery, heuristic, battery-plan)
    co_service = {p: np.zeros((len(cls), n)) for p in CO_PLANS}
    parts: dict[str, list[StoragePlan]] = {p: [] for p in policies}
    energy = {p: battery.initial_kwh for p in policies}
    secs = {p: 0.0 for p in policies}
    need_plain = any(p in policies for p in ("no-battery", "heuristic", "battery-plan"))
    for idx, issued in blocks:
        t = int(idx[0])
        hz = np.arange(t, min(t + horizon_hours, n))
        eta_fc = seg.forecaster.at(issued, hz)
        k = idx.size
        if need_plain:
            t0 = time.perf_counter()
            served = plain_service[:, :t].sum(axis=1)
            plan = plan_queue(_queue_campus(cls, hz, served, eta_fc, k, None))
            plain_service[:, idx] = plan.service_cpu_cores[:, :k]
            dt = time.perf_counter() - t0
            load = _load(cls, plain_service[:, idx], idx)
            solar = bt.solar_actual_kw[idx]
            for p in ("no-battery", "heuristic", "battery-plan"):
                if p not in policies:
                    continue
                bat = battery.with_energy(energy[p])
                secs[p] += dt
                if p == "no-battery":
                    part = run_site(load, solar, None, np.zeros(k), np.zeros(k))
                elif p == "heuristic":
                    day = pd.Series(eta_fc[:k], index=bt.hours[idx])
                    spec = {"capacity_kwh": bat.capacity_kwh, "round_trip_efficiency": bat.round_trip_efficiency,
                            "reserve_soc": bat.reserve_soc, "max_charge_kw": bat.max_charge_kw,
                            "max_discharge_kw": bat.max_discharge_kw}
                    dec = [battery_decision(day, h, spec, math.inf) for h in bt.hours[idx]]
                    part = run_site(load, solar, bat, np.array([d.charge_kw if d else 0.0 for d in dec]),
                                    np.array([d.max_discharge_kw if d else 0.0 for d in dec]))
                else:
                    t1 = time.perf_counter()
                    hz_load = _load(cls, plan.service_cpu_cores, hz)
                    sp, _ = plan_storage(hz_load, eta_fc, CampusStorage(
                        bat, bt.solar_forecast_kw[hz], hurdle_gco2_per_kwh=bt.spec.hurdle * float(eta_fc.mean())),
                        committed=np.arange(hz.size) < k)
                    cmd_c, cmd_d = commands(sp, hz_load)
                    part = run_site(load, solar, bat, cmd_c[:k], cmd_d[:k])
                    secs[p] += time.perf_counter() - t1
                parts[p].append(part)
                if p != "no-battery":
                    energy[p] = float(part.energy_kwh[-1])
        for p, (real_carbon, real_solar) in CO_PLANS.items():
            if p not in policies:
                continue
            t0 = time.perf_counter()
            bat = battery.with_energy(energy[p])
            served = co_service[p][:, :t].sum(axis=1)
            eta = seg.carbon[hz] if real_carbon else eta_fc
            sun = bt.solar_actual_kw[hz] if real_solar else bt.solar_forecast_kw[hz]
            hurdle = 0.0 if real_carbon else bt.spec.hurdle * float(eta.mean())  # no margin for a known future
            plan = plan_queue(_queue_campus(cls, hz, served, eta, k, CampusStorage(bat, sun,
                                                                                   hurdle_gco2_per_kwh=hurdle)))
            assert plan.storage is not None
            co_service[p][:, idx] = plan.service_cpu_cores[:, :k]
            hz_load = _load(cls, plan.service_cpu_cores, hz)
            cmd_c, cmd_d = commands(plan.storage, hz_load)
            part = run_site(_load(cls, co_service[p][:, idx], idx), bt.solar_actual_kw[idx], bat, cmd_c[:k],
                            cmd_d[:k])
            parts[p].append(part)
            energy[p] = float(part.energy_kwh[-1])
            secs[p] += time.perf_counter() - t0
    for p in policies:
        whole = _concat(parts[p], battery) if p != "no-battery" else _concat_idle(parts[p])
        service = co_service[p] if p in CO_PLANS else plain_service
        bt.runs[p] = StorageRun(p, whole, service, _lateness(cls, service), secs[p])


def _concat_idle(parts: list[StoragePlan]) -> StoragePlan:
    cat = lambda f: np.concatenate([getattr(p, f) for p in parts])  # noqa: E731
    return StoragePlan(cat("load_kw"), cat("solar_kw"), cat("solar_used_kw"), cat("curtailed_kw"), cat("charge_kw"),
                       cat("discharge_kw"), cat("energy_kwh"), cat("grid_kw"), 0.0, 1.0, 1.0, "idle")
