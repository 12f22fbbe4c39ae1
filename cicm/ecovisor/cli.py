"""``cicm ecovisor`` commands (typer). The lead mounts ``ecovisor_app`` under the main CLI."""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import typer

from cicm.clikit import fail
from cicm.errors import InputError

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
    """Run the ecovisor's REST API. Needs ECOVISOR_ADMIN_TOKEN in the environment."""
    import uvicorn

    from .app import create_app
    from .backends import BackendError, make_backend
    from .clock import RealClock, SimulatedClock
    from .site import load_site

    if not os.environ.get("ECOVISOR_ADMIN_TOKEN"):
        fail("ECOVISOR_ADMIN_TOKEN: set it to the bearer token of admin routes")
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
    uvicorn.run(api, host=host, port=port, log_level=log_level)


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


if __name__ == "__main__":  # pragma: no cover
    ecovisor_app()
