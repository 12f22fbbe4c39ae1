"""Closed-loop backtests of every zone, two at a time; prints the results table of docs/backtests.md.

    .venv/bin/python bench/backtest_zones.py [--zones CISO,BPAT,...|all] [--start 2022-04-01] [--days 60]
                                             [--seed 0] [--workers 2] [--out var/backtests/bench]

Each zone runs `cicm backtest`'s code path (run_backtest, evaluate, write_report) in its own process and reports
its wall time and CPU time (the machine may be shared, so CPU time is the figure to compare). Writes
<out>/<zone>/ (the same report as the CLI) and <out>/bench.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ZONES = ("CISO", "BPAT", "MISO", "ERCO", "AZPS", "NYIS", "PJM", "SOCO")


def one_zone(zone: str, start: str, days: int, seed: int, out: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    from cicm.backtest import report as R
    from cicm.backtest.runner import BacktestOptions, run_backtest

    wall, cpu = time.perf_counter(), time.process_time()
    bt = run_backtest(zone, date.fromisoformat(start), days, BacktestOptions(seed=seed))
    run_wall, run_cpu = time.perf_counter() - wall, time.process_time() - cpu
    ev = R.evaluate(bt)
    R.write_report(bt, ev, Path(out) / zone)
    doc = R.summary(bt, ev)
    doc["bench"] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                    "run_wall_s": run_wall, "run_cpu_s": run_cpu}
    return doc


def fmt(v, digits=1):
    return "—" if v is None else f"{v:,.{digits}f}"


def table(docs: list[dict]) -> str:
    lines = ["| zone | campus | days | ceiling % (DESIGN / window) | bound % | policy | flex cut % | shift cut % "
             "| total cut % | kWh/kcore-h | SLO viol. | delay mean / p95 h | peak kW |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for d in docs:
        pol = {p["policy"]: p for p in d["policies"]}
        first = True
        for name in ("carbon-agnostic", "threshold", "threshold-guard", "planner", "planner-guard", "oracle"):
            p = pol.get(name)
            if p is None:
                continue
            head = (f"| {d['zone']} | {d['campus']} | {d['simulated_days']} | {fmt(d['ceilings']['design_pct'])} / "
                    f"{fmt(d['ceilings']['window_pct'])} | {fmt(p['bound_reduction_pct'])} " if first
                    else "| | | | | ")
            first = False
            lines.append(head + f"| {name} | {fmt(p['flexible_reduction_pct'], 2)} | "
                         f"{fmt(p['shift_reduction_pct'], 2)} | {fmt(p['total_reduction_pct'], 2)} | "
                         f"{fmt(p['kwh_per_kcore_hour'], 3)} | "
                         f"{p['slo_violations']}/{p['cluster_days']} | {fmt(p['delay_mean_hours'])} / "
                         f"{fmt(p['delay_p95_hours'])} | {fmt(p['peak_kw'], 0)} |")
    return "\n".join(lines)


def experiment_table(docs: list[dict]) -> str:
    lines = ["| zone | cluster-days (treated) | effect in top-carbon hours | 95% CI (bootstrap) | simulator truth |",
             "|---|---:|---:|---:|---:|"]
    for d in docs:
        e = d.get("experiment")
        if not e:
            continue
        lines.append(f"| {d['zone']} | {e['n']} ({e['n_treated']}) | {fmt(e['effect_pct'], 2)}% | "
                     f"{fmt(e['ci_low_pct'], 2)} to {fmt(e['ci_high_pct'], 2)}% | {fmt(e['true_effect_pct'], 2)}% |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zones", default="CISO,BPAT,MISO,ERCO")
    ap.add_argument("--start", default="2022-04-01")
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="var/backtests/bench")
    ap.add_argument("--reuse", action="store_true", help="only print the tables from <out>/<zone>/summary.json")
    args = ap.parse_args()
    zones = list(ZONES) if args.zones == "all" else [z.strip().upper() for z in args.zones.split(",")]
    t0 = time.perf_counter()
    docs = []
    if args.reuse:
        docs = [json.loads((Path(args.out) / z / "summary.json").read_text()) for z in zones]
        print(table(docs) + "\n\n" + experiment_table(docs))
        return
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {pool.submit(one_zone, z, args.start, args.days, args.seed, args.out): z for z in zones}
        for fut in as_completed(futures):
            doc = fut.result()
            b = doc["bench"]
            print(f"{doc['zone']}: {b['wall_s']:.0f} s wall, {b['cpu_s']:.0f} s CPU (simulation + planning "
                  f"{b['run_cpu_s']:.0f} s CPU); hard checks {'ok' if doc['hard_checks_ok'] else 'FAILED'}",
                  flush=True)
            docs.append(doc)
    docs.sort(key=lambda d: zones.index(d["zone"]))
    total = time.perf_counter() - t0
    print(f"\n{len(zones)} zones x {args.days} days in {total:.0f} s wall with {args.workers} workers\n")
    print(table(docs))
    print()
    print(experiment_table(docs))
    failed = [d["zone"] for d in docs if not d["hard_checks_ok"]]
    oracle_flags = [f"{d['zone']}:{c['name']}" for d in docs for c in d["checks"]
                    if c["name"].startswith("oracle:") and not c["ok"]]
    print(f"\nhard checks (perfect-foresight bound, ceiling): {'all ok' if not failed else 'FAILED in ' + str(failed)}")
    print(f"program-oracle beaten beyond {0.5}%: {', '.join(oracle_flags) or 'never'}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench.json").write_text(json.dumps({"args": vars(args), "wall_s": total, "zones": docs},
                                                          indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
