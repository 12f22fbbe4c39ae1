"""Every metric through a real Prometheus (issue 17, items 1-2).

Starts the real services on loopback: ``cicm ecovisor serve`` on a simulated clock, ``cicm agent run
--clock ecovisor --metrics-port ... --metrics-textfile ...`` enforcing a stored plan, and the nightly plan's
textfile (``cicm.ops.metrics.write_plan_metrics``) served as node_exporter's textfile collector would serve it.
Debian's ``prometheus`` scrapes all three every second with the rules of deploy/prometheus/cicm-rules.yml loaded
(evaluated every second). The test then reads everything back through Prometheus' HTTP API: every sample name
each service exports, values that match the services' own APIs, the alerts the state should raise (pending:
their ``for`` is minutes), and ``CicmEcovisorDown`` once the ecovisor is stopped. Skips when prometheus cannot
be installed (``.ci/setup-prometheus``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pandas as pd
import pytest
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from cicm.ecovisor.testing import free_port
from cicm.ops.metrics import write_plan_metrics
from cicm.planning.pipeline import PlanOutcome
from cicm.planning.stages import StageReport

try:
    from tests.test_enforce_agent import ADMIN, ALLOWANCE_CC, CLUSTER, SCALE, SITE, START, write_plan
except ImportError:
    from test_enforce_agent import ADMIN, ALLOWANCE_CC, CLUSTER, SCALE, SITE, START, write_plan

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "cicm-rules.yml"
SETUP = REPO / ".ci" / "setup-prometheus"
HOUR = 4  # the agent starts at START + 4 h: the plan allows 2 container cores' worth of cluster cores


def require_prometheus() -> None:
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        r = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=600)
        if shutil.which("prometheus") is None:
            why = (r.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"prometheus is not available here ({why}); run .ci/setup-prometheus")


def wait_for(what: str, check, timeout: float = 30.0, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
            if got:
                return got
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            pass
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.2)


class Service:
    """A subprocess with its output in a log file; stopped (SIGTERM, then SIGKILL) by ``stop``."""

    def __init__(self, name: str, cmd: list[str], root: Path, env: dict | None = None):
        self.log = root / f"{name}.log"
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, **(env or {})})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


class Textfile:
    """node_exporter's textfile collector, reduced to what it does with one file: serve it at /metrics."""

    def __init__(self, path: Path):
        path_ = path

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = path_.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def plan_outcome() -> PlanOutcome:
    """A degraded night: one zone's carbon forecast failed and the SLO loop switched two clusters off."""
    clusters = pd.DataFrame({
        "cluster": ["sj-a", "sj-b", "sj-c", "dl-a"], "status": ["shaped", "fallback", "fallback", "fallback"],
        "reason": [None, "slo-feedback", "slo-feedback", "no-carbon-forecast"],
        "plan_kgco2": [690.0, 900.0, 800.0, 400.0], "flat_kgco2": [868.0, 900.0, 800.0, 400.0]})
    stages = [StageReport("telemetry", "ran"), StageReport("carbon-forecast", "degraded", "1/2 zones"),
              StageReport("slo-feedback", "ran"), StageReport("vcc-program", "ran")]
    seconds = {"telemetry": 0.1, "carbon-forecast": 0.2, "slo-feedback": 0.05, "models-and-programs": 1.5,
               "store-write": 0.3}
    return PlanOutcome(date(2022, 6, 15), "plan-test", "degraded", stages, clusters, seconds=seconds)


def exposition_names(text: str) -> set[str]:
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_prometheus_scrapes_every_metric_of_the_real_services(tmp_path, db_path):
    require_prometheus()
    site = tmp_path / "site.toml"
    site.write_text(tomli_w.dumps(SITE))
    eco_port, agent_port, prom_port = free_port(), free_port(), free_port()
    eco_url = f"http://127.0.0.1:{eco_port}"
    admin = {"Authorization": f"Bearer {ADMIN}"}
    services: list[Service] = []
    textfile = None
    t0 = time.monotonic()
    try:
        # ---- the ecovisor, on a simulated clock
        eco = Service("ecovisor", [sys.executable, "-m", "cicm.ecovisor.cli", "serve", "--site", str(site),
                                   "--port", str(eco_port), "--db", str(tmp_path / "ecovisor.duckdb"),
                                   "--clock", "simulated", "--log-level", "warning"],
                      tmp_path, {"CICM_ECOVISOR_ADMIN_TOKEN": ADMIN})
        services.append(eco)
        wait_for("the ecovisor", lambda: httpx.get(f"{eco_url}/v1/health", timeout=1).status_code == 200,
                 proc=eco.proc, log=eco.log)
        token = httpx.post(f"{eco_url}/v1/apps", headers=admin, timeout=10, json={
            "name": CLUSTER, "grid_kw": 10.0, "solar_fraction": 1.0, "battery_fraction": 1.0,
            "containers": ["batch-1", "batch-2", "serving-1"]}).json()["token"]
        app_h = {"Authorization": f"Bearer {token}"}
        # no battery discharge before the agent runs: the grid carries the load, so there is carbon to count
        assert httpx.put(f"{eco_url}/v1/battery/max-discharge", headers=app_h, json={"kw": 0.0},
                         timeout=10).status_code == 200
        ticks = HOUR * 3600 // SITE["tick_seconds"]
        assert httpx.post(f"{eco_url}/v1/tick", headers=admin, json={"n": ticks}, timeout=60).status_code == 200

        # ---- the agent, following the ecovisor's clock, with both metrics outputs
        write_plan(db_path)
        agent_textfile = tmp_path / "textfile" / "cicm_agent.prom"
        agent = Service("agent", [sys.executable, "-m", "cicm.enforce.cli", "run", "--cluster", CLUSTER,
                                  "--ecovisor", eco_url, "--db", str(db_path), "--clock", "ecovisor",
                                  "--metrics-port", str(agent_port), "--metrics-textfile", str(agent_textfile),
                                  "--log-level", "warning"],
                        tmp_path, {"CICM_ECOVISOR_TOKEN": token})
        services.append(agent)
        agent_url = f"http://127.0.0.1:{agent_port}/metrics"
        wait_for("the agent's first pass", lambda: "cicm_agent_last_success_timestamp_seconds{" in
                 httpx.get(agent_url, timeout=1).text, proc=agent.proc, log=agent.log)
        assert agent_textfile.exists()

        # ---- the nightly plan's textfile
        plan_file = tmp_path / "textfile" / "cicm_plan.prom"
        assert write_plan_metrics(plan_outcome(), plan_file) == plan_file
        textfile = Textfile(plan_file)

        # ---- Prometheus: scrape all three every second, evaluate the rules every second
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files: ['{RULES}']\n"
            "scrape_configs:\n"
            f"  - job_name: ecovisor\n    static_configs: [{{targets: ['127.0.0.1:{eco_port}']}}]\n"
            f"  - job_name: cicm-agent\n    static_configs: [{{targets: ['127.0.0.1:{agent_port}']}}]\n"
            f"  - job_name: node\n    static_configs: [{{targets: ['127.0.0.1:{textfile.port}']}}]\n")
        prom = Service("prometheus", ["prometheus", f"--config.file={config}",
                                      f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{prom_port}"], tmp_path)
        services.append(prom)
        api = f"http://127.0.0.1:{prom_port}/api/v1"

        def query(q: str) -> list[dict]:
            r = httpx.get(f"{api}/query", params={"query": q}, timeout=5).json()
            assert r["status"] == "success", r
            return r["data"]["result"]

        def one(q: str) -> float:
            result = query(q)
            assert len(result) == 1, (q, result)
            return float(result[0]["value"][1])

        wait_for("three targets up", lambda: len(query("up == 1")) == 3, timeout=60, proc=prom.proc, log=prom.log)
        scraped_at = time.monotonic()

        # every sample name each service exports is in Prometheus
        exported = {
            "ecovisor": exposition_names(httpx.get(f"{eco_url}/metrics", timeout=5).text),
            "agent": exposition_names(httpx.get(agent_url, timeout=5).text),
            "plan": exposition_names(plan_file.read_text()),
        }
        assert exposition_names(agent_textfile.read_text()) == exported["agent"]

        def all_in_prometheus():
            names = set(httpx.get(f"{api}/label/__name__/values", timeout=5).json()["data"])
            return all(v <= names for v in exported.values())

        wait_for("every exported name in Prometheus", all_in_prometheus, timeout=20)
        assert len(exported["ecovisor"]) >= 30 and len(exported["agent"]) >= 15 and len(exported["plan"]) >= 12

        # ecovisor values equal the ecovisor's own API (the simulated clock stands still)
        battery = httpx.get(f"{eco_url}/v1/battery", headers=app_h, timeout=5).json()
        grid = httpx.get(f"{eco_url}/v1/grid/power", headers=app_h, timeout=5).json()
        energy = httpx.get(f"{eco_url}/v1/energy", headers=app_h, timeout=5).json()
        conts = {c["container"]: c for c in httpx.get(f"{eco_url}/v1/containers", headers=app_h, timeout=5).json()}
        sel = f'{{job="ecovisor",app="{CLUSTER}"}}'
        assert one(f"cicm_ecovisor_app_battery_state_of_charge_ratio{sel}") == pytest.approx(battery["soc"])
        assert one(f"cicm_ecovisor_app_grid_power_watts{sel}") == pytest.approx(grid["power_kw"] * 1000)
        assert one(f"cicm_ecovisor_app_energy_joules_total{sel}") == pytest.approx(energy["energy_kwh"] * 3.6e6)
        assert one(f"cicm_ecovisor_app_carbon_grams_total{sel}") == pytest.approx(energy["carbon_kgco2"] * 1000)
        assert one(f"cicm_ecovisor_app_carbon_grams_total{sel}") > 0
        assert one('cicm_ecovisor_tick_id{job="ecovisor"}') == ticks

        # the agent's caps, as the ecovisor has them in force and as the agent reports them
        def caps_agree():
            for name in ("batch-1", "batch-2"):
                eco_w = one(f'cicm_ecovisor_container_powercap_watts{{container="{name}"}}')
                agent_w = one(f'cicm_agent_container_powercap_watts{{container="{name}"}}')
                if not (eco_w == pytest.approx(conts[name]["powercap_kw"] * 1000) == agent_w):
                    return False
            return True

        wait_for("caps to agree", caps_agree, timeout=10)
        assert one(f'cicm_agent_flexible_allowance_cores{{cluster="{CLUSTER}"}}') == ALLOWANCE_CC[HOUR] * SCALE
        assert one(f'cicm_agent_mode{{cluster="{CLUSTER}",mode="shaped"}}') == 1
        assert one(f'cicm_agent_enforced_hour_timestamp_seconds{{cluster="{CLUSTER}"}}') == \
            (START + pd.Timedelta(hours=HOUR)).timestamp()
        assert one(f'time() - cicm_agent_last_success_timestamp_seconds{{cluster="{CLUSTER}"}}') < 120
        # the agent's PUTs through the latency histogram, by route template (its caps go in bulk requests)
        assert one('sum(cicm_ecovisor_request_duration_seconds_count{route="/v1/containers/powercaps",'
                   'method="PUT"})') >= 1

        # the nightly textfile
        assert one('cicm_plan_fallback_clusters{reason="slo-feedback"}') == 2
        assert one('cicm_plan_stage_status{stage="carbon-forecast",status="degraded"}') == 1
        assert one("cicm_plan_expected_saving_kgco2") == pytest.approx(178.0)

        # the rules, evaluated by Prometheus on this state
        def alerts() -> dict[str, str]:
            data = httpx.get(f"{api}/alerts", timeout=5).json()["data"]["alerts"]
            return {a["labels"]["alertname"]: a["state"] for a in data}

        wait_for("the SLO and carbon alerts", lambda: {"CicmShapingSwitchedOffBySlo", "CicmCarbonProviderFailing"}
                 <= set(alerts()), timeout=20)
        firing = alerts()
        assert "CicmNoPlanForTomorrow" not in firing and "CicmAgentNotApplying" not in firing
        assert "CicmEcovisorDown" not in firing and "CicmAgentDown" not in firing

        # the ecovisor goes down: up == 0 and its alert is pending
        eco.stop()
        wait_for("CicmEcovisorDown", lambda: alerts().get("CicmEcovisorDown") in ("pending", "firing"), timeout=30)
        assert one('up{job="ecovisor"}') == 0
        print(f"services up and scraped in {scraped_at - t0:.1f} s; whole test {time.monotonic() - t0:.1f} s")
    finally:
        for s in reversed(services):
            s.stop()
        if textfile is not None:
            textfile.close()
