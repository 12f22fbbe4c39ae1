"""The ecovisor's Prometheus metrics: ``GET /metrics`` on its FastAPI app.

``install(api, core)`` gives the app its own :class:`CollectorRegistry` (never the global one, so a process, or
a test, can build several apps), registers :class:`EcovisorCollector`, which reads the ecovisor's state when
Prometheus scrapes (no bookkeeping of its own), adds a request-latency histogram as an ASGI middleware, and
serves the registry at ``/metrics``. Names, units and labels: docs/metrics.md.

``core`` is a :class:`cicm.ecovisor.core.Ecovisor`, duck-typed: this package sits below the ecovisor's layer.
Powers are exported in watts and energy in joules (Prometheus' base units); carbon in grams of CO2.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_KW = 1000.0  # W per kW
_KWH = 3.6e6  # J per kWh
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _num(v: Any) -> float:
    if v is None:
        return math.nan
    return float(v)


class EcovisorCollector(Collector):
    """Every value comes from the ecovisor at scrape time: its containers and apps (last completed tick), the
    clock, the carbon trace and the solar model; the energy and carbon counters are the totals of its telemetry
    store (monotonic: ticks are never deleted, and a restart on the same file continues them)."""

    def __init__(self, core: Any):
        self.core = core

    def describe(self) -> list[Metric]:
        return []  # collected lazily: the registry must not call collect() when the app is built

    def collect(self) -> Iterator[Metric]:
        core = self.core
        lock = getattr(core, "_lock", None)
        with lock if lock is not None else contextlib.nullcontext():
            now = core.clock.now()
            tick_id = int(core.tick_id)
            last_end = core.last_tick_end
            containers = [(c.name, c.app or "", c.cores, c.powercap_kw, c.effective_powercap_kw, c.cpu_limit_cores,
                           c.usage_cores, c.power_kw, c.model.idle_kw, c.model.max_kw)
                          for c in core.containers.values()]
            apps = [(a.name, a.last, a.battery, a.battery_energy_kwh, a.charge_rate_kw, a.max_discharge_kw,
                     a.solar_fraction, a.grid_share_kw, a.carbon_policy_met) for a in core.apps.values()]
        site_solar_kw = float(core.solar.power_kw(now))
        grid = core.carbon.at(now)

        g = GaugeMetricFamily
        yield _one(g("cicm_ecovisor_tick_id", "Id of the last completed tick"), tick_id)
        yield _one(g("cicm_ecovisor_clock_timestamp_seconds", "The ecovisor's clock (simulated or real), Unix time"),
                   now.timestamp())
        yield _one(g("cicm_ecovisor_last_tick_end_timestamp_seconds",
                     "End of the last completed tick's interval, Unix time"), last_end.timestamp())
        yield _one(g("cicm_ecovisor_site_solar_power_watts", "The site's solar power now (model), W"),
                   site_solar_kw * _KW)
        ci = g("cicm_ecovisor_grid_carbon_intensity_gco2_per_kwh", "The grid's carbon intensity now, gCO2/kWh",
               labels=["quality"])
        ci.add_metric([str(grid.quality)], float(grid.gco2_per_kwh))
        yield ci

        # ---- containers (labels: container, app; app is "" while unowned)
        cl = ["container", "app"]
        cfam = {
            "power": g("cicm_ecovisor_container_power_watts", "Container power over the last tick, modelled from "
                                                              "CPU usage, W", labels=cl),
            "cap": g("cicm_ecovisor_container_powercap_watts", "Power cap set by the app, W", labels=cl),
            "eff": g("cicm_ecovisor_container_effective_powercap_watts", "Power cap in force after carbon "
                                                                         "policies, W", labels=cl),
            "limit": g("cicm_ecovisor_container_cpu_limit_cores", "CPU limit in force (the cap through the inverse "
                                                                  "power model), cores", labels=cl),
            "usage": g("cicm_ecovisor_container_cpu_usage_cores", "CPU usage over the last tick, cores", labels=cl),
            "cores": g("cicm_ecovisor_container_cores", "The container's cores", labels=cl),
            "max": g("cicm_ecovisor_container_max_power_watts", "The container's power at full CPU (model), W",
                     labels=cl),
        }
        for name, app, cores, cap, eff, limit, usage, power, _idle, max_kw in containers:
            lv = [name, app]
            cfam["power"].add_metric(lv, power * _KW)
            cfam["cap"].add_metric(lv, cap * _KW)
            cfam["eff"].add_metric(lv, eff * _KW)
            cfam["limit"].add_metric(lv, _num(limit))
            cfam["usage"].add_metric(lv, usage)
            cfam["cores"].add_metric(lv, cores)
            cfam["max"].add_metric(lv, max_kw * _KW)
        yield from cfam.values()

        # ---- apps: the last tick's flows, the battery, and counters from the telemetry store
        al = ["app"]
        fam = {
            "load": g("cicm_ecovisor_app_power_watts", "The app's container load over the last tick, W", labels=al),
            "solar": g("cicm_ecovisor_app_solar_power_watts", "The app's solar share over the last tick, W",
                       labels=al),
            "curt": g("cicm_ecovisor_app_solar_curtailed_watts", "Solar the app could neither use nor store, W",
                      labels=al),
            "grid": g("cicm_ecovisor_app_grid_power_watts", "Grid power drawn by the app over the last tick (load "
                                                            "and battery charging), W", labels=al),
            "over": g("cicm_ecovisor_app_grid_over_share_watts", "Grid power above the app's share, W", labels=al),
            "share": g("cicm_ecovisor_app_grid_share_watts", "The app's grid share, W", labels=al),
            "gci": g("cicm_ecovisor_app_grid_carbon_intensity_gco2_per_kwh", "Carbon intensity of the app's last "
                                                                             "tick, gCO2/kWh", labels=al),
            "soc": g("cicm_ecovisor_app_battery_state_of_charge_ratio", "Virtual battery state of charge (0-1)",
                     labels=al),
            "level": g("cicm_ecovisor_app_battery_energy_joules", "Energy in the virtual battery, J", labels=al),
            "capacity": g("cicm_ecovisor_app_battery_capacity_joules", "Capacity of the virtual battery, J",
                          labels=al),
            "charge": g("cicm_ecovisor_app_battery_charge_watts", "Battery charging over the last tick (solar and "
                                                                  "grid), W", labels=al),
            "discharge": g("cicm_ecovisor_app_battery_discharge_watts", "Battery discharge over the last tick, W",
                           labels=al),
            "rate": g("cicm_ecovisor_app_battery_charge_rate_setting_watts", "Grid charge rate set by the app, W",
                      labels=al),
            "maxdis": g("cicm_ecovisor_app_battery_max_discharge_setting_watts", "Max discharge set by the app, W "
                                                                                 "(NaN: not set)", labels=al),
            "met": g("cicm_ecovisor_app_carbon_policy_met", "1 when the app's carbon policy is met, else 0",
                     labels=al),
        }
        energy = CounterMetricFamily("cicm_ecovisor_app_energy_joules", "Energy used by the app's containers, J",
                                     labels=al)
        grid_energy = CounterMetricFamily("cicm_ecovisor_app_grid_energy_joules", "Energy the app drew from the "
                                                                                  "grid (load and charging), J",
                                          labels=al)
        solar_energy = CounterMetricFamily("cicm_ecovisor_app_solar_energy_joules", "Solar energy of the app's "
                                                                                    "share, J", labels=al)
        carbon = CounterMetricFamily("cicm_ecovisor_app_carbon_grams", "Carbon of the app's grid energy, gCO2",
                                     labels=al)
        for name, last, battery, level_kwh, rate_kw, maxdis_kw, _sf, share_kw, met in apps:
            lv = [name]
            fam["load"].add_metric(lv, last.load_kw * _KW if last else 0.0)
            fam["solar"].add_metric(lv, last.solar_kw * _KW if last else 0.0)
            fam["curt"].add_metric(lv, last.curtailed_kw * _KW if last else 0.0)
            fam["grid"].add_metric(lv, last.grid_kw * _KW if last else 0.0)
            fam["over"].add_metric(lv, last.grid_over_share_kw * _KW if last else 0.0)
            fam["share"].add_metric(lv, share_kw * _KW)
            fam["gci"].add_metric(lv, last.grid_gco2_per_kwh if last else math.nan)
            fam["soc"].add_metric(lv, level_kwh / battery.capacity_kwh if battery.capacity_kwh > 0 else 0.0)
            fam["level"].add_metric(lv, level_kwh * _KWH)
            fam["capacity"].add_metric(lv, battery.capacity_kwh * _KWH)
            fam["charge"].add_metric(lv, last.charging_kw * _KW if last else 0.0)
            fam["discharge"].add_metric(lv, last.battery_discharge_kw * _KW if last else 0.0)
            fam["rate"].add_metric(lv, rate_kw * _KW)
            fam["maxdis"].add_metric(lv, math.nan if maxdis_kw is None else maxdis_kw * _KW)
            fam["met"].add_metric(lv, 1.0 if met else 0.0)
            tot = core.store.app_totals(name, _EPOCH, last_end) if tick_id > 0 else {}
            energy.add_metric(lv, tot.get("load_energy_kwh", 0.0) * _KWH)
            grid_energy.add_metric(lv, tot.get("grid_energy_kwh", 0.0) * _KWH)
            solar_energy.add_metric(lv, tot.get("solar_energy_kwh", 0.0) * _KWH)
            carbon.add_metric(lv, tot.get("carbon_kgco2", 0.0) * 1000.0)
        yield from fam.values()
        yield from (energy, grid_energy, solar_energy, carbon)


def _one(m: GaugeMetricFamily, value: float) -> GaugeMetricFamily:
    m.add_metric([], float(value))
    return m


class LatencyMiddleware:
    """ASGI middleware: each HTTP request's duration into ``histogram`` by method, route template (never the raw
    path: one series per route, not per container name) and status code."""

    def __init__(self, app: Any, histogram: Histogram):
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def _send(message: dict[str, Any]) -> None:
            if message.get("type") == "http.response.start":
                status["code"] = int(message.get("status", 500))
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.histogram.labels(scope.get("method", ""), route, str(status["code"])) \
                .observe(time.perf_counter() - start)


def install(api: Any, core: Any) -> CollectorRegistry:
    """Give ``api`` (a FastAPI app) ``GET /metrics`` over its own registry; returns the registry."""
    from fastapi import Response

    registry = CollectorRegistry(auto_describe=False)
    registry.register(EcovisorCollector(core))
    latency = Histogram("cicm_ecovisor_request_duration_seconds", "HTTP request latency of the ecovisor's API, s",
                        ["method", "route", "code"], buckets=LATENCY_BUCKETS, registry=registry)
    api.add_middleware(LatencyMiddleware, histogram=latency)

    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    api.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    api.state.metrics_registry = registry
    return registry


__all__ = ["EcovisorCollector", "LatencyMiddleware", "install", "LATENCY_BUCKETS"]
