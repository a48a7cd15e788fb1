"""Tiny LLaMA-family models and random pruning masks shared by the unit tests."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from pipeline.apt.blocks import ModelShape
from pipeline.apt.masks import MaskSet

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def build_tiny_model(
    arch: str = "llama",
    *,
    num_kv_heads: int = 2,
    tie: bool = False,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    head_dim: int = 16,
    intermediate_size: int = 96,
    vocab_size: int = 128,
    attention_bias: bool = False,
    seed: int = 0,
):
    """A fp32 causal LM in eval mode with every weight random (norms and biases too, so masking them shows)."""
    config_class, model_class = ARCHITECTURES[arch]
    extra = {"attention_bias": attention_bias} if arch == "llama" else {}
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if "norm" in name else 0.1 * noise)
    return model.eval()


def _subset(size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """A {0,1} float vector of length `size` with `count` ones at random places."""
    mask = torch.zeros(size)
    mask[torch.randperm(size, generator=generator)[:count]] = 1
    return mask


def _count(low: int, high: int, generator: torch.Generator) -> int:
    return int(torch.randint(low, high + 1, (), generator=generator))


def _pruned_count(size: int, generator: torch.Generator) -> int:
    """How many of `size` units to keep: at least one, and fewer than all whenever that is possible."""
    return _count(1, max(1, size - 1), generator)


def build_random_masks(
    shape: ModelShape, generator: torch.Generator, *, mode: str = "kv_group", uniform: bool = True
) -> MaskSet:
    """Binary masks that prune some but not all units of each kind in every layer (where there are two or
    more), GQA-consistent for `mode`: `kv_group` drops whole KV groups; `query_in_group` keeps every KV head and
    the same number of query heads in every group. `uniform` keeps the same counts in every layer."""
    layers, num_kv, group = shape.num_layers, shape.num_kv_heads, shape.group_size

    def counts(size: int) -> list[int]:
        if uniform:
            return [_pruned_count(size, generator)] * layers
        return [_pruned_count(size, generator) for _ in range(layers)]

    if mode == "kv_group":
        kv_mask = torch.stack([_subset(num_kv, kept, generator) for kept in counts(num_kv)])
        head_mask = kv_mask.repeat_interleave(group, dim=1)
    else:
        kv_mask = torch.ones(layers, num_kv)
        head_mask = torch.stack(
            [torch.cat([_subset(group, kept, generator) for _ in range(num_kv)]) for kept in counts(group)]
        )
    neurons = shape.intermediate_size
    neuron_mask = torch.stack([_subset(neurons, kept, generator) for kept in counts(neurons)])
    hidden_mask = _subset(shape.hidden_size, _pruned_count(shape.hidden_size, generator), generator)
    return MaskSet(head_mask=head_mask, kv_mask=kv_mask, neuron_mask=neuron_mask, hidden_mask=hidden_mask)


@pytest.fixture(scope="session")
def tiny_model():
    """`build_tiny_model` (a factory, so each test picks the architecture)."""
    return build_tiny_model


@pytest.fixture
def random_masks():
    """`build_random_masks` (a factory)."""
    return build_random_masks


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
