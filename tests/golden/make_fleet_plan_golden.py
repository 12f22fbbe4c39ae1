"""Writes tests/golden/fleet_plan_24.parquet: the plan tables of the 24-cluster scale run (seed 3, campuses of 4)
planned in process, as `test_fleet_scale.test_plan_equals_the_recorded_plan` compares them. Rerun (and commit the
file) only when a change is meant to change plans:

    .venv/bin/python tests/golden/make_fleet_plan_golden.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pandas as pd

GOLDEN = Path(__file__).with_name("fleet_plan_24.parquet")
TABLES = {"current_vccs": "cluster, hour", "current_vcc_status": "cluster", "load_forecasts": "cluster, hour",
          "load_forecast_days": "cluster", "power_models": "domain"}


def plan_tables(folder: Path) -> dict[str, pd.DataFrame]:
    """Plan the scale run in ``folder`` (a copy of its store) and return the stored plan's tables."""
    import shutil

    from cicm.config import load_fleet
    from cicm.planning.options import PlanOptions
    from cicm.planning.runner import plan_in_process
    from cicm.store import Store

    db = folder / "golden-run.duckdb"
    shutil.copy(folder / "cicm.duckdb", db)
    fleet = load_fleet(folder / "fleet.toml")
    plan_in_process(fleet.default_plan_date, db, folder / "fleet.toml",
                    PlanOptions(runner="local", telemetry_dir=str(folder / "telemetry")))
    with Store(db, read_only=True) as store:
        return {t: store.query(f"SELECT * EXCLUDE (run_id) FROM {t} ORDER BY {order}") for t, order in TABLES.items()}


def long_form(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """All tables in one frame: table, row, column, value (text), number (float or NaN)."""
    rows = []
    for table, frame in tables.items():
        for column in frame.columns:
            values = frame[column]
            numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
            rows.append(pd.DataFrame({
                "table": table, "row": range(len(frame)), "column": column,
                "value": values.astype(object).where(values.notna(), "").astype(str).to_numpy(),
                "number": values.to_numpy(dtype=float) if numeric else float("nan")}))
    return pd.concat(rows, ignore_index=True)


def main() -> None:
    from cicm.planning.scale import prepare_scale_run

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare_scale_run(folder, 24, seed=3, clusters_per_campus=4)
        long_form(plan_tables(folder)).to_parquet(GOLDEN, index=False)
    print(f"wrote {GOLDEN}", file=sys.stderr)


if __name__ == "__main__":
    main()
