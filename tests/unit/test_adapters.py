"""Masked APT adapters: exact identity at init, rank growth, merge, masks in one place."""

import copy

import pytest
import torch
from builders import logits, train_like
from torch import nn

from pipeline.apt.adapters import (
    APTLinear,
    ChannelMask,
    MaskedEmbedding,
    MaskedRMSNorm,
    adapter_salience,
    get_masks,
    grow_rank,
    inject_adapters,
    merge_adapters,
    named_adapters,
    set_masks,
)
from pipeline.apt.blocks import ModelShape
from pipeline.apt.masks import MaskSet

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
MODELS = [
    pytest.param("llama", 4, False, id="llama-mha"),
    pytest.param("llama", 2, True, id="llama-gqa-tied"),
    pytest.param("mistral", 2, False, id="mistral-gqa"),
    pytest.param("qwen2", 2, False, id="qwen2-gqa"),
]


def wrapped(model, *, rank=4, targets=TARGETS, seed=0):
    return inject_adapters(model, targets=targets, rank=rank, alpha=8.0, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("arch", "num_kv", "tie"), MODELS)
def test_fresh_adapters_with_full_masks_reproduce_the_plain_model_exactly(tiny_model, input_ids, arch, num_kv, tie):
    plain = tiny_model(arch, num_kv_heads=num_kv, tie=tie)
    model = wrapped(copy.deepcopy(plain))
    assert torch.equal(logits(model, input_ids), logits(plain, input_ids))


def test_every_projection_is_wrapped_and_only_adapters_train(tiny_model):
    model = wrapped(tiny_model())
    layer = model.model.layers[0]
    projections = [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    projections += [getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    assert all(isinstance(p, APTLinear) for p in projections)
    assert [p.rank for p in projections] == [4, 0, 4, 0, 0, 4, 4]
    assert isinstance(layer.input_layernorm, MaskedRMSNorm) and isinstance(model.model.norm, MaskedRMSNorm)
    assert isinstance(model.model.embed_tokens, MaskedEmbedding)
    assert not any(m.training for m in model.modules())  # the plain model was in eval mode; new modules follow
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for name in trainable)
    # The masks live once, on the model; the wrappers only reference them.
    assert {name for name, _ in model.named_buffers() if "mask" in name} == {
        "apt_masks.head_mask",
        "apt_masks.kv_mask",
        "apt_masks.neuron_mask",
        "apt_masks.hidden_mask",
    }
    with pytest.raises(ValueError, match="unknown adapter targets"):
        inject_adapters(tiny_model(), targets=["qkv"], rank=2, alpha=2.0)


def test_growing_rank_leaves_the_output_unchanged(tiny_model, input_ids):
    model = wrapped(tiny_model())
    train_like(model)
    before = logits(model, input_ids)
    name, adapter = next(named_adapters(model))
    scaling = adapter.scaling
    growth = grow_rank(adapter, 3, generator=torch.Generator().manual_seed(5))
    for _, other in list(named_adapters(model))[1:]:
        grow_rank(other, 2)
    torch.testing.assert_close(logits(model, input_ids), before, rtol=0, atol=1e-6)
    assert adapter.rank == 7 and adapter.scaling == scaling
    assert growth.old_rank == 4 and growth.new_A is adapter.lora_A and growth.new_B is adapter.lora_B
    assert torch.equal(growth.new_A[:4], growth.old_A) and torch.equal(growth.new_B[:, :4], growth.old_B)
    assert growth.new_A[4:].abs().sum() > 0 and growth.new_B[:, 4:].abs().sum() == 0
    assert growth.new_A.requires_grad and growth.new_B.requires_grad


@pytest.mark.parametrize(("arch", "num_kv", "tie"), MODELS)
def test_merge_gives_a_plain_model_with_the_same_logits(tiny_model, input_ids, arch, num_kv, tie):
    model = wrapped(tiny_model(arch, num_kv_heads=num_kv, tie=tie))
    train_like(model)
    expected = logits(model, input_ids)
    plain_norm_class = type(tiny_model(arch).model.norm)
    merged = merge_adapters(model)
    modules = list(merged.modules())
    assert not any(isinstance(m, (APTLinear, ChannelMask, MaskedRMSNorm, MaskedEmbedding)) for m in modules)
    assert type(merged.model.embed_tokens) is nn.Embedding and type(merged.model.norm) is plain_norm_class
    assert not hasattr(merged, "apt_masks")
    assert not any(m.training for m in modules)
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tie
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=0, atol=1e-5)


def test_gradual_masks_give_finite_outputs_and_gradients(tiny_model, input_ids):
    model = wrapped(tiny_model())
    train_like(model)
    shape = ModelShape.from_config(model.config)
    generator = torch.Generator().manual_seed(3)
    masks = MaskSet(**{k: torch.rand(v.shape, generator=generator) for k, v in MaskSet.ones(shape).to_dict().items()})
    set_masks(model, masks)
    out = model(input_ids, labels=input_ids)
    out.loss.backward()
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(a.lora_A.grad).all() and a.lora_A.grad.abs().sum() > 0 for _, a in named_adapters(model))
    assert not torch.allclose(out.logits, wrapped(tiny_model())(input_ids).logits)


def test_set_and_get_masks_round_trip_and_check_shapes(tiny_model):
    model = wrapped(tiny_model())
    shape = ModelShape.from_config(model.config)
    masks = MaskSet.ones(shape)
    masks.neuron_mask[1, :10] = 0.25
    set_masks(model, masks)
    got = get_masks(model)
    assert all(torch.equal(getattr(got, k), v) for k, v in masks.to_dict().items())
    got.hidden_mask.zero_()  # a copy: the model's masks stay as they were
    assert model.apt_masks.hidden_mask.sum() == shape.hidden_size
    masks.hidden_mask = torch.ones(shape.hidden_size - 1)
    with pytest.raises(ValueError, match="hidden_mask has shape"):
        set_masks(model, masks)


def test_adapter_salience_is_sum_of_abs_weight_times_grad(tiny_model, input_ids):
    model = wrapped(tiny_model())
    train_like(model)
    _, adapter = next(named_adapters(model))
    assert adapter_salience(adapter) == 0  # no gradient yet
    model(input_ids, labels=input_ids).loss.backward()
    expected = (adapter.lora_A * adapter.lora_A.grad).abs().sum() + (adapter.lora_B * adapter.lora_B.grad).abs().sum()
    torch.testing.assert_close(adapter_salience(adapter), expected.detach())
    assert adapter_salience(adapter) > 0


def test_masks_stay_float32_and_exact_when_the_model_is_cast(tiny_model, input_ids):
    model = wrapped(tiny_model())
    masks = MaskSet.ones(ModelShape.from_config(model.config))
    masks.neuron_mask[0, :7] = 0.99
    set_masks(model, masks)
    model.to(torch.bfloat16)
    assert (
        model.apt_masks.neuron_mask.dtype == torch.float32
        and model.apt_masks.neuron_mask[0, 0] == masks.neuron_mask[0, 0]
    )
    assert model.model.layers[0].mlp.up_proj.lora_A.dtype == torch.bfloat16
    assert torch.isfinite(logits(model, input_ids)).all()


def test_adapter_dropout_acts_in_training_only(tiny_model, input_ids):
    plain = tiny_model()
    generator = torch.Generator().manual_seed(0)
    model = inject_adapters(copy.deepcopy(plain), targets=TARGETS, rank=4, alpha=8.0, dropout=0.5, generator=generator)
    train_like(model)
    without_dropout = wrapped(copy.deepcopy(plain))
    train_like(without_dropout)
    torch.testing.assert_close(logits(model, input_ids), logits(without_dropout, input_ids), rtol=0, atol=0)
    model.train()
    assert not torch.allclose(logits(model, input_ids), logits(without_dropout, input_ids))
