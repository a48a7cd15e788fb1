"""Training helpers shared by the finetune recipe, the salience stage and the benchmarks.

The data order, the optimizer and its schedule, the DeepSpeed engine build, the loss reduction across ranks, the
validation loss, and the RNG state a resumed run restores.
"""

from __future__ import annotations

import math
import random

import deepspeed
import numpy as np
import torch
from deepspeed.utils import safe_get_full_fp32_param

from pipeline import dist
from pipeline.shape_choice import loss_sum


class BatchOrder:
    """Step s reads rows perm_epoch[s·G:(s+1)·G], G = micro·accum·world; micro-batch m of rank r is one slice.

    Depends only on (seed, G, s), so N ranks read exactly the rows one rank reads with N× the accumulation,
    a resumed run continues with the very next batch, and so does one resumed on another number of ranks.
    """

    def __init__(self, rows: int, micro_batch: int, grad_accum: int, world_size: int, rank: int, seed: int):
        self.global_batch = micro_batch * grad_accum * world_size
        if rows < self.global_batch:
            raise ValueError(f"the train split has {rows} rows, fewer than one global batch ({self.global_batch})")
        self.rows, self.micro, self.world_size, self.rank, self.seed = rows, micro_batch, world_size, rank, seed
        self.steps_per_epoch = rows // self.global_batch
        self._epoch, self._perm = -1, None

    def indices(self, step: int, micro: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.rows, generator=torch.Generator().manual_seed(self.seed + epoch))
        start = within * self.global_batch + (micro * self.world_size + self.rank) * self.micro
        return self._perm[start:start + self.micro].tolist()


def optimizer_factory(train):
    """params -> (AdamW, warmup-then-cosine LambdaLR): what every engine build and rebuild uses."""
    warmup = max(train.warmup_steps, 0)

    def lr_lambda(step: int) -> float:  # linear warmup, then cosine decay to 10% over the run
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, train.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def make(params):
        optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    return make


def build_engine(model, ds_config: dict, train):
    """A DeepSpeed engine over the model's trainable parameters, with the client optimizer and schedule."""
    optimizer, scheduler = optimizer_factory(train)([p for p in model.parameters() if p.requires_grad])
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def loss_scale(engine) -> float:
    """The fp16 dynamic loss scale captured gradients carry (1 in fp32/bf16)."""
    optimizer = engine.optimizer
    scale = getattr(optimizer, "cur_scale", None) or getattr(getattr(optimizer, "loss_scaler", None), "cur_scale", 1)
    return float(scale) if engine.fp16_enabled() else 1.0


def halve_loss_scale(engine) -> float:
    """Halve the fp16 dynamic loss scale, as DeepSpeed does after an overflowing step; returns the new scale."""
    engine.optimizer.loss_scale = loss_scale(engine) / 2
    return loss_scale(engine)


@torch.no_grad()
def reduce_losses(objective: torch.Tensor, task_loss: torch.Tensor) -> tuple[list[int], float, float]:
    """(ranks whose objective is inf/NaN, mean objective, mean task loss over the ranks): one small all-reduce.

    Every rank gets the same answer, so all skip (or stop) together; the means are what a single process
    would log for the whole global batch. The buffer is built on the losses' device and read once, after the
    all-reduce (one host synchronisation per micro-batch).
    """
    world_size, rank = dist.world_size(), dist.rank()
    objective, task_loss = objective.detach().double(), task_loss.detach().double()
    finite = torch.isfinite(objective)
    buffer = torch.zeros(world_size + 2, dtype=torch.float64, device=objective.device)
    buffer[rank] = (~finite).double()
    buffer[-2:] = torch.where(finite, torch.stack([objective, task_loss]) / world_size, 0.0)
    values = dist.all_reduce_sum(buffer).tolist()
    return [r for r in range(world_size) if values[r] != 0], values[-2], values[-1]


@torch.no_grad()
def evaluate(engine, split, micro_batch: int, max_batches: int, world_size: int, rank: int) -> float:
    """Token-weighted validation loss of the masked model, summed over every rank."""
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=dist.device())
    for batch_index in range(max_batches):
        rows = list(range((batch_index * world_size + rank) * micro_batch,
                          (batch_index * world_size + rank + 1) * micro_batch))
        rows = [r for r in rows if r < len(split)]
        if not rows:
            break
        totals += loss_sum(engine, dist.to_device(split[rows]))
    dist.all_reduce_sum(totals)
    engine.train()
    total_loss, total_tokens = totals.tolist()
    return total_loss / max(total_tokens, 1.0)


def trainable_fp32(engine) -> dict[str, torch.Tensor]:
    """The fp32 master copy of every trainable parameter (the adapters), whole on every rank."""
    return {name: safe_get_full_fp32_param(param).detach().cpu().clone()
            for name, param in engine.module.named_parameters() if param.requires_grad}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python's, NumPy's and torch's global RNG states, for a checkpoint."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
