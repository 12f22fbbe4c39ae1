"""The tick's columnar path (issue 19, item 4: a tick with 1,000 containers in <= 20 ms CPU) stores and summarises
exactly what the row-by-row path did: ``Telemetry.write_tick_columns`` leaves the same rows as ``write_tick`` with
``accountant.container_row`` rows, and the tick summary from columns equals the one from rows; the power model
without ``np.interp`` gives numpy's floats. Behaviour only: the figures are bench/agent_scale.py's."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cicm.ecovisor import accountant
from cicm.ecovisor.accountant import Interval
from cicm.ecovisor.carbon import CarbonValue
from cicm.ecovisor.power import POWER_SOURCE, PowerModel
from cicm.ecovisor.schemas import AppRegistration
from cicm.ecovisor.state import ContainerState
from cicm.ecovisor.testing import simulated_app
from cicm.store.ecovisor import Telemetry

T0 = datetime(2022, 6, 21, 7, tzinfo=timezone.utc)
IV = Interval(T0, T0 + timedelta(minutes=5))
FLOAT = st.floats(0.0, 10.0, allow_nan=False)


@st.composite
def containers(draw):
    n = draw(st.integers(0, 12))
    out = []
    for i in range(n):
        cs = ContainerState(f"c-{i}", 4.0, PowerModel.linear(4.0, 0.1, 0.5), app=draw(st.sampled_from([None, "a", "b"])),
                            powercap_kw=draw(FLOAT), effective_powercap_kw=draw(FLOAT),
                            cpu_limit_cores=draw(st.one_of(st.none(), FLOAT)), usage_cores=draw(FLOAT),
                            power_kw=draw(FLOAT))
        out.append(cs)
    return out


def _stored(store: Telemetry) -> list[tuple]:
    return store.con.execute("SELECT * FROM ecovisor_container_ticks ORDER BY tick_id, container").fetchall()


@settings(max_examples=40, deadline=None)
@given(containers(), st.dictionaries(st.sampled_from([f"c-{i}" for i in range(12)]), FLOAT))
def test_columns_store_and_summarise_what_rows_did(conts, carbon):
    cols = accountant.container_columns(IV, conts, carbon)
    rows = [accountant.container_row(7, IV, cs, carbon.get(cs.name, 0.0)) for cs in conts]
    assert accountant.container_rows(7, IV, cols) == rows
    tick = accountant.tick_row(7, IV, 1.5, CarbonValue(300.0, "measured", T0), "simulated", "simulated", T0)
    by_rows, by_cols = Telemetry(None), Telemetry(None)
    by_rows.write_tick(tick, rows, [])
    by_cols.write_tick_columns(tick, POWER_SOURCE, cols, [])
    assert _stored(by_cols) == _stored(by_rows)
    assert by_cols.con.execute("SELECT * FROM ecovisor_ticks").fetchall() == \
        by_rows.con.execute("SELECT * FROM ecovisor_ticks").fetchall()
    app_rows: list[dict] = []
    assert accountant.tick_summary(tick, app_rows, cols, {}, []) == accountant.tick_summary(tick, app_rows, rows, {}, [])


def test_a_tick_stores_every_container_and_sums_to_the_apps():
    api = simulated_app()
    core = api.state.ecovisor
    core.register_app(AppRegistration(name="a", grid_kw=5.0, containers=["a-batch", "a-serve"]))
    summary = core.advance(1)[0]
    rows = {r["container"]: r for r in core.store.container_ticks(list(core.containers))}
    assert set(rows) == set(core.containers)  # the unowned ones too (app NULL)
    assert rows["spare"]["app"] is None and rows["a-batch"]["app"] == "a"
    for name, r in rows.items():
        cs = core.containers[name]
        assert r["power_kw"] == cs.power_kw and r["energy_kwh"] == cs.power_kw * IV.dt_h
    app = summary["apps"]["a"]
    assert set(app["containers"]) == {"a-batch", "a-serve"}
    assert abs(sum(c["power_kw"] for c in app["containers"].values()) - app["load_kw"]) < 1e-12
    core.store.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5, unique=True), st.floats(-1.0, 10.0),
       st.sampled_from([1.0, 2.0, 3.7, 4.0]))
def test_the_power_model_gives_numpys_floats(inner, usage, cores):
    xs = sorted({0.0, cores, *(round(x * cores, 6) for x in inner)})
    ys = list(np.cumsum([0.05] + [0.1 * (i % 3) for i in range(len(xs) - 1)]))
    m = PowerModel(cores=cores, xs=tuple(xs), ys=tuple(float(y) for y in ys))
    for c in (usage, *xs):
        clamped = min(max(c, 0.0), cores)
        assert m.power_kw(c) == float(np.interp(clamped, xs, m.ys))
