"""Closed-loop backtests on the real traces: a job-level cluster simulator, the policies (carbon-agnostic,
threshold suspend/resume, our planner, the oracle), metrics, checks and the randomised experiment.

Prefect-free and DuckDB-free; `flows.backtest` wraps it in a flow and `cicm.backtest.cli` is `cicm backtest`.
See docs/backtests.md.
"""
