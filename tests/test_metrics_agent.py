"""The enforcement agent's metrics (cicm.ops.agent_metrics) with a real ecovisor on loopback (simulated clock):
the applied allowance and caps, the plan in force and its age, the last success, errors while the ecovisor is
down, deadline releases, the textfile and the HTTP endpoint."""
from __future__ import annotations

import math
from types import SimpleNamespace

import httpx
import pandas as pd
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cicm.ecovisor.testing import free_port
from cicm.enforce.agent import PassOutcome
from cicm.enforce.clock import SimulatedClock
from cicm.ops.agent_metrics import AgentMetrics

try:
    from tests.test_enforce_agent import ALLOWANCE_CC, CLUSTER, SCALE, START, containers, eco, make_agent, write_plan
except ImportError:
    from test_enforce_agent import ALLOWANCE_CC, CLUSTER, SCALE, START, containers, eco, make_agent, write_plan

assert eco  # the fixture: a real ecovisor (uvicorn in a thread) on a simulated clock


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict, name: str, **labels) -> float:
    return found[(name, tuple(sorted({"cluster": CLUSTER, **labels}.items())))]


class WallClock:
    def __init__(self):
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def test_agent_metrics_follow_the_passes(eco, db_path, tmp_path):
    write_plan(db_path)
    token = eco.register()
    clock = SimulatedClock(START)
    agent = make_agent(eco.url, token, clock, db=db_path)
    wall = WallClock()
    textfile = tmp_path / "textfile" / "cicm_agent.prom"
    agent.metrics = AgentMetrics(CLUSTER, textfile=textfile, wall_clock=wall)
    for h in range(6):
        t = START + pd.Timedelta(hours=h)
        eco.tick_to(t)
        clock.set(t)
        wall.t += 3600
        out = agent.step()
        assert out.ok and out.mode == "shaped"
        found = samples(textfile.read_text())  # the textfile is rewritten after every pass
        assert value(found, "cicm_agent_flexible_allowance_cores") == ALLOWANCE_CC[h] * SCALE
        assert value(found, "cicm_agent_plan_flexible_allowance_cores") == ALLOWANCE_CC[h] * SCALE
        assert value(found, "cicm_agent_vcc_cores") == pytest.approx(out.vcc_cores)
        assert value(found, "cicm_agent_enforced_hour_timestamp_seconds") == t.timestamp()
        assert value(found, "cicm_agent_last_success_timestamp_seconds") == wall.t
        assert value(found, "cicm_agent_mode", mode="shaped") == 1
        assert value(found, "cicm_agent_mode", mode="lift") == 0
        plan = out.plan
        assert value(found, "cicm_agent_plan_info", plan_date=str(plan.plan_date), run_id=plan.run_id,
                     status="shaped", program=plan.program) == 1
        assert value(found, "cicm_agent_plan_age_seconds") == (t - plan.planned_at).total_seconds()
        state = containers(eco, token)  # what the ecovisor has in force, from its API
        for name, c in state.items():
            flexible = "true" if name.startswith("batch") else "false"
            assert value(found, "cicm_agent_container_powercap_watts", container=name, flexible=flexible) == \
                pytest.approx(c["powercap_kw"] * 1000)
            assert value(found, "cicm_agent_container_cpu_limit_cores", container=name, flexible=flexible) == \
                pytest.approx(c["cpu_limit_cores"])
    passes = {r: value(found, "cicm_agent_passes_total", result=r) for r in ("applied", "unchanged", "failed")}
    assert passes["applied"] + passes["unchanged"] == 6 and passes["failed"] == 0
    assert value(found, "cicm_agent_errors_total", result="failed") == 0
    last_ok = wall.t

    # the ecovisor goes away: the pass fails, is counted, and the applied state and last success stay
    eco.down()
    clock.set(START + pd.Timedelta(hours=6))
    wall.t += 3600
    assert agent.step().result == "failed"
    found = samples(textfile.read_text())
    assert value(found, "cicm_agent_errors_total", result="failed") == 1
    assert value(found, "cicm_agent_passes_total", result="failed") == 1
    assert value(found, "cicm_agent_last_success_timestamp_seconds") == last_ok
    assert value(found, "cicm_agent_last_pass_timestamp_seconds") == wall.t
    assert value(found, "cicm_agent_flexible_allowance_cores") == ALLOWANCE_CC[5] * SCALE
    eco.up()

    # served over HTTP as well (start_http_server on the registry of this agent only)
    port = free_port()
    agent.metrics.serve(port, addr="127.0.0.1")
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        agent.metrics.close()
    assert samples(text) == samples(generate_latest(agent.metrics.registry).decode())
    assert "python_gc" not in text and "process_" not in text  # its own registry, not the global one


def test_a_lifted_pass_and_deadline_releases_counted_once_per_hour():
    hour = pd.Timestamp("2022-06-14T09:00Z")
    metrics = AgentMetrics(CLUSTER)
    plan = SimpleNamespace(plan_date="2022-06-14", run_id="plan-1", status="shaped", program="queue",
                           planned_at=hour - pd.Timedelta(hours=15))

    def release(h, reason="deadline-release"):
        return PassOutcome(hour=h, acted_at=h, mode="shaped", reason=None, result="applied", plan=plan,
                           allowance_cores=30000.0, plan_allowance_cores=0.0,
                           correction=SimpleNamespace(deviation=SimpleNamespace(reason=reason)),
                           caps={"batch-1": {"powercap_kw": 0.3, "cpu_limit_cores": 4.0, "flexible": True}})

    for out in (release(hour), release(hour), release(hour + pd.Timedelta(hours=1)),
                release(hour + pd.Timedelta(hours=2), "catch-up")):
        metrics.observe(out)
    found = samples(generate_latest(metrics.registry).decode())
    assert value(found, "cicm_agent_deadline_releases_total") == 2  # a reconcile pass in the hour is not another
    assert value(found, "cicm_agent_plan_age_seconds") == 17 * 3600

    metrics.observe(PassOutcome(hour=hour, acted_at=hour, mode="lift", reason="stale-plan: ...", result="unchanged",
                                caps={"batch-1": {"powercap_kw": 0.3, "cpu_limit_cores": 4.0, "flexible": True}}))
    found = samples(generate_latest(metrics.registry).decode())
    assert value(found, "cicm_agent_mode", mode="lift") == 1 and value(found, "cicm_agent_mode", mode="shaped") == 0
    assert math.isnan(value(found, "cicm_agent_flexible_allowance_cores"))
    assert math.isnan(value(found, "cicm_agent_plan_age_seconds"))
    assert not any(n == "cicm_agent_plan_info" for n, _ in found)  # no plan in force

    metrics.observe(SimpleNamespace(result="applied"))  # a broken outcome: logged, never raised


def test_a_taken_metrics_port_is_bad_input(tmp_path, monkeypatch):
    import socket

    from typer.testing import CliRunner

    from cicm.enforce.cli import agent_app

    monkeypatch.setenv("CICM_ECOVISOR_TOKEN", "t")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(agent_app, ["run", "--cluster", CLUSTER, "--ecovisor", "http://127.0.0.1:9",
                                           "--db", str(tmp_path / "x.duckdb"), "--once", "--metrics-port", str(port)])
    assert r.exit_code == 1, r.output
    assert "metrics-port" in (r.stderr if hasattr(r, "stderr") else r.output)
