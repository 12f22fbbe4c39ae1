"""End to end: the ecovisor on loopback (real uvicorn, simulated clock, simulated backend), two applications,
a whole solar day of ticks over HTTP."""
from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pandas as pd
import pytest

from cicm.ecovisor.carbon import eia_trace_path
from cicm.ecovisor.testing import ServerThread, bearer, simulated_app, test_site

ADMIN = bearer("admin-token")
DAY_START = pd.Timestamp("2022-06-21T07:00:00Z")  # local midnight (PDT) at the test site


class Recorder:
    """A loopback HTTP server that records the JSON bodies POSTed to it."""

    def __init__(self):
        self.bodies: list[dict] = []
        rec = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("content-length", 0))
                rec.bodies.append(json.loads(self.rfile.read(n)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/tick"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _trace_ci() -> pd.Series:
    """The CISO trace read independently of the ecovisor (hourly gCO2/kWh, short gaps interpolated)."""
    df = pd.read_csv(eia_trace_path("CISO"))
    s = pd.Series(df["avg_CI"].to_numpy(), index=pd.to_datetime(df["timestamp"], utc=True))
    return s.interpolate(method="time", limit=3)


def test_a_solar_day_over_http(tmp_path):
    api = simulated_app(test_site(), db_path=tmp_path / "eco.duckdb")
    with Recorder() as rec, ServerThread(api) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        # ---- two applications
        r = c.post("/v1/apps", headers=ADMIN, json={
            "name": "app-a", "grid_kw": 8, "solar_fraction": 0.6, "battery_fraction": 0.5,
            "containers": ["a-batch", "a-serve"], "callback_url": rec.url})
        assert r.status_code == 201, r.text
        ta = bearer(r.json()["token"])
        r = c.post("/v1/apps", headers=ADMIN, json={
            "name": "app-b", "grid_fraction": 0.5, "solar_fraction": 0.4, "battery_fraction": 0.5,
            "containers": ["b-batch"]})
        assert r.status_code == 201, r.text
        tb = bearer(r.json()["token"])
        assert r.json()["grid_share_kw"] == 10.0

        # ---- caps and battery settings over HTTP
        r = c.put("/v1/containers/a-batch/powercap", headers=ta, json={"kw": 1.0})
        assert r.status_code == 200 and r.json()["cpu_limit_cores"] == pytest.approx(2.0)
        assert r.json()["power_source"] == "modelled-from-cpu"
        assert c.put("/v1/battery/max-discharge", headers=ta, json={"kw": 2.0}).status_code == 200
        assert c.put("/v1/containers/b-batch/powercap", headers=tb, json={"kw": 2.5}).status_code == 200
        assert c.put("/v1/battery/charge-rate", headers=tb, json={"kw": 3.0}).status_code == 200
        assert c.get("/v1/containers/a-batch/powercap", headers=ta).json()["powercap_kw"] == 1.0

        # ---- isolation between the applications: another app's container is as absent as one that is not there
        assert c.get("/v1/containers/b-batch", headers=ta).status_code == 404
        assert c.put("/v1/containers/b-batch/powercap", headers=ta, json={"kw": 1.0}).status_code == 404
        assert c.get("/v1/containers/a-batch", headers=tb).status_code == 404
        assert c.get("/v1/containers/a-batch").status_code == 401
        assert c.get("/v1/battery", headers=bearer("not-a-token")).status_code == 401
        assert c.get("/v1/battery", headers=ADMIN).status_code == 401  # the admin is not an app
        assert c.post("/v1/tick", headers=ta, json={"n": 1}).status_code == 403  # an app cannot move time
        assert c.get("/v1/containers/b-batch/powercap", headers=tb).json()["powercap_kw"] == 2.5  # untouched
        assert [x["container"] for x in c.get("/v1/containers", headers=ta).json()] == ["a-batch", "a-serve"]

        # ---- a real solar day: 6 h of night with B charging from the grid, then 18 h without
        for n in (48, 24):  # at most 48 ticks a request
            r = c.post("/v1/tick", headers=ADMIN, json={"n": n})
            assert r.status_code == 200, r.text
        assert c.put("/v1/battery/charge-rate", headers=tb, json={"kw": 0}).status_code == 200
        for _ in range(216 // 48 + 1):
            r = c.post("/v1/tick", headers=ADMIN, json={"n": min(48, 216 - 48 * _)})
            assert r.status_code == 200, r.text
        assert pd.Timestamp(r.json()["now"]) == DAY_START + pd.Timedelta(hours=24)

        ta_rows = c.get("/v1/ticks", headers=ta).json()
        tb_rows = c.get("/v1/ticks", headers=tb).json()
        day = (DAY_START.isoformat(), (DAY_START + pd.Timedelta(hours=24)).isoformat())
        carbon_a = c.get("/v1/carbon", headers=ta, params={"start": day[0], "end": day[1]}).json()
        carbon_b = c.get("/v1/carbon", headers=tb, params={"start": day[0], "end": day[1]}).json()
        energy_a = c.get("/v1/energy", headers=ta, params={"container": "a-batch"}).json()
        assert c.get("/v1/energy", headers=ta, params={"container": "b-batch"}).status_code == 404

        # the apps' callbacks (only A has one) fire in the background
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = c.get("/v1/apps/me", headers=ta).json()["callbacks"]
            if st["sent"] + st["failed"] + st["dropped"] >= 288:
                break
            time.sleep(0.05)

    ticks_a, ticks_b = ta_rows["ticks"], tb_rows["ticks"]
    assert len(ticks_a) == len(ticks_b) == 288
    assert {t["app"] for t in ticks_a} == {"app-a"} and {t["app"] for t in ticks_b} == {"app-b"}
    assert {x["container"] for x in ta_rows["containers"]} == {"a-batch", "a-serve"}

    # ---- energy conservation, every tick, both apps
    for t in ticks_a + ticks_b:
        supply = t["solar_kw"] + t["battery_discharge_kw"] + t["grid_kw"]
        use = t["load_kw"] + t["solar_to_battery_kw"] + t["grid_to_battery_kw"] + t["curtailed_kw"]
        assert abs(supply - use) <= 1e-9, t
        assert t["battery_soc"] >= 0.3 - 1e-9 or t["battery_discharge_kw"] == 0

    # ---- containers stay within their caps
    for x in ta_rows["containers"] + tb_rows["containers"]:
        assert x["power_kw"] <= x["effective_powercap_kw"] + 1e-12
    assert energy_a["energy_kwh"] == pytest.approx(24.0)  # a-batch at its 1.0 kW cap all day
    assert {round(x["power_kw"], 9) for x in ta_rows["containers"] if x["container"] == "a-batch"} == {1.0}

    # ---- the sun rises and sets (pvlib clear sky): dark at local midnight, bright at local noon
    by_hour_a = pd.DataFrame(ticks_a).assign(h=lambda d: pd.to_datetime(d["interval_start"]).dt.hour)
    night = by_hour_a[by_hour_a["h"].isin([7, 8, 9])]  # 00-03 PDT
    noon = by_hour_a[by_hour_a["h"].isin([19, 20])]  # 12-14 PDT
    assert (night["solar_kw"] == 0).all()
    assert noon["solar_kw"].mean() > 0.6 * 10 * 0.5  # 60% of a 10 kWp array, > half its peak
    solar_a = sum(t["solar_kw"] for t in ticks_a)
    solar_b = sum(t["solar_kw"] for t in ticks_b)
    assert solar_a == pytest.approx(1.5 * solar_b)  # the 0.6 : 0.4 shares
    assert (noon["grid_kw"] == 0).all()  # A's 1.5 kW load is solar-powered at noon
    assert any(t["curtailed_kw"] > 0 for t in ticks_a)

    # ---- B charged from the grid in the first 6 h, then stopped
    first6, rest = ticks_b[:72], ticks_b[72:]
    assert all(t["grid_to_battery_kw"] > 0 for t in first6[:10])
    assert all(t["grid_to_battery_kw"] == 0 for t in rest)
    assert first6[-1]["battery_energy_kwh"] > first6[0]["battery_energy_kwh"]
    assert all(t["battery_discharge_kw"] == 0 for t in first6)
    assert max(t["battery_discharge_kw"] for t in ticks_a) <= 2.0 + 1e-12  # A's max-discharge setting

    # ---- carbon attribution: app carbon = sum of grid kWh x intensity of the trace
    ci = _trace_ci()
    for ticks, tot in ((ticks_a, carbon_a), (ticks_b, carbon_b)):
        expect = 0.0
        for t in ticks:
            mid = pd.Timestamp(t["interval_start"]) + pd.Timedelta(seconds=t["dt_s"] / 2)
            assert t["grid_gco2_per_kwh"] == pytest.approx(ci[mid.floor("h")], rel=1e-12)
            expect += t["grid_kw"] * t["dt_s"] / 3600 * ci[mid.floor("h")] / 1000
        assert tot["carbon_kgco2"] == pytest.approx(expect, rel=1e-9)
        assert tot["carbon_kgco2"] > 0
        charging = sum(t["carbon_charging_kgco2"] for t in ticks)
        assert sum(tot["containers"].values()) + charging == pytest.approx(tot["carbon_kgco2"], rel=1e-9)
    assert carbon_b["grid_energy_kwh"] > carbon_a["grid_energy_kwh"]

    # ---- A's callback got the ticks, and only A's
    assert rec.bodies, "no tick callback arrived"
    assert {b["app"] for b in rec.bodies} == {"app-a"}
    assert st["sent"] + st["dropped"] >= 288 and st["failed"] == 0
    assert all(math.isfinite(b["grid_kw"]) for b in rec.bodies)
