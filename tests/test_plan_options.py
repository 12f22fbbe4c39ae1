"""One settings object for the planner's defaults and bounds (cicm.planning.options.PlanOptions): the CLI, the
flow and the backtests use it, and bad knobs are refused naming the field."""
import inspect

import pytest

from cicm.backtest.runner import BacktestOptions
from cicm.errors import InputError
from cicm.planning.options import PlanOptions


@pytest.mark.parametrize("field, value", [
    ("program", "fastest"), ("horizon_hours", 12), ("horizon_hours", 96), ("planning_margin_hours", 24),
    ("arrival_quantile", 0.3), ("gamma", 0.0), ("gamma", 0.6),
])
def test_bad_knobs_name_their_field(field, value):
    with pytest.raises(InputError) as err:
        PlanOptions(**{field: value}).validate()
    assert err.value.field == field
    with pytest.raises(InputError) as err:  # the backtests check the same knobs the same way
        BacktestOptions(**{field: value}).validate()
    assert err.value.field == field


def test_defaults_have_one_source():
    PlanOptions().validate()
    plan, backtest = PlanOptions(), BacktestOptions()
    for name in PlanOptions.__dataclass_fields__:
        assert getattr(backtest, name) == getattr(plan, name), name
    from cicm.cli import plan as plan_command

    defaults = {name: p.default.default for name, p in inspect.signature(plan_command).parameters.items()
                if hasattr(p.default, "default") and name in PlanOptions.__dataclass_fields__}
    assert defaults and all(defaults[name] == getattr(plan, name) for name in defaults), defaults
