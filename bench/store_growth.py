"""How big is a year of hourly telemetry, in DuckDB and in Parquet, and how long does compaction take?

Builds hourly telemetry for N clusters by tiling the demo fleet's real derived telemetry (10 clusters x 365 days
of 2022, `cicm.demo.telemetry`): tile k renames every cluster and power domain (`sj-a` -> `sj-a-0007`) and
multiplies every number by its own noise, 1 + 1% N(0, 1), so no two tiles compress alike. Rows go into a fresh
DuckDB file in a temp dir through the Store API (one run, one `Store.upsert` per tile and table), then:

    import       the full year of both tables, CHECKPOINT                         -> file A, write time
    compact      both tables before the newest day - 190 days (the default rule) -> compact time; file after
                 CHECKPOINT (DuckDB reuses freed blocks but does not shrink the file), then `rebuild_file`
    power 8 d    power only before newest - 8 days (force: the planner's power window is 8 days), rebuild
                 -> file D: the planner's hot window, 190 days of usage + 8 days of power
    all          everything (force) -> the whole year in Parquet (bytes E); rebuild -> file F, the empty store

Per cluster-year: DuckDB (A - F) / N, Parquet E / N; the 10,000-cluster figures are F + 10,000 x per-cluster.
Sizes are deterministic for a seed; times are medians of --repeats builds.

    .venv/bin/python bench/store_growth.py                      # 100 and 500 clusters (~6 min on 2 busy cores)
    .venv/bin/python bench/store_growth.py --sizes 50 --repeats 1
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cicm.config import load_fleet  # noqa: E402
from cicm.data.retention import (HOT_WINDOW_DAYS, archive_bytes, compact_history, history_view,  # noqa: E402
                                 latest_allowed_before, rebuild_file, store_size)
from cicm.data.store import Store  # noqa: E402
from cicm.demo.telemetry import demo_power_telemetry, demo_usage_history  # noqa: E402

USAGE_NUM = ["inflexible_cpu_cores", "flexible_cpu_cores", "reserved_cpu_cores", "flexible_arrived_core_hours"]
POWER_NUM = ["cpu_cores", "power_kw"]
TARGET = 10_000
POWER_WINDOW_DAYS = 8


def demo_year(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    fleet = load_fleet(None)
    usage = demo_usage_history(fleet, seed=seed)
    return usage, demo_power_telemetry(fleet, usage, seed=seed)


def tile(frame: pd.DataFrame, k: int, numeric: list[str], rng: np.random.Generator) -> pd.DataFrame:
    out = frame.copy()
    out["cluster"] = out["cluster"] + f"-{k:04d}"
    if "domain" in out:
        out["domain"] = out["domain"] + f"-{k:04d}"
    for col in numeric:
        out[col] = out[col].to_numpy() * (1.0 + 0.01 * rng.standard_normal(len(out)))
    return out


def measure(n_clusters: int, base: tuple[pd.DataFrame, pd.DataFrame], workdir: Path, seed: int) -> dict:
    usage10, power10 = base
    per_tile = usage10["cluster"].nunique()
    tiles = -(-n_clusters // per_tile)
    rng = np.random.default_rng(seed)
    db, archive = workdir / "store.duckdb", workdir / "archive"
    out: dict = {"clusters": tiles * per_tile}
    with Store(db) as store:
        write_s = 0.0
        with store.run("bench-import", {"clusters": tiles * per_tile}) as run:
            for k in range(tiles):
                u, p = tile(usage10, k, USAGE_NUM, rng), tile(power10, k, POWER_NUM, rng)  # not timed
                t0 = time.perf_counter()
                store.upsert("usage_history", u, run.run_id)
                store.upsert("power_telemetry", p, run.run_id)
                write_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        store.con.execute("CHECKPOINT")
        out["write_s"] = write_s + time.perf_counter() - t0
        size = store_size(store).set_index("table")
        out["usage_rows"] = int(size.loc["usage_history", "rows"])
        out["power_rows"] = int(size.loc["power_telemetry", "rows"])
        out["usage_table_bytes"] = int(size.loc["usage_history", "estimated_bytes"])
        out["power_table_bytes"] = int(size.loc["power_telemetry", "estimated_bytes"])
        out["file_year"] = db.stat().st_size
        limit = latest_allowed_before(store)
        newest_day = limit + timedelta(days=HOT_WINDOW_DAYS)
        hot = compact_history(store, limit, archive)
        out["compact_s"] = hot["seconds"]
        out["compact_rows"] = hot["rows"]
        out["file_after_compact"] = db.stat().st_size
    t0 = time.perf_counter()
    out["file_hot190"] = rebuild_file(db)["db_bytes_after"]
    out["rebuild_s"] = time.perf_counter() - t0
    with Store(db) as store:
        compact_history(store, newest_day - timedelta(days=POWER_WINDOW_DAYS), archive,
                        tables=("power_telemetry",), force=True)
    out["file_hot_planner"] = rebuild_file(db)["db_bytes_after"]
    with Store(db) as store:
        compact_history(store, newest_day + timedelta(days=1), archive, force=True)
        history_view(store, archive)
        t0 = time.perf_counter()
        n_back = store.con.execute("SELECT count(*) FROM usage_history_all").fetchone()[0]
        out["view_count_s"] = time.perf_counter() - t0
        assert n_back == out["usage_rows"], (n_back, out["usage_rows"])
        history_view(store, archive, dedupe=False)
        t0 = time.perf_counter()
        store.con.execute("SELECT count(*) FROM usage_history_all").fetchone()
        out["view_count_nodedupe_s"] = time.perf_counter() - t0
    out["parquet_usage"] = archive_bytes(archive, "usage_history")
    out["parquet_power"] = archive_bytes(archive, "power_telemetry")
    out["file_empty"] = rebuild_file(db)["db_bytes_after"]
    return out


def median_run(n: int, repeats: int, base, seed: int) -> dict:
    runs = []
    for r in range(repeats):
        with tempfile.TemporaryDirectory(prefix="cicm-store-growth-") as tmp:
            runs.append(measure(n, base, Path(tmp), seed + r))
    merged = {}
    for key in runs[0]:
        merged[key] = statistics.median(run[key] for run in runs)
    merged["repeats"] = repeats
    return merged


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def derived(m: dict) -> dict:
    n = m["clusters"]
    d = {
        "duckdb_per_cluster_year": (m["file_year"] - m["file_empty"]) / n,
        "duckdb_tables_only_per_cluster_year": (m["usage_table_bytes"] + m["power_table_bytes"]) / n,
        "parquet_per_cluster_year": (m["parquet_usage"] + m["parquet_power"]) / n,
        "parquet_usage_per_cluster_year": m["parquet_usage"] / n,
        "parquet_power_per_cluster_year": m["parquet_power"] / n,
        "hot190_per_cluster": (m["file_hot190"] - m["file_empty"]) / n,
        "hot_planner_per_cluster": (m["file_hot_planner"] - m["file_empty"]) / n,
    }
    d["duckdb_over_parquet"] = d["duckdb_per_cluster_year"] / d["parquet_per_cluster_year"]
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,500", help="cluster counts, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="builds per size; times are medians")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"duckdb {__import__('duckdb').__version__}")
    base = demo_year(args.seed)
    results = {}
    for n in sizes:
        t0 = time.perf_counter()
        results[n] = median_run(n, args.repeats, base, args.seed)
        print(f"  {n} clusters: {args.repeats} builds in {time.perf_counter() - t0:.0f} s", flush=True)

    print("\nper size (sizes deterministic; times: medians)")
    head = ["clusters", "usage rows", "power rows", "write s", "compact 190d s", "rebuild s",
            "DuckDB year", "after compact+CHECKPOINT", "rebuilt, 190 d hot", "rebuilt, planner hot",
            "empty store", "Parquet year", "count(*) _all s", "(no dedupe) s"]
    rows = []
    for n, m in results.items():
        rows.append([m["clusters"], f"{m['usage_rows']:,}", f"{m['power_rows']:,}", f"{m['write_s']:.1f}",
                     f"{m['compact_s']:.1f}", f"{m['rebuild_s']:.1f}", mib(m["file_year"]),
                     mib(m["file_after_compact"]), mib(m["file_hot190"]), mib(m["file_hot_planner"]),
                     mib(m["file_empty"]), mib(m["parquet_usage"] + m["parquet_power"]),
                     f"{m['view_count_s']:.2f}", f"{m['view_count_nodedupe_s']:.2f}"])
    for i, h in enumerate(head):
        print(f"  {h:>26}: " + " | ".join(f"{r[i]:>14}" for r in rows))

    print("\nper cluster (linear if the columns agree)")
    keys = ["duckdb_per_cluster_year", "duckdb_tables_only_per_cluster_year", "parquet_per_cluster_year",
            "parquet_usage_per_cluster_year", "parquet_power_per_cluster_year", "hot190_per_cluster",
            "hot_planner_per_cluster", "duckdb_over_parquet"]
    ds = {n: derived(m) for n, m in results.items()}
    for k in keys:
        vals = [ds[n][k] for n in sizes]
        fmt = (lambda v: f"{v:,.2f}x") if k == "duckdb_over_parquet" else (lambda v: f"{v / 1024:,.0f} KiB")
        print(f"  {k:>36}: " + " | ".join(f"{fmt(v):>12}" for v in vals))
    for n in sizes:
        m = results[n]
        print(f"  {n} clusters: write {m['write_s'] / m['clusters'] * 1000:.0f} ms/cluster-year, compact "
              f"{m['compact_s'] / m['compact_rows'] * 1e6:.2f} s per million rows archived")

    big = max(sizes)
    d, m = ds[big], results[big]
    print(f"\nextrapolated to {TARGET:,} clusters x 1 year (from the {big}-cluster build)")
    print(f"  DuckDB, whole year in the store:      {gib(m['file_empty'] + TARGET * d['duckdb_per_cluster_year'])}"
          f"  ({TARGET * 8760:,} usage + {TARGET * 2 * 8760:,} power rows)")
    print(f"  Parquet zstd, whole year archived:    {gib(TARGET * d['parquet_per_cluster_year'])}")
    print(f"  DuckDB, 190 days of both tables:      {gib(m['file_empty'] + TARGET * d['hot190_per_cluster'])}")
    print(f"  DuckDB, planner's hot window "
          f"(190 d usage + 8 d power): {gib(m['file_empty'] + TARGET * d['hot_planner_per_cluster'])}")
    scale = TARGET / m["clusters"]
    print(f"  write time (linear): {m['write_s'] * scale / 60:,.0f} min; 190-day compaction: "
          f"{m['compact_s'] * scale / 60:,.1f} min; rebuild: {m['rebuild_s'] * scale / 60:,.1f} min")


if __name__ == "__main__":
    main()
