"""A backtest's report: summary.json, CSV tables and PNG plots in one folder, plus report.md that shows them.

Files (the dashboard can read them; nothing here writes to DuckDB):

- ``summary.json``: zone, campus, window, options, ceilings, one row per policy, the checks, the experiment.
- ``policies.csv``: the per-policy metrics (:func:`cicm.backtest.metrics.policy_table`).
- ``cluster_days.csv``: per cluster-day: planner and oracle status/reason, experiment assignment, SLO outcome.
- ``hourly.csv``: per policy, cluster and simulated hour: inflexible and flexible usage, cap, VCC, power, actual
  and forecast carbon.
- ``power_curves.png``: the experiment's mean power by local hour, treated vs untreated cluster-days.
- ``days.png``: a few days of one cluster: actual and forecast carbon; VCC, cap and usage of planner and oracle.
- ``report.md``: the table, the checks, the experiment and the plots.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from cicm.reasons import split_reason
from cicm.backtest import metrics as M
from cicm.backtest.accounting import ClusterPower
from cicm.backtest.closed_loop import day_from_number, local_day_numbers
from cicm.backtest.policies import BASELINE
from cicm.backtest.runner import Backtest

#: Columns of the printed/markdown table, with their headers.
TABLE_COLUMNS = [
    ("policy", "policy"),
    ("flexible_kgco2", "flex kgCO2"),
    ("flexible_reduction_pct", "flex cut %"),
    ("shift_reduction_pct", "shift cut %"),
    ("total_reduction_pct", "total cut %"),
    ("bound_share_pct", "of bound %"),
    ("oracle_share_pct", "of oracle %"),
    ("kwh_per_kcore_hour", "kWh/kcore-h"),
    ("peak_kw", "peak kW"),
    ("slo_violations", "SLO viol."),
    ("delay_mean_hours", "delay mean h"),
    ("delay_p95_hours", "delay p95 h"),
]


def evaluate(bt: Backtest) -> dict:
    """Everything the report needs, computed once: table, checks, experiment, ceilings, cluster-days."""
    table = M.policy_table(bt)
    bound_row = table.set_index("policy").loc[BASELINE]
    base, bound = bound_row["flexible_kgco2"], bound_row["bound_kgco2"]
    table["bound_reduction_pct"] = 100 * (1 - bound / base)
    table["bound_share_pct"] = 100 * table["flexible_reduction_pct"] / table["bound_reduction_pct"]
    checks = M.run_checks(table, bt)
    effect, exp_frame, profiles = None, pd.DataFrame(), pd.DataFrame()
    if bt.options.experiment:
        exp_frame = M.experiment_frame(bt)
        effect = M.experiment_effect(exp_frame, seed=bt.options.seed)
        profiles = M.hourly_profiles(exp_frame, bt)
    return {"table": table, "checks": checks, "effect": effect, "experiment": exp_frame, "profiles": profiles,
            "ceilings": {**M.ceilings(bt), "smoothing_bound_pct": M.smoothing_bound_pct(bt)},
            "cluster_days": cluster_days(bt)}


def cluster_days(bt: Backtest) -> pd.DataFrame:
    frames = []
    for seg in bt.segments:
        f = seg.plans.copy() if not seg.plans.empty else pd.DataFrame(
            {"day": [d for d in seg.days for _ in bt.campus.clusters],
             "cluster": [c.name for _ in seg.days for c in bt.campus.clusters]})
        if not seg.treated.empty:
            f = f.merge(seg.treated, on=["cluster", "day"], how="left")
        # every policy runs the same jobs: each cluster's job days once, as day numbers (no per-row pandas)
        days = {}
        for c in bt.campus.clusters:
            number = local_day_numbers(seg.tasks[c.name].jobs["arrival"], bt.campus.timezone)
            uniq, pos = np.unique(number, return_inverse=True)
            days[c.name] = ([day_from_number(k) for k in uniq], pos.reshape(-1))
        for policy in bt.options.policies:
            late = []
            for c in bt.campus.clusters:
                jobs = seg.runs[(policy, c.name)].jobs
                uniq_days, pos = days[c.name]
                any_late = np.bincount(pos, weights=jobs["late"].to_numpy(float), minlength=len(uniq_days)) > 0
                late.append(pd.DataFrame({"cluster": c.name, "day": uniq_days, "late": any_late}))
            f = f.merge(pd.concat(late).rename(columns={"late": f"late_{policy}"}), on=["cluster", "day"],
                        how="left")
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


def hourly_frame(bt: Backtest) -> pd.DataFrame:
    frames = []
    for seg in bt.segments:
        for (policy, cluster), run in seg.runs.items():
            c = next(x for x in bt.campus.clusters if x.name == cluster)
            infl = seg.inflexible[cluster]
            flex = run.result.flexible_cpu_cores
            frames.append(pd.DataFrame({
                "policy": policy, "cluster": cluster, "hour": seg.hours, "in_window": seg.day_of_hour >= 0,
                "inflexible_cpu_cores": infl, "flexible_cpu_cores": flex,
                "cap_cpu_cores": np.where(np.isfinite(run.cap), run.cap, np.nan),
                "vcc_cores": run.vcc if run.vcc is not None else np.nan,
                "power_kw": ClusterPower(c)(infl + flex), "actual_gco2_per_kwh": seg.carbon,
                "forecast_gco2_per_kwh": seg.forecast,
            }))
    return pd.concat(frames, ignore_index=True)


def _clean(value):
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def summary(bt: Backtest, ev: dict) -> dict:
    cd = ev["cluster_days"]
    planner = {}
    if "planner_status" in cd:
        reasons = cd["planner_reason"].map(lambda r: split_reason(r)[0] or "") if "planner_reason" in cd else None
        planner = {"shaped_cluster_days": int((cd["planner_status"] == "shaped").sum()),
                   "fallback_reasons": (reasons[cd["planner_status"] != "shaped"].value_counts().to_dict()
                                        if reasons is not None else {})}
    return _clean({
        "zone": bt.zone, "carbon_source": bt.carbon_source, "workload_shift_days": bt.workload_shift_days,
        "campus": bt.campus.name, "timezone": bt.campus.timezone,
        "clusters": [c.name for c in bt.campus.clusters], "start": bt.start, "days": bt.n_days,
        "simulated_days": sum(len(s.days) for s in bt.segments), "skipped_days": list(bt.skipped_days),
        "seconds": bt.seconds, "options": asdict(bt.options), "ceilings": ev["ceilings"],
        "policies": ev["table"].to_dict("records"),
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in ev["checks"]],
        "hard_checks_ok": hard_checks_ok(ev["checks"]),
        "experiment": ev["effect"], "planner": planner,
    })


def design_ceiling_text(ceil: dict) -> str:
    """"DESIGN x%, " for the zones DESIGN's ceiling table knows, else nothing."""
    return "" if pd.isna(ceil["design_pct"]) else f"DESIGN {ceil['design_pct']:.1f}%, "


def hard_checks_ok(checks: list) -> bool:
    """The perfect-foresight bound is hard (a failure is a bug); the program oracle is not."""
    return all(c.ok for c in checks if not c.name.startswith("oracle:"))


def write_report(bt: Backtest, ev: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("summary.json", "policies.csv", "cluster_days.csv", "hourly.csv",
                                               "power_curves.png", "days.png", "report.md")}
    doc = summary(bt, ev)
    paths["summary.json"].write_text(json.dumps(doc, indent=2))
    ev["table"].to_csv(paths["policies.csv"], index=False)
    ev["cluster_days"].to_csv(paths["cluster_days.csv"], index=False)
    hourly_frame(bt).to_csv(paths["hourly.csv"], index=False)
    _plot_power_curves(bt, ev, paths["power_curves.png"])
    _plot_days(bt, paths["days.png"])
    paths["report.md"].write_text(markdown(bt, ev, images=True))
    return paths


def _fmt(value, col: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        if col.endswith("kgco2") or col == "peak_kw":
            return f"{value:,.0f}"
        if col == "kwh_per_kcore_hour":
            return f"{value:.3f}"
        return f"{value:,.2f}"
    return str(value)


def markdown(bt: Backtest, ev: dict, images: bool = False) -> str:
    t = ev["table"]
    ceil = ev["ceilings"]
    n_sim = sum(len(s.days) for s in bt.segments)
    lines = [f"# Backtest {bt.zone} — campus {bt.campus.name}", "",
             f"{n_sim} local days from {bt.start} ({bt.campus.timezone}); clusters "
             f"{', '.join(c.name for c in bt.campus.clusters)}; seed {bt.options.seed}; ran in {bt.seconds:.0f} s.",
             ""]
    if bt.skipped_days:
        lines += [f"Skipped (long gap in the actual carbon data): {', '.join(str(d) for d in bt.skipped_days)}.", ""]
    lines += ["| " + " | ".join(h for _, h in TABLE_COLUMNS) + " |",
              "|" + "|".join("---" if c == "policy" else "---:" for c, _ in TABLE_COLUMNS) + "|"]
    for row in t.to_dict("records"):
        lines.append("| " + " | ".join(_fmt(row.get(c), c) for c, _ in TABLE_COLUMNS) + " |")
    cd = int(t["cluster_days"].iloc[0])
    lines += ["", f"SLO violations are out of {cd} cluster-days. Perfect-foresight bound: "
              f"{t['bound_reduction_pct'].iloc[0]:.1f}% below carbon-agnostic. Ceiling ({bt.zone}, delta in [-1, 1]): "
              f"{design_ceiling_text(ceil)}this window {ceil['window_pct']:.1f}%.", "", "## Checks", ""]
    for c in ev["checks"]:
        mark = "✓" if c.ok else ("⚠" if c.name.startswith("oracle:") else "✗")
        lines.append(f"- {mark} `{c.name}` {c.detail}")
    e = ev["effect"]
    if e:
        lines += ["", "## Randomised experiment", "",
                  f"{e['n']} cluster-days, {e['n_treated']} treated (p = {bt.options.experiment_p}). Effect of "
                  f"treatment on power in the {int(100 * bt.options.top_hours_share)}% highest-carbon hours of each "
                  f"day: **{_fmt(e['effect_pct'])}%** (95% CI bootstrap {_fmt(e['ci_low_pct'])} to "
                  f"{_fmt(e['ci_high_pct'])}%; OLS-HC1 {_fmt(e['ols_ci_low_pct'])} to {_fmt(e['ols_ci_high_pct'])}%). "
                  f"The simulator's counterfactual says {_fmt(e['true_effect_pct'])}%. The paper reports −1 to −2%."]
    if images:
        lines += ["", "![power curves](power_curves.png)", "", "![days](days.png)"]
    return "\n".join(lines) + "\n"


def _plot_power_curves(bt: Backtest, ev: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    prof = ev["profiles"]
    if prof is not None and not prof.empty:
        for treated, style in ((False, "-"), (True, "--")):
            p = prof[prof["treated"] == treated]
            ax.plot(p["hour"], p["power_rel"], style, label="treated" if treated else "untreated")
        ax2 = ax.twinx()
        p = prof.groupby("hour")["carbon"].mean()
        ax2.fill_between(p.index, p.to_numpy(), alpha=0.12, color="grey", step="mid")
        ax2.set_ylabel("mean actual gCO2/kWh")
        ax.set_ylabel("power / cluster mean")
        e = ev["effect"]
        ax.set_title(f"{bt.zone}: treated vs untreated cluster-days (effect in top-carbon hours "
                     f"{e['effect_pct']:+.1f}%, CI {e['ci_low_pct']:+.1f}..{e['ci_high_pct']:+.1f}%)", fontsize=9)
        ax.legend(loc="upper left")
    ax.set_xlabel(f"local hour ({bt.campus.timezone})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_days(bt: Backtest, path: Path, n_days: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seg = bt.segments[0]
    cluster = bt.campus.clusters[0]
    k0 = min(7, max(len(seg.days) - n_days, 0))  # skip the first week's warm-up if there is room
    idx = np.flatnonzero((seg.day_of_hour >= k0) & (seg.day_of_hour < k0 + n_days))
    hours = seg.hours[idx].tz_convert(bt.campus.timezone).tz_localize(None)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ax1.plot(hours, seg.carbon[idx], label="actual")
    ax1.plot(hours, seg.forecast[idx], "--", label="day-ahead forecast")
    ax1.set_ylabel("gCO2/kWh")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_title(f"{bt.zone} / {cluster.name}: carbon, VCC and usage", fontsize=10)
    for policy, colour in ((BASELINE, "grey"), ("planner", "tab:blue"), ("oracle", "tab:green")):
        run = seg.runs.get((policy, cluster.name))
        if run is None:
            continue
        ax2.plot(hours, run.result.flexible_cpu_cores[idx], color=colour, label=f"{policy} flexible usage")
        if policy != BASELINE and run.vcc is not None:
            ax2.plot(hours, run.vcc[idx], ":", color=colour, label=f"{policy} VCC (reservation cores)")
    ax2.plot(hours, seg.inflexible[cluster.name][idx], color="black", lw=0.8, label="inflexible usage")
    ax2.axhline(cluster.capacity_cores, color="red", lw=0.6, label="machine capacity")
    ax2.set_ylabel("cores")
    ax2.legend(loc="upper right", fontsize=7, ncol=2)
    ax2.set_xlabel(f"local time ({bt.campus.timezone})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
