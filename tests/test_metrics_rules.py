"""The alert rules and the Grafana board: ``promtool check rules`` and ``promtool test rules`` accept them, the
board is valid dashboard JSON, and every metric either of them names is one the code exports (the ecovisor's
/metrics, the agent's registry, the nightly plan's textfile)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "cicm-rules.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "cicm-rules.test.yml"
BOARD = REPO / "deploy" / "grafana" / "cicm.json"
SETUP = REPO / ".ci" / "setup-prometheus"
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself

METRIC = re.compile(r"\b(cicm_[a-z0-9_]+|up)\b")


def promtool() -> str:
    if shutil.which("promtool") is None:
        r = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=600)
        if shutil.which("promtool") is None:
            why = (r.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"promtool is not available here ({why}); run .ci/setup-prometheus")
    return shutil.which("promtool") or "promtool"


def test_promtool_accepts_the_rules():
    r = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 7 rules found" in r.stdout + r.stderr


def test_the_rules_fire_when_they_should():
    """promtool's unit tests of the rules (deploy/prometheus/cicm-rules.test.yml): each alert fires on the
    series that should raise it, and stays quiet on healthy ones."""
    r = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], capture_output=True, text=True, timeout=120,
                       cwd=RULE_TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_rules_cover_the_five_required_alerts():
    import yaml

    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"CicmNoPlanForTomorrow", "CicmAgentNotApplying", "CicmEcovisorDown", "CicmShapingSwitchedOffBySlo",
            "CicmCarbonProviderFailing"} <= names
    assert all(r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"] for r in rules)


# ----------------------------------------------------------------------------------------- exported names

def exported_names() -> set[str]:
    """Sample names the code exports, from real expositions of the three exporters."""
    from fastapi.testclient import TestClient

    from cicm.ecovisor.testing import bearer, simulated_app
    from cicm.enforce.agent import PassOutcome
    from cicm.ops.agent_metrics import AgentMetrics
    from cicm.ops.metrics import plan_registry
    from cicm.planning.pipeline import PlanOutcome
    from cicm.planning.stages import StageReport

    texts = []
    with TestClient(simulated_app()) as c:
        token = c.post("/v1/apps", headers=bearer("admin-token"), json={
            "name": "a", "grid_kw": 5.0, "solar_fraction": 0.5, "battery_fraction": 0.5,
            "containers": ["a-batch", "a-serve"]}).json()["token"]
        c.post("/v1/tick", headers=bearer("admin-token"), json={"n": 2})
        c.get("/v1/battery", headers=bearer(token))
        texts.append(c.get("/metrics").text)
    hour = pd.Timestamp("2022-06-14T09:00Z")
    agent = AgentMetrics("sj-a")
    plan = SimpleNamespace(plan_date="2022-06-14", run_id="r", status="shaped", program="queue", planned_at=hour)
    agent.observe(PassOutcome(hour=hour, acted_at=hour, mode="shaped", reason=None, result="applied", plan=plan,
                              allowance_cores=1.0, plan_allowance_cores=1.0, vcc_cores=2.0,
                              caps={"b": {"powercap_kw": 1.0, "cpu_limit_cores": 1.0, "flexible": True}}))
    # the agent's own counter of passes whose store it could not read, counted as the agent counts it
    from cicm.enforce.agent import Agent

    holder = SimpleNamespace(metrics=agent, config=SimpleNamespace(cluster="sj-a"), _store_counter=None)
    Agent._count_store_problem(holder, SimpleNamespace(store_problem="corrupt"))  # type: ignore[arg-type]
    texts.append(generate_latest(agent.registry).decode())
    outcome = PlanOutcome(date(2022, 6, 15), "r", "ok", [StageReport("telemetry", "ran")],
                          pd.DataFrame({"status": ["shaped"], "reason": [None], "plan_kgco2": [1.0],
                                        "flat_kgco2": [2.0]}), seconds={"telemetry": 1.0})
    texts.append(generate_latest(plan_registry(outcome)).decode())
    return {s.name for t in texts for fam in text_string_to_metric_families(t) for s in fam.samples}


def board_expressions() -> list[str]:
    board = json.loads(BOARD.read_text())
    exprs = []
    for panel in board["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
        for inner in panel.get("panels", []):
            exprs += [t["expr"] for t in inner.get("targets", [])]
    return exprs


def test_the_board_is_a_dashboard():
    board = json.loads(BOARD.read_text())
    assert board["title"] and board["uid"] == "cicm-ops" and board["schemaVersion"] >= 30
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in board["panels"]:
        assert {"type", "title", "gridPos"} <= set(p)
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"])
            assert p["datasource"]["uid"] == "${datasource}"
    assert any(v["name"] == "datasource" and v["type"] == "datasource"
               for v in board["templating"]["list"])


def test_every_metric_in_the_rules_and_the_board_is_exported():
    exported = exported_names()
    named = {m: "rules" for m in METRIC.findall(RULES.read_text())}
    for expr in board_expressions():
        named.update({m: f"board: {expr}" for m in METRIC.findall(expr)})
    missing = {m: where for m, where in named.items() if m not in exported and m not in PROMETHEUS_OWN}
    assert not missing, f"named but not exported: {missing}"
    # and the board shows each exporter
    joined = " ".join(board_expressions())
    assert "cicm_ecovisor_" in joined and "cicm_agent_" in joined and "cicm_plan_" in joined
