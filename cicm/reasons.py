"""The plan's states (stage, run, cluster) and why a cluster is not shaped: a code from a short list and a
free-text detail, written ``code: detail``.

The plan stores both parts in their own columns (``vcc_status.reason_code`` and ``reason_detail``, beside the
full text in ``reason``); this module is the one place that splits or joins them.
"""
from __future__ import annotations

from enum import StrEnum


class StageStatus(StrEnum):
    """How a stage of the nightly plan went."""

    RAN = "ran"
    DEGRADED = "degraded"  # it ran, with fallbacks or refused input (stored with their reasons)
    FAILED = "failed"
    NOT_BUILT = "not-built"


class RunStatus(StrEnum):
    """How a run (a plan, an ingestion, a check) ended, as the runs table stores it."""

    OK = "ok"
    DEGRADED = "degraded"
    FAILED = "failed"


class ClusterStatus(StrEnum):
    """A cluster's plan: shaped by the program, or a fallback (full machines) with its reason."""

    SHAPED = "shaped"
    FALLBACK = "fallback"


class FallbackCode(StrEnum):
    LOW_BENEFIT = "low-benefit"  # following the zone's forecasts has not paid (the forecast-value gate)
    INSUFFICIENT_HISTORY = "insufficient-history"  # too little usage history to forecast the load
    BAD_HISTORY = "bad-history"  # the usage history was refused (the detail names the column)
    NO_POWER_MODEL = "no-power-model"  # a power domain has no usable fit
    NO_CARBON_FORECAST = "no-carbon-forecast"  # the zone's forecast is missing or refused
    SLO_FEEDBACK = "slo-feedback"  # the SLO loop switched shaping off
    OPERATOR_PAUSE = "operator-pause"  # an operator paused shaping (cicm shaping pause)
    NO_FLEXIBLE_WORK = "no-flexible-work"  # no flexible work forecast: nothing to shape
    TOO_FULL = "too-full"  # the work cannot be shaped within the machines
    INFEASIBLE = "infeasible"  # the program has no solution
    SOLVER_ERROR = "solver-error"  # the solver failed
    NO_PLAN = "no-plan"  # the program did not plan the cluster


def split_reason(reason: object) -> tuple[str | None, str | None]:
    """``"code: detail"`` -> ``(code, detail)``; ``"code"`` -> ``(code, None)``; no reason -> ``(None, None)``."""
    if not isinstance(reason, str) or not reason:
        return None, None
    code, _, detail = reason.partition(": ")
    return code, (detail or None)


def join_reason(code: str, detail: str | None = None) -> str:
    return f"{code}: {detail}" if detail else str(code)
