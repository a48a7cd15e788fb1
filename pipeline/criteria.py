"""`pruning.criterion`: the block scores every pruning decision ranks by, in the finetune and the salience stage.

`apt`, `taylor` and `activation` come from a salience accumulator's sums (activations and gradients of the batches
it saw); `magnitude` and `random` need no data: they are computed once for the ORIGINAL model, and a compacted
model gets its surviving blocks' scores, so a resumed run ranks exactly as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.apt.blocks import ModelShape
from pipeline.apt.masks import MaskSet
from pipeline.apt.salience import ACTIVATION_CRITERIA, SalienceAccumulator, SalienceScores
from pipeline.apt.weight_scores import magnitude_scores, random_scores, select_alive
from pipeline.export import BaseWeights

RANDOM_SEED_OFFSET = 3_000_017
"""The random criterion's scores have a stream of their own, not the run's initialisation."""


def uses_activations(criterion: str) -> bool:
    """Whether the criterion is scored from a salience accumulator (else from the weights or a seed)."""
    return criterion in ACTIVATION_CRITERIA


def fixed_scores(criterion: str, original_base: Path, original: ModelShape, seed: int) -> SalienceScores | None:
    """The data-free criteria's scores of the original model (None for the activation criteria).

    magnitude reads the base checkpoint one tensor at a time, so no rank holds the whole model for it."""
    if criterion == "magnitude":
        weights = BaseWeights(original_base)
        return magnitude_scores(original, weights.get, weights.__contains__)
    if criterion == "random":
        return random_scores(original, seed + RANDOM_SEED_OFFSET)
    return None


def block_scores(criterion: str, accumulator: SalienceAccumulator, fixed: SalienceScores | None,
                 alive: MaskSet | None) -> SalienceScores:
    """The current model's block scores: from the accumulator's sums, or the fixed scores of its surviving blocks."""
    if fixed is not None:
        return select_alive(fixed, alive)
    return accumulator.scores(criterion)
