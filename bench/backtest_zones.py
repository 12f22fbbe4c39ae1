"""Closed-loop backtests of every zone and window, two at a time; prints the results tables of docs/backtests.md.

    .venv/bin/python bench/backtest_zones.py [--zones all|CISO,BPAT,...] [--start 2022-04-01,2022-10-01]
                                             [--days 60] [--seed 0] [--workers 2] [--out var/backtests/bench]

For every zone and window it prints each policy's cut in flexible-work carbon against carbon-agnostic and its
share of the perfect-foresight bound, the bound's smoothing-only part (no carbon signal needed), and the SLO
violations; then the issue-13 targets, each marked met or not.

Each zone runs `cicm backtest`'s code path (run_backtest, evaluate, write_report) in its own process and reports
its wall time and CPU time (the machine may be shared, so CPU time is the figure to compare), then the CPU split
by stage: each policy's simulation and planning, the experiment arm, the inputs, the metrics (evaluate) and the
report files. Writes
<out>/<zone>/ (the same report as the CLI) and <out>/bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ZONES = ("CISO", "BPAT", "MISO", "ERCO", "AZPS", "NYIS", "PJM", "SOCO")


#: The zones by CPU cost of a 60-day backtest, most expensive first (bench runs of 2026-12-05).
COST_RANK = ("AZPS", "CISO", "ERCO", "MISO", "SOCO", "PJM", "NYIS", "BPAT")
POLICIES = ("carbon-agnostic", "threshold", "threshold-guard", "cicm-ceiling", "planner", "oracle")


def one_zone(zone: str, start: str, days: int, seed: int, out: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    from cicm.backtest import report as R
    from cicm.backtest.runner import BacktestOptions, run_backtest

    wall, cpu = time.perf_counter(), time.process_time()
    bt = run_backtest(zone, date.fromisoformat(start), days, BacktestOptions(seed=seed))
    run_wall, run_cpu = time.perf_counter() - wall, time.process_time() - cpu
    cpu1 = time.process_time()
    ev = R.evaluate(bt)
    cpu2 = time.process_time()
    R.write_report(bt, ev, Path(out) / f"{zone}_{start}")
    cpu3 = time.process_time()
    doc = R.summary(bt, ev)
    stages: dict[str, float] = {}
    for seg in bt.segments:  # CPU seconds per policy (and the experiment arm), then the metrics and the report
        for name, sec in getattr(seg, "cpu_seconds", {}).items():
            stages[name] = stages.get(name, 0.0) + sec
    stages["inputs"] = run_cpu - sum(stages.values())
    stages.update({"evaluate": cpu2 - cpu1, "report": cpu3 - cpu2})
    doc["bench"] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                    "run_wall_s": run_wall, "run_cpu_s": run_cpu, "stages_cpu_s": stages}
    return doc


def stage_table(docs: list[dict]) -> str:
    """CPU seconds per stage, summed over the zone-windows (the stages of one zone run one after the other)."""
    total: dict[str, float] = {}
    for d in docs:
        for name, sec in d["bench"].get("stages_cpu_s", {}).items():
            total[name] = total.get(name, 0.0) + sec
    cpu = sum(d["bench"]["cpu_s"] for d in docs)
    lines = ["| stage | CPU s | share |", "|---|---:|---:|"]
    lines += [f"| {name} | {sec:.1f} | {100 * sec / cpu:.0f}% |" for name, sec in total.items()]
    lines.append(f"| all (per-zone CPU, summed) | {cpu:.1f} | 100% |")
    return "\n".join(lines)


def fmt(v, digits=1):
    return "—" if v is None else f"{v:,.{digits}f}"


def table(docs: list[dict]) -> str:
    lines = ["| zone | from | days | bound % (smoothing-only) | policy | flex cut % | share of bound % | shift cut % "
             "| kWh/kcore-h | SLO viol. | delay mean / p95 h | peak kW |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for d in docs:
        pol = {p["policy"]: p for p in d["policies"]}
        first = True
        for name in POLICIES:
            p = pol.get(name)
            if p is None:
                continue
            head = (f"| {d['zone']} | {d['start']} | {d['simulated_days']} | {fmt(p['bound_reduction_pct'])} "
                    f"({fmt(d['ceilings'].get('smoothing_bound_pct'))}) " if first else "| | | | ")
            first = False
            lines.append(head + f"| {name} | {fmt(p['flexible_reduction_pct'], 2)} | "
                         f"{fmt(p['bound_share_pct'], 1)} | {fmt(p['shift_reduction_pct'], 2)} | "
                         f"{fmt(p['kwh_per_kcore_hour'], 3)} | "
                         f"{p['slo_violations']}/{p['cluster_days']} | {fmt(p['delay_mean_hours'])} / "
                         f"{fmt(p['delay_p95_hours'])} | {fmt(p['peak_kw'], 0)} |")
    return "\n".join(lines)


def targets(docs: list[dict]) -> list[str]:
    """Issue 13's figures to reach, one line each, marked met or not."""
    out = []
    for d in docs:
        pol = {p["policy"]: p for p in d["policies"]}
        tag = f"{d['zone']} from {d['start']}"
        bound = pol["carbon-agnostic"]["bound_reduction_pct"]
        smooth = d["ceilings"].get("smoothing_bound_pct") or 0.0
        if "oracle" in pol and bound - smooth >= 5:
            share = pol["oracle"]["bound_share_pct"]
            out.append(f"{'met ' if share >= 90 else 'MISS'} oracle >= 90% of the bound: {tag}: {share:.1f}%")
        if "planner" in pol:
            p = pol["planner"]
            goal = {"CISO": 50 if d["start"].endswith("04-01") else 40, "ERCO": 25}.get(d["zone"])
            if goal:
                ok = p["bound_share_pct"] >= goal
                out.append(f"{'met ' if ok else 'MISS'} planner >= {goal}% of the bound: {tag}: "
                           f"{p['bound_share_pct']:.1f}%")
            rate = 100 * p["slo_violations"] / max(p["cluster_days"], 1)
            out.append(f"{'met ' if rate <= 1 else 'MISS'} planner SLO-violating cluster-days <= 1%: {tag}: "
                       f"{p['slo_violations']}/{p['cluster_days']} ({rate:.1f}%)")
            ok = p["flexible_reduction_pct"] >= -1e-9
            out.append(f"{'met ' if ok else 'MISS'} planner never above carbon-agnostic: {tag}: "
                       f"{p['flexible_reduction_pct']:+.2f}%")
    return out


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
    ap.add_argument("--zones", default="all")
    ap.add_argument("--start", default="2022-04-01,2022-10-01", help="first day of each window (comma list)")
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="var/backtests/bench")
    ap.add_argument("--reuse", action="store_true", help="only print the tables from <out>/<zone>/summary.json")
    args = ap.parse_args()
    zones = list(ZONES) if args.zones == "all" else [z.strip().upper() for z in args.zones.split(",")]
    t0 = time.perf_counter()
    docs = []
    starts = [s.strip() for s in args.start.split(",") if s.strip()]
    runs = [(z, s) for s in starts for z in zones]
    if args.reuse:
        docs = [json.loads((Path(args.out) / f"{z}_{s}" / "summary.json").read_text()) for z, s in runs]
        print(table(docs) + "\n\n" + experiment_table(docs) + "\n\n" + "\n".join(targets(docs)))
        return
    # Longest first (measured CPU, shaped campuses with more clusters cost more), so that the last worker to finish
    # does not start a long zone while the other idles.
    order = sorted(runs, key=lambda r: COST_RANK.index(r[0]) if r[0] in COST_RANK else -1)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {pool.submit(one_zone, z, s, args.days, args.seed, args.out): (z, s) for z, s in order}
        for fut in as_completed(futures):
            doc = fut.result()
            b = doc["bench"]
            print(f"{doc['zone']}: {b['wall_s']:.0f} s wall, {b['cpu_s']:.0f} s CPU (simulation + planning "
                  f"{b['run_cpu_s']:.0f} s CPU); hard checks {'ok' if doc['hard_checks_ok'] else 'FAILED'}",
                  flush=True)
            docs.append(doc)
    docs.sort(key=lambda d: (d["start"], zones.index(d["zone"])))
    total = time.perf_counter() - t0
    load = os.getloadavg()
    print(f"\n{len(runs)} zone-windows x {args.days} days in {total:.0f} s wall with {args.workers} workers "
          f"(load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; {os.cpu_count()} cores)\n")
    print(stage_table(docs))
    print()
    print(table(docs))
    print()
    print(experiment_table(docs))
    print()
    print("\n".join(targets(docs)))
    failed = [d["zone"] for d in docs if not d["hard_checks_ok"]]
    oracle_flags = [f"{d['zone']}:{c['name']}" for d in docs for c in d["checks"]
                    if c["name"].startswith("oracle:") and not c["ok"]]
    print(f"\nhard checks (perfect-foresight bound): {'all ok' if not failed else 'FAILED in ' + str(failed)}")
    print(f"program-oracle beaten beyond {0.5}%: {', '.join(oracle_flags) or 'never'}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench.json").write_text(json.dumps({"args": vars(args), "wall_s": total, "zones": docs},
                                                          indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
