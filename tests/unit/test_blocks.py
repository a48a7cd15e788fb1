"""Exact parameter accounting against the numel of real transformers models."""

import dataclasses

import pytest
import torch
from builders import GQA, LLAMA2_7B, config_sizes, make_shape
from transformers import LlamaConfig, MistralConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM

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
from pipeline.apt.masks import MaskSet

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, LlamaDecoderLayer),
    "mistral": (MistralConfig, MistralForCausalLM, MistralDecoderLayer),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, Qwen2DecoderLayer),
}
MODELS = [
    pytest.param("llama", dict(num_key_value_heads=4), id="llama-mha-untied"),
    pytest.param("llama", dict(tie_word_embeddings=True), id="llama-gqa-tied"),
    pytest.param("llama", dict(attention_bias=True), id="llama-gqa-bias"),
    pytest.param("mistral", dict(), id="mistral-gqa-untied"),
    pytest.param("qwen2", dict(), id="qwen2-gqa-untied"),
    pytest.param("qwen2", dict(tie_word_embeddings=True), id="qwen2-gqa-tied"),
]


def tiny_config(arch: str, **overrides):
    """A config of `arch` with the sizes of `GQA`, `overrides` in transformers' names."""
    return ARCHITECTURES[arch][0](**(config_sizes(GQA) | overrides))


def numel(model: torch.nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


@pytest.mark.parametrize("arch, overrides", MODELS)
def test_total_params_equals_numel_of_the_model(arch, overrides):
    config = tiny_config(arch, **overrides)
    assert total_params(ModelShape.from_config(config)) == numel(ARCHITECTURES[arch][1](config))


@pytest.mark.parametrize("arch, overrides", MODELS)
def test_remaining_params_equals_numel_of_a_model_pruned_per_layer(arch, overrides):
    """Each layer rebuilt at its own kept sizes, hidden pruned everywhere: the formula counts exactly that."""
    kept = KeptSizes(hidden=48, heads=(4, 2), kv_heads=(2, 1), neurons=(40, 16))
    if overrides.get("num_key_value_heads") == 4:
        kept = dataclasses.replace(kept, kv_heads=(4, 2))
    config_class, model_class, layer_class = ARCHITECTURES[arch]
    pruned = model_class(tiny_config(arch, **overrides, hidden_size=kept.hidden))
    for index in range(2):
        layer_sizes = dict(
            hidden_size=kept.hidden,
            num_attention_heads=kept.heads[index],
            num_key_value_heads=kept.kv_heads[index],
            intermediate_size=kept.neurons[index],
        )
        layer_config = tiny_config(arch, **(overrides | layer_sizes))
        pruned.model.layers[index] = layer_class(layer_config, layer_idx=index)
    assert remaining_params(ModelShape.from_config(tiny_config(arch, **overrides)), kept) == numel(pruned)


def test_from_config_reads_biases_per_architecture():
    llama = ModelShape.from_config(tiny_config("llama", attention_bias=True))
    qwen2 = ModelShape.from_config(tiny_config("qwen2"))
    mistral = ModelShape.from_config(tiny_config("mistral"))
    assert (llama.qkv_bias, llama.o_proj_bias) == (True, True)
    assert (qwen2.qkv_bias, qwen2.o_proj_bias) == (True, False)
    assert (mistral.qkv_bias, mistral.o_proj_bias) == (False, False)
    assert (qwen2.group_size, qwen2.head_dim, qwen2.num_kv_heads) == (2, 16, 2)


@pytest.mark.parametrize("arch, overrides", MODELS)
def test_params_per_unit_are_what_removing_one_unit_saves(arch, overrides):
    shape = ModelShape.from_config(tiny_config(arch, **overrides))
    full = KeptSizes.full(shape)

    def saved_by_removing(hidden=0, heads=0, kv_heads=0, neurons=0):
        """Parameters saved by removing that many units (from layer 0 for per-layer units)."""
        fewer = KeptSizes(
            hidden=full.hidden - hidden,
            heads=(full.heads[0] - heads,) + full.heads[1:],
            kv_heads=(full.kv_heads[0] - kv_heads,) + full.kv_heads[1:],
            neurons=(full.neurons[0] - neurons,) + full.neurons[1:],
        )
        return total_params(shape) - remaining_params(shape, fewer)

    assert params_per_group(shape) == saved_by_removing(heads=shape.group_size, kv_heads=1)
    assert params_per_query_head(shape) == saved_by_removing(heads=1)
    assert params_per_neuron(shape) == saved_by_removing(neurons=1)
    assert params_per_hidden_channel(shape) == saved_by_removing(hidden=1)


def test_params_per_hidden_channel_matches_the_design_table():
    shape = make_shape(LLAMA2_7B, num_kv_heads=8)
    per_layer = 128 * (2 * 32 + 2 * 8) + 3 * 11008
    assert params_per_hidden_channel(shape) == 2 * 32000 + 2 * 32 + 1 + 32 * per_layer
    assert params_per_group(shape) == 4 * 2 * 4096 * 128 + 2 * 4096 * 128


def test_kept_sizes_counts_entries_still_present():
    shape = ModelShape.from_config(tiny_config("llama"))
    masks = MaskSet.ones(shape)
    masks.head_mask[1, 2:] = 0
    masks.kv_mask[1, 1] = 0
    masks.neuron_mask[0, :8] = 0
    masks.neuron_mask[0, 8] = 0.5  # a gradual mask still on its way down: the block is still there
    masks.hidden_mask[:16] = 0
    assert kept_sizes(masks) == KeptSizes(hidden=48, heads=(4, 2), kv_heads=(2, 1), neurons=(40, 48))


def test_remaining_params_refuses_sizes_for_the_wrong_layer_count():
    shape = ModelShape.from_config(tiny_config("llama"))
    with pytest.raises(ValueError, match="kept.neurons"):
        remaining_params(shape, dataclasses.replace(KeptSizes.full(shape), neurons=(48,)))
