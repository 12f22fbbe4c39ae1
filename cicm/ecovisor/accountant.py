"""The accountant: energy and carbon of one tick, per app and per container, and the rows and summary that
record it. Pure functions: no I/O, no clock, no mutation of their arguments."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from . import energy
from .carbon import CarbonValue
from .power import POWER_SOURCE
from .state import AppState, ContainerState

APP_FIELDS = frozenset({
    "load_kw", "solar_kw", "solar_to_load_kw", "solar_to_battery_kw", "curtailed_kw", "battery_discharge_kw",
    "grid_to_load_kw", "grid_to_battery_kw", "grid_kw", "grid_over_share_kw", "battery_energy_kwh",
    "battery_loss_kwh", "grid_gco2_per_kwh", "carbon_kgco2", "carbon_load_kgco2", "carbon_charging_kgco2",
})
"""The :class:`energy.StepResult` fields stored in ``ecovisor_app_ticks``."""

SUMMARY_CONTAINER_FIELDS = (
    "cpu_usage_cores", "cpu_limit_cores", "powercap_kw", "effective_powercap_kw", "power_kw", "energy_kwh",
    "carbon_kgco2",
)


@dataclass(frozen=True)
class Interval:
    """A tick's interval [start, end)."""

    start: datetime
    end: datetime

    @property
    def dt_s(self) -> float:
        return (self.end - self.start).total_seconds()

    @property
    def dt_h(self) -> float:
        return self.dt_s / 3600.0

    @property
    def mid(self) -> datetime:
        return self.start + timedelta(seconds=self.dt_s / 2)


@dataclass(frozen=True)
class AppAccount:
    """One app's tick: its energy step, its budget's used carbon after the tick (None without a budget) and
    its load carbon split over its containers."""

    app: str
    step: energy.StepResult
    budget_used_kgco2: float | None
    container_carbon_kgco2: dict[str, float]


# ------------------------------------------------------------------------------------------------- energy, carbon
def step_app(app: AppState, load_kw: float, site_solar_kw: float, grid_gco2_per_kwh: float, dt_h: float) -> energy.StepResult:
    """The app's virtual energy system over ``dt_h`` hours with the given load."""
    return energy.step(
        energy.StepInput(
            dt_h=dt_h,
            load_kw=load_kw,
            solar_kw=app.solar_fraction * site_solar_kw,
            battery=app.battery,
            battery_energy_kwh=app.battery_energy_kwh,
            grid_gco2_per_kwh=grid_gco2_per_kwh,
            grid_charge_kw=app.charge_rate_kw,
            max_discharge_kw=math.inf if app.max_discharge_kw is None else app.max_discharge_kw,
            grid_share_kw=app.grid_share_kw,
        )
    )


def _overlaps(budget: dict, interval: Interval) -> bool:
    return interval.end > budget["start"] and (budget["end"] is None or interval.start < budget["end"])


def budget_share_kgco2(budget: dict, interval: Interval, carbon_kgco2: float) -> float:
    """The part of a tick's carbon that falls in the budget's window [start, end), prorated by time."""
    if not _overlaps(budget, interval):
        return 0.0
    lo = max(interval.start, budget["start"])
    hi = interval.end if budget["end"] is None else min(interval.end, budget["end"])
    return carbon_kgco2 * max(0.0, (hi - lo).total_seconds()) / interval.dt_s


def budget_used_after_kgco2(budget: dict | None, interval: Interval, carbon_kgco2: float) -> float | None:
    """The budget's used carbon after the tick (None without a budget)."""
    if budget is None:
        return None
    if not _overlaps(budget, interval):
        return budget["used_kgco2"]
    return budget["used_kgco2"] + budget_share_kgco2(budget, interval, carbon_kgco2)


def split_by_energy_kgco2(carbon_kgco2: float, power_kw: Mapping[str, float], dt_h: float) -> dict[str, float]:
    """Split ``carbon_kgco2`` over containers in proportion to their energy (all 0 when there is none)."""
    load_kwh = sum(power_kw.values()) * dt_h
    out: dict[str, float] = {}
    for c, p in power_kw.items():
        share = (p * dt_h / load_kwh) if load_kwh > 0 else 0.0
        out[c] = carbon_kgco2 * share
    return out


def account_app(
    app: AppState, power_kw: Mapping[str, float], site_solar_kw: float, grid_gco2_per_kwh: float, interval: Interval
) -> AppAccount:
    """One app's energy and carbon over the interval, its containers drawing ``power_kw``."""
    own_kw = {c: power_kw[c] for c in app.containers}
    dt_h = interval.dt_h
    res = step_app(app, sum(own_kw.values()), site_solar_kw, grid_gco2_per_kwh, dt_h)
    return AppAccount(
        app=app.name,
        step=res,
        budget_used_kgco2=budget_used_after_kgco2(app.carbon_budget, interval, res.carbon_kgco2),
        container_carbon_kgco2=split_by_energy_kgco2(res.carbon_load_kgco2, own_kw, dt_h),
    )


def account_apps(
    apps: Mapping[str, AppState], power_kw: Mapping[str, float], site_solar_kw: float, grid_gco2_per_kwh: float,
    interval: Interval,
) -> dict[str, AppAccount]:
    """Every app's account, by app name."""
    return {name: account_app(app, power_kw, site_solar_kw, grid_gco2_per_kwh, interval) for name, app in apps.items()}


def container_carbon_kgco2(accounts: Mapping[str, AppAccount]) -> dict[str, float]:
    """The load carbon of every owned container (unowned containers carry none)."""
    return {c: v for a in accounts.values() for c, v in a.container_carbon_kgco2.items()}


# ------------------------------------------------------------------------------------------------- rows
def _interval_cols(tick_id: int, interval: Interval) -> dict:
    return {"tick_id": tick_id, "interval_start": interval.start, "interval_end": interval.end, "dt_s": interval.dt_s}


def app_row(
    tick_id: int, interval: Interval, account: AppAccount, battery_capacity_kwh: float, rate_gco2_per_h: float,
    policy_met: bool,
) -> dict:
    """The app's ``ecovisor_app_ticks`` row."""
    res = account.step
    return {
        **_interval_cols(tick_id, interval), "app": account.app,
        **{k: v for k, v in res.as_dict().items() if k in APP_FIELDS},
        "battery_soc": res.battery_energy_kwh / battery_capacity_kwh if battery_capacity_kwh > 0 else 0.0,
        "carbon_rate_limit_gco2_per_h": rate_gco2_per_h if math.isfinite(rate_gco2_per_h) else None,
        "carbon_policy_met": policy_met,
    }


def container_row(tick_id: int, interval: Interval, cs: ContainerState, carbon_kgco2: float) -> dict:
    """The container's ``ecovisor_container_ticks`` row."""
    return {
        **_interval_cols(tick_id, interval),
        "container": cs.name, "app": cs.app, "cpu_limit_cores": cs.cpu_limit_cores,
        "cpu_usage_cores": cs.usage_cores, "powercap_kw": cs.powercap_kw,
        "effective_powercap_kw": cs.effective_powercap_kw, "power_kw": cs.power_kw,
        "energy_kwh": cs.power_kw * interval.dt_h, "carbon_kgco2": carbon_kgco2,
        "power_source": POWER_SOURCE,
    }


def container_columns(interval: Interval, containers: Iterable[ContainerState],
                      carbon_kgco2: Mapping[str, float]) -> dict[str, list]:
    """Every container's ``ecovisor_container_ticks`` values but the tick's own (tick id, interval, dt_s, power
    source), one list per column: what :func:`container_row` gives row by row, without a dict per container."""
    cs_list = list(containers)
    dt_h = interval.dt_h
    names = [cs.name for cs in cs_list]
    power = [cs.power_kw for cs in cs_list]
    return {
        "container": names, "app": [cs.app for cs in cs_list],
        "cpu_limit_cores": [cs.cpu_limit_cores for cs in cs_list],
        "cpu_usage_cores": [cs.usage_cores for cs in cs_list],
        "powercap_kw": [cs.powercap_kw for cs in cs_list],
        "effective_powercap_kw": [cs.effective_powercap_kw for cs in cs_list],
        "power_kw": power, "energy_kwh": [p * dt_h for p in power],
        "carbon_kgco2": [carbon_kgco2.get(n, 0.0) for n in names],
    }


def container_rows(tick_id: int, interval: Interval, columns: Mapping[str, list]) -> list[dict]:
    """The rows of :func:`container_columns` (for a store without a columnar write)."""
    head = _interval_cols(tick_id, interval)
    keys = list(columns)
    return [{**head, **dict(zip(keys, vals)), "power_source": POWER_SOURCE} for vals in zip(*columns.values())]


def tick_row(
    tick_id: int, interval: Interval, site_solar_kw: float, grid: CarbonValue, clock_mode: str, backend_kind: str,
    recorded_at: datetime,
) -> dict:
    """The site's ``ecovisor_ticks`` row."""
    return {
        **_interval_cols(tick_id, interval),
        "site_solar_kw": site_solar_kw, "grid_gco2_per_kwh": grid.gco2_per_kwh, "ci_quality": grid.quality,
        "clock_mode": clock_mode, "backend": backend_kind, "recorded_at": recorded_at,
    }


# ------------------------------------------------------------------------------------------------- summary
def _iso(v: object) -> object:
    return v.isoformat() if isinstance(v, datetime) else v


def app_summary(row: dict, res: energy.StepResult, ci_quality: str) -> dict:
    """An app's part of the tick summary (the callback payload): its row plus balance and charging."""
    return {
        **{k: _iso(v) for k, v in row.items()},
        "balance_error_kw": res.balance_error_kw(),
        "charging_kw": res.charging_kw,
        "ci_quality": ci_quality,
        "containers": {},
    }


def tick_summary(
    tick: dict, app_rows: list[dict], container_rows: list[dict] | Mapping[str, list],
    accounts: Mapping[str, AppAccount], errors: list[str],
) -> dict:
    """The tick's summary as returned by ``tick()``: site figures, then each app with its containers
    (``container_rows``: rows, or the columns of :func:`container_columns`)."""
    apps = {r["app"]: app_summary(r, accounts[r["app"]].step, tick["ci_quality"]) for r in app_rows}
    if isinstance(container_rows, Mapping):  # columns (container_columns)
        cols = [container_rows[k] for k in SUMMARY_CONTAINER_FIELDS]
        for i, (name, app) in enumerate(zip(container_rows["container"], container_rows["app"])):
            if app in apps:
                apps[app]["containers"][name] = {k: col[i] for k, col in zip(SUMMARY_CONTAINER_FIELDS, cols)}
        return _summary(tick, apps, errors)
    for r in container_rows:
        if r["app"] in apps:
            apps[r["app"]]["containers"][r["container"]] = {k: r[k] for k in SUMMARY_CONTAINER_FIELDS}
    return _summary(tick, apps, errors)


def _summary(tick: dict, apps: dict, errors: list[str]) -> dict:
    return {
        "tick_id": tick["tick_id"],
        "interval_start": tick["interval_start"].isoformat(),
        "interval_end": tick["interval_end"].isoformat(),
        "dt_s": tick["dt_s"],
        "site_solar_kw": tick["site_solar_kw"],
        "grid_gco2_per_kwh": tick["grid_gco2_per_kwh"],
        "ci_quality": tick["ci_quality"],
        "apps": apps,
        "errors": errors,
    }


__all__ = [
    "APP_FIELDS", "Interval", "AppAccount", "step_app", "budget_share_kgco2", "budget_used_after_kgco2",
    "split_by_energy_kgco2", "account_app", "account_apps", "container_carbon_kgco2", "app_row", "container_row",
    "container_columns", "container_rows",
    "tick_row", "app_summary", "tick_summary",
]
