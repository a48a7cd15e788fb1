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

from collections.abc import Iterable

import torch
from torch import nn

from pipeline.apt import weight_scores
from pipeline.apt.adapters import inject_adapters, set_masks
from pipeline.apt.blocks import ModelShape
from pipeline.apt.masks import MaskSet
from pipeline.apt.salience import SalienceScores
from pipeline.apt.search import search_masks
from pipeline.shape_choice import choose_shape, describe, search_target

METHODS = ("magnitude", "random", "taylor")


def named_weights(model: nn.Module):
    """A plain HF model's parameters as the (read, contains) pair `pipeline.apt.weight_scores` takes."""
    params = dict(model.named_parameters())
    return params.__getitem__, params.__contains__


def magnitude_scores(model: nn.Module) -> SalienceScores:
    """Σw² per block (the squared L2 norm of the block's weights): the pipeline's `magnitude` criterion."""
    return weight_scores.magnitude_scores(ModelShape.from_config(model.config), *named_weights(model))


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
    named = dict(model.named_parameters())
    scores = weight_scores.block_scores(ModelShape.from_config(model.config),
                                        lambda name: named[name].detach() * named[name].grad, torch.abs,
                                        named.__contains__)
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
