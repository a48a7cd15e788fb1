"""Whole layers as units: ShortGPT's block influence merges exactly and matches the hidden states it is read from;
the shape search weighs layer cuts against widths within the same budget."""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from builders import with_trained_adapters

from pipeline import preflight
from pipeline.apt.adapters import set_masks
from pipeline.apt.blocks import KeptSizes, ModelShape, kept_sizes, remaining_params, total_params
from pipeline.apt.depth import BlockInfluence, cut_counts
from pipeline.apt.masks import MaskSet, empty_layers
from pipeline.config import ConfigError, PruningSection
from pipeline.shape_choice import final_remaining, search_target


def test_block_influence_is_one_minus_the_mean_cosine_between_a_layers_input_and_output(tiny_model, input_ids):
    model = tiny_model("llama", num_layers=3)
    influence = BlockInfluence(3)
    influence.attach(model)
    with torch.no_grad():
        states = model(input_ids, output_hidden_states=True).hidden_states
    influence.detach()
    # hidden_states[l] is layer l's input and hidden_states[l + 1] its output, except the last (the final norm's).
    for layer in range(2):
        cos = F.cosine_similarity(states[layer].double(), states[layer + 1].double(), dim=-1)
        torch.testing.assert_close(influence.scores()[layer], 1 - cos.mean(), rtol=1e-9, atol=1e-12)
    assert influence.sums[1].tolist() == [input_ids.numel()] * 3


def test_sums_merged_over_batches_equal_one_pass_over_all_of_them(tiny_model, input_ids):
    model = tiny_model("qwen2", num_layers=2)
    whole, parts = BlockInfluence(2), [BlockInfluence(2), BlockInfluence(2)]
    whole.attach(model)
    with torch.no_grad():
        model(input_ids)
    whole.detach()
    for part, rows in zip(parts, input_ids.split(1), strict=True):
        part.attach(model)
        with torch.no_grad():
            model(rows)
        part.detach()
    merged = BlockInfluence(2)
    merged.load_packed(sum(part.pack() for part in parts))  # what one SUM all-reduce of two ranks gives
    # float32 forwards of one row and of two differ in rounding only
    torch.testing.assert_close(merged.scores(), whole.scores(), rtol=1e-6, atol=1e-9)
    assert torch.equal(merged.sums[1], whole.sums[1])


# ---- layer cuts in the shape search ------------------------------------------------------------------------

SHAPE = ModelShape(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                   intermediate_size=48, tie_word_embeddings=False, qkv_bias=False)
ORDER = [2, 0, 3, 1]
"""Layers by influence, lowest first: a cut of k layers takes the first k."""


def scores(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"head": torch.rand(4, 4, generator=generator), "neuron": torch.rand(4, 48, generator=generator),
            "hidden": torch.rand(32, generator=generator)}


def pruning(**fields) -> PruningSection:
    return dataclasses.replace(PruningSection(attention_mode="kv_group", round_to=8, min_hidden=8), **fields)


def last(masks_list):
    """A measure that picks the last candidate (the most layers cut)."""
    return SimpleNamespace(index=len(masks_list) - 1, losses=(0.0,) * len(masks_list))


def test_cut_counts_follow_the_depth_option():
    assert cut_counts("off", 8, 0, 0.5, lambda cut: True) == [0]
    assert cut_counts("off", 8, 2, 0.5, lambda cut: True) == [2]  # cut layers never come back
    assert cut_counts(6, 8, 0, 0.0, lambda cut: True) == [0]
    assert cut_counts(6, 8, 0, 0.5, lambda cut: True) == [1]
    assert cut_counts(6, 8, 0, 1.0, lambda cut: True) == [2]
    assert cut_counts("auto", 8, 0, 0.5, lambda cut: cut <= 3) == [0, 1, 2, 3]
    assert cut_counts("auto", 8, 1, 0.5, lambda cut: True) == list(range(1, 8))  # at least one layer is kept


def test_auto_weighs_layer_cuts_against_widths_within_the_budget():
    budget = math.floor(0.5 * total_params(SHAPE))
    _, width_only, _ = search_target(SHAPE, scores(), 0.5, pruning(), measure=last)
    masks, shapes, _ = search_target(SHAPE, scores(), 0.5, pruning(depth="auto"), measure=last, layer_order=ORDER)
    assert shapes[:len(width_only)] == width_only  # the width-only candidates come first, unchanged
    cuts = [kept.cut_layers for kept in shapes[len(width_only):]]
    assert cuts == [sorted(ORDER[:k]) for k in range(1, len(cuts) + 1)] and len(cuts) >= 2
    neuron_step = 3 * 8 * SHAPE.hidden_size * SHAPE.num_layers  # round_to neurons in every layer
    for kept in shapes:
        assert budget - neuron_step < remaining_params(SHAPE, kept) <= budget
    assert empty_layers(masks) == cuts[-1]  # the measured choice: the last candidate
    masks.check_gqa(SHAPE, "kv_group")  # a whole layer cut is a loadable shape
    assert kept_sizes(masks) == shapes[-1]


def test_a_layer_count_is_reached_along_the_schedule():
    for progress, cut in ((0.0, []), (0.5, [2]), (1.0, [0, 2])):
        masks, shapes, _ = search_target(SHAPE, scores(), 0.5, pruning(depth=2), measure=last, layer_order=ORDER,
                                         progress=progress)
        assert all(kept.cut_layers == cut for kept in shapes) and empty_layers(masks) == cut


def test_a_cut_layer_stays_cut_when_alive_says_so():
    alive, _, _ = search_target(SHAPE, scores(), 0.6, pruning(depth=3), layer_order=ORDER)
    assert empty_layers(alive) == [2]
    _, shapes, _ = search_target(SHAPE, scores(1), 0.5, pruning(depth="auto"), measure=last, alive=alive,
                                 layer_order=[1, 0, 3, 2])
    assert all(2 in kept.cut_layers for kept in shapes)  # forced, whatever the order says
    assert [kept.cut_layers for kept in shapes[1:]][-1][:2] == [1, 2]


def test_check_gqa_takes_a_whole_layer_or_sublayer_cut_but_not_half_of_an_attention():
    masks = MaskSet.ones(SHAPE)
    masks.head_mask[1] = masks.kv_mask[1] = masks.neuron_mask[1] = 0
    masks.check_gqa(SHAPE, "kv_group")
    masks.neuron_mask[1, 0] = 1  # layer 1 keeps its MLP alone (pruning.depth_unit=sublayer)
    masks.check_gqa(SHAPE, "kv_group")
    masks.kv_mask[1, 0] = 1
    with pytest.raises(ValueError, match="layer 1 keeps no query head but KV heads"):
        masks.check_gqa(SHAPE, "kv_group")
    every = MaskSet.ones(SHAPE)
    every.head_mask[:] = every.kv_mask[:] = every.neuron_mask[:] = 0
    with pytest.raises(ValueError, match="every layer is removed"):
        every.check_gqa(SHAPE, "kv_group")


def test_depth_is_checked_at_start_up(tiny_config):
    assert tiny_config("pruning.depth=1").pruning.depth == 1
    assert tiny_config("pruning.depth=auto").pruning.depth == "auto"
    for overrides, message in ((["pruning.depth=0"], "depth: 0 layers to keep must be >= 1"),
                               (["pruning.depth=deep"], r"one of \['off', 'auto'\] or an integer"),
                               (["pruning.depth=auto", "pruning.shape_search=global"], "needs shape_search measured"),
                               (["pruning.depth=1", "pruning.target_shape=[32, 2, 1, 64]"], "fifth entry")):
        with pytest.raises(ConfigError, match=message):
            tiny_config(*overrides)
    cfg = tiny_config("pruning.depth=2")
    assert any("pruning.depth: 2 layers to keep; the model has 2" in p for p in preflight.depth_problems(cfg))
    assert preflight.depth_problems(tiny_config("pruning.depth=1")) == []
    held = preflight.depth_problems(tiny_config("pruning.depth=1", "pruning.target_remaining=0.95"))
    assert len(held) == 1 and "the 1 kept layers hold at most" in held[0] and "target_remaining 0.95" in held[0]


def test_a_target_shape_with_a_layer_count_cuts_layers_once_the_widths_reach_it():
    target = pruning(target_shape=(16, 2, 1, 24, 2))
    final = final_remaining(target, SHAPE)
    two_layers = dataclasses.replace(SHAPE, num_layers=2)
    sizes = KeptSizes(hidden=16, heads=(2, 2), kv_heads=(1, 1), neurons=(24, 24))
    assert final == remaining_params(two_layers, sizes) / total_params(SHAPE)  # two layers at the target widths
    cuts_seen = []
    for rho in (0.9, 0.7, 0.5, 0.4, final):
        masks, shapes, _ = search_target(SHAPE, scores(), rho, target, layer_order=ORDER)
        kept = kept_sizes(masks)
        assert shapes == [kept] and remaining_params(SHAPE, kept) <= math.floor(rho * total_params(SHAPE))
        left = [layer for layer in range(4) if layer not in kept.cut_layers]
        assert kept.cut_layers == sorted(ORDER[:len(kept.cut_layers)])  # the lowest influence goes first
        assert all(kept.heads[layer] >= 2 and kept.neurons[layer] >= 24 for layer in left) and kept.hidden >= 16
        cuts_seen.append(len(kept.cut_layers))
    assert cuts_seen == sorted(cuts_seen) and cuts_seen[0] == 0  # widths first, then layers, never back
    assert kept == dataclasses.replace(kept, hidden=16) and kept.cut_layers == [0, 2]
    assert [kept.heads[layer] for layer in (1, 3)] == [2, 2] and [kept.neurons[layer] for layer in (1, 3)] == [24, 24]
    assert remaining_params(SHAPE, kept) == round(final * total_params(SHAPE))


def test_a_target_layer_count_is_checked_at_start_up(tiny_config):
    cfg = tiny_config("pruning.target_shape=[32, 2, 1, 64, 1]")
    assert cfg.pruning.target_layers == 1 and cfg.pruning.cuts_layers
    assert tiny_config("pruning.target_shape=[32, 2, 1, 64]").pruning.target_layers is None
    assert preflight.target_shape_problems(cfg) == [] and preflight.depth_problems(cfg) == []
    too_many = tiny_config("pruning.target_shape=[32, 2, 1, 64, 3]")
    assert preflight.target_shape_problems(too_many) == ["pruning.target_shape: layers 3 exceeds the model's 2"]
    with pytest.raises(ConfigError, match="four or five sizes"):
        tiny_config("pruning.target_shape=[32, 2, 1, 64, 1, 1]")


# ---- a layer's attention or MLP alone (pruning.depth_unit=sublayer) -------------------------------------------

SUBLAYER_ORDER = [2, 5, 7, 0, 3, 1, 4, 6]
"""Units by influence, lowest first (2l: layer l's attention, 2l + 1: its MLP): layer 1's attention, layer 2's
MLP, layer 3's MLP, layer 0's attention, ..."""


def sublayers(**fields) -> PruningSection:
    return pruning(depth="auto", depth_unit="sublayer", layout="per_layer", **fields)


def test_sublayer_influence_reads_the_residual_stream_around_each_sublayer(tiny_model, input_ids):
    model = with_trained_adapters(tiny_model("qwen2", num_layers=3), ["q_proj", "v_proj"])
    masks = MaskSet.ones(ModelShape.from_config(model.config))
    masks.head_mask[1] = masks.kv_mask[1] = 0  # layer 1's attention adds nothing: x -> x
    masks.neuron_mask[2] = 0  # layer 2's MLP adds nothing
    set_masks(model, masks)
    layers, units = BlockInfluence(3), BlockInfluence(3, sublayers=True)
    for influence in (layers, units):
        influence.attach(model)
    with torch.no_grad():
        states = model(input_ids, output_hidden_states=True).hidden_states
    units.detach()
    layers.detach()
    scores = units.scores()
    assert scores[2] == pytest.approx(0, abs=1e-12) and scores[5] == pytest.approx(0, abs=1e-12)
    # with no attention, layer 1's MLP carries its input to its output; with no MLP, layer 2's attention does
    torch.testing.assert_close(scores[3], layers.scores()[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scores[4], layers.scores()[2], rtol=1e-12, atol=1e-12)
    cos = F.cosine_similarity(states[1].double(), states[2].double(), dim=-1)
    torch.testing.assert_close(scores[3], 1 - cos.mean(), rtol=1e-9, atol=1e-12)
    assert units.sums[1].tolist() == [input_ids.numel()] * 6


@pytest.mark.parametrize("ranking", ["salience", "relative"])
def test_sublayer_cuts_are_weighed_against_widths_within_the_budget(ranking):
    budget = math.floor(0.5 * total_params(SHAPE))
    for mode in ("kv_group", "query_in_group"):
        options = sublayers(attention_mode=mode, per_layer_ranking=ranking)
        masks, shapes, _ = search_target(SHAPE, scores(), 0.5, options, measure=last, layer_order=SUBLAYER_ORDER)
        cut = [unit for kept in shapes for unit in _cut_units(kept)]
        assert [_cut_units(kept) for kept in shapes if _cut_units(kept)][:3] == [[2], [2, 5], [2, 5, 7]]
        assert 2 in cut and all(unit in SUBLAYER_ORDER for unit in cut)
        neuron_step = 3 * 8 * SHAPE.hidden_size * SHAPE.num_layers
        for kept in shapes:
            assert budget - neuron_step < remaining_params(SHAPE, kept) <= budget
            assert kept.attention_layers >= 1 and kept.mlp_layers >= 1
        masks.check_gqa(SHAPE, mode)
        assert kept_sizes(masks) == shapes[-1]


def test_a_cut_sublayer_stays_cut_when_alive_says_so():
    alive = MaskSet.ones(SHAPE)
    alive.neuron_mask[3] = 0  # the fine-tune ended with layer 3's MLP gone
    _, shapes, _ = search_target(SHAPE, scores(), 0.5, sublayers(), measure=last, alive=alive,
                                 layer_order=SUBLAYER_ORDER)
    assert all(7 in _cut_units(kept) for kept in shapes)


def test_sublayer_cuts_count_each_sublayers_norm():
    kept = KeptSizes(hidden=32, heads=(0, 4, 4, 4), kv_heads=(0, 2, 2, 2), neurons=(48, 48, 0, 48))
    full = remaining_params(SHAPE, KeptSizes.full(SHAPE))
    attention = 2 * 32 * 8 * (4 + 2) + 32  # q, k, v, o and input_layernorm
    mlp = 3 * 32 * 48 + 32  # gate, up, down and post_attention_layernorm
    assert remaining_params(SHAPE, kept) == full - attention - mlp
    assert kept.cut_layers == [] and (kept.attention_layers, kept.mlp_layers) == (3, 3)
    assert (kept.cut_attention, kept.cut_mlp) == ([0], [2])


def test_sublayer_cuts_are_checked_at_start_up(tiny_config):
    cfg = tiny_config("pruning.depth=auto", "pruning.depth_unit=sublayer", "pruning.layout=per_layer")
    assert cfg.pruning.depth_unit == "sublayer" and preflight.depth_problems(cfg) == []
    for overrides in (["pruning.depth_unit=sublayer", "pruning.layout=per_layer"],
                      ["pruning.depth=auto", "pruning.depth_unit=sublayer"],
                      ["pruning.depth=1", "pruning.depth_unit=sublayer", "pruning.layout=per_layer"]):
        with pytest.raises(ConfigError, match="depth_unit: sublayer needs depth auto"):
            tiny_config(*overrides)


def test_sublayer_cuts_refuse_a_model_that_mixes_attention_kinds(tiny_config, tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=16, max_window_layers=2,
                hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=128).save_pretrained(tmp_path / "mixed")
    cfg = tiny_config("pruning.depth=auto", "pruning.depth_unit=sublayer", "pruning.layout=per_layer",
                      f"model.path={tmp_path / 'mixed'}")
    problems = preflight.sublayer_problems(cfg)
    assert len(problems) == 1 and "pruning.depth_unit: sublayer needs one attention kind" in problems[0]


def _cut_units(kept: KeptSizes) -> list[int]:
    """The sublayer units a shape cuts, in unit order."""
    return [2 * layer + kind for layer, (heads, neurons) in enumerate(zip(kept.heads, kept.neurons, strict=True))
            for kind, size in ((0, heads), (1, neurons)) if size == 0]
