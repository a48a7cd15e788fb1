"""Calibration passes: forward and backward over given batches into the salience sums, no optimizer step.

The salience stage runs one on the fine-tuned model; a one-shot finetune (`pruning.schedule: one_shot`) runs one
on the dense model before step 0. Every rank sums its own rows, then one SUM all-reduce merges the sums (and the
token count), so N ranks hold what one process would have computed on all the data. Collective.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from pipeline import dist
from pipeline.apt.salience import SalienceAccumulator
from pipeline.training import halve_loss_scale, loss_scale

log = dist.get_logger("apt.calibration")


def accumulate(engine, accumulator: SalienceAccumulator, rows: list[list[int]], split,
               desc: str = "salience") -> torch.Tensor:
    """Forward and backward over this rank's rows, then one SUM all-reduce of the sums and the token count
    (the accumulator holds the reduced sums afterwards, detached). Returns the reduced buffer, the token count last.

    The engine's gradients are zeroed but DeepSpeed's reduced-gradient buffers are not: rebuild the engine before
    its first optimizer step (`pipeline.engine.rebuild_engine`)."""
    tokens = torch.zeros(1, dtype=torch.float64, device=dist.device())
    for index, indices in enumerate(tqdm(rows, desc=desc, disable=not dist.is_main())):
        batch = dist.to_device(split[indices])
        while not calibration_step(engine, accumulator, batch):
            if not engine.fp16_enabled() or loss_scale(engine) <= 1:
                raise FloatingPointError(f"{desc} batch {index}: non-finite gradients on some rank; the model "
                                         f"diverged (for the salience stage: check finetune/metrics.jsonl)")
            log.info("%s batch %d: fp16 gradients overflowed; again at loss scale %g", desc, index,
                     halve_loss_scale(engine))
        tokens += batch["input_ids"].numel()
    accumulator.detach()
    flat = dist.all_reduce_sum(torch.cat([accumulator.pack(), tokens]))
    accumulator.load_packed(flat[:-1])
    return flat


def calibration_step(engine, accumulator: SalienceAccumulator, batch: dict) -> bool:
    """One batch's forward and backward into the sums; False, the sums as they were, when any rank's gradients
    overflowed (fp16: the loss scale is never tuned here, as no step is taken). Collective: every rank agrees."""
    before = accumulator.pack()
    accumulator.grad_scale = dist.world_size() * loss_scale(engine)
    loss = engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    engine.backward(loss)
    engine.zero_grad()
    overflowed = (~torch.isfinite(accumulator.pack()).all()).double().reshape(1)
    if dist.all_reduce_sum(overflowed).item() == 0:
        return True
    accumulator.load_packed(before)
    return False
