"""Rank growth: the plan (the most salient half grows, within the rank cap and the tuning budget, the same every
time), and the later stages loading the grown adapters."""

import random

import pytest
import torch
from builders import logits, train_like
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from pipeline.apt.adapters import (
    APTLinear,
    adapter_params,
    grow_rank,
    inject_adapters,
    named_adapters,
    plan_rank_growth,
    set_masks,
)
from pipeline.apt.blocks import ModelShape
from pipeline.export import export_pruned
from pipeline.model_io import load_adapters


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


# ---- the later stages read the grown ranks ------------------------------------------------------------------------

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8.0


def injected(model):
    return inject_adapters(model, targets=TARGETS, rank=RANK, alpha=ALPHA, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def grown_run(tmp_path, tiny_model):
    """A saved base and the adapters file of a model whose adapters grew unevenly in training, as finetune writes it."""
    tiny_model().save_pretrained(str(tmp_path / "base"))
    trained = injected(tiny_model())
    generator = torch.Generator().manual_seed(3)
    for index, (_, adapter) in enumerate(named_adapters(trained)):
        if index % 3:  # some adapters grow (by different amounts), some stay at the initial rank
            grow_rank(adapter, 3 * index, generator)
    train_like(trained, seed=4)
    save_file({n: p.detach() for n, p in trained.named_parameters() if p.requires_grad},
              str(tmp_path / "adapters.safetensors"))
    return tmp_path, trained


def test_load_adapters_grows_to_the_file_ranks_and_keeps_the_initial_scaling(grown_run, tiny_model, random_masks,
                                                                            input_ids):
    tmp_path, trained = grown_run
    masks = random_masks(ModelShape.from_config(trained.config), torch.Generator().manual_seed(5))
    set_masks(trained, masks)
    expected = logits(trained, input_ids)

    loaded = injected(AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32).eval())
    load_adapters(loaded, tmp_path / "adapters.safetensors", max_rank=8 * RANK)
    ranks = {name: adapter.rank for name, adapter in named_adapters(trained)}
    assert max(ranks.values()) > RANK and min(ranks.values()) == RANK
    assert {name: adapter.rank for name, adapter in named_adapters(loaded)} == ranks
    assert all(adapter.scaling == ALPHA / RANK for _, adapter in named_adapters(loaded))
    set_masks(loaded, masks)
    torch.testing.assert_close(logits(loaded, input_ids), expected, rtol=0, atol=1e-6)

    # The merge folds B·A of the grown ranks with alpha / apt.rank: the export computes what the trained model did.
    export_pruned(base_dir=tmp_path / "base", adapters_path=tmp_path / "adapters.safetensors", masks=masks,
                  scaling=ALPHA / RANK, dtype=torch.float32, out_dir=tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), dtype=torch.float32).eval()
    torch.testing.assert_close(logits(exported, input_ids), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("change, match", [
    ("rank up", "below the injected rank"),
    ("rank down", "above the most rank growth gives"),
    ("adapter missing", "in the model only"),
    ("target added", "in the model only"),
])
def test_load_adapters_refuses_a_real_mismatch(grown_run, tiny_model, change, match):
    tmp_path, _ = grown_run
    path = tmp_path / "adapters.safetensors"
    rank, targets = {"rank up": 2 * RANK, "rank down": 1}.get(change, RANK), TARGETS
    if change == "adapter missing":
        tensors = load_file(str(path))
        del tensors["model.layers.1.self_attn.q_proj.lora_B"]
        save_file(tensors, str(path))
    if change == "target added":
        targets = [*TARGETS, "o_proj"]
    model = inject_adapters(tiny_model(), targets=targets, rank=rank, alpha=ALPHA)
    with pytest.raises(ValueError, match=match):
        load_adapters(model, path, max_rank=8 * rank)
