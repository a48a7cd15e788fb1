"""Compaction: which dead blocks a plan removes, and that the compacted model, masks and salience state are the
masked ones with the dead blocks cut out."""

import copy

import pytest
import torch
from builders import LLAMA_MISTRAL_CASES, TINY_MODEL, logits, make_shape, with_trained_adapters

from pipeline.apt.adapters import ChannelMask, get_masks, set_masks
from pipeline.apt.blocks import ModelShape, kept_sizes, remaining_params, total_params
from pipeline.apt.compaction import (
    compact_accumulator,
    compact_model,
    narrow_alive,
    physical_fraction,
    plan_compaction,
    slice_masks,
    slice_scores,
)
from pipeline.apt.masks import MaskSet, empty_layers
from pipeline.apt.salience import SalienceAccumulator, SalienceScores
from pipeline.apt.search import search_masks

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def dead(masks: MaskSet) -> tuple[MaskSet, MaskSet]:
    """(current, target) where every 0 of `masks` is dead: mask and target both 0."""
    return masks, copy.deepcopy(masks)


# ---- plan rules -----------------------------------------------------------------------------------------


def test_nothing_dead_gives_no_plan():
    shape = TINY_MODEL
    assert plan_compaction(*dead(MaskSet.ones(shape)), shape, "kv_group") is None
    masks, target = MaskSet.ones(shape), MaskSet.ones(shape)
    masks.neuron_mask[:, :10] = 0  # pruned now, but the target keeps them: they may come back
    assert plan_compaction(masks, target, shape, "kv_group") is None
    target.neuron_mask[:, :10] = 0
    masks.neuron_mask[:, :10] = 0.01  # still stepping down
    assert plan_compaction(masks, target, shape, "kv_group") is None


def test_per_layer_dead_counts_remove_the_common_count_from_every_layer():
    shape = make_shape(TINY_MODEL, num_layers=3)
    masks = MaskSet.ones(shape)
    for layer, dead_neurons in enumerate(([3, 5, 7, 9, 11], [0, 2, 4], [90, 91, 92, 93, 94, 95, 1])):
        masks.neuron_mask[layer, dead_neurons] = 0
    plan = plan_compaction(*dead(masks), shape, "kv_group")
    assert plan.after == make_shape(TINY_MODEL, num_layers=3, intermediate_size=93)
    removed = [set(range(96)) - set(keep.neurons.tolist()) for keep in plan.layers]
    assert removed == [{3, 5, 7}, {0, 2, 4}, {1, 90, 91}]  # three each, the first dead ones by index
    assert all(torch.equal(keep.heads, torch.arange(4)) for keep in plan.layers)
    assert torch.equal(plan.hidden, torch.arange(64))


def test_only_whole_dead_kv_groups_go():
    shape = make_shape(TINY_MODEL, num_heads=8, num_kv_heads=4, head_dim=8)  # g = 2
    masks = MaskSet.ones(shape)
    masks.kv_mask[0, [1, 3]] = 0
    masks.head_mask[0, [2, 3, 6, 7]] = 0  # layer 0: groups 1 and 3 dead
    masks.kv_mask[1, [0, 2]] = 0
    masks.head_mask[1, [0, 1, 4]] = 0  # layer 1: group 0 dead; group 2 keeps query head 5
    masks.hidden_mask[:4] = 0  # 60 live channels: a multiple of the 6 query heads that remain
    plan = plan_compaction(*dead(masks), shape, "kv_group")
    assert plan.after == make_shape(TINY_MODEL, num_heads=6, num_kv_heads=3, head_dim=8, hidden_size=60)
    assert [keep.kv_heads.tolist() for keep in plan.layers] == [[0, 2, 3], [1, 2, 3]]
    assert [keep.heads.tolist() for keep in plan.layers] == [[0, 1, 4, 5, 6, 7], [2, 3, 4, 5, 6, 7]]
    assert torch.equal(plan.hidden, torch.arange(4, 64))


def test_hidden_stays_a_multiple_of_the_kept_query_heads():
    shape = make_shape(TINY_MODEL, num_heads=8, num_kv_heads=4, head_dim=8)
    masks = MaskSet.ones(shape)
    masks.kv_mask[:, 0] = 0
    masks.head_mask[:, :2] = 0  # group 0 dead in both layers: 6 query heads would remain
    masks.neuron_mask[:, :8] = 0

    plan = plan_compaction(*dead(masks), shape, "kv_group")
    # 64 channels, none dead: 6 heads would need hidden 66 > 64, so the heads stay; the neurons go.
    assert (plan.after.num_heads, plan.after.hidden_size, plan.after.intermediate_size) == (8, 64, 88)

    masks.hidden_mask[[5, 9, 20, 33, 40]] = 0
    plan = plan_compaction(*dead(masks), shape, "kv_group")
    # 59 live channels: 6 heads need 60, so four of the five dead channels go and the last one stays.
    assert (plan.after.num_heads, plan.after.hidden_size) == (6, 60)
    assert sorted(set(range(64)) - set(plan.hidden.tolist())) == [5, 9, 20, 33]


def test_query_in_group_trims_the_same_number_of_query_heads_from_every_group():
    shape = make_shape(TINY_MODEL, num_heads=8, num_kv_heads=2, head_dim=8)  # g = 4
    masks = MaskSet.ones(shape)
    masks.head_mask[0, [0, 1, 5]] = 0  # layer 0: two dead in group 0, one in group 1
    masks.head_mask[1, [1, 2, 3, 4, 6]] = 0  # layer 1: three and two
    masks.hidden_mask[:4] = 0  # room for hidden 60, a multiple of 6 heads
    plan = plan_compaction(*dead(masks), shape, "query_in_group")
    assert plan.after == make_shape(TINY_MODEL, num_heads=6, num_kv_heads=2, head_dim=8, hidden_size=60)
    assert [keep.heads.tolist() for keep in plan.layers] == [[1, 2, 3, 4, 6, 7], [0, 2, 3, 5, 6, 7]]
    assert [keep.kv_heads.tolist() for keep in plan.layers] == [[0, 1], [0, 1]]
    # kv_group mode never trims single query heads; with all 8 heads, 60 live channels round up to 64: nothing goes.
    assert plan_compaction(*dead(masks), shape, "kv_group") is None


def test_every_layer_keeps_at_least_one_unit_of_each_kind():
    shape = make_shape(TINY_MODEL, num_heads=8, num_kv_heads=4, head_dim=8)
    all_dead = MaskSet(**{name: torch.zeros_like(mask) for name, mask in MaskSet.ones(shape).to_dict().items()})
    plan = plan_compaction(*dead(all_dead), shape, "kv_group")
    assert (plan.after.num_kv_heads, plan.after.num_heads, plan.after.intermediate_size) == (1, 2, 1)
    assert plan.after.hidden_size == 2  # one live channel rounded up to a multiple of the 2 heads


def test_min_fraction_needs_that_share_of_some_block_type():
    shape = TINY_MODEL
    masks = MaskSet.ones(shape)
    masks.neuron_mask[:, :5] = 0  # 5 of 96 neurons: 5.2 %
    assert plan_compaction(*dead(masks), shape, "kv_group", min_fraction=0.06) is None
    assert plan_compaction(*dead(masks), shape, "kv_group", min_fraction=0.05) is not None


def test_a_plan_refuses_masks_of_another_shape():
    shape = TINY_MODEL
    with pytest.raises(ValueError, match="neuron_mask has shape"):
        plan_compaction(*dead(MaskSet.ones(make_shape(TINY_MODEL, intermediate_size=90))), shape, "kv_group")


# ---- slicing a wrapped model by the plan ----------------------------------------------------------------

CASES = [*LLAMA_MISTRAL_CASES, pytest.param("qwen2", 2, True, "kv_group", id="qwen2-gqa-kv_group-tied")]


def training_masks(random_masks, shape, mode, seed, cut: int | None = None):
    """(current, target) mid-window, binary targets with different counts per layer. Each row's first pruned unit
    is dead (at 0); a quarter of the other pruned ones are still stepping down, a quarter of the kept ones back up.
    Layer `cut` is dead whole (`pruning.depth`)."""
    generator = torch.Generator().manual_seed(seed)
    target = random_masks(shape, generator, mode=mode, uniform=False)

    def gradual(mask):
        pruned = mask == 0
        moving = (torch.rand(mask.shape, generator=generator) < 0.25) & ~(pruned & (pruned.cumsum(-1) == 1))
        return torch.where(pruned, torch.where(moving, 0.4, 0.0), torch.where(moving, 0.7, 1.0))

    layers, num_kv, group = shape.num_layers, shape.num_kv_heads, shape.group_size
    kv_mask = gradual(target.kv_mask)
    if mode == "kv_group":  # a group's query heads move with their KV head
        head_mask = kv_mask.repeat_interleave(group, dim=1)
    else:
        head_mask = gradual(target.head_mask.reshape(layers * num_kv, group)).reshape(layers, -1)
    current = MaskSet(head_mask=head_mask, kv_mask=kv_mask, neuron_mask=gradual(target.neuron_mask),
                      hidden_mask=gradual(target.hidden_mask))
    if cut is not None:
        for masks in (current, target):
            masks.head_mask[cut] = masks.kv_mask[cut] = masks.neuron_mask[cut] = 0
    return current, target


@pytest.mark.parametrize(("arch", "num_kv", "tie", "mode"), CASES)
def test_compacted_model_computes_what_the_masked_model_computes(
    tiny_model, random_masks, input_ids, arch, num_kv, tie, mode
):
    model = with_trained_adapters(tiny_model(arch, num_kv_heads=num_kv, tie=tie, num_layers=3), TARGETS)
    shape = ModelShape.from_config(model.config)
    masks, target = training_masks(random_masks, shape, mode, seed=3)
    set_masks(model, masks)
    expected = logits(model, input_ids)

    plan = plan_compaction(masks, target, shape, mode)
    after = plan.after  # every kind of block goes: heads (whole groups in kv_group mode), neurons, hidden channels
    assert after.num_heads < shape.num_heads and after.intermediate_size < 96 and after.hidden_size < 64
    assert (after.num_kv_heads < shape.num_kv_heads) == (mode == "kv_group")
    replaced = compact_model(model, plan)

    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=1e-5)
    assert ModelShape.from_config(model.config) == plan.after
    model.config.validate()  # transformers would load this config
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert base == total_params(plan.after)
    compacted_masks = slice_masks(masks, plan)
    assert all(torch.equal(a, b) for a, b in zip(get_masks(model).to_dict().values(),
                                                compacted_masks.to_dict().values(), strict=True))
    assert remaining_params(shape, kept_sizes(masks)) == remaining_params(plan.after, kept_sizes(compacted_masks))
    assert remaining_params(shape, kept_sizes(target)) == remaining_params(plan.after,
                                                                           kept_sizes(slice_masks(target, plan)))
    # Every adapter parameter was replaced by its selection; the model trains exactly those.
    trainable = {p for p in model.parameters() if p.requires_grad}
    assert {new for new, _ in replaced.values()} == trainable
    for old, (new, selected) in replaced.items():
        assert torch.equal(new, selected.take(old.detach()))


@pytest.mark.parametrize(("arch", "mode"), [("llama", "kv_group"), ("qwen2", "query_in_group")])
def test_a_layer_masked_whole_leaves_the_model(tiny_model, random_masks, input_ids, arch, mode):
    model = with_trained_adapters(tiny_model(arch, num_kv_heads=2, num_layers=3), TARGETS)
    shape = ModelShape.from_config(model.config)
    masks, target = training_masks(random_masks, shape, mode, seed=3, cut=1)
    set_masks(model, masks)
    expected = logits(model, input_ids)
    plan = plan_compaction(masks, target, shape, mode)
    assert plan.kept_layers == (0, 2) and plan.after.num_layers == 2 and plan.summary()["layers_after"] == 2
    replaced = compact_model(model, plan)

    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=1e-5)
    assert ModelShape.from_config(model.config) == plan.after and model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]  # the KV cache's slots
    sites = {name: site.layer for name, site in model.named_modules() if isinstance(site, ChannelMask)}
    assert {layer for name, layer in sites.items() if name.startswith("model.layers.1.")} == {1}
    compacted_masks = slice_masks(masks, plan)
    assert all(torch.equal(a, b) for a, b in zip(get_masks(model).to_dict().values(),
                                                compacted_masks.to_dict().values(), strict=True))
    assert remaining_params(shape, kept_sizes(masks)) == remaining_params(plan.after, kept_sizes(compacted_masks))
    assert {new for new, _ in replaced.values()} == {p for p in model.parameters() if p.requires_grad}
    alive = narrow_alive(MaskSet.ones(shape), plan)
    assert empty_layers(alive) == [1] and kept_sizes(alive).neurons[0] == plan.after.intermediate_size


def test_compacting_twice_composes(tiny_model, input_ids):
    model = with_trained_adapters(tiny_model("llama", num_kv_heads=2, num_layers=2), TARGETS)
    shape = ModelShape.from_config(model.config)
    masks = MaskSet.ones(shape)
    masks.neuron_mask[:, :24] = 0
    set_masks(model, masks)
    expected = logits(model, input_ids)
    first = plan_compaction(*dead(masks), shape, "kv_group")
    compact_model(model, first)
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=1e-5)

    masks = slice_masks(masks, first)
    masks.kv_mask[:, 1] = 0
    masks.head_mask[:, 2:] = 0
    masks.hidden_mask[32:] = 0
    set_masks(model, masks)
    expected = logits(model, input_ids)
    second = plan_compaction(*dead(masks), first.after, "kv_group")
    compact_model(model, second)
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=1e-5)
    assert ModelShape.from_config(model.config) == second.after == make_shape(
        TINY_MODEL, num_heads=2, num_kv_heads=1, hidden_size=32, intermediate_size=72
    )
    with pytest.raises(ValueError, match="the plan is for a model of shape"):
        compact_model(model, first)


def test_the_compacted_base_streamed_from_the_original_checkpoint_is_the_training_models(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.export import write_compacted_base

    model = tiny_model("llama", num_kv_heads=2, num_layers=3)
    model.save_pretrained(tmp_path / "original")
    model = with_trained_adapters(model, TARGETS)
    shape = ModelShape.from_config(model.config)
    masks = MaskSet.ones(shape)
    masks.neuron_mask[:, 5:29] = 0
    masks.head_mask[0] = masks.kv_mask[0] = masks.neuron_mask[0] = 0  # layer 0 goes whole: layers 1, 2 move up
    first = plan_compaction(*dead(masks), shape, "kv_group")
    compact_model(model, first)
    masks = slice_masks(masks, first)
    masks.kv_mask[:, 0] = 0
    masks.head_mask[:, :2] = 0
    masks.hidden_mask[1::2] = 0
    masks.neuron_mask[:, :8] = 0  # physical neurons 5-7 are the original 29-31: indices count only those alive
    second = plan_compaction(*dead(masks), first.after, "kv_group")
    compact_model(model, second)
    alive = narrow_alive(narrow_alive(MaskSet.ones(shape), first), second)

    write_compacted_base(tmp_path / "original", alive, tmp_path / "compacted", trust_remote_code=False)
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "compacted").state_dict()
    held = {name.replace(".base.", "."): param for name, param in model.named_parameters() if not param.requires_grad}
    assert held.keys() <= written.keys()
    for name, param in held.items():
        assert torch.equal(written[name], param), name


def accumulate(model, input_ids):
    """A fresh accumulator's sums over one forward/backward of the model."""
    accumulator = SalienceAccumulator(ModelShape.from_config(model.config))
    accumulator.attach(model)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    accumulator.detach()
    return accumulator


@pytest.mark.parametrize(("mode", "cut"), [("kv_group", None), ("query_in_group", None), ("kv_group", 0)])
def test_sliced_salience_state_is_what_the_compacted_model_accumulates(tiny_model, random_masks, input_ids, mode,
                                                                       cut):
    model = with_trained_adapters(tiny_model("llama", num_kv_heads=2, num_layers=3), TARGETS)
    shape = ModelShape.from_config(model.config)
    masks, target = training_masks(random_masks, shape, mode, seed=5, cut=cut)
    set_masks(model, masks)
    plan = plan_compaction(masks, target, shape, mode)
    compacted = copy.deepcopy(model)
    compact_model(compacted, plan)

    original = accumulate(model, input_ids)
    sliced = compact_accumulator(original, plan)
    fresh = accumulate(compacted, input_ids)
    assert sliced.shape == plan.after
    expected_state, actual_state = fresh.state_dict(), sliced.state_dict()
    for key, expected in expected_state.items():
        assert_close_to_float32(actual_state[key], expected, key)
    sliced_scores = slice_scores(original.scores(), plan)  # how an EMA of scores follows the plan
    for name in ("head", "neuron", "hidden"):
        expected = getattr(fresh.scores(), name)
        assert_close_to_float32(getattr(sliced.scores(), name), expected, name)
        assert_close_to_float32(getattr(sliced_scores, name), expected, name)


def assert_close_to_float32(actual, expected, name):
    """Equal up to float32 rounding of the activations: signed sums cancel, so the scale is the largest entry."""
    assert actual.shape == expected.shape, name
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()), msg=name)


def test_the_search_in_the_physical_shape_keeps_the_original_budget():
    shape = make_shape(TINY_MODEL, num_layers=3, num_heads=8, num_kv_heads=4, head_dim=8, intermediate_size=128)
    generator = torch.Generator().manual_seed(0)
    scores = {"head": torch.rand(3, 8, generator=generator), "neuron": torch.rand(3, 128, generator=generator),
              "hidden": torch.rand(64, generator=generator)}
    target = search_masks(shape, scores, 0.6, round_to=8, min_hidden=8)
    plan = plan_compaction(*dead(target), shape, "kv_group")
    assert total_params(plan.after) < total_params(shape)
    physical_scores = slice_scores(SalienceScores(**scores), plan)
    for rho in (0.45, 0.4, 0.3):
        physical = physical_fraction(rho, shape, plan.after)
        assert physical == pytest.approx(rho * total_params(shape) / total_params(plan.after))
        masks = search_masks(plan.after, physical_scores, physical, round_to=8, min_hidden=8)
        kept = remaining_params(plan.after, kept_sizes(masks))
        assert kept <= rho * total_params(shape) and physical < 1
    assert physical_fraction(0.6, shape, plan.after) == 1.0  # the target of the compaction already fits
