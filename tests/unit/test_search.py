"""Budget search: exact fit, GQA-consistent units, loadable uniform shapes, checked against a loop reference."""

import math
import time
from types import SimpleNamespace

import pytest
import torch
from builders import GQA, LLAMA2_7B, make_shape
from transformers import LlamaConfig

from pipeline.apt.blocks import (
    KeptSizes,
    ModelShape,
    kept_sizes,
    params_per_group,
    params_per_hidden_channel,
    params_per_neuron,
    params_per_query_head,
    remaining_params,
    total_params,
)
from pipeline.apt.search import search_masks

SHAPES = {
    "gqa": GQA,
    "mha-tied": make_shape(num_layers=3, num_kv_heads=4, intermediate_size=40, tie_word_embeddings=True),
    # 12 heads in 4 groups of 3 at hidden 48: kept heads often do not divide the kept hidden size.
    "gqa3-bias": make_shape(hidden_size=48, num_layers=3, num_heads=12, num_kv_heads=4, head_dim=4,
                            intermediate_size=40, qkv_bias=True, o_proj_bias=True),
}
MIN_HIDDEN = 4
FRACTIONS = (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0)


def random_scores(shape: ModelShape, seed: int, hidden_scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "head": torch.rand(shape.num_layers, shape.num_heads, generator=generator),
        "neuron": torch.rand(shape.num_layers, shape.intermediate_size, generator=generator),
        "hidden": torch.rand(shape.hidden_size, generator=generator) * hidden_scale,
    }


def top(values: list[float], count: int) -> set[int]:
    return set(sorted(range(len(values)), key=lambda index: -values[index])[:count])


def round_down(count: int, multiple: int) -> int:
    return count // multiple * multiple


def reference_search(shape, scores, fraction, mode, layout, round_to, min_hidden):
    """The search spelled out with Python loops: kept sizes and exact count of every prefix, largest that fits.

    Returns (kept attention units per layer, kept neurons per layer, kept hidden, remaining per prefix, chosen
    prefix, budget); kept prefix is None when the minimums alone do not fit.
    """
    layers, num_kv, group = shape.num_layers, shape.num_kv_heads, shape.group_size
    head = scores["head"].double().tolist()
    neuron = scores["neuron"].double().tolist()
    hidden = scores["hidden"].double().tolist()
    if mode == "kv_group":
        # Attention salience rows: per KV group, the sum of its query heads.
        attention = [[sum(row[j * group : (j + 1) * group]) for j in range(num_kv)] for row in head]
        unit_params, heads_per_unit = params_per_group(shape), group
    else:
        # Row entry r: the r-th best query head of every group, summed over the groups.
        by_group = [[sorted(row[j * group : (j + 1) * group], reverse=True) for j in range(num_kv)] for row in head]
        attention = [[sum(ranked[r] for ranked in groups) for r in range(group)] for groups in by_group]
        unit_params, heads_per_unit = num_kv * params_per_query_head(shape), num_kv
    uniform = layout == "uniform"
    step = math.lcm(round_to, heads_per_unit) if uniform else round_to
    hidden_min = math.ceil(min_hidden / step) * step

    units = []  # (mandatory, density, kind, layer or None, salience)
    for kind, rows, params, mandatory in (
        ("attention", attention, unit_params, 1),
        ("neuron", neuron, params_per_neuron(shape), round_to),
    ):
        if uniform:
            ranked = [sorted(row, reverse=True) for row in rows]
            for r in range(len(rows[0])):
                salience = sum(row[r] for row in ranked)
                units.append((r < mandatory, salience / (params * layers), kind, None, salience))
        else:
            for layer, row in enumerate(rows):
                best = top(row, mandatory)
                units += [(i in best, row[i] / params, kind, layer, row[i]) for i in range(len(row))]
    best_hidden = top(hidden, hidden_min)
    per_channel = params_per_hidden_channel(shape)
    units += [(c in best_hidden, hidden[c] / per_channel, "hidden", None, hidden[c]) for c in range(len(hidden))]
    units.sort(key=lambda unit: (not unit[0], -unit[1]))
    num_mandatory = sum(unit[0] for unit in units)

    attention_salience = [0.0]  # uniform only: salience of the first a attention units
    for unit in units:
        if unit[2] == "attention":
            attention_salience.append(attention_salience[-1] + unit[4])
    hidden_salience = [0.0]
    for value in sorted(hidden, reverse=True):
        hidden_salience.append(hidden_salience[-1] + value)

    def kept_at(prefix):
        attention_count = [0] * layers
        neuron_count = [0] * layers
        hidden_count = 0
        for _, _, kind, layer, _ in units[:prefix]:
            if kind == "hidden":
                hidden_count += 1
            for target, counts in (("attention", attention_count), ("neuron", neuron_count)):
                if kind == target:
                    for index in range(layers) if layer is None else [layer]:
                        counts[index] += 1
        neurons = [round_down(count, round_to) for count in neuron_count]
        if not uniform:
            return attention_count, neurons, round_down(hidden_count, round_to)
        candidates = []
        for kept_units in range(1, attention_count[0] + 1):
            kept_hidden = round_down(hidden_count, math.lcm(round_to, heads_per_unit * kept_units))
            if kept_hidden >= hidden_min:
                value = attention_salience[kept_units] + hidden_salience[kept_hidden]
                candidates.append((value, kept_units, kept_hidden))
        _, kept_units, kept_hidden = max(candidates)  # ties: more heads
        return [kept_units] * layers, neurons, kept_hidden

    def remaining(prefix):
        attention_count, neurons, kept_hidden = kept_at(prefix)
        kept = KeptSizes(
            hidden=kept_hidden,
            heads=tuple(heads_per_unit * count for count in attention_count),
            kv_heads=tuple(count if mode == "kv_group" else num_kv for count in attention_count),
            neurons=tuple(neurons),
        )
        return remaining_params(shape, kept)

    budget = fraction * total_params(shape)
    by_prefix = {prefix: remaining(prefix) for prefix in range(num_mandatory, len(units) + 1)}
    chosen = max((prefix for prefix, count in by_prefix.items() if count <= budget), default=None)
    attention_count, neurons, kept_hidden = (None, None, None) if chosen is None else kept_at(chosen)
    return attention_count, neurons, kept_hidden, by_prefix, chosen, budget


def expected_masks(shape, scores, mode, attention_count, neurons, kept_hidden):
    """The densest units of each pool at the reference's kept counts, as index sets."""
    group = shape.group_size
    head = scores["head"].tolist()
    kept_heads = []
    for layer, row in enumerate(head):
        if mode == "kv_group":
            groups = top(
                [sum(row[j * group : (j + 1) * group]) for j in range(shape.num_kv_heads)], attention_count[layer]
            )
            kept_heads.append({j * group + i for j in groups for i in range(group)})
        else:
            kept_heads.append(
                {
                    j * group + i
                    for j in range(shape.num_kv_heads)
                    for i in top(row[j * group : (j + 1) * group], attention_count[layer])
                }
            )
    kept_neurons = [top(row, count) for row, count in zip(scores["neuron"].tolist(), neurons, strict=True)]
    return kept_heads, kept_neurons, top(scores["hidden"].tolist(), kept_hidden)


def indices(mask: torch.Tensor) -> set[int]:
    return set(mask.nonzero().flatten().tolist())


@pytest.mark.parametrize("round_to", [1, 8])
@pytest.mark.parametrize("layout", ["uniform", "per_layer"])
@pytest.mark.parametrize("mode", ["kv_group", "query_in_group"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_search_keeps_the_largest_fitting_prefix(shape_name, mode, layout, round_to):
    shape = SHAPES[shape_name]
    options = dict(attention_mode=mode, layout=layout, round_to=round_to, min_hidden=MIN_HIDDEN)
    for seed, fraction in enumerate(FRACTIONS):
        # Channels own many parameters: scaling their salience moves them through the density order.
        scores = random_scores(shape, seed, hidden_scale=(1.0, 50.0)[seed % 2])
        attention_count, neurons, kept_hidden, by_prefix, chosen, budget = reference_search(
            shape, scores, fraction, mode, layout, round_to, MIN_HIDDEN
        )
        if chosen is None:
            with pytest.raises(ValueError, match="minimum kept sizes"):
                search_masks(shape, scores, fraction, **options)
            continue
        masks = search_masks(shape, scores, fraction, **options)
        kept = kept_sizes(masks)

        # Exact fit: within the budget, and one more unit would not be.
        assert remaining_params(shape, kept) <= budget
        assert by_prefix.get(chosen + 1, math.inf) > budget
        assert remaining_params(shape, kept) == by_prefix[chosen]

        # The same units as the loop reference.
        kept_heads, kept_neurons, hidden = expected_masks(shape, scores, mode, attention_count, neurons, kept_hidden)
        assert [indices(row) for row in masks.head_mask] == kept_heads
        assert [indices(row) for row in masks.neuron_mask] == kept_neurons
        assert indices(masks.hidden_mask) == hidden
        check_structure(shape, masks, kept, mode, layout, round_to)


def check_structure(shape, masks, kept, mode, layout, round_to):
    masks.check_gqa(shape, mode)  # whole groups / even trims, no orphan query head, no empty layer
    assert all(bool(((mask == 0) | (mask == 1)).all()) for mask in masks.to_dict().values())
    assert all(count >= round_to and count % round_to == 0 for count in kept.neurons)
    assert kept.hidden >= MIN_HIDDEN and kept.hidden % round_to == 0
    if mode == "query_in_group":
        assert bool((masks.kv_mask == 1).all())
    if layout == "uniform":
        assert len(set(kept.heads)) == len(set(kept.kv_heads)) == len(set(kept.neurons)) == 1
        assert kept.heads[0] % kept.kv_heads[0] == 0
        LlamaConfig(  # raises unless transformers accepts the exported shape
            hidden_size=kept.hidden,
            num_attention_heads=kept.heads[0],
            num_key_value_heads=kept.kv_heads[0],
            head_dim=shape.head_dim,
            intermediate_size=kept.neurons[0],
        )


def one_layer_mha(hidden_size: int, num_heads: int) -> ModelShape:
    return make_shape(
        vocab_size=2,
        hidden_size=hidden_size,
        num_layers=1,
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=2,
        intermediate_size=4,
        tie_word_embeddings=True,
    )


def scores_from_densities(shape: ModelShape, head, neuron, hidden) -> dict[str, torch.Tensor]:
    return {
        "head": torch.tensor([head], dtype=torch.float64) * params_per_group(shape),
        "neuron": torch.tensor([neuron], dtype=torch.float64) * params_per_neuron(shape),
        "hidden": torch.tensor(hidden, dtype=torch.float64) * params_per_hidden_channel(shape),
    }


def test_hand_computed_per_layer_case():
    """V=2 tied, d=8, 1 layer of 2 heads (d_h=2), f=4: remaining(h, k, f') = h·(5 + 8k + 3f'), total 264.

    Density order after the mandatory head 0, neuron 0, channel 0 (16 params): n1, c1..c5, n2, head 1, ...
    The prefix up to n2 costs 6·(5 + 8 + 9) = 132 = 0.5·264; adding head 1 costs 6·30 = 180.
    """
    shape = one_layer_mha(hidden_size=8, num_heads=2)
    assert (total_params(shape), params_per_group(shape), params_per_hidden_channel(shape)) == (264, 64, 33)
    scores = scores_from_densities(
        shape, [0.3, 0.02], [0.2, 0.1, 0.03, 0.001], [0.5, 0.09, 0.08, 0.07, 0.06, 0.05, 0.004, 0.003]
    )
    masks = search_masks(shape, scores, 0.5, layout="per_layer", round_to=1, min_hidden=1)
    assert masks.head_mask.tolist() == [[1, 0]] and masks.kv_mask.tolist() == [[1, 0]]
    assert masks.neuron_mask.tolist() == [[1, 1, 1, 0]]
    assert masks.hidden_mask.tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert remaining_params(shape, kept_sizes(masks)) == 132

    # round_to=2: neurons n0, n1 are mandatory; n2 alone rounds away, so the best fit is 6·(5 + 8 + 6) = 114.
    masks = search_masks(shape, scores, 0.5, layout="per_layer", round_to=2, min_hidden=1)
    assert masks.neuron_mask.tolist() == [[1, 1, 0, 0]]
    assert masks.hidden_mask.tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert remaining_params(shape, kept_sizes(masks)) == 114


def test_hand_computed_uniform_case_where_hidden_must_divide_by_heads():
    """d=6, 3 heads, f=4: remaining(h, k, f') = h·(5 + 8k + 3f'), total 246; hidden % kept heads must be 0.

    Prefixes after the mandatory set: +c1 32, +c2 48, +n1 57, +head1 (2 heads need even hidden: 3 channels and
    1 head keep more salience) 57, +c3 4·27 = 108, +c4 108, +head2 (3 heads need hidden 3: worse) 108,
    +c5 6·35 = 210. At ρ = 0.5 (123) the answer is 2 heads, hidden 4, 2 neurons.
    """
    shape = one_layer_mha(hidden_size=6, num_heads=3)
    assert total_params(shape) == 246
    scores = scores_from_densities(
        shape, [0.3, 0.2, 0.01], [0.5, 0.4, 0.0015, 0.001], [0.9, 0.8, 0.7, 0.05, 0.04, 0.002]
    )
    masks = search_masks(shape, scores, 0.5, layout="uniform", round_to=1, min_hidden=1)
    assert masks.head_mask.tolist() == [[1, 1, 0]]
    assert masks.neuron_mask.tolist() == [[1, 1, 0, 0]]
    assert masks.hidden_mask.tolist() == [1, 1, 1, 1, 0, 0]
    assert remaining_params(shape, kept_sizes(masks)) == 108

    masks = search_masks(shape, scores, 0.2, layout="uniform", round_to=1, min_hidden=1)
    assert kept_sizes(masks) == KeptSizes(hidden=3, heads=(1,), kv_heads=(1,), neurons=(1,))


@pytest.mark.parametrize(
    "mode, head_mask, kv_mask",
    [("kv_group", [1, 1, 0, 0], [1, 0]), ("query_in_group", [1, 0, 0, 1], [1, 1])],
)
def test_hand_computed_gqa_units(mode, head_mask, kv_mask):
    """Groups {0, 1} and {2, 3} score 1.1 and 0.8; the 2nd-best heads of the groups are 1 and 2.

    Neurons and channels are far denser, so a budget one query head pair short drops the weakest attention
    unit: group 1 (96 params) in kv_group mode, heads 1 and 2 (64 params) in query_in_group mode.
    """
    shape = make_shape(
        vocab_size=2, hidden_size=8, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=2, intermediate_size=8
    )
    assert (params_per_group(shape), 2 * params_per_query_head(shape)) == (96, 64)
    scores = {
        "head": torch.tensor([[0.9, 0.2, 0.1, 0.7]]),
        "neuron": torch.full((1, 8), 100.0),
        "hidden": torch.full((8,), 100.0),
    }
    fraction = (total_params(shape) - 64) / total_params(shape)
    masks = search_masks(shape, scores, fraction, attention_mode=mode, layout="per_layer", round_to=1)
    assert masks.head_mask.tolist() == [head_mask] and masks.kv_mask.tolist() == [kv_mask]
    assert bool((masks.neuron_mask == 1).all()) and bool((masks.hidden_mask == 1).all())


def test_full_budget_keeps_everything_and_scores_may_be_an_object():
    shape = SHAPES["gqa"]
    scores = SimpleNamespace(**random_scores(shape, 0))
    masks = search_masks(shape, scores, 1.0, round_to=8)
    assert kept_sizes(masks) == KeptSizes.full(shape)


@pytest.mark.parametrize("layout", ["uniform", "per_layer"])
def test_equal_scores_and_a_full_budget_keep_everything(layout):
    """Ties between loadable shapes go to the larger one."""
    shape = SHAPES["gqa3-bias"]
    scores = {name: torch.zeros_like(score) for name, score in random_scores(shape, 0).items()}
    masks = search_masks(shape, scores, 1.0, layout=layout, round_to=8)
    assert kept_sizes(masks) == KeptSizes.full(shape)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.01])
def test_refuses_a_fraction_outside_zero_one(fraction):
    with pytest.raises(ValueError, match="remaining fraction"):
        search_masks(SHAPES["gqa"], random_scores(SHAPES["gqa"], 0), fraction)


def test_refuses_a_budget_below_the_minimums():
    with pytest.raises(ValueError, match="minimum kept sizes need .* more than the budget"):
        search_masks(SHAPES["gqa"], random_scores(SHAPES["gqa"], 0), 0.01, min_hidden=32)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(attention_mode="heads"), "attention_mode"),
        (dict(layout="ragged"), "layout"),
        (dict(round_to=0), "round_to"),
        (dict(round_to=64), "exceeds intermediate_size"),
        (dict(min_hidden=65), "exceeds hidden_size"),
    ],
)
def test_refuses_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        search_masks(SHAPES["gqa"], random_scores(SHAPES["gqa"], 0), 0.5, **options)


def test_refuses_scores_of_the_wrong_shape():
    scores = random_scores(SHAPES["gqa"], 0) | {"neuron": torch.rand(2, 47)}
    with pytest.raises(ValueError, match="scores\\['neuron'\\] has shape"):
        search_masks(SHAPES["gqa"], scores, 0.5)


@pytest.mark.parametrize("layout", ["uniform", "per_layer"])
def test_a_7b_search_is_fast(layout):
    scores = random_scores(LLAMA2_7B, 0)
    start = time.perf_counter()
    masks = search_masks(LLAMA2_7B, scores, 0.5, layout=layout)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"{layout} search took {elapsed:.2f} s"
    kept = kept_sizes(masks)
    assert 0.49 < remaining_params(LLAMA2_7B, kept) / total_params(LLAMA2_7B) <= 0.5
    check_structure(LLAMA2_7B, masks, kept, "kv_group", layout, 8)
