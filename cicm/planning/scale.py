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

from cicm.config import Fleet
from cicm.demo.scale_fleet import scale_fleet, scale_power_telemetry, scale_usage_history, write_fleet_toml
from cicm.store import Store

#: Seeding writes the history of at most this many clusters (whole campuses) per run, i.e. per transaction: DuckDB
#: holds a transaction's new rows and their primary-key entries in memory until it commits (10,000 clusters in one
#: transaction peaked at 10.3 GiB).
SEED_CLUSTERS_PER_RUN = 500


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
        info = seed_scale_store(store, fleet, seed=seed, held_back_days=1)
    last_day = fleet.history_end - pd.Timedelta(days=1)
    usage = scale_usage_history(fleet, seed, start=last_day)
    power = scale_power_telemetry(fleet, usage, seed)
    telemetry.mkdir(parents=True, exist_ok=True)
    usage.to_parquet(telemetry / "usage.parquet", index=False)
    power.to_parquet(telemetry / "power.parquet", index=False)
    return {"fleet": str(fleet_path), "db": str(db_path), "telemetry": str(telemetry), "clusters": n_clusters,
            "campuses": len(fleet.campuses), "plan_date": str(fleet.default_plan_date), **info}


def seed_scale_store(store: Store, fleet: Fleet, seed: int = 0, held_back_days: int = 1,
                     clusters_per_run: int = SEED_CLUSTERS_PER_RUN) -> dict:
    """Seed a store for a `scale_fleet`: usage over its history and power over the last 14 days, except the last
    `held_back_days` (which the timed nightly ingestion then brings in), and the zones' carbon history. Written
    campus by campus, in runs (transactions) of at most ``clusters_per_run`` clusters, so that memory stays
    bounded whatever the fleet's size; the last run also holds the carbon history. Returns the row counts, the
    zones and the runs."""
    from cicm.demo.scale_fleet import POWER_TELEMETRY_DAYS
    from cicm.planning.ingest import import_carbon_history

    fleet.require_demo("seeding a scale fleet")
    assert fleet.history_start is not None and fleet.history_end is not None
    end = fleet.history_end - pd.Timedelta(days=held_back_days)
    power_start = fleet.history_end - pd.Timedelta(days=POWER_TELEMETRY_DAYS)
    zones = sorted({c.grid_zone for c in fleet.campuses})
    groups: list[list[str]] = []
    size = 0
    for campus in fleet.campuses:
        if groups and size + len(campus.clusters) <= clusters_per_run:
            groups[-1].append(campus.name)
            size += len(campus.clusters)
        else:
            groups.append([campus.name])
            size = len(campus.clusters)
    usage_rows = power_rows = 0
    runs = []
    for k, group in enumerate(groups):
        params = {"fleet": fleet.name, "seed": seed, "clusters": len(fleet.clusters()), "end": end,
                  "campuses": f"{group[0]}..{group[-1]}", "part": f"{k + 1}/{len(groups)}"}
        with store.run("telemetry-import", params) as run:
            for name in group:
                usage = scale_usage_history(fleet, seed, end=end, campuses=[name])
                power = scale_power_telemetry(fleet, usage[usage["hour"] >= power_start], seed)
                usage_rows += store.upsert("usage_history", usage, run.run_id)
                power_rows += store.upsert("power_telemetry", power, run.run_id)
                del usage, power
            if k == len(groups) - 1:
                import_carbon_history(store, zones, fleet.history_start, fleet.history_end, seed, run.run_id)
        runs.append(run.run_id)
    return {"run_id": runs[-1], "runs": runs, "usage_rows": usage_rows, "power_rows": power_rows, "zones": zones}
