"""The enforcement agent's Prometheus metrics.

``AgentMetrics(cluster)`` holds its own registry. ``observe(outcome)`` takes each pass
(:class:`cicm.enforce.agent.PassOutcome`, duck-typed) and, when asked, rewrites a textfile
(``prometheus_client.write_to_textfile``) for node_exporter's textfile collector. ``serve(port)`` exposes the
registry over HTTP (``prometheus_client.start_http_server``). ``cicm agent run --metrics-port`` /
``--metrics-textfile`` wire these. A metrics failure is logged and never stops enforcement.

Times: ``cicm_agent_last_*_timestamp_seconds`` are wall-clock (so ``time() - ...`` alerts work whatever the agent's
clock); the plan's age is on the agent's clock (the hour it enforces minus the plan's ``planned_at``).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server, write_to_textfile

log = logging.getLogger("cicm.agent")

MODES = ("shaped", "lift", "keep")
RESULTS = ("applied", "unchanged", "failed", "error")
ERROR_RESULTS = ("failed", "error")


def _f(v: Any) -> float:
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


class AgentMetrics:
    def __init__(self, cluster: str, textfile: str | Path | None = None,
                 wall_clock: Callable[[], float] = time.time):
        self.cluster = cluster
        self.textfile = Path(textfile) if textfile else None
        self.wall_clock = wall_clock
        self.registry = reg = CollectorRegistry(auto_describe=True)
        self.server: Any = None
        self._released_hours: set[Any] = set()
        c = ["cluster"]
        self.passes = Counter("cicm_agent_passes", "Agent passes by result (applied, unchanged, failed, error)",
                              c + ["result"], registry=reg)
        self.errors = Counter("cicm_agent_errors", "Passes that failed: the ecovisor unreachable or answering an "
                                                   "error (failed), or a configuration error (error)",
                              c + ["result"], registry=reg)
        self.deadline_releases = Counter("cicm_agent_deadline_releases", "Hours the hourly correction released "
                                                                         "work above the plan because a deadline "
                                                                         "needed it (counted once per hour)",
                                         c, registry=reg)
        self.last_pass = Gauge("cicm_agent_last_pass_timestamp_seconds", "Wall time of the last pass, Unix time",
                               c, registry=reg)
        self.last_success = Gauge("cicm_agent_last_success_timestamp_seconds",
                                  "Wall time of the last pass that applied or confirmed the caps (result applied or "
                                  "unchanged), Unix time", c, registry=reg)
        self.hour = Gauge("cicm_agent_enforced_hour_timestamp_seconds", "The hour the last pass enforced (agent "
                                                                         "clock), Unix time", c, registry=reg)
        self.mode = Gauge("cicm_agent_mode", "1 for the last pass's mode (shaped, lift, keep), 0 for the others",
                          c + ["mode"], registry=reg)
        self.allowance = Gauge("cicm_agent_flexible_allowance_cores", "Flexible allowance applied for the hour "
                                                                      "(cluster cores; after the hourly correction; "
                                                                      "NaN when caps are lifted or kept)",
                               c, registry=reg)
        self.plan_allowance = Gauge("cicm_agent_plan_flexible_allowance_cores", "The plan of record's flexible "
                                                                                "allowance for the hour (cluster "
                                                                                "cores; NaN without one)",
                                    c, registry=reg)
        self.vcc = Gauge("cicm_agent_vcc_cores", "The plan's VCC for the hour (cluster cores; NaN without one)",
                         c, registry=reg)
        self.cap = Gauge("cicm_agent_container_powercap_watts", "Power cap the agent applied or found on each "
                                                                "container, W", c + ["container", "flexible"],
                         registry=reg)
        self.limit = Gauge("cicm_agent_container_cpu_limit_cores", "CPU limit the ecovisor reports for each "
                                                                   "container after the pass, cores",
                           c + ["container", "flexible"], registry=reg)
        self.plan_info = Gauge("cicm_agent_plan_info", "The plan in force (value 1): its date, run id, status and "
                                                       "program", c + ["plan_date", "run_id", "status", "program"],
                               registry=reg)
        self.plan_age = Gauge("cicm_agent_plan_age_seconds", "Age of the plan in force at the hour it enforces "
                                                             "(hour - planned_at, agent clock), s; NaN without a plan",
                              c, registry=reg)
        for r in RESULTS:
            self.passes.labels(cluster, r)
        for r in ERROR_RESULTS:
            self.errors.labels(cluster, r)
        self.deadline_releases.labels(cluster)

    # ------------------------------------------------------------------------------------------- exposure
    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve the registry on ``addr:port`` in a daemon thread (``prometheus_client.start_http_server``)."""
        self.server = start_http_server(port, addr=addr, registry=self.registry)

    def close(self) -> None:
        if self.server is not None:
            server, thread = self.server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self.server = None

    def write_textfile(self) -> None:
        if self.textfile is not None:
            self.textfile.parent.mkdir(parents=True, exist_ok=True)
            write_to_textfile(str(self.textfile), self.registry)

    # ------------------------------------------------------------------------------------------- a pass
    def observe(self, out: Any) -> None:
        """Record one pass; never raises (a metrics failure is logged)."""
        try:
            self._observe(out)
            self.write_textfile()
        except Exception as exc:  # noqa: BLE001 - metrics must never stop enforcement
            log.warning("agent metrics: %s", exc)

    def _observe(self, out: Any) -> None:
        cl, now = self.cluster, self.wall_clock()
        result = str(out.result)
        self.passes.labels(cl, result).inc()
        if result in ERROR_RESULTS:
            self.errors.labels(cl, result).inc()
        self.last_pass.labels(cl).set(now)
        self.hour.labels(cl).set(out.hour.timestamp())
        if result not in ("applied", "unchanged"):
            return  # a failed pass applied nothing: the gauges keep the last applied state
        self.last_success.labels(cl).set(now)
        for m in sorted({*MODES, str(out.mode)}):
            self.mode.labels(cl, m).set(1.0 if m == out.mode else 0.0)
        self.allowance.labels(cl).set(_f(out.allowance_cores) if out.mode == "shaped" else math.nan)
        self.plan_allowance.labels(cl).set(_f(out.plan_allowance_cores))
        self.vcc.labels(cl).set(_f(out.vcc_cores))
        self.cap.clear()
        self.limit.clear()
        for name, entry in sorted((out.caps or {}).items()):
            flexible = "true" if entry.get("flexible") else "false"
            self.cap.labels(cl, name, flexible).set(_f(entry.get("powercap_kw")) * 1000.0)
            self.limit.labels(cl, name, flexible).set(_f(entry.get("cpu_limit_cores")))
        self.plan_info.clear()
        plan = out.plan
        if plan is None:
            self.plan_age.labels(cl).set(math.nan)
        else:
            self.plan_info.labels(cl, str(plan.plan_date), str(plan.run_id or ""), str(plan.status),
                                  str(getattr(plan, "program", "") or "")).set(1.0)
            planned_at = getattr(plan, "planned_at", None)
            age = (out.hour - planned_at).total_seconds() if planned_at is not None else math.nan
            self.plan_age.labels(cl).set(age)
        dev = out.deviation if out.mode == "shaped" else None
        if dev is not None and dev.reason == "deadline-release" and out.hour not in self._released_hours:
            self._released_hours = {h for h in self._released_hours if h >= out.hour} | {out.hour}
            self.deadline_releases.labels(cl).inc()


__all__ = ["AgentMetrics"]
