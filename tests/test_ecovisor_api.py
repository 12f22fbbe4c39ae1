"""The ecovisor's REST API in process: validation (422 naming the field, nothing changes), auth, the library
functions (carbon rate and budget, energy queries), persistence, callbacks and the real-time ticker."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import warnings

import httpx
import pytest

with warnings.catch_warnings():  # starlette's note about httpx vs httpx2 is not ours to fix
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from cicm.ecovisor.app import create_app
from cicm.ecovisor.backends import make_backend
from cicm.ecovisor.clock import RealClock
from cicm.ecovisor.testing import bearer, free_port, simulated_app, test_site

ADMIN = bearer("admin-token")
REPO = Path(__file__).resolve().parent.parent


def _register(c, name="app-a", containers=("a-batch", "a-serve"), **kw):
    body = {"name": name, "grid_kw": 8, "solar_fraction": 0.5, "battery_fraction": 0.5, "containers": list(containers)}
    body.update(kw)
    r = c.post("/v1/apps", headers=ADMIN, json=body)
    assert r.status_code == 201, r.text
    return bearer(r.json()["token"])


@pytest.fixture
def client():
    with TestClient(simulated_app()) as c:
        yield c


def _state(c, tok):
    return (
        c.get("/v1/containers", headers=tok).json(),
        c.get("/v1/battery", headers=tok).json(),
        c.get("/v1/carbon/policy", headers=tok).json(),
    )


@pytest.mark.parametrize(
    "method,path,body,field",
    [
        ("put", "/v1/containers/a-batch/powercap", {"kw": -0.5}, "kw"),
        ("put", "/v1/containers/a-batch/powercap", {"kw": 1.6}, "kw"),  # above max_kw 1.5
        ("put", "/v1/containers/a-batch/powercap", {"kw": 0.4}, "kw"),  # below idle 0.5
        ("put", "/v1/containers/a-batch/powercap", {"kw": "lots"}, "kw"),
        ("put", "/v1/containers/a-batch/powercap", {}, "kw"),
        ("put", "/v1/containers/a-batch/powercap", {"kw": 1.0, "extra": 1}, "extra"),
        ("put", "/v1/battery/charge-rate", {"kw": -1}, "kw"),
        ("put", "/v1/battery/charge-rate", {"kw": 5.01}, "kw"),  # C-rate 0.5 x 10 kWh = 5 kW
        ("put", "/v1/battery/max-discharge", {"kw": 10.5}, "kw"),  # C-rate 1 x 10 kWh
        ("put", "/v1/carbon/rate", {"gco2_per_h": -3}, "gco2_per_h"),
        ("put", "/v1/carbon/budget", {"kgco2": 1, "start": "2022-06-22T00:00:00Z", "end": "2022-06-21T00:00:00Z"}, "end"),
        ("put", "/v1/carbon/budget", {"kgco2": 1, "start": "2022-06-21T00:00:00"}, "start"),
        ("put", "/v1/carbon/budget", {"kgco2": -1}, "kgco2"),
        ("get", "/v1/energy?start=2022-06-21T00:00:00", None, "start"),
        ("get", "/v1/energy?start=yesterday", None, "start"),
        ("get", "/v1/energy?start=0.5", None, "start"),  # never Unix time
        ("put", "/v1/containers/a-batch/powercap", {"kw": True}, "kw"),  # strict: no booleans ...
        ("put", "/v1/containers/a-batch/powercap", {"kw": "0.9"}, "kw"),  # ... and no strings for numbers
    ],
)
def test_bad_values_answer_422_naming_the_field_and_change_nothing(client, method, path, body, field):
    tok = _register(client)
    client.put("/v1/containers/a-batch/powercap", headers=tok, json={"kw": 1.2})
    client.post("/v1/tick", headers=ADMIN, json={"n": 2})
    before = _state(client, tok)
    r = getattr(client, method)(path, headers=tok, **({"json": body} if body is not None else {}))
    assert r.status_code == 422, r.text
    j = r.json()
    assert "field" in j and j["detail"]
    assert j["field"] == field
    assert _state(client, tok) == before
    assert client.get("/v1/clock").json()["tick_id"] == 2


def test_nan_is_rejected(client):
    tok = _register(client)
    r = client.put("/v1/containers/a-batch/powercap", headers={**tok, "content-type": "application/json"},
                   content=b'{"kw": NaN}')
    assert r.status_code == 422 and r.json()["field"] == "kw"
    assert client.get("/v1/containers/a-batch/powercap", headers=tok).json()["powercap_kw"] == 1.5


def test_registration_validation(client):
    _register(client)
    cases = [
        ({"name": "b", "grid_kw": 1, "solar_fraction": 0.6, "containers": ["b-batch"]}, "solar_fraction"),
        ({"name": "b", "grid_kw": 1, "battery_fraction": 0.51, "containers": ["b-batch"]}, "battery_fraction"),
        ({"name": "b", "grid_kw": 12.5, "containers": ["b-batch"]}, "grid_kw"),  # 8 + 12.5 > 20
        ({"name": "b", "grid_fraction": 0.7, "containers": ["b-batch"]}, "grid_fraction"),
        ({"name": "b", "containers": ["b-batch"]}, "grid_kw"),  # no grid share
        ({"name": "b", "grid_kw": 1, "grid_fraction": 0.1, "containers": ["b-batch"]}, "grid_kw"),
        ({"name": "b", "grid_kw": 1, "containers": ["b-batch", "b-batch"]}, "containers"),
        ({"name": "b", "grid_kw": 1, "containers": ["b-batch", "nope"]}, "containers.1"),
        ({"name": "b", "grid_kw": 1, "containers": ["a-batch"]}, "containers.0"),  # A's
        ({"name": "B!", "grid_kw": 1, "containers": ["b-batch"]}, "name"),
        ({"name": "b", "grid_kw": -1, "containers": ["b-batch"]}, "grid_kw"),
        ({"name": "b", "grid_kw": 1, "callback_url": "not a url"}, "callback_url"),
    ]
    for body, field in cases:
        r = client.post("/v1/apps", headers=ADMIN, json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["field"] == field, (body, r.json())
    assert [a["name"] for a in client.get("/v1/apps", headers=ADMIN).json()] == ["app-a"]
    assert client.post("/v1/apps", headers=ADMIN, json={"name": "app-a", "grid_kw": 1}).status_code == 409
    assert client.post("/v1/apps", json={"name": "b", "grid_kw": 1}).status_code == 401
    assert client.post("/v1/apps", headers=bearer("wrong"), json={"name": "b", "grid_kw": 1}).status_code == 401


def test_admin_routes_refuse_without_admin_token():
    with TestClient(simulated_app(admin_token="")) as c:
        r = c.post("/v1/apps", headers=bearer(""), json={"name": "b", "grid_kw": 1})
        assert r.status_code in (401, 403)
        assert c.post("/v1/tick", headers=bearer("anything")).status_code == 401


def test_delete_app_frees_its_containers(client):
    tok = _register(client)
    client.put("/v1/containers/a-batch/powercap", headers=tok, json={"kw": 0.6})
    assert client.delete("/v1/apps/app-a", headers=ADMIN).status_code == 204
    assert client.get("/v1/battery", headers=tok).status_code == 401
    assert client.delete("/v1/apps/app-a", headers=ADMIN).status_code == 404
    tok2 = _register(client, name="again")
    assert client.get("/v1/containers/a-batch/powercap", headers=tok2).json()["powercap_kw"] == 1.5


def test_openapi_lists_the_routes(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for p in ["/v1/apps", "/v1/tick", "/v1/containers/{name}/powercap", "/v1/containers/{name}/power",
              "/v1/battery/charge-rate", "/v1/battery/max-discharge", "/v1/battery/discharge-rate",
              "/v1/battery/charge-level", "/v1/solar/power", "/v1/grid/power", "/v1/grid/carbon",
              "/v1/energy", "/v1/carbon", "/v1/carbon/rate", "/v1/carbon/budget", "/v1/ticks"]:
        assert p in paths, p
    assert "put" in paths["/v1/containers/{name}/powercap"]
    assert "PowerBody" in spec["components"]["schemas"]


def test_getters_after_a_tick(client):
    tok = _register(client)
    client.put("/v1/containers/a-batch/powercap", headers=tok, json={"kw": 1.0})
    client.put("/v1/battery/max-discharge", headers=tok, json={"kw": 0.4})
    client.post("/v1/tick", headers=ADMIN, json={"n": 3})
    p = client.get("/v1/containers/a-batch/power", headers=tok).json()
    assert p["power_kw"] == pytest.approx(1.0) and p["cpu_usage_cores"] == pytest.approx(2.0)
    assert p["power_source"] == "modelled-from-cpu"
    g = client.get("/v1/grid/power", headers=tok).json()
    assert g["power_kw"] == pytest.approx(1.1)  # night: 1.0 + 0.5 kW load, 0.4 kW from the battery
    b = client.get("/v1/battery/charge-level", headers=tok).json()
    assert b["capacity_kwh"] == 10.0
    assert b["charge_level_kwh"] == pytest.approx(5.0 - 3 * 0.4 * 300 / 3600)
    d = client.get("/v1/battery/discharge-rate", headers=tok).json()
    assert d["discharge_rate_kw"] == pytest.approx(0.4) and d["max_discharge_setting_kw"] == 0.4
    carbon = client.get("/v1/grid/carbon", headers=tok).json()
    assert carbon["trace"] == "CISO" and carbon["gco2_per_kwh"] > 0 and carbon["quality"] == "measured"
    assert client.get("/v1/solar/power", headers=tok).json()["power_kw"] == 0.0  # local midnight


def test_simulated_demand(client):
    tok = _register(client)
    r = client.put("/v1/admin/containers/a-serve/demand", headers=ADMIN, json={"cores": 2.0})
    assert r.status_code == 200
    assert client.put("/v1/admin/containers/a-serve/demand", headers=ADMIN, json={"cores": 2.5}).json()["field"] == "cores"
    assert client.put("/v1/admin/containers/nope/demand", headers=ADMIN, json={"cores": 1}).json()["field"] == "container"
    assert client.put("/v1/admin/containers/a-serve/demand", headers=tok, json={"cores": 1}).status_code == 403
    client.post("/v1/tick", headers=ADMIN, json={"n": 1})
    p = client.get("/v1/containers/a-serve/power", headers=tok).json()
    assert p["cpu_usage_cores"] == 2.0 and p["power_kw"] == pytest.approx(0.6)
    client.put("/v1/containers/a-serve/powercap", headers=tok, json={"kw": 0.35})  # -> 0.5 cores
    client.post("/v1/tick", headers=ADMIN, json={"n": 1})
    p = client.get("/v1/containers/a-serve/power", headers=tok).json()
    assert p["cpu_usage_cores"] == pytest.approx(0.5) and p["power_kw"] == pytest.approx(0.35)


def test_carbon_rate_limits_grid_carbon(client):
    tok = _register(client, battery_fraction=0.0, solar_fraction=0.0)
    client.post("/v1/tick", headers=ADMIN, json={"n": 1})
    ci = client.get("/v1/grid/carbon", headers=tok).json()["gco2_per_kwh"]
    limit = 1.0 * ci  # 1.0 kW worth of grid power; idle is 0.7 kW, uncapped load 1.75 kW
    r = client.put("/v1/carbon/rate", headers=tok, json={"gco2_per_h": limit})
    assert r.status_code == 200 and r.json()["met"] is True
    caps = {x["container"]: x for x in client.get("/v1/containers", headers=tok).json()}
    assert sum(x["effective_powercap_kw"] for x in caps.values()) == pytest.approx(1.0)
    assert caps["a-batch"]["powercap_kw"] == 1.5  # the app's own setting is kept
    ticks = client.post("/v1/tick", headers=ADMIN, json={"n": 6}).json()["ticks"]
    for t in ticks:
        a = t["apps"]["app-a"]
        rate = a["grid_kw"] * a["grid_gco2_per_kwh"]  # g/h
        assert rate <= limit * (1 + 1e-9) * max(1.0, a["grid_gco2_per_kwh"] / ci)
    # an impossible limit keeps idle power and says it is not met
    r = client.put("/v1/carbon/rate", headers=tok, json={"gco2_per_h": 0})
    assert r.json()["met"] is False
    caps = client.get("/v1/containers", headers=tok).json()
    assert sum(x["effective_powercap_kw"] for x in caps) == pytest.approx(0.7)
    client.put("/v1/carbon/rate", headers=tok, json={"gco2_per_h": None})
    caps = client.get("/v1/containers", headers=tok).json()
    assert [x["effective_powercap_kw"] for x in caps] == [1.5, 0.6]


def test_carbon_budget_is_paced_and_binds_when_spent(client):
    tok = _register(client, battery_fraction=0.0, solar_fraction=0.0)
    now = client.get("/v1/clock").json()["now"]
    r = client.put("/v1/carbon/budget", headers=tok, json={"kgco2": 0.05, "start": now})
    assert r.status_code == 200 and r.json()["carbon_budget"]["end"] is None
    ticks = client.post("/v1/tick", headers=ADMIN, json={"n": 24}).json()["ticks"]
    pol = client.get("/v1/carbon/policy", headers=tok).json()
    assert pol["carbon_budget"]["used_kgco2"] >= 0.05  # spent (the last tick may overshoot)
    assert pol["effective_rate_gco2_per_h"] == 0.0
    caps = client.get("/v1/containers", headers=tok).json()
    assert sum(x["effective_powercap_kw"] for x in caps) == pytest.approx(0.7)  # idle only
    used = sum(t["apps"]["app-a"]["carbon_kgco2"] for t in ticks)
    assert pol["carbon_budget"]["used_kgco2"] == pytest.approx(used)
    # a paced budget with an end: 2 hours, 0.1 kg -> 50 g/h allowed
    end = client.get("/v1/clock").json()["now"].replace("T09:00", "T11:00")
    r = client.put("/v1/carbon/budget", headers=tok, json={"kgco2": 0.1, "end": end})
    assert r.status_code == 200, r.text
    assert r.json()["effective_rate_gco2_per_h"] == pytest.approx(50.0)


def test_state_survives_a_restart(tmp_path):
    db = tmp_path / "eco.duckdb"
    with TestClient(simulated_app(db_path=db)) as c:
        tok = _register(c)
        c.put("/v1/containers/a-batch/powercap", headers=tok, json={"kw": 0.9})
        c.put("/v1/battery/charge-rate", headers=tok, json={"kw": 2})
        c.post("/v1/tick", headers=ADMIN, json={"n": 5})
        level = c.get("/v1/battery/charge-level", headers=tok).json()["charge_level_kwh"]
        now = c.get("/v1/clock").json()["now"]
    with TestClient(simulated_app(db_path=db)) as c:
        assert c.get("/v1/clock").json()["now"] == now  # the simulated clock continues, never rewinds
        assert c.get("/v1/containers/a-batch/powercap", headers=tok).json()["powercap_kw"] == 0.9
        b = c.get("/v1/battery", headers=tok).json()
        assert b["charge_level_kwh"] == pytest.approx(level) and b["charge_rate_kw"] == 2
        c.post("/v1/tick", headers=ADMIN, json={"n": 1})
        ticks = c.get("/v1/ticks", headers=tok).json()["ticks"]
        assert [t["tick_id"] for t in ticks] == [1, 2, 3, 4, 5, 6]


class _SlowServer:
    def __init__(self, delay_s: float):
        self.hits = 0
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                outer.hits += 1
                time.sleep(delay_s)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cb"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_slow_or_dead_callbacks_never_delay_the_tick():
    slow = _SlowServer(delay_s=3.0)
    dead = f"http://127.0.0.1:{free_port()}/cb"  # nothing listens there
    try:
        with TestClient(simulated_app(callback_timeout_s=0.5)) as c:
            _register(c, name="slow", containers=["a-batch"], solar_fraction=0.3, battery_fraction=0.3,
                      callback_url=slow.url)
            _register(c, name="dead", containers=["b-batch"], grid_kw=4, solar_fraction=0.3, battery_fraction=0.3,
                      callback_url=dead)
            t0 = time.monotonic()
            r = c.post("/v1/tick", headers=ADMIN, json={"n": 20})
            elapsed = time.monotonic() - t0
            assert r.status_code == 200
            # awaited callbacks would take >= 20 x 0.5 s; fire-and-forget ones cost nothing (loose bound for busy hosts)
            assert elapsed < 4.0, f"20 ticks took {elapsed:.2f}s with slow callbacks"
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                st = {a["name"]: a["callbacks"] for a in c.get("/v1/apps", headers=ADMIN).json()}
                if st["slow"]["pending"] == 0 and st["dead"]["pending"] == 0:
                    break
                time.sleep(0.05)
            assert st["dead"]["failed"] >= 1 and st["dead"]["sent"] == 0
            assert st["slow"]["failed"] >= 1  # timed out after 0.5 s
            assert st["slow"]["dropped"] >= 1  # at most 8 in flight
            assert slow.hits >= 1
    finally:
        slow.close()


def test_real_time_ticker_ticks_by_itself(tmp_path):
    site = test_site(tick_seconds=1)
    api = create_app(site, RealClock(), make_backend(site), tmp_path / "rt.duckdb", admin_token="admin-token")
    with TestClient(api) as c:
        tok = _register(c)
        assert c.post("/v1/tick", headers=ADMIN, json={"n": 1}).status_code == 409  # no time travel here
        deadline = time.monotonic() + 6
        ticks = []
        while time.monotonic() < deadline and len(ticks) < 2:
            time.sleep(0.2)
            ticks = c.get("/v1/ticks", headers=tok).json()["ticks"]
        assert len(ticks) >= 2
        assert all(abs(t["dt_s"] - 1.0) < 0.9 for t in ticks[1:])
        for t in ticks:
            assert abs(t["solar_kw"] + t["battery_discharge_kw"] + t["grid_kw"]
                       - t["load_kw"] - t["solar_to_battery_kw"] - t["grid_to_battery_kw"] - t["curtailed_kw"]) < 1e-9


def test_cli_serve_starts_the_service(tmp_path):
    port = free_port()
    env = {**os.environ, "CICM_ECOVISOR_ADMIN_TOKEN": "cli-admin"}
    cmd = [sys.executable, "-m", "cicm.ecovisor.cli", "serve", "--site", str(REPO / "cicm/ecovisor/examples/site.toml"),
           "--port", str(port), "--db", str(tmp_path / "cli.duckdb"), "--clock", "simulated", "--log-level", "warning"]
    p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1)
                break
            except httpx.TransportError:
                if p.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(p.stdout.read().decode()) from None
                time.sleep(0.2)
        h = r.json()
        assert h["clock"] == "simulated" and h["backend"] == "simulated" and h["power_source"] == "modelled-from-cpu"
        assert h["now"].startswith("2022-06-21T07:00:00")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/tick", headers=bearer("cli-admin"), json={"n": 2})
        assert r.status_code == 200 and len(r.json()["ticks"]) == 2
    finally:
        p.terminate()
        p.wait(timeout=10)
    env.pop("CICM_ECOVISOR_ADMIN_TOKEN")
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "CICM_ECOVISOR_ADMIN_TOKEN" in r.stderr
