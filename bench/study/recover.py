"""Recovery of a baseline-pruned model with the pipeline's own pieces, and the one evaluation every model gets.

`recover` trains APT's masked low-rank adapters (`inject_adapters`, masks fixed by `set_masks`) with what the APT
finetune stage uses for the same run config: `optimizer_factory(cfg.train)` (AdamW, warm-up then cosine),
`BatchOrder` (the same rows at every step), the adapter targets, rank, alpha and seed of `cfg.apt`, gradient
clipping at `cfg.train.grad_clip`, fp32. The result is a physically smaller plain `LlamaForCausalLM`: adapters
folded in (`merge_adapters`), pruned blocks removed (`slice_model`).

By default the pruned blocks are cut out of the wrapped model before training (`slice_model` on the APT-wrapped
model, the pipeline's compaction path), as APT's finetune compacts once masks reach 0. This trains exactly what
the full-size masked model trains — masked inputs and outputs give the cut adapter rows and columns zero gradients,
so AdamW never moves them — at the pruned model's cost; `compact=False` trains at full size (a test compares them).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from pipeline.apt.adapters import inject_adapters, merge_adapters, set_masks
from pipeline.apt.masks import MaskSet
from pipeline.apt.slicing import slice_model
from pipeline.evaluation import perplexity as pipeline_perplexity
from pipeline.training import BatchOrder, optimizer_factory

EVAL_BATCH = 16


def recover(model: nn.Module, masks: MaskSet, train_split, cfg, *, compact: bool = True,
            log_every: int = 0) -> nn.Module:
    """Train adapters on `model` under fixed binary `masks` for cfg.train.steps, merge, slice; returns the model.

    `cfg` is the APT run's config (sections run, apt, train): the baselines get exactly its recovery budget.
    """
    train, apt = cfg.train, cfg.apt
    torch.manual_seed(cfg.run.seed)
    inject_adapters(model, targets=apt.adapter_targets, rank=apt.rank, alpha=apt.alpha, dropout=apt.dropout,
                    generator=torch.Generator().manual_seed(cfg.run.seed))
    set_masks(model, masks)
    if compact:
        slice_model(model, masks)  # the masks left in the model are the kept entries: all ones
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_factory(train)(params)
    order = BatchOrder(rows=len(train_split), micro_batch=train.micro_batch_size, grad_accum=train.grad_accum,
                       world_size=1, rank=0, seed=cfg.run.seed)
    model.train()
    started = time.perf_counter()
    for step in range(train.steps):
        loss_sum = 0.0
        for micro in range(train.grad_accum):
            batch = train_split[order.indices(step, micro)]
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            (loss / train.grad_accum).backward()  # as DeepSpeed scales a micro-batch's loss
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if log_every and ((step + 1) % log_every == 0 or step + 1 == train.steps):
            print(f"  recover step {step + 1}/{train.steps}: loss {loss_sum / train.grad_accum:.3f} "
                  f"({time.perf_counter() - started:.0f}s)", flush=True)
    model.eval()
    merge_adapters(model)
    return model if compact else slice_model(model, masks)


def evaluate(model: nn.Module, validation) -> float:
    """Held-out perplexity over every validation block: the one function every model of the study is scored by.

    The pipeline's eval-stage perplexity (token-weighted mean loss), run over the whole split.
    """
    model.eval()
    return pipeline_perplexity(model, validation, EVAL_BATCH, max_batches=len(validation))


def count_params(model: nn.Module) -> int:
    """Parameters of the model as it is (a sliced model counts only what it keeps)."""
    return sum(p.numel() for p in model.parameters())
