"""The agent applies the campus's storage plan through a REAL ecovisor's battery APIs (FastAPI + uvicorn on
loopback, simulated clock) from a REAL store holding the plan (issue 16, item 3), and listens to its events.

The ecovisor is imported solely to serve it (and to read how many event streams it holds).
"""
from __future__ import annotations

import math
import threading
from datetime import date
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from cicm.data.store import Store
from cicm.ecovisor.testing import free_port
from cicm.enforce.clock import EcovisorClock, SimulatedClock
from cicm.enforce.cli import build_agent
from cicm.enforce.events import EcovisorEvents
from cicm.enforce.policy import storage_decision

ADMIN = "test-admin-token"
START = pd.Timestamp("2022-06-14T07:00:00Z")  # local midnight PDT
PLAN_DATE = date(2022, 6, 14)
CLUSTER, CAMPUS = "sj-a", "ca-sj"
CAPACITY_KWH, RESERVE, ETA = 20.0, 0.3, 0.9
TICK_S = 900
LOAD = 0.45  # kW: the app's containers (batch-1 at 4 cores 0.3 kW, serving-1 at 1.5 cores 0.125 kW, ...)


def site(tmp_path: Path, solar_points: list[tuple[pd.Timestamp, float]], initial_soc: float = 0.5) -> dict:
    csv = tmp_path / "solar.csv"
    pd.DataFrame({"timestamp": [t.isoformat() for t, _ in solar_points],
                  "power_kw": [kw for _, kw in solar_points]}).to_csv(csv, index=False)
    return {
        "name": "storage-site", "tick_seconds": TICK_S, "sim_start": START.isoformat(),
        "location": {"latitude": 37.39, "longitude": -122.08, "timezone": "America/Los_Angeles"},
        "grid": {"capacity_kw": 20.0, "carbon": {"source": "eia", "zone": "CISO"}},
        "battery": {"capacity_kwh": CAPACITY_KWH, "reserve_soc": RESERVE, "initial_soc": initial_soc,
                    "max_charge_c": 0.5, "max_discharge_c": 1.0, "round_trip_efficiency": ETA},
        "solar": {"source": "csv", "path": str(csv), "array_kwp": 4.0},
        "backend": {"kind": "simulated"},
        "containers": [
            {"name": "batch-1", "cores": 4, "sim_demand_cores": 4.0,
             "power": {"kind": "linear", "idle_kw": 0.10, "max_kw": 0.30}},
            {"name": "serving-1", "cores": 2, "sim_demand_cores": 1.5,
             "power": {"kind": "linear", "idle_kw": 0.05, "max_kw": 0.15}},
        ],
    }


class Ecovisor:
    def __init__(self, tmp_path: Path, spec: dict):
        from cicm.ecovisor.site import parse_site
        from cicm.ecovisor.testing import ServerThread, simulated_app

        self.site = parse_site(spec, tmp_path)
        self.port = free_port()
        self.server = ServerThread(simulated_app(self.site, tmp_path / "eco.duckdb", admin_token=ADMIN),
                                   port=self.port).__enter__()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def close(self):
        self.server.__exit__(None, None, None)
        self.http.close()

    def call(self, method: str, path: str, token: str = ADMIN, **kw):
        r = self.http.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kw)
        r.raise_for_status()
        return r.json() if r.content else None

    def register(self) -> str:
        return self.call("post", "/v1/apps", json={
            "name": CLUSTER, "grid_kw": 10.0, "solar_fraction": 1.0, "battery_fraction": 1.0,
            "containers": ["batch-1", "serving-1"]})["token"]

    def now(self) -> pd.Timestamp:
        return pd.Timestamp(self.call("get", "/v1/clock")["now"])

    def tick_to(self, t: pd.Timestamp) -> None:
        n = math.ceil((t - self.now()).total_seconds() / TICK_S - 1e-9)
        while n > 0:
            self.call("post", "/v1/tick", json={"n": min(n, 48)})
            n -= 48

    def streams(self) -> int:
        return self.server.app.state.events.open_streams(CLUSTER)


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "cicm.duckdb"


def write_plan(db: Path, storage: pd.DataFrame | None, start=START, plan_date=PLAN_DATE) -> str:
    """A shaped plan in force for the cluster-day (flexible allowance: everything) and, unless None, the campus's
    storage plan of the same run."""
    hours = pd.date_range(start, periods=24, freq="h", name="hour")
    vccs = pd.DataFrame({
        "plan_date": plan_date, "cluster": CLUSTER, "hour": hours, "hour_index": np.arange(24),
        "vcc_cores": 200000.0, "flexible_cpu_cores": 60000.0, "inflexible_cpu_cores": 40000.0,
        "power_kw": 150.0, "carbon_kgco2": 40.0, "gco2_per_kwh": [450.0, 440.0, 430.0, 420.0, 400.0, 400.0] + [200.0] * 12 + [300.0] * 6,
    })
    st = pd.DataFrame([{
        "plan_date": plan_date, "cluster": CLUSTER, "campus": CAMPUS, "status": "shaped", "reason": None,
        "capacity_cores": 102400.0, "theta_core_hours": 2.5e6, "tau_core_hours": 1.0e6,
        "expected_kgco2": 900.0, "flat_kgco2": 950.0, "saving_pct": 5.0, "peak_kw": 190.0,
    }])
    with Store(db) as store, store.run("plan", {"test": True}, plan_date=plan_date) as run:
        store.replace_plan(plan_date, vccs, st, run.run_id)
        if storage is not None:
            store.upsert("storage_plans", storage.assign(plan_date=plan_date, campus=CAMPUS, hour=hours,
                                                         hour_index=np.arange(24)), run.run_id)
        return run.run_id


def storage_frame(charge, discharge, solar, load=LOAD, initial=0.5 * CAPACITY_KWH) -> pd.DataFrame:
    """A storage plan's 24 hours in the app's kW, its energy path by the plan's recursion (sqrt(eta) per leg)."""
    charge, discharge, solar = (np.asarray(v, dtype=float) for v in (charge, discharge, solar))
    leg = math.sqrt(ETA)
    energy = initial + np.cumsum(leg * charge - discharge / leg)
    used = solar.copy()
    grid = np.maximum(load + charge - used - discharge, 0.0)
    return pd.DataFrame({"load_kw": load, "solar_kw": solar, "solar_used_kw": used, "curtailed_kw": 0.0,
                         "charge_kw": charge, "discharge_kw": discharge, "energy_kwh": energy, "grid_kw": grid,
                         "status": "optimal"})


def make_agent(url: str, token: str, clock, db: Path, **overrides):
    options = dict(cluster=CLUSTER, ecovisor=url, token=token, db=db, plan_file=None, audit_file=None, fleet=None,
                   flexible=[], flexible_pattern="batch-*", cluster_cores_per_core=None, on_missing_plan="lift",
                   max_plan_age_hours=None, battery=True, battery_hours=4, retry_base_s=5.0, retry_max_s=300.0,
                   reconcile_every_s=3600.0, request_retries=0, clock=clock, correction=False)
    options.update(overrides)
    return build_agent(**options)


def actions(db: Path) -> pd.DataFrame:
    from cicm.store import agent as agent_store

    with Store(db, read_only=True) as store:
        return agent_store.recent_actions(store, CLUSTER, limit=10000).sort_values("acted_at").reset_index(drop=True)


def commands(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The plan's setpoints per hour (as cicm.backtest.storage.commands): grid charge beyond the solar surplus."""
    surplus = np.maximum(frame["solar_used_kw"] - frame["load_kw"], 0.0)
    return np.maximum(frame["charge_kw"] - surplus, 0.0).to_numpy(), frame["discharge_kw"].to_numpy()


# ------------------------------------------------------------------------------------------------ pure


BATTERY = {"capacity_kwh": 20.0, "charge_level_kwh": 10.0, "soc": 0.5, "reserve_soc": 0.3, "max_charge_kw": 10.0,
           "max_discharge_kw": 20.0, "round_trip_efficiency": 0.9}


def row(**kw) -> pd.Series:
    base = {"load_kw": 1.0, "solar_kw": 0.0, "solar_used_kw": 0.0, "charge_kw": 0.0, "discharge_kw": 0.0,
            "energy_kwh": 10.0, "energy_before_kwh": 10.0}
    return pd.Series({**base, **kw})


def test_the_plans_hour_applies_as_it_is_where_the_soc_allows():
    d = storage_decision(row(charge_kw=4.0), BATTERY, 0.0)
    assert (d.mode, d.charge_kw, d.max_discharge_kw, d.source) == ("charge", 4.0, 0.0, "plan")
    assert "within the SoC limits" in d.why and d.audit["clips"] == []
    d = storage_decision(row(discharge_kw=3.0), BATTERY, 0.0)
    assert (d.mode, d.charge_kw, d.max_discharge_kw) == ("discharge", 0.0, 3.0)
    # the planned solar surplus charges by itself: only the rest is grid charge
    d = storage_decision(row(solar_kw=3.0, solar_used_kw=3.0, charge_kw=4.0), BATTERY, 3.0)
    assert d.charge_kw == pytest.approx(2.0)
    # scaled: the app's battery is a tenth of the campus's
    d = storage_decision(row(charge_kw=40.0, load_kw=10.0), BATTERY, 0.0, scale=0.1)
    assert d.charge_kw == pytest.approx(4.0) and "x0.1 of the campus's" in d.why


def test_a_battery_near_full_or_near_its_reserve_is_clipped_with_the_reason():
    full = {**BATTERY, "charge_level_kwh": 19.1, "soc": 0.955}
    d = storage_decision(row(charge_kw=4.0), full, 0.0)
    assert d.charge_kw == pytest.approx((20.0 - 19.1) / 0.9)
    assert "CLIPPED grid charge 4 -> 1" in d.why and "SoC 0.955 read back" in d.why and "/ eta 0.90" in d.why
    # the solar surplus takes the room first
    d = storage_decision(row(solar_kw=2.0, solar_used_kw=2.0, charge_kw=2.0), full, 2.0)
    assert d.charge_kw == 0.0
    low = {**BATTERY, "charge_level_kwh": 7.0, "soc": 0.35}
    d = storage_decision(row(discharge_kw=3.0), low, 0.0)
    assert d.max_discharge_kw == pytest.approx(1.0) and "above the reserve" in d.why
    # C-rate and grid share
    d = storage_decision(row(charge_kw=12.0), {**BATTERY, "charge_level_kwh": 6.0}, 0.0, grid_share_kw=5.0)
    assert d.charge_kw == pytest.approx(5.0) and "C-rate" in d.why and "grid share" in d.why


def test_actual_solar_moves_the_settings():
    plan = row(load_kw=1.0, solar_kw=3.0, solar_used_kw=3.0, charge_kw=4.0)  # 2 kW from solar, 2 from the grid
    assert storage_decision(plan, BATTERY, 3.0).charge_kw == pytest.approx(2.0)
    # less sun: the solar charge falls first (not made up from the grid) ...
    less = storage_decision(plan, BATTERY, 1.5)
    assert less.charge_kw == pytest.approx(2.0) and "not made up from the grid" in less.why
    # ... then load the sun no longer serves is taken off the grid charge
    dark = storage_decision(plan, BATTERY, 0.4)
    assert dark.charge_kw == pytest.approx(2.0 - 0.6)
    # more sun: its extra surplus replaces grid charge
    assert storage_decision(plan, BATTERY, 4.5).charge_kw == pytest.approx(0.5)
    # a discharging hour: the battery covers the missing sun
    dis = storage_decision(row(load_kw=2.0, solar_kw=1.0, solar_used_kw=1.0, discharge_kw=1.0), BATTERY, 0.25)
    assert dis.max_discharge_kw == pytest.approx(1.75) and "max discharge raised by 0.75" in dis.why
    # a holding hour: no discharge the plan did not want
    hold = storage_decision(row(load_kw=2.0, solar_kw=1.0, solar_used_kw=1.0), BATTERY, 0.25)
    assert hold.mode == "hold" and "the rest comes from the grid" in hold.why


# ------------------------------------------------------------------------------------------- a ticked day


def test_a_ticked_day_on_the_storage_plan(tmp_path, db_path):
    """Each hour the agent sets the plan's charge and max discharge where the state of charge read back allows,
    clips the charge of a battery near full (audited with the reason), and the energy stays in
    [reserve, capacity] in every tick."""
    charge, discharge, load = [0.0] * 24, [0.0] * 24, [LOAD] * 24
    for h in range(0, 4):  # the dirty night: the plan expects 0.9 kW of load and discharges it all; the app's
        discharge[h] = load[h] = 0.9  # load takes ~0.4 kW of it, so the battery ends the night fuller than planned
    for h in range(8, 12):
        charge[h] = 3.5  # clean morning: the plan fills the battery to 19.5 kWh; fuller than planned, it is clipped
    for h in range(18, 22):
        discharge[h] = load[h] = 1.0
    frame = storage_frame(charge, discharge, [0.0] * 24, load=np.array(load))
    assert frame["energy_kwh"].between(RESERVE * CAPACITY_KWH, CAPACITY_KWH).all()  # a plan the battery can do
    run_id = write_plan(db_path, frame)
    eco = Ecovisor(tmp_path, site(tmp_path, [(START, 0.0), (START + pd.Timedelta(days=2), 0.0)]))
    try:
        token = eco.register()
        clock = SimulatedClock(START)
        agent = make_agent(eco.url, token, clock, db_path)
        plan_charge, plan_md = commands(frame)
        for h in range(24):
            t = START + pd.Timedelta(hours=h)
            eco.tick_to(t)
            clock.set(t)
            out = agent.step()
            assert out.ok, out.line()
            b = out.battery
            assert b is not None and b.source == "plan", out.detail
            assert f"run {run_id}" in b.why and f"campus {CAMPUS}" in b.why
            held = eco.call("get", "/v1/battery", token=token)
            assert held["charge_rate_kw"] == pytest.approx(b.charge_kw)
            assert held["max_discharge_setting_kw"] == pytest.approx(b.max_discharge_kw)
            e, cap, res = b.audit["energy_kwh"], CAPACITY_KWH, RESERVE * CAPACITY_KWH
            # never asks for more than the state of charge read back allows over the hour
            assert b.charge_kw * ETA <= cap - e + 1e-6 and b.max_discharge_kw <= e - res + 1e-6
            if b.audit["clips"]:
                assert "CLIPPED" in b.why and "read back" in b.why
                assert b.charge_kw < plan_charge[h] or b.max_discharge_kw < plan_md[h]
            else:
                assert b.charge_kw == pytest.approx(plan_charge[h]) and b.max_discharge_kw == pytest.approx(plan_md[h])
        eco.tick_to(START + pd.Timedelta(hours=24))
        clipped = [p.hour for p in agent.passes if p.battery.audit["clips"]]
        assert clipped == [START + pd.Timedelta(hours=11)]  # near full in the last charging hour; elsewhere the plan
        ticks = eco.call("get", "/v1/ticks", token=token, params={
            "start": START.isoformat(), "end": (START + pd.Timedelta(hours=24)).isoformat(), "limit": 1000})
        soc = pd.DataFrame(ticks["ticks"])["battery_soc"]
        assert len(soc) == 96 and soc.min() >= RESERVE - 1e-9 and soc.max() <= 1.0 + 1e-9
        assert soc.max() > 0.99  # it was filled ...
        got = actions(db_path)
        assert len(got) == 24 and list(got["battery_charge_kw"]) == pytest.approx([p.battery.charge_kw for p in agent.passes])
        assert list(got["battery_max_discharge_kw"]) == pytest.approx([p.battery.max_discharge_kw for p in agent.passes])
        h11 = got.loc[got["hour"] == START + pd.Timedelta(hours=11), "detail"].iloc[0]
        assert "CLIPPED grid charge 3.5 ->" in h11 and "read back" in h11 and "storage plan of campus ca-sj" in h11
    finally:
        eco.close()


def test_without_a_storage_plan_the_heuristic_applies_and_says_so(tmp_path, db_path):
    write_plan(db_path, None)
    eco = Ecovisor(tmp_path, site(tmp_path, [(START, 0.0), (START + pd.Timedelta(days=2), 0.0)]))
    try:
        token = eco.register()
        clock = SimulatedClock(START)
        agent = make_agent(eco.url, token, clock, db_path)
        out = agent.step()
        assert out.ok and out.battery is not None and out.battery.source == "heuristic"
        assert out.battery.mode == "discharge"  # the day's dirtiest hours
        detail = actions(db_path)["detail"].iloc[-1]
        assert f"no storage plan in force for campus {CAMPUS} at 07:00Z: heuristic: one of the" in detail
    finally:
        eco.close()


def test_only_the_storage_plan_of_the_run_in_force_counts(tmp_path, db_path):
    """A re-plan of the day without storage (say the battery was taken out of the fleet file) makes the earlier
    run's storage plan history: the battery falls back to the heuristic."""
    from cicm.store import agent as agent_store

    first = write_plan(db_path, storage_frame([0.0] * 24, [0.5] * 24, [0.0] * 24))
    with Store(db_path, read_only=True) as store:
        rows = agent_store.storage_plan_in_force(store, CLUSTER, PLAN_DATE)
    assert len(rows) == 24 and set(rows["run_id"]) == {first} and pd.isna(rows["energy_before_kwh"].iloc[0])
    assert rows["energy_before_kwh"].iloc[1:].tolist() == pytest.approx(rows["energy_kwh"].iloc[:-1].tolist())
    write_plan(db_path, None)
    with Store(db_path, read_only=True) as store:
        assert agent_store.storage_plan_in_force(store, CLUSTER, PLAN_DATE).empty
    eco = Ecovisor(tmp_path, site(tmp_path, [(START, 0.0), (START + pd.Timedelta(days=2), 0.0)]))
    try:
        agent = make_agent(eco.url, eco.register(), SimulatedClock(START), db_path)
        out = agent.step()
        assert out.ok and out.battery is not None and out.battery.source == "heuristic", out.detail
    finally:
        eco.close()


# -------------------------------------------------------------------------------------------- events


def test_events_wait_for_the_hour_and_re_apply_the_storage_plan_within_it(tmp_path, db_path):
    """The agent runs its loop on the ecovisor's clock with its event stream: it waits for each hour on the tick
    events (no /v1/clock polling). A cloud at 09:30 (solar 3.0 -> 0.2 kW, below the plan's 3.0) fires
    solar_change: an early pass cuts the grid charge within the hour. The sun back at 11:05 fills the battery
    early: battery_full fires, and an early pass re-reads the state (full: no grid charge). Each early pass is audited with its event."""
    h9, h11 = START + pd.Timedelta(hours=2), START + pd.Timedelta(hours=4)
    minute = pd.Timedelta(minutes=1)
    solar = [(START, 0.0), (h9 - minute, 0.0), (h9, 3.0), (h9 + 29 * minute, 3.0), (h9 + 30 * minute, 0.2),
             (h11 + 4 * minute, 0.2), (h11 + 5 * minute, 4.0), (START + pd.Timedelta(days=2), 4.0)]
    charge, sun = [0.0] * 24, [0.0] * 24
    charge[2], sun[2] = 4.0, 3.0  # 09:00Z: 2.55 kW of it from the solar surplus, 1.45 from the grid
    charge[3], charge[4] = 6.0, 0.5  # 10:00Z and 11:00Z: from the grid (the plan expects no sun), to 19.96 kWh
    frame = storage_frame(charge, [0.0] * 24, sun)
    assert frame["energy_kwh"].between(RESERVE * CAPACITY_KWH, CAPACITY_KWH).all()
    write_plan(db_path, frame)
    eco = Ecovisor(tmp_path, site(tmp_path, solar))
    try:
        token = eco.register()
        agent = make_agent(eco.url, token, None, db_path)
        stream = EcovisorEvents(eco.url, token, idle_s=5.0)
        stop = threading.Event()
        clock = agent.clock = EcovisorClock(agent.client, stop=stop, events=stream)
        waiting = threading.Event()
        wait_for = clock.wait_for

        def watched(t, since=None):  # the test knows when the agent is idle
            waiting.set()
            try:
                return wait_for(t, since)
            finally:
                waiting.clear()

        clock.wait_for = watched  # type: ignore[method-assign]
        stream.start()
        until(lambda: eco.streams() >= 1, lambda: stream.problem)
        worker = threading.Thread(target=agent.run, kwargs={"stop": stop}, daemon=True)
        worker.start()
        for _ in range(4 * 6):  # 6 hours of 15-minute ticks, one at a time; the agent idle before each
            until(lambda: idle(waiting, stream), lambda: [p.line() for p in agent.passes])
            seen = stream.received
            eco.call("post", "/v1/tick", json={"n": 1})
            until(lambda: stream.received > seen, lambda: stream.problem)
        until(lambda: idle(waiting, stream), lambda: [p.line() for p in agent.passes])
        stop.set()
        stream.close()
        worker.join(timeout=10)
        passes = list(agent.passes)
        lines = [p.line() for p in passes]
        hourly = [p for p in passes if not p.trigger]
        early = [p for p in passes if p.trigger]
        assert [p.hour for p in hourly] == [START + pd.Timedelta(hours=h) for h in range(7)], lines
        assert clock.polls == 0  # the hours came from the tick events
        assert all(p.ok and p.battery is not None and p.battery.source == "plan" for p in passes), lines
        # the cloud: an early pass in hour 9 on solar_change cuts the grid charge by the load the sun left
        first9 = next(p for p in hourly if p.hour == h9)
        assert first9.battery.charge_kw == pytest.approx(4.0 - (3.0 - LOAD))  # the plan's grid charge
        cloud = [p for p in early if p.hour == h9 and "solar 0.2 kW" in p.battery.why]
        assert len(cloud) == 1 and any(t.startswith("solar_change") for t in cloud[0].trigger), lines
        assert cloud[0].battery.charge_kw == pytest.approx(first9.battery.charge_kw - (LOAD - 0.2))
        assert cloud[0].result == "applied"
        # the sun back in hour 11: solar_change cuts the planned grid charge (the sun's surplus replaces it) ...
        sunny = [p for p in early if p.hour == h11 and any(t.startswith("solar_change") for t in p.trigger)]
        assert sunny and sunny[0].battery.charge_kw == 0.0 and "grid charge cut by 0.5" in sunny[0].battery.why
        assert sunny[0].result == "applied" and sunny[0].acted_at < h11 + pd.Timedelta(minutes=30), lines
        # ... and fills the battery before the hour ends: battery_full, one early pass reading it full
        full = [p for p in early if any(t.startswith("battery_full") for t in p.trigger)]
        assert len(full) == 1 and full[0].hour == h11, lines
        assert full[0].battery.charge_kw == 0.0 and full[0].battery.audit["soc"] > 1 - 1e-6
        assert "SoC 1.000" in full[0].battery.why
        # at most one pass per event, and every early pass is audited with its events
        ids = [t for p in early for t in p.trigger]
        assert len(ids) == len(set(ids))
        got = actions(db_path)
        assert len(got) == len(passes)
        assert got["detail"].str.startswith("early re-application on ").sum() == len(early)
        assert got["detail"].str.contains("early re-application on battery_full", regex=False).sum() == 1
        ticks = eco.call("get", "/v1/ticks", token=token, params={
            "start": START.isoformat(), "end": (START + pd.Timedelta(hours=6)).isoformat(), "limit": 1000})
        soc = pd.DataFrame(ticks["ticks"])["battery_soc"]
        assert soc.min() >= RESERVE - 1e-9 and soc.max() <= 1.0 + 1e-9
    finally:
        eco.close()


@pytest.mark.parametrize("with_storage", [True, False])
def test_battery_and_solar_events_trigger_a_pass_only_on_a_storage_plan(tmp_path, db_path, with_storage):
    """A scripted event stream (solar_change, then the tick that ends the hour): on a storage plan one early pass
    re-applies the hour; under the heuristic the event ends no wait, and the next pass is the hour's."""
    from cicm.ecovisor.subscribe import Event

    write_plan(db_path, storage_frame([0.0] * 24, [0.5] * 24, [0.0] * 24) if with_storage else None)
    eco = Ecovisor(tmp_path, site(tmp_path, [(START, 0.0), (START + pd.Timedelta(days=2), 0.0)]))
    script = [Event("solar_change", "1-0", {"time": "2022-06-14T07:15:00+00:00", "solar_kw": 1.0, "previous_kw": 0}),
              Event("tick", "1-1", {"time": "2022-06-14T07:15:00+00:00"}),
              Event("tick", "4-0", {"time": "2022-06-14T08:00:00+00:00"})]
    try:
        agent = make_agent(eco.url, eco.register(), None, db_path)
        stream = EcovisorEvents(eco.url, "unused", subscribe_fn=lambda *a, **k: iter(script))
        clock = agent.clock = EcovisorClock(agent.client, events=stream.start())
        passes = 3 if with_storage else 2
        agent.run(max_passes=passes)
        triggers = [p.trigger for p in agent.passes]
        assert triggers == ([[], ["solar_change 1-0"], []] if with_storage else [[], []])
        assert clock.polls == 0 or not with_storage  # the stream ended after the script: the clock may poll then
    finally:
        eco.close()


def until(condition, why, seconds: float = 20.0) -> None:
    deadline = pd.Timestamp.now() + pd.Timedelta(seconds=seconds)
    while not condition():
        assert pd.Timestamp.now() < deadline, why()
        threading.Event().wait(0.01)


def idle(waiting: threading.Event, stream: EcovisorEvents) -> bool:
    """The agent waits for events and has taken every event received (twice, 50 ms apart)."""
    for _ in range(2):
        if not (waiting.is_set() and stream.pending() == 0):
            return False
        threading.Event().wait(0.05)
    return True
