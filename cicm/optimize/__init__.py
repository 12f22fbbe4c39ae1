"""The VCC program (CICM's risk-aware optimisation), its inputs and outputs as plain data, and the fallbacks.

Pure: arrays and dataclasses in, dataclasses and data frames out; no I/O, no Prefect, no DuckDB.
See docs/optimizer.md.
"""
from cicm.optimize.fallback import (
    REASON_INFEASIBLE,
    REASON_INSUFFICIENT_HISTORY,
    REASON_NO_FLEXIBLE_WORK,
    REASON_SLO_FEEDBACK,
    REASON_SOLVER_ERROR,
    REASON_TOO_FULL,
    STATUS_FALLBACK,
    STATUS_SHAPED,
)
from cicm.optimize.inputs import DAY_LENGTHS, SOLVERS, CampusInput, ClusterInput, PowerCurve
from cicm.optimize.program import (
    CLUSTER_COLUMNS,
    HOURLY_COLUMNS,
    POWER_CURVE_CONVEX,
    POWER_CURVE_HULL,
    POWER_LINEAR,
    CampusPlan,
    campus_targets,
    concat_plans,
    plan_campus,
    plan_fleet,
)

__all__ = [
    "CampusInput", "ClusterInput", "PowerCurve", "CampusPlan", "plan_campus", "plan_fleet", "concat_plans",
    "campus_targets", "HOURLY_COLUMNS", "CLUSTER_COLUMNS", "DAY_LENGTHS", "SOLVERS",
    "STATUS_SHAPED", "STATUS_FALLBACK", "REASON_INSUFFICIENT_HISTORY", "REASON_SLO_FEEDBACK",
    "REASON_NO_FLEXIBLE_WORK", "REASON_TOO_FULL", "REASON_INFEASIBLE", "REASON_SOLVER_ERROR",
    "POWER_LINEAR", "POWER_CURVE_CONVEX", "POWER_CURVE_HULL",
]
