"""``cicm ecovisor`` commands (typer). The lead mounts ``ecovisor_app`` under the main CLI."""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import typer

from cicm.clikit import fail
from cicm.errors import InputError

from .schemas import DEFAULT_TOKEN_TTL_DAYS, MAX_TOKEN_TTL_DAYS

ecovisor_app = typer.Typer(help="The ecovisor: a virtual energy system per application (REST service).",
                           no_args_is_help=True)


@ecovisor_app.command()
def serve(
    site: Path = typer.Option(..., "--site", help="site file (TOML)", exists=True, dir_okay=False),
    port: int = typer.Option(8700, "--port", min=1, max=65535),
    host: str = typer.Option("127.0.0.1", "--host"),
    db: Path | None = typer.Option(None, "--db", help="telemetry DuckDB file (default: in memory)"),
    clock: str = typer.Option("real", "--clock", help="real | simulated (advanced by POST /v1/tick)"),
    sim_start: str | None = typer.Option(None, "--sim-start", help="simulated clock start, ISO 8601 with zone"),
    backend: str | None = typer.Option(None, "--backend", help="override the site's backend: lxd | cgroup | simulated"),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Run the ecovisor's REST API. Needs CICM_ECOVISOR_ADMIN_TOKEN in the environment."""
    import uvicorn

    from .app import create_app
    from .backends import BackendError, make_backend
    from .clock import RealClock, SimulatedClock
    from .site import load_site

    if not os.environ.get("CICM_ECOVISOR_ADMIN_TOKEN"):
        fail("CICM_ECOVISOR_ADMIN_TOKEN: set it to the bearer token of admin routes")
    try:
        cfg = load_site(site)
        if backend is not None:
            if backend not in ("lxd", "cgroup", "simulated"):
                raise InputError("backend", f"unknown backend {backend!r}")
            cfg = cfg.model_copy(update={"backend": cfg.backend.model_copy(update={"kind": backend})})
            cfg._base_dir = str(site.resolve().parent)
        clk: RealClock | SimulatedClock
        if clock == "real":
            clk = RealClock()
        elif clock == "simulated":
            if sim_start:
                start = datetime.fromisoformat(sim_start.replace("Z", "+00:00"))
                if start.tzinfo is None:
                    raise InputError("sim_start", "needs a time zone")
            else:
                start = cfg.sim_start or datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
            clk = SimulatedClock(start)
        else:
            raise InputError("clock", "must be 'real' or 'simulated'")
        be = make_backend(cfg)
    except (InputError, BackendError, ValueError) as e:
        fail(e)
    api = create_app(cfg, clk, be, db)
    # open event streams never end by themselves: a stop waits this long for them, then closes them
    uvicorn.run(api, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=3)


@ecovisor_app.command("check-site")
def check_site(site: Path = typer.Argument(..., exists=True, dir_okay=False)) -> None:
    """Validate a site file and print a summary."""
    from .site import load_site

    try:
        cfg = load_site(site)
    except InputError as e:
        fail(e)
    typer.echo(f"{cfg.name}: {len(cfg.containers)} containers, backend {cfg.backend.kind}, "
               f"grid {cfg.grid.capacity_kw} kW ({cfg.grid.carbon.source} {cfg.grid.carbon.zone or cfg.grid.carbon.path}), "
               f"battery {cfg.battery.capacity_kwh} kWh, solar {cfg.solar.array_kwp} kWp")


app_app = typer.Typer(help="Applications of a running ecovisor (admin).", no_args_is_help=True)
ecovisor_app.add_typer(app_app, name="app")
ADMIN_TOKEN_ENV = "CICM_ECOVISOR_ADMIN_TOKEN"


@app_app.command("create")
def app_create(
    name: str = typer.Argument(..., help="the application's name, e.g. the cluster's"),
    ecovisor: str = typer.Option("http://127.0.0.1:8700", "--ecovisor", help="the ecovisor's base URL"),
    grid_kw: float | None = typer.Option(None, "--grid-kw", help="its grid share in kW"),
    grid_fraction: float | None = typer.Option(None, "--grid-fraction", help="or as a share of the site's grid"),
    solar_fraction: float = typer.Option(0.0, "--solar-fraction"),
    battery_fraction: float = typer.Option(0.0, "--battery-fraction"),
    container: list[str] = typer.Option([], "--container", help="a container of the app (repeat)"),
    token_ttl_days: int = typer.Option(DEFAULT_TOKEN_TTL_DAYS, "--token-ttl-days", min=1, max=MAX_TOKEN_TTL_DAYS,
                                       help="the token expires after this many days"),
) -> None:
    """Register an application with a running ecovisor and print its bearer token (shown once): the agent reads it
    from CICM_ECOVISOR_TOKEN. Needs CICM_ECOVISOR_ADMIN_TOKEN."""
    body: dict[str, Any] = {"name": name, "solar_fraction": solar_fraction, "battery_fraction": battery_fraction,
                            "containers": container, "token_ttl_days": token_ttl_days}
    body.update({k: v for k, v in (("grid_kw", grid_kw), ("grid_fraction", grid_fraction)) if v is not None})
    made = _admin_post(ecovisor, "/v1/apps", body, 201, "the app")
    typer.echo(f"export CICM_ECOVISOR_TOKEN={made['token']}")
    typer.echo(f"# app {made['name']}: grid {made['grid_share_kw']:g} kW, solar {made['solar_fraction']:g}, "
               f"battery {made['battery_fraction']:g}; the token is shown once and expires at "
               f"{made['token_expires_at']}", err=True)


@app_app.command("rotate")
def app_rotate(
    name: str = typer.Argument(..., help="the application's name"),
    ecovisor: str = typer.Option("http://127.0.0.1:8700", "--ecovisor", help="the ecovisor's base URL"),
    token_ttl_days: int = typer.Option(DEFAULT_TOKEN_TTL_DAYS, "--token-ttl-days", min=1, max=MAX_TOKEN_TTL_DAYS,
                                       help="the new token expires after this many days"),
) -> None:
    """Issue a new bearer token for an application and print it (shown once); the old token stops working at
    once. Needs CICM_ECOVISOR_ADMIN_TOKEN."""
    made = _admin_post(ecovisor, f"/v1/apps/{name}/token", {"token_ttl_days": token_ttl_days}, 200, "the rotation")
    typer.echo(f"export CICM_ECOVISOR_TOKEN={made['token']}")
    typer.echo(f"# app {made['name']}: new token, shown once, expires at {made['token_expires_at']}; "
               "the old token no longer works", err=True)


def _admin_post(ecovisor: str, path: str, body: dict[str, Any], ok: int, what: str) -> dict[str, Any]:
    """POST with the admin token; exits 1 when the ecovisor refuses (naming the field), 2 when unreachable."""
    import requests

    from cicm.clikit import ExitCode
    from cicm.httpclient import make_session, transport_problem

    admin = os.environ.get(ADMIN_TOKEN_ENV)
    if not admin:
        fail(f"{ADMIN_TOKEN_ENV}: set it to the ecovisor's admin bearer token")
    url = ecovisor.rstrip("/") + path
    try:
        with make_session(retries=2, backoff_s=0.2, timeout_s=10) as session:
            reply = session.post(url, json=body, headers={"Authorization": f"Bearer {admin}"})
    except requests.RequestException as exc:
        fail(f"ecovisor: {url}: {transport_problem(exc)}", ExitCode.DEGRADED)
    from cicm.jsonsafe import JSONRejected, loads_bounded

    if reply.status_code != ok:
        try:
            j = loads_bounded(reply.content, "response body")
            detail, field = (j.get("detail", reply.text), j.get("field")) if isinstance(j, dict) else (j, None)
        except JSONRejected:
            detail, field = reply.text[:500], None
        fail(f"{field or _refused_field(detail)}: the ecovisor refused {what} ({reply.status_code}): {detail}")
    try:
        made = loads_bounded(reply.content, "response body")
    except JSONRejected as exc:
        fail(f"ecovisor: {url}: {exc}", ExitCode.DEGRADED)
    if not isinstance(made, dict):
        fail(f"ecovisor: {url}: expected a JSON object, got {type(made).__name__}", ExitCode.DEGRADED)
    return made


def _refused_field(detail: object) -> str:
    """The field an ecovisor error names (FastAPI's validation errors carry its location), else ``app``."""
    if isinstance(detail, list) and detail and isinstance(detail[0], dict) and detail[0].get("loc"):
        return str(detail[0]["loc"][-1])
    return "app"


if __name__ == "__main__":  # pragma: no cover
    ecovisor_app()
