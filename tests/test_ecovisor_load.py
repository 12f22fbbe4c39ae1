"""The ecovisor's per-request cost (issue 20, item 8), checked by what a request does, never by timing: setting one
container's cap touches that container only (no store write, no re-application of the app's other caps, no
worker-thread hop); the settings reach the store by the write-behind flush (periodic, after each tick, on
shutdown). The figures themselves come from bench/ecovisor_load.py."""
from __future__ import annotations

import threading
import time
import warnings

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from cicm.ecovisor.caps import CapController
from cicm.ecovisor.site import parse_site
from cicm.ecovisor.testing import TEST_SITE, bearer, simulated_app
from cicm.store.ecovisor import Telemetry

ADMIN = bearer("admin-token")
N = 60


def _big_site():
    d = {**TEST_SITE, "containers": [
        {"name": f"c-{i:03d}", "cores": 4, "sim_demand_cores": 2.0,
         "power": {"kind": "linear", "idle_kw": 0.1, "max_kw": 0.5}} for i in range(N)]}
    return parse_site(d)


@pytest.fixture
def big(tmp_path):
    api = simulated_app(_big_site(), db_path=tmp_path / "eco.duckdb", flush_every_s=3600)
    with TestClient(api) as c:
        r = c.post("/v1/apps", headers=ADMIN, json={"name": "big", "grid_kw": 10,
                                                     "containers": [f"c-{i:03d}" for i in range(N)]})
        assert r.status_code == 201, r.text
        yield api, c, bearer(r.json()["token"])


def test_setting_one_cap_touches_one_container_and_writes_nothing(big, monkeypatch):
    api, c, tok = big
    core = api.state.ecovisor
    calls = {"effective": 0, "limit": [], "store": 0, "threads": set()}
    real_eff, real_limit = CapController.effective_caps_kw, core.backend.set_cpu_limit
    real_set = core.set_container_powercap

    def eff(self, *a, **kw):
        calls["effective"] += 1
        return real_eff(self, *a, **kw)

    def limit(name, cores):
        calls["limit"].append(name)
        return real_limit(name, cores)

    def save(*a, **kw):
        calls["store"] += 1

    def set_cap(*a, **kw):
        calls["threads"].add(threading.current_thread().name)
        return real_set(*a, **kw)

    monkeypatch.setattr(CapController, "effective_caps_kw", eff)
    monkeypatch.setattr(core.backend, "set_cpu_limit", limit)
    monkeypatch.setattr(Telemetry, "save_app_state", save)
    monkeypatch.setattr(core, "set_container_powercap", set_cap)
    for i in range(10):
        r = c.put(f"/v1/containers/c-{i:03d}/powercap", headers=tok, json={"kw": 0.3})
        assert r.status_code == 200 and r.json()["effective_powercap_kw"] == 0.3
    assert calls["effective"] == 0  # no policy: the app's other caps are not recomputed ...
    assert calls["limit"] == [f"c-{i:03d}" for i in range(10)]  # ... and only the container set is touched
    assert calls["store"] == 0  # write-behind: no store write per request
    assert not any(t.startswith("AnyIO worker") for t in calls["threads"])  # served on the event loop
    monkeypatch.undo()
    assert core.flush() == 1  # one app changed: one write, whatever the number of requests
    assert core.store.load_apps()[0]["state"]["powercaps_kw"]["c-005"] == 0.3


def test_under_a_policy_every_cap_moves_and_after_it_they_come_back(big):
    api, c, tok = big
    c.post("/v1/tick", headers=ADMIN, json={"n": 1})
    ci = c.get("/v1/grid/carbon", headers=tok).json()["gco2_per_kwh"]
    assert c.put("/v1/carbon/rate", headers=tok, json={"gco2_per_h": 12.0 * ci}).status_code == 200  # 12 kW < 30
    c.put("/v1/containers/c-000/powercap", headers=tok, json={"kw": 0.2})
    caps = {x["container"]: x["effective_powercap_kw"] for x in c.get("/v1/containers", headers=tok).json()}
    assert sum(caps.values()) == pytest.approx(12.0)
    assert caps["c-001"] < 0.5 and caps["c-000"] < 0.2
    # the policy is cleared by a budget that no longer binds: the next cap set re-applies every cap
    core = api.state.ecovisor
    app = core.apps["big"]
    with core._lock:
        app.carbon_rate_gco2_per_h = None  # as if the policy lapsed between ticks (e.g. a budget window ended)
    c.put("/v1/containers/c-000/powercap", headers=tok, json={"kw": 0.25})
    caps = {x["container"]: x["effective_powercap_kw"] for x in c.get("/v1/containers", headers=tok).json()}
    assert caps["c-000"] == 0.25 and caps["c-001"] == 0.5


def test_settings_reach_the_store_without_a_tick_or_a_shutdown(tmp_path):
    db = tmp_path / "eco.duckdb"
    api = simulated_app(db_path=db, flush_every_s=0.05)
    with TestClient(api) as c:
        r = c.post("/v1/apps", headers=ADMIN, json={"name": "a", "grid_kw": 5, "containers": ["a-batch"]})
        tok = bearer(r.json()["token"])
        c.put("/v1/containers/a-batch/powercap", headers=tok, json={"kw": 0.9})
        store = api.state.ecovisor.store
        deadline = time.monotonic() + 10
        while store.load_apps()[0]["state"]["powercaps_kw"]["a-batch"] != 0.9:
            assert time.monotonic() < deadline, "the flusher never stored the cap"
            time.sleep(0.02)


def test_a_restart_keeps_settings_set_after_the_last_tick(tmp_path):
    db = tmp_path / "eco.duckdb"
    with TestClient(simulated_app(db_path=db, flush_every_s=3600)) as c:
        r = c.post("/v1/apps", headers=ADMIN, json={"name": "a", "grid_kw": 5, "containers": ["a-batch"]})
        tok = bearer(r.json()["token"])
        c.post("/v1/tick", headers=ADMIN, json={"n": 1})
        c.put("/v1/containers/a-batch/powercap", headers=tok, json={"kw": 0.8})  # after the tick's flush
    with TestClient(simulated_app(db_path=db)) as c:  # the shutdown flushed it
        assert c.get("/v1/containers/a-batch/powercap", headers=tok).json()["powercap_kw"] == 0.8
