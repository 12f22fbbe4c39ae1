"""The backtest as a Prefect flow: one task per grid zone, each writing its report folder.

The work is in :mod:`cicm.backtest` (no Prefect there); this only schedules it and leaves a markdown artifact.
Results go to the report folders (summary.json, CSVs, PNGs), not to DuckDB.
"""
from __future__ import annotations

from datetime import date
from pathlib import Path

import flows  # noqa: F401  (configures Prefect before it is imported)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from cicm.backtest import report as R
from cicm.backtest.runner import BacktestOptions, run_backtest


@task(name="backtest-zone", cache_policy=NO_CACHE)
def backtest_zone_task(zone: str, start: date, days: int, out_dir: str, options: BacktestOptions,
                       fleet_path: str | None = None) -> dict:
    from cicm.config import load_fleet

    bt = run_backtest(zone, start, days, options, fleet=load_fleet(fleet_path))
    ev = R.evaluate(bt)
    folder = Path(out_dir) / zone
    R.write_report(bt, ev, folder)
    doc = R.summary(bt, ev)
    doc["report_dir"] = str(folder)
    doc["markdown"] = R.markdown(bt, ev)
    return doc


@flow(name="backtest", flow_run_name="backtest-{start}-{days}d")
def backtest_flow(zones: list[str], start: date, days: int, out_dir: str, seed: int = 0,
                  fleet_path: str | None = None) -> list[dict]:
    logger = get_run_logger()
    options = BacktestOptions(seed=seed)
    options.validate()
    docs = []
    for zone in zones:
        doc = backtest_zone_task(zone, start, days, out_dir, options, fleet_path)
        logger.info("%s: %s (hard checks %s)", zone, doc["report_dir"], "ok" if doc["hard_checks_ok"] else "FAILED")
        docs.append(doc)
    create_markdown_artifact("\n\n".join(d.pop("markdown") for d in docs), key=f"backtest-{start}-{days}d",
                             description="closed-loop backtests")
    return docs
