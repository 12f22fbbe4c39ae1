"""The ecovisor's REST API (FastAPI). ``create_app(site, clock, backend, db_path)`` builds it.

Auth: admin routes need ``Authorization: Bearer $CICM_ECOVISOR_ADMIN_TOKEN``; app routes need the token returned by
``POST /v1/apps`` (or by ``POST /v1/apps/{name}/token``, which rotates it), until it expires. An app sees and
controls only its own virtual energy system and containers: 401 without a token, with a bad or an expired one;
403 for an app's token on an admin route; 404 for a container the app does not have, the same answer whether it
does not exist or is another app's. Bad values answer 422 with the offending ``field``, and change nothing.
Every route publishes its error answers and range rules in the OpenAPI (``/openapi.json``).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Callable, TypeVar

import anyio
import httpx
from fastapi import Body, Depends, FastAPI, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from cicm.errors import InputError
from cicm.ops import ecovisor_metrics

from .backends.base import BackendError, ContainerBackend
from .backends.simulated import SimulatedBackend
from .clock import Clock, clock_mode, is_simulated
from .core import Ecovisor
from .errors import AuthError, ConflictError, ForbiddenError, NotFoundError
from .events import TYPES_PATTERN, EventHub, Subscriber, TooManySubscribers, event_key, parse_types, sse, sse_resync
from .power import POWER_SOURCE
from .schemas import (
    NAME_PATTERN,
    TICK_CAP_WHY,
    AppPower,
    AppRegistered,
    AppRegistration,
    CarbonBudgetBody,
    CarbonRateBody,
    DemandBody,
    ErrorBody,
    PowerBody,
    PowerCapsBody,
    PowerCapsSet,
    TickBody,
    Timestamp,
    TokenIssued,
    TokenRotation,
    ValidationErrorBody,
)
from .site import SiteConfig
from .state import AppState
from cicm.store.ecovisor import Telemetry

log = logging.getLogger("cicm.ecovisor")

T = TypeVar("T")
INLINE_BACKENDS = ("simulated", "cgroup")  # backends whose calls are quick enough for the event loop
INLINE_MAX_CAPS = 200  # a bulk cap request of more containers runs in a worker thread, not on the event loop

_bearer = HTTPBearer(auto_error=False)
Creds = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
Name = Annotated[str, PathParam(pattern=NAME_PATTERN, description="a container's or an app's name")]
When = Annotated[Timestamp | None, Query(description="ISO-8601 date-time with a time zone")]
ContainerQuery = Annotated[str | None, Query(pattern=NAME_PATTERN, description="one of the app's containers")]


def _resp(status: int, description: str) -> dict:
    model = ValidationErrorBody if status == 422 else ErrorBody
    return {status: {"model": model, "description": description}}


R401 = _resp(401, "no bearer token, or an unknown or expired one")
R401_ADMIN = _resp(401, "no bearer token, or not the admin token")
R403 = _resp(403, "an application's token on an admin route")
R404_CONTAINER = _resp(404, "the app has no container of that name (the same answer for another app's container "
                            "as for one that does not exist)")
R404_CAPS = _resp(404, "an entry names a container the app does not have (the same answer for another app's "
                       "container as for one that does not exist); ``field`` is ``caps.<i>.name``; nothing changed")
R409 = _resp(409, "conflicts with the current state")
R422 = _resp(422, "a malformed or out-of-range value (strict types: no strings for numbers, no booleans, "
                  "timestamps as ISO-8601 strings with a zone); nothing changed")
R503 = _resp(503, "the container backend failed (a cgroup that cannot be written, an LXD error); the old value stays")
R429_STREAMS = _resp(429, "the app has as many event streams open as it may (events.max_subscribers_per_app)")
APP = R401
ADMIN = R401_ADMIN | R403


class CallbackDispatcher:
    """Fire-and-forget POSTs of tick notifications. Never awaited by the tick; a slow or dead callback only
    costs its own task (bounded by ``timeout_s``); at most ``max_pending`` per app are in flight, more are
    dropped and counted."""

    def __init__(self, timeout_s: float = 2.0, max_pending: int = 8):
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.client: httpx.AsyncClient | None = None
        self.pending: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s))

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def fire(self, app: str, url: str, payload: dict) -> None:
        if self.client is None:
            return
        if self.pending.get(app, 0) >= self.max_pending:
            self.dropped[app] = self.dropped.get(app, 0) + 1
            return
        self.pending[app] = self.pending.get(app, 0) + 1
        task = asyncio.get_running_loop().create_task(self._post(app, url, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, app: str, url: str, payload: dict) -> None:
        try:
            client = self.client
            if client is None:  # stopped since the callback was fired
                raise RuntimeError("the callback client is closed")
            with anyio.fail_after(self.timeout_s + 0.5):
                r = await client.post(url, json=payload)
            if r.status_code >= 400:
                raise httpx.HTTPStatusError(f"HTTP {r.status_code}", request=r.request, response=r)
            self.sent[app] = self.sent.get(app, 0) + 1
        except Exception as e:  # a callback's failure is the app's problem, never the tick's
            self.failed[app] = self.failed.get(app, 0) + 1
            log.info("tick callback of %s to %s failed: %s", app, url, e)
        finally:
            self.pending[app] -= 1

    def stats(self, app: str) -> dict:
        return {k: getattr(self, k).get(app, 0) for k in ("sent", "failed", "dropped", "pending")}


async def _require_admin(request: Request, creds: Creds) -> None:
    admin = request.app.state.admin_token
    if creds is not None and admin and hmac.compare_digest(creds.credentials.encode(), admin.encode()):
        return
    if creds is not None:
        try:
            request.app.state.ecovisor.authenticate(creds.credentials)
        except AuthError:
            pass
        else:
            raise ForbiddenError("an application's token cannot use admin routes")
    raise AuthError("admin token required")


async def _require_app(request: Request, creds: Creds) -> AppState:
    return request.app.state.ecovisor.authenticate(creds.credentials if creds else None)


Admin = Annotated[None, Depends(_require_admin)]
App = Annotated[AppState, Depends(_require_app)]


def _err(status: int, msg: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": msg, **extra}, status_code=status, headers=headers)


class _EventStream(StreamingResponse):
    """An event stream whose subscriber slot is released however the response ends (finished, cancelled by a
    disconnect, or never started)."""

    media_type = "text/event-stream"

    def __init__(self, content: Any, hub: EventHub, sub: Subscriber, status_code: int = 200):
        super().__init__(content, status_code=status_code, media_type="text/event-stream",
                         headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        self._hub, self._sub = hub, sub

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._hub.release(self._sub)


def create_app(
    site: SiteConfig,
    clock: Clock,
    backend: ContainerBackend,
    db_path: str | Path | None,
    *,
    admin_token: str | None = None,
    carbon=None,
    solar=None,
    callback_timeout_s: float = 2.0,
    run_ticker: bool = True,
    flush_every_s: float = 1.0,
) -> FastAPI:
    admin = admin_token if admin_token is not None else os.environ.get("CICM_ECOVISOR_ADMIN_TOKEN")
    if not admin:
        log.warning("CICM_ECOVISOR_ADMIN_TOKEN is not set: admin routes will answer 401")
    store = Telemetry(db_path)
    core = Ecovisor(site, clock, backend, store, carbon=carbon, solar=solar)
    callbacks = CallbackDispatcher(timeout_s=callback_timeout_s)
    hub = EventHub(site.events, core.tick_id)
    inline_ok = backend.kind in INLINE_BACKENDS

    async def run(fn: Callable[..., T], *args: Any) -> T:
        """A core call: inline on the event loop when the ecovisor lock is free and the backend is in memory or
        sysfs (no thread hop: the common case costs microseconds), else in a worker thread (a tick holds the
        lock, or the backend does network I/O, as LXD does)."""
        if inline_ok and core._lock.acquire(blocking=False):
            try:
                return fn(*args)
            finally:
                core._lock.release()
        return await anyio.to_thread.run_sync(fn, *args)

    async def flusher() -> None:
        """Store the apps' changed settings every ``flush_every_s`` (setters only mark them)."""
        while True:
            await asyncio.sleep(flush_every_s)
            try:
                await anyio.to_thread.run_sync(core.flush)
            except Exception:
                log.exception("storing the apps' settings failed; retrying in %s s", flush_every_s)

    async def dispatch(summary: dict) -> None:
        events = summary.get("events", ())
        hub.publish(events)
        for ev in events:  # the notifications an app asked to get by webhook too (the tick is below)
            app_ = core.apps.get(ev["app"])
            wanted = app_.spec.get("callback_events") if app_ is not None and app_.callback_url else None
            if wanted and ev["type"] != "tick" and ev["type"] in parse_types(wanted):
                assert app_ is not None and app_.callback_url is not None
                callbacks.fire(app_.name, app_.callback_url, {"event": ev["type"], **ev})
        for name, s in summary["apps"].items():
            app_ = core.apps.get(name)
            if app_ is not None and app_.callback_url:
                callbacks.fire(name, app_.callback_url, {"event": "tick", "app": name, "tick_id": summary["tick_id"],
                                                         "grid_gco2_per_kwh": summary["grid_gco2_per_kwh"], **s})

    async def ticker() -> None:
        dt = core.dt_s
        while True:
            now = clock.now().timestamp()
            await asyncio.sleep(max(0.0, (int(now // dt) + 1) * dt - now))
            try:
                summary = await anyio.to_thread.run_sync(core.tick)
            except Exception:  # keep ticking; the error is logged, not swallowed silently
                log.exception("tick failed")
                continue
            await dispatch(summary)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        hub.loop = asyncio.get_running_loop()
        await callbacks.start()
        tasks = [asyncio.create_task(flusher())]
        if clock_mode(clock) == "real" and run_ticker:
            tasks.append(asyncio.create_task(ticker()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            hub.close()
            await callbacks.stop()
            try:
                core.flush()
            finally:
                store.close()

    api = FastAPI(
        title="cicm ecovisor",
        version="1",
        description=(
            "A virtual energy system per application (Souza et al., ASPLOS 2023): container power caps, a virtual "
            f"battery, virtual solar and grid with carbon intensity. Container power is {POWER_SOURCE} "
            "through each container's power model (no RAPL)."
        ),
        lifespan=lifespan,
        dependencies=[Depends(_no_unknown_query)],
    )
    api.state.ecovisor = core
    api.state.callbacks = callbacks
    api.state.events = hub
    api.state.admin_token = admin
    ecovisor_metrics.install(api, core)  # GET /metrics (docs/metrics.md)

    # ---------------------------------------------------------------- errors
    @api.exception_handler(InputError)
    async def _input(_: Request, e: InputError):
        return JSONResponse(
            {"detail": [{"loc": [e.field], "msg": e.message, "type": "input_error"}], "field": e.field},
            status_code=422,
        )

    @api.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        loc = [str(p) for p in (errs[0]["loc"] if errs else [])]
        field = ".".join(p for p in loc if p not in ("body", "query", "path")) or (loc[-1] if loc else "body")
        if errs and errs[0]["type"] == "json_invalid":  # the body as a whole (its loc is a character offset)
            field = "body"
        detail = [{"loc": list(x["loc"]), "msg": _why(request, x), "type": x["type"]} for x in errs]
        return JSONResponse({"detail": detail, "field": field}, status_code=422)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if e.status_code == 400:  # a body that is not JSON at all (e.g. not UTF-8): malformed, like the rest
            return JSONResponse({"detail": [{"loc": ["body"], "msg": str(e.detail), "type": "json_invalid"}],
                                 "field": "body"}, status_code=422)
        headers = dict(e.headers or {})
        if e.status_code == 405:
            headers["Allow"] = _allowed_methods(api, request.url.path)
        return JSONResponse({"detail": e.detail}, status_code=e.status_code, headers=headers or None)

    @api.exception_handler(NotFoundError)
    async def _not_found(_: Request, e: NotFoundError):
        return _err(404, str(e), **({"field": e.field} if e.field else {}))

    @api.exception_handler(AuthError)
    async def _auth(_: Request, e: AuthError):
        return _err(401, str(e))

    @api.exception_handler(ForbiddenError)
    async def _forbidden(_: Request, e: ForbiddenError):
        return _err(403, str(e))

    @api.exception_handler(ConflictError)
    async def _conflict(_: Request, e: ConflictError):
        return _err(409, str(e))

    @api.exception_handler(BackendError)
    async def _backend(_: Request, e: BackendError):
        return _err(503, f"container backend: {e}")

    # ---------------------------------------------------------------- public
    @api.get("/v1/health", tags=["service"])
    async def health() -> dict:
        return {
            "status": "ok",
            "site": site.name,
            "clock": clock_mode(clock),
            "now": clock.now().isoformat(),
            "tick_seconds": core.dt_s,
            "tick_id": core.tick_id,
            "backend": backend.kind,
            "power_source": POWER_SOURCE,
        }

    @api.get("/v1/clock", tags=["service"])
    async def get_clock() -> dict:
        return {"mode": clock_mode(clock), "now": clock.now().isoformat(), "tick_seconds": core.dt_s,
                "last_tick_end": core.last_tick_end.isoformat(), "tick_id": core.tick_id}

    # ---------------------------------------------------------------- admin
    @api.post("/v1/apps", status_code=201, tags=["admin"], response_model=AppRegistered,
              responses=ADMIN | R409 | R422)
    async def register_app(body: AppRegistration, _: Admin) -> AppRegistered:
        """Register an app; its token (shown once) expires after ``token_ttl_days`` (default 90)."""
        app_, token = await anyio.to_thread.run_sync(core.register_app, body)
        assert app_.token_expires_at is not None
        return AppRegistered(name=app_.name, token=token, token_expires_at=app_.token_expires_at.isoformat(),
                             grid_share_kw=app_.grid_share_kw, solar_fraction=app_.solar_fraction,
                             battery_fraction=app_.battery_fraction, containers=app_.containers)

    @api.post("/v1/apps/{name}/token", tags=["admin"], response_model=TokenIssued,
              responses=ADMIN | _resp(404, "no app of that name") | R422)
    async def rotate_token(name: Name, _: Admin, body: Annotated[TokenRotation | None, Body()] = None) -> TokenIssued:
        """Issue a new token for the app (shown once); its old token stops working at once."""
        ttl = (body or TokenRotation()).token_ttl_days
        try:
            app_, token = await anyio.to_thread.run_sync(core.rotate_token, name, ttl)
        except KeyError:
            raise NotFoundError(f"no app {name!r}", field="name") from None
        hub.drop_app(name, "the app's token was rotated; reconnect with the new token")
        assert app_.token_expires_at is not None
        return TokenIssued(name=app_.name, token=token, token_expires_at=app_.token_expires_at.isoformat())

    @api.get("/v1/apps", tags=["admin"], responses=ADMIN)
    async def list_apps(_: Admin) -> list[dict]:
        views = await run(lambda: [core.app_view(a) for a in list(core.apps.values())])
        return [v | {"callbacks": callbacks.stats(v["name"])} for v in views]

    @api.delete("/v1/apps/{name}", status_code=204, tags=["admin"],
                responses=ADMIN | _resp(404, "no app of that name") | R422 | R503)
    async def delete_app(name: Name, _: Admin) -> Response:
        try:
            await anyio.to_thread.run_sync(core.delete_app, name)
        except KeyError:
            return _err(404, f"no app {name!r}", field="name")
        hub.forget(name)
        return Response(status_code=204)

    @api.post("/v1/tick", tags=["admin"], responses=ADMIN | R409 | R422)
    async def tick(_: Admin, body: TickBody | None = None) -> dict:
        """Advance the simulated clock by n ticks (409 on a real-time clock)."""
        n = body.n if body else 1
        if not is_simulated(clock):
            raise ConflictError("the clock is real-time; ticks come from the ticker")
        ticks = []
        for _i in range(n):
            summary = (await anyio.to_thread.run_sync(core.advance, 1))[0]
            await dispatch(summary)
            ticks.append(summary)
        return {"n": n, "now": clock.now().isoformat(), "ticks": ticks}

    @api.put("/v1/admin/containers/{name}/demand", tags=["admin"],
             responses=ADMIN | _resp(404, "no container of that name") | R409 | R422)
    async def set_demand(name: Name, body: DemandBody, _: Admin) -> dict:
        """Simulated backend only: a container's CPU demand in cores."""
        if backend.kind != "simulated" or not isinstance(backend, SimulatedBackend):
            raise ConflictError("demand can only be set on the simulated backend")
        if name not in core.containers:
            raise NotFoundError(f"no container {name!r}", field="container")
        if body.cores > core.containers[name].cores:
            raise InputError("cores", f"above the container's {core.containers[name].cores} cores")
        backend.set_demand(name, body.cores)
        return {"container": name, "demand_cores": body.cores}

    @api.get("/v1/admin/site", tags=["admin"], responses=ADMIN)
    async def get_site(_: Admin) -> dict:
        return site.model_dump(mode="json")

    # ---------------------------------------------------------------- app: Table 1
    @api.get("/v1/apps/me", tags=["app"], responses=APP)
    async def me(app_: App) -> dict:
        return await run(core.app_view, app_) | {"callbacks": callbacks.stats(app_.name)}

    @api.get("/v1/containers", tags=["containers"], responses=APP)
    async def list_containers(app_: App) -> list[dict]:
        return await run(lambda: [core.get_container(app_, c) for c in app_.containers])

    @api.put("/v1/containers/powercaps", tags=["containers"], response_model=PowerCapsSet,
             responses=APP | R404_CAPS | R422 | R503)
    async def set_container_powercaps(body: PowerCapsBody, app_: App) -> Response:
        """Set many of the app's container caps in one request (``[{"name", "kw"}]``, each as
        ``PUT /v1/containers/{name}/powercap`` takes it), validated as a whole: one bad entry (a container the app
        does not have, one named twice, a cap outside its [idle_kw, max_kw]) refuses all of them with the entry
        in ``field`` (``caps.<i>.name`` or ``caps.<i>.kw``), and nothing changes. Answers every container of the
        request, in its order, as ``GET /v1/containers/{name}`` shows it."""
        pairs = [(e.name, e.kw) for e in body.caps]

        def set_all() -> bytes:
            views = [core.container_view(cs) for cs in core.set_container_powercaps(app_, pairs)]
            return json.dumps({"app": app_.name, "n": len(views), "containers": views}, allow_nan=False,
                              separators=(",", ":")).encode()

        # a large batch goes to a worker thread so it does not hold up the event loop
        content = await (run(set_all) if len(pairs) <= INLINE_MAX_CAPS else anyio.to_thread.run_sync(set_all))
        return Response(content, media_type="application/json")

    @api.get("/v1/containers/{name}", tags=["containers"], responses=APP | R404_CONTAINER | R422)
    async def get_container(name: Name, app_: App) -> dict:
        return await run(core.get_container, app_, name)

    @api.put("/v1/containers/{name}/powercap", tags=["containers"], responses=APP | R404_CONTAINER | R422 | R503)
    async def set_container_powercap(name: Name, body: PowerBody, app_: App) -> dict:
        return await run(lambda: core.container_view(core.set_container_powercap(app_, name, body.kw)))

    @api.get("/v1/containers/{name}/powercap", tags=["containers"], responses=APP | R404_CONTAINER | R422)
    async def get_container_powercap(name: Name, app_: App) -> dict:
        v = await run(core.get_container, app_, name)
        return {k: v[k] for k in ("container", "powercap_kw", "effective_powercap_kw", "cpu_limit_cores", "idle_kw", "max_kw")}

    @api.get("/v1/containers/{name}/power", tags=["containers"], responses=APP | R404_CONTAINER | R422)
    async def get_container_power(name: Name, app_: App) -> dict:
        v = await run(core.get_container, app_, name)
        return {k: v[k] for k in ("container", "power_kw", "cpu_usage_cores", "power_source")} | {
            "as_of": core.last_tick_end.isoformat()}

    @api.put("/v1/battery/charge-rate", tags=["battery"], responses=APP | R422)
    async def set_battery_charge_rate(body: PowerBody, app_: App) -> dict:
        return await run(lambda: core.battery_view(core.set_battery_charge_rate(app_, body.kw)))

    @api.put("/v1/battery/max-discharge", tags=["battery"], responses=APP | R422)
    async def set_battery_max_discharge(body: PowerBody, app_: App) -> dict:
        return await run(lambda: core.battery_view(core.set_battery_max_discharge(app_, body.kw)))

    @api.get("/v1/battery", tags=["battery"], responses=APP)
    async def get_battery(app_: App) -> dict:
        return core.battery_view(app_)

    @api.get("/v1/battery/discharge-rate", tags=["battery"], responses=APP)
    async def get_battery_discharge_rate(app_: App) -> dict:
        v = core.battery_view(app_)
        return {"discharge_rate_kw": v["discharge_rate_kw"], "max_discharge_setting_kw": v["max_discharge_setting_kw"],
                "as_of": v["as_of"]}

    @api.get("/v1/battery/charge-level", tags=["battery"], responses=APP)
    async def get_battery_charge_level(app_: App) -> dict:
        v = core.battery_view(app_)
        return {"charge_level_kwh": v["charge_level_kwh"], "soc": v["soc"], "capacity_kwh": v["capacity_kwh"],
                "as_of": v["as_of"]}

    @api.get("/v1/solar/power", tags=["energy"], responses=APP)
    async def get_solar_power(app_: App) -> dict:
        return core.solar_view(app_)

    @api.get("/v1/grid/power", tags=["energy"], responses=APP)
    async def get_grid_power(app_: App) -> dict:
        return core.grid_view(app_)

    @api.get("/v1/grid/carbon", tags=["energy"], responses=APP)
    async def get_grid_carbon(app_: App) -> dict:
        return core.carbon_view()

    @api.get("/v1/power", tags=["energy"], responses=APP, response_model=AppPower)
    async def get_app_power(app_: App) -> dict:
        """``get_app_power``: the app's power over the last tick: each container's, the total, how it was
        supplied (solar, battery discharge, grid: they add up to ``load_kw``), charging, curtailment, and the
        battery's charge."""
        return await run(core.app_power_view, app_)

    # ---------------------------------------------------------------- app: Table 2 notifications
    @api.get("/v1/apps/{name}/events", tags=["notifications"], response_class=_EventStream,
             responses=APP | _resp(404, "no app of that name, or another app's (the same answer)") | R422
             | R429_STREAMS | {200: {"description": "text/event-stream: one event per notification, keep-alive "
                                                    "comments while idle",
                                     "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
    async def events(
        name: Name, app_: App, request: Request,
        types: Annotated[str | None, Query(pattern=TYPES_PATTERN, max_length=200, description=(
            "comma-separated: solar (solar_change), carbon (carbon_change), battery (battery_full, battery_empty), "
            "tick, or single event types; default solar,carbon,battery"))] = None,
    ) -> Response:
        """Notifications as server-sent events (Table 2: ``notify_solar_change``, ``notify_carbon_change``,
        ``notify_battery_full``/``_empty``; and ``tick``). ``name`` is the app's own name (or ``me``). Each event
        has ``id: <tick>-<k>``, ``event: <type>`` and ``data:`` JSON with ``type``, ``app``, ``time`` (the
        ecovisor's clock), ``tick_id`` and the new values. Send ``Last-Event-ID`` to replay what was missed; a
        stream starts with ``event: resync`` when that is no longer possible (read the getters). When each event
        fires: docs/ecovisor.md."""
        if name not in ("me", app_.name):
            raise NotFoundError(f"no app {name!r}", field="name")
        wanted = parse_types(types)
        last_id = request.headers.get("last-event-id")
        if last_id is not None:
            try:
                event_key(last_id)
            except ValueError:
                raise InputError("last-event-id", "must be an event id as sent (\"<tick>-<k>\")") from None
        try:
            sub = hub.subscribe(app_.name, wanted, last_id)
        except TooManySubscribers as e:
            return JSONResponse({"detail": str(e), "field": "name"}, status_code=429,
                                headers={"Retry-After": str(max(1, round(site.events.keepalive_s)))})
        keepalive = site.events.keepalive_s

        async def stream():
            yield f"retry: {max(1000, int(keepalive * 1000) // 5)}\n: {app_.name} events {','.join(sorted(wanted))}\n\n".encode()
            if sub.resync is not None and not sub.closed:
                yield sse_resync(sub.resync, clock.now())
                sub.resync = None
            while True:
                try:
                    ev = await hub.next(sub, keepalive)
                except StopAsyncIteration:
                    if sub.resync is not None:
                        yield sse_resync(sub.resync, clock.now())
                    return
                yield b": keep-alive\n\n" if ev is None else sse(ev)

        return _EventStream(stream(), hub, sub)

    # ---------------------------------------------------------------- app: Table 2
    @api.get("/v1/energy", tags=["library"], responses=APP | R404_CONTAINER | R422)
    async def get_energy(app_: App, start: When = None, end: When = None, container: ContainerQuery = None) -> dict:
        """Energy (kWh, by source) and carbon (kgCO2) of the app or one of its containers over [start, end)."""
        return await anyio.to_thread.run_sync(core.energy_carbon, app_, start, end, container)

    @api.get("/v1/carbon", tags=["library"], responses=APP | R404_CONTAINER | R422)
    async def get_carbon(app_: App, start: When = None, end: When = None, container: ContainerQuery = None) -> dict:
        r = await anyio.to_thread.run_sync(core.energy_carbon, app_, start, end, container)
        out = {k: r[k] for k in ("app", "container", "start", "end", "carbon_kgco2", "energy_kwh")}
        if container is None:
            out["containers"] = {c: v["carbon_kgco2"] for c, v in r["containers"].items()}
            out["grid_energy_kwh"] = r["grid_energy_kwh"]
        return out

    @api.put("/v1/carbon/rate", tags=["library"], responses=APP | R422 | R503)
    async def set_carbon_rate(body: CarbonRateBody, app_: App) -> dict:
        return await run(lambda: core.policy_view(core.set_carbon_rate(app_, body.gco2_per_h)))

    @api.put("/v1/carbon/budget", tags=["library"], responses=APP | R422 | R503)
    async def set_carbon_budget(body: CarbonBudgetBody, app_: App) -> dict:
        # reads the stored carbon of the window: a store query, so in a worker thread
        return await anyio.to_thread.run_sync(
            lambda: core.policy_view(core.set_carbon_budget(app_, body.kgco2, body.start, body.end)))

    @api.get("/v1/carbon/policy", tags=["library"], responses=APP)
    async def get_carbon_policy(app_: App) -> dict:
        return core.policy_view(app_)

    @api.get("/v1/ticks", tags=["library"], responses=APP | R422)
    async def get_ticks(app_: App, start: When = None, end: When = None,
                        limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000) -> dict:
        """The app's per-tick telemetry (its energy system and its containers)."""

        def read() -> dict:
            rows = core.store.app_ticks(app_.name, start, end, limit)
            conts = core.store.container_ticks(app_.containers, start, end, limit * max(1, len(app_.containers)))
            conts = [r for r in conts if r["app"] == app_.name]
            return {"app": app_.name, "ticks": [_jsonable(r) for r in rows],
                    "containers": [_jsonable(r) for r in conts], "power_source": POWER_SOURCE}

        return await anyio.to_thread.run_sync(read)

    return api


def _allowed_methods(api: FastAPI, path: str) -> str:
    """The methods of the path's route template (starlette's 405 names only the first route's method); a static
    template (``/v1/apps/me``) wins over a parametrized one (``/v1/apps/{name}``)."""
    routes = [r for r in api.routes if isinstance(r, APIRoute) and r.path_regex.match(path)]
    static = [r for r in routes if "{" not in r.path]
    template = (static or routes)[0].path if routes else None
    return ", ".join(sorted({m for r in routes if r.path == template for m in (r.methods or ())}))


_QUERY_NAMES: dict[int, frozenset[str]] = {}


def _query_names(dependant: Any) -> set[str]:
    """The query parameters a route takes, its dependencies' included."""
    names = {f.alias for f in dependant.query_params}
    for d in dependant.dependencies:
        names |= _query_names(d)
    return names


async def _no_unknown_query(request: Request) -> None:
    """Refuse query parameters the route does not take (422 naming it): a typo such as ``?strat=`` must not be
    silently ignored."""
    if not request.query_params:
        return
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    known = _QUERY_NAMES.get(id(route))
    if known is None:
        known = frozenset(_query_names(route.dependant))
        _QUERY_NAMES[id(route)] = known
    unknown = [k for k in request.query_params if k not in known]
    if unknown:
        raise RequestValidationError([{"loc": ("query", unknown[0]), "msg": "unknown query parameter",
                                       "type": "extra_forbidden", "input": request.query_params[unknown[0]]}])


def _why(request: Request, err: dict) -> str:
    """A validation error's message; the tick cap says why it is there."""
    if request.url.path == "/v1/tick" and list(err.get("loc", ())) == ["body", "n"] and err.get("type") == "less_than_equal":
        return f"{err['msg']}: {TICK_CAP_WHY}"
    return str(err["msg"])


def _jsonable(r: dict) -> dict:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in r.items()}
