"""The agent's pure parts: caps through a container power model, the split over containers, the battery policy,
the plan file parser."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cicm.enforce.agent import Agent, AgentConfig
from cicm.enforce.plans import FilePlanSource, PlanUnavailable, parse_plan_document
from cicm.enforce.policy import ContainerInfo, battery_decision, flexible_targets, tolerance_cores
from cicm.errors import InputError


class OracleClient:
    """Answers PUT powercap like the ecovisor does, through its own power model (the test's oracle)."""

    def __init__(self, model):
        self.model = model
        self.puts: list[float] = []

    def set_powercap(self, name, kw):
        assert self.model.idle_kw - 1e-12 <= kw <= self.model.max_kw + 1e-12, kw
        self.puts.append(kw)
        return {"cpu_limit_cores": self.model.cpu_limit_for_cap(kw), "effective_powercap_kw": kw}


@st.composite
def power_models(draw, realistic=False):
    """Piecewise-linear container power models. ``realistic``: strictly increasing, segment slopes within a
    factor of 10 of each other (SPECpower curves are within ~3); otherwise anything monotone, flat parts too."""
    from cicm.ecovisor.power import PowerModel  # the oracle only; cicm.enforce never imports the ecovisor

    n = draw(st.integers(1, 5))
    cores = draw(st.sampled_from([1.0, 2.0, 4.0, 8.0, 16.0]))
    xs = sorted(set([0.0, cores] + [round(draw(st.floats(0.05, 0.95)) * cores, 3) for _ in range(n - 1)]))
    idle = draw(st.floats(0.01, 0.2))
    if realistic:
        slopes = [draw(st.floats(0.02, 0.2)) for _ in xs[1:]]
        ys = list(idle + np.concatenate([[0.0], np.cumsum(np.diff(xs) * np.array(slopes))]))
    else:
        ys = list(np.cumsum([idle] + [draw(st.floats(0.0, 0.3)) for _ in xs[1:]]))
        if ys[-1] <= ys[0]:
            ys[-1] = ys[0] + 0.01
    return PowerModel.piecewise(list(zip(xs, ys)))


def _container(model, cap=None, limit=None) -> ContainerInfo:
    return ContainerInfo(name="batch-1", cores=model.cores, idle_kw=model.idle_kw, max_kw=model.max_kw,
                         powercap_kw=cap if cap is not None else model.max_kw,
                         effective_powercap_kw=cap if cap is not None else model.max_kw,
                         cpu_limit_cores=limit if limit is not None else model.cores, flexible=True)


@settings(max_examples=150, deadline=None)
@given(power_models(), st.floats(0.0, 1.0))
def test_a_cap_never_lets_a_container_exceed_its_target(model, share):
    target = share * model.cores
    client = OracleClient(model)
    agent = Agent(AgentConfig(cluster="c"), client, None, None, None)
    entry = agent._cap(_container(model), target, [])
    tol = tolerance_cores(model.cores)
    final = model.cpu_limit_for_cap(client.puts[-1]) if client.puts else model.cores
    floor = model.cpu_limit_for_cap(model.idle_kw)  # a power cap cannot push a container below this
    assert final <= max(target + tol, floor) + 1e-9  # float rounding of the inverse power model
    assert entry.get("cpu_limit_cores", final) == pytest.approx(final)
    assert len(client.puts) <= agent.config.max_cap_steps + 1


@settings(max_examples=150, deadline=None)
@given(power_models(realistic=True), st.floats(0.0, 1.0))
def test_a_cap_reaches_its_target_on_a_realistic_model(model, share):
    target = share * model.cores
    client = OracleClient(model)
    agent = Agent(AgentConfig(cluster="c"), client, None, None, None)
    agent._cap(_container(model), target, [])
    final = model.cpu_limit_for_cap(client.puts[-1]) if client.puts else model.cores
    assert abs(final - max(target, 0.01)) <= tolerance_cores(model.cores) + 0.01
    # a second agent (restart) that sees this state writes nothing
    again = OracleClient(model)
    Agent(AgentConfig(cluster="c"), again, None, None, None)._cap(
        _container(model, cap=client.puts[-1] if client.puts else None, limit=final), target, [])
    assert again.puts == []


def test_the_allowance_is_split_by_cores_and_never_above_it():
    cs = [ContainerInfo(n, c, 0.1, 0.3, 0.3, 0.3, c, True) for n, c in (("a", 4.0), ("b", 2.0), ("c", 2.0))]
    assert flexible_targets(4.0, cs) == {"a": 2.0, "b": 1.0, "c": 1.0}
    assert flexible_targets(100.0, cs) == {"a": 4.0, "b": 2.0, "c": 2.0}
    assert flexible_targets(-3.0, cs) == {"a": 0.0, "b": 0.0, "c": 0.0}


BATTERY = {"capacity_kwh": 20.0, "reserve_soc": 0.3, "max_charge_kw": 10.0, "max_discharge_kw": 20.0,
           "round_trip_efficiency": 0.9}


def _carbon(values):
    return pd.Series(values, index=pd.date_range("2022-06-14T07:00Z", periods=len(values), freq="h"), dtype=float)


def test_battery_discharges_in_the_dirtiest_hours_and_charges_only_when_it_pays():
    carbon = _carbon([500, 480, 470, 460] + [300] * 16 + [100, 110, 120, 130])
    hours = carbon.index
    d = battery_decision(carbon, hours[0], BATTERY, grid_share_kw=5.0, hours_each=4)
    assert d.mode == "discharge" and d.charge_kw == 0 and d.max_discharge_kw == pytest.approx(14.0 / 4)
    c = battery_decision(carbon, hours[-1], BATTERY, grid_share_kw=5.0, hours_each=4)
    assert c.mode == "charge" and c.charge_kw == pytest.approx(min(10.0, 5.0, 14.0 / (0.9 * 4)))
    assert battery_decision(carbon, hours[8], BATTERY, 5.0).mode == "hold"
    flat = _carbon([300] * 20 + [290] * 4)  # the clean hours are barely cleaner: the losses would eat the gain
    assert battery_decision(flat, flat.index[-1], BATTERY, 5.0).mode == "hold"
    assert battery_decision(carbon, hours[0], {**BATTERY, "capacity_kwh": 0.0}, 5.0) is None
    assert battery_decision(None, hours[0], BATTERY, 5.0).mode == "hold"


def _doc(**over):
    hours = pd.date_range("2022-06-14T07:00Z", periods=24, freq="h")
    doc = {"cluster": "sj-a", "plan_date": "2022-06-14", "run_id": "plan-20220613T010000-abcdef",
           "status": "shaped", "reason": None,
           "hours": [{"hour": h.isoformat(), "vcc_cores": 1000.0, "flexible_cpu_cores": 100.0, "gco2_per_kwh": 200.0}
                     for h in hours]}
    doc.update(over)
    return doc


def test_plan_documents_are_validated_field_by_field(tmp_path):
    plan = parse_plan_document(_doc())
    assert plan.planned_at == pd.Timestamp("2022-06-13T01:00:00Z") and len(plan.hours) == 24
    with pytest.raises(InputError, match="hours.2.vcc_cores"):
        bad = _doc()
        bad["hours"][2]["vcc_cores"] = -1
        parse_plan_document(bad)
    with pytest.raises(InputError, match="plan_date"):
        parse_plan_document({k: v for k, v in _doc().items() if k != "plan_date"})
    path = tmp_path / "p.json"
    path.write_text(json.dumps([_doc(), _doc(cluster="sj-b")]))
    look = FilePlanSource(path, "sj-a").lookup(pd.Timestamp("2022-06-14T10:00Z"))
    assert look.plan.cluster == "sj-a" and look.problems
    with pytest.raises(PlanUnavailable, match="no plan for cluster 'xx'"):
        FilePlanSource(path, "xx").lookup(pd.Timestamp("2022-06-14T10:00Z"))
    path.write_text("{not json")
    with pytest.raises(PlanUnavailable):
        FilePlanSource(path, "sj-a").lookup(pd.Timestamp("2022-06-14T10:00Z"))
