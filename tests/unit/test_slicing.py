"""Physical slicing equals masking, keeps GQA loadable, and matches the exact parameter count."""

import copy

import pytest
import torch
from builders import LLAMA_MISTRAL_CASES, logits, train_like

from pipeline.apt.adapters import inject_adapters, merge_adapters, set_masks
from pipeline.apt.blocks import ModelShape, kept_sizes, remaining_params
from pipeline.apt.masks import MaskSet, empty_layers
from pipeline.apt.slicing import layer_slices, per_layer_config, plan_layer, slice_model

CASES = [
    *LLAMA_MISTRAL_CASES,
    pytest.param("qwen2", 2, False, "kv_group", id="qwen2-gqa-kv_group"),
    pytest.param("qwen2", 1, True, "query_in_group", id="qwen2-mqa-query_in_group-tied"),
]


def masked_model(model, masks, seed=0):
    """The APT-wrapped model with trained-like adapters and `masks` set."""
    inject_adapters(model, targets=["q_proj", "v_proj", "up_proj", "down_proj"], rank=4, alpha=8.0)
    set_masks(train_like(model, seed), masks)
    return model


@pytest.mark.parametrize(("arch", "num_kv", "tie", "mode"), CASES)
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "per_layer"])
def test_sliced_model_computes_what_the_masked_model_computes(
    tiny_model, random_masks, input_ids, arch, num_kv, tie, mode, uniform
):
    model = tiny_model(arch, num_kv_heads=num_kv, tie=tie, num_layers=3)
    masks = random_masks(
        ModelShape.from_config(model.config), torch.Generator().manual_seed(7), mode=mode, uniform=uniform
    )
    model = masked_model(model, masks)
    expected = logits(model, input_ids)

    sliced = slice_model(merge_adapters(model), masks)
    torch.testing.assert_close(logits(sliced, input_ids), expected, rtol=0, atol=1e-5)
    kept = kept_sizes(masks)
    assert sliced.config.hidden_size == kept.hidden and sliced.config.head_dim == 16
    assert (sliced.lm_head.weight is sliced.model.embed_tokens.weight) == tie
    assert sliced.model.layers[0].self_attn.num_key_value_groups == kept.heads[0] // kept.kv_heads[0]
    sizes = [
        {"num_attention_heads": h, "num_key_value_heads": kv, "intermediate_size": f}
        for h, kv, f in zip(kept.heads, kept.kv_heads, kept.neurons, strict=True)
    ]
    overrides = {i: {k: v for k, v in layer.items() if v != sizes[0][k]} for i, layer in enumerate(sizes)}
    assert per_layer_config(sliced) == {i: layer for i, layer in overrides.items() if layer}


def test_per_layer_config_lists_layers_that_differ_from_the_config(tiny_model):
    model = tiny_model(num_kv_heads=2, num_layers=3)
    masks = MaskSet.ones(ModelShape.from_config(model.config))
    masks.kv_mask[1, 0] = 0
    masks.head_mask[1, :2] = 0
    masks.neuron_mask[2, 5:] = 0
    sliced = slice_model(model, masks)
    assert (sliced.config.num_attention_heads, sliced.config.intermediate_size) == (4, 96)  # layer 0's sizes
    assert per_layer_config(sliced) == {
        1: {"num_attention_heads": 2, "num_key_value_heads": 1},
        2: {"intermediate_size": 5},
    }


def test_uniform_slice_saves_and_loads_with_plain_transformers(tiny_model, input_ids, tmp_path):
    model = tiny_model("llama", num_kv_heads=2)
    masks = MaskSet.ones(ModelShape.from_config(model.config))
    masks.head_mask[:, [1, 3]] = 0  # query_in_group: one query head left in each of the 2 groups
    masks.neuron_mask[:, ::3] = 0
    masks.hidden_mask[::4] = 0  # 48 channels: a multiple of the 2 kept heads, as the loader requires
    sliced = slice_model(model, masks)
    expected = logits(sliced, input_ids)
    sliced.save_pretrained(tmp_path)
    reloaded = type(sliced).from_pretrained(tmp_path).eval()
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads) == (2, 2)
    torch.testing.assert_close(logits(reloaded, input_ids), expected, rtol=0, atol=0)


def remove_layer(masks: MaskSet, layer: int) -> MaskSet:
    """`masks` with every head, KV head and neuron of one layer at zero: the layer adds nothing."""
    for row in (masks.head_mask, masks.kv_mask, masks.neuron_mask):
        row[layer] = 0
    return masks


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_a_layer_masked_whole_leaves_the_export_which_loads_and_decodes_in_plain_transformers(
    tiny_model, input_ids, tmp_path, arch
):
    model = tiny_model(arch, num_kv_heads=2, num_layers=3)
    masks = remove_layer(MaskSet.ones(ModelShape.from_config(model.config)), 1)
    masks.neuron_mask[:, ::4] = 0
    model = masked_model(model, masks)
    expected = logits(model, input_ids)
    assert empty_layers(masks) == [1]

    sliced = slice_model(merge_adapters(model), masks)
    torch.testing.assert_close(logits(sliced, input_ids), expected, rtol=0, atol=1e-5)
    assert [layer.self_attn.layer_idx for layer in sliced.model.layers] == [0, 1]
    sliced.save_pretrained(tmp_path)
    reloaded = type(sliced).from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    if arch == "qwen2":  # sliding or full attention, per layer
        assert len(reloaded.config.layer_types) == 2
    torch.testing.assert_close(logits(reloaded, input_ids), expected, rtol=0, atol=1e-5)
    with torch.no_grad():  # the KV cache indexes the renumbered layers
        past = reloaded(input_ids[:, :-1], use_cache=True).cache
        last = reloaded(input_ids[:, -1:], cache=past, use_cache=True).logits[:, -1]
    torch.testing.assert_close(last, expected[:, -1], rtol=0, atol=1e-4)


def test_whole_layers_leave_only_a_merged_model_without_sublayer_biases(tiny_model):
    model = tiny_model(num_kv_heads=2, num_layers=3)
    shape = ModelShape.from_config(model.config)
    with pytest.raises(ValueError, match="merge the adapters first"):
        slice_model(masked_model(model, MaskSet.ones(shape)), remove_layer(MaskSet.ones(shape), 0))
    biased = tiny_model("llama", num_kv_heads=2, num_layers=3)
    biased.model.layers[2].self_attn.o_proj.bias = torch.nn.Parameter(torch.ones(biased.config.hidden_size))
    with pytest.raises(ValueError, match="layer 2 .* bias"):
        slice_model(biased, remove_layer(MaskSet.ones(ModelShape.from_config(biased.config)), 2))
    assert len(biased.model.layers) == 3  # refused before anything changed
    with pytest.raises(ValueError, match="keep no layer"):
        every = MaskSet.ones(ModelShape.from_config(biased.config))
        slice_model(biased, remove_layer(remove_layer(remove_layer(every, 0), 1), 2))


def test_compacting_a_wrapped_model_keeps_its_output_and_fractional_masks(tiny_model, random_masks, input_ids):
    model = tiny_model("qwen2", num_kv_heads=2, tie=True)
    shape = ModelShape.from_config(model.config)
    kept = random_masks(shape, torch.Generator().manual_seed(11), mode="kv_group")
    gradual = MaskSet(**{k: v * (0.5 + 0.5 * torch.rand(v.shape)) for k, v in kept.to_dict().items()})
    model = masked_model(model, gradual)
    expected = logits(model, input_ids)

    compacted = slice_model(model, kept)
    torch.testing.assert_close(logits(compacted, input_ids), expected, rtol=0, atol=1e-5)
    assert compacted.apt_masks.hidden_mask.shape == (kept_sizes(kept).hidden,)
    assert torch.equal(compacted.apt_masks.hidden_mask, gradual.hidden_mask[kept.hidden_mask.bool()])
    merged = slice_model(merge_adapters(compacted), MaskSet.ones(ModelShape.from_config(compacted.config)))
    assert merged.config.hidden_size == kept_sizes(kept).hidden


def test_compacting_a_wrapped_model_needs_the_same_counts_in_every_layer(tiny_model):
    model = tiny_model(num_layers=2)
    masks = MaskSet.ones(ModelShape.from_config(model.config))
    model = masked_model(model, masks)
    masks.neuron_mask[0, 0] = 0
    with pytest.raises(ValueError, match="rectangular"):
        slice_model(model, masks)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.head_mask.__setitem__((0, 0), 0.5), "not binary"),
        (lambda m: m.kv_mask.__setitem__((0, 0), 0), "KV head is pruned"),
        (lambda m: m.head_mask.__setitem__((1, 0), 0), "same number in every group"),
        (lambda m: m.neuron_mask.__setitem__(1, 0), "no query head or no neuron"),
        # A cut attention is the per-layer export's alone: a sliced model keeps the family's own layers.
        (lambda m: (m.head_mask.__setitem__(1, 0), m.kv_mask.__setitem__(1, 0)), "no query head or no neuron"),
    ],
)
def test_inconsistent_masks_are_refused_before_anything_changes(tiny_model, edit, message):
    model = tiny_model(num_kv_heads=2)
    reference = copy.deepcopy(model)
    masks = MaskSet.ones(ModelShape.from_config(model.config))
    edit(masks)
    with pytest.raises(ValueError, match=message):
        slice_model(model, masks)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    )


def test_remaining_params_equals_the_size_of_the_sliced_model(tiny_model, random_masks):
    generator = torch.Generator().manual_seed(2024)
    for trial in range(24):
        arch = ("llama", "qwen2", "mistral")[trial % 3]
        num_heads = (2, 4, 6)[int(torch.randint(3, (), generator=generator))]
        kv_choices = [kv for kv in range(1, num_heads + 1) if num_heads % kv == 0]
        num_kv = kv_choices[int(torch.randint(len(kv_choices), (), generator=generator))]
        model = tiny_model(
            arch,
            num_kv_heads=num_kv,
            num_heads=num_heads,
            head_dim=8,
            hidden_size=24 + 8 * (trial % 3),
            intermediate_size=20 + trial,
            num_layers=1 + trial % 3,
            vocab_size=50,
            tie=bool(trial % 2),
            attention_bias=arch == "llama" and trial % 4 == 0,
            seed=trial,
        )
        shape = ModelShape.from_config(model.config)
        mode = "kv_group" if trial % 2 else "query_in_group"
        masks = random_masks(shape, generator, mode=mode, uniform=False)
        sliced = slice_model(model, masks)
        assert remaining_params(shape, kept_sizes(masks)) == sum(p.numel() for p in sliced.parameters()), trial


def test_only_the_export_plans_a_layer_without_attention_or_without_mlp():
    ones, zeros, hidden = torch.ones, torch.zeros, torch.arange(8)
    no_attention = plan_layer(0, zeros(4), zeros(2), ones(6), sublayers_may_go=True)
    assert no_attention.sizes() == {"num_attention_heads": 0, "num_key_value_heads": 0, "intermediate_size": 6}
    assert set(layer_slices(no_attention, hidden, 16)) == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                                                           "post_attention_layernorm"}
    no_mlp = plan_layer(0, ones(4), ones(2), zeros(6), sublayers_may_go=True)
    assert no_mlp.has_attention and not no_mlp.has_mlp
    assert set(layer_slices(no_mlp, hidden, 16)) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "self_attn.o_proj", "input_layernorm"}
    for rows in ((zeros(4), zeros(2), ones(6)), (ones(4), ones(2), zeros(6))):
        with pytest.raises(ValueError, match="no query head or no neuron"):
            plan_layer(0, *rows)
    with pytest.raises(ValueError, match="keeps KV heads \\[1\\] but no query head"):
        plan_layer(3, zeros(4), torch.tensor([0.0, 1.0]), ones(6), sublayers_may_go=True)
    with pytest.raises(ValueError, match="no query head and no neuron"):
        plan_layer(3, zeros(4), zeros(2), zeros(6), sublayers_may_go=True)
    with pytest.raises(ValueError, match="KV head is pruned"):
        plan_layer(3, ones(4), torch.tensor([0.0, 1.0]), zeros(6), sublayers_may_go=True)
