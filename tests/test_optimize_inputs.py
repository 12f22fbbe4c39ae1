"""Bad input to the optimiser raises InputError naming the field; good input is normalised and frozen."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from cicm.errors import InputError
from cicm.optimize import CampusInput, ClusterInput, PowerCurve


def cluster(**kw) -> ClusterInput:
    h = kw.pop("n_hours", 24)
    base = dict(name="c", inflexible_cpu_cores=np.full(h, 100.0), inflexible_upper_cpu_cores=np.full(h, 110.0),
                flexible_core_hours=1000.0, reservations_core_hours=5000.0, reservation_ratio=np.full(h, 1.5),
                reservations_rel_error_q97=0.1, capacity_cores=1000.0, power_capped_capacity_cores=np.inf,
                slope_kw_per_core=0.01, nominal_power_kw=np.full(h, 20.0))
    base.update(kw)
    return ClusterInput(**base)


def campus(**kw) -> CampusInput:
    base = dict(clusters=[cluster()], carbon_gco2_per_kwh=np.full(24, 300.0))
    base.update(kw)
    return CampusInput(**base)


def test_good_input_is_normalised_and_read_only():
    c = cluster(inflexible_cpu_cores=[100] * 24, capacity_cores=1000)
    assert c.inflexible_cpu_cores.dtype == np.float64 and not c.inflexible_cpu_cores.flags.writeable
    assert c.hours == 24
    k = campus(solver="clarabel", clusters=(c,))
    assert k.solver == "CLARABEL" and isinstance(k.clusters, tuple) and k.n_hours == 24


@pytest.mark.parametrize("field, value", [
    ("inflexible_cpu_cores", np.r_[np.full(23, 100.0), np.nan]),
    ("inflexible_upper_cpu_cores", np.full(23, 110.0)),  # wrong length
    ("inflexible_cpu_cores", np.full(30, 100.0)),  # not a day
    ("inflexible_cpu_cores", np.full(24, -1.0)),
    ("capacity_cores", -5.0),
    ("capacity_cores", 0.0),
    ("capacity_cores", np.full(25, 1000.0)),
    ("capacity_cores", float("inf")),
    ("power_capped_capacity_cores", -1.0),
    ("power_capped_capacity_cores", float("nan")),
    ("reservation_ratio", np.zeros(24)),
    ("reservation_ratio", np.full((2, 12), 1.5)),
    ("flexible_core_hours", float("nan")),
    ("flexible_core_hours", -1.0),
    ("reservations_core_hours", "lots"),
    ("reservations_rel_error_q97", -1.0),
    ("reservations_rel_error_q97", None),
    ("slope_kw_per_core", -0.1),
    ("nominal_power_kw", np.r_[np.full(23, 20.0), np.inf]),
    ("nominal_power_kw", None),  # neither nominal power nor a curve
    ("name", ""),
    ("fallback_reason", ""),
])
def test_bad_cluster_input_names_the_field(field, value):
    with pytest.raises(InputError) as exc:
        cluster(**{field: value})
    assert exc.value.field == field, exc.value


def test_slope_required_without_curve_and_curve_checked():
    with pytest.raises(InputError) as exc:
        cluster(slope_kw_per_core=None)
    assert exc.value.field == "slope_kw_per_core"
    curve = PowerCurve([0, 10, 20], [1, 2, 3])
    with pytest.raises(InputError) as exc:
        cluster(power_curve=curve)  # both nominal and curve
    assert exc.value.field == "nominal_power_kw"
    cluster(nominal_power_kw=None, power_curve=curve, slope_kw_per_core=None)  # fine
    with pytest.raises(InputError) as exc:
        PowerCurve([0, 10, 10], [1, 2, 3])
    assert exc.value.field == "cpu_cores"
    with pytest.raises(InputError) as exc:
        PowerCurve([0, 10, 20], [1, 2])
    assert exc.value.field == "power_kw"
    with pytest.raises(InputError) as exc:
        cluster(nominal_power_kw=None, power_curve="linear", slope_kw_per_core=None)
    assert exc.value.field == "power_curve"


@pytest.mark.parametrize("field, value", [
    ("carbon_gco2_per_kwh", np.r_[np.full(23, 300.0), np.nan]),
    ("carbon_gco2_per_kwh", np.full(22, 300.0)),
    ("carbon_gco2_per_kwh", np.full(24, -1.0)),
    ("contract_limit_kw", 0.0),
    ("contract_limit_kw", float("nan")),
    ("lambda_e", -1.0),
    ("lambda_p", float("nan")),
    ("delta_min", 0.5),
    ("delta_min", -1.5),
    ("delta_max", -0.1),
    ("ramp_limit", 0.0),
    ("solver", "GLPK"),
    ("hours", pd.date_range("2024-01-01", periods=23, freq="h", tz="UTC")),
    ("hours", list(range(24))),
    ("clusters", []),
    ("clusters", "c"),
])
def test_bad_campus_input_names_the_field(field, value):
    with pytest.raises(InputError) as exc:
        campus(**{field: value})
    assert exc.value.field == field, exc.value


def test_campus_checks_its_clusters():
    with pytest.raises(InputError) as exc:
        campus(clusters=[cluster(), cluster(name="d", n_hours=25)])
    assert exc.value.field == "clusters[1].inflexible_cpu_cores"
    with pytest.raises(InputError) as exc:
        campus(clusters=[cluster(), cluster()])
    assert exc.value.field == "clusters[1].name"
    with pytest.raises(InputError) as exc:
        campus(clusters=[cluster(), {"name": "x"}])
    assert exc.value.field == "clusters[1]"


def test_replace_revalidates():
    c = cluster()
    with pytest.raises(InputError) as exc:
        dataclasses.replace(c, capacity_cores=-1.0)
    assert exc.value.field == "capacity_cores"


def test_plan_campus_rejects_non_campus():
    from cicm.optimize import plan_campus

    with pytest.raises(InputError) as exc:
        plan_campus({"clusters": []})
    assert exc.value.field == "campus"
