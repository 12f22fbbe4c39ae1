"""The nightly planner's knobs, defaults and bounds: one settings object for `cicm plan`, the flow and the
backtests (``cicm.backtest.runner.BacktestOptions`` extends it). Light on purpose: no store, no solver."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cicm.errors import InputError

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class PlanOptions:
    provider: str = "trace"
    base_url: str | None = None
    csv_path: str | None = None
    seed: int = 0
    gamma: float = 0.05
    lambda_e: float = 1.0
    lambda_p: float = 0.0
    delta_min: float = -1.0
    delta_max: float = 1.0
    ramp_limit: float | None = None
    solver: str = "HIGHS"
    min_forecast_value_pct: float = 3.0
    fetch_retries: int = 2
    fetch_retry_delay_seconds: float = 2.0
    runner: str = "auto"  # "local" | "dask" | "auto" (see choose_runner)
    dask_address: str | None = None  # tcp://scheduler:8786; None with runner dask: a local cluster
    dask_workers: int = 2  # worker processes of a local Dask cluster
    telemetry_dir: str | None = None  # new usage*/power*.parquet to ingest before planning
    program: str = "queue"  # "queue" (the queue-aware program) | "ceiling" (CICM's VCC program, a baseline)
    horizon_hours: int = 48  # queue program: look-ahead from planning time (only the planning day is committed)
    planning_margin_hours: float = 6.0  # queue program: deadlines planned this much early
    arrival_quantile: float = 0.9  # queue program: upper quantile of arrivals behind the VCC's margin
    rewrite_history: bool = False  # let the night's telemetry replace stored hours with other values (audited)
    as_of: str | None = None  # ISO-8601 with offset: plan as if the clock read this (a missed night's re-run)

    def now(self) -> "pd.Timestamp":
        """The planning clock: ``as_of`` if given, else the wall clock (UTC). Telemetry is read up to it, live
        forecasts and actuals are judged against it."""
        import pandas as pd

        if self.as_of is None:
            return pd.Timestamp.now(tz="UTC")
        return pd.Timestamp(self.as_of).tz_convert("UTC")

    def validate(self) -> None:
        """Refuse knobs the planner cannot use, naming the field. The one source of the planner's defaults and
        bounds: `cicm plan`, the flow and the backtests (BacktestOptions extends this class) use these."""
        if self.program not in PROGRAMS:
            raise InputError("program", f"must be one of {', '.join(PROGRAMS)}, got {self.program!r}")
        if not 24 <= self.horizon_hours <= 72:
            raise InputError("horizon_hours", f"must be in [24, 72], got {self.horizon_hours}")
        if not 0 <= self.planning_margin_hours < 24:
            raise InputError("planning_margin_hours", f"must be in [0, 24), got {self.planning_margin_hours}")
        if not 0.5 <= self.arrival_quantile < 1:
            raise InputError("arrival_quantile", f"must be in [0.5, 1), got {self.arrival_quantile}")
        if not 0 < self.gamma < 0.5:
            raise InputError("gamma", f"must be in (0, 0.5), got {self.gamma}")
        if self.as_of is not None:
            import pandas as pd

            try:
                stamp = pd.Timestamp(self.as_of)
            except (ValueError, TypeError) as exc:
                raise InputError("as_of", f"not a time: {self.as_of!r}") from exc
            if stamp is pd.NaT or stamp.tzinfo is None:
                raise InputError("as_of", f"give a time with its offset, e.g. 2026-12-04T18:00Z; got {self.as_of!r}")


PROGRAMS = ("queue", "ceiling")
