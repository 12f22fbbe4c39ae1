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
row with reason ``slo-feedback: ...``. ``plan_stages.shaping_disabled`` then makes the plan fall back with that
reason.
"""
from __future__ import annotations

import json
from collections import deque
from datetime import date, timedelta
from typing import Optional

import numpy as np
import pandas as pd

from cicm.timeutil import local_day_hours_utc, planning_time_utc

REASON_PREFIX = "slo-feedback"
DEADLINE_HOURS = 24
CLOSE_FRACTION = 0.95

EVENT_COLUMNS = ["cluster", "day", "demand_core_hours", "served_core_hours", "theta_core_hours", "violated", "close"]


# ------------------------------------------------------------------------------------------------ the check


def fluid_served(arrivals: np.ndarray, room: np.ndarray, deadline_hours: int = DEADLINE_HOURS) -> np.ndarray:
    """Core-hours of each hour's arrivals served within ``deadline_hours`` (FIFO fluid queue, 1-hour steps).

    Arrivals of hour t may run in hours t .. t + deadline_hours - 1; what is left then is dropped.
    """
    a = np.asarray(arrivals, dtype=float)
    r = np.asarray(room, dtype=float)
    if a.shape != r.shape:
        raise ValueError("arrivals and room must have the same length")
    if np.isnan(a).any() or (a < 0).any():
        raise ValueError("arrivals must be numbers >= 0")
    served = np.zeros_like(a)
    queue: deque[list] = deque()
    for t in range(len(a)):
        if a[t] > 0:
            queue.append([t, a[t]])
        while queue and queue[0][0] + deadline_hours <= t:
            queue.popleft()  # missed its deadline
        left = max(float(r[t]), 0.0) if np.isfinite(r[t]) else 0.0
        while left > 0 and queue:
            take = min(left, queue[0][1])
            served[queue[0][0]] += take
            queue[0][1] -= take
            left -= take
            if queue[0][1] <= 1e-12:
                queue.popleft()
    return served


def _plan_hours(store, cluster: str, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    return store.query(
        """SELECT v.hour, v.plan_date, v.vcc_cores, s.status, s.theta_core_hours, s.capacity_cores,
                  lf.reservation_ratio
           FROM current_vccs v JOIN current_vcc_status s ON s.run_id = v.run_id AND s.cluster = v.cluster
           LEFT JOIN load_forecasts lf ON lf.run_id = v.run_id AND lf.cluster = v.cluster AND lf.hour = v.hour
           WHERE v.cluster = ? AND v.hour >= ? AND v.hour < ? ORDER BY v.hour""",
        [cluster, start, end],
    )


def check_cluster_days(store, cluster, tz: str, days: list[date], cutoff: pd.Timestamp, *,
                       deadline_hours: int = DEADLINE_HOURS, close_fraction: float = CLOSE_FRACTION) -> pd.DataFrame:
    """slo_events rows for the days of ``days`` that have a plan and complete evidence before ``cutoff``."""
    if not days:
        return pd.DataFrame(columns=EVENT_COLUMNS)
    first, last = min(days), max(days)
    start = local_day_hours_utc(first - timedelta(days=1), tz)[0]
    end = local_day_hours_utc(last + timedelta(days=1), tz)[-1] + pd.Timedelta(hours=1)
    end = min(end, cutoff.floor("h"))
    grid = pd.date_range(start, end, freq="h", inclusive="left", name="hour")
    usage = store.query(
        "SELECT * EXCLUDE (run_id) FROM usage_history WHERE cluster = ? AND hour >= ? AND hour < ? ORDER BY hour",
        [cluster.name, start, end],
    ).set_index("hour").reindex(grid)
    plans = _plan_hours(store, cluster.name, start, end).set_index("hour").reindex(grid)
    capacity = float(cluster.capacity_cores)
    infl = usage["inflexible_cpu_cores"].to_numpy(float)
    total = (usage["inflexible_cpu_cores"] + usage["flexible_cpu_cores"]).to_numpy(float)
    reserved = usage["reserved_cpu_cores"].to_numpy(float)
    measured_r = np.where(total > 0, reserved / np.where(total > 0, total, 1), np.nan)
    ratio = plans["reservation_ratio"].to_numpy(float)
    ratio = np.where(np.isfinite(ratio) & (ratio > 0), ratio,
                     np.where(np.isfinite(measured_r) & (measured_r > 0), measured_r, cluster.reservation_ratio))
    shaped = (plans["status"] == "shaped").to_numpy() & np.isfinite(plans["vcc_cores"].to_numpy(float))
    cap_usage = np.where(shaped, np.minimum(plans["vcc_cores"].to_numpy(float) / ratio, capacity), capacity)
    room = np.maximum(cap_usage - np.nan_to_num(infl, nan=capacity), 0.0)
    arrivals = np.nan_to_num(usage["flexible_arrived_core_hours"].to_numpy(float), nan=0.0)
    served = fluid_served(arrivals, room, deadline_hours)

    status = store.query(
        "SELECT plan_date, status, theta_core_hours FROM current_vcc_status"
        " WHERE cluster = ? AND plan_date >= ? AND plan_date <= ?",
        [cluster.name, first, last],
    )
    status["plan_date"] = pd.to_datetime(status["plan_date"]).dt.date
    status = status.set_index("plan_date")
    rows = []
    have = usage["inflexible_cpu_cores"].notna()
    for day in sorted(days):
        if day not in status.index:
            continue  # no plan: nothing to check
        hours = local_day_hours_utc(day, tz)
        deadline_end = hours[-1] + pd.Timedelta(hours=deadline_hours)
        if deadline_end > cutoff or not have.reindex(hours, fill_value=False).all():
            continue  # evidence not complete yet
        window = grid.get_indexer(hours)
        if (window < 0).any() or not have.iloc[window[-1]: window[-1] + deadline_hours].all():
            continue
        demand = float(arrivals[window].sum())
        got = float(served[window].sum())
        theta = status.loc[day, "theta_core_hours"]
        theta = float(theta) if theta is not None and np.isfinite(theta) else np.nan
        reserved = float(usage["reserved_cpu_cores"].iloc[window].sum())
        rows.append({
            "cluster": cluster.name, "day": day, "demand_core_hours": demand, "served_core_hours": got,
            "theta_core_hours": theta, "violated": bool(got < demand - 1e-6 * max(demand, 1.0)),
            "close": bool(np.isfinite(theta) and reserved >= close_fraction * theta),
        })
    return pd.DataFrame(rows, columns=EVENT_COLUMNS)


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


def slo_stage(store, fleet, plan_date: date, *, window_days: int = 7, close_fraction: float = CLOSE_FRACTION,
              disable_days: int = 7, consecutive_days: int = 2, recur_violations: int = 2,
              deadline_hours: int = DEADLINE_HOURS, run_id: str | None = None) -> dict:
    """Check the last ``window_days`` days of every cluster, store slo_events, switch shaping off where the SLO
    says so (shaping_state). Call before the plan of ``plan_date`` is made.

    Writes in the caller's transaction when ``run_id`` is given, else in its own run (kind ``slo``).
    Returns ``{"events", "shaping", "clusters": DataFrames, "summary": one line, "run_id"}``.
    """
    from cicm.flows.plan_stages import shaping_disabled

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
        frames = []
        for campus in fleet.campuses:
            cutoff = planning_time_utc(plan_date, campus.timezone)
            for cluster in campus.clusters:
                frames.append(check_cluster_days(store, cluster, campus.timezone, days, cutoff,
                                                 deadline_hours=deadline_hours, close_fraction=close_fraction))
        frames = [f for f in frames if not f.empty]
        events = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=EVENT_COLUMNS)
        if not events.empty:
            store.upsert("slo_events", events, rid)
        shaping_rows, decisions = [], []
        until = plan_date + timedelta(days=disable_days - 1)
        for cluster in fleet.clusters():
            prev = store.query(
                "SELECT max(disabled_from) AS d FROM shaping_state"
                " WHERE cluster = ? AND reason LIKE ? AND disabled_from <= ?",
                [cluster.name, f"{REASON_PREFIX}%", plan_date])["d"].iloc[0]
            since = window_start if prev is None or pd.isna(prev) else max(window_start, pd.Timestamp(prev).date())
            ev = store.query(
                "SELECT day, violated, close FROM slo_events WHERE cluster = ? AND day >= ? AND day < ? ORDER BY day",
                [cluster.name, since, plan_date])
            ev["day"] = pd.to_datetime(ev["day"]).dt.date
            ev = ev.tail(window_days)
            active = shaping_disabled(store, cluster.name, plan_date)
            reason = None if active else feedback_decision(ev, plan_date, consecutive_days=consecutive_days,
                                                               recur_violations=recur_violations)
            if reason:
                shaping_rows.append({"cluster": cluster.name, "disabled_from": plan_date, "disabled_until": until,
                                     "reason": reason})
            decisions.append({
                "cluster": cluster.name, "checked_days": len(ev), "violated": int(ev["violated"].sum()),
                "close": int(ev["close"].sum()),
                "shaping": "off (new)" if reason else ("off" if active else "on"),
                "disabled_until": until if reason else None, "reason": reason or active,
            })
        shaping = pd.DataFrame(shaping_rows, columns=["cluster", "disabled_from", "disabled_until", "reason"])
        if not shaping.empty:
            store.upsert("shaping_state", shaping, rid)
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
        newest = store.query("SELECT max(plan_date) AS d FROM current_plans")["d"].iloc[0]
        as_of = pd.Timestamp(newest).date() if newest is not None and not pd.isna(newest) else date.today()
    events = store.query(
        """SELECT cluster, count(*) AS days, sum(violated::INT) AS violated, sum(close::INT) AS close,
                  min(day) AS first_day, max(day) AS last_day,
                  max(CASE WHEN violated THEN day END) AS last_violation
           FROM slo_events GROUP BY cluster""")
    state = store.query(
        """SELECT cluster, disabled_from, disabled_until, reason FROM shaping_state WHERE disabled_until >= ?
           QUALIFY row_number() OVER (PARTITION BY cluster ORDER BY disabled_from) = 1""", [as_of])
    planned = store.query("SELECT DISTINCT cluster FROM current_plans")["cluster"]
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
