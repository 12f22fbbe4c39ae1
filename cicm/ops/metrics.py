"""The nightly plan's metrics, in Prometheus' textfile-collector format (node_exporter ``--collector.textfile``).

``write_plan_metrics(outcome)`` writes one file after each plan, atomically (``prometheus_client.write_to_textfile``
writes a temporary file and renames it), to the path given as ``path`` or by ``$CICM_METRICS_TEXTFILE``; without
either it does nothing. The flow (``flows/nightly.py``) calls it after every stored plan. A failure to write is
logged and never fails the plan.

``outcome`` is a :class:`cicm.planning.pipeline.PlanOutcome` (duck-typed: ``plan_date``, ``run_id``, ``status``,
``stages``, ``clusters`` and ``seconds``). Metric names and meanings: docs/metrics.md.
"""
from __future__ import annotations

import logging
import math
import os
import time
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

log = logging.getLogger("cicm.ops.metrics")

TEXTFILE_ENV = "CICM_METRICS_TEXTFILE"

PLAN_STATUSES = ("ok", "degraded", "failed")
STAGE_STATUSES = ("ran", "degraded", "failed", "not-built")
_STAGE_RANK = {"ran": 0, "not-built": 1, "degraded": 2, "failed": 3}
# Reasons an alert or the board reads: always exported (0 when no cluster has them), so the series exist.
ALWAYS_EXPORTED_REASONS = ("slo-feedback", "no-carbon-forecast")


def reason_code(reason: object) -> str:
    """The part of a fallback reason before ':' ("slo-feedback: shaping off until ..." -> "slo-feedback")."""
    if not isinstance(reason, str) or not reason.strip():
        return "unknown"
    return reason.split(":", 1)[0].strip() or "unknown"


def _day_start_utc(d: date) -> float:
    return datetime(d.year, d.month, d.day, tzinfo=timezone.utc).timestamp()


def _finite(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return 0.0
    return f if math.isfinite(f) else 0.0


def plan_registry(outcome: Any, now: float | None = None) -> CollectorRegistry:
    """A fresh registry holding the plan's metrics (one registry per plan: nothing global)."""
    now = time.time() if now is None else now
    reg = CollectorRegistry(auto_describe=True)

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=reg)

    # ---- the run
    written = gauge("cicm_plan_last_written_timestamp_seconds",
                    "When the nightly plan's metrics were last written (Unix time), whatever its status")
    written.set(now)
    success = gauge("cicm_plan_last_success_timestamp_seconds",
                    "When a plan was last stored (status ok or degraded), Unix time")
    status = str(outcome.status)
    if status in ("ok", "degraded"):
        success.set(now)
    plan_day = gauge("cicm_plan_date_timestamp_seconds",
                     "The planned day of the last plan: 00:00 UTC of its date (YYYY-MM-DD), Unix time")
    plan_day.set(_day_start_utc(outcome.plan_date))
    st = gauge("cicm_plan_status", "1 for the last plan's status (ok, degraded, failed), 0 for the others",
               ("status",))
    for s in sorted({*PLAN_STATUSES, status}):
        st.labels(s).set(1.0 if s == status else 0.0)
    info = gauge("cicm_plan_info", "The last plan: its date and run id (value 1)", ("plan_date", "run_id"))
    info.labels(str(outcome.plan_date), str(outcome.run_id or "")).set(1.0)

    # ---- stages
    durations = gauge("cicm_plan_stage_duration_seconds",
                      "Wall time of each step of the plan (plan_day's timed steps; partition steps are summed "
                      "over partitions)", ("stage",))
    for name, seconds in sorted((outcome.seconds or {}).items()):
        durations.labels(str(name)).set(_finite(seconds))
    durations_total = gauge("cicm_plan_duration_seconds", "Wall time of the plan: the sum of plan_day's top-level "
                                                          "steps (telemetry to store-write)")
    top = ("telemetry", "carbon-actuals", "carbon-forecast", "slo-feedback", "models-and-programs", "store-write")
    durations_total.set(sum(_finite((outcome.seconds or {}).get(k, 0.0)) for k in top))
    worst: dict[str, str] = {}
    for report in outcome.stages or []:
        name, s = str(report.name), str(report.status)
        if name not in worst or _STAGE_RANK.get(s, 1) > _STAGE_RANK.get(worst[name], 1):
            worst[name] = s
    stage_status = gauge("cicm_plan_stage_status",
                         "1 for each stage's status in the last plan (ran, degraded, failed, not-built; the worst "
                         "when a stage reports more than once), 0 for the others", ("stage", "status"))
    for name in sorted({*worst, "carbon-forecast", "slo-feedback", "telemetry"}):
        s = worst.get(name, "not-built")
        for candidate in sorted({*STAGE_STATUSES, s}):
            stage_status.labels(name, candidate).set(1.0 if candidate == s else 0.0)

    # ---- clusters
    clusters = outcome.clusters
    by_status = gauge("cicm_plan_clusters", "Clusters in the last plan by status (shaped, fallback)", ("status",))
    fallback = gauge("cicm_plan_fallback_clusters", "Clusters of the last plan that fall back, by reason code "
                                                    "(the part of the reason before ':')", ("reason",))
    counts: dict[str, int] = {"shaped": 0, "fallback": 0}
    reasons: dict[str, int] = dict.fromkeys(ALWAYS_EXPORTED_REASONS, 0)
    plan_kg = flat_kg = 0.0
    if clusters is not None and len(clusters):
        for row in clusters.to_dict("records"):
            s = str(row.get("status"))
            counts[s] = counts.get(s, 0) + 1
            if s != "shaped":
                code = reason_code(row.get("reason"))
                reasons[code] = reasons.get(code, 0) + 1
            plan_kg += _finite(row.get("plan_kgco2"))
            flat_kg += _finite(row.get("flat_kgco2"))
    for s, n in sorted(counts.items()):
        by_status.labels(s).set(n)
    for code, n in sorted(reasons.items()):
        fallback.labels(code).set(n)
    gauge("cicm_plan_expected_emissions_kgco2", "Expected emissions of the plan's day, all clusters (kgCO2)") \
        .set(plan_kg)
    gauge("cicm_plan_unshaped_emissions_kgco2", "Expected emissions of the same day unshaped (flat), all clusters "
                                                "(kgCO2)").set(flat_kg)
    gauge("cicm_plan_expected_saving_kgco2", "Expected saving of the plan against unshaped (kgCO2)") \
        .set(flat_kg - plan_kg)
    gauge("cicm_plan_expected_saving_percent", "Expected saving of the plan against unshaped (% of unshaped)") \
        .set(100.0 * (1.0 - plan_kg / flat_kg) if flat_kg > 0 else 0.0)
    return reg


def textfile_path(path: str | Path | None = None) -> Path | None:
    """``path``, else ``$CICM_METRICS_TEXTFILE``, else None (no metrics written)."""
    if path:
        return Path(path)
    env = os.environ.get(TEXTFILE_ENV)
    return Path(env) if env else None


def write_plan_metrics(outcome: Any, path: str | Path | None = None, now: float | None = None) -> Path | None:
    """Write the plan's metrics to the textfile (see the module doc). Returns the path written, or None."""
    target = textfile_path(path)
    if target is None:
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(target), plan_registry(outcome, now))
    except Exception as exc:  # noqa: BLE001 - metrics must never cost the fleet its plan
        log.warning("could not write the plan's metrics to %s: %s", target, exc)
        return None
    return target


__all__ = ["TEXTFILE_ENV", "plan_registry", "reason_code", "textfile_path", "write_plan_metrics"]
