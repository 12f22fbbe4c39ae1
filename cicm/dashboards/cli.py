"""`cicm dashboard`: serve the operators' dashboard over HTTP.

The main CLI mounts `dashboard_app` with `app.add_typer(dashboard_app, name="dashboard")`, which gives
`cicm dashboard [--db PATH] [--port P]`; `serve()` is the same as a
function, and `python -m cicm.dashboards.cli --db PATH --port P` runs it without the main CLI.
"""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from cicm.clikit import db_option, fleet_option
from cicm.paths import default_db_path

dashboard_app = typer.Typer(help="The operators' dashboard (read-only web app over the store).",
                            invoke_without_command=True, no_args_is_help=False)

DEFAULT_PORT = 8050


def make_server(db_path: Path | str | None = None, port: int = DEFAULT_PORT, host: str = "127.0.0.1",
                fleet_path: Path | str | None = None, allow_snapshot: bool = True):
    """A threaded WSGI server (werkzeug) for the dashboard, bound but not yet serving."""
    from werkzeug.serving import make_server as _make_server

    from cicm.dashboards.app import create_app
    from cicm.dashboards.reader import StoreReader

    path = Path(db_path) if db_path else default_db_path()
    app = create_app(path, fleet_path, reader=StoreReader(path, allow_snapshot=allow_snapshot))
    return _make_server(host, port, app.server, threaded=True)


def serve(db_path: Path | str | None = None, port: int = DEFAULT_PORT, host: str = "127.0.0.1",
          fleet_path: Path | str | None = None, allow_snapshot: bool = True) -> None:
    """Serve the dashboard until interrupted. Reads the store read-only, one short connection per request."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = make_server(db_path, port, host, fleet_path, allow_snapshot)
    path = Path(db_path) if db_path else default_db_path()
    print(f"cicm dashboard on http://{host}:{server.server_port}/ (store {path}, read-only); Ctrl-C stops it",
          flush=True)
    def _stop(*_):
        raise SystemExit(0)  # so that atexit runs (it removes the busy-store snapshots)

    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@dashboard_app.callback(invoke_without_command=True)
def dashboard(
    db: Optional[Path] = db_option(),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="TCP port (0 picks a free one)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (default loopback only)"),
    fleet: Optional[Path] = fleet_option(),
    snapshot: bool = typer.Option(True, "--snapshot/--no-snapshot",
                                  help="while a writer holds the store, show a snapshot of its last checkpoint "
                                       "(else only a 'store busy, retrying' notice)"),
) -> None:
    """Serve the operators' dashboard: fleet overview, cluster days, runs, VCC CSV export."""
    serve(db, port, host, fleet, snapshot)


if __name__ == "__main__":
    sys.exit(dashboard_app())
