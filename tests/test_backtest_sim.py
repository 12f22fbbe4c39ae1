"""The backtest's simulator, bound and experiment estimator on small synthetic inputs (fast, no real traces)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cicm.backtest.metrics import experiment_effect, lower_convex_hull, perfect_foresight_bound
from cicm.optimize.queue import ramps
from cicm.backtest.sim import ClusterSim, job_outcomes, make_tasks, simulate
from cicm.errors import InputError

T0 = pd.Timestamp("2022-06-01", tz="UTC")


def random_jobs(n: int, hours: float, seed: int, max_len: float = 20.0, max_cores: float = 40.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "arrival": T0 + pd.to_timedelta(rng.uniform(0, hours, n), unit="h"),
        "length_hours": rng.uniform(0.05, max_len, n),
        "cpu_cores": rng.uniform(1, max_cores, n),
    })


class LinearPower:
    """A stand-in for ClusterPower: P(u) = idle + slope * u."""

    def __init__(self, capacity: float, idle: float = 10.0, slope: float = 0.01):
        self.knots_cpu = np.linspace(0, capacity, 11)
        self.idle, self.slope = idle, slope

    def __call__(self, u):
        return self.idle + self.slope * np.asarray(u, dtype=float)


def test_work_is_conserved_and_every_job_finishes_after_its_length():
    jobs = random_jobs(300, 72, seed=1)
    tasks = make_tasks(jobs, T0, T0 + pd.Timedelta(hours=72), max_task_cores=25.0)
    n_h = 72 + 96
    rng = np.random.default_rng(2)
    cap = np.where(rng.random(n_h) < 0.4, 0.0, rng.uniform(50, 400, n_h))
    cap[72:] = np.inf
    res = simulate(tasks, inflexible_cpu_cores=np.full(n_h, 100.0), capacity_cores=3000.0, cap_cpu_cores=cap)
    work = float((jobs["length_hours"] * jobs["cpu_cores"]).sum())
    assert res.remaining_core_hours == pytest.approx(0.0, abs=1e-6)
    assert res.flexible_cpu_cores.sum() == pytest.approx(work, rel=1e-9)
    out = job_outcomes(tasks, res)
    assert out["finished"].all()
    assert (out["finish_h"] >= out["arrival_h"] + out["length_hours"] - 1e-9).all()
    assert (out["delay_hours"] >= 0).all()


def test_no_task_is_admitted_over_the_cap_or_the_machines():
    jobs = random_jobs(400, 48, seed=3)
    tasks = make_tasks(jobs, T0, T0 + pd.Timedelta(hours=48), max_task_cores=30.0)
    n_h = 48 + 72
    rng = np.random.default_rng(4)
    cap = rng.uniform(0, 500, n_h)
    infl = rng.uniform(100, 400, n_h)
    res = simulate(tasks, infl, 600.0, cap)
    limit = np.minimum(cap, 600.0 - infl)
    assert np.all(res.flexible_cpu_cores <= limit + 1e-6)
    assert np.allclose(res.limit_cpu_cores, limit)
    # and the test can fail: a simulator that ignored the cap would exceed it somewhere
    free = simulate(tasks, infl, 600.0, np.full(n_h, np.inf))
    assert np.any(free.flexible_cpu_cores > limit + 1e-6)


def test_no_cap_and_enough_capacity_means_no_queueing():
    jobs = random_jobs(200, 48, seed=5)
    tasks = make_tasks(jobs, T0, T0 + pd.Timedelta(hours=48), max_task_cores=1e9)
    n_h = 48 + 30
    res = simulate(tasks, np.zeros(n_h), capacity_cores=1e7, cap_cpu_cores=np.full(n_h, np.inf))
    out = job_outcomes(tasks, res)
    assert out["delay_hours"].max() == pytest.approx(0.0, abs=1e-9)
    assert not out["late"].any()
    # with too little capacity the same jobs do queue (the assertion above is not vacuous)
    tight = job_outcomes(tasks, simulate(tasks, np.zeros(n_h), 30.0, np.full(n_h, np.inf)))
    assert tight["delay_hours"].max() > 1.0


def test_a_blocked_day_makes_jobs_late_and_the_deadline_guard_rescues_them():
    jobs = pd.DataFrame({"arrival": [T0 + pd.Timedelta(hours=1.5)], "length_hours": [3.0], "cpu_cores": [10.0]})
    tasks = make_tasks(jobs, T0, T0 + pd.Timedelta(hours=24), max_task_cores=100.0)
    cap = np.zeros(60)
    cap[30:] = np.inf
    late = job_outcomes(tasks, simulate(tasks, np.zeros(60), 100.0, cap))
    assert late["late"].all() and late["finish_h"].iloc[0] == pytest.approx(33.0)
    guarded = simulate(tasks, np.zeros(60), 100.0, cap, deadline_guard=True)
    out = job_outcomes(tasks, guarded)
    assert not out["late"].any()
    # it starts at the last whole slot that still meets the deadline (hour resolution): 22:00..25:00 < 25:30
    assert out["finish_h"].iloc[0] == pytest.approx(25.0)
    assert guarded.guard_core_hours == pytest.approx(30.0)


def test_wide_jobs_split_into_tasks_and_finish_with_their_last_task():
    jobs = pd.DataFrame({"arrival": [T0], "length_hours": [2.0], "cpu_cores": [250.0]})
    tasks = make_tasks(jobs, T0, T0 + pd.Timedelta(hours=1), max_task_cores=100.0)
    assert tasks.n_tasks == 3 and np.allclose(tasks.cores, 250.0 / 3)
    # room for two tasks at a time. Least laxity first: after the first hour the task that has not started has
    # the least slack, so it runs next to the one that has; the job finishes at 3 h, one hour late on its length
    res = simulate(tasks, np.zeros(10), 200.0, np.full(10, np.inf))
    out = job_outcomes(tasks, res)
    assert out["finish_h"].iloc[0] == pytest.approx(3.0)
    assert out["delay_hours"].iloc[0] == pytest.approx(1.0)
    assert res.flexible_cpu_cores[:3] == pytest.approx([500 / 3] * 3)


def test_stepping_equals_the_open_loop_run_and_the_past_cannot_change():
    jobs = random_jobs(150, 48, seed=6)
    tasks = make_tasks(jobs, T0, T0 + pd.Timedelta(hours=48), max_task_cores=20.0)
    cap = np.random.default_rng(7).uniform(0, 300, 100)
    whole = simulate(tasks, np.full(100, 50.0), 500.0, cap)
    sim = ClusterSim(tasks, np.full(100, 50.0), 500.0)
    for start in range(0, 100, 24):
        sim.set_cap(start, cap[start:start + 24])
        sim.advance(start + 24)
    assert np.allclose(sim.result().flexible_cpu_cores, whole.flexible_cpu_cores)
    with pytest.raises(InputError):
        sim.set_cap(10, cap[:5])


def test_jobs_longer_than_the_deadline_are_rejected():
    jobs = pd.DataFrame({"arrival": [T0], "length_hours": [30.0], "cpu_cores": [1.0]})
    with pytest.raises(InputError, match="length_hours"):
        make_tasks(jobs, T0, T0 + pd.Timedelta(hours=1), 10.0)


# ------------------------------------------------------------------------------------------------ the bound


def test_ramps_and_hull():
    rng = np.random.default_rng(8)
    b, c, t = rng.uniform(0, 50, 100), rng.uniform(0, 2, 100), np.arange(1, 60.0)
    brute = (c[None, :] * np.clip(t[:, None] - b[None, :], 0, None)).sum(axis=1)
    assert np.allclose(ramps(t, b, c), brute)
    x = np.linspace(0, 10, 11)
    y = np.array([0, 5, 6, 7, 8, 9, 12, 16, 21, 27, 34.0])  # concave start, convex end
    slopes, icepts = lower_convex_hull(x, y)
    hull = np.max(slopes[None, :] * x[:, None] + icepts[None, :], axis=1)
    assert np.all(hull <= y + 1e-9) and np.all(np.diff(slopes) > 0)


def test_no_schedule_beats_the_perfect_foresight_bound():
    n_h = 48 + 48
    jobs = random_jobs(200, 48, seed=9, max_len=12)
    tasks = make_tasks(jobs, T0, T0 + pd.Timedelta(hours=48), max_task_cores=15.0)
    rng = np.random.default_rng(10)
    carbon = 200 + 150 * np.sin(np.arange(n_h) / 24 * 2 * np.pi) + rng.normal(0, 10, n_h)
    infl = rng.uniform(50, 150, n_h)
    power = LinearPower(600.0)
    bound = perfect_foresight_bound(tasks, infl, 600.0, power, carbon)
    for trial in range(5):
        cap = np.where(rng.random(n_h) < 0.3, 0.0, np.inf)
        cap[48:] = np.inf
        res = simulate(tasks, infl, 600.0, cap)
        out = job_outcomes(tasks, res)
        flex_kg = float(((power(infl + res.flexible_cpu_cores) - power(infl)) * carbon).sum() / 1000)
        relaxed = perfect_foresight_bound(tasks, infl, 600.0, power, carbon, out["finish_h"].to_numpy())
        assert flex_kg >= relaxed - 1e-6
        assert relaxed <= bound + 1e-6  # relaxing deadlines can only lower the bound
    # with flat carbon and linear power every schedule costs the same: the bound is exact
    flat = np.full(n_h, 300.0)
    work = float((jobs["length_hours"] * jobs["cpu_cores"]).sum())
    assert perfect_foresight_bound(tasks, infl, 600.0, power, flat) == pytest.approx(0.01 * work * 0.3, rel=1e-6)


# ------------------------------------------------------------------------------------------------ experiment


def test_experiment_estimator_recovers_a_known_effect():
    rng = np.random.default_rng(11)
    n = 240
    cluster = np.repeat(["a", "b", "c"], n // 3)
    base = np.where(cluster == "a", 100.0, np.where(cluster == "b", 200.0, 300.0))
    infl = base * np.exp(rng.normal(0, 0.05, n))
    treated = rng.random(n) < 0.5
    power = infl * 1.3 * np.exp(rng.normal(0, 0.01, n)) * np.where(treated, 0.97, 1.0)
    frame = pd.DataFrame({"cluster": cluster, "treated": treated, "top_power_kw": power,
                          "top_inflexible_power_kw": infl, "counterfactual_top_power_kw": power / np.where(
                              treated, 0.97, 1.0)})
    e = experiment_effect(frame, n_boot=300)
    assert e["ci_low_pct"] < -3.0 < e["ci_high_pct"]
    assert e["effect_pct"] == pytest.approx(-3.0, abs=0.6)
    assert e["true_effect_pct"] == pytest.approx(-3.0, abs=1e-9)
    # no effect: the CI covers 0
    frame["top_power_kw"] = frame["counterfactual_top_power_kw"]
    e0 = experiment_effect(frame, n_boot=300)
    assert e0["ci_low_pct"] < 0 < e0["ci_high_pct"]


# ------------------------------------------------------------------------------------------------ SLO loop


def test_slo_feedback_uses_the_project_rule_on_complete_days_only():
    from datetime import date, timedelta
    from types import SimpleNamespace

    from cicm.backtest.closed_loop import day_number, slo_feedback

    days = [date(2022, 6, 1) + timedelta(days=i) for i in range(10)]
    n_h = 24 * len(days)
    seg = SimpleNamespace(days=days, day_of_hour=np.repeat(np.arange(len(days)), 24),
                          inflexible={"c": np.full(n_h, 10.0)}, ratio={"c": np.full(n_h, 1.0)})
    task_days = np.array([day_number(d) for d in days])  # one task per day (day numbers, as task_local_days)
    deadline = np.arange(len(days)) * 24.0 + 30.0

    def sim(late_days):
        finish = deadline - 1.0
        for x in late_days:
            finish[days.index(x)] = deadline[days.index(x)] + 2.0
        return SimpleNamespace(finish=finish, deadline=deadline, usage=np.zeros(n_h))

    plan_day = days[9]  # complete evidence up to days[6]
    assert slo_feedback(seg, sim([days[2]]), "c", task_days, plan_day, days[0], {}) is None
    two = slo_feedback(seg, sim([days[2], days[5]]), "c", task_days, plan_day, days[0], {})
    assert two is not None and two.startswith("slo-feedback") and "2022-06-03" in two
    # days newer than plan_day - 3 are not complete evidence yet; days before an earlier switch-off are forgiven
    assert slo_feedback(seg, sim([days[7], days[8]]), "c", task_days, plan_day, days[0], {}) is None
    assert slo_feedback(seg, sim([days[2], days[5]]), "c", task_days, plan_day, days[4], {}) is None
    # two days in a row close to Theta (reservations >= 95% of it) also switch shaping off
    thetas = {("c", days[4]): 240.0, ("c", days[5]): 245.0}
    close = slo_feedback(seg, sim([]), "c", task_days, plan_day, days[0], thetas)
    assert close is not None and "in a row" in close
