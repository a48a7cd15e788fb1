"""Rank-growth plan: the most salient half grows, within the rank cap and the tuning budget, the same every time."""

import random

import torch

from pipeline.apt.adapters import APTLinear, adapter_params, grow_rank, plan_rank_growth


def adapters(count=6, rank=2, sizes=((16, 16), (16, 48), (48, 16))):
    """Adapters of a few shapes, named a0, a1, ..."""
    made = []
    for i in range(count):
        in_features, out_features = sizes[i % len(sizes)]
        made.append((f"a{i}", APTLinear(torch.nn.Linear(in_features, out_features), rank=rank)))
    return made


def salience_of(items, seed=0):
    values = torch.rand(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return {name: value for (name, _), value in zip(items, values, strict=True)}


def plan(items, salience, budget, initial_rank=2, max_multiplier=4):
    return plan_rank_growth(items, salience, initial_rank=initial_rank, max_multiplier=max_multiplier,
                            budget_params=budget)


def added_params(items, growth):
    return sum(growth.get(name, 0) * (adapter.in_features + adapter.out_features) for name, adapter in items)


def test_the_most_salient_half_grows_equally_up_to_the_cap_when_the_budget_is_ample():
    items = adapters()
    salience = salience_of(items)
    growth = plan(items, salience, budget=10**9)
    top_half = sorted(salience, key=salience.get, reverse=True)[:3]
    assert growth == dict.fromkeys(top_half, 4 * 2 - 2)


def test_a_tight_budget_is_respected_and_goes_to_the_most_salient_first():
    items = adapters(sizes=((16, 16),))  # equal cost: 32 parameters per rank
    salience = {f"a{i}": float(i) for i in range(6)}
    budget = adapter_params(items) + 4 * 32
    growth = plan(items, salience, budget)
    assert adapter_params(items) + added_params(items, growth) <= budget
    assert growth == {"a5": 2, "a4": 1, "a3": 1}  # round-robin, most salient first


def test_budget_and_cap_hold_for_any_salience_and_budget():
    items = adapters(count=9)
    for seed in range(20):
        salience = salience_of(items, seed)
        budget = adapter_params(items) + seed * 50
        growth = plan(items, salience, budget)
        assert adapter_params(items) + added_params(items, growth) <= budget
        assert all(dict(items)[name].rank + k <= 8 for name, k in growth.items())
        least_salient = sorted(salience, key=salience.get)[: len(items) - len(items) // 2]
        assert not set(growth) & set(least_salient)


def test_a_budget_already_spent_grows_nothing_and_capped_adapters_stay():
    items = adapters()
    assert plan(items, salience_of(items), budget=adapter_params(items)) == {}
    for _, adapter in items:
        grow_rank(adapter, 6)  # at the cap: 4 × 2
    assert plan(items, salience_of(items), budget=10**9) == {}


def test_the_plan_does_not_depend_on_the_order_of_adapters_and_ties_break_by_name():
    items = adapters()
    salience = dict.fromkeys((name for name, _ in items), 1.0)
    expected = plan(items, salience, adapter_params(items) + 200)
    for seed in range(5):
        shuffled = items[:]
        random.Random(seed).shuffle(shuffled)
        assert plan(shuffled, salience, adapter_params(items) + 200) == expected
    assert set(expected) == {"a0", "a1", "a2"}


def test_the_carry_places_the_old_parameters_at_the_front_of_the_grown_ones():
    ((_, adapter),) = adapters(count=1)
    carry = grow_rank(adapter, 3).carry()
    assert len(carry) == 2
    for old, (new, index) in carry.items():
        assert new is adapter.lora_A or new is adapter.lora_B
        assert torch.equal(new.detach()[index], old.detach())
