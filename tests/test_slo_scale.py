"""The SLO stage at fleet scale: batched queries and checks give exactly the per-cluster reference's answers.

The store is synthetic and built in bulk (numpy frames written with ``Store.upsert``): hourly usage for
``HISTORY_DAYS`` days and plans (VCCs, status, load forecasts) for the last ``PLAN_DAYS`` plan days, for clusters
in campuses of different time zones (one with a DST change inside the checked window). Some cluster-days are
forced to violate (flash crowds) or come close (reservations at Theta); some days have no plan, a fallback plan,
no reservation ratio, missing usage hours or a superseded plan run; some clusters have earlier shaping_state and
slo_events rows. ``build_store`` is also what the timing in the report used (``python tests/test_slo_scale.py``).
"""
from __future__ import annotations

import shutil
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cicm.config import Fleet, load_fleet
from cicm.data.store import Store
from cicm.planning.slo import REASON_PREFIX, feedback_decision, slo_stage
from slo_reference import check_cluster_days, fluid_served
from cicm.timeutil import local_day_hours_utc, planning_time_utc

PLAN_DATE = date(2022, 11, 10)  # the US DST change (Nov 6) falls inside the checked window
HISTORY_DAYS = 20
PLAN_DAYS = 14
CAMPUSES = (("us-w", "CISO", "America/Los_Angeles"), ("us-c", "MISO", "America/Chicago"),
            ("eu-c", "ERCO", "Europe/Berlin"), ("ap-e", "BPAT", "Asia/Tokyo"))


# ------------------------------------------------------------------------------------------------ the store


def make_fleet(n_clusters: int, n_campuses: int) -> Fleet:
    """``n_clusters`` clusters (copies of the demo clusters' servers) in ``n_campuses`` campuses, round-robin
    over ``CAMPUSES``' time zones."""
    demo = load_fleet().model_dump()
    templates = [c for campus in demo["campuses"] for c in campus["clusters"]]
    per = -(-n_clusters // n_campuses)
    campuses = []
    for k in range(n_campuses):
        prefix, zone, tz = CAMPUSES[k % len(CAMPUSES)]
        clusters = []
        for i in range(k * per, min((k + 1) * per, n_clusters)):
            t = templates[i % len(templates)]
            name = f"{prefix}{k}-{i:05d}"
            clusters.append({**t, "name": name,
                             "power_domains": [{**d, "name": f"{name}-pd{j}"} for j, d in enumerate(t["power_domains"])]})
        campuses.append({"name": f"{prefix}{k}", "grid_zone": zone, "timezone": tz, "contract_limit_kw": 1e6,
                         "clusters": clusters})
    return Fleet.model_validate({**demo, "campuses": campuses})


def _local_hour(hours: pd.DatetimeIndex, tz: str) -> np.ndarray:
    return np.asarray(hours.tz_convert(tz).hour, dtype=float)


def build_store(path: Path, fleet: Fleet, plan_date: date = PLAN_DATE, seed: int = 0) -> dict:
    """Write the synthetic usage, plans and earlier SLO state; returns what was forced, by cluster."""
    rng = np.random.default_rng(seed)
    forced = {"surge": [], "close": [], "no_usage": None}
    all_names = [c.name for c in fleet.clusters()]
    with Store(path) as store, store.run("telemetry-import", {"synthetic": True}) as run:
        for campus in fleet.campuses:
            tz = campus.timezone
            start = local_day_hours_utc(plan_date - timedelta(days=HISTORY_DAYS), tz)[0]
            end = planning_time_utc(plan_date, tz) + pd.Timedelta(hours=3)  # a few rows past the cutoff
            hours = pd.date_range(start, end, freq="h", inclusive="left", name="hour")
            phase = 2 * np.pi * _local_hour(hours, tz) / 24
            n, t = len(campus.clusters), len(hours)
            cap = np.array([c.capacity_cores for c in campus.clusters], float)[:, None]
            ratio = np.array([c.reservation_ratio for c in campus.clusters])[:, None]
            infl = cap * (0.35 + 0.1 * np.sin(phase - 1.0) + 0.02 * rng.standard_normal((n, t)))
            flex = cap * (0.12 + 0.04 * np.sin(phase) + 0.01 * rng.random((n, t)))
            arrived = cap * 0.15 * (1 + 0.5 * np.sin(phase + 0.5)) * rng.lognormal(0, 0.3, (n, t))
            reserved = ratio * (infl + flex) * (1 + 0.05 * rng.random((n, t)))
            frame = pd.DataFrame({
                "cluster": np.repeat([c.name for c in campus.clusters], t), "hour": np.tile(hours, n),
                "inflexible_cpu_cores": infl.ravel(), "flexible_cpu_cores": flex.ravel(),
                "reserved_cpu_cores": reserved.ravel(), "flexible_arrived_core_hours": arrived.ravel()})
            # a few clusters miss a few hours of telemetry
            holes = rng.random(len(frame)) < 0.002 * (np.arange(len(frame)) // t % 7 == 3)
            store.upsert("usage_history", frame[~holes], run.run_id)
    names = all_names
    with Store(path) as store:
        # flash crowds on some cluster-days (violations), two days in a row for some
        for i, name in enumerate(names):
            campus = fleet.campus_of(name)
            if i % 5 == 1:
                days = [plan_date - timedelta(days=int(rng.integers(3, 10)))]
                if i % 10 == 1:
                    days.append(days[0] + timedelta(days=1))
                for day in days:
                    h = local_day_hours_utc(day, campus.timezone)
                    store.con.execute(
                        "UPDATE usage_history SET flexible_arrived_core_hours = flexible_arrived_core_hours * ?"
                        " WHERE cluster = ? AND hour >= ? AND hour < ?",
                        [float(rng.uniform(3, 8)), name, h[0], h[-1] + pd.Timedelta(hours=1)])
                forced["surge"].append((name, days))
        no_usage = names[len(names) // 2]
        store.con.execute("DELETE FROM usage_history WHERE cluster = ?", [no_usage])
        forced["no_usage"] = no_usage
        _write_plans(store, fleet, plan_date, rng, forced)
        _write_earlier_state(store, names, plan_date)
    return forced


def _write_plans(store, fleet: Fleet, plan_date: date, rng, forced: dict) -> None:
    for offset in range(PLAN_DAYS, 0, -1):
        day = plan_date - timedelta(days=offset)
        runs = 2 if offset == 6 else 1  # one day re-planned: the first run's rows are superseded
        for attempt in range(runs):
            vccs, status, forecasts = [], [], []
            for ci, campus in enumerate(fleet.campuses):
                hours = local_day_hours_utc(day, campus.timezone)
                phase = 2 * np.pi * _local_hour(hours, campus.timezone) / 24
                n, t = len(campus.clusters), len(hours)
                cap = np.array([c.capacity_cores for c in campus.clusters], float)[:, None]
                ratio = np.array([c.reservation_ratio for c in campus.clusters])[:, None]
                tight = np.where(rng.random((n, 1)) < 0.1, 0.5, 0.78)  # some plans leave little room
                vcc = ratio * cap * (tight + 0.05 * np.cos(phase)) * (1.5 if attempt == 0 and runs == 2 else 1.0)
                kind = rng.random(n)
                st = np.where(kind < 0.08, "fallback", "shaped")
                vcc = np.where((st == "fallback")[:, None], cap, vcc)
                has_plan = kind < 0.95  # ~5% of cluster-days without a plan
                usage = store.query(
                    "SELECT cluster, sum(reserved_cpu_cores) AS r FROM usage_history WHERE cluster IN"
                    " (SELECT unnest(?)) AND hour >= ? AND hour < ? GROUP BY cluster",
                    [[c.name for c in campus.clusters], hours[0], hours[-1] + pd.Timedelta(hours=1)],
                ).set_index("cluster")["r"]
                for k, cluster in enumerate(campus.clusters):
                    if not has_plan[k]:
                        continue
                    res = float(usage.get(cluster.name, np.nan))
                    theta = res * rng.uniform(1.02, 1.4) if np.isfinite(res) else 1e6
                    if (k + offset) % 9 == 0 and np.isfinite(res):
                        theta = res / rng.uniform(0.96, 1.1)  # reservations at (or near) Theta
                        forced["close"].append((cluster.name, day))
                    if k % 13 == 5:
                        theta = np.nan
                    vccs.append(pd.DataFrame({
                        "plan_date": day, "cluster": cluster.name, "hour": hours, "hour_index": np.arange(t),
                        "vcc_cores": vcc[k], "flexible_cpu_cores": np.nan, "inflexible_cpu_cores": np.nan,
                        "power_kw": np.nan, "carbon_kgco2": np.nan, "gco2_per_kwh": np.nan}))
                    status.append({"plan_date": day, "cluster": cluster.name, "campus": campus.name,
                                   "status": str(st[k]), "reason": None if st[k] == "shaped" else "forecast: stale",
                                   "capacity_cores": float(cluster.capacity_cores), "theta_core_hours": theta,
                                   "tau_core_hours": np.nan, "expected_kgco2": np.nan, "flat_kgco2": np.nan,
                                   "saving_pct": np.nan, "peak_kw": np.nan})
                    if k % 7 != 2:  # some plans stored no load forecast (the measured ratio is used)
                        r = np.full(t, cluster.reservation_ratio * rng.uniform(0.95, 1.1))
                        r[rng.random(t) < 0.05] = np.nan
                        forecasts.append(pd.DataFrame({
                            "plan_date": day, "cluster": cluster.name, "hour": hours,
                            "inflexible_cpu_cores": np.nan, "inflexible_upper_cpu_cores": np.nan,
                            "reservation_ratio": r}))
            with store.run("plan", {"synthetic": True}, plan_date=day) as run:
                status_frame = pd.DataFrame(status)
                store.replace_plan(day, pd.concat(vccs, ignore_index=True), status_frame, run.run_id)
                if forecasts:
                    store.upsert("load_forecasts", pd.concat(forecasts, ignore_index=True), run.run_id)


def _write_earlier_state(store, names: list[str], plan_date: date) -> None:
    """Switch-offs of earlier nights (active, expired, recent, future, not the SLO's) and earlier slo_events."""
    P = plan_date
    rows = []
    for i, name in enumerate(names):
        kind = i % 11
        if kind == 2:
            rows.append((name, P - timedelta(days=5), P + timedelta(days=1), f"{REASON_PREFIX}: earlier"))
        elif kind == 4:
            rows.append((name, P - timedelta(days=20), P - timedelta(days=14), f"{REASON_PREFIX}: long ago"))
        elif kind == 6:
            rows.append((name, P - timedelta(days=6), P - timedelta(days=3), f"{REASON_PREFIX}: recent"))
        elif kind == 8:
            rows.append((name, P + timedelta(days=2), P + timedelta(days=8), f"{REASON_PREFIX}: future"))
        elif kind == 10:
            rows.append((name, P - timedelta(days=1), P + timedelta(days=3), "maintenance: rack swap"))
    events = []
    for i, name in enumerate(names):
        if i % 6 == 0:  # events of days this run may not judge (e.g. judged under an older plan)
            for k, flag in ((2, "v"), (1, "c"), (12, "v")):
                events.append({"cluster": name, "day": P - timedelta(days=k), "demand_core_hours": 1.0,
                               "served_core_hours": 0.5 if flag == "v" else 1.0, "theta_core_hours": 1.0,
                               "violated": flag == "v", "close": flag == "c"})
    with store.run("slo", {"synthetic": True}) as run:
        store.upsert("shaping_state", pd.DataFrame(rows, columns=["cluster", "disabled_from", "disabled_until",
                                                                  "reason"]), run.run_id)
        store.upsert("slo_events", pd.DataFrame(events), run.run_id)


# ------------------------------------------------------------------------------------------------ the reference


def reference_stage(store, fleet: Fleet, plan_date: date, *, window_days: int = 7, disable_days: int = 7,
                    deadline_hours: int = 24, close_fraction: float = 0.95) -> dict:
    """The stage as it was: per cluster, ``check_cluster_days``, then the previous switch-off, the stored events
    and ``feedback_decision`` (one cluster at a time, several queries each)."""
    from cicm.planning.stages import shaping_disabled

    lag = -(-deadline_hours // 24) + 1
    days = [plan_date - timedelta(days=k) for k in range(window_days + lag, 0, -1)]
    window_start = days[0]
    with store.run("slo", {"reference": True}, plan_date=plan_date) as run:
        frames = []
        for campus in fleet.campuses:
            cutoff = planning_time_utc(plan_date, campus.timezone)
            for cluster in campus.clusters:
                frames.append(check_cluster_days(store, cluster, campus.timezone, days, cutoff,
                                                 deadline_hours=deadline_hours, close_fraction=close_fraction))
        frames = [f for f in frames if not f.empty]
        events = pd.concat(frames, ignore_index=True)
        store.upsert("slo_events", events, run.run_id)
        until = plan_date + timedelta(days=disable_days - 1)
        shaping, decisions = [], []
        for cluster in fleet.clusters():
            prev = store.query("SELECT max(disabled_from) AS d FROM shaping_state WHERE cluster = ? AND reason LIKE ?"
                               " AND disabled_from <= ?", [cluster.name, f"{REASON_PREFIX}%", plan_date])["d"].iloc[0]
            since = window_start if prev is None or pd.isna(prev) else max(window_start, pd.Timestamp(prev).date())
            ev = store.query("SELECT day, violated, close FROM slo_events WHERE cluster = ? AND day >= ? AND day < ?"
                             " ORDER BY day", [cluster.name, since, plan_date])
            ev["day"] = pd.to_datetime(ev["day"]).dt.date
            ev = ev.tail(window_days)
            active = shaping_disabled(store, cluster.name, plan_date)
            reason = None if active else feedback_decision(ev, plan_date)
            if reason:
                shaping.append({"cluster": cluster.name, "disabled_from": plan_date, "disabled_until": until,
                                "reason": reason})
            decisions.append({"cluster": cluster.name, "checked_days": len(ev), "violated": int(ev["violated"].sum()),
                              "close": int(ev["close"].sum()),
                              "shaping": "off (new)" if reason else ("off" if active else "on"),
                              "disabled_until": until if reason else None, "reason": reason or active})
        shaping = pd.DataFrame(shaping, columns=["cluster", "disabled_from", "disabled_until", "reason"])
        if not shaping.empty:
            store.upsert("shaping_state", shaping, run.run_id)
    return {"events": events, "shaping": shaping, "clusters": pd.DataFrame(decisions)}


def stored(store) -> dict[str, pd.DataFrame]:
    return {t: store.query(f"SELECT * EXCLUDE (run_id) FROM {t} ORDER BY ALL") for t in ("slo_events", "shaping_state")}


class CountingConnection:
    """The store's DuckDB connection, counting ``execute`` calls (``Store.query`` and every write go through it)."""

    def __init__(self, con):
        self._con, self.calls = con, 0

    def execute(self, *args, **kwargs):
        self.calls += 1
        return self._con.execute(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._con, name)


# ------------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def scale(tmp_path_factory):
    """60 clusters in 3 campuses (Los Angeles, Chicago, Berlin)."""
    fleet = make_fleet(60, 3)
    path = tmp_path_factory.mktemp("slo-scale") / "cicm.duckdb"
    forced = build_store(path, fleet)
    return fleet, path, forced


def _copy(path: Path, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copy(path, out)
    return out


def test_the_batched_stage_gives_the_per_cluster_answers(scale, tmp_path):
    fleet, path, forced = scale
    ref_db, new_db = _copy(path, tmp_path, "ref.duckdb"), _copy(path, tmp_path, "new.duckdb")
    with Store(ref_db) as ref_store, Store(new_db) as store:
        for day in (PLAN_DATE, PLAN_DATE + timedelta(days=1)):  # the second night sees the first one's switch-offs
            ref = reference_stage(ref_store, fleet, day)
            out = slo_stage(store, fleet, day)
            for key in ("events", "shaping", "clusters"):
                pd.testing.assert_frame_equal(out[key], ref[key], check_exact=True)
            # and cluster by cluster against the per-cluster check
            for campus in fleet.campuses[::2]:
                for cluster in campus.clusters[::4]:
                    one = check_cluster_days(store, cluster, campus.timezone, sorted(set(out["events"]["day"])),
                                             planning_time_utc(day, campus.timezone))
                    mine = out["events"][out["events"]["cluster"] == cluster.name].reset_index(drop=True)
                    pd.testing.assert_frame_equal(mine, one, check_exact=True)
            if day == PLAN_DATE:
                first = out
        a, b = stored(ref_store), stored(store)
    for table in a:
        pd.testing.assert_frame_equal(a[table], b[table], check_exact=True)
    # the store exercises what it should: violations, close days, new and earlier switch-offs, skipped days
    ev, decided = first["events"], first["clusters"]
    assert ev["violated"].sum() >= 5 and ev["close"].sum() >= 5
    assert set(decided["shaping"]) == {"on", "off", "off (new)"}
    assert decided["reason"].str.startswith("maintenance").any()
    assert (decided["checked_days"] < 7).any() and (decided["checked_days"] == 7).any()
    surged = {name for name, days in forced["surge"] if len(days) == 2}
    assert surged & set(first["shaping"]["cluster"])


def test_the_number_of_queries_does_not_grow_with_the_clusters(scale, tmp_path):
    counts = {}
    small = make_fleet(10, 3)
    build_store(tmp_path / "s10.duckdb", small)
    for n, fleet, path in ((10, small, tmp_path / "s10.duckdb"), (60, scale[0], _copy(scale[1], tmp_path, "s60.duckdb"))):
        with Store(path) as store:
            counting = CountingConnection(store.con)
            store.con = counting
            out = slo_stage(store, fleet, PLAN_DATE)
            store.con = counting._con
        assert not out["shaping"].empty and len(out["clusters"]) == n
        counts[n] = counting.calls
    assert counts[10] == counts[60] <= 20, counts


def test_a_cluster_without_usage_does_not_stop_the_others(scale, tmp_path):
    fleet, path, forced = scale
    silent = forced["no_usage"]
    with Store(_copy(path, tmp_path, "db.duckdb")) as store:
        assert store.query("SELECT count(*) AS n FROM usage_history WHERE cluster = ?", [silent])["n"].iloc[0] == 0
        earlier = store.query("SELECT count(*) AS n FROM slo_events WHERE cluster = ? AND day >= ? AND day < ?",
                              [silent, PLAN_DATE - timedelta(days=9), PLAN_DATE])["n"].iloc[0]
        out = slo_stage(store, fleet, PLAN_DATE)
    judged = set(out["events"]["cluster"])
    assert silent not in judged
    assert len(judged) == len(fleet.clusters()) - 1
    row = out["clusters"].set_index("cluster").loc[silent]
    assert row["checked_days"] == earlier  # only what earlier nights stored


def test_the_stage_on_a_store_without_usage_or_plans(tmp_path):
    fleet = make_fleet(6, 2)
    with Store(tmp_path / "empty.duckdb") as store:
        out = slo_stage(store, fleet, PLAN_DATE)
    assert out["events"].empty and out["shaping"].empty
    assert list(out["clusters"]["shaping"]) == ["on"] * 6
    assert out["summary"] == "slo: 0 cluster-days checked (no complete days): 0 violated, 0 close; no new switch-off"


# ------------------------------------------------------------------------------------------------ the pieces


def _fluid_case(draw_rows, hours, deadline, seed):
    rng = np.random.default_rng(seed)
    arrivals = rng.exponential(10, (draw_rows, hours)) * (rng.random((draw_rows, hours)) < 0.6)
    room = rng.exponential(8, (draw_rows, hours)) * (rng.random((draw_rows, hours)) < 0.8)
    room[rng.random((draw_rows, hours)) < 0.05] = np.nan
    arrivals[:, -1] = arrivals[:, -1] * 1e-13  # tiny arrivals (the 1e-12 rule)
    return arrivals, room


@pytest.mark.parametrize("rows,hours,deadline,seed", [(1, 1, 1, 0), (5, 40, 3, 1), (40, 120, 24, 2),
                                                      (200, 264, 24, 3), (30, 100, 30, 4), (10, 50, 1, 5)])
def test_fluid_served_many_is_fluid_served_row_by_row(rows, hours, deadline, seed):
    from cicm.planning.slo import fluid_served_many

    arrivals, room = _fluid_case(rows, hours, deadline, seed)
    many = fluid_served_many(arrivals, room, deadline)
    one = np.array([fluid_served(a, r, deadline) for a, r in zip(arrivals, room)])
    assert np.array_equal(many, one)  # bit for bit
    with pytest.raises(ValueError):
        fluid_served_many(-arrivals - 1, room, deadline)


def test_row_sums_are_numpys_one_dimensional_sums():
    from cicm.planning.slo import _row_sums

    rng = np.random.default_rng(7)
    for width in (1, 3, 7, 8, 9, 23, 24, 25, 48, 130, 300):
        x = rng.lognormal(0, 3, (50, width)) * rng.choice([1e-9, 1.0, 1e9], (50, width))
        assert np.array_equal(_row_sums(x), np.array([row.sum() for row in x]))


def test_feedback_reason_is_feedback_decision_on_lists():
    from cicm.planning.slo import feedback_reason

    rng = np.random.default_rng(3)
    for _ in range(300):
        n = int(rng.integers(0, 9))
        days = sorted(date(2022, 6, 1) + timedelta(days=int(d)) for d in rng.choice(12, n, replace=False))
        violated = list(rng.random(n) < 0.3)
        close = list(rng.random(n) < 0.3)
        frame = pd.DataFrame({"day": days, "violated": violated, "close": close})
        for consecutive, recur in ((2, 2), (3, 2), (2, 3)):
            assert feedback_reason(days, violated, close, consecutive_days=consecutive, recur_violations=recur) == \
                feedback_decision(frame, PLAN_DATE, consecutive_days=consecutive, recur_violations=recur)


if __name__ == "__main__":  # build a store of N clusters in campuses of 100 and time the stage on it
    import sys

    for n in [int(a) for a in sys.argv[1:]] or [100, 1000]:
        fleet = make_fleet(n, max(1, n // 100))
        path = Path(f"slo-scale-{n}.duckdb")
        path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        build_store(path, fleet)
        with Store(path) as store:
            t1 = time.perf_counter()
            out = slo_stage(store, fleet, PLAN_DATE)
            t2 = time.perf_counter()
        print(f"{n} clusters: store built in {t1 - t0:.1f}s, slo_stage {t2 - t1:.2f}s: {out['summary'][:100]}")
