"""Baseline pruners: per-block scores in the `SalienceScores` layout, masks from the pipeline's own search.

Every pruner scores the same blocks APT prunes (query heads, MLP neurons, hidden channels; a KV group's k/v rows
are shared among its query heads). `shape_masks` hands the scores to the pipeline's own shape machinery, as APT's
default (`pruning.shape_search: measured`) does: `pipeline.shape_choice.search_target` proposes per-type candidate
shapes at the exact parameter budget, each type's blocks ranked only within the type, and `choose_shape` keeps the
one with the lowest loss on held-out calibration batches. `prune_masks` is the old single density list
(`search_masks`). So all methods obey the same structural rules (GQA, rounding, loadable shapes), the same budget
and the same search; only the ranking differs.

- magnitude: Σw² over the block's weights. Within a block type this ranks exactly as the L2 norm does; the squared
  norm is additive across a block's pieces, and per parameter it is the mean squared weight, which compares
  blocks of different sizes.
- random: a uniform random density per block (the score is U(0,1) × the block's parameters).
- taylor: first-order Taylor importance in the style of LLM-Pruner: gradients of the causal-LM loss accumulated
  over a few calibration batches, then Σ|w·∂L/∂w| over the block's weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from pipeline.apt.adapters import inject_adapters, set_masks
from pipeline.apt.blocks import ModelShape, params_per_hidden_channel, params_per_neuron, params_per_query_head
from pipeline.apt.masks import MaskSet
from pipeline.apt.salience import SalienceScores
from pipeline.apt.search import search_masks
from pipeline.shape_choice import choose_shape, describe, search_target

METHODS = ("magnitude", "random", "taylor")


def block_scores(model: nn.Module, weight_score: Callable[[nn.Parameter], torch.Tensor]) -> SalienceScores:
    """Sum an element-wise score of every weight of a plain HF LLaMA-family model into its blocks.

    A query head owns its q rows and o columns, and 1/g of its KV group's k and v rows (so a group's heads sum
    to the whole group); a neuron its gate and up rows and down column; a hidden channel its embedding and
    lm_head columns, its RMSNorm weights and its row or column of every projection.
    """
    shape = ModelShape.from_config(model.config)
    if shape.qkv_bias or shape.o_proj_bias:
        raise ValueError("the baselines score weight matrices only; models with attention biases are not handled")
    layers, heads, kv_heads, head_dim = shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim
    head = torch.zeros(layers, heads, dtype=torch.float64)
    neuron = torch.zeros(layers, shape.intermediate_size, dtype=torch.float64)
    hidden = torch.zeros(shape.hidden_size, dtype=torch.float64)

    def score(param: nn.Parameter) -> torch.Tensor:
        return weight_score(param).detach().to(torch.float64)

    for index, layer in enumerate(model.model.layers):
        attention, mlp = layer.self_attn, layer.mlp
        q, k, v, o = (score(getattr(attention, f"{n}_proj").weight) for n in "qkvo")
        gate, up, down = score(mlp.gate_proj.weight), score(mlp.up_proj.weight), score(mlp.down_proj.weight)
        kv_group = (k + v).view(kv_heads, head_dim, -1).sum(dim=(1, 2))
        head[index] = (q.view(heads, head_dim, -1).sum(dim=(1, 2)) + o.view(-1, heads, head_dim).sum(dim=(0, 2))
                       + kv_group.repeat_interleave(shape.group_size) / shape.group_size)
        neuron[index] = gate.sum(1) + up.sum(1) + down.sum(0)
        hidden += q.sum(0) + k.sum(0) + v.sum(0) + gate.sum(0) + up.sum(0) + o.sum(1) + down.sum(1)
        hidden += score(layer.input_layernorm.weight) + score(layer.post_attention_layernorm.weight)
    hidden += score(model.model.embed_tokens.weight).sum(0) + score(model.model.norm.weight)
    if not shape.tie_word_embeddings:
        hidden += score(model.lm_head.weight).sum(0)
    return SalienceScores(head=head, neuron=neuron, hidden=hidden)


def magnitude_scores(model: nn.Module) -> SalienceScores:
    """Σw² per block (the squared L2 norm of the block's weights)."""
    return block_scores(model, lambda param: param.detach().float().square())


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


def taylor_scores(model: nn.Module, batches: Iterable[dict]) -> SalienceScores:
    """Σ|w·∂L/∂w| per block, ∂L/∂w accumulated over the calibration `batches` (dicts of input_ids and labels).

    The model's parameters get gradients for the duration and are left with none; its weights do not change.
    """
    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]
    model.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()  # the causal-LM loss as at inference (no dropout), as LLM-Pruner takes it
    for batch in batches:
        model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
    scores = block_scores(model, lambda param: (param.detach() * param.grad).abs())
    model.zero_grad(set_to_none=True)
    for param, flag in zip(params, trainable, strict=True):
        param.requires_grad_(flag)
    model.train(was_training)
    return scores


def prune_masks(shape: ModelShape, scores: SalienceScores, remaining: float, pruning) -> MaskSet:
    """Binary masks from the pipeline's budget search, with the run's pruning section (mode, layout, rounding)."""
    return search_masks(shape, scores, remaining, attention_mode=pruning.attention_mode, layout=pruning.layout,
                        round_to=pruning.round_to, min_hidden=pruning.min_hidden)


def shape_masks(model: nn.Module, scores: SalienceScores, remaining: float, pruning,
                batches: list[dict]) -> tuple[MaskSet, list[dict]]:
    """Binary masks by `pruning.shape_search` (measured: the candidate with the lowest loss on `batches`).

    `model` is a plain dense HF model; it gets zero-initialised adapters (its function unchanged) and masks, so
    pass a copy you do not need afterwards. Returns the masks and one row per candidate (`describe`).
    """
    shape = ModelShape.from_config(model.config)
    inject_adapters(model, targets=("q_proj",), rank=1, alpha=1.0)  # B = 0: only the mask store matters

    def measure(candidates: list[MaskSet]):
        return choose_shape(model, candidates, batches, lambda masks: set_masks(model, masks))

    masks, shapes, choice = search_target(shape, scores, remaining, pruning, measure=measure)
    return masks, describe(shape, shapes, choice)
