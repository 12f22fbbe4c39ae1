"""Battery and solar in the plan (issue 16): prints the figures of docs/storage_coplan.md.

    .venv/bin/python bench/storage_coplan.py [--zones CISO] [--starts 2022-03-01,2022-06-01,2022-09-01,2022-12-01]
                                             [--days 14] [--solar 1.0,2.5] [--battery-hours 2] [--rte 0.85]
                                             [--json var/storage_coplan.json]

1. The solar forecast scored against the real irradiance of pvlib's Greensboro TMY3 (cicm.models.solar.score_tmy).
2. For every zone, window and solar size, cicm.backtest.storage.run_storage_backtest: total carbon of the site
   (grid energy x actual intensity, charging included, stored energy left at the end credited) under no battery,
   the agent's heuristic, the battery planned alone, co-planning (on the forecasts; on the actual solar; on the
   actual solar and carbon, still rolling day by day) and the perfect-foresight bound; the cut against no battery,
   co-planning's extra cut against the heuristic, every policy's share of the bound's cut; the largest hourly
   energy-balance error.
3. Medians over the windows, per zone and solar size.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    import warnings

    import numpy as np
    import pandas as pd

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    from cicm.backtest.storage import SiteSpec, run_storage_backtest
    from cicm.models.solar import score_tmy

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zones", default="CISO")
    ap.add_argument("--starts", default="2022-03-01,2022-06-01,2022-09-01,2022-12-01")
    ap.add_argument("--days", type=int, default=14)
    ap.add_argument("--solar", default="1.0,2.5", help="kWp per kW of mean campus load, comma-separated")
    ap.add_argument("--battery-hours", type=float, default=2.0)
    ap.add_argument("--c-rate", type=float, default=0.5)
    ap.add_argument("--rte", type=float, default=0.85)
    ap.add_argument("--hurdle", default="0,0.1", help="the planners' cycling hurdle, share of mean forecast carbon; "
                                                   "comma-separated")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 20)

    print("== solar forecast, scored on real irradiance (NREL TMY3 Greensboro NC, 1,000 kWp, tilt 20, south) ==")
    sc = score_tmy()
    print(pd.DataFrame(sc["scores"]).T.round(2).to_string())
    print(f"actual capacity factor {sc['actual_capacity_factor_pct']:.1f}% over {sc['hours']} hours\n")

    rows = []
    for zone in args.zones.split(","):
        for solar, hurdle in [(float(s), float(h)) for s in args.solar.split(",") for h in args.hurdle.split(",")]:
            for start in args.starts.split(","):
                spec = SiteSpec(battery_hours=args.battery_hours, c_rate=args.c_rate,
                                round_trip_efficiency=args.rte, solar_kwp_per_kw=solar, hurdle=hurdle)
                wall, cpu = time.perf_counter(), time.process_time()
                bt = run_storage_backtest(zone, date.fromisoformat(start), args.days, spec)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                t = bt.table()
                tot = t["total_kgco2"]
                nb, he, co, bd, bp = (tot[p] for p in ("no-battery", "heuristic", "co-plan", "bound", "battery-plan"))
                row = {"zone": zone, "start": start, "solar_kwp_per_kw": solar, "hurdle": hurdle,
                       "mean_load_kw": bt.mean_load_kw,
                       "battery_kwh": bt.battery.capacity_kwh, **{f"cut_{p}_pct": t.loc[p, "cut_vs_no_battery_pct"]
                                                                   for p in t.index if p != "no-battery"},
                       "coplan_extra_vs_heuristic_pct": 100 * (he - co) / he,
                       "coplan_extra_vs_heuristic_pts": 100 * (he - co) / nb,
                       "coplan_extra_vs_battery_plan_pct": 100 * (bp - co) / bp,
                       **{f"share_of_bound_{p}_pct": 100 * (nb - tot[p]) / (nb - bd) if nb > bd else float("nan")
                          for p in t.index if p not in ("no-battery", "bound")},
                       "no_battery_kgco2": nb, "curtailed_no_battery_mwh": t.loc["no-battery", "curtailed_mwh"],
                       "curtailed_coplan_mwh": t.loc["co-plan", "curtailed_mwh"],
                       "loss_coplan_mwh": t.loc["co-plan", "loss_mwh"], "loss_heuristic_mwh": t.loc["heuristic", "loss_mwh"],
                       "max_balance_error_kw": float(t["max_balance_error_kw"].max()), "wall_s": wall, "cpu_s": cpu}
                rows.append(row)
                print(f"== {zone} from {start}, {args.days} days, solar {solar:g} kWp/kW, hurdle {hurdle:g} "
                      f"(mean load {bt.mean_load_kw:.0f} kW, battery {bt.battery.capacity_kwh:.0f} kWh / "
                      f"{bt.battery.max_charge_kw:.0f} kW, rte {bt.battery.round_trip_efficiency:.2f}); "
                      f"{wall:.1f} s wall, {cpu:.1f} s CPU ==")
                print(t[["total_kgco2", "cut_vs_no_battery_pct", "grid_mwh", "solar_used_mwh", "curtailed_mwh",
                         "loss_mwh", "discharged_mwh", "max_balance_error_kw", "late_core_hours"]].round(3).to_string())
                print()
    frame = pd.DataFrame(rows)
    cols = [c for c in frame.columns if c.startswith(("cut_", "coplan_", "share_of_bound"))] + ["max_balance_error_kw"]
    print("== medians over the windows ==")
    med = frame.groupby(["zone", "solar_kwp_per_kw", "hurdle"])[cols].median().T
    print(med.round(3).to_string())
    print(f"\nlargest hourly balance error over every run: {frame['max_balance_error_kw'].max():.2e} kW; "
          f"{frame['wall_s'].sum():.0f} s wall, {frame['cpu_s'].sum():.0f} s CPU in all")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"solar_score": sc, "runs": rows}, indent=1, default=float))
    assert np.isfinite(frame["max_balance_error_kw"]).all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
