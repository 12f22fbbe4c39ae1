"""Battery and solar in the nightly plan (issue 16, item 1 wired into the plan): a campus whose fleet file gives
them gets a day-ahead storage plan next to its VCCs, stored per hour; the others are planned as before."""
from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest

from cicm.config import load_fleet
from cicm.errors import InputError
from cicm.planning.ingest import import_demo_telemetry
from cicm.planning.pipeline import PlanOptions, plan_day
from cicm.store import Store

DAY = date(2022, 6, 15)
STORAGE = """  [campuses.battery]
  capacity_kwh = 400.0
  max_charge_kw = 200.0
  max_discharge_kw = 200.0
  round_trip_efficiency = 0.85
  reserve_soc = 0.1
  initial_soc = 0.5
  [campuses.solar]
  latitude = 37.34
  longitude = -121.89
  kwp = 300.0
{cloud}
  [[campuses.clusters]]"""


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("storage") / "cicm.duckdb"
    with Store(path) as store:
        import_demo_telemetry(store, load_fleet())
    return path


def fleet_with_storage(tmp_path, cloud: str = ""):
    text = load_fleet.__globals__["default_fleet_path"]().read_text()
    path = tmp_path / "fleet.toml"
    path.write_text(text.replace("  [[campuses.clusters]]", STORAGE.format(cloud=cloud), 1))  # the first: ca-sj
    return load_fleet(path)


def plan(demo_store, tmp_path, fleet):
    copy = tmp_path / "copy.duckdb"
    copy.write_bytes(demo_store.read_bytes())
    with Store(copy) as store:
        outcome = plan_day(store, fleet, DAY, PlanOptions())
        rows = store.query("SELECT * FROM storage_plans ORDER BY campus, hour")
        status = store.query("SELECT cluster, campus, status FROM current_vcc_status")
    return outcome, rows, status


def test_a_campus_with_battery_and_solar_gets_a_storage_plan(demo_store, tmp_path):
    fleet = fleet_with_storage(tmp_path)
    outcome, rows, status = plan(demo_store, tmp_path, fleet)
    assert set(rows["campus"]) == {"ca-sj"} and len(rows) == 24 and (rows["status"] == "optimal").all()
    b = fleet.campuses[0].battery
    leg = np.sqrt(b.round_trip_efficiency)
    energy = rows["energy_kwh"].to_numpy()
    charge, discharge = rows["charge_kw"].to_numpy(), rows["discharge_kw"].to_numpy()
    # the state of charge stays within the reserve and the capacity
    assert energy.min() >= b.reserve_soc * b.capacity_kwh - 1e-6 and energy.max() <= b.capacity_kwh + 1e-6
    # never charge and discharge in the same hour; the rates within the battery's
    assert (np.minimum(charge, discharge) <= 1e-6).all()
    assert charge.max() <= b.max_charge_kw + 1e-6 and discharge.max() <= b.max_discharge_kw + 1e-6
    # every hour: the meter's balance and the battery's energy, losses counted
    prev = np.concatenate([[b.initial_soc * b.capacity_kwh], energy[:-1]])
    assert np.abs(energy - prev - leg * charge + discharge / leg).max() < 1e-6
    grid = rows["grid_kw"].to_numpy()
    balance = grid + rows["solar_used_kw"] + discharge - rows["load_kw"] - charge
    assert np.abs(balance).max() < 1e-6
    assert np.abs(rows["solar_used_kw"] + rows["curtailed_kw"] - rows["solar_kw"]).max() < 1e-6
    # solar in daylight only (Pacific daytime: UTC 13-03), none at night
    hours = pd.DatetimeIndex(pd.to_datetime(rows["hour"], utc=True)).tz_convert("America/Los_Angeles").hour
    assert rows.loc[(hours >= 22) | (hours <= 4), "solar_kw"].max() == 0
    assert rows.loc[(hours >= 11) & (hours <= 14), "solar_kw"].min() > 0.5 * 300 * 0.6
    assert (rows["grid_kw"] <= fleet.campuses[0].contract_limit_kw + 1e-6).all()
    # the battery works the carbon forecast: it moves energy, and the flexible plan still shapes
    assert charge.sum() > 10 and discharge.sum() > 10
    assert set(status.loc[status["campus"] == "ca-sj", "status"]) == {"shaped"}
    program = next(s for s in outcome.stages if s.name == "vcc-program")
    assert "storage optimal" in program.detail


def test_campuses_without_storage_are_planned_exactly_as_before(demo_store, tmp_path):
    _, _, plain = plan(demo_store, tmp_path, load_fleet())
    fleet = fleet_with_storage(tmp_path)
    _, rows, with_storage = plan(demo_store, tmp_path, fleet)
    others = [c.name for campus in fleet.campuses[1:] for c in campus.clusters]
    assert set(rows["campus"]) == {"ca-sj"}
    a = plain[plain["cluster"].isin(others)].sort_values("cluster").reset_index(drop=True)
    b = with_storage[with_storage["cluster"].isin(others)].sort_values("cluster").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_a_cloud_feed_that_misses_hours_leaves_the_battery_out_visibly(demo_store, tmp_path):
    feed = tmp_path / "cloud.csv"
    pd.DataFrame({"timestamp": ["2022-06-15T07:00:00Z"], "cloud_cover": [20]}).to_csv(feed, index=False)
    fleet = fleet_with_storage(tmp_path, cloud=f'  cloud_csv = "{feed}"')
    outcome, rows, status = plan(demo_store, tmp_path, fleet)
    assert rows.empty
    program = next(s for s in outcome.stages if s.name == "vcc-program")
    assert "storage not planned: solar.cloud_cover" in program.detail
    assert set(status.loc[status["campus"] == "ca-sj", "status"]) == {"shaped"}


def test_bad_storage_specs_name_the_field(tmp_path):
    text = load_fleet.__globals__["default_fleet_path"]().read_text()
    bad = STORAGE.format(cloud="").replace("initial_soc = 0.5", "initial_soc = 0.05")
    (tmp_path / "fleet.toml").write_text(text.replace("  [[campuses.clusters]]", bad, 1))
    with pytest.raises(InputError) as err:
        load_fleet(tmp_path / "fleet.toml")
    assert err.value.field == "campuses.0.battery.initial_soc"


def test_the_dashboard_shows_the_storage_plan_against_what_the_agent_applied(demo_store, tmp_path):
    from cicm.dashboards import data, figures
    from cicm.dashboards.app import Pages
    from cicm.dashboards.reader import StoreReader

    fleet = fleet_with_storage(tmp_path)
    copy = tmp_path / "copy.duckdb"
    copy.write_bytes(demo_store.read_bytes())
    with Store(copy) as store:
        plan_day(store, fleet, DAY, PlanOptions())
        planned = store.query("SELECT hour, charge_kw, discharge_kw FROM storage_plans ORDER BY hour")
        hour = pd.Timestamp(planned["hour"].iloc[3]).tz_convert("UTC")
        with store.run("agent") as run:  # the agent's pass of the 4th hour: it clipped the planned charge
            store.upsert("agent_actions", pd.DataFrame([{
                "cluster": "sj-a", "acted_at": hour + pd.Timedelta(minutes=1), "hour": hour, "plan_date": DAY,
                "mode": "shaped", "reason": None, "vcc_cores": 1.0, "flexible_allowance_cores": 1.0, "caps": "{}",
                "battery_charge_kw": 12.5, "battery_max_discharge_kw": 0.0, "result": "applied",
                "detail": "storage plan: charge clipped to the state of charge"}]), run.run_id)
    reader = StoreReader(copy)
    with reader.read() as r:
        day = data.storage_day(r, "sj-a", DAY)
        other = data.storage_day(r, "dl-a", DAY)  # or-dalles has no storage
    assert len(day) == 24 and other.empty
    assert day["charge_kw"].tolist() == pytest.approx(planned["charge_kw"].tolist())
    assert day["battery_charge_kw"].iloc[3] == 12.5 and day["battery_charge_kw"].drop(index=3).isna().all()
    chart = figures.storage_chart(day, "America/Los_Angeles", "t")
    traces = {t.name: t for t in chart.data}
    assert list(traces["planned charge (kW)"].y) == pytest.approx(planned["charge_kw"].tolist())
    assert list(traces["planned discharge (kW)"].y) == pytest.approx((-planned["discharge_kw"]).tolist())
    assert traces["applied charge rate (kW)"].y[3] == 12.5

    pages = Pages(reader, fleet)
    page, _, _ = pages.render("/cluster", "?cluster=sj-a&date=2022-06-15")
    from tests.test_dashboard import _ids, _text

    assert "storage-chart" in _ids(page) and "Battery and solar of ca-sj" in _text(page)
    page, _, _ = pages.render("/cluster", "?cluster=dl-a&date=2022-06-15")
    assert "storage-chart" not in _ids(page)
