"""The bulk cap route ``PUT /v1/containers/powercaps`` (issue 19, item 4) against a real ecovisor (uvicorn on
loopback), and the enforcement agent using it: validated as a whole (one bad entry refuses all, naming it, and
nothing changes, read back), the same auth as the single-cap route, the same end state as one PUT per container
(a property, on the core, with and without a carbon policy), and the agent's caps and audit equal to its
per-container passes, with a fallback to those against an ecovisor that has no bulk route. Behaviour only: the
figures are bench/agent_scale.py's."""
from __future__ import annotations

import json

import httpx
import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cicm.ecovisor.schemas import AppRegistration
from cicm.ecovisor.testing import ServerThread, bearer, simulated_app
from cicm.enforce.audit import read_actions
from cicm.enforce.client import EcovisorClient, EcovisorError
from cicm.enforce.clock import SimulatedClock
from tests.test_enforce_agent import ADMIN, CLUSTER, START, Ecovisor, make_agent, write_plan

BULK = "/v1/containers/powercaps"
STATE_KEYS = ("powercap_kw", "effective_powercap_kw", "cpu_limit_cores")


def without_bulk_route(api):
    """The ecovisor as it was before the bulk route (it answers 405 for PUT /v1/containers/powercaps)."""
    api.router.routes = [r for r in api.router.routes if getattr(r, "path", None) != BULK]
    return api


@pytest.fixture
def eco(tmp_path):
    """The test site on a real uvicorn: app ``a`` owns a-batch and a-serve, app ``b`` owns b-batch."""
    api = simulated_app(db_path=tmp_path / "eco.duckdb")
    core = api.state.ecovisor
    _, tok_a = core.register_app(AppRegistration(name="a", grid_kw=5.0, containers=["a-batch", "a-serve"]))
    _, tok_b = core.register_app(AppRegistration(name="b", grid_kw=5.0, containers=["b-batch"]))
    with ServerThread(api) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        yield http, bearer(tok_a), bearer(tok_b), api


def state(http, tok) -> dict:
    return {c["container"]: {k: c[k] for k in STATE_KEYS} for c in http.get("/v1/containers", headers=tok).json()}


# ---------------------------------------------------------------------------------------------------- the route
def test_bulk_sets_every_cap_and_answers_each_container(eco):
    http, tok_a, _, _ = eco
    r = http.put(BULK, headers=tok_a, json={"caps": [{"name": "a-serve", "kw": 0.5}, {"name": "a-batch", "kw": 1.0}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["app"] == "a" and body["n"] == 2
    assert [c["container"] for c in body["containers"]] == ["a-serve", "a-batch"]  # the request's order
    for c in body["containers"]:  # each as GET /v1/containers/{name} shows it now
        assert c == http.get(f"/v1/containers/{c['container']}", headers=tok_a).json()
    now = state(http, tok_a)
    assert now["a-batch"]["powercap_kw"] == 1.0 and now["a-batch"]["cpu_limit_cores"] == pytest.approx(2.0)  # linear
    assert now["a-serve"]["powercap_kw"] == 0.5 and now["a-serve"]["cpu_limit_cores"] == pytest.approx(1.0)  # piecewise
    assert http.put(BULK, headers=tok_a, json={"caps": []}).json() == {"app": "a", "n": 0, "containers": []}


BAD = [  # (caps, status, field): one bad entry among good ones
    ([{"name": "a-batch", "kw": 0.9}, {"name": "nope", "kw": 0.3}], 404, "caps.1.name"),  # unknown container
    ([{"name": "a-batch", "kw": 0.9}, {"name": "b-batch", "kw": 2.0}], 404, "caps.1.name"),  # another app's
    ([{"name": "a-batch", "kw": 0.9}, {"name": "spare", "kw": 0.1}], 404, "caps.1.name"),  # nobody's
    ([{"name": "a-batch", "kw": 0.9}, {"name": "a-serve", "kw": 0.3}, {"name": "a-batch", "kw": 1.0}], 422,
     "caps.2.name"),  # a container twice
    ([{"name": "a-batch", "kw": 0.9}, {"name": "a-serve", "kw": 0.7}], 422, "caps.1.kw"),  # above max_kw 0.6
    ([{"name": "a-batch", "kw": 0.4}, {"name": "a-serve", "kw": 0.3}], 422, "caps.0.kw"),  # below idle_kw 0.5
    ([{"name": "a-batch", "kw": 0.9}, {"name": "a-serve", "kw": -1}], 422, "caps.1.kw"),
    ([{"name": "a-batch", "kw": 0.9}, {"name": "a-serve", "kw": "0.3"}], 422, "caps.1.kw"),  # a string
    ([{"name": "a-batch", "kw": 0.9}, {"name": "a-serve", "kw": True}], 422, "caps.1.kw"),  # a boolean
    ([{"name": "a-batch", "kw": 0.9}, {"name": "a-serve"}], 422, "caps.1.kw"),  # missing
    ([{"name": "a-batch", "kw": 0.9}, {"name": "a-serve", "kw": 0.3, "cpu": 1}], 422, "caps.1.cpu"),  # extra field
    ([{"name": "a-batch", "kw": 0.9}, {"name": "A_BAD", "kw": 0.3}], 422, "caps.1.name"),  # not a name
]


@pytest.mark.parametrize("caps,status,field", BAD)
def test_one_bad_entry_refuses_all_and_changes_nothing(eco, caps, status, field):
    http, tok_a, tok_b, _ = eco
    http.put("/v1/containers/a-serve/powercap", headers=tok_a, json={"kw": 0.55})  # a state that is not the default
    before_a, before_b = state(http, tok_a), state(http, tok_b)
    r = http.put(BULK, headers=tok_a, json={"caps": caps})
    assert r.status_code == status, r.text
    assert r.json()["field"] == field
    entry = int(field.split(".")[1])
    detail = json.dumps(r.json()["detail"])
    if status == 404:  # names the entry and the container, the same words for another app's as for none
        assert f"entry {entry}" in detail and caps[entry]["name"] in detail and "nothing was changed" in detail
    assert state(http, tok_a) == before_a and state(http, tok_b) == before_b  # read back: nothing changed


def test_the_same_auth_as_the_single_cap_route(eco):
    http, tok_a, tok_b, _ = eco
    body = {"caps": [{"name": "a-batch", "kw": 1.0}]}
    before = state(http, tok_a)
    assert http.put(BULK, json=body).status_code == 401
    assert http.put(BULK, headers=bearer("not-a-token"), json=body).status_code == 401
    assert http.put(BULK, headers=bearer("admin-token"), json=body).status_code == 401  # no app's token
    other = http.put(BULK, headers=tok_b, json=body)  # b's token on a's container: as if it did not exist
    unknown = http.put(BULK, headers=tok_b, json={"caps": [{"name": "zz-none", "kw": 1.0}]})
    assert other.status_code == unknown.status_code == 404
    assert other.json()["field"] == unknown.json()["field"] == "caps.0.name"
    assert other.json()["detail"].replace("a-batch", "X") == unknown.json()["detail"].replace("zz-none", "X")
    assert state(http, tok_a) == before


def test_bulk_is_in_the_openapi_the_metrics_and_the_stored_settings(tmp_path):
    db = tmp_path / "eco.duckdb"
    api = simulated_app(db_path=db)
    _, tok = api.state.ecovisor.register_app(AppRegistration(name="a", grid_kw=5.0, containers=["a-batch", "a-serve"]))
    with ServerThread(api) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        op = http.get("/openapi.json").json()["paths"][BULK]["put"]
        assert {"200", "401", "404", "422", "503"} <= set(op["responses"])
        r = http.put(BULK, headers=bearer(tok), json={"caps": [{"name": "a-batch", "kw": 0.8},
                                                               {"name": "a-serve", "kw": 0.4}]})
        assert r.status_code == 200
        metrics = http.get("/metrics").text
        assert f'route="{BULK}"' in metrics  # the request-latency histogram, by route template
    api2 = simulated_app(db_path=db)  # a restart on the same store keeps the caps (write-behind flush on shutdown)
    caps = {n: api2.state.ecovisor.containers[n].powercap_kw for n in ("a-batch", "a-serve")}
    api2.state.ecovisor.store.close()
    assert caps == {"a-batch": 0.8, "a-serve": 0.4}


# ---------------------------------------------------------------------------------------------------- a property
def _core(rate: float | None):
    api = simulated_app()
    core = api.state.ecovisor
    app, _ = core.register_app(AppRegistration(name="a", grid_kw=5.0, containers=["a-batch", "a-serve", "b-batch"]))
    if rate is not None:
        core.set_carbon_rate(app, rate)
    return core, app


def _snapshot(core) -> dict:
    return {n: (c.powercap_kw, c.effective_powercap_kw, c.cpu_limit_cores, core.backend.get_cpu_limit(n))
            for n, c in core.containers.items()}


NAMES = st.sampled_from(["a-batch", "a-serve", "b-batch", "spare", "nope"])
KW = st.one_of(st.floats(0.0, 3.5), st.sampled_from([0.5, 1.5, 0.2, 0.6, 1.0, 3.0]))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(NAMES, KW), max_size=5), st.sampled_from([None, 40.0, 400.0]))
@example([("a-batch", 1.0), ("b-batch", 2.0), ("a-serve", 0.3)], None)
@example([("a-batch", 1.0), ("b-batch", 2.0), ("a-serve", 0.3)], 40.0)
@example([("a-batch", 1.0), ("b-batch", 9.0)], 40.0)
def test_bulk_equals_one_put_per_container_or_changes_nothing(caps, rate):
    bulk_core, bulk_app = _core(rate)
    one_core, one_app = _core(rate)
    before = _snapshot(bulk_core)
    try:
        bulk_core.set_container_powercaps(bulk_app, caps)
    except Exception as e:  # refused: nothing changed, and one PUT per container would have failed too
        assert _snapshot(bulk_core) == before
        assert getattr(e, "field", "").startswith("caps.")
        if len({n for n, _ in caps}) == len(caps):  # (a container named twice is the bulk route's own refusal)
            with pytest.raises(Exception):
                for name, kw in caps:
                    one_core.set_container_powercap(one_app, name, kw)
        return
    for name, kw in caps:
        one_core.set_container_powercap(one_app, name, kw)
    assert _snapshot(bulk_core) == _snapshot(one_core)
    assert bulk_app.carbon_policy_met == one_app.carbon_policy_met


# ---------------------------------------------------------------------------------------------------- the agent
class EcovisorWithoutBulk(Ecovisor):
    def up(self) -> None:
        self.server = ServerThread(without_bulk_route(simulated_app(self.site, self.db, admin_token=ADMIN)),
                                   port=self.port).__enter__()


@pytest.fixture
def two(tmp_path):
    """Two real ecovisors, one with the bulk route and one without, on the agent tests' site."""
    (tmp_path / "bulk").mkdir()
    (tmp_path / "old").mkdir()
    pair = [Ecovisor(tmp_path / "bulk"), EcovisorWithoutBulk(tmp_path / "old")]
    for e in pair:
        e.up()
    yield pair
    for e in pair:
        if e.is_up:
            e.down()
        e.http.close()


def _audit(db) -> list[dict]:
    """The agent's audit rows in the store, oldest first."""
    return read_actions(db, None, CLUSTER, limit=100).iloc[::-1].to_dict("records")


def test_the_agent_sets_in_bulk_what_it_set_one_container_at_a_time(two, tmp_path):
    bulk, old = two
    agents = []
    for e, tag in ((bulk, "bulk"), (old, "old")):
        db = tmp_path / f"plan-{tag}.duckdb"
        write_plan(db)
        clock = SimulatedClock(START)
        token = e.register()
        agent = make_agent(e.url, token, clock, db=db)
        agents.append((e, clock, agent, token))
    for h in (0, 4, 5, 9, 13, 16, 21, 23):  # caps down, up, lifted above the flexible cores, down again
        t = START + pd.Timedelta(hours=h)
        outs = []
        for e, clock, agent, _ in agents:
            e.tick_to(t)
            clock.set(t)
            outs.append(agent.step())
        eo, oo = outs
        assert eo.ok and oo.ok and eo.mode == oo.mode == "shaped", (eo.line(), oo.line())
        assert eo.caps == oo.caps and eo.changes == oo.changes, h  # the audit's caps and change lines
        strip = [[d for d in o.detail.split(" | ") if not d.startswith("caps: ")] for o in (eo, oo)]
        assert strip[0] == strip[1], h
        held = [{c["container"]: {k: c[k] for k in STATE_KEYS} for c in e.call("get", "/v1/containers", token=tok)}
                for e, _, _, tok in agents]
        assert held[0] == held[1], h  # the ecovisors hold the same caps
    bulk_agent, old_agent = agents[0][2], agents[1][2]
    bulk_paths = {p for _, p, _ in bulk_agent.client.writes if "powercap" in p}
    old_paths = {p for _, p, _ in old_agent.client.writes if "powercap" in p}
    assert bulk_paths == {BULK}  # one request per search round, never one per container
    assert old_paths and BULK not in old_paths and all(p.endswith("/powercap") for p in old_paths)
    assert bulk_agent.client.bulk_caps is True and bulk_agent.client.bulk_fallback is None
    assert old_agent.client.bulk_caps is False and "HTTP 405" in old_agent.client.bulk_fallback
    rows = [_audit(tmp_path / f"plan-{tag}.duckdb") for tag in ("bulk", "old")]
    assert len(rows[0]) == len(rows[1]) == 8
    for b, o in zip(*rows):  # the audit is as informative: the same caps, and each pass says how it set them
        assert json.loads(b["caps"]) == json.loads(o["caps"])
        if b["result"] == "applied":
            assert "bulk request(s)" in b["detail"] and "per-container PUT(s)" in o["detail"]


def test_the_client_falls_back_only_when_the_route_is_missing(two):
    bulk, old = two
    for e in two:
        token = e.register()
        with EcovisorClient(e.url, token, retries=0) as client:
            with pytest.raises(EcovisorError) as bad:  # a bad entry is the caller's error, on either ecovisor
                client.set_powercaps([("batch-1", 0.2), ("nope", 0.2)])
            assert bad.value.status_code == 404
            if e is bulk:
                assert bad.value.field == "caps.1.name" and client.bulk_caps is not False
            else:  # the old one: 405 for the bulk route, then PUT per container (batch-1 set, then nope's 404)
                assert client.bulk_caps is False and bad.value.field == "container"
            got = client.set_powercaps([("batch-1", 0.25), ("batch-2", 0.2)])
            assert set(got) == {"batch-1", "batch-2"} and got["batch-1"]["powercap_kw"] == 0.25
            assert client.bulk_caps is (e is bulk)
