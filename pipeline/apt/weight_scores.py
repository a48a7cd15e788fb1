"""Block scores that need no activations: weight magnitude and random, in the `SalienceScores` layout.

The `magnitude` and `random` criteria (docs/design.md §3) score the ORIGINAL model's blocks once; a compacted
model's scores are those of its surviving blocks (`select_alive`), so a resumed run scores exactly as an
uninterrupted one. Weights are read one tensor at a time by name (`weight(name)`), from a checkpoint on disk or a
model's `named_parameters`, so no rank holds the whole model for this.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.apt.blocks import ModelShape, params_per_hidden_channel, params_per_neuron, params_per_query_head
from pipeline.apt.masks import MaskSet, empty_layers
from pipeline.apt.salience import SalienceScores

WeightReader = Callable[[str], torch.Tensor]
"""A HF parameter name (`model.layers.0.mlp.up_proj.weight`) -> that tensor."""


def block_scores(shape: ModelShape, weight: WeightReader, score: Callable[[torch.Tensor], torch.Tensor],
                 has_weight: Callable[[str], bool] = lambda name: True) -> SalienceScores:
    """Sum an element-wise `score` of every weight (and bias) of a LLaMA-family model into its blocks.

    A query head owns its q rows (and bias) and o columns, and 1/g of its KV group's k and v rows, so a group's heads
    sum to the whole group; a neuron its gate and up rows and down column; a hidden channel its embedding and lm_head
    columns, its RMSNorm weights, its row or column of every projection and its o_proj bias entry.
    """
    layers, heads, kv_heads, head_dim = shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim
    head = torch.zeros(layers, heads, dtype=torch.float64)
    neuron = torch.zeros(layers, shape.intermediate_size, dtype=torch.float64)
    hidden = torch.zeros(shape.hidden_size, dtype=torch.float64)

    def scored(name: str) -> torch.Tensor:
        return score(weight(name).detach().float()).to(torch.float64)

    for index in range(layers):
        prefix = f"model.layers.{index}."
        q, k, v, o = (scored(f"{prefix}self_attn.{n}_proj.weight") for n in "qkvo")
        kv_group = (k + v).view(kv_heads, head_dim, -1).sum(dim=(1, 2))
        head[index] = q.view(heads, head_dim, -1).sum(dim=(1, 2)) + o.view(-1, heads, head_dim).sum(dim=(0, 2))
        if shape.qkv_bias:
            head[index] += scored(f"{prefix}self_attn.q_proj.bias").view(heads, head_dim).sum(1)
            kv_group += (scored(f"{prefix}self_attn.k_proj.bias")
                         + scored(f"{prefix}self_attn.v_proj.bias")).view(kv_heads, head_dim).sum(1)
        head[index] += kv_group.repeat_interleave(shape.group_size) / shape.group_size
        gate, up, down = (scored(f"{prefix}mlp.{n}_proj.weight") for n in ("gate", "up", "down"))
        neuron[index] = gate.sum(1) + up.sum(1) + down.sum(0)
        hidden += q.sum(0) + k.sum(0) + v.sum(0) + gate.sum(0) + up.sum(0) + o.sum(1) + down.sum(1)
        hidden += scored(f"{prefix}input_layernorm.weight") + scored(f"{prefix}post_attention_layernorm.weight")
        if shape.o_proj_bias:
            hidden += scored(f"{prefix}self_attn.o_proj.bias")
    hidden += scored("model.embed_tokens.weight").sum(0) + scored("model.norm.weight")
    if not shape.tie_word_embeddings and has_weight("lm_head.weight"):
        hidden += scored("lm_head.weight").sum(0)
    return SalienceScores(head=head, neuron=neuron, hidden=hidden)


def magnitude_scores(shape: ModelShape, weight: WeightReader,
                     has_weight: Callable[[str], bool] = lambda name: True) -> SalienceScores:
    """Σw² per block: the squared L2 norm of the block's weights (additive over its pieces)."""
    return block_scores(shape, weight, torch.square, has_weight)


def random_scores(shape: ModelShape, seed: int) -> SalienceScores:
    """Scores whose density (score / parameters of the block) is uniform on [0, 1), independently per block."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(*size: int) -> torch.Tensor:
        return torch.rand(*size, generator=generator, dtype=torch.float64)

    return SalienceScores(
        head=uniform(shape.num_layers, shape.num_heads) * params_per_query_head(shape),
        neuron=uniform(shape.num_layers, shape.intermediate_size) * params_per_neuron(shape),
        hidden=uniform(shape.hidden_size) * params_per_hidden_channel(shape),
    )


def select_alive(scores: SalienceScores, alive: MaskSet | None) -> SalienceScores:
    """The scores of the blocks a compacted model still has (`alive`: 1 where an original block survives)."""
    if alive is None:
        return scores
    layers = scores.head.shape[0] - len(empty_layers(alive))  # a removed layer has no row left
    return SalienceScores(
        head=scores.head[alive.head_mask.bool()].view(layers, -1),
        neuron=scores.neuron[alive.neuron_mask.bool()].view(layers, -1),
        hidden=scores.hidden[alive.hidden_mask.bool()],
    )
