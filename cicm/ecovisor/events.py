"""The ecovisor's notifications (Souza et al., Table 2: ``notify_solar_change``, ``notify_carbon_change``,
``notify_battery_full`` / ``notify_battery_empty``, and ``tick()``) and the hub that streams them to subscribers
as server-sent events (``GET /v1/apps/{app}/events``).

Two halves:

* :class:`EventDetector` runs inside the tick (under the ecovisor lock, in whichever thread ticks). After each
  tick it compares every app's new values with the last ones it *notified* and returns the events that fire.
  The rules are the site's ``[events]`` section (:class:`cicm.ecovisor.site.Events`):

  - ``solar_change``: the app's solar share (the tick's mean, kW, as ``GET /v1/solar/power`` → ``power_kw``) moved
    by more than ``max(solar_threshold_kw, solar_threshold_fraction x array_kwp x solar_fraction)`` from the last
    notified value. The comparison is with the last *notified* value, not the previous tick's, so a slow ramp
    fires once per threshold step and the value an app last heard is never further than the threshold from the
    truth (sunrise fires once the share passes the threshold; sunset once it is that close to zero).
  - ``carbon_change``: the grid intensity at the tick's end (the value ``GET /v1/grid/carbon`` gives now)
    differs from the last notified by more than ``carbon_threshold_gco2_per_kwh`` (default 0: every new value).
  - ``battery_full`` / ``battery_empty``: the app's battery *entered* ``soc >= 1 - eps`` / ``soc <= reserve + eps``
    (``eps = battery_epsilon_soc``). Edge-triggered: once per crossing; it fires again only after leaving the band.
  - ``tick``: every tick (the paper's ``tick()`` notification), with the app's figures of the tick.

  An app's first tick (after its registration, or after a restart) sets the baseline and fires nothing but
  ``tick``. Events of one tick come in that order: solar, carbon, battery, tick. Every event carries ``id``
  (``"<tick_id>-<k>"``: ordered, unique per app, and tick ids survive restarts), ``type``, ``app``, ``time`` (the
  ecovisor's clock at the tick's end, simulated or real) and ``tick_id``, then its values.

* :class:`EventHub` lives on the event loop: the tick hands it the events, and it fans them out to the app's
  open streams. At most ``max_subscribers_per_app`` streams per app (more: :class:`TooManySubscribers`, 429).
  The last ``replay_events`` events of each app are kept so that a client reconnecting with ``Last-Event-ID``
  gets what it missed; when events it needs are gone (evicted, or from before a restart of the ecovisor) its
  stream starts with a ``resync`` event: read the getters again. A stream more than ``queue_events`` behind is
  sent ``resync`` and closed (the client reconnects and replays).
"""
from __future__ import annotations

import asyncio
import collections
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping

from cicm.errors import InputError

from .carbon import CarbonValue
from .site import Events
from .state import AppState

#: every event type, in the order they come within one tick
EVENT_TYPES: tuple[str, ...] = ("solar_change", "carbon_change", "battery_full", "battery_empty", "tick")
#: what ``?types=`` takes: a group or an event type
TYPE_GROUPS: dict[str, tuple[str, ...]] = {
    "solar": ("solar_change",),
    "carbon": ("carbon_change",),
    "battery": ("battery_full", "battery_empty"),
    "tick": ("tick",),
    **{t: (t,) for t in EVENT_TYPES},
}
DEFAULT_TYPES = "solar,carbon,battery"
TYPES_PATTERN = r"^[a-z_]+(,[a-z_]+)*$"


def parse_types(raw: str | None) -> frozenset[str]:
    """``"solar,carbon,battery"`` -> the event types; an unknown or empty name is an InputError on ``types``."""
    names = (raw if raw is not None else DEFAULT_TYPES).split(",")
    out: set[str] = set()
    for n in names:
        n = n.strip()
        if n not in TYPE_GROUPS:
            raise InputError("types", f"unknown event type {n!r}; types is a comma-separated list of "
                                      f"{', '.join(TYPE_GROUPS)}")
        out.update(TYPE_GROUPS[n])
    return frozenset(out)


def event_key(event_id: str) -> tuple[int, int]:
    """``"<tick>-<k>"`` -> (tick, k); ValueError when it is not one."""
    tick, k = event_id.split("-")
    if not (tick.isdigit() and k.isdigit()):
        raise ValueError(event_id)
    return int(tick), int(k)


@dataclass
class _Watch:
    """What was last notified to an app (None: not yet known)."""

    solar_kw: float | None = None
    carbon: float | None = None
    battery: str | None = None  # "full", "empty" or "between"


class EventDetector:
    """Which notifications each tick fires, per app (see the module docstring). Not thread-safe by itself: the
    ecovisor calls it under its lock."""

    def __init__(self, cfg: Events, array_kwp: float):
        self.cfg = cfg
        self.array_kwp = array_kwp
        self._watch: dict[str, _Watch] = {}

    def forget(self, app: str) -> None:
        """The app is gone (or re-registered): its next tick sets a new baseline."""
        self._watch.pop(app, None)

    def solar_threshold_kw(self, app: AppState) -> float:
        return max(self.cfg.solar_threshold_kw, self.cfg.solar_threshold_fraction * self.array_kwp * app.solar_fraction)

    def battery_level(self, app: AppState) -> str | None:
        cap = app.battery.capacity_kwh
        if cap <= 0:
            return None
        soc = app.battery_energy_kwh / cap
        eps = self.cfg.battery_epsilon_soc
        if soc >= 1 - eps:
            return "full"
        if soc <= app.battery.reserve_soc + eps:
            return "empty"
        return "between"

    def detect(self, tick_id: int, at: datetime, interval_start: datetime, apps: Mapping[str, AppState],
               carbon_now: CarbonValue) -> list[dict]:
        """The events of tick ``tick_id`` (ending at ``at``) for every app that was accounted in it."""
        out: list[dict] = []
        for name, app in apps.items():
            if app.last is None:
                continue
            w = self._watch.setdefault(name, _Watch())
            evs = self._solar(app, w) + self._carbon(w, carbon_now) + self._battery(app, w)
            evs.append({"type": "tick", "interval_start": interval_start.isoformat(), "interval_end": at.isoformat(),
                        "load_kw": app.last.load_kw, "solar_kw": app.last.solar_kw, "grid_kw": app.last.grid_kw,
                        "battery_discharge_kw": app.last.battery_discharge_kw, "charging_kw": app.last.charging_kw,
                        **_battery_values(app)})
            for k, ev in enumerate(evs):
                out.append({"id": f"{tick_id}-{k}", "type": ev.pop("type"), "app": name, "time": at.isoformat(),
                            "tick_id": tick_id, **ev})
        return out

    def _solar(self, app: AppState, w: _Watch) -> list[dict]:
        assert app.last is not None
        v = app.last.solar_kw
        prev, w.solar_kw = w.solar_kw, v
        if prev is None:
            return []
        thr = self.solar_threshold_kw(app)
        if abs(v - prev) > thr:
            return [{"type": "solar_change", "solar_kw": v, "previous_kw": prev, "threshold_kw": thr,
                     "solar_fraction": app.solar_fraction}]
        w.solar_kw = prev  # keep comparing with the last notified value
        return []

    def _carbon(self, w: _Watch, cv: CarbonValue) -> list[dict]:
        v = cv.gco2_per_kwh
        prev = w.carbon
        if prev is not None and not abs(v - prev) > self.cfg.carbon_threshold_gco2_per_kwh:
            return []
        w.carbon = v
        if prev is None:
            return []
        return [{"type": "carbon_change", "gco2_per_kwh": v, "previous_gco2_per_kwh": prev, "quality": cv.quality,
                 "trace_hour": cv.trace_hour.isoformat()}]

    def _battery(self, app: AppState, w: _Watch) -> list[dict]:
        level = self.battery_level(app)
        prev, w.battery = w.battery, level
        if prev is None or level is None or level == prev or level == "between":
            return []
        return [{"type": f"battery_{level}", **_battery_values(app)}]


def _battery_values(app: AppState) -> dict:
    cap = app.battery.capacity_kwh
    soc = app.battery_energy_kwh / cap if cap > 0 else 0.0
    return {"soc": soc, "charge_level_kwh": app.battery_energy_kwh, "capacity_kwh": cap,
            "reserve_soc": app.battery.reserve_soc}


# ---------------------------------------------------------------------------------------------------- hub


class TooManySubscribers(Exception):
    """The app has as many open streams as it may."""


_CLOSE = object()


@dataclass(eq=False)
class Subscriber:
    app: str
    types: frozenset[str]
    queue: asyncio.Queue
    resync: str | None = None  # why the stream must start with (or end in) a resync event
    closed: bool = False
    released: bool = False


@dataclass
class _AppLog:
    recent: collections.deque
    floor: tuple[float, float]  # events at or before this may be lost to a reconnecting client
    subs: set[Subscriber] = field(default_factory=set)


class EventHub:
    """The app's open event streams, and its recent events for replay. Event-loop side only (``publish`` and
    ``subscribe`` are called on the loop; :meth:`close_threadsafe` from anywhere)."""

    def __init__(self, cfg: Events, boot_tick_id: int):
        self.cfg = cfg
        self.boot = (float(boot_tick_id), math.inf)
        self._apps: dict[str, _AppLog] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.published = 0

    def _log(self, app: str) -> _AppLog:
        log = self._apps.get(app)
        if log is None:
            log = self._apps[app] = _AppLog(collections.deque(), self.boot)
        return log

    def open_streams(self, app: str) -> int:
        log = self._apps.get(app)
        return len(log.subs) if log else 0

    def publish(self, events: Iterable[dict]) -> None:
        for ev in events:
            self.published += 1
            log = self._log(ev["app"])
            if self.cfg.replay_events > 0:
                if len(log.recent) >= self.cfg.replay_events:
                    log.floor = event_key(log.recent.popleft()["id"])
                log.recent.append(ev)
            else:
                log.floor = event_key(ev["id"])
            for sub in list(log.subs):
                if ev["type"] in sub.types and not sub.closed:
                    self._put(sub, ev)

    def _put(self, sub: Subscriber, ev: dict) -> None:
        if sub.queue.qsize() >= self.cfg.queue_events:
            sub.resync = f"this stream fell more than {self.cfg.queue_events} events behind; reconnect with " \
                         "Last-Event-ID to replay, and read the getters if the replay starts with resync"
            self._end(sub)
            return
        sub.queue.put_nowait(ev)

    def _end(self, sub: Subscriber) -> None:
        if not sub.closed:
            sub.closed = True
            sub.queue.put_nowait(_CLOSE)

    def subscribe(self, app: str, types: frozenset[str], last_event_id: str | None) -> Subscriber:
        """A new stream of ``app``'s events of ``types``, with the events after ``last_event_id`` queued first."""
        log = self._log(app)
        if len(log.subs) >= self.cfg.max_subscribers_per_app:
            raise TooManySubscribers(
                f"app {app!r} has {len(log.subs)} event streams open, the most one app may have "
                f"(events.max_subscribers_per_app); close one first (a closed stream's slot is freed within "
                f"{self.cfg.keepalive_s:g} s, at its next keep-alive)")
        sub = Subscriber(app, types, asyncio.Queue())
        if last_event_id is not None:
            last = event_key(last_event_id)
            if last < log.floor:
                sub.resync = ("events after Last-Event-ID may have been lost (the ecovisor restarted, or they fell "
                              "out of its replay buffer); read the current values with the getters")
            for ev in log.recent:
                if event_key(ev["id"]) > last and ev["type"] in types:
                    sub.queue.put_nowait(ev)
        log.subs.add(sub)
        return sub

    def release(self, sub: Subscriber) -> None:
        if not sub.released:
            sub.released = True
            sub.closed = True
            log = self._apps.get(sub.app)
            if log is not None:
                log.subs.discard(sub)

    def drop_app(self, app: str, why: str) -> None:
        """End the app's streams (it was deleted, or its token rotated); with the deletion, forget its events."""
        log = self._apps.get(app)
        if log is None:
            return
        for sub in list(log.subs):
            sub.resync = why
            self._end(sub)

    def forget(self, app: str) -> None:
        self.drop_app(app, "the app was deleted")
        self._apps.pop(app, None)

    def close(self) -> None:
        """End every stream (the ecovisor is stopping)."""
        for log in self._apps.values():
            for sub in list(log.subs):
                self._end(sub)

    def close_threadsafe(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.close)

    async def next(self, sub: Subscriber, timeout_s: float) -> dict | None:
        """The stream's next event; None when ``timeout_s`` passed first (send a keep-alive); raises
        :class:`StopAsyncIteration` when the stream is over."""
        try:
            item = await asyncio.wait_for(sub.queue.get(), timeout_s)
        except asyncio.TimeoutError:
            if sub.closed and sub.queue.empty():
                raise StopAsyncIteration from None
            return None
        if item is _CLOSE:
            raise StopAsyncIteration
        return item


def sse(ev: Mapping[str, Any]) -> bytes:
    """One event in the text/event-stream format (``id``, ``event``, one ``data`` line of JSON)."""
    return f"id: {ev['id']}\nevent: {ev['type']}\ndata: {json.dumps(ev, separators=(',', ':'))}\n\n".encode()


def sse_resync(why: str, at: datetime) -> bytes:
    return ("event: resync\ndata: " + json.dumps({"type": "resync", "reason": why, "time": at.isoformat()},
                                                 separators=(",", ":")) + "\n\n").encode()


__all__ = ["EVENT_TYPES", "TYPE_GROUPS", "DEFAULT_TYPES", "TYPES_PATTERN", "parse_types", "event_key",
           "EventDetector", "EventHub", "Subscriber", "TooManySubscribers", "sse", "sse_resync"]
