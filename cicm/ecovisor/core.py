"""The ecovisor: the site's virtual energy systems, one per registered application, and its containers.

This is the HTTP-free core, a facade over the parts: :mod:`.registry` (apps and auth), :mod:`.caps` (the
power-cap controller), :mod:`.accountant` (a tick's energy and carbon, pure), :mod:`.views` (the getters'
answers) and :mod:`.clock`. ``app.py`` maps it to REST routes. Every method that changes state validates
everything first and changes nothing when it raises (:class:`cicm.errors.InputError` -> 422,
:class:`AuthError` -> 401, :class:`ForbiddenError` -> 403, :class:`NotFoundError` -> 404 (also for another
app's container: no names leak), :class:`ConflictError` -> 409,
:class:`BackendError` -> 503).
"""
from __future__ import annotations

import threading
from datetime import datetime, timezone

from cicm.errors import InputError

from . import accountant, policy, settings, views
from .accountant import Interval
from .backends.base import ContainerBackend
from .caps import CapController
from .carbon import CarbonTrace, CarbonValue, load_carbon
from .clock import Clock, as_utc, clock_mode, is_simulated
from .events import EventDetector
from .errors import AuthError, ConflictError, ForbiddenError, NotFoundError
from .power import POWER_SOURCE
from .registry import AppRegistry
from .schemas import AppRegistration
from .site import SiteConfig
from .solar import SolarModel, load_solar
from .state import AppState, ContainerState, containers_from_site
from cicm.store.ecovisor import Telemetry

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class Ecovisor:
    """One site: its containers, its registered apps, and the tick that accounts and caps them. Thread-safe."""

    def __init__(
        self,
        site: SiteConfig,
        clock: Clock,
        backend: ContainerBackend,
        telemetry: Telemetry,
        carbon: CarbonTrace | None = None,
        solar: SolarModel | None = None,
    ):
        self.site = site
        self.clock = clock
        self.backend = backend
        self.store = telemetry
        self.carbon = carbon or load_carbon(site.grid.carbon, site.base_dir)
        self.solar = solar or load_solar(site.location, site.solar, site.base_dir)
        self.dt_s = float(site.tick_seconds)
        self._lock = threading.RLock()
        self._flush_lock = threading.Lock()  # one settings flush at a time, so they are stored in order
        self.containers: dict[str, ContainerState] = containers_from_site(site)
        self.registry = AppRegistry(site, telemetry, self.containers, clock)
        self.apps: dict[str, AppState] = self.registry.apps
        self.caps = CapController(backend, self.containers, self.apps, self.carbon, self.solar, self.dt_s, clock)
        self.tick_id, self.last_tick_end = self._resume()
        self.events = EventDetector(site.events, site.solar.array_kwp)
        self.registry.restore(self.last_tick_end)
        for name in self.containers:
            self.caps.apply_container(name)

    def _resume(self) -> tuple[int, datetime]:
        """The last stored tick's id and the end of the interval accounted so far; a simulated clock behind
        the stored ticks is moved up to them."""
        last = self.store.last_tick()
        now = self.clock.now()
        if last is None:
            return 0, now
        if is_simulated(self.clock):
            end = as_utc(last["interval_end"])
            if end > now:
                self.clock.set(end)
                now = end
        return int(last["tick_id"]), now

    # ------------------------------------------------------------------ apps and auth
    def register_app(self, reg: AppRegistration) -> tuple[AppState, str]:
        with self._flush_lock, self._lock:  # no pending flush may land on a re-used name
            return self.registry.register(reg)

    def delete_app(self, name: str) -> None:
        with self._flush_lock, self._lock:
            app = self.registry.pop(name)
            self.events.forget(name)
            for c in app.containers:
                self.caps.release(c)
            self.store.delete_app(name)

    def rotate_token(self, name: str, ttl_days: int) -> tuple[AppState, str]:
        """A new token for app ``name`` (stored at once; the old one stops working); ``KeyError`` if unknown."""
        with self._flush_lock, self._lock:
            return self.registry.rotate(name, ttl_days)

    def authenticate(self, token: str | None) -> AppState:
        return self.registry.authenticate(token)  # a dict lookup: no lock needed

    def flush(self) -> int:
        """Store the settings of the apps changed since the last flush (setters only mark them); returns how
        many. The documents are taken under the ecovisor lock and written outside it."""
        with self._flush_lock:
            with self._lock:
                docs = self.registry.dirty_docs()
            self.registry.write_docs(docs)
            return len(docs)

    # ------------------------------------------------------------------ Table 1: setters
    def set_container_powercap(self, app: AppState, name: str, kw: float) -> ContainerState:
        with self._lock:
            cs = self.registry.container_of(app, name)
            self.caps.set_powercap(app, cs, settings.check_powercap_kw(cs.model, kw))
            self.registry.persist(app)
            return cs

    def set_container_powercaps(self, app: AppState, caps: list[tuple[str, float]]) -> list[ContainerState]:
        """Set several of the app's container caps at once, validated as a whole: an unknown container or another
        app's (404, ``field`` ``caps.<i>.name``), a container named twice or a cap outside the container's
        [idle, max] (422, ``caps.<i>.name`` / ``caps.<i>.kw``) refuses the whole request, and nothing changes.
        Returns the containers in the request's order."""
        with self._lock:
            items: list[tuple[ContainerState, float]] = []
            seen: dict[str, int] = {}
            for i, (name, kw) in enumerate(caps):
                if name in seen:
                    raise InputError(f"caps.{i}.name", f"container {name!r} is also entry {seen[name]}: "
                                                       "name each container at most once")
                seen[name] = i
                try:
                    cs = self.registry.container_of(app, name)
                except NotFoundError as e:
                    raise NotFoundError(f"entry {i}: {e}; nothing was changed", field=f"caps.{i}.name") from None
                try:
                    value = settings.check_powercap_kw(cs.model, kw)
                except InputError as e:
                    raise InputError(f"caps.{i}.kw", f"container {name!r}: {e.message}") from None
                items.append((cs, value))
            if items:
                self.caps.set_powercaps(app, items)
                self.registry.persist(app)
            return [cs for cs, _ in items]

    def set_battery_charge_rate(self, app: AppState, kw: float) -> AppState:
        with self._lock:
            app.charge_rate_kw = settings.check_charge_rate_kw(app, kw)
            self.registry.persist(app)
            return app

    def set_battery_max_discharge(self, app: AppState, kw: float) -> AppState:
        with self._lock:
            app.max_discharge_kw = settings.check_max_discharge_kw(app, kw)
            self.registry.persist(app)
            return app

    # ------------------------------------------------------------------ Table 2: carbon policies
    def set_carbon_rate(self, app: AppState, gco2_per_h: float | None) -> AppState:
        with self._lock:
            rate = settings.check_carbon_rate_gco2_per_h(gco2_per_h)
            self.caps.set_policy(app, "carbon_rate_gco2_per_h", rate)
            self.registry.persist(app)
            return app

    def set_carbon_budget(self, app: AppState, kgco2: float | None, start: datetime | None, end: datetime | None) -> AppState:
        with self._lock:
            budget = None if kgco2 is None else self._new_budget(app, kgco2, start, end)
            self.caps.set_policy(app, "carbon_budget", budget)
            self.registry.persist(app)
            return app

    def _new_budget(self, app: AppState, kgco2: float, start: datetime | None, end: datetime | None) -> dict:
        """A checked budget, with the carbon the app already used inside its window."""
        kg, s, e = settings.check_budget_window(kgco2, start, end, self.clock.now())
        used = self.registry.carbon_used_kgco2(app.name, s, e or self.last_tick_end) if s < self.last_tick_end else 0.0
        return {"kgco2": kg, "start": s, "end": e, "used_kgco2": used}

    # ------------------------------------------------------------------ getters
    def container_view(self, cs: ContainerState) -> dict:
        return views.container_view(cs, self.backend.kind)

    def get_container(self, app: AppState, name: str) -> dict:
        with self._lock:
            return self.container_view(self.registry.container_of(app, name))

    def battery_view(self, app: AppState) -> dict:
        return views.battery_view(app)

    def solar_view(self, app: AppState) -> dict:
        now = self.clock.now()
        return views.solar_view(app, self.solar.power_kw(now), now)

    def grid_view(self, app: AppState) -> dict:
        return views.grid_view(app)

    def app_power_view(self, app: AppState) -> dict:
        with self._lock:
            return views.app_power_view(app, [self.containers[c] for c in app.containers], None)

    def carbon_view(self) -> dict:
        return views.carbon_view(self.carbon, self.clock.now())

    def app_view(self, app: AppState) -> dict:
        with self._lock:
            return views.app_view(app, self.clock.now())

    def policy_view(self, app: AppState) -> dict:
        return views.policy_view(app, self.clock.now())

    # ------------------------------------------------------------------ Table 2: energy and carbon
    def energy_carbon(self, app: AppState, start: datetime | None, end: datetime | None, container: str | None) -> dict:
        """Energy (kWh) and carbon (kgCO2) of the app, or of one of its containers, over [start, end)."""
        s, e = self._query_interval(start, end)
        head = {"app": app.name, "container": container, "start": s.isoformat(), "end": e.isoformat()}
        with self._lock:
            if container is not None:
                self.registry.container_of(app, container)
                return {**head, **self.store.container_totals(container, app.name, s, e), "power_source": POWER_SOURCE}
            tot = self.store.app_totals(app.name, s, e)
            per = {c: self.store.container_totals(c, app.name, s, e) for c in app.containers}
        return {**head, "energy_kwh": tot["load_energy_kwh"], **tot, "containers": per, "power_source": POWER_SOURCE}

    def _query_interval(self, start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
        e = as_utc(end) if end else self.last_tick_end
        s = as_utc(start) if start else _EPOCH
        if e <= s:
            raise InputError("end", "must be after start")
        return s, e

    # ------------------------------------------------------------------ tick
    def advance(self, n: int = 1) -> list[dict]:
        """Simulated clock only: advance by ``n`` ticks, running each."""
        if not is_simulated(self.clock):
            raise ConflictError("the clock is real-time; ticks come from the ticker")
        out = []
        for _ in range(n):
            with self._lock:
                self.clock.advance(self.dt_s)
                out.append(self._tick())
            self.flush()
        return out

    def tick(self) -> dict:
        """Account the interval since the previous tick, store it, then set the caps for the next interval; then
        store the apps' changed settings."""
        summary = self._tick()
        self.flush()  # never under the ecovisor lock: a flush takes its own lock first, then the ecovisor's
        return summary

    def _tick(self) -> dict:
        with self._lock:
            interval = self._next_interval()
            grid = self.carbon.at(interval.mid)
            site_solar_kw = self.solar.mean_power_kw(interval.start, interval.end)
            errors = self.caps.read_usage()
            accounts = accountant.account_apps(
                self.apps, self.caps.power_kw(), site_solar_kw, grid.gco2_per_kwh, interval
            )
            self._book(accounts, interval)
            tick, app_rows, cont_cols = self._rows(self.tick_id + 1, interval, accounts, site_solar_kw, grid)
            self._record(tick, app_rows, cont_cols, interval)
            errors += self.caps.apply_all()  # caps for the next interval (carbon policies look at "now")
            summary = accountant.tick_summary(tick, app_rows, cont_cols, accounts, errors)
            summary["events"] = self.events.detect(self.tick_id, interval.end, interval.start,
                                                   {n: self.apps[n] for n in accounts}, self.carbon.at(interval.end))
            return summary

    def _next_interval(self) -> Interval:
        """[end of the previous tick, now); 409 when no time has passed."""
        interval = Interval(self.last_tick_end, self.clock.now())
        if interval.dt_s <= 0:
            raise ConflictError("no time has passed since the previous tick")
        return interval

    def _book(self, accounts: dict[str, accountant.AppAccount], interval: Interval) -> None:
        """Carry each app's account into its state: battery energy, last step, budget spent."""
        for name, acc in accounts.items():
            app = self.apps[name]
            app.battery_energy_kwh = acc.step.battery_energy_kwh
            app.last = acc.step
            app.last_interval = (interval.start, interval.end)
            if app.carbon_budget is not None:
                app.carbon_budget["used_kgco2"] = acc.budget_used_kgco2

    def _rows(
        self, tick_id: int, interval: Interval, accounts: dict[str, accountant.AppAccount], site_solar_kw: float,
        grid: CarbonValue,
    ) -> tuple[dict, list[dict], dict[str, list]]:
        """The tick's site row, app rows and container columns (:func:`accountant.container_columns`)."""
        tick = accountant.tick_row(tick_id, interval, site_solar_kw, grid, clock_mode(self.clock), self.backend.kind,
                                   datetime.now(timezone.utc))
        app_rows = [self._app_row(tick_id, interval, acc) for acc in accounts.values()]
        carbon = accountant.container_carbon_kgco2(accounts)
        cont_cols = accountant.container_columns(interval, self.containers.values(), carbon)
        return tick, app_rows, cont_cols

    def _app_row(self, tick_id: int, interval: Interval, acc: accountant.AppAccount) -> dict:
        """The app's row, with the rate limit in force at the interval's start (after this tick's carbon)."""
        app = self.apps[acc.app]
        rate = policy.rate_limit_gco2_per_h(app, interval.start)
        return accountant.app_row(tick_id, interval, acc, app.battery.capacity_kwh, rate, app.carbon_policy_met)

    def _record(self, tick: dict, app_rows: list[dict], cont_cols: dict[str, list], interval: Interval) -> None:
        """Store the tick (its container rows as columns) and move the ecovisor past it."""
        self.store.write_tick_columns(tick, POWER_SOURCE, cont_cols, app_rows)
        self.tick_id = tick["tick_id"]
        self.last_tick_end = interval.end


__all__ = ["Ecovisor", "AppState", "ContainerState", "AuthError", "ForbiddenError", "NotFoundError", "ConflictError"]
