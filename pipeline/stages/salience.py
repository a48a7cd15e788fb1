"""salience: a calibration pass with the fine-tuned adapters and masks; statistics all-reduced once.

Every rank accumulates the salience sums of its share of `salience.batches` global batches (forward and
backward, no optimizer step); one SUM all-reduce merges them, so every rank holds what one process
would have computed on all the data. Rank 0 writes `salience/salience.safetensors`. With
`pruning.shape_search: measured` (or a `pruning.target_shape`) the final shape is then chosen here, where the model
is, by measured calibration loss; `salience/shape.safetensors` holds its masks and `shape.json` every candidate.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
from transformers import AutoTokenizer

from pipeline import criteria, dist
from pipeline.adapted import build_adapted_engine
from pipeline.apt.adapters import set_masks
from pipeline.apt.blocks import ModelShape
from pipeline.apt.compaction import physical_fraction
from pipeline.calibration import accumulate
from pipeline.config import SalienceConfig
from pipeline.ds_config import load_ds_config
from pipeline.layout import RunLayout, compaction_survivors, finetune_masks
from pipeline.model_io import model_shape
from pipeline.shape_choice import (
    SHAPE_MASKS,
    SHAPE_REPORT,
    candidate_line,
    choose_shape,
    describe,
    final_remaining,
    influence_order,
    search_target,
)
from pipeline.stage import save_tensors, write_atomic
from pipeline.training import BatchOrder, seed_everything

Config = SalienceConfig
CALIBRATION_SEED_OFFSET = 1_000_003
"""Calibration reads batches in another order than fine-tuning did."""

log = dist.get_logger("apt.salience")


def run(cfg: SalienceConfig, run_dir: Path) -> dict:
    dist.init_distributed(cfg.deepspeed.timeout_minutes)
    seed_everything(cfg.run.seed)  # the same calibration whether the fine-tune ran in this process or not
    world_size, rank = dist.world_size(), dist.rank()
    layout = RunLayout(run_dir, cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(str(layout.tokenizer))
    train_split = datasets.load_from_disk(str(layout.dataset / "train")).with_format("torch")
    ds_config = load_ds_config(cfg.deepspeed.config, cfg.train, world_size)

    # Backward only: the optimizer never steps.
    built = build_adapted_engine(cfg, layout, layout.tuned_base, ds_config, len(tokenizer), adapters=layout.adapters,
                                 masks=finetune_masks(layout))
    engine, shape, accumulator = built.engine, built.shape, built.salience

    batches = BatchOrder(len(train_split), cfg.train.micro_batch_size, 1, world_size, rank,
                         cfg.run.seed + CALIBRATION_SEED_OFFSET)
    flat = accumulate(engine, accumulator, [batches.indices(index, 0) for index in range(cfg.salience.batches)],
                      train_split)
    scores = criterion_scores(cfg, layout, accumulator)
    if dist.is_main():
        tensors = {f"sums.{key}": value for key, value in accumulator.state_dict().items()}
        tensors |= {"scores.head": scores.head, "scores.neuron": scores.neuron, "scores.hidden": scores.hidden,
                    "tokens": flat[-1:]}
        save_tensors(tensors, layout.salience)
    choose_final_shape(cfg, layout, engine, shape, scores, lambda index: train_split[batches.indices(index, 0)])
    engine.destroy()
    return {"batches": cfg.salience.batches, "tokens": int(flat[-1].item()), "world_size": world_size}


def criterion_scores(cfg: SalienceConfig, layout: RunLayout, accumulator):
    """The fine-tuned model's block scores by `pruning.criterion` (the data-free ones: its surviving blocks')."""
    criterion = cfg.pruning.criterion
    fixed = criteria.fixed_scores(criterion, layout.base_model, model_shape(layout.base_model,
                                                                             cfg.model.trust_remote_code),
                                  cfg.run.seed)
    return criteria.block_scores(criterion, accumulator, fixed, compaction_survivors(layout))


def choose_final_shape(cfg: SalienceConfig, layout: RunLayout, engine, shape: ModelShape, scores, batch_at) -> None:
    """The final masks by measured loss (docs/design.md §4), written next to the salience for finalize.

    Only with `pruning.shape_search: measured` (or a `pruning.target_shape`). The candidates keep what the fine-tune
    kept at most (its pruned blocks stay pruned); each is scored on the `pruning.shape_batches` global batches that
    follow the salience batches in the calibration order, which the salience sums did not see. Collective.
    """
    pruning = cfg.pruning
    if pruning.shape_search == "global" and pruning.target_shape is None:
        return
    original = model_shape(layout.base_model, cfg.model.trust_remote_code)
    budget = physical_fraction(final_remaining(pruning, original), original, shape)
    trained = finetune_masks(layout)
    held_out = [batch_at(cfg.salience.batches + index) for index in range(pruning.shape_batches)]

    def measure(candidates):
        return choose_shape(engine, candidates, held_out, lambda masks: set_masks(engine.module, masks),
                            restore=trained)

    sublayers = pruning.depth_unit == "sublayer"
    order = influence_order(engine, held_out, sublayers) if pruning.cuts_layers else None  # on the trained masks
    # The search runs on the CPU, beside the fine-tune's masks; the scores come from the device.
    masks, shapes, choice = search_target(shape, scores.to("cpu"), budget, pruning, measure=measure, alive=trained,
                                          layer_order=order, original_layers=original.num_layers)
    rows = describe(shape, shapes, choice)
    if dist.is_main():
        folder = layout.salience.parent
        save_tensors(masks.to_dict(), folder / SHAPE_MASKS)
        write_atomic(folder / SHAPE_REPORT, json.dumps({"remaining_fraction": budget, "candidates": rows}, indent=2))
    for row in rows:
        log.info("shape candidate: %s", candidate_line(row))
