"""The SLO check and its feedback loop, as plain functions (the nightly flow runs ``slo_stage`` before planning).

**Check (per cluster-day D, in the campus's local day).** Flexible work arriving in hour h
(``usage_history.flexible_arrived_core_hours``) must be served within ``deadline_hours`` (24) of its arrival.
The hourly room flexible work had under the plan is

    room(h) = max(0, min(VCC(h) / R(h), capacity) - U_IF(h))

with VCC and R (the reservations-to-usage ratio the plan used, from ``load_forecasts``; the measured ratio
when the plan has none) from the plan of h's day and U_IF(h) the measured inflexible usage. Hours of a
fallback plan, or of a day without a plan, have the full room ``capacity - U_IF(h)``. A fluid FIFO queue
serves arrivals in order; work still unserved at its deadline is counted as missed and dropped (so one bad day
does not spill into the verdicts of the next). Day D **violates** when some of its arrivals miss their deadline;
it came **close** when its measured reservations reached ``close_fraction`` x Theta (the plan's capacity
requirement). The queue starts one day before the first checked day, so earlier work competes for room.

Only complete evidence is used: a day is checked once its deadline window has ended before the planning time
(18:00 local on the eve of the plan day, as for every other input), i.e. for plan day P the newest checked day
is P-3. Only days with a stored plan are checked.

**Feedback.** For plan day P and each cluster, over the last ``window_days`` checked days (ignoring days that
already triggered an earlier switch-off): ``consecutive_days`` (2) flagged (violated or close) days in a row, or
``recur_violations`` (2) violations, switch shaping off from P for ``disable_days`` (7) days: a ``shaping_state``
row with reason ``slo-feedback: ...``. ``cicm.planning.stages.shaping_disabled`` then makes the plan fall back with that
reason.

**At scale.** ``slo_stage`` checks the whole fleet with ``check_fleet_days``: three queries (usage, plan hours,
plan status) for all clusters, the fluid queue run for all clusters at once (``fluid_served_many``), and three
queries for the feedback; the query count does not depend on the number of clusters. The per-cluster reference
check (``tests/slo_reference.py``) and ``feedback_decision`` give exactly the stage's rows and decisions.
"""
from __future__ import annotations

import json
from datetime import date, timedelta
from typing import Optional

import numpy as np
import pandas as pd

from cicm.store import slo as slo_store
from cicm.timeutil import local_day_hours_utc, planning_time_utc

REASON_PREFIX = "slo-feedback"
DEADLINE_HOURS = 24
CLOSE_FRACTION = 0.95

EVENT_COLUMNS = ["cluster", "day", "demand_core_hours", "served_core_hours", "theta_core_hours", "violated", "close"]


# ------------------------------------------------------------------------------------------------ the check


def fluid_served_many(arrivals: np.ndarray, room: np.ndarray, deadline_hours: int = DEADLINE_HOURS) -> np.ndarray:
    """Core-hours of each hour's arrivals served within ``deadline_hours``: a FIFO fluid queue in 1-hour steps, for
    many series at once (arrivals of hour t may run in hours t .. t + deadline_hours - 1; what is left then is
    dropped). Row i equals the one-series reference (``fluid_served`` in tests/slo_reference.py) bit for bit."""
    a = np.asarray(arrivals, dtype=float)
    r = np.asarray(room, dtype=float)
    if a.shape != r.shape:
        raise ValueError("arrivals and room must have the same length")
    if a.ndim != 2:
        raise ValueError("arrivals and room must be 2-D (series x hours)")
    if np.isnan(a).any() or (a < 0).any():
        raise ValueError("arrivals must be numbers >= 0")
    n, hours = a.shape
    served = np.zeros_like(a)
    if n == 0 or hours == 0:
        return served
    deadline_hours = int(deadline_hours)
    rem = a.copy()
    # The queue of row i is the positive arrivals head[i] .. t not yet served or dropped; zero arrivals are never
    # queued, so the head skips them (nxt[i, s]: the first positive arrival at or after s, ``hours`` if none).
    position = np.where(a > 0, np.arange(hours), hours)
    nxt = np.empty((n, hours + 1), dtype=np.intp)
    nxt[:, hours] = hours
    nxt[:, :hours] = np.minimum.accumulate(position[:, ::-1], axis=1)[:, ::-1]
    head = nxt[:, 0].copy()
    room_left = np.where(np.isfinite(r), np.maximum(r, 0.0), 0.0)
    for t in range(hours):
        low = t - deadline_hours + 1  # arrivals before ``low`` missed their deadline
        if low > 0:
            late = np.nonzero(head < low)[0]
            if late.size:
                head[late] = nxt[late, low]
        left = room_left[:, t]
        active = np.nonzero((left > 0) & (head <= t))[0]
        if not active.size:
            continue
        left = left[active]
        while active.size:
            h = head[active]
            queued = rem[active, h]
            take = np.minimum(left, queued)
            served[active, h] += take
            queued = queued - take
            rem[active, h] = queued
            left = left - take
            done = queued <= 1e-12
            if done.any():
                head[active[done]] = nxt[active[done], h[done] + 1]
            more = (left > 0) & (head[active] <= t)
            active, left = active[more], left[more]
    return served


def _pairwise_rows(x: np.ndarray) -> np.ndarray:
    """Row sums of a 2-D array in numpy's 1-D pairwise order (``x[i].sum()`` for each row, vectorised)."""
    n, m = x.shape
    if m < 8:
        out = np.zeros(n)
        for j in range(m):
            out = out + x[:, j]
        return out
    if m <= 128:
        acc = x[:, :8].copy()
        whole = m - m % 8
        for j in range(8, whole, 8):
            acc += x[:, j:j + 8]
        out = ((acc[:, 0] + acc[:, 1]) + (acc[:, 2] + acc[:, 3])) + ((acc[:, 4] + acc[:, 5]) + (acc[:, 6] + acc[:, 7]))
        for j in range(whole, m):
            out = out + x[:, j]
        return out
    half = m // 2
    half -= half % 8
    return _pairwise_rows(x[:, :half]) + _pairwise_rows(x[:, half:])


_ROW_SUMS_MATCH: list[bool] = []


def _row_sums(x: np.ndarray) -> np.ndarray:
    """``[float(row.sum()) for row in x]``, exactly (the stage's stored sums must not depend on batching)."""
    if not _ROW_SUMS_MATCH:  # this numpy sums 1-D arrays in the order _pairwise_rows assumes?
        rng = np.random.default_rng(0)
        sample = rng.lognormal(0.0, 3.0, (64, 300))
        _ROW_SUMS_MATCH.append(all(
            np.array_equal(_pairwise_rows(sample[:, :m]), np.array([row[:m].sum() for row in sample]))
            for m in (1, 5, 8, 23, 24, 25, 48, 129, 300)))
    if _ROW_SUMS_MATCH[0]:
        return _pairwise_rows(x)
    return np.array([row.sum() for row in x], dtype=float)


def _capacities(clusters) -> np.ndarray:
    """``float(cluster.capacity_cores)`` of each cluster (the sum over its power domains of machines x
    cores_per_machine), looking each server row's cores up once: it is a SPECpower table read, slow 20,000 times."""
    cores: dict[int, int] = {}
    out = []
    for cluster in clusters:
        total = 0
        for domain in cluster.power_domains:
            if domain.spec_row is None or domain.machines is None:
                total += domain.capacity_cores
                continue
            if domain.spec_row not in cores:
                cores[domain.spec_row] = domain.cores_per_machine
            total += domain.machines * cores[domain.spec_row]
        out.append(float(total))
    return np.array(out, dtype=float)


def check_fleet_days(store, fleet, days: list[date], plan_date: date, *, deadline_hours: int = DEADLINE_HOURS,
                     close_fraction: float = CLOSE_FRACTION) -> pd.DataFrame:
    """The check of every cluster of the fleet (the per-cluster reference: tests/slo_reference.py) (cutoff: the plan of ``plan_date``'s planning time in
    each campus's zone), with three queries for the whole fleet and the checks vectorised over clusters.
    Same rows, in the same order (campus, cluster, day), with the same values as the per-cluster check."""
    clusters = [(campus, cluster) for campus in fleet.campuses for cluster in campus.clusters]
    names = [cluster.name for _, cluster in clusters]
    if not days or not clusters:
        return pd.DataFrame(columns=EVENT_COLUMNS)
    deadline_hours = int(deadline_hours)
    days = sorted(days)
    first, last = days[0], days[-1]
    hour_us = 3_600_000_000

    # one hour grid per campus, as the per-cluster reference makes it: the day before the first day .. the day after the
    # last, cut at the planning time
    grids, campus_rows, row = [], [], 0
    for campus in fleet.campuses:
        cutoff = planning_time_utc(plan_date, campus.timezone)
        start = local_day_hours_utc(first - timedelta(days=1), campus.timezone)[0]
        end = local_day_hours_utc(last + timedelta(days=1), campus.timezone)[-1] + pd.Timedelta(hours=1)
        end = min(end, cutoff.floor("h"))
        grids.append((start, end, cutoff, pd.date_range(start, end, freq="h", inclusive="left", name="hour")))
        campus_rows.append((row, row + len(campus.clusters)))
        row += len(campus.clusters)
    n = len(names)
    width = max(len(g[3]) for g in grids)
    start_us = np.concatenate([np.full(b - a, g[0].value // 1000, dtype=np.int64)
                               for g, (a, b) in zip(grids, campus_rows)])
    length = np.concatenate([np.full(b - a, len(g[3]), dtype=np.int64) for g, (a, b) in zip(grids, campus_rows)])
    lo = min(g[0] for g in grids)
    hi = max(g[1] for g in grids)

    def cells(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, column, kept) of the rows of ``frame`` (ci, us) that fall on their cluster's grid."""
        ci = frame["ci"].to_numpy(np.int64)
        offset = frame["us"].to_numpy(np.int64) - start_us[ci]
        col = offset // hour_us
        kept = (offset % hour_us == 0) & (col >= 0) & (col < length[ci])
        return ci[kept], col[kept], kept

    usage = slo_store.fleet_usage(store, names, lo, hi)
    plans = slo_store.fleet_plan_hours(store, names, lo, hi)
    status = slo_store.fleet_plan_status(store, names, first, last)

    def table(frame: pd.DataFrame, column: str, where: tuple) -> np.ndarray:
        out = np.full((n, width), np.nan)
        out[where[0], where[1]] = frame[column].to_numpy(float)[where[2]]
        return out

    where = cells(usage)
    infl = table(usage, "inflexible_cpu_cores", where)
    flex = table(usage, "flexible_cpu_cores", where)
    reserved = table(usage, "reserved_cpu_cores", where)
    arrived = table(usage, "flexible_arrived_core_hours", where)
    where = cells(plans)
    if len(where[0]) and np.bincount(where[0] * width + where[1], minlength=1).max() > 1:
        raise ValueError("cannot reindex on an axis with duplicate labels")  # as the per-cluster check
    vcc = table(plans, "vcc_cores", where)
    plan_ratio = table(plans, "reservation_ratio", where)
    shaped = np.zeros((n, width), dtype=bool)
    shaped[where[0], where[1]] = plans["shaped"].to_numpy(dtype=bool, na_value=False)[where[2]]

    capacity = _capacities([cluster for _, cluster in clusters])[:, None]
    default_ratio = np.array([cluster.reservation_ratio for _, cluster in clusters], dtype=float)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        total = infl + flex
        measured_r = np.where(total > 0, reserved / np.where(total > 0, total, 1), np.nan)
        ratio = np.where(np.isfinite(plan_ratio) & (plan_ratio > 0), plan_ratio,
                         np.where(np.isfinite(measured_r) & (measured_r > 0), measured_r, default_ratio))
        shaped &= np.isfinite(vcc)
        cap_usage = np.where(shaped, np.minimum(vcc / ratio, capacity), capacity)
        room = np.maximum(cap_usage - np.nan_to_num(np.where(np.isnan(infl), capacity, infl)), 0.0)
    arrivals = np.nan_to_num(arrived, nan=0.0)
    served = fluid_served_many(arrivals, room, deadline_hours)
    have = ~np.isnan(infl)
    reserved_sum = np.where(np.isnan(reserved), 0.0, reserved)  # pandas' sum skips missing values

    planned = np.zeros((n, len(days)), dtype=bool)
    theta = np.full((n, len(days)), np.nan)
    di = status["di"].to_numpy(np.int64)
    ci = status["ci"].to_numpy(np.int64)
    offsets = {(day - first).days: k for k, day in enumerate(days)}
    k_of = np.array([offsets.get(int(d), -1) for d in di], dtype=np.int64)
    on = k_of >= 0
    planned[ci[on], k_of[on]] = True
    theta[ci[on], k_of[on]] = status["theta_core_hours"].to_numpy(float)[on]
    theta = np.where(np.isfinite(theta), theta, np.nan)

    parts = []  # (ci, k, demand, served, theta, reserved) per campus and day
    for campus, (a, b), (_, _, cutoff, grid) in zip(fleet.campuses, campus_rows, grids):
        if a == b:
            continue
        for k, day in enumerate(days):
            hours = local_day_hours_utc(day, campus.timezone)
            if hours[-1] + pd.Timedelta(hours=deadline_hours) > cutoff:
                continue  # evidence not complete yet
            window = grid.get_indexer(hours)
            if (window < 0).any():
                continue
            after = slice(window[-1], min(window[-1] + deadline_hours, len(grid)))
            ok = planned[a:b, k] & have[a:b][:, window].all(axis=1) & have[a:b, after].all(axis=1)
            rows = np.nonzero(ok)[0] + a
            if not rows.size:
                continue
            parts.append((rows, np.full(rows.size, k), _row_sums(arrivals[rows][:, window]),
                          _row_sums(served[rows][:, window]), theta[rows, k],
                          _row_sums(reserved_sum[rows][:, window])))
    if not parts:
        return pd.DataFrame(columns=EVENT_COLUMNS)
    rows_c, days_k, demand, got, theta, res = (np.concatenate(x) for x in zip(*parts))
    order = np.lexsort((days_k, rows_c))
    rows_c, days_k, demand, got, theta, res = (rows_c[order], days_k[order], demand[order], got[order], theta[order],
                                               res[order])
    return pd.DataFrame({
        "cluster": [names[i] for i in rows_c], "day": [days[j] for j in days_k], "demand_core_hours": demand,
        "served_core_hours": got, "theta_core_hours": theta,
        "violated": got < demand - 1e-6 * np.maximum(demand, 1.0),
        "close": np.isfinite(theta) & (res >= close_fraction * theta),
    }, columns=EVENT_COLUMNS)


# ------------------------------------------------------------------------------------------------ feedback


def feedback_decision(events: pd.DataFrame, plan_date: date, *, consecutive_days: int = 2,
                      recur_violations: int = 2) -> Optional[str]:
    """The reason to switch shaping off (``slo-feedback: ...``), or None. ``events``: one cluster's checked days."""
    if events.empty:
        return None
    ev = events.sort_values("day")
    flagged = ev[ev["violated"] | ev["close"]]
    days = list(flagged["day"])
    label = {r.day: ("violated" + (", close" if r.close else "")) if r.violated else "close"
             for r in flagged.itertuples()}
    run: list[date] = []
    for d in days:
        run = run + [d] if run and d == run[-1] + timedelta(days=1) else [d]
        if len(run) >= consecutive_days:
            listed = ", ".join(f"{x} {label[x]}" for x in run[-consecutive_days:])
            return f"{REASON_PREFIX}: {consecutive_days} close or violating days in a row ({listed})"
    violations = list(ev.loc[ev["violated"], "day"])
    if len(violations) >= recur_violations:
        return (f"{REASON_PREFIX}: {len(violations)} violating days in the window "
                f"({', '.join(str(d) for d in violations)})")
    return None


def feedback_reason(days: list[date], violated: list[bool], close: list[bool], *, consecutive_days: int = 2,
                    recur_violations: int = 2) -> Optional[str]:
    """``feedback_decision`` on plain lists (one cluster's checked days, in day order, each day once)."""
    flagged = [(d, v, c) for d, v, c in zip(days, violated, close) if v or c]
    label = {d: ("violated" + (", close" if c else "")) if v else "close" for d, v, c in flagged}
    run: list[date] = []
    for d, _, _ in flagged:
        run = run + [d] if run and d == run[-1] + timedelta(days=1) else [d]
        if len(run) >= consecutive_days:
            listed = ", ".join(f"{x} {label[x]}" for x in run[-consecutive_days:])
            return f"{REASON_PREFIX}: {consecutive_days} close or violating days in a row ({listed})"
    violations = [d for d, v in zip(days, violated) if v]
    if len(violations) >= recur_violations:
        return (f"{REASON_PREFIX}: {len(violations)} violating days in the window "
                f"({', '.join(str(d) for d in violations)})")
    return None


def _feedback_inputs(store, fleet, plan_date: date, window_start: date, window_days: int):
    """Per cluster in fleet order: (name, (days, violated, close) of the checked days the feedback looks at, why
    shaping is already off or None). Three queries for the fleet: the last SLO switch-off of each cluster, the
    stored slo_events of the window, the switch-offs in force on ``plan_date``."""
    from cicm.planning.stages import shaping_disabled_many

    names = [c.name for c in fleet.clusters()]
    prev = slo_store.last_switch_offs(store, names, REASON_PREFIX, plan_date)
    since = {c: max(window_start, pd.Timestamp(d).date()) for c, d in zip(prev["cluster"], prev["d"])
             if d is not None and not pd.isna(d)}
    ev = slo_store.events_between(store, names, window_start, plan_date)
    by_cluster: dict[str, tuple[list, list, list]] = {}
    if not ev.empty:
        ev_days = list(pd.to_datetime(ev["day"]).dt.date)
        ev_names = ev["cluster"].tolist()
        violated = ev["violated"].tolist()
        close = ev["close"].tolist()
        cuts = [0] + [i for i in range(1, len(ev_names)) if ev_names[i] != ev_names[i - 1]] + [len(ev_names)]
        for a, b in zip(cuts[:-1], cuts[1:]):
            name = ev_names[a]
            first = since.get(name, window_start)
            keep = [i for i in range(a, b) if ev_days[i] >= first][-window_days:]
            by_cluster[name] = ([ev_days[i] for i in keep], [bool(violated[i]) for i in keep],
                                [bool(close[i]) for i in keep])
    disabled = shaping_disabled_many(store, names, plan_date)
    empty: tuple[list, list, list] = ([], [], [])
    return [(name, by_cluster.get(name, empty), disabled.get(name)) for name in names]


def slo_stage(store, fleet, plan_date: date, *, window_days: int = 7, close_fraction: float = CLOSE_FRACTION,
              disable_days: int = 7, consecutive_days: int = 2, recur_violations: int = 2,
              deadline_hours: int = DEADLINE_HOURS, run_id: str | None = None) -> dict:
    """Check the last ``window_days`` days of every cluster, store slo_events, switch shaping off where the SLO
    says so (shaping_state). Call before the plan of ``plan_date`` is made.

    Writes in the caller's transaction when ``run_id`` is given, else in its own run (kind ``slo``).
    Returns ``{"events", "shaping", "clusters": DataFrames, "summary": one line, "run_id"}``.
    """
    for name, value in (("window_days", window_days), ("disable_days", disable_days),
                        ("consecutive_days", consecutive_days), ("recur_violations", recur_violations),
                        ("deadline_hours", deadline_hours)):
        if int(value) < 1:
            from cicm.errors import InputError

            raise InputError(name, "must be >= 1")
    if not 0 < close_fraction:
        from cicm.errors import InputError

        raise InputError("close_fraction", "must be > 0")
    lag = -(-int(deadline_hours) // 24) + 1  # the newest day with complete evidence is plan_date - lag - 1
    days = [plan_date - timedelta(days=k) for k in range(window_days + lag, 0, -1)]
    window_start = days[0]
    params = {"window_days": window_days, "close_fraction": close_fraction, "disable_days": disable_days,
              "consecutive_days": consecutive_days, "recur_violations": recur_violations,
              "deadline_hours": deadline_hours}

    def body(rid: str) -> dict:
        events = check_fleet_days(store, fleet, days, plan_date, deadline_hours=deadline_hours,
                                  close_fraction=close_fraction)
        if not events.empty:
            slo_store.write_events(store, events, rid)
        until = plan_date + timedelta(days=disable_days - 1)
        shaping_rows, decisions = [], []
        for name, ev, active in _feedback_inputs(store, fleet, plan_date, window_start, window_days):
            checked, violated, close = ev
            reason = None if active else feedback_reason(checked, violated, close, consecutive_days=consecutive_days,
                                                         recur_violations=recur_violations)
            if reason:
                shaping_rows.append({"cluster": name, "disabled_from": plan_date, "disabled_until": until,
                                     "reason": reason})
            decisions.append({
                "cluster": name, "checked_days": len(checked), "violated": sum(violated), "close": sum(close),
                "shaping": "off (new)" if reason else ("off" if active else "on"),
                "disabled_until": until if reason else None, "reason": reason or active,
            })
        shaping = pd.DataFrame(shaping_rows, columns=["cluster", "disabled_from", "disabled_until", "reason"])
        if not shaping.empty:
            slo_store.write_switch_offs(store, shaping, rid)
        clusters = pd.DataFrame(decisions)
        new_off = [r["cluster"] for r in shaping_rows]
        already = [d["cluster"] for d in decisions if d["shaping"] == "off"]
        span = f"{events['day'].min()}..{events['day'].max()}" if not events.empty else "no complete days"
        n_viol = int(events["violated"].sum()) if len(events) else 0
        n_close = int(events["close"].sum()) if len(events) else 0
        summary = (f"slo: {len(events)} cluster-days checked ({span}): {n_viol} violated, {n_close} close; "
                   + (f"shaping switched off for {', '.join(new_off)} until {until}"
                      if new_off else "no new switch-off")
                   + (f"; already off: {', '.join(already)}" if already else ""))
        return {"events": events, "shaping": shaping, "clusters": clusters, "summary": summary, "run_id": rid}

    if run_id is not None:
        return body(run_id)
    with store.run("slo", params, plan_date=plan_date) as run:
        out = body(run.run_id)
        run.summary = {"summary": out["summary"], "switched_off": list(out["shaping"]["cluster"])}
    return out


# ------------------------------------------------------------------------------------------------ status


def slo_status(store, as_of: date | None = None) -> pd.DataFrame:
    """Per cluster: checked days, violations, close days, violation rate, and shaping on/off as of ``as_of``
    (default: the newest plan day in the store, else today)."""
    if as_of is None:
        newest = slo_store.newest_plan_date(store)
        as_of = pd.Timestamp(newest).date() if newest is not None and not pd.isna(newest) else date.today()
    events = slo_store.event_totals(store)
    state = slo_store.switch_offs_ending_from(store, as_of)
    planned = slo_store.planned_clusters(store)
    clusters = sorted(set(events["cluster"]) | set(state["cluster"]) | set(planned))
    out = pd.DataFrame({"cluster": pd.Series(clusters, dtype=object)})
    out = out.merge(events, on="cluster", how="left").merge(state, on="cluster", how="left")
    out["days"] = out["days"].fillna(0).astype(int)
    out["violated"] = out["violated"].fillna(0).astype(int)
    out["close"] = out["close"].fillna(0).astype(int)
    out["violation_pct"] = np.where(out["days"] > 0, 100.0 * out["violated"] / out["days"].clip(lower=1), np.nan)
    def state_of(d) -> str:
        if d is None or pd.isna(d):
            return "on"
        d = pd.Timestamp(d).date()
        return "off" if d <= as_of else f"off from {d}"

    out["shaping"] = [state_of(d) for d in out["disabled_from"]]
    out["as_of"] = as_of
    cols = ["cluster", "shaping", "disabled_from", "disabled_until", "reason", "days", "violated", "close",
            "violation_pct", "first_day", "last_day", "last_violation", "as_of"]
    return out[cols]


def events_json(frame: pd.DataFrame) -> str:
    return json.dumps(frame.to_dict("records"), default=str)
