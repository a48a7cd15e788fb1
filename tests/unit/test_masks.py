"""The canonical mask container: GQA checks, serialisation, gradual steps that land exactly on 0/1."""

import math

import pytest
import torch
from builders import GQA

from pipeline.apt.masks import MaskSet, binarize, step_toward


def test_ones_has_the_model_shapes_in_float32():
    masks = MaskSet.ones(GQA)
    assert masks.head_mask.shape == (2, 4) and masks.kv_mask.shape == (2, 2)
    assert masks.neuron_mask.shape == (2, 48) and masks.hidden_mask.shape == (64,)
    assert all(mask.dtype == torch.float32 and bool((mask == 1).all()) for mask in masks.to_dict().values())


def test_dict_round_trip_uses_the_field_names():
    masks = MaskSet.ones(GQA)
    masks.neuron_mask[1, :5] = 0
    tensors = masks.to_dict()
    assert sorted(tensors) == ["head_mask", "hidden_mask", "kv_mask", "neuron_mask"]
    back = MaskSet.from_dict({name: tensor.double() for name, tensor in tensors.items()})
    assert all(torch.equal(back.to_dict()[name], tensors[name]) for name in tensors)
    assert back.neuron_mask.dtype == torch.float32
    with pytest.raises(KeyError):
        MaskSet.from_dict({"head_mask": masks.head_mask})


def drop_group(masks: MaskSet, layer: int, group: int) -> MaskSet:
    masks.kv_mask[layer, group] = 0
    masks.head_mask[layer, 2 * group : 2 * group + 2] = 0
    return masks


def test_check_gqa_accepts_whole_groups_and_even_trims():
    drop_group(MaskSet.ones(GQA), 1, 0).check_gqa(GQA, "kv_group")
    even = MaskSet.ones(GQA)
    even.head_mask[0] = torch.tensor([1.0, 0.0, 0.0, 1.0])
    even.check_gqa(GQA, "query_in_group")


@pytest.mark.parametrize("mode", ["kv_group", "query_in_group"])
def test_check_gqa_refuses_a_query_head_without_its_kv_head(mode):
    masks = MaskSet.ones(GQA)
    masks.kv_mask[0, 1] = 0
    with pytest.raises(ValueError, match="layer 0: query heads survive in KV groups \\[1\\]"):
        masks.check_gqa(GQA, mode)


def test_check_gqa_refuses_partial_groups_in_kv_group_mode():
    masks = MaskSet.ones(GQA)
    masks.head_mask[1, 3] = 0
    with pytest.raises(ValueError, match="whole groups"):
        masks.check_gqa(GQA, "kv_group")


def test_check_gqa_refuses_uneven_groups_in_query_in_group_mode():
    masks = MaskSet.ones(GQA)
    masks.head_mask[1, 3] = 0
    with pytest.raises(ValueError, match="same number of query heads"):
        masks.check_gqa(GQA, "query_in_group")
    with pytest.raises(ValueError, match="every KV head"):
        drop_group(MaskSet.ones(GQA), 0, 1).check_gqa(GQA, "query_in_group")


@pytest.mark.parametrize("mode", ["kv_group", "query_in_group"])
def test_check_gqa_accepts_a_layer_that_keeps_its_attention_or_its_mlp_alone(mode):
    masks = MaskSet.ones(GQA)
    masks.head_mask[0] = masks.kv_mask[0] = 0  # layer 0 without attention, layer 1 without MLP
    masks.neuron_mask[1] = 0
    masks.check_gqa(GQA, mode)


@pytest.mark.parametrize("mode", ["kv_group", "query_in_group"])
def test_check_gqa_refuses_half_a_cut_attention_and_every_layer_without_one_sublayer(mode):
    kv_only = MaskSet.ones(GQA)
    kv_only.head_mask[1] = 0  # KV heads kept for no query head: the attention is neither kept nor cut
    with pytest.raises(ValueError, match="layer 1 keeps no query head but KV heads \\[0, 1\\]"):
        kv_only.check_gqa(GQA, mode)
    heads_only = MaskSet.ones(GQA)
    heads_only.kv_mask[0] = 0
    with pytest.raises(ValueError, match="layer 0: query heads survive in KV groups \\[0, 1\\]"):
        heads_only.check_gqa(GQA, mode)
    no_attention = MaskSet.ones(GQA)
    no_attention.head_mask[:] = no_attention.kv_mask[:] = 0
    with pytest.raises(ValueError, match="every layer's attention is cut"):
        no_attention.check_gqa(GQA, mode)
    no_mlp = MaskSet.ones(GQA)
    no_mlp.neuron_mask[:] = 0
    with pytest.raises(ValueError, match="every layer's MLP is cut"):
        no_mlp.check_gqa(GQA, mode)


def test_check_gqa_refuses_no_hidden_channel_and_bad_shapes():
    no_hidden = MaskSet.ones(GQA)
    no_hidden.hidden_mask[:] = 0
    with pytest.raises(ValueError, match="no hidden channel"):
        no_hidden.check_gqa(GQA, "kv_group")
    wrong = MaskSet.ones(GQA)
    wrong.kv_mask = torch.ones(2, 4)
    with pytest.raises(ValueError, match="kv_mask has shape"):
        wrong.check_gqa(GQA, "kv_group")
    with pytest.raises(ValueError, match="attention mode"):
        MaskSet.ones(GQA).check_gqa(GQA, "heads")


def half_pruned_target() -> MaskSet:
    target = MaskSet.ones(GQA)
    target.neuron_mask[:, ::2] = 0
    target.hidden_mask[:32] = 0
    return target


@pytest.mark.parametrize("alpha", [0.3, 0.07, 0.02, 0.01, 0.001])
def test_step_toward_lands_exactly_on_the_target_after_ceil_one_over_alpha_steps(alpha):
    target = half_pruned_target()
    current = MaskSet.ones(GQA)
    steps = math.ceil(1 / alpha)
    for step in range(steps):
        previous = current
        current = step_toward(current, target, alpha)
        moved = (current.neuron_mask - previous.neuron_mask).abs().max()
        assert moved <= alpha + 1e-4
        if step < steps - 1:
            assert bool((current.neuron_mask[:, 0] > 0).all()), "a mask must not reach 0 early"
    for name, mask in current.to_dict().items():
        assert torch.equal(mask, target.to_dict()[name]), name


def test_step_toward_brings_a_revived_block_back_up():
    alpha = 0.1
    target = half_pruned_target()
    current = MaskSet.ones(GQA)
    for _ in range(4):
        current = step_toward(current, target, alpha)
    assert current.hidden_mask[0].item() == pytest.approx(0.6)
    for _ in range(4):
        current = step_toward(current, MaskSet.ones(GQA), alpha)
    assert bool((current.hidden_mask == 1).all())
    assert bool((current.neuron_mask == 1).all())


def test_step_toward_refuses_a_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        step_toward(MaskSet.ones(GQA), MaskSet.ones(GQA), 0)


def test_binarize_keeps_entries_at_or_above_one_half():
    masks = MaskSet.ones(GQA)
    masks.neuron_mask[0, :3] = torch.tensor([0.49, 0.5, 0.51])
    binary = binarize(masks)
    assert binary.neuron_mask[0, :3].tolist() == [0.0, 1.0, 1.0]
    assert binary.head_mask.dtype == torch.float32
