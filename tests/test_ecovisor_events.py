"""The ecovisor's notifications (Table 2: notify_solar_change, notify_carbon_change, notify_battery_full/empty)
as server-sent events, their Python client, and get_app_power; against a real ecovisor on loopback."""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
import requests

from cicm.ecovisor.carbon import CarbonTrace
from cicm.ecovisor.solar import SolarModel
from cicm.ecovisor.subscribe import Event, SubscriptionError, parse_stream, subscribe
from cicm.ecovisor.testing import ServerThread, bearer, free_port, simulated_app, test_site

ADMIN = bearer("admin-token")
T0 = datetime(2022, 6, 21, 7, tzinfo=timezone.utc)


class StepSolar(SolarModel):
    """Site solar in kW: 0 before 09:30Z, 4 kW from 09:30, 4.2 kW from 10:00, 6 kW from 10:30."""

    steps = [(T0 + timedelta(hours=2, minutes=30), 4.0), (T0 + timedelta(hours=3), 4.2),
             (T0 + timedelta(hours=3, minutes=30), 6.0)]

    def power_kw(self, t: datetime) -> float:
        v = 0.0
        for at, kw in self.steps:
            if t >= at:
                v = kw
        return v


def carbon_trace() -> CarbonTrace:
    """200 g/kWh at 07:00Z, 203 at 08:00 (within the 5 g threshold), 350 at 09:00, 352 at 10:00, 360 at 11:00."""
    idx = pd.date_range("2022-06-21T00:00Z", periods=24, freq="h")
    vals = [200.0] * 24
    for h, v in ((8, 203.0), (9, 350.0), (10, 352.0), (11, 360.0)):
        vals[h] = v
    for h in range(12, 24):
        vals[h] = 360.0
    return CarbonTrace(pd.Series(vals, index=idx), name="step")


def events_site(**events):
    cfg = {"carbon_threshold_gco2_per_kwh": 5.0, "keepalive_s": 0.2, **events}
    return test_site(events=cfg)


def make_app(db_path=None, **events):
    return simulated_app(events_site(**events), db_path=db_path, carbon=carbon_trace(), solar=StepSolar())


def register(url: str, name: str = "app-a", containers=("a-batch", "a-serve"), **kw) -> str:
    body = {"name": name, "grid_kw": 8, "solar_fraction": 0.5, "battery_fraction": 0.1,
            "containers": list(containers), **kw}
    r = requests.post(f"{url}/v1/apps", headers=ADMIN, json=body, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["token"]


def tick(url: str, n: int) -> dict:
    r = requests.post(f"{url}/v1/tick", headers=ADMIN, json={"n": n}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def wait_streams(api, app: str, n: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while api.state.events.open_streams(app) != n:
        assert time.monotonic() < end, f"{api.state.events.open_streams(app)} streams open, wanted {n}"
        time.sleep(0.02)


def collect(url: str, token: str, types, n: int, timeout: float = 30.0, **kw):
    """Start a subscriber thread that collects ``n`` events (or stops at ``timeout``)."""
    got: list[Event] = []
    sub = subscribe(url, token, types, timeout=timeout, **kw)

    def run():
        try:
            for ev in sub:
                got.append(ev)
                if len(got) >= n:
                    break
        except SubscriptionError as e:
            sub.error = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return got, t, sub


@pytest.fixture
def eco():
    api = make_app()
    with ServerThread(api) as srv:
        srv.api = api
        yield srv


# ------------------------------------------------------------------------------------------ the scenario


def test_sunrise_carbon_change_and_a_full_then_empty_battery_come_in_order_with_their_values(eco):
    tok = register(eco.url)
    got, t, _ = collect(eco.url, tok, ("solar", "carbon", "battery"), 5)
    wait_streams(eco.api, "app-a", 1)

    # battery 2 kWh (10% of 20), reserve 0.6 kWh, starts at 1 kWh; charging 1 kW from the grid at 90%: full at
    # tick 14 (08:10), and it stays full (no second event) while charging goes on to tick 16
    assert requests.put(f"{eco.url}/v1/battery/charge-rate", headers=bearer(tok), json={"kw": 1.0}).status_code == 200
    tick(eco.url, 16)
    assert requests.put(f"{eco.url}/v1/battery/charge-rate", headers=bearer(tok), json={"kw": 0.0}).status_code == 200
    # load 1.75 kW (a-batch 1.25 + a-serve 0.5), no sun: empty at tick 26 (09:10); the sun rises at 09:30
    tick(eco.url, 29)  # to tick 45, 10:45
    t.join(timeout=20)

    assert [(e.id, e.type, e.time) for e in got] == [
        ("14-0", "battery_full", "2022-06-21T08:10:00+00:00"),
        ("24-0", "carbon_change", "2022-06-21T09:00:00+00:00"),   # 203 at 08:00 was within 5 g of 200
        ("26-0", "battery_empty", "2022-06-21T09:10:00+00:00"),
        ("31-0", "solar_change", "2022-06-21T09:35:00+00:00"),    # sunrise: 0 -> 2 kW (half of 4)
        ("43-0", "solar_change", "2022-06-21T10:35:00+00:00"),    # 2.1 at 10:00 was within 0.25 kW of 2.0
    ]
    full, carbon, empty, sunrise, brighter = (e.data for e in got)
    assert full["soc"] == pytest.approx(1.0) and full["charge_level_kwh"] == pytest.approx(2.0)
    assert full["capacity_kwh"] == pytest.approx(2.0) and full["app"] == "app-a" and full["tick_id"] == 14
    assert carbon["gco2_per_kwh"] == 350.0 and carbon["previous_gco2_per_kwh"] == 200.0
    assert carbon["trace_hour"] == "2022-06-21T09:00:00+00:00" and carbon["quality"] == "measured"
    assert empty["soc"] == pytest.approx(0.3) and empty["charge_level_kwh"] == pytest.approx(0.6)
    assert sunrise["solar_kw"] == pytest.approx(2.0) and sunrise["previous_kw"] == 0.0
    assert sunrise["threshold_kw"] == pytest.approx(0.25)  # 5% of 10 kWp x 0.5
    assert brighter["solar_kw"] == pytest.approx(3.0) and brighter["previous_kw"] == pytest.approx(2.0)
    # the same figures as the getters give
    bat = requests.get(f"{eco.url}/v1/battery", headers=bearer(tok)).json()
    assert bat["soc"] < 1.0 - 1e-6  # still charging from the sun: no full event yet


def test_tick_notifications_one_per_tick(eco):
    tok = register(eco.url)
    got, t, _ = collect(eco.url, tok, ("tick",), 3)
    wait_streams(eco.api, "app-a", 1)
    tick(eco.url, 3)
    t.join(timeout=10)
    # tick 3 also emptied the battery (1 kWh at 1.75 kW down to 0.6): that event, 3-0, is not asked for
    assert [e.id for e in got] == ["1-0", "2-0", "3-1"] and {e.type for e in got} == {"tick"}
    assert got[0].data["load_kw"] == pytest.approx(1.75) and got[0].time == "2022-06-21T07:05:00+00:00"


def test_the_tick_summary_lists_the_events(eco):
    register(eco.url)
    ticks = tick(eco.url, 2)["ticks"]
    assert [e["id"] for e in ticks[1]["events"]] == ["2-0"]


# ------------------------------------------------------------------------------------------ access and bounds


def test_another_apps_events_are_404_as_an_unknown_app(eco):
    tok_a = register(eco.url)
    tok_b = register(eco.url, "app-b", ("b-batch",))
    other = requests.get(f"{eco.url}/v1/apps/app-a/events", headers=bearer(tok_b), timeout=5)
    unknown = requests.get(f"{eco.url}/v1/apps/nobody/events", headers=bearer(tok_b), timeout=5)
    assert other.status_code == unknown.status_code == 404
    assert other.json()["detail"] == "no app 'app-a'" and unknown.json()["detail"] == "no app 'nobody'"
    assert other.json()["field"] == unknown.json()["field"] == "name"
    assert requests.get(f"{eco.url}/v1/apps/app-a/events", timeout=5).status_code == 401
    assert requests.get(f"{eco.url}/v1/apps/app-a/events", headers=ADMIN, timeout=5).status_code == 401
    with pytest.raises(SubscriptionError) as err:
        next(iter(subscribe(eco.url, tok_b, timeout=5, app="app-a")))
    assert err.value.status_code == 404
    with pytest.raises(SubscriptionError) as err:
        next(iter(subscribe(eco.url, "wrong", timeout=5)))
    assert err.value.status_code == 401
    del tok_a


@pytest.mark.parametrize("types", ["wind", "solar,wind", "solar,,carbon", "", "SOLAR"])
def test_bad_types_are_422(eco, types):
    tok = register(eco.url)
    r = requests.get(f"{eco.url}/v1/apps/me/events", params={"types": types}, headers=bearer(tok), timeout=5)
    assert r.status_code == 422 and r.json()["field"] == "types", r.text
    with pytest.raises(SubscriptionError) as err:
        next(iter(subscribe(eco.url, tok, types.split(","), timeout=5)))
    assert err.value.status_code == 422 and err.value.field == "types"


def test_a_bad_last_event_id_is_422(eco):
    tok = register(eco.url)
    r = requests.get(f"{eco.url}/v1/apps/me/events", headers=bearer(tok) | {"Last-Event-ID": "x"}, timeout=5)
    assert r.status_code == 422 and r.json()["field"] == "last-event-id"


def test_streams_beyond_the_bound_are_429_and_a_closed_one_frees_its_slot():
    api = make_app(max_subscribers_per_app=2)
    with ServerThread(api) as srv:
        tok = register(srv.url)
        url = f"{srv.url}/v1/apps/app-a/events"
        s1 = requests.get(url, headers=bearer(tok), stream=True, timeout=5)
        s2 = requests.get(url, headers=bearer(tok), stream=True, timeout=5)
        assert s1.status_code == s2.status_code == 200
        third = requests.get(url, headers=bearer(tok), stream=True, timeout=5)
        assert third.status_code == 429
        assert "has 2 event streams open, the most one app may have" in third.json()["detail"]
        assert third.headers["Retry-After"] == "1"
        other = register(srv.url, "app-b", ("b-batch",))  # the bound is per app
        s3 = requests.get(f"{srv.url}/v1/apps/app-b/events", headers=bearer(other), stream=True, timeout=5)
        assert s3.status_code == 200
        s1.close()
        wait_streams(api, "app-a", 1)  # freed at its next keep-alive (0.2 s here)
        s4 = requests.get(url, headers=bearer(tok), stream=True, timeout=5)
        assert s4.status_code == 200
        for s in (s2, s3, s4):
            s.close()


def test_keep_alive_comments_while_idle(eco):
    tok = register(eco.url)
    with requests.get(f"{eco.url}/v1/apps/me/events", headers=bearer(tok), stream=True, timeout=5) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = []
        for line in r.iter_lines(chunk_size=None):
            lines.append(line)
            if lines.count(b": keep-alive") >= 2:
                break
    assert lines[0].startswith(b"retry: ")


# ------------------------------------------------------------------------------------------ replay, reconnect


def test_last_event_id_replays_what_was_missed(eco):
    tok = register(eco.url)
    tick(eco.url, 3)
    got, t, _ = collect(eco.url, tok, ("tick",), 2, last_event_id="1-0")
    t.join(timeout=10)
    assert [e.id for e in got] == ["2-0", "3-1"]  # 3-0 is the battery_empty of tick 3


def test_deleting_the_app_ends_its_streams(eco):
    tok = register(eco.url)
    got, t, sub = collect(eco.url, tok, ("tick",), 5, timeout=5)
    wait_streams(eco.api, "app-a", 1)
    assert requests.delete(f"{eco.url}/v1/apps/app-a", headers=ADMIN).status_code == 204
    t.join(timeout=10)
    assert [e.type for e in got] == ["resync"] and got[0].data["reason"] == "the app was deleted"
    assert sub.error.status_code == 401  # it reconnected, and the app is gone


def test_the_client_reconnects_after_a_restart_and_is_told_to_resync(tmp_path):
    db = tmp_path / "eco.duckdb"
    port = free_port()
    api = make_app(db)
    srv = ServerThread(api, port=port).__enter__()
    try:
        tok = register(srv.url)
        got, t, sub = collect(srv.url, tok, ("tick",), 4, timeout=30, retry_s=0.1)
        wait_streams(api, "app-a", 1)
        tick(srv.url, 2)
        end = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < end:
            time.sleep(0.02)
    finally:
        srv.__exit__(None, None, None)
    assert sub.last_event_id == "2-0"
    api2 = make_app(db)
    with ServerThread(api2, port=port) as srv2:
        wait_streams(api2, "app-a", 1)
        tick(srv2.url, 1)
        t.join(timeout=10)
    assert [(e.type, e.id) for e in got] == [("tick", "1-0"), ("tick", "2-0"), ("resync", None), ("tick", "3-0")]
    assert "restarted" in got[2].data["reason"]
    assert sub.connections >= 2


def test_the_wait_is_bounded():
    api = make_app(keepalive_s=30.0)  # no byte on the stream during the wait
    with ServerThread(api) as srv:
        tok = register(srv.url)
        t0 = time.monotonic()
        assert list(subscribe(srv.url, tok, timeout=0.8)) == []
        assert time.monotonic() - t0 < 3.0


def test_parse_stream_follows_the_sse_rules():
    chunks = [b"retry: 2500\n: hi\n\nid: 1-0\r\nevent: tick\ndata: {\"a\":", b" 1}\n\n", b"id: 2-0\ndata: {}\n\nid: 3"]
    evs = list(parse_stream(chunks))
    assert evs == [Event("tick", "1-0", {"a": 1}), Event("message", "2-0", {})]
    with pytest.raises(SubscriptionError):
        list(parse_stream([b"data: nope\n\n"]))


# ------------------------------------------------------------------------------------------ get_app_power


def test_get_app_power_breaks_the_load_down_by_container_and_by_source(eco):
    tok = register(eco.url)
    before = requests.get(f"{eco.url}/v1/power", headers=bearer(tok)).json()
    assert before["load_kw"] == 0.0 and before["as_of"] is None
    requests.put(f"{eco.url}/v1/containers/a-batch/powercap", headers=bearer(tok), json={"kw": 1.0})
    tick(eco.url, 34)  # to 09:50: sun (2 kW share) on a 1.5 kW load, the battery charging from the excess
    p = requests.get(f"{eco.url}/v1/power", headers=bearer(tok)).json()
    conts = requests.get(f"{eco.url}/v1/containers", headers=bearer(tok)).json()
    assert {c["container"]: c["power_kw"] for c in conts} == {k: v["power_kw"] for k, v in p["containers"].items()}
    assert p["containers"]["a-batch"]["power_kw"] == pytest.approx(1.0)
    assert p["containers"]["a-batch"]["powercap_kw"] == 1.0
    assert p["load_kw"] == pytest.approx(sum(v["power_kw"] for v in p["containers"].values()))
    assert sum(p["supply"].values()) == pytest.approx(p["load_kw"])
    assert p["supply"]["solar_kw"] == pytest.approx(1.5) and p["supply"]["grid_kw"] == pytest.approx(0.0)
    assert p["solar"]["to_battery_kw"] == pytest.approx(0.5) and p["battery"]["charging_kw"] == pytest.approx(0.5)
    grid = requests.get(f"{eco.url}/v1/grid/power", headers=bearer(tok)).json()
    bat = requests.get(f"{eco.url}/v1/battery", headers=bearer(tok)).json()
    assert p["grid"]["power_kw"] == grid["power_kw"] and p["battery"]["soc"] == bat["soc"]
    assert p["grid_gco2_per_kwh"] == 350.0 and p["as_of"] == "2022-06-21T09:50:00+00:00"
    assert p["power_source"] == "modelled-from-cpu"


def test_the_openapi_publishes_the_event_stream_and_get_app_power(eco):
    spec = requests.get(f"{eco.url}/openapi.json").json()
    op = spec["paths"]["/v1/apps/{name}/events"]["get"]
    assert "text/event-stream" in op["responses"]["200"]["content"]
    assert {"401", "404", "422", "429"} <= set(op["responses"])
    assert any(p["name"] == "types" for p in op["parameters"])
    power = spec["paths"]["/v1/power"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert power["$ref"].endswith("/AppPower")
    assert set(spec["components"]["schemas"]["PowerSupply"]["properties"]) == {"solar_kw", "battery_kw", "grid_kw"}


# ------------------------------------------------------------------------------------------ more lifecycle


def test_the_real_clocks_ticker_fires_the_notifications(tmp_path):
    from cicm.ecovisor.app import create_app
    from cicm.ecovisor.backends import make_backend
    from cicm.ecovisor.clock import RealClock

    site = test_site(tick_seconds=1, events={"keepalive_s": 0.5})
    api = create_app(site, RealClock(), make_backend(site), None, admin_token="admin-token")
    with ServerThread(api) as srv:
        tok = register(srv.url)
        t0 = datetime.now(timezone.utc)
        got, t, _ = collect(srv.url, tok, ("tick",), 2, timeout=10)
        t.join(timeout=12)
    assert [e.type for e in got] == ["tick", "tick"]
    assert abs((datetime.fromisoformat(got[0].time) - t0).total_seconds()) < 5


def test_rotating_the_token_ends_the_streams_of_the_old_one(eco):
    tok = register(eco.url)
    got, t, sub = collect(eco.url, tok, ("tick",), 5, timeout=5)
    wait_streams(eco.api, "app-a", 1)
    r = requests.post(f"{eco.url}/v1/apps/app-a/token", headers=ADMIN, json={})
    assert r.status_code == 200
    t.join(timeout=10)
    assert [e.type for e in got] == ["resync"] and "rotated" in got[0].data["reason"]
    assert sub.error.status_code == 401


def _hub(**cfg):
    from cicm.ecovisor.events import EventHub
    from cicm.ecovisor.site import Events

    return EventHub(Events(**cfg), boot_tick_id=0)


def _ev(tick_id: int, k: int = 0, type_: str = "tick") -> dict:
    return {"id": f"{tick_id}-{k}", "type": type_, "app": "a"}


def test_a_stream_that_falls_behind_is_told_to_resync_and_closed():
    import asyncio

    async def run():
        hub = _hub(queue_events=2)
        sub = hub.subscribe("a", frozenset({"tick"}), None)
        hub.publish([_ev(1), _ev(2), _ev(3)])
        got = [await hub.next(sub, 1), await hub.next(sub, 1)]
        with pytest.raises(StopAsyncIteration):
            await hub.next(sub, 1)
        return got, sub

    got, sub = asyncio.run(run())
    assert [e["id"] for e in got] == ["1-0", "2-0"] and "fell more than 2 events behind" in sub.resync


def test_a_replay_beyond_the_buffer_starts_with_resync():
    import asyncio

    async def run():
        hub = _hub(replay_events=2)
        hub.publish([_ev(1), _ev(2), _ev(3)])
        kept = hub.subscribe("a", frozenset({"tick"}), "1-0")  # 2-0 and 3-0 are still kept
        lost = hub.subscribe("a", frozenset({"tick"}), "0-0")  # 1-0 fell out
        return kept, lost, [await hub.next(kept, 1), await hub.next(kept, 1)]

    kept, lost, replay = asyncio.run(run())
    assert kept.resync is None and [e["id"] for e in replay] == ["2-0", "3-0"]
    assert lost.resync is not None and "lost" in lost.resync


def test_cli_serve_stops_with_a_stream_open(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    port = free_port()
    env = {**os.environ, "CICM_ECOVISOR_ADMIN_TOKEN": "admin-token"}
    cmd = [sys.executable, "-m", "cicm.ecovisor.cli", "serve", "--site", str(repo / "cicm/ecovisor/examples/site.toml"),
           "--port", str(port), "--clock", "simulated", "--log-level", "warning"]
    p = subprocess.Popen(cmd, env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{url}/v1/health", timeout=1)
                break
            except requests.ConnectionError:
                assert p.poll() is None and time.monotonic() < end, p.stdout.read().decode()
                time.sleep(0.2)
        tok = register(url, containers=())
        stream = requests.get(f"{url}/v1/apps/me/events", headers=bearer(tok), stream=True, timeout=30)
        assert stream.status_code == 200
        t0 = time.monotonic()
        p.terminate()
        p.wait(timeout=15)  # without a bound on the graceful shutdown, it waits for the stream forever
        assert time.monotonic() - t0 < 10
        stream.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_the_client_needs_neither_the_server_nor_the_rest_of_the_ecovisor():
    """subscribe.py can be copied next to a client that may not import cicm.ecovisor (the agent)."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "cicm" / "ecovisor" / "subscribe.py"
    cicm_imports = {n.module for n in ast.walk(ast.parse(path.read_text()))
                    if isinstance(n, ast.ImportFrom) and (n.level > 0 or (n.module or "").startswith("cicm"))}
    assert cicm_imports == {"cicm.httpclient"}
    code = ("import sys, cicm.ecovisor.subscribe; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'duckdb', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ webhooks


class _Receiver:
    """A loopback HTTP server that keeps the JSON bodies POSTed to it."""

    def __init__(self):
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.bodies: list[dict] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cb"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_webhooks_carry_the_notifications_the_app_asked_for(eco):
    rx = _Receiver()
    try:
        register(eco.url, callback_url=rx.url, callback_events="battery")
        plain = _Receiver()
        register(eco.url, "app-b", ("b-batch",), grid_kw=4, callback_url=plain.url)
        tick(eco.url, 4)  # app-a's battery is empty at tick 3
        end = time.monotonic() + 10
        while (len(rx.bodies) < 5 or len(plain.bodies) < 4) and time.monotonic() < end:
            time.sleep(0.02)
        notes = [b for b in rx.bodies if b["event"] != "tick"]
        assert [(b["event"], b["id"], b["time"]) for b in notes] == [
            ("battery_empty", "3-0", "2022-06-21T07:15:00+00:00")]
        assert notes[0]["soc"] == pytest.approx(0.3)
        assert sum(b["event"] == "tick" for b in rx.bodies) == 4
        assert {b["event"] for b in plain.bodies} == {"tick"}  # without callback_events: the tick only
        plain.close()
    finally:
        rx.close()
    r = requests.post(f"{eco.url}/v1/apps", headers=ADMIN, timeout=5, json={
        "name": "app-c", "grid_kw": 1, "containers": ["spare"], "callback_url": rx.url, "callback_events": "wind"})
    assert r.status_code == 422 and r.json()["field"] == "callback_events"
