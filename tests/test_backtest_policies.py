"""The backtest policies: one small class each, found by name in a registry."""
from __future__ import annotations

import pytest

from cicm.backtest.policies import BASELINE, POLICIES, BacktestPolicy, policy_class, selected_policies
from cicm.backtest.runner import BacktestOptions, progress_steps
from cicm.errors import InputError

ORDER = ("carbon-agnostic", "threshold", "threshold-guard", "cicm-ceiling", "planner", "oracle")


def test_the_registry_lists_the_six_policies_in_order():
    assert tuple(POLICIES) == ORDER
    assert BASELINE == "carbon-agnostic"
    assert BacktestOptions().policies == ORDER


@pytest.mark.parametrize("name", ORDER)
def test_each_policy_class_satisfies_the_protocol(name):
    cls = POLICIES[name]
    assert cls.name == name
    policy = cls()
    assert isinstance(policy, BacktestPolicy)
    assert policy_class(name) is cls
    assert policy.progress_ticks(5) in (1, 5)


def test_an_unknown_policy_raises_naming_the_field():
    with pytest.raises(InputError) as exc:
        policy_class("greedy")
    assert exc.value.field == "policies"
    assert "unknown policy 'greedy'; choose one of carbon-agnostic, threshold," in str(exc.value)
    with pytest.raises(InputError, match="unknown policy 'greedy'") as exc:
        BacktestOptions(policies=("carbon-agnostic", "greedy"), experiment=False).validate()
    assert exc.value.field == "policies"


def test_policies_run_in_registry_order_whatever_the_order_asked():
    chosen = selected_policies(("oracle", "carbon-agnostic", "threshold-guard"))
    assert [p.name for p in chosen] == ["carbon-agnostic", "threshold-guard", "oracle"]


def test_progress_steps_count_each_policys_ticks():
    options = BacktestOptions()
    # carbon-agnostic, threshold, threshold-guard, oracle: one each; cicm-ceiling and planner: one a day; experiment
    assert progress_steps(7, options) == 4 + 2 * 7 + 1
    only = BacktestOptions(policies=("carbon-agnostic", "threshold"), experiment=False)
    assert progress_steps(7, only) == 2
