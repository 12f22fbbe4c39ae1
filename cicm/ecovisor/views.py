"""The getters' answers (Table 1 and 2) as JSON-ready dicts. Pure functions of the state they are given."""
from __future__ import annotations

import math
from datetime import datetime

from . import policy
from .carbon import CarbonTrace
from .power import POWER_SOURCE
from .state import AppState, ContainerState


def container_view(cs: ContainerState, backend_kind: str) -> dict:
    """A container's caps, limit, usage and modelled power."""
    return {
        "container": cs.name,
        "app": cs.app,
        "cores": cs.cores,
        "idle_kw": cs.model.idle_kw,
        "max_kw": cs.model.max_kw,
        "powercap_kw": cs.powercap_kw,
        "effective_powercap_kw": cs.effective_powercap_kw,
        "cpu_limit_cores": cs.cpu_limit_cores,
        "cpu_usage_cores": cs.usage_cores,
        "power_kw": cs.power_kw,
        "power_source": POWER_SOURCE,
        "backend": backend_kind,
        "backend_error": cs.last_error,
    }


def as_of(app: AppState) -> str | None:
    """The end of the app's last accounted tick (ISO 8601), None before its first."""
    return app.last_interval[1].isoformat() if app.last_interval else None


def battery_view(app: AppState) -> dict:
    """The app's virtual battery: size, charge, settings and the last tick's flows."""
    b = app.battery
    last = app.last
    return {
        "capacity_kwh": b.capacity_kwh,
        "charge_level_kwh": app.battery_energy_kwh,
        "soc": (app.battery_energy_kwh / b.capacity_kwh) if b.capacity_kwh > 0 else 0.0,
        "reserve_soc": b.reserve_soc,
        "max_charge_kw": b.max_charge_kw,
        "max_discharge_kw": b.max_discharge_kw,
        "charge_rate_kw": app.charge_rate_kw,
        "max_discharge_setting_kw": app.max_discharge_kw,
        "discharge_rate_kw": last.battery_discharge_kw if last else 0.0,
        "charging_kw": last.charging_kw if last else 0.0,
        "round_trip_efficiency": b.efficiency,
        "as_of": as_of(app),
    }


def solar_view(app: AppState, site_solar_now_kw: float, now: datetime) -> dict:
    """The app's solar: the last tick's mean and the current power of its share."""
    last = app.last
    return {
        "power_kw": last.solar_kw if last else 0.0,
        "current_kw": app.solar_fraction * site_solar_now_kw,
        "curtailed_kw": last.curtailed_kw if last else 0.0,
        "solar_fraction": app.solar_fraction,
        "as_of": as_of(app),
        "now": now.isoformat(),
    }


def grid_view(app: AppState) -> dict:
    """The app's grid draw over the last tick and its share."""
    last = app.last
    return {
        "power_kw": last.grid_kw if last else 0.0,
        "to_load_kw": last.grid_to_load_kw if last else 0.0,
        "to_battery_kw": last.grid_to_battery_kw if last else 0.0,
        "over_share_kw": last.grid_over_share_kw if last else 0.0,
        "grid_share_kw": app.grid_share_kw,
        "as_of": as_of(app),
    }


def app_power_view(app: AppState, containers: list[ContainerState], grid_gco2_per_kwh: float | None) -> dict:
    """``get_app_power``: the app's power over its last tick, by container and by source, and its battery.

    ``load_kw`` is the sum of ``containers``; ``supply`` splits it by source (solar to load, battery discharge,
    grid to load: they add up to ``load_kw``). Charging and curtailment come on top; ``carbon_gco2_per_h`` is the
    rate of the tick's grid draw (load and charging) at the tick's intensity."""
    last = app.last
    z = 0.0
    grid_kw = last.grid_kw if last else z
    intensity = last.grid_gco2_per_kwh if last else grid_gco2_per_kwh
    return {
        "app": app.name,
        "as_of": as_of(app),
        "interval_start": app.last_interval[0].isoformat() if app.last_interval else None,
        "load_kw": last.load_kw if last else z,
        "containers": {cs.name: {"power_kw": cs.power_kw, "cpu_usage_cores": cs.usage_cores,
                                 "powercap_kw": cs.powercap_kw, "effective_powercap_kw": cs.effective_powercap_kw}
                       for cs in containers},
        "supply": {
            "solar_kw": last.solar_to_load_kw if last else z,
            "battery_kw": last.battery_discharge_kw if last else z,
            "grid_kw": last.grid_to_load_kw if last else z,
        },
        "solar": {"power_kw": last.solar_kw if last else z, "to_load_kw": last.solar_to_load_kw if last else z,
                  "to_battery_kw": last.solar_to_battery_kw if last else z,
                  "curtailed_kw": last.curtailed_kw if last else z},
        "grid": {"power_kw": grid_kw, "to_load_kw": last.grid_to_load_kw if last else z,
                 "to_battery_kw": last.grid_to_battery_kw if last else z,
                 "over_share_kw": last.grid_over_share_kw if last else z, "grid_share_kw": app.grid_share_kw},
        "battery": {
            "discharge_kw": last.battery_discharge_kw if last else z,
            "charging_kw": last.charging_kw if last else z,
            "charge_level_kwh": app.battery_energy_kwh,
            "soc": (app.battery_energy_kwh / app.battery.capacity_kwh) if app.battery.capacity_kwh > 0 else 0.0,
            "capacity_kwh": app.battery.capacity_kwh,
        },
        "grid_gco2_per_kwh": intensity,
        "carbon_gco2_per_h": grid_kw * intensity if intensity is not None else None,
        "power_source": POWER_SOURCE,
    }


def carbon_view(carbon: CarbonTrace, now: datetime) -> dict:
    """The grid's carbon intensity at ``now``."""
    v = carbon.at(now)
    return {
        "gco2_per_kwh": v.gco2_per_kwh,
        "quality": v.quality,
        "trace": carbon.name,
        "trace_hour": v.trace_hour.isoformat(),
        "at": now.isoformat(),
    }


def policy_view(app: AppState, now: datetime) -> dict:
    """The app's carbon policies and the rate limit in force at ``now``."""
    b = app.carbon_budget
    rate = policy.rate_limit_gco2_per_h(app, now)
    return {
        "carbon_rate_gco2_per_h": app.carbon_rate_gco2_per_h,
        "carbon_budget": None
        if b is None
        else {
            "kgco2": b["kgco2"],
            "start": b["start"].isoformat(),
            "end": b["end"].isoformat() if b["end"] else None,
            "used_kgco2": b["used_kgco2"],
        },
        "effective_rate_gco2_per_h": rate if math.isfinite(rate) else None,
        "met": app.carbon_policy_met,
    }


def app_view(app: AppState, now: datetime) -> dict:
    """The app's registration, battery and carbon policies."""
    return {
        "name": app.name,
        "containers": list(app.containers),
        "grid_share_kw": app.grid_share_kw,
        "solar_fraction": app.solar_fraction,
        "battery_fraction": app.battery_fraction,
        "callback_url": app.callback_url,
        "registered_at": app.registered_at.isoformat(),
        "token_expires_at": app.token_expires_at.isoformat() if app.token_expires_at else None,
        "battery": battery_view(app),
        "carbon_policy": policy_view(app, now),
    }


__all__ = [
    "container_view", "app_power_view", "battery_view", "solar_view", "grid_view", "carbon_view", "policy_view", "app_view", "as_of",
]
