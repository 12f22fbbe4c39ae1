"""Issue 20, item 7: the ecovisor refuses what it used to coerce (strict types, timestamps as ISO-8601 strings
with a zone), bounds admin work (at most 48 ticks a request), leaks no container names across apps (another
app's container answers exactly like one that does not exist), publishes its errors and range rules in the
OpenAPI, and its app tokens expire and can be rotated."""
from __future__ import annotations

import warnings
from datetime import datetime, timedelta, timezone

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from cicm.ecovisor.testing import bearer, simulated_app

ADMIN = bearer("admin-token")


def _register(c, name="app-a", containers=("a-batch", "a-serve"), **kw):
    body = {"name": name, "grid_kw": 5, "solar_fraction": 0.4, "battery_fraction": 0.4,
            "containers": list(containers), **kw}
    r = c.post("/v1/apps", headers=ADMIN, json=body)
    assert r.status_code == 201, r.text
    return bearer(r.json()["token"]), r.json()


@pytest.fixture
def client():
    with TestClient(simulated_app()) as c:
        yield c


def _snapshot(c, tok):
    return (c.get("/v1/containers", headers=tok).json(), c.get("/v1/battery", headers=tok).json(),
            c.get("/v1/carbon/policy", headers=tok).json(), c.get("/v1/clock").json())


# ------------------------------------------------------------------------------------------------- strict types
@pytest.mark.parametrize("method,path,body,field", [
    ("put", "/v1/containers/a-batch/powercap", {"kw": True}, "kw"),
    ("put", "/v1/containers/a-batch/powercap", {"kw": "0.9"}, "kw"),
    ("put", "/v1/containers/a-batch/powercap", {"kw": [1.0]}, "kw"),
    ("put", "/v1/battery/charge-rate", {"kw": False}, "kw"),
    ("put", "/v1/battery/max-discharge", {"kw": "1"}, "kw"),
    ("put", "/v1/carbon/rate", {"gco2_per_h": "5"}, "gco2_per_h"),
    ("put", "/v1/carbon/budget", {"kgco2": 1, "start": 0.5}, "start"),  # never Unix time
    ("put", "/v1/carbon/budget", {"kgco2": 1, "end": 1655800000}, "end"),
    ("put", "/v1/carbon/budget", {"kgco2": 1, "end": "2022-06-22"}, "end"),  # a date is not a date-time
    ("put", "/v1/carbon/budget", {"kgco2": 1, "end": "2022-06-22T00:00:00"}, "end"),  # no zone
    ("put", "/v1/carbon/budget", {"kgco2": True}, "kgco2"),
    ("get", "/v1/energy?start=0.5", None, "start"),
    ("get", "/v1/energy?end=1655800000", None, "end"),
    ("get", "/v1/carbon?start=2022-06-21", None, "start"),
    ("get", "/v1/ticks?start=2022-06-21T00:00:00", None, "start"),
    ("get", "/v1/ticks?end=0001-01-01T00:00:00%2B01:00", None, "end"),  # out of range, not a 500
])
def test_coercions_are_refused_and_change_nothing(client, method, path, body, field):
    tok, _ = _register(client)
    client.post("/v1/tick", headers=ADMIN, json={"n": 1})
    before = _snapshot(client, tok)
    r = getattr(client, method)(path, headers=tok, **({"json": body} if body is not None else {}))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field
    assert _snapshot(client, tok) == before


def test_admin_bodies_are_strict_too(client):
    for body, field in [({"n": True}, "n"), ({"n": "2"}, "n"), ({"n": 2.0}, "n")]:
        r = client.post("/v1/tick", headers=ADMIN, json=body)
        assert r.status_code == 422 and r.json()["field"] == field, (body, r.text)
    r = client.post("/v1/apps", headers=ADMIN, json={"name": "x", "grid_kw": "1"})
    assert r.status_code == 422 and r.json()["field"] == "grid_kw"
    r = client.post("/v1/apps", headers=ADMIN, json={"name": "x", "grid_kw": 1, "token_ttl_days": 1.5})
    assert r.status_code == 422 and r.json()["field"] == "token_ttl_days"
    r = client.put("/v1/admin/containers/spare/demand", headers=ADMIN, json={"cores": "0.5"})
    assert r.status_code == 422 and r.json()["field"] == "cores"
    assert client.get("/v1/clock").json()["tick_id"] == 0


def test_what_is_well_typed_still_passes(client):
    tok, _ = _register(client)
    assert client.put("/v1/containers/a-batch/powercap", headers=tok, json={"kw": 1}).status_code == 200  # int ok
    r = client.put("/v1/carbon/budget", headers=tok,
                   json={"kgco2": 1, "start": "2022-06-21T07:00:00+00:00", "end": "2022-06-21T09:30:00.5-07:00"})
    assert r.status_code == 200, r.text
    assert r.json()["carbon_budget"]["end"] == "2022-06-21T16:30:00.500000+00:00"
    client.post("/v1/tick", headers=ADMIN, json={"n": 2})
    r = client.get("/v1/energy", headers=tok, params={"start": "2022-06-21T07:00:00Z", "end": "2022-06-21T07:05:00Z"})
    assert r.status_code == 200 and r.json()["start"] == "2022-06-21T07:00:00+00:00"


# ------------------------------------------------------------------------------------------------- bounded ticks
def test_ticks_per_request_are_capped_and_the_422_says_why(client):
    for n in (49, 1000, 100_000):
        r = client.post("/v1/tick", headers=ADMIN, json={"n": n})
        assert r.status_code == 422 and r.json()["field"] == "n"
        msg = r.json()["detail"][0]["msg"]
        assert "48" in msg and "call again" in msg, msg
    assert client.get("/v1/clock").json()["tick_id"] == 0
    r = client.post("/v1/tick", headers=ADMIN, json={"n": 48})
    assert r.status_code == 200 and len(r.json()["ticks"]) == 48


# ------------------------------------------------------------------------------------------------- no name leaks
@pytest.mark.parametrize("method,path,body", [
    ("get", "/v1/containers/{c}", None),
    ("get", "/v1/containers/{c}/powercap", None),
    ("get", "/v1/containers/{c}/power", None),
    ("put", "/v1/containers/{c}/powercap", {"kw": 1.0}),
    ("put", "/v1/containers/{c}/powercap", {"kw": 99.0}),  # out of range for any container: still 404
    ("get", "/v1/energy?container={c}", None),
    ("get", "/v1/carbon?container={c}", None),
])
def test_another_apps_container_answers_like_one_that_does_not_exist(client, method, path, body):
    tok, _ = _register(client)
    _register(client, name="app-b", containers=["b-batch"], grid_kw=1)
    answers = []
    for c in ("b-batch", "spare", "no-such"):  # another app's, no app's, none at all
        r = getattr(client, method)(path.format(c=c), headers=tok, **({"json": body} if body is not None else {}))
        headers = sorted((k, v) for k, v in r.headers.items() if k != "content-length")
        answers.append((r.status_code, r.text.replace(c, "<name>"), headers))
    assert answers[0][0] == 404
    assert answers[0] == answers[1] == answers[2]


def test_a_valid_app_token_on_an_admin_route_is_403_and_a_bad_one_401(client):
    tok, _ = _register(client)
    assert client.post("/v1/tick", headers=tok, json={"n": 1}).status_code == 403
    assert client.get("/v1/apps", headers=tok).status_code == 403
    assert client.get("/v1/apps", headers=bearer("nope")).status_code == 401
    assert client.get("/v1/apps").status_code == 401


# ------------------------------------------------------------------------------------------------- OpenAPI
def test_openapi_publishes_errors_and_range_rules(client):
    spec = client.get("/openapi.json").json()
    paths, schemas = spec["paths"], spec["components"]["schemas"]
    put_cap = paths["/v1/containers/{name}/powercap"]["put"]
    assert {"401", "404", "422", "503"} <= set(put_cap["responses"])
    assert {"401", "403", "409", "422"} <= set(paths["/v1/tick"]["post"]["responses"])
    assert {"401", "403", "404"} <= set(paths["/v1/apps/{name}/token"]["post"]["responses"])
    assert set(paths["/v1/battery"]["get"]["responses"]) >= {"401"}
    for p, ops in paths.items():
        for verb, op in ops.items():
            if p.startswith("/v1/") and p not in ("/v1/health", "/v1/clock"):
                assert "401" in op["responses"], (verb, p)
    assert schemas["PowerBody"]["properties"]["kw"]["minimum"] == 0
    n = schemas["TickBody"]["properties"]["n"]
    assert n["minimum"] == 1 and n["maximum"] == 48 and "48" in n["description"]
    ttl = schemas["AppRegistration"]["properties"]["token_ttl_days"]
    assert ttl["minimum"] == 1 and ttl["maximum"] == 3650 and ttl["default"] == 90
    assert schemas["AppRegistration"]["properties"]["solar_fraction"]["maximum"] == 1
    start = next(x for x in paths["/v1/energy"]["get"]["parameters"] if x["name"] == "start")
    s = start["schema"]["anyOf"][0] if "anyOf" in start["schema"] else start["schema"]
    assert s["type"] == "string" and s["format"] == "date-time" and "pattern" in s
    assert schemas["ValidationErrorBody"]["required"] == ["detail", "field"]


# ------------------------------------------------------------------------------------------------- tokens
def test_tokens_expire_with_a_clear_401(client):
    core = client.app.state.ecovisor
    now = datetime.now(timezone.utc)
    tok, made = _register(client)
    assert abs(datetime.fromisoformat(made["token_expires_at"]) - (now + timedelta(days=90))) < timedelta(minutes=5)
    tok1, made1 = _register(client, name="short", containers=["b-batch"], grid_kw=1, token_ttl_days=1)
    assert client.get("/v1/apps/me", headers=tok1).json()["token_expires_at"] == made1["token_expires_at"]
    core.registry.wall = lambda: now + timedelta(days=1, minutes=1)  # a day later, by the wall clock
    r = client.get("/v1/battery", headers=tok1)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert "expired" in r.json()["detail"] and "cicm ecovisor app rotate short" in r.json()["detail"]
    assert client.get("/v1/battery", headers=tok).status_code == 200  # the 90-day one still works


def test_rotation_issues_a_new_token_and_the_old_one_stops_working(tmp_path):
    db = tmp_path / "eco.duckdb"
    with TestClient(simulated_app(db_path=db)) as c:
        old, _ = _register(c)
        r = c.post("/v1/apps/app-a/token", headers=ADMIN, json={"token_ttl_days": 7})
        assert r.status_code == 200, r.text
        new = bearer(r.json()["token"])
        exp = datetime.fromisoformat(r.json()["token_expires_at"])
        assert abs(exp - datetime.now(timezone.utc) - timedelta(days=7)) < timedelta(minutes=5)
        assert c.get("/v1/apps/me", headers=new).json()["name"] == "app-a"
        assert c.get("/v1/apps/me", headers=old).status_code == 401
        assert c.post("/v1/apps/app-a/token", headers=new).status_code == 403  # an app cannot rotate
        assert c.post("/v1/apps/nope/token", headers=ADMIN).status_code == 404
        assert c.post("/v1/apps/app-a/token", headers=ADMIN, json={"token_ttl_days": 0}).status_code == 422
        assert c.post("/v1/apps/app-a/token", headers=ADMIN, json={"token_ttl_days": "7"}).status_code == 422
    with TestClient(simulated_app(db_path=db)) as c:  # a restart keeps the new token, and the old one out
        assert c.get("/v1/apps/me", headers=new).status_code == 200
        assert c.get("/v1/apps/me", headers=old).status_code == 401
        assert c.get("/v1/apps/me", headers=new).json()["token_expires_at"] == exp.isoformat()
        me = c.get("/v1/apps", headers=ADMIN).json()[0]
        assert me["token_expires_at"] == exp.isoformat()
    from cicm.store.ecovisor import Telemetry

    store = Telemetry(db)
    try:
        row = store.load_apps()[0]
    finally:
        store.close()
    assert new["Authorization"].split()[1] not in repr(row)  # stored hashed, never in clear


def test_unknown_query_parameters_and_non_json_bodies_are_422(client):
    tok, _ = _register(client)
    r = client.get("/v1/energy", headers=tok, params={"strat": "2022-06-21T00:00:00Z"})  # a typo is not ignored
    assert r.status_code == 422 and r.json()["field"] == "strat"
    assert client.get("/v1/battery?x=1", headers=tok).json()["field"] == "x"
    r = client.put("/v1/containers/a-batch/powercap", headers={**tok, "content-type": "application/json"},
                   content=b"\xff\xfe")
    assert r.status_code == 422 and r.json()["field"] == "body"


def test_405_lists_the_methods_of_the_path(client):
    r = client.request("OPTIONS", "/v1/apps")
    assert r.status_code == 405 and r.headers["Allow"] == "GET, POST"
    assert client.request("OPTIONS", "/v1/apps/me").headers["Allow"] == "GET"
