"""Issue 16's dashboard, as an operator sees it: a real dashboard server (its own process, a free loopback port)
on a store planned with a battery and solar, opened in Debian's chromium. The cluster page of a campus with
storage draws the storage plan, the same numbers as the store's `storage_plans`, next to what the agent applied
on the battery; a campus without storage draws no storage chart."""
from __future__ import annotations

import pandas as pd
import pytest

from cicm.planning.pipeline import PlanOptions, plan_day
from cicm.store import Store
from tests.test_dashboard import _open, _plot, browser, dashboard_server, page  # noqa: F401 (fixtures)
from tests.test_plan_storage import DAY, demo_store, fleet_with_storage  # noqa: F401 (fixture)

APPLIED_CHARGE_KW = 12.5


@pytest.fixture(scope="module")
def planned(demo_store, tmp_path_factory):  # noqa: F811
    """A copy of the demo store planned for DAY with ca-sj's battery and solar, and one agent pass that applied
    a clipped charge rate in the plan's 4th hour; returns (fleet file, store, planned storage rows)."""
    tmp = tmp_path_factory.mktemp("storage-browser")
    fleet = fleet_with_storage(tmp)
    db = tmp / "copy.duckdb"
    db.write_bytes(demo_store.read_bytes())
    with Store(db) as store:
        plan_day(store, fleet, DAY, PlanOptions())
        rows = store.query("SELECT hour, charge_kw, discharge_kw FROM storage_plans"
                           " ORDER BY hour")
        hour = pd.Timestamp(rows["hour"].iloc[3]).tz_convert("UTC")
        with store.run("agent") as run:
            store.upsert("agent_actions", pd.DataFrame([{
                "cluster": "sj-a", "acted_at": hour + pd.Timedelta(minutes=1), "hour": hour, "plan_date": DAY,
                "mode": "shaped", "reason": None, "vcc_cores": 1.0, "flexible_allowance_cores": 1.0, "caps": "{}",
                "battery_charge_kw": APPLIED_CHARGE_KW, "battery_max_discharge_kw": 0.0, "result": "applied",
                "detail": "storage plan: charge clipped to the state of charge"}]), run.run_id)
    return tmp / "fleet.toml", db, rows


@pytest.fixture(scope="module")
def dashboard(planned, tmp_path_factory):
    fleet_path, db, _ = planned
    with dashboard_server(db, tmp_path_factory.mktemp("storage-dashboard") / "server.log", fleet_path) as base:
        yield base


def test_the_cluster_page_draws_the_stored_storage_plan_and_the_applied_rate(planned, dashboard, page):  # noqa: F811
    _, _, rows = planned
    assert len(rows) == 24 and (rows["charge_kw"] > 0).any(), "the plan should use the battery on this day"
    _open(page, f"{dashboard}/cluster?cluster=sj-a&date={DAY}", "#storage-chart")
    traces = {t["name"]: t for t in _plot(page, "storage-chart")["traces"]}
    assert traces["planned charge (kW)"]["y"] == pytest.approx(rows["charge_kw"].tolist(), rel=1e-9, abs=1e-9)
    assert traces["planned discharge (kW)"]["y"] == pytest.approx((-rows["discharge_kw"]).tolist(), rel=1e-9,
                                                                  abs=1e-9)
    applied = traces["applied charge rate (kW)"]["y"]
    assert applied[3] == pytest.approx(APPLIED_CHARGE_KW)
    assert all(v is None for i, v in enumerate(applied) if i != 3), "only the audited hour has an applied rate"


def test_a_campus_without_storage_has_no_storage_chart(dashboard, page):  # noqa: F811
    _open(page, f"{dashboard}/cluster?cluster=dl-a&date={DAY}", "#day-chart")
    assert page.query_selector("#storage-chart") is None
