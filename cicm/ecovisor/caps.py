"""The power-cap controller: turns each container's power cap, lowered by its app's carbon policies, into a CPU
limit on the container backend, and reads CPU usage (and so modelled power) back each tick."""
from __future__ import annotations

import math
from datetime import datetime

from . import policy
from .backends.base import BackendError, ContainerBackend
from .carbon import CarbonTrace
from .clock import Clock
from .solar import SolarModel
from .state import AppState, ContainerState

_TOL_KW = 1e-12


class CapController:
    """Owns the backend side of the containers: CPU limits out, CPU usage in. Callers hold the ecovisor lock."""

    def __init__(
        self,
        backend: ContainerBackend,
        containers: dict[str, ContainerState],
        apps: dict[str, AppState],
        carbon: CarbonTrace,
        solar: SolarModel,
        tick_s: float,
        clock: Clock,
    ):
        self.backend = backend
        self.containers = containers
        self.apps = apps
        self.carbon = carbon
        self.solar = solar
        self.tick_s = tick_s
        self.clock = clock

    # ---------------------------------------------------------------- reading
    def read_usage(self) -> list[str]:
        """Read every container's CPU usage and model its power; returns the backend errors (usage 0 then)."""
        errors: list[str] = []
        for cs in self.containers.values():
            try:
                u = self.backend.cpu_usage_cores(cs.name)
                cs.last_error = None
            except BackendError as e:
                u = 0.0
                cs.last_error = str(e)
                errors.append(f"{cs.name}: {e}")
            cs.usage_cores = min(max(u, 0.0), cs.cores)
            cs.power_kw = cs.model.power_kw(cs.usage_cores)
        return errors

    def power_kw(self) -> dict[str, float]:
        """Each container's modelled power over the last tick."""
        return {name: cs.power_kw for name, cs in self.containers.items()}

    # ---------------------------------------------------------------- caps
    def effective_caps_kw(self, app: AppState, now: datetime) -> tuple[dict[str, float], bool]:
        """The app's container caps after its carbon policies at ``now``, and whether the policies are met."""
        caps = {c: self.containers[c].powercap_kw for c in app.containers}
        rate = policy.rate_limit_gco2_per_h(app, now)
        if not math.isfinite(rate):
            return caps, True
        clean_kw = policy.clean_supply_kw(app, self.solar.power_kw(now), self.tick_s / 3600.0)
        idle = {c: self.containers[c].model.idle_kw for c in caps}
        return policy.policy_caps_kw(caps, idle, rate, clean_kw, self.carbon.at(now).gco2_per_kwh)

    def apply(self, app: AppState) -> None:
        """Set the CPU limits of the app's containers from their effective caps (only the ones that changed)."""
        now = self.clock.now()
        eff, met = self.effective_caps_kw(app, now)
        app.carbon_policy_met = met
        app.caps_constrained = math.isfinite(policy.rate_limit_gco2_per_h(app, now))
        for c, cap in eff.items():
            cs = self.containers[c]
            if cs.cpu_limit_cores is None or abs(cap - cs.effective_powercap_kw) > _TOL_KW:
                self._set_limit(cs, cap)

    def apply_all(self) -> list[str]:
        """Apply every app's caps; returns the backend errors, one per app that failed."""
        errors: list[str] = []
        for app in self.apps.values():
            try:
                self.apply(app)
            except BackendError as e:
                errors.append(f"{app.name}: {e}")
        return errors

    def apply_container(self, name: str) -> None:
        """Apply the caps of the container's app, or the container's own cap when no app owns it."""
        cs = self.containers[name]
        if cs.app is None:
            self._set_limit(cs, cs.powercap_kw)
        else:
            self.apply(self.apps[cs.app])

    def release(self, name: str) -> None:
        """Free a container of its app: no owner, uncapped."""
        cs = self.containers[name]
        cs.app = None
        cs.powercap_kw = cs.model.max_kw
        self.apply_container(name)

    def set_powercap(self, app: AppState, cs: ContainerState, kw: float) -> None:
        """Set a container's cap and apply it; on a backend error, restore the old cap and re-raise.

        Without a carbon policy in force, the effective cap of a container is its own cap, so only this container
        is touched (O(1)); under a policy, the common scaling factor moves every cap of the app (O(containers))."""
        self.set_powercaps(app, [(cs, kw)])

    def set_powercaps(self, app: AppState, items: list[tuple[ContainerState, float]]) -> None:
        """Set several containers' caps (checked values, each container once) and apply them; on a backend error,
        restore every old cap, re-apply, and re-raise.

        Without a carbon policy in force only the listed containers are touched (O(len(items))); under a policy,
        the app's caps are applied once for the whole batch (O(containers), not O(items x containers))."""
        old = [(cs, cs.powercap_kw) for cs, _ in items]
        for cs, kw in items:
            cs.powercap_kw = kw
        try:
            self._apply_after_change(app, [cs for cs, _ in items])
        except BackendError:
            for cs, kw in old:
                cs.powercap_kw = kw
            try:
                self._apply_after_change(app, [cs for cs, _ in old])
            except BackendError:
                pass
            raise

    def _apply_after_change(self, app: AppState, changed: list[ContainerState]) -> None:
        if app.caps_constrained or math.isfinite(policy.rate_limit_gco2_per_h(app, self.clock.now())):
            self.apply(app)  # under a policy now or at the last apply: every effective cap may move
            return
        app.carbon_policy_met = True
        for cs in changed:
            if cs.cpu_limit_cores is None or abs(cs.powercap_kw - cs.effective_powercap_kw) > _TOL_KW:
                self._set_limit(cs, cs.powercap_kw)

    def set_policy(self, app: AppState, field: str, value: object) -> None:
        """Set one carbon-policy field of the app and apply its caps; on a backend error, restore and re-raise."""
        old = getattr(app, field)
        setattr(app, field, value)
        try:
            self.apply(app)
        except BackendError:
            setattr(app, field, old)
            raise

    def _set_limit(self, cs: ContainerState, cap_kw: float) -> None:
        limit = cs.model.cpu_limit_for_cap(cap_kw)
        try:
            self.backend.set_cpu_limit(cs.name, limit)
            cs.last_error = None
        except BackendError as e:
            cs.last_error = str(e)
            raise
        cs.effective_powercap_kw = cap_kw
        cs.cpu_limit_cores = limit


__all__ = ["CapController"]
