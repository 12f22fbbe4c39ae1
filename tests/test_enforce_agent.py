"""The enforcement agent against a REAL ecovisor (FastAPI + uvicorn on loopback, simulated clock).

The agent reaches the ecovisor over HTTP only; these tests import the ecovisor solely to serve it.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from datetime import date
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from cicm.data.store import Store
from cicm.enforce.agent import AgentConfigError
from cicm.enforce.audit import read_jsonl
from cicm.enforce.cli import build_agent
from cicm.enforce.clock import SimulatedClock
from cicm.ecovisor.testing import free_port
from cicm.enforce.policy import tolerance_cores

ADMIN = "test-admin-token"
START = pd.Timestamp("2022-06-14T07:00:00Z")  # local midnight PDT: the plan day's first hour
PLAN_DATE = date(2022, 6, 14)
CLUSTER = "sj-a"
CAPACITY = 102400.0
SCALE = CAPACITY / 10.0  # the app's containers have 10 cores in all: 10240 cluster cores per container core

# allowance (cluster cores) per hour: 0 in the dirty night, 1..6 container cores, above the 8 flexible cores at 16-19
ALLOWANCE_CC = [0.0] * 4 + [2.0] * 4 + [4.0] * 4 + [6.0] * 4 + [9.0] * 4 + [3.0] * 4
CARBON = [450.0, 440.0, 430.0, 420.0] + [300.0] * 8 + [100.0, 100.0, 105.0, 110.0] + [250.0] * 8

SITE = {
    "name": "test-site",
    "tick_seconds": 900,
    "sim_start": "2022-06-14T07:00:00Z",
    "location": {"latitude": 37.39, "longitude": -122.08, "timezone": "America/Los_Angeles"},
    "grid": {"capacity_kw": 20.0, "carbon": {"source": "eia", "zone": "CISO"}},
    "battery": {"capacity_kwh": 20.0, "reserve_soc": 0.3, "initial_soc": 0.6, "max_charge_c": 0.5,
                "max_discharge_c": 1.0},
    "solar": {"source": "pvlib", "array_kwp": 0.3},
    "backend": {"kind": "simulated"},
    "containers": [
        {"name": "batch-1", "cores": 4, "sim_demand_cores": 4.0,
         "power": {"kind": "linear", "idle_kw": 0.10, "max_kw": 0.30}},
        {"name": "batch-2", "cores": 4, "sim_demand_cores": 4.0,
         "power": {"kind": "piecewise", "points": [[0, 0.10], [1, 0.17], [2, 0.22], [4, 0.30]]}},
        {"name": "serving-1", "cores": 2, "sim_demand_cores": 1.5,
         "power": {"kind": "linear", "idle_kw": 0.05, "max_kw": 0.15}},
    ],
}


class Ecovisor:
    """A real ecovisor (uvicorn in a thread, ``cicm.ecovisor.testing.ServerThread``); ``down()``/``up()`` stop
    and restart it on the same port and telemetry file (so apps, tokens and caps survive, as in production)."""

    def __init__(self, tmp_path: Path):
        from cicm.ecovisor.site import parse_site

        self.site = parse_site(SITE, tmp_path)
        self.db = tmp_path / "ecovisor.duckdb"
        self.port = free_port()
        self.server = None
        self.http = httpx.Client(base_url=self.url, timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_up(self) -> bool:
        return self.server is not None

    def up(self) -> None:
        from cicm.ecovisor.testing import ServerThread, simulated_app

        self.server = ServerThread(simulated_app(self.site, self.db, admin_token=ADMIN), port=self.port).__enter__()

    def down(self) -> None:
        self.server.__exit__(None, None, None)
        self.server = None

    def call(self, method: str, path: str, token: str = ADMIN, **kw):
        r = self.http.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kw)
        r.raise_for_status()
        return r.json() if r.content else None

    def register(self) -> str:
        return self.call("post", "/v1/apps", json={
            "name": CLUSTER, "grid_kw": 10.0, "solar_fraction": 1.0, "battery_fraction": 1.0,
            "containers": ["batch-1", "batch-2", "serving-1"]})["token"]

    def now(self) -> pd.Timestamp:
        return pd.Timestamp(self.call("get", "/v1/clock")["now"])

    def tick_to(self, t: pd.Timestamp) -> None:
        n = math.ceil((t - self.now()).total_seconds() / SITE["tick_seconds"] - 1e-9)
        if n > 0:
            self.call("post", "/v1/tick", json={"n": n})


@pytest.fixture
def eco(tmp_path):
    e = Ecovisor(tmp_path)
    e.up()
    yield e
    if e.is_up:
        e.down()
    e.http.close()


def plan_frames(plan_date=PLAN_DATE, allowance_cc=ALLOWANCE_CC, carbon=CARBON, status="shaped", reason=None,
                start=START):
    hours = pd.date_range(start, periods=24, freq="h", name="hour")
    flex = np.array(allowance_cc) * SCALE
    infl = np.full(24, 40000.0)
    vccs = pd.DataFrame({
        "plan_date": plan_date, "cluster": CLUSTER, "hour": hours, "hour_index": np.arange(24),
        "vcc_cores": (infl * 1.1 + flex) * 1.35, "flexible_cpu_cores": flex, "inflexible_cpu_cores": infl,
        "power_kw": 150.0, "carbon_kgco2": 40.0, "gco2_per_kwh": carbon,
    })
    st = pd.DataFrame([{
        "plan_date": plan_date, "cluster": CLUSTER, "campus": "ca-sj", "status": status, "reason": reason,
        "capacity_cores": CAPACITY, "theta_core_hours": 2.5e6, "tau_core_hours": float(flex.sum()),
        "expected_kgco2": 900.0, "flat_kgco2": 950.0, "saving_pct": 5.0, "peak_kw": 190.0,
    }])
    return vccs, st


def write_plan(db: Path, **kw) -> None:
    vccs, st = plan_frames(**kw)
    with Store(db) as store, store.run("plan", {"test": True}, plan_date=vccs["plan_date"].iloc[0]) as run:
        store.replace_plan(vccs["plan_date"].iloc[0], vccs, st, run.run_id)


def make_agent(eco_url: str, token: str, clock, *, db=None, plan_file=None, audit_file=None, **overrides):
    options = dict(cluster=CLUSTER, ecovisor=eco_url, token=token, db=db, plan_file=plan_file,
                   audit_file=audit_file, fleet=None, flexible=[], flexible_pattern="batch-*",
                   cluster_cores_per_core=None, on_missing_plan="lift", max_plan_age_hours=48.0, battery=True,
                   battery_hours=4, retry_base_s=5.0, retry_max_s=300.0, reconcile_every_s=3600.0,
                   request_retries=0, clock=clock)
    options.update(overrides)
    return build_agent(**options)


def containers(eco: Ecovisor, token: str) -> dict[str, dict]:
    return {c["container"]: c for c in eco.call("get", "/v1/containers", token=token)}


# ---------------------------------------------------------------------------------------------------- a day


def test_agent_follows_a_days_vcc_through_hourly_ticks(eco, db_path):
    write_plan(db_path)
    token = eco.register()
    clock = SimulatedClock(START)
    agent = make_agent(eco.url, token, clock, db=db_path)
    for h in range(24):
        t = START + pd.Timedelta(hours=h)
        eco.tick_to(t)
        clock.set(t)
        out = agent.step()
        assert out.ok and out.mode == "shaped" and out.reason is None, out.line()
        assert out.audit_to == "store"
        state = containers(eco, token)
        target = min(ALLOWANCE_CC[h], 8.0) / 2
        for name in ("batch-1", "batch-2"):
            limit = state[name]["cpu_limit_cores"]
            tol = tolerance_cores(4.0)
            assert limit <= target + tol, (h, name, limit, target)  # never above the plan
            assert limit >= target - tol, (h, name, limit, target)  # and follows it
        assert state["serving-1"]["powercap_kw"] == pytest.approx(0.15)  # inflexible: never capped
        used = state["batch-1"]["cpu_limit_cores"] + state["batch-2"]["cpu_limit_cores"]
        assert used <= ALLOWANCE_CC[h] + 2 * tolerance_cores(4.0)
        if h == 5:  # reconciling again within the hour changes nothing
            writes = len(agent.client.writes)
            again = agent.step()
            assert again.result == "unchanged" and len(agent.client.writes) == writes
    eco.tick_to(START + pd.Timedelta(hours=24))

    # the ecovisor's own per-tick telemetry: usage under the limits every tick, serving never limited
    ticks = eco.call("get", "/v1/ticks", token=token, params={"start": START.isoformat(),
                                                               "end": (START + pd.Timedelta(hours=24)).isoformat()})
    conts = pd.DataFrame(ticks["containers"])
    conts["hour"] = pd.to_datetime(conts["interval_start"], utc=True).dt.floor("h")
    batch = conts[conts["container"].str.startswith("batch")]
    target = batch["hour"].map(lambda t: min(ALLOWANCE_CC[int((t - START) / pd.Timedelta(hours=1))], 8.0) / 2)
    assert (batch["cpu_usage_cores"] <= target + tolerance_cores(4.0)).all()
    serving = conts[conts["container"] == "serving-1"]
    assert (serving["powercap_kw"] == 0.15).all() and (serving["cpu_usage_cores"] == 1.5).all()

    # the battery follows the day's carbon: discharge only in the 4 dirtiest hours, grid charging in the cleanest
    apps = pd.DataFrame(ticks["ticks"])
    apps["h"] = ((pd.to_datetime(apps["interval_start"], utc=True) - START) / pd.Timedelta(hours=1)).astype(int)
    by_hour = apps.groupby("h")[["battery_discharge_kw", "grid_to_battery_kw"]].sum()
    assert (by_hour.loc[[0, 1, 2, 3], "battery_discharge_kw"] > 0).all()
    assert (by_hour.drop(index=[0, 1, 2, 3])["battery_discharge_kw"] == 0).all()
    assert (by_hour.loc[[12, 13], "grid_to_battery_kw"] > 0).all()  # until the battery is full
    assert (by_hour.drop(index=[12, 13, 14, 15])["grid_to_battery_kw"] == 0).all()
    soc = apps.groupby("h")["battery_soc"].last()
    assert soc.loc[3] < soc.loc[0] and soc.loc[3] >= 0.3 - 1e-9 and soc.loc[15] > 0.99  # reserve kept, then full

    with Store(db_path, read_only=True) as store:
        actions = store.query("SELECT * FROM agent_actions ORDER BY acted_at")
        run = store.query("SELECT * FROM runs WHERE kind = 'agent'")
    assert len(actions) == 25 and actions["hour"].nunique() == 24
    assert set(actions["mode"]) == {"shaped"} and set(actions["result"]) <= {"applied", "unchanged"}
    assert actions["flexible_allowance_cores"].tolist()[:4] == [0.0] * 4
    dirty = actions["hour"] < START + pd.Timedelta(hours=4)
    assert (actions.loc[dirty, "battery_max_discharge_kw"] > 0).all()
    assert (actions.loc[~dirty, "battery_max_discharge_kw"] == 0).all()
    clean = actions["hour"].between(START + pd.Timedelta(hours=12), START + pd.Timedelta(hours=15))
    assert (actions.loc[clean, "battery_charge_kw"] > 0).all() and (actions.loc[~clean, "battery_charge_kw"] == 0).all()
    caps = json.loads(actions["caps"].iloc[-1])
    assert set(caps) == {"batch-1", "batch-2", "serving-1"} and caps["serving-1"]["flexible"] is False
    assert len(run) == 1 and run["run_id"].iloc[0] == actions["run_id"].iloc[0]


# ---------------------------------------------------------------------------------------------- faults


def test_agent_survives_two_hours_without_the_ecovisor_and_a_restart(eco, db_path):
    write_plan(db_path)
    token = eco.register()
    down_at, up_at, end = (START + pd.Timedelta(hours=h) for h in (3, 5, 6))
    stop = threading.Event()

    def on_sleep(t):  # the world between two agent passes: the ecovisor's clock, its outage
        if eco.is_up and t >= down_at and t < up_at:
            eco.tick_to(down_at)
            eco.down()
        if not eco.is_up and t >= up_at:
            eco.up()
        if eco.is_up:
            eco.tick_to(t)
        if t >= end:
            stop.set()

    clock = SimulatedClock(START, on_sleep=on_sleep)
    agent = make_agent(eco.url, token, clock, db=db_path, retry_max_s=1200.0)
    agent.run(stop=stop)

    passes = agent.passes
    failed = [p for p in passes if not p.ok]
    assert failed and all(down_at <= p.acted_at < up_at for p in failed)
    assert all(p.ok for p in passes if p.acted_at < down_at or p.acted_at >= up_at)
    assert all("ecovisor unreachable" in p.detail for p in failed)
    gaps = np.diff([p.acted_at.value for p in failed]) / 1e9
    assert list(gaps[:5]) == [5.0, 10.0, 20.0, 40.0, 80.0] and max(gaps) <= 1200.0  # back-off, capped
    assert any(p.acted_at == START + pd.Timedelta(hours=4) for p in failed)  # the hour boundary is not skipped
    back = next(p for p in passes if p.acted_at >= up_at)
    assert back.ok and back.hour == up_at and back.result == "applied"
    state = containers(eco, token)
    assert state["batch-1"]["cpu_limit_cores"] == pytest.approx(ALLOWANCE_CC[5] / 2, abs=tolerance_cores(4))

    with Store(db_path, read_only=True) as store:
        actions = store.query("SELECT * FROM agent_actions ORDER BY acted_at")
    assert len(actions) == len(passes)
    assert (actions["result"] == "failed").sum() == len(failed)

    # an agent restart mid-hour: reconcile, change nothing (the ecovisor kept the caps across its restart too)
    mid = up_at + pd.Timedelta(minutes=20)
    eco.tick_to(mid)
    again = make_agent(eco.url, token, SimulatedClock(mid), db=db_path)
    out = again.step()
    assert out.ok and out.result == "unchanged" and again.client.writes == []
    with Store(db_path, read_only=True) as store:
        assert store.query("SELECT count(*) AS n FROM agent_actions")["n"].iloc[0] == len(passes) + 1
        assert store.query("SELECT count(DISTINCT run_id) AS n FROM agent_actions")["n"].iloc[0] == 2


def test_agent_against_a_dead_port_keeps_running_and_audits(tmp_path, db_path):
    write_plan(db_path)
    dead = f"http://127.0.0.1:{free_port()}"
    slept = []
    stop = threading.Event()

    def on_sleep(t):
        slept.append(t)
        if len(slept) >= 4:
            stop.set()

    agent = make_agent(dead, "no-token", SimulatedClock(START, on_sleep=on_sleep), db=db_path)
    out = agent.run(stop=stop)
    assert not out.ok and len(agent.passes) == 4 and all(p.result == "failed" for p in agent.passes)
    assert [(b - a).total_seconds() for a, b in zip([START, *slept], slept)] == [5.0, 10.0, 20.0, 40.0]
    with Store(db_path, read_only=True) as store:
        assert store.query("SELECT count(*) AS n FROM agent_actions WHERE result = 'failed'")["n"].iloc[0] == 4


# ------------------------------------------------------------------------------------------- safe modes


def vcc_show_json(db: Path, plan_date: date) -> dict:
    from typer.testing import CliRunner

    from cicm.cli import app

    result = CliRunner().invoke(app, ["vcc", "show", "--cluster", CLUSTER, "--date", str(plan_date), "--db", str(db),
                                      "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_safe_modes_with_a_published_plan_file(eco, tmp_path, db_path):
    write_plan(db_path)
    doc = vcc_show_json(db_path, PLAN_DATE)  # the published format, as `cicm vcc show --json` prints it
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(doc))
    audit = tmp_path / "audit.jsonl"
    token = eco.register()
    t = START + pd.Timedelta(hours=1)
    eco.tick_to(t)
    clock = SimulatedClock(t)
    agent = make_agent(eco.url, token, clock, plan_file=plan_file, audit_file=audit,
                       cluster_cores_per_core=SCALE)

    out = agent.step()  # shaped: allowance 0 -> flexible at idle power
    assert out.mode == "shaped" and out.ok and out.audit_to == "jsonl"
    assert containers(eco, token)["batch-1"]["cpu_limit_cores"] < 0.05

    eco.call("put", "/v1/containers/serving-1/powercap", token=token, json={"kw": 0.08})  # someone caps serving
    out = agent.step()
    assert out.result == "applied" and any("serving-1: lifted" in c for c in out.changes)
    assert containers(eco, token)["serving-1"]["powercap_kw"] == pytest.approx(0.15)

    # the plan falls back -> lift to capacity and say why
    plan_file.write_text(json.dumps({**doc, "status": "fallback", "reason": "too-full: Theta exceeds capacity"}))
    out = agent.step()
    assert out.mode == "lift" and out.reason == "fallback-plan: too-full: Theta exceeds capacity"
    state = containers(eco, token)
    assert state["batch-1"]["powercap_kw"] == 0.30 and state["batch-2"]["cpu_limit_cores"] == 4.0

    # back to shaped, then the plan file goes stale (yesterday's plan only): lift, reason stale-plan
    plan_file.write_text(json.dumps(doc))
    agent.step()
    old = {**doc, "plan_date": "2022-06-13",
           "hours": [{**h, "hour": (pd.Timestamp(h["hour"]) - pd.Timedelta(days=1)).isoformat()} for h in doc["hours"]]}
    plan_file.write_text(json.dumps(old))
    out = agent.step()
    assert out.mode == "lift" and out.reason.startswith("stale-plan: no VCC for 2022-06-14 08:00Z")
    assert containers(eco, token)["batch-1"]["powercap_kw"] == 0.30

    # a plan issued too long before its hour is stale as well
    plan_file.write_text(json.dumps({**doc, "planned_at": "2022-06-10T01:00:00Z"}))
    out = agent.step()
    assert out.mode == "lift" and out.reason.startswith("stale-plan: issued 2022-06-10 01:00Z")

    # a broken plan file -> lift, reason plan-unreadable (naming the field)
    plan_file.write_text(json.dumps({**doc, "hours": [{"hour": "2022-06-14T07:00:00"}]}))
    out = agent.step()
    assert out.mode == "lift" and out.reason.startswith("plan-unreadable") and "hours.0.hour" in out.reason

    # configured to keep the last caps when there is no usable VCC: nothing is written
    plan_file.write_text(json.dumps(doc))
    agent.step()
    keeper = make_agent(eco.url, token, clock, plan_file=tmp_path / "missing.json", audit_file=audit,
                        cluster_cores_per_core=SCALE, on_missing_plan="keep")
    out = keeper.step()
    assert out.mode == "keep" and out.reason.startswith("plan-unreadable") and keeper.client.writes == []
    assert containers(eco, token)["batch-1"]["cpu_limit_cores"] < 0.05

    rows = read_jsonl(audit)
    assert len(rows) == 9 and len({r["acted_at"] for r in rows}) == 9  # every pass, unique keys
    assert [r["mode"] for r in rows] == ["shaped", "shaped", "lift", "shaped", "lift", "lift", "lift", "shaped", "keep"]


def test_agent_without_flexible_containers_is_a_configuration_error(eco, db_path):
    write_plan(db_path)
    token = eco.register()
    agent = make_agent(eco.url, token, SimulatedClock(START), db=db_path, flexible=["no-such"])
    with pytest.raises(AgentConfigError, match="flexible"):
        agent.run()
    with Store(db_path, read_only=True) as store:
        assert store.query("SELECT result FROM agent_actions")["result"].tolist() == ["error"]
    assert containers(eco, token)["serving-1"]["powercap_kw"] == 0.15


def test_audit_spools_to_jsonl_while_another_process_holds_the_store(eco, db_path, monkeypatch):
    import cicm.data.store

    monkeypatch.setattr(cicm.data.store, "LOCK_RETRY_SECONDS", 0.3)  # the store retries a locked file first
    write_plan(db_path)
    token = eco.register()
    clock = SimulatedClock(START)
    agent = make_agent(eco.url, token, clock, db=db_path)
    assert agent.step().audit_to == "store"  # also caches the plan

    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('locked', flush=True); "
                               "sys.stdin.read()", str(db_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        eco.tick_to(START + pd.Timedelta(hours=1))
        clock.set(START + pd.Timedelta(hours=1))
        out = agent.step()
        assert out.ok and out.mode == "shaped"  # the plan came from the agent's cache
        assert "store unreadable" in out.detail
        assert out.audit_to == "jsonl"
        spool = agent.audit.spool.path
        assert len(read_jsonl(spool)) == 1
    finally:
        holder.stdin.close()
        holder.wait(20)
    eco.tick_to(START + pd.Timedelta(hours=2))
    clock.set(START + pd.Timedelta(hours=2))
    assert agent.step().audit_to == "store"
    assert read_jsonl(spool) == []
    with Store(db_path, read_only=True) as store:
        hours = store.query("SELECT hour FROM agent_actions ORDER BY hour")["hour"]
    assert list(hours) == [START + pd.Timedelta(hours=h) for h in range(3)]


def test_the_client_matches_the_running_ecovisors_openapi(eco):
    from cicm.enforce.client import ROUTES, EcovisorClient, EcovisorError

    with EcovisorClient(eco.url, eco.register(), retries=0) as client:
        assert client.check_contract() == []
        assert len(ROUTES) >= 10
        with pytest.raises(EcovisorError) as err:
            client.set_powercap("batch-1", 99.0)
        assert err.value.status_code == 422 and err.value.field == "kw"
    with EcovisorClient(eco.url, "wrong", retries=0) as client, pytest.raises(EcovisorError) as err:
        client.me()
    assert err.value.status_code == 401


# The ecovisor modules the agent may import, each with its reason. Keep this short.
ECOVISOR_CLIENT_MODULES = {
    # the notifications' SSE client: it needs only requests and cicm.httpclient (not the server), so the agent
    # waits for the next hour on `tick` events and re-applies the storage plan on battery/solar events with the
    # same client as every other app, instead of a copy of it
    "cicm.ecovisor.subscribe": "the server-sent events client (requests + cicm.httpclient only)",
}


def _imported(path: Path) -> list[str]:
    import ast

    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


def test_enforce_never_imports_the_ecovisor():
    """The agent reaches the ecovisor over HTTP only; the one exception is its HTTP client of the event streams."""
    for path in Path(__file__).resolve().parent.parent.joinpath("cicm", "enforce").rglob("*.py"):
        names = _imported(path)
        assert not any(n.startswith("cicm.ecovisor") and n not in ECOVISOR_CLIENT_MODULES for n in names), path


def test_the_allowed_ecovisor_client_modules_need_no_server():
    """Each allowed module imports only the standard library, requests and cicm's HTTP client (so importing it
    loads no FastAPI, uvicorn or ecovisor state), and the package's __init__ imports nothing."""
    import sys

    root = Path(__file__).resolve().parent.parent
    init = _imported(root / "cicm" / "ecovisor" / "__init__.py")
    assert init == [], init
    for module in ECOVISOR_CLIENT_MODULES:
        for name in _imported(root.joinpath(*module.split(".")).with_suffix(".py")):
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names or top == "requests" or name in ("__future__", "cicm.httpclient"), \
                f"{module} imports {name}"


# ------------------------------------------------------------------------------------- hourly correction

QUEUE_PARAMS = {"program": "queue", "planning_margin_hours": 6.0, "lambda_e": 1.0, "lambda_p": 0.0,
                "solver": "HIGHS"}


def domain_model(start: pd.Timestamp) -> str:
    from cicm.models.power import PowerModel

    return json.dumps(PowerModel(breakpoints_cpu_cores=(5000.0, 20000.0, 35000.0, 50000.0),
                                 coefficients=(40.0, 0.0040, 0.0006, 0.0008), n_samples=168, r2=0.99, mape_pct=1.0,
                                 fitted_at=start, window_start=start - pd.Timedelta(days=7),
                                 window_end=start).to_dict())


def write_queue_plan(db: Path, params: dict = QUEUE_PARAMS) -> None:
    """The test day's plan as the queue program stores it: planned service as flexible_cpu_cores, with the run's
    load forecasts (inflexible 40,000 cores, upper quantile 44,000) and the two power domains' models."""
    vccs, st = plan_frames()
    st["theta_core_hours"] = np.nan
    hours = vccs["hour"]
    planned = START - pd.Timedelta(hours=13)
    with Store(db) as store, store.run("plan", params, plan_date=PLAN_DATE) as run:
        store.replace_plan(PLAN_DATE, vccs, st, run.run_id)
        store.upsert("load_forecasts", pd.DataFrame({
            "plan_date": PLAN_DATE, "cluster": CLUSTER, "hour": hours, "inflexible_cpu_cores": 40000.0,
            "inflexible_upper_cpu_cores": 44000.0, "reservation_ratio": 1.35}), run.run_id)
        store.upsert("power_models", pd.DataFrame({
            "cluster": CLUSTER, "domain": ["sj-a-pd1", "sj-a-pd2"], "fitted_at": planned, "status": "ok",
            "reason": None, "model": domain_model(planned), "r2": 0.99, "mape_pct": 1.0, "n_samples": 168}),
            run.run_id)


def write_usage(db: Path, start: pd.Timestamp, end: pd.Timestamp, arrived, served) -> None:
    hours = pd.date_range(start, end, freq="h", inclusive="left")
    with Store(db) as store, store.run("telemetry-import") as run:
        store.upsert("usage_history", pd.DataFrame({
            "cluster": CLUSTER, "hour": hours, "inflexible_cpu_cores": 40000.0, "flexible_cpu_cores": served,
            "reserved_cpu_cores": 55000.0, "flexible_arrived_core_hours": arrived}), run.run_id)


def write_backlog_history(db: Path, arrived_hours_before: int = 22) -> None:
    """Five weeks of 1,000 core-hours arriving and running every hour; then, in the 48 h before the plan day,
    30,000 core-hours arrive 22 h before it and nothing runs: a backlog due 2 h into the day."""
    write_usage(db, START - pd.Timedelta(days=35), START - pd.Timedelta(hours=48), 1000.0, 1000.0)
    arrived = np.zeros(48)
    arrived[48 - arrived_hours_before] = 30000.0
    write_usage(db, START - pd.Timedelta(hours=48), START, arrived, 0.0)


def deviations(db: Path) -> pd.DataFrame:
    with Store(db, read_only=True) as store:
        return store.query("SELECT * FROM intraday_deviations ORDER BY hour")


def test_agent_corrects_a_queue_plan_from_the_backlog_and_stores_each_deviation(eco, db_path):
    write_queue_plan(db_path)
    write_backlog_history(db_path)
    token = eco.register()
    clock = SimulatedClock(START)
    agent = make_agent(eco.url, token, clock, db=db_path)

    # hour 0: the plan holds flexible work (0 cores), but 30,000 core-hours are overdue at their planning deadline
    out = agent.step()
    assert out.ok and out.mode == "shaped" and out.plan.program == "queue"
    assert out.plan_allowance_cores == 0.0
    assert out.allowance_cores == pytest.approx(30000.0, rel=1e-6)
    assert out.deviation.reason == "deadline-release"
    assert "hourly correction deadline-release: 0 -> 30,000 cores" in out.detail
    state = containers(eco, token)
    target = 30000.0 / SCALE / 2  # split over the two flexible containers
    for name in ("batch-1", "batch-2"):
        assert state[name]["cpu_limit_cores"] == pytest.approx(target, abs=tolerance_cores(4.0))
    again = agent.step()  # reconciling within the hour: the same decision, nothing to change
    assert again.allowance_cores == out.allowance_cores and again.result == "unchanged"

    # the hour ran the backlog; hour 1: nothing queued, the plan still holds: at plan, no deviation
    write_usage(db_path, START, START + pd.Timedelta(hours=1), 0.0, 30000.0)
    for h in (1, 4):
        t = START + pd.Timedelta(hours=h)
        eco.tick_to(t)
        clock.set(t)
        if h == 4:
            write_usage(db_path, START + pd.Timedelta(hours=1), t, 0.0, 0.0)
        out = agent.step()
        assert out.ok, out.line()
        if h == 1:
            assert out.allowance_cores == 0.0 and out.deviation is None and "at plan" in out.detail
    # hour 4: the plan releases 20,480 cores, but only the hour's forecast arrivals (1,000 core-hours) are there,
    # and they are not due for 18 h: the re-plan holds them for the clean afternoon (100 gCO2/kWh)
    assert out.plan_allowance_cores == pytest.approx(2.0 * SCALE)
    assert out.deviation.reason == "deferred" and out.allowance_cores == pytest.approx(0.0, abs=1e-6)
    assert "1,000 core-hours could run now" in out.deviation.detail and "100 gCO2/kWh" in out.deviation.detail

    dev = deviations(db_path)
    assert list(dev["reason"]) == ["deadline-release", "deferred"]
    assert list(dev["hour"]) == [START, START + pd.Timedelta(hours=4)]
    assert dev["plan_cores"].tolist() == pytest.approx([0.0, 2.0 * SCALE])
    assert dev["applied_cores"].iloc[0] == pytest.approx(30000.0, rel=1e-6)
    assert {pd.Timestamp(d).date() for d in dev["plan_date"]} == {PLAN_DATE} and dev["detail"].str.len().min() > 20
    with Store(db_path, read_only=True) as store:
        actions = store.query("SELECT * FROM agent_actions ORDER BY acted_at")
    # one transaction: every deviation row is the audit row of the pass that applied it
    linked = dev.merge(actions, on=["cluster", "acted_at"], suffixes=("", "_action"))
    assert len(linked) == 2 and (linked["run_id"] == linked["run_id_action"]).all()
    assert linked["flexible_allowance_cores"].tolist() == pytest.approx(dev["applied_cores"].tolist())


def test_ceiling_plans_and_no_correction_keep_todays_behaviour(eco, db_path):
    write_plan(db_path)  # a ceiling-program plan (its run says no program: the nightly default)
    write_backlog_history(db_path)  # the same overdue backlog as above
    token = eco.register()
    agent = make_agent(eco.url, token, SimulatedClock(START), db=db_path)
    out = agent.step()
    assert out.plan.program == "ceiling" and out.correction is None and "hourly correction" not in out.detail
    assert out.allowance_cores == 0.0 and containers(eco, token)["batch-1"]["cpu_limit_cores"] < 0.05

    write_queue_plan(db_path)  # re-planned with the queue program, but the agent runs --no-correction
    off = make_agent(eco.url, token, SimulatedClock(START + pd.Timedelta(minutes=5)), db=db_path, correction=False)
    assert off.backlog is None
    out = off.step()
    assert out.plan.program == "queue" and out.correction is None and out.allowance_cores == 0.0
    assert deviations(db_path).empty


def test_a_stale_backlog_or_a_missing_power_model_applies_the_plan(eco, db_path):
    write_queue_plan(db_path)
    write_backlog_history(db_path)
    token = eco.register()
    t = START + pd.Timedelta(hours=3)  # the usage history ends at START: 3 h old
    eco.tick_to(t)
    out = make_agent(eco.url, token, SimulatedClock(t), db=db_path).step()
    assert out.ok and out.allowance_cores == 0.0 and out.correction is None
    assert "no hourly correction: the backlog" in out.detail and "3 h before this hour (limit 2 h)" in out.detail
    with Store(db_path) as store, store.transaction():
        store.con.execute("DELETE FROM power_models")
    out = make_agent(eco.url, token, SimulatedClock(START), db=db_path).step()
    assert out.correction is None and "no hourly correction: no power curve: sj-a-pd1" in out.detail
    assert deviations(db_path).empty


def test_deviations_in_the_jsonl_audit_and_through_the_spool(eco, db_path, tmp_path):
    from cicm.enforce.agent import Agent, AgentConfig
    from cicm.enforce.audit import JsonlAudit, StoreAudit, read_deviations
    from cicm.enforce.backlog import StoreBacklogSource
    from cicm.enforce.client import EcovisorClient
    from cicm.enforce.plans import StorePlanSource
    from cicm.config import load_fleet

    write_queue_plan(db_path)
    write_backlog_history(db_path)
    token = eco.register()
    audit_path = tmp_path / "audit.jsonl"
    agent = Agent(AgentConfig(cluster=CLUSTER, capacity_cores=CAPACITY), EcovisorClient(eco.url, token, retries=0),
                  StorePlanSource(db_path, CLUSTER, load_fleet().cluster(CLUSTER)), JsonlAudit(audit_path, "agent-x"),
                  SimulatedClock(START), backlog=StoreBacklogSource(db_path, CLUSTER))
    out = agent.step()
    assert out.audit_to == "jsonl" and out.deviation.reason == "deadline-release"
    row = read_jsonl(audit_path)[-1]
    assert row["deviation"]["reason"] == "deadline-release"
    assert row["deviation"]["applied_cores"] == pytest.approx(30000.0, rel=1e-6)
    from_file = read_deviations(None, audit_path, CLUSTER)
    assert list(from_file["reason"]) == ["deadline-release"] and from_file["source"].tolist() == ["jsonl"]
    assert deviations(db_path).empty  # a JSONL audit writes nothing into the store

    # the same row spooled while the store was locked lands in intraday_deviations when the spool drains
    spool = tmp_path / "spool.jsonl"
    spool.write_text(audit_path.read_text())
    store_audit = StoreAudit(db_path, spool, "agent-y")
    later = {**{k: row[k] for k in ("cluster", "plan_date", "mode", "reason", "vcc_cores", "caps", "detail")},
             "acted_at": pd.Timestamp(row["acted_at"]) + pd.Timedelta(hours=1), "hour": START + pd.Timedelta(hours=1),
             "flexible_allowance_cores": 0.0, "result": "unchanged", "deviation": None}
    assert store_audit.write(later) == "store" and read_jsonl(spool) == []
    dev = deviations(db_path)
    assert list(dev["hour"]) == [START] and dev["run_id"].iloc[0] == "agent-x"
    agent.client.close()

    from typer.testing import CliRunner

    from cicm.enforce.cli import agent_app

    result = CliRunner().invoke(agent_app, ["deviations", "--cluster", CLUSTER, "--db", str(db_path),
                                            "--audit-file", str(audit_path), "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert [(d["reason"], d["source"]) for d in listed] == [("deadline-release", "store"),
                                                             ("deadline-release", "jsonl")]


def test_the_correction_plans_with_the_newest_carbon_forecast(eco, db_path):
    """The backlog arrived 16 h before the day: due at 08:00 local, planned by the end of hour 1. With the plan's
    carbon (450 then 440 gCO2/kWh) it runs in hour 1; a vintage issued since says hour 0 is the clean one."""
    write_queue_plan(db_path)
    write_backlog_history(db_path, arrived_hours_before=16)
    token = eco.register()
    out = make_agent(eco.url, token, SimulatedClock(START), db=db_path).step()
    assert out.allowance_cores == 0.0 and out.deviation is None and "carbon: newest" not in out.detail
    with Store(db_path) as store, store.run("carbon-forecast") as run:
        store.write_carbon_forecast(pd.DataFrame({
            "provider": "trace", "zone": "CISO", "target_hour": pd.date_range(START, periods=24, freq="h"),
            "issued_at": START - pd.Timedelta(hours=1), "gco2_per_kwh": [120.0, 500.0] + [300.0] * 22}), run.run_id)
    out = make_agent(eco.url, token, SimulatedClock(START + pd.Timedelta(minutes=1)), db=db_path).step()
    assert out.deviation.reason == "deadline-release" and out.allowance_cores == pytest.approx(30000.0, rel=1e-6)
    assert "carbon: newest forecast for 24 of 24 hours" in out.detail
