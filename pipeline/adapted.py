"""The model both distributed stages run: a frozen base with masked adapters and salience hooks, in an engine.

The finetune recipe and the salience stage build it here, the same way: base weights (the original, or the
compacted base a checkpoint or the finetune left), adapters injected at `apt.rank` and grown to the ranks they
reached, masks, a salience accumulator on the device, then the DeepSpeed engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import dist
from pipeline.apt.adapters import inject_adapters, set_masks
from pipeline.apt.blocks import ModelShape
from pipeline.apt.masks import MaskSet
from pipeline.apt.salience import SalienceAccumulator
from pipeline.layout import RunLayout
from pipeline.model_io import load_adapters, load_base_model, original_base, regrow
from pipeline.teacher import DTYPES
from pipeline.training import build_engine


@dataclass
class AdaptedEngine:
    """A DeepSpeed engine over the adapted model, its shape and the salience accumulator its backward feeds."""

    engine: object
    shape: ModelShape
    """The loaded base's shape: smaller than the original once a compaction cut it."""
    salience: SalienceAccumulator


def build_adapted_engine(cfg, layout: RunLayout, base: Path, ds_config: dict, vocab_size: int, *,
                         dropout: float = 0.0, adapter_ranks: dict[str, int] | None = None,
                         adapters: Path | None = None, masks: MaskSet | None = None) -> AdaptedEngine:
    """Base from `base` (the run's original base is built there on a fresh run without `model.path`), adapters
    grown to `adapter_ranks` and/or filled from the `adapters` file, `masks` applied, hooks attached, engine built.

    `cfg` holds the run, model, apt, pruning and train sections; ZeRO-1/2 read the base in the training dtype (DeepSpeed
    would cast it anyway), ZeRO-3 in the dtype it partitions in."""
    apt, dtype = cfg.apt, DTYPES[cfg.train.precision]
    if base == layout.base_model:
        model = original_base(cfg.model, base, vocab_size, ds_config, cfg.run.seed, dtype)
    else:
        model = load_base_model(base, cfg.model, ds_config, dtype)
    inject_adapters(model, targets=apt.adapter_targets, rank=apt.rank, alpha=apt.alpha, dropout=dropout,
                    generator=torch.Generator().manual_seed(cfg.run.seed))
    if adapter_ranks:
        regrow(model, adapter_ranks, cfg.run.seed)
    if adapters is not None:  # grows each adapter to the file's rank (s = alpha / apt.rank kept), then fills it
        load_adapters(model, adapters, max_rank=apt.max_rank_multiplier * apt.rank)
    if masks is not None:
        set_masks(model, masks)
    shape = ModelShape.from_config(model.config)
    # On the device: the hooks add without a copy. The taylor criterion also sums activation x gradient.
    salience = SalienceAccumulator(shape, device=dist.device(), products=cfg.pruning.criterion == "taylor",
                                   after_mask=cfg.pruning.salience_gradient == "after_mask",
                                   outlier=cfg.apt.outlier_term)
    salience.attach(model)
    return AdaptedEngine(build_engine(model, ds_config, cfg.train), shape, salience)
