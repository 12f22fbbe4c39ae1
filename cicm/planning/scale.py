"""Scale runs: a generated fleet of any size, a store seeded with its history, and its next night's telemetry.

`prepare_scale_run(folder, n)` writes
- `fleet.toml`: `scale_fleet(n)` (campuses of 100 clusters over the 8 bundled zones);
- `cicm.duckdb`: usage history from the trace year's start, 14 days of power telemetry and the zones' carbon
  history, all but the last day;
- `telemetry/usage.parquet`, `telemetry/power.parquet`: that last day, which `cicm plan --telemetry` ingests.
Then `cicm plan --fleet folder/fleet.toml --db folder/cicm.duckdb --telemetry folder/telemetry` is the nightly
plan of an n-cluster fleet.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cicm.demo.scale_fleet import scale_fleet, scale_power_telemetry, scale_usage_history, write_fleet_toml
from cicm.store import Store
from cicm.planning.ingest import import_scale_telemetry


def prepare_scale_run(folder: Path | str, n_clusters: int, seed: int = 0, clusters_per_campus: int = 100) -> dict:
    folder = Path(folder)
    fleet = scale_fleet(n_clusters, seed=seed, clusters_per_campus=clusters_per_campus)
    fleet_path = write_fleet_toml(fleet, folder / "fleet.toml")
    db_path = folder / "cicm.duckdb"
    telemetry = folder / "telemetry"
    stale = [db_path, db_path.with_suffix(".duckdb.wal"), *telemetry.glob("usage*.parquet"),
             *telemetry.glob("power*.parquet")]
    for path in stale:  # a rerun starts clean: no old WAL replayed, no old drop ingested
        path.unlink(missing_ok=True)
    with Store(db_path) as store:
        info = import_scale_telemetry(store, fleet, seed=seed, held_back_days=1)
    last_day = fleet.history_end - pd.Timedelta(days=1)
    usage = scale_usage_history(fleet, seed, start=last_day)
    power = scale_power_telemetry(fleet, usage, seed)
    telemetry.mkdir(parents=True, exist_ok=True)
    usage.to_parquet(telemetry / "usage.parquet", index=False)
    power.to_parquet(telemetry / "power.parquet", index=False)
    return {"fleet": str(fleet_path), "db": str(db_path), "telemetry": str(telemetry), "clusters": n_clusters,
            "campuses": len(fleet.campuses), "plan_date": str(fleet.default_plan_date), **info}
