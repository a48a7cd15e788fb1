"""Plain helpers the unit tests import (fixtures live in conftest.py): shapes, shared cases, adapters, logits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.apt.adapters import inject_adapters, named_adapters
from pipeline.apt.blocks import ModelShape

GQA = ModelShape(vocab_size=32, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=48, tie_word_embeddings=False, qkv_bias=False)
"""Two layers of 4 query heads in 2 KV groups, untied, no biases."""

TINY_MODEL = dataclasses.replace(GQA, vocab_size=128, intermediate_size=96)
"""The shape of conftest's `build_tiny_model()` at its defaults."""

LLAMA2_7B = ModelShape(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                       head_dim=128, intermediate_size=11008, tie_word_embeddings=False, qkv_bias=False)
"""LLaMA-2-7B as published (multi-head attention)."""

LLAMA_MISTRAL_CASES = [
    pytest.param("llama", 4, False, "kv_group", id="llama-mha"),
    pytest.param("llama", 4, True, "kv_group", id="llama-mha-tied"),
    pytest.param("llama", 2, False, "kv_group", id="llama-gqa-kv_group"),
    pytest.param("llama", 2, True, "query_in_group", id="llama-gqa-query_in_group-tied"),
    pytest.param("mistral", 2, False, "query_in_group", id="mistral-gqa-query_in_group"),
]
"""(arch, num_kv_heads, tie, attention_mode) cases of LLaMA and Mistral that slicing and compaction both run."""


def make_shape(base: ModelShape = GQA, **sizes) -> ModelShape:
    """`base` with some sizes (or flags) changed."""
    return dataclasses.replace(base, **sizes)


def config_sizes(shape: ModelShape) -> dict:
    """`shape`'s sizes under the names a transformers config takes (biases aside)."""
    return dict(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                tie_word_embeddings=shape.tie_word_embeddings)


def train_like(model, seed: int = 0):
    """Give every adapter a nonzero B, as training would; returns the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in named_adapters(model):
            adapter.lora_B.copy_(0.1 * torch.randn(adapter.lora_B.shape, generator=generator))
    return model


def with_trained_adapters(model, targets, seed: int = 0):
    """`model` with rank-4 adapters on `targets` (A drawn from `seed`) and trained-like B (from `seed + 1`)."""
    inject_adapters(model, targets=targets, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(seed))
    return train_like(model, seed + 1)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits
