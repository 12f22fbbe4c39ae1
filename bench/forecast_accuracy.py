"""Forecast accuracy of the CICM load forecaster against seasonal naive and Holt-Winters, on the demo fleet.

    .venv/bin/python bench/forecast_accuracy.py [--origins 28] [--seed 0] [--no-holt-winters]
                                                [--last-target YYYY-MM-DD] [--no-power]
                                                [--arrival-origins 120] [--arrival-last-target YYYY-MM-DD]
                                                [--arrivals-only]

For every cluster and every rolling origin (one per local day: the `--origins` days ending on `--last-target`,
by default the last complete local day of the demo history), each method forecasts the target local day from
the history before the issue time (18:00 local on the eve of the target day). Printed: median and p90 across
clusters of each cluster's MAPE (inflexible hourly, flexible daily, reservations daily), which daily model
cicm selected how often, the share of clusters whose median hourly APE is below 10%, and the coverage of the
reservation bound Θ = T_R·(1 + q0.97) (share of cluster-days whose actual reservations stayed at or below Θ).

First, the hourly arrival forecasts (`cicm.models.arrivals`): seasonal naive (same hour a week before), the
CICM EWMA and the quantile regression ("qr"), each planned at 18:00 local on the eve from the 63 days before,
scored on the next local day's hours over `--arrival-origins` target days ending on `--arrival-last-target`:
daily-total MAPE, hourly WAPE, pinball loss at q0.5 and q0.9, coverage of the q0.9 bands, seconds per call.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cicm.config import load_fleet  # noqa: E402
from cicm.demo.telemetry import (  # noqa: E402
    arrived_core_hours,
    demo_power_telemetry,
    demo_usage_history,
    history_hours,
    scaled_cluster_jobs,
)
from cicm.models.arrivals import ArrivalForecast, forecast_arrivals  # noqa: E402
from cicm.models.power import (  # noqa: E402
    fit_power_model,
    load_specpower,
    predict_power_kw,
    specpower_curve_w,
)
from cicm.paths import bundled_data_dir  # noqa: E402
from cicm.timeutil import local_day_hours_utc, planning_time_utc  # noqa: E402
from cicm.models.load import (  # noqa: E402
    forecast_load,
    holt_winters_core_hours,
    holt_winters_forecast,
    local_day_hours,
    seasonal_naive_core_hours,
    seasonal_naive_forecast,
)

ISSUE_LOCAL_HOUR = 18
GAMMA = 0.05


def _ape(actual: np.ndarray, forecast: np.ndarray) -> np.ndarray:
    return np.abs(actual - forecast) / actual * 100


def _model_label(params: dict) -> str:
    """The daily model `forecast_load` selected, e.g. "seasonal", "moving-average 91 d + adjust"."""
    model = params["model"]
    if model == "level-ewma":
        model += f" α={params['level_alpha']}"
    elif model == "moving-average":
        model += f" {params['window_days']} d"
    return model + (" + adjust" if params["adjusted"] else "")


def evaluate_cluster(
    history: pd.DataFrame, tz: str, origins: int, holt_winters: bool, last_target: pd.Timestamp | None = None
) -> pd.DataFrame:
    """One row per (method, target day): hourly inflexible APEs, flexible and reservations daily APEs,
    reservation coverage."""
    history = history.set_index("hour").sort_index()
    local_last = history.index[-1].tz_convert(tz).tz_localize(None).normalize()
    # the last complete local day of the history is the last target, unless told otherwise
    last_day = local_last - pd.Timedelta(days=1)
    if last_target is not None:
        last_day = min(last_target, last_day)
    rows = []
    for k in range(origins):
        day = last_day - pd.Timedelta(days=origins - 1 - k)
        hours = local_day_hours(day, tz)
        now = (day - pd.Timedelta(days=1) + pd.Timedelta(hours=ISSUE_LOCAL_HOUR)).tz_localize(tz).tz_convert("UTC")
        past = history[history.index + pd.Timedelta(hours=1) <= now]
        actual = history.loc[hours]
        inflexible_actual = actual["inflexible_cpu_cores"].to_numpy()
        flexible_actual = float(actual["flexible_cpu_cores"].sum())
        reserved_actual = float(actual["reserved_cpu_cores"].sum())

        fc = forecast_load(history, hours, tz, GAMMA, now)  # reads only hours before `now` itself
        if fc.ok:
            rows.append(dict(method="cicm", day=day,
                             inflexible_ape=_ape(inflexible_actual, fc.inflexible_cpu_cores.to_numpy()),
                             flexible_ape=_ape(flexible_actual, fc.flexible_core_hours),
                             reservations_ape=_ape(reserved_actual, fc.reservations_core_hours),
                             flexible_model=_model_label(fc.parameters["flexible"]),
                             reservations_model=_model_label(fc.parameters["reservations"]),
                             reservations_covered=reserved_actual <= fc.theta_core_hours,
                             inflexible_upper_covered=np.mean(inflexible_actual <= fc.inflexible_upper_cpu_cores.to_numpy())))
        naive = lambda column: seasonal_naive_core_hours(past[column], hours, tz)  # noqa: E731
        rows.append(dict(method="seasonal-naive", day=day,
                         inflexible_ape=_ape(inflexible_actual, seasonal_naive_forecast(past["inflexible_cpu_cores"], hours, tz).to_numpy()),
                         flexible_ape=_ape(flexible_actual, naive("flexible_cpu_cores")),
                         reservations_ape=_ape(reserved_actual, naive("reserved_cpu_cores"))))
        if holt_winters:
            hw = lambda column: holt_winters_core_hours(past[column], hours, tz)  # noqa: E731
            rows.append(dict(method="holt-winters", day=day,
                             inflexible_ape=_ape(inflexible_actual, holt_winters_forecast(past["inflexible_cpu_cores"], hours, tz).to_numpy()),
                             flexible_ape=_ape(flexible_actual, hw("flexible_cpu_cores")),
                             reservations_ape=_ape(reserved_actual, hw("reserved_cpu_cores"))))
    return pd.DataFrame(rows)


def _evaluate_task(task: tuple) -> pd.DataFrame:
    warnings.simplefilter("ignore")  # statsmodels convergence chatter from the Holt-Winters baseline
    name, history, tz, origins, holt_winters, last_target = task
    return evaluate_cluster(history, tz, origins, holt_winters, last_target).assign(cluster=name)


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    out = []
    for method, by_method in results.groupby("method", sort=False):
        per_cluster = []
        for cluster, g in by_method.groupby("cluster"):
            hourly = np.concatenate(g["inflexible_ape"].to_list())
            per_cluster.append(dict(
                hourly_mape=hourly.mean(), hourly_median_ape=np.median(hourly),
                daily_mape=g["flexible_ape"].mean(),
                reservations_mape=g["reservations_ape"].mean(),
            ))
        pc = pd.DataFrame(per_cluster)
        row = {
            "method": method,
            "clusters": len(pc),
            "inflexible hourly MAPE % (median)": pc["hourly_mape"].median(),
            "inflexible hourly MAPE % (p90)": pc["hourly_mape"].quantile(0.9),
            "flexible daily MAPE % (median)": pc["daily_mape"].median(),
            "flexible daily MAPE % (p90)": pc["daily_mape"].quantile(0.9),
            "reservations daily MAPE % (median)": pc["reservations_mape"].median(),
            "reservations daily MAPE % (p90)": pc["reservations_mape"].quantile(0.9),
            "clusters with median hourly APE < 10%": (pc["hourly_median_ape"] < 10).mean(),
        }
        if "reservations_covered" in by_method and by_method["reservations_covered"].notna().any():
            row["reservations <= Θ (coverage of q0.97 bound)"] = by_method["reservations_covered"].astype(float).mean()
            row[f"inflexible <= (1-γ) bound, γ={GAMMA}"] = by_method["inflexible_upper_covered"].astype(float).mean()
        out.append(row)
    return pd.DataFrame(out).set_index("method").T


def power_model_accuracy(power: pd.DataFrame, origins: int) -> pd.DataFrame:
    """Next-day MAPE of every power domain's model (fit on 7 days, score the next UTC day), with and without
    the outlier rules, over `origins` daily origins spread across the year."""
    first, last = power["hour"].min().normalize(), power["hour"].max().normalize()
    starts = pd.date_range(first + pd.Timedelta(days=8), last - pd.Timedelta(days=1), periods=origins).normalize()
    rows = []
    for domain, g in power.groupby("domain"):
        cpu, kw = g.set_index("hour")["cpu_cores"], g.set_index("hour")["power_kw"]
        for now in starts:
            test = (cpu.index >= now) & (cpu.index < now + pd.Timedelta(days=1))
            row = {"domain": domain}
            for clean in (True, False):
                model = fit_power_model(cpu, kw, now, clean=clean)
                ape = np.abs(predict_power_kw(model, cpu[test].to_numpy()) / kw[test].to_numpy() - 1) * 100
                row["cleaned" if clean else "raw"] = ape.mean()
            rows.append(row)
    return pd.DataFrame(rows)


def spec_fit_accuracy() -> pd.DataFrame:
    """Three-segment fit of every SPECpower server's published curve, sampled uniformly from 5% to 100% load
    over 7 days (noise-free, no cleaning): mean and max APE at the 10%..100% points."""
    spec = load_specpower(bundled_data_dir() / "server_power/specpower_ssj2008_619_servers_via_green-coding-solutions_cloud-energy.csv")
    now = pd.Timestamp("2022-03-08", tz="UTC")
    idx = pd.date_range(now - pd.Timedelta(days=7), now, freq="5min", inclusive="left")
    t = (idx - idx[0]).total_seconds().to_numpy() / 86400
    frac = 0.05 + 0.95 * (1 - np.abs(2 * (t % 1.0) - 1))
    rows = []
    for _, row in spec.iterrows():
        load, watts = specpower_curve_w(row)
        cpu = pd.Series(frac * row["threads"], idx)
        model = fit_power_model(cpu, pd.Series(np.interp(frac, load, watts) / 1000, idx), now, clean=False)
        ape = np.abs(predict_power_kw(model, load[1:] * row["threads"]) * 1000 / watts[1:] - 1) * 100
        rows.append({"mean_ape": ape.mean(), "max_ape": ape.max()})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--origins", type=int, default=28)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-holt-winters", action="store_true")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one cluster each)")
    parser.add_argument("--last-target", type=pd.Timestamp, default=None,
                        help="last target local date (default: the last complete day of the demo history)")
    parser.add_argument("--no-power", action="store_true", help="skip the power-model and SPECpower checks")
    parser.add_argument("--arrival-origins", type=int, default=120,
                        help="target days of the hourly-arrival section (0 skips it)")
    parser.add_argument("--arrival-last-target", type=pd.Timestamp, default=None,
                        help="last target local date of the arrival section (default: the last complete day)")
    parser.add_argument("--arrivals-only", action="store_true", help="run only the hourly-arrival section")
    args = parser.parse_args(argv)

    started = time.time()
    fleet = load_fleet()
    if args.arrivals_only or args.arrival_origins > 0:
        print_arrival_accuracy(fleet, args.seed, args.arrival_origins, args.arrival_last_target, args.jobs)
        if args.arrivals_only:
            print(f"elapsed {time.time() - started:.0f} s")
            return 0
    usage = demo_usage_history(fleet, seed=args.seed)
    tasks = [
        (cluster.name, usage[usage["cluster"] == cluster.name].drop(columns="cluster"), campus.timezone,
         args.origins, not args.no_holt_winters, args.last_target)
        for campus in fleet.campuses
        for cluster in campus.clusters
    ]
    frames = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for name, res in zip([t[0] for t in tasks], pool.map(_evaluate_task, tasks)):
            frames.append(res)
            print(f"  {name} done, {time.time() - started:.0f} s", file=sys.stderr)
    results = pd.concat(frames, ignore_index=True)
    table = summarise(results)
    pd.set_option("display.width", 140)
    print(f"Demo fleet {fleet.name!r}, seed {args.seed}: {results['cluster'].nunique()} clusters x "
          f"{args.origins} rolling origins, targets {results['day'].min().date()}..{results['day'].max().date()} "
          f"(issued {ISSUE_LOCAL_HOUR}:00 local on the eve of each target day)")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    ours = results[results["method"] == "cicm"]
    for series in ("flexible", "reservations"):
        counts = ours[f"{series}_model"].value_counts()
        print(f"cicm {series} daily model selected (cluster-days): "
              + ", ".join(f"{name} {count}" for name, count in counts.items()))
    if args.no_power:
        print(f"elapsed {time.time() - started:.0f} s")
        return 0

    power = power_model_accuracy(demo_power_telemetry(fleet, usage, seed=args.seed), origins=30)
    per_domain = power.groupby("domain")[["cleaned", "raw"]].mean()
    print(f"\nPower models, next-day MAPE %: {power['domain'].nunique()} domains x 30 origins "
          "(fit on the 7 days before, score the next UTC day)")
    print(pd.DataFrame({
        "median over domains": per_domain.median(), "worst domain": per_domain.max(),
        "worst domain-day": power[["cleaned", "raw"]].max(),
    }).T.rename(columns={"cleaned": "with outlier rules", "raw": "without"}).to_string(float_format=lambda v: f"{v:.2f}"))
    spec = spec_fit_accuracy()
    print(f"\nSPECpower, {len(spec)} servers, 3-segment fit on 5%..100% load, APE % at 10%..100%:")
    print(f"  mean APE: median {spec['mean_ape'].median():.2f}, p90 {spec['mean_ape'].quantile(0.9):.2f}, "
          f"max {spec['mean_ape'].max():.2f}; servers with mean APE <= 2%: {(spec['mean_ape'] <= 2).mean():.1%}")
    print(f"  max APE:  median {spec['max_ape'].median():.2f}, p90 {spec['max_ape'].quantile(0.9):.2f}, "
          f"max {spec['max_ape'].max():.2f}; servers with max APE <= 2%: {(spec['max_ape'] <= 2).mean():.1%}")
    print(f"elapsed {time.time() - started:.0f} s")
    return 0


# --- Hourly arrival forecasts (cicm.models.arrivals): seasonal naive, the CICM EWMA, quantile regression ---------

ARRIVAL_QUANTILE = 0.9
ARRIVAL_HISTORY_HOURS = 24 * 63  # what the planner hands the forecaster (cicm/backtest/queue_policy.py)
ARRIVAL_ERROR_DAYS = 28


def pinball_loss(actual: np.ndarray, forecast: np.ndarray, quantile: float) -> np.ndarray:
    """Per-hour pinball (quantile) loss: q·(a − f) if a ≥ f else (1 − q)·(f − a)."""
    diff = actual - forecast
    return np.maximum(quantile * diff, (quantile - 1) * diff)


def seasonal_naive_arrivals(past: pd.Series, hours: pd.DatetimeIndex, quantile: float = ARRIVAL_QUANTILE,
                            error_days: int = ARRIVAL_ERROR_DAYS) -> ArrivalForecast:
    """Same hour one week earlier; its upper band made like the EWMA's: the ``quantile`` of the relative errors of
    the daily totals it made over the ``error_days`` days before the target."""
    week = pd.Timedelta(days=7)
    central = past.reindex(hours - week).to_numpy(float)
    central = np.where(np.isnan(central), float(past.iloc[-168:].mean()), central)
    end = hours[0].floor("D")
    back_hours = pd.date_range(end - pd.Timedelta(days=error_days), end, freq="h", inclusive="left")
    frame = pd.DataFrame({"f": past.reindex(back_hours - week).to_numpy(float),
                          "a": past.reindex(back_hours).to_numpy(float)}, index=back_hours).dropna()
    daily = frame.groupby(frame.index.floor("D")).sum()
    daily = daily[daily["f"] > 0]
    q = max(float(np.quantile(daily["a"] / daily["f"] - 1.0, quantile)), 0.0) if len(daily) >= 7 else 0.0
    return ArrivalForecast(hours, central, central * (1 + q), q, method="seasonal-naive")


def arrival_day_scores(actual: np.ndarray, fc: ArrivalForecast) -> dict:
    """One cluster-day's errors. Sums are kept so WAPE and scaled pinball can be pooled over days."""
    return dict(
        actual_core_hours=actual.sum(),
        daily_ape=abs(actual.sum() - fc.core_hours.sum()) / actual.sum() * 100 if actual.sum() > 0 else np.nan,
        abs_error_core_hours=np.abs(actual - fc.core_hours).sum(),
        day_wape=np.abs(actual - fc.core_hours).sum() / actual.sum() * 100 if actual.sum() > 0 else np.nan,
        pinball50_core_hours=pinball_loss(actual, fc.median_core_hours, 0.5).sum(),
        pinball90_core_hours=pinball_loss(actual, fc.hourly_upper_core_hours, ARRIVAL_QUANTILE).sum(),
        hourly_covered=float(np.mean(actual <= fc.hourly_upper_core_hours)),
        daily_covered=float(actual.sum() <= fc.upper_core_hours.sum()),
    )


def evaluate_cluster_arrivals(arrivals: pd.Series, tz: str, target_days: list) -> pd.DataFrame:
    """One row per (method, target local day): the forecast planned at 18:00 local on the eve
    (`planning_time_utc`) from the hours that ended by then (the last 63 days, as the planner passes), for the
    target's local-day hours (`local_day_hours_utc`)."""
    rows = []
    for day in target_days:
        hours = local_day_hours_utc(day, tz)
        now = planning_time_utc(day, tz)
        past = arrivals[arrivals.index + pd.Timedelta(hours=1) <= now].iloc[-ARRIVAL_HISTORY_HOURS:]
        actual = arrivals.reindex(hours).to_numpy(float)
        methods = {"seasonal-naive": lambda: seasonal_naive_arrivals(past, hours),
                   "ewma": lambda: forecast_arrivals(past, hours, quantile=ARRIVAL_QUANTILE),
                   "qr": lambda: forecast_arrivals(past, hours, quantile=ARRIVAL_QUANTILE, method="qr")}
        for method, run in methods.items():
            started = time.perf_counter()
            fc = run()
            rows.append(dict(method=method, day=day, seconds=time.perf_counter() - started,
                             q=fc.rel_error_quantile, **arrival_day_scores(actual, fc)))
    return pd.DataFrame(rows)


def _evaluate_arrivals_task(task: tuple) -> pd.DataFrame:
    name, arrivals, tz, target_days = task
    return evaluate_cluster_arrivals(arrivals, tz, target_days).assign(cluster=name)


def summarise_arrivals(results: pd.DataFrame) -> pd.DataFrame:
    """Per cluster over its days (MAPE = mean daily APE; WAPE and scaled pinball pooled: Σ loss / Σ actual),
    then the median over clusters; coverages pooled over all cluster-days and hours."""
    out = {}
    for method, g in results.groupby("method", sort=False):
        per_cluster = g.groupby("cluster").agg(
            daily_mape=("daily_ape", "mean"), actual=("actual_core_hours", "sum"),
            abs_error=("abs_error_core_hours", "sum"), p50=("pinball50_core_hours", "sum"),
            p90=("pinball90_core_hours", "sum"))
        out[method] = {
            "daily-total MAPE % (median over clusters)": per_cluster["daily_mape"].median(),
            "daily-total MAPE % (p90 over clusters)": per_cluster["daily_mape"].quantile(0.9),
            "daily APE % (median over cluster-days)": g["daily_ape"].median(),
            "hourly WAPE % of central (median over clusters)": (per_cluster["abs_error"] / per_cluster["actual"]).median() * 100,
            "pinball q0.5 % of mean arrivals (median)": (per_cluster["p50"] / per_cluster["actual"]).median() * 100,
            f"pinball q{ARRIVAL_QUANTILE} % of mean arrivals (median)": (per_cluster["p90"] / per_cluster["actual"]).median() * 100,
            f"coverage of hourly q{ARRIVAL_QUANTILE} band (hours)": g["hourly_covered"].mean(),
            f"coverage of daily q{ARRIVAL_QUANTILE} band (cluster-days)": g["daily_covered"].mean(),
            "daily band q (median)": g["q"].median(),
            "seconds per call (median)": g["seconds"].median(),
            "seconds per call (max)": g["seconds"].max(),
        }
    return pd.DataFrame(out)


def paired_comparison(results: pd.DataFrame, a: str, b: str, column: str = "daily_ape") -> str:
    """How often method ``a`` beats ``b`` on the same cluster-day, and a Wilcoxon signed-rank test."""
    from scipy.stats import wilcoxon

    wide = results.pivot_table(index=["cluster", "day"], columns="method", values=column).dropna()
    diff = wide[a] - wide[b]
    p = wilcoxon(diff).pvalue if (diff != 0).any() else 1.0
    return (f"{a} vs {b}, {column}: {a} lower on {(diff < 0).mean():.1%} of {len(diff)} cluster-days, "
            f"mean difference {diff.mean():+.2f} points, Wilcoxon signed-rank p = {p:.3g}")


def arrival_accuracy(fleet, seed: int, origins: int, last_target: pd.Timestamp | None, jobs: int) -> pd.DataFrame:
    hours = history_hours(fleet)
    last_day = (hours[-1].tz_localize(None).normalize() - pd.Timedelta(days=1)) if last_target is None \
        else pd.Timestamp(last_target).normalize()
    target_days = [(last_day - pd.Timedelta(days=origins - 1 - k)).date() for k in range(origins)]
    tasks = []
    for campus in fleet.campuses:
        for cluster in campus.clusters:
            arrivals = pd.Series(arrived_core_hours(scaled_cluster_jobs(cluster, hours, seed), hours), hours)
            tasks.append((cluster.name, arrivals, campus.timezone, target_days))
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        return pd.concat(pool.map(_evaluate_arrivals_task, tasks), ignore_index=True)


def print_arrival_accuracy(fleet, seed: int, origins: int, last_target, jobs: int) -> pd.DataFrame:
    started = time.time()
    results = arrival_accuracy(fleet, seed, origins, last_target, jobs)
    print(f"\nHourly arrival forecasts (flexible core-hours arriving per hour), demo fleet {fleet.name!r}, seed {seed}: "
          f"{results['cluster'].nunique()} clusters x {origins} rolling origins, targets "
          f"{min(results['day'])}..{max(results['day'])}, planned 18:00 local on the eve from the last 63 days. "
          "WAPE (not hourly MAPE: some hours have no arrivals) = Σ|a − f| / Σ a; pinball as Σ loss / Σ a.")
    print(summarise_arrivals(results).to_string(float_format=lambda v: f"{v:.3f}"))
    for a, b in (("qr", "ewma"), ("qr", "seasonal-naive"), ("ewma", "seasonal-naive")):
        print("  " + paired_comparison(results, a, b))
    print("  " + paired_comparison(results, "qr", "ewma", "day_wape"))
    print(f"  arrivals section: {time.time() - started:.0f} s")
    return results


if __name__ == "__main__":
    raise SystemExit(main())
