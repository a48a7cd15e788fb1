"""salience: a calibration pass with the fine-tuned adapters and masks; statistics all-reduced once.

Every rank accumulates the salience sums of its share of `salience.batches` global batches (forward and
backward, no optimizer step); one SUM all-reduce merges them, so every rank holds what one process
would have computed on all the data. Rank 0 writes `salience/salience.safetensors`.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from pipeline import dist
from pipeline.apt.adapters import inject_adapters, set_masks
from pipeline.apt.blocks import ModelShape
from pipeline.apt.salience import SalienceAccumulator
from pipeline.config import SalienceConfig
from pipeline.ds_config import load_ds_config
from pipeline.layout import RunLayout, finetune_masks
from pipeline.model_io import load_adapters, load_base_model
from pipeline.stage import save_tensors
from pipeline.training import BatchOrder, build_engine, loss_scale

Config = SalienceConfig
CALIBRATION_SEED_OFFSET = 1_000_003
"""Calibration reads batches in another order than fine-tuning did."""

log = dist.get_logger("apt.salience")


def run(cfg: SalienceConfig, run_dir: Path) -> dict:
    dist.init_distributed(cfg.deepspeed.timeout_minutes)
    world_size, rank = dist.world_size(), dist.rank()
    layout = RunLayout(run_dir, cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(str(layout.tokenizer))
    train_split = datasets.load_from_disk(str(layout.dataset / "train")).with_format("torch")
    ds_config = load_ds_config(cfg.deepspeed.config, cfg.train, world_size)

    model = load_base_model(cfg.model, len(tokenizer), ds_config, run_dir, cfg.run.seed,
                            directory=layout.tuned_base)
    shape = ModelShape.from_config(model.config)
    inject_adapters(model, targets=cfg.apt.adapter_targets, rank=cfg.apt.rank, alpha=cfg.apt.alpha)
    load_adapters(model, layout.adapters)
    set_masks(model, finetune_masks(layout))
    accumulator = SalienceAccumulator(shape)
    accumulator.attach(model)
    engine = build_engine(model, ds_config, cfg.train)  # backward only: the optimizer never steps

    batches = BatchOrder(len(train_split), cfg.train.micro_batch_size, 1, world_size, rank,
                         cfg.run.seed + CALIBRATION_SEED_OFFSET)
    tokens = torch.zeros(1, dtype=torch.float64)
    for index in tqdm(range(cfg.salience.batches), desc="salience", disable=not dist.is_main()):
        batch = train_split[batches.indices(index, 0)]
        accumulator.grad_scale = world_size * loss_scale(engine)
        loss = engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        engine.backward(loss)
        engine.zero_grad()
        tokens += batch["input_ids"].numel()
    accumulator.detach()

    flat = torch.cat([accumulator.pack(), tokens])
    dist.all_reduce_sum(flat)
    accumulator.load_packed(flat[:-1])
    scores = accumulator.scores()
    if dist.is_main():
        tensors = {f"sums.{key}": value for key, value in accumulator.state_dict().items()}
        tensors |= {"scores.head": scores.head, "scores.neuron": scores.neuron, "scores.hidden": scores.hidden,
                    "tokens": flat[-1:]}
        save_tensors(tensors, layout.salience)
    engine.destroy()
    return {"batches": cfg.salience.batches, "tokens": int(flat[-1].item()), "world_size": world_size}

