"""Helpers to run an ecovisor in tests: a small site, and a real uvicorn server on a free loopback port.

Other parts (e.g. the enforcement agent's tests) can use these to talk to a real ecovisor over HTTP.
"""
from __future__ import annotations

import copy
import socket
import threading
import time
from datetime import datetime, timezone

import uvicorn

from .backends import make_backend
from .clock import SimulatedClock
from .site import SiteConfig, parse_site

TEST_SITE: dict = {
    "name": "test-site",
    "tick_seconds": 300,
    "sim_start": "2022-06-21T07:00:00Z",  # local midnight in California (PDT)
    "location": {"latitude": 37.39, "longitude": -122.08, "timezone": "America/Los_Angeles", "altitude_m": 30},
    "grid": {"capacity_kw": 20.0, "carbon": {"source": "eia", "zone": "CISO"}},
    "battery": {"capacity_kwh": 20.0, "reserve_soc": 0.3, "initial_soc": 0.5, "max_charge_c": 0.5,
                "max_discharge_c": 1.0, "round_trip_efficiency": 0.9},
    "solar": {"source": "pvlib", "array_kwp": 10.0, "tilt_deg": 25.0, "azimuth_deg": 180.0},
    "backend": {"kind": "simulated"},
    "containers": [
        {"name": "a-batch", "cores": 4, "sim_demand_cores": 3.0,
         "power": {"kind": "linear", "idle_kw": 0.5, "max_kw": 1.5}},
        {"name": "a-serve", "cores": 2, "sim_demand_cores": 1.0,
         "power": {"kind": "piecewise", "points": [[0, 0.2], [1, 0.5], [2, 0.6]]}},
        {"name": "b-batch", "cores": 8, "sim_demand_cores": 8.0,
         "power": {"kind": "linear", "idle_kw": 1.0, "max_kw": 3.0}},
        {"name": "spare", "cores": 1, "sim_demand_cores": 0.5,
         "power": {"kind": "linear", "idle_kw": 0.05, "max_kw": 0.1}},
    ],
}


def test_site(**overrides) -> SiteConfig:
    """The test site, with top-level keys replaced by ``overrides``."""
    d = copy.deepcopy(TEST_SITE)
    d.update(overrides)
    return parse_site(d)


setattr(test_site, "__test__", False)  # not a pytest test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        hub = getattr(getattr(self.app, "state", None), "events", None)
        if hub is not None:  # open event streams would hold uvicorn's graceful shutdown
            hub.close_threadsafe()
        self.server.should_exit = True
        self.thread.join(timeout=15)


def simulated_app(site: SiteConfig | None = None, db_path=None, admin_token: str = "admin-token", **kw):
    """A FastAPI ecovisor on a simulated clock and the simulated backend."""
    from .app import create_app

    site = site or test_site()
    start = site.sim_start or datetime(2022, 6, 21, 7, tzinfo=timezone.utc)
    return create_app(site, SimulatedClock(start), make_backend(site), db_path, admin_token=admin_token, **kw)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


__all__ = ["TEST_SITE", "test_site", "free_port", "ServerThread", "simulated_app", "bearer"]
