"""Pruning updates inside the window: one all-reduce of every rank's salience, EMA, the target search.

Every rank ends an update with the same EMA and the same target masks; a checksum of each rank's masks travels in
the same all-reduce, so ranks that have diverged fail the step instead of pruning different blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline import criteria, dist
from pipeline.apt.blocks import ModelShape
from pipeline.apt.masks import MaskSet
from pipeline.apt.salience import SalienceAccumulator, SalienceScores, ema_update
from pipeline.apt.state import AptState
from pipeline.shape_choice import ShapeChoice, search_target
from pipeline.stage import save_tensors


def in_update_window(step: int, pruning) -> bool:
    """True on the steps `pruning.update_every` apart inside (start_step, end_step]."""
    return pruning.start_step < step <= pruning.end_step and (step - pruning.start_step) % pruning.update_every == 0


def salience_update(salience: SalienceAccumulator, state: AptState, shape: ModelShape, rho: float, apt, pruning,
                    measure: Callable[[list[MaskSet]], ShapeChoice] | None = None,
                    fixed: SalienceScores | None = None, layer_order: list[int] | None = None,
                    progress: float = 1.0, original_layers: int | None = None):
    """One all-reduce of every rank's sums (none for a data-free criterion) and mask checksum; then EMA and the
    target search, same on all ranks.

    The scores follow `pruning.criterion` (`fixed`: a data-free criterion's scores of the original model). `measure`
    scores candidate shapes by loss (`pipeline.shape_choice.choose_shape`: one more all-reduce) under
    `pruning.shape_search=measured`; `layer_order`, `progress` and `original_layers` are the layer cuts'
    (`search_target`). Sets `state.ema` and `state.target`; returns (candidate shapes, the choice or None) for
    the log."""
    world_size, rank = dist.world_size(), dist.rank()
    packed = salience.pack()  # on the accumulator's device: the ranks' sums never leave it before the reduce
    if fixed is not None:  # a data-free criterion: no sums to reduce (the hooks never ran), the checksum alone
        packed = packed[:0]
    checksums = torch.zeros(world_size, dtype=torch.float64, device=packed.device)
    checksums[rank] = mask_checksum(state.target)
    flat = dist.all_reduce_sum(torch.cat([packed, checksums]))
    if fixed is None:
        salience.load_packed(flat[:-world_size])
    sums = flat[-world_size:].tolist()
    disagree = [r for r in range(world_size) if sums[r] != sums[0]]
    if disagree:
        raise RuntimeError(f"step {state.step}: ranks {disagree} hold other masks than rank 0; "
                           f"the ranks have diverged (non-deterministic search or corrupted state)")
    # The EMA and the masks are the run's small host-side state (checkpointed, searched on the CPU).
    scores = criteria.block_scores(pruning.criterion, salience, fixed, state.alive).to("cpu")
    state.ema = ema_update(state.ema, scores, apt.salience_momentum)
    salience.reset()
    state.target, shapes, choice = search_target(shape, state.ema, rho, pruning, measure=measure,
                                                 layer_order=layer_order, progress=progress,
                                                 original_layers=original_layers)
    return shapes, choice


def save_update(folder: Path, state: AptState) -> None:
    """The all-reduced EMA salience and the new target masks of one update, for inspection and tests."""
    folder.mkdir(exist_ok=True)
    tensors = {f"ema.{k}": v for k, v in asdict(state.ema).items()}
    tensors |= {f"target.{k}": v for k, v in state.target.to_dict().items()}
    save_tensors(tensors, folder / f"step{state.step:06d}.safetensors")


def mask_checksum(masks: MaskSet) -> float:
    """Position-weighted sum of the masks: equal masks give bit-equal checksums."""
    total = 0.0
    for tensor in masks.to_dict().values():
        flat = tensor.detach().double().flatten()
        total += float((flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum())
    return total
