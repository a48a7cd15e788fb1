"""finetune: APT under DeepSpeed ZeRO — masked adapters train while salience decides what to prune.

Runs on every rank (the driver starts it with the `deepspeed` launcher). Each step: forward/backward
with salience hooks accumulating on every rank, optimizer step, masks move one `mask_step` toward
their targets. Every `pruning.update_every` steps inside the window: ONE all-reduce of the packed
salience sums (plus each rank's mask checksum), EMA, budget search at the cubic schedule's ρ_t.
Checkpoints hold only trainable weights plus the APT state, and a restart resumes from `latest`, on the
same number of ranks or (through a DeepSpeed universal checkpoint) on another one with the same global batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import deepspeed
import numpy as np
import torch
from deepspeed.checkpoint import ds_to_universal
from deepspeed.utils import safe_get_full_fp32_param
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer

from pipeline import dist
from pipeline.apt.adapters import (
    adapter_params,
    grow_rank,
    inject_adapters,
    named_adapters,
    plan_rank_growth,
    set_masks,
)
from pipeline.apt.blocks import ModelShape, kept_sizes, remaining_params, total_params
from pipeline.apt.compaction import (
    CompactionPlan,
    compact_accumulator,
    narrow_alive,
    physical_fraction,
    plan_compaction,
    slice_masks,
    slice_scores,
)
from pipeline.apt.distill import distill_loss, freeze_adapters, match_layers, teacher_mode
from pipeline.apt.masks import MaskSet, step_toward
from pipeline.apt.salience import SalienceAccumulator, SalienceScores, ema_update
from pipeline.apt.schedule import remaining_fraction
from pipeline.apt.search import search_masks
from pipeline.checkpoints import LATEST, check_checkpoint
from pipeline.ds_config import load_ds_config, zero_stage
from pipeline.engine import compact_engine, global_adapter_salience, grow_adapters, rebuild_engine
from pipeline.model_io import FINETUNE_STATE, base_model_dir, load_base_model
from pipeline.stage import WriteFailed, save_tensors, write_atomic, write_failure
from pipeline.stages.merge import BaseWeights, export_pruned
from pipeline.tracking import metric_logger

SECTIONS = ("run", "model", "apt", "pruning", "train", "deepspeed")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

log = dist.get_logger("apt.finetune")


@dataclass
class AptState:
    """Everything besides the DeepSpeed weights/optimizer that a resumed run needs to continue exactly."""

    step: int = 0
    masks: MaskSet | None = None
    target: MaskSet | None = None
    ema: SalienceScores | None = None
    teacher: dict | None = None
    """Self-distillation: the adapters frozen at the start of the pruning window (name -> (A, B))."""
    skipped_steps: int = 0
    """Steps dropped because a loss was inf/NaN (train.nonfinite=skip)."""
    growth_budget: float = 0.0
    """Adapter parameters rank growth may reach: apt.tuning_budget x those of the initial, uncompacted model."""
    alive: MaskSet | None = None
    """After a compaction: 1 where a block of the ORIGINAL model is still in the training model."""
    base_model: str | None = None
    """After a compaction: the compacted base's folder inside finetune/ (masks, EMA, adapters follow its shape)."""


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a restart continues from, and how the ranks that wrote it differ from this run's."""

    tag: str
    """The tag `latest` names."""
    meta: dict
    """What `save` wrote beside it: adapter_ranks, world_size, global_batch."""
    load_tag: str
    """The folder DeepSpeed loads: `tag`, or its universal conversion when the world size changed."""

    @property
    def universal(self) -> bool:
        return self.load_tag != self.tag


def run(cfg, run_dir: Path) -> dict:
    stage_dir = run_dir / "finetune"
    checkpoints = stage_dir / "checkpoints"
    train, pruning = cfg.train, cfg.pruning
    check_checkpoint(checkpoints)  # a truncated or missing `latest` tag fails here, naming the fix
    dist.init_distributed(cfg.deepspeed.timeout_minutes)
    world_size, rank = dist.world_size(), dist.rank()
    seed_everything(cfg.run.seed)

    meta = latest_meta(checkpoints)
    if meta is not None:
        train = keep_global_batch(train, world_size, meta)
    resume_from = resume_point(checkpoints, meta, world_size)
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "prep" / "tokenizer"))
    splits = datasets.load_from_disk(str(run_dir / "prep" / "dataset")).with_format("torch")
    ds_config = load_ds_config(cfg.deepspeed.config, train, world_size)

    compacted = stage_dir / meta["base_model"] if meta is not None and meta.get("base_model") else None
    model = load_base_model(cfg.model, len(tokenizer), ds_config, run_dir, cfg.run.seed, directory=compacted)
    shape = ModelShape.from_config(model.config)  # the training model's; smaller than the original after compaction
    original_shape = shape if compacted is None else ModelShape.from_config(AutoConfig.from_pretrained(
        str(base_model_dir(cfg.model, run_dir)), trust_remote_code=cfg.model.trust_remote_code))
    inject_adapters(model, targets=cfg.apt.adapter_targets, rank=cfg.apt.rank, alpha=cfg.apt.alpha,
                    dropout=cfg.apt.dropout, generator=torch.Generator().manual_seed(cfg.run.seed))
    salience = SalienceAccumulator(shape)
    salience.attach(model)
    total = total_params(original_shape)
    state = AptState(masks=MaskSet.ones(shape), target=MaskSet.ones(shape),
                     growth_budget=cfg.apt.tuning_budget * adapter_params(list(named_adapters(model))))
    if resume_from is None:
        engine = build_engine(model, ds_config, train)
    else:
        regrow(model, resume_from.meta["adapter_ranks"], cfg.run.seed)  # grown adapters exist before they load
        load_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}),
                                                   "load_universal": resume_from.universal}}
        engine = build_engine(model, load_config, train)
        state = resume(engine, checkpoints, resume_from.load_tag, salience)
        log.info("resumed from %s at step %d%s", resume_from.tag, state.step,
                 f" (written by {resume_from.meta['world_size']} ranks, via {resume_from.load_tag})"
                 if resume_from.universal else "")
    set_masks(engine.module, state.masks)

    batches = BatchOrder(len(splits["train"]), train.micro_batch_size, train.grad_accum, world_size, rank,
                         cfg.run.seed)
    metrics = metric_logger(stage_dir)
    tokens_per_step = train.micro_batch_size * train.grad_accum * world_size * splits["train"][0]["input_ids"].numel()
    row: dict = {}
    step_times: list[float] = []
    compactions: list[dict] = []
    progress = tqdm(total=train.steps, initial=state.step, desc="finetune", disable=not dist.is_main())
    while state.step < train.steps:
        started = time.perf_counter()
        loss_sum = objective_sum = 0.0
        grow_now = cfg.apt.grow_every > 0 and (state.step + 1) % cfg.apt.grow_every == 0
        if cfg.apt.distill and state.teacher is None and state.step >= pruning.start_step:
            state.teacher = freeze_adapters(engine.module, read=safe_get_full_fp32_param)  # collective
        skip = False
        for micro in range(train.grad_accum):
            batch = splits["train"][batches.indices(state.step, micro)]
            salience.grad_scale = world_size * loss_scale(engine)
            sums_before = salience.pack()  # activations are summed during the forward; a bad one is rolled back
            loss, task_loss = training_loss(engine, batch, state.teacher, salience, cfg.apt.distill_weight)
            bad_ranks, loss_mean, task_loss_mean = reduce_losses(loss, task_loss)  # same on every rank
            if bad_ranks:
                salience.load_packed(sums_before)
                check_skip(train, state, bad_ranks)
                skip = True
                break
            engine.backward(loss)
            if grow_now and micro == train.grad_accum - 1:  # full gradients exist only before the step
                adapter_scores = global_adapter_salience(named_adapters(engine.module))
            engine.step()
            loss_sum += task_loss_mean
            objective_sum += loss_mean
        state.step += 1
        if skip:
            state.skipped_steps += 1
            log.warning("step %d skipped: inf/NaN loss on rank(s) %s (%d skipped so far)", state.step,
                        bad_ranks, state.skipped_steps)
        if grow_now and not skip:
            engine = grow(engine, adapter_scores, cfg.apt, state.growth_budget, ds_config, train,
                          cfg.run.seed + state.step)

        rho = remaining_fraction(state.step, start=pruning.start_step, end=pruning.end_step,
                                 final=pruning.target_remaining)
        if in_update_window(state.step, pruning):
            state.ema, state.target = salience_update(salience, state, shape,
                                                      physical_fraction(rho, original_shape, shape), cfg.apt, pruning)
            if dist.is_main():
                save_update(stage_dir / "updates", state)
        state.masks = step_toward(state.masks, state.target, pruning.mask_step)
        set_masks(engine.module, state.masks)

        step_time = time.perf_counter() - started
        step_times.append(step_time)
        plan = plan_compaction(state.masks, state.target, shape, pruning.attention_mode,
                               min_fraction=pruning.compact_min_fraction) if pruning.compact else None
        if plan is not None:
            engine, salience = compact(engine, plan, state, salience, ds_config, train, cfg.model, run_dir)
            shape = plan.after
            compactions.append({"step": state.step, "params_before": total_params(plan.before),
                                "params_after": total_params(plan.after),
                                "step_time_before": sum(step_times[-3:]) / len(step_times[-3:])})
        timed_compaction(compactions, state.step, step_times)
        kept = kept_sizes(state.masks)
        losses = {} if skip else {"loss": loss_sum / train.grad_accum, "objective": objective_sum / train.grad_accum}
        row = {**losses, "lr": engine.get_lr()[0], "remaining_target": rho,
               "adapter_params": adapter_params(list(named_adapters(engine.module))),
               "remaining": remaining_params(shape, kept) / total, "kept_hidden": kept.hidden,
               "kept_heads": sum(kept.heads), "kept_neurons": sum(kept.neurons),
               "tokens_per_s": tokens_per_step / step_time, "skipped_steps": state.skipped_steps,
               "model_params": total_params(shape) / total}
        metrics.log_metrics(row, step=state.step)
        progress.update(1)
        progress.set_postfix(loss=f"{row.get('loss', float('nan')):.3f}", lr=f"{row['lr']:.1e}",
                             rem=f"{row['remaining']:.2f}")
        if state.step % train.checkpoint_every == 0 or state.step == train.steps:
            save(engine, checkpoints, state, salience, train, world_size)
    progress.close()

    val_loss = evaluate(engine, splits["validation"], train.micro_batch_size, train.eval_batches, world_size, rank)
    salience.detach()
    kept = kept_sizes(state.masks)
    summary = {"steps": state.step, "final_loss": row.get("loss"),
               "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0)),
               "remaining_fraction": remaining_params(shape, kept) / total,
               "target_remaining": pruning.target_remaining,
               "kept_hidden": kept.hidden, "kept_heads": list(kept.heads), "kept_neurons": list(kept.neurons),
               "zero_stage": zero_stage(ds_config), "precision": train.precision, "world_size": world_size,
               "skipped_steps": state.skipped_steps, "compactions": compactions}
    adapters = trainable_fp32(engine)  # every rank takes part: under ZeRO-3 this gathers partitions
    if dist.is_main():
        write_apt_state(stage_dir, state)
        save_tensors(adapters, stage_dir / "adapters.safetensors")
    metrics.close()
    engine.destroy()
    return summary


# ---- model and engine ----------------------------------------------------------------------------------


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
    optimizer, scheduler = optimizer_factory(train)([p for p in model.parameters() if p.requires_grad])
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def training_loss(engine, batch: dict, teacher, salience: SalienceAccumulator, distill_weight: float):
    """(objective, causal-LM loss): the objective mixes in self-distillation once a teacher exists (DESIGN.md §5)."""
    if teacher is None:
        loss = engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        return loss, loss
    salience.enabled = False  # the teacher's activations are not the student's salience
    with teacher_mode(engine.module, teacher):
        teacher_out = engine(input_ids=batch["input_ids"], output_hidden_states=True)
    salience.enabled = True
    student_out = engine(input_ids=batch["input_ids"], labels=batch["labels"], output_hidden_states=True)
    layers = list(range(1, len(teacher_out.hidden_states)))
    layer_map = match_layers(student_out.hidden_states, teacher_out.hidden_states, layers)
    distill = distill_loss(student_out.logits, teacher_out.logits, student_out.hidden_states,
                           teacher_out.hidden_states, layer_map)
    return (1 - distill_weight) * student_out.loss + distill_weight * distill, student_out.loss


def loss_scale(engine) -> float:
    """The fp16 dynamic loss scale captured gradients carry (1 in fp32/bf16)."""
    optimizer = engine.optimizer
    scale = getattr(optimizer, "cur_scale", None) or getattr(getattr(optimizer, "loss_scaler", None), "cur_scale", 1)
    return float(scale) if engine.fp16_enabled() else 1.0


# ---- data ----------------------------------------------------------------------------------------------


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


class NonFiniteLoss(RuntimeError):
    """A loss was inf/NaN and train.nonfinite says to stop (or too many steps were skipped)."""


def reduce_losses(objective: torch.Tensor, task_loss: torch.Tensor) -> tuple[list[int], float, float]:
    """(ranks whose objective is inf/NaN, mean objective, mean task loss over the ranks): one small all-reduce.

    Every rank gets the same answer, so all skip (or stop) together; the means are what a single process
    would log for the whole global batch.
    """
    world_size, rank = dist.world_size(), dist.rank()
    buffer = torch.zeros(world_size + 2, dtype=torch.float64)
    objective, task_loss = objective.detach().double().cpu(), task_loss.detach().double().cpu()
    finite = bool(torch.isfinite(objective))
    buffer[rank] = float(not finite)
    if finite:
        buffer[-2:] = torch.stack([objective, task_loss]) / world_size
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(buffer)
    return buffer[:world_size].nonzero().flatten().tolist(), buffer[-2].item(), buffer[-1].item()


def check_skip(train, state: AptState, bad_ranks: list[int]) -> None:
    """Raise unless this inf/NaN step may be skipped under train.nonfinite / max_skipped_steps."""
    where = f"step {state.step + 1}: the loss is inf/NaN on rank(s) {bad_ranks}"
    if train.nonfinite == "stop":
        raise NonFiniteLoss(f"{where}; stopping (train.nonfinite=stop). The last checkpoint is intact; set "
                            f"train.nonfinite=skip to drop such steps, or lower train.lr if the run diverges")
    if state.skipped_steps >= train.max_skipped_steps:
        raise NonFiniteLoss(f"{where}, and {state.skipped_steps} steps were skipped already "
                            f"(train.max_skipped_steps); the run is diverging: lower train.lr or check the data")


@torch.no_grad()
def evaluate(engine, split, micro_batch: int, max_batches: int, world_size: int, rank: int) -> float:
    """Token-weighted validation loss of the masked model, summed over every rank."""
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for batch_index in range(max_batches):
        rows = list(range((batch_index * world_size + rank) * micro_batch,
                          (batch_index * world_size + rank + 1) * micro_batch))
        rows = [r for r in rows if r < len(split)]
        if not rows:
            break
        batch = split[rows]
        tokens = (batch["labels"][:, 1:] != -100).sum().item()
        loss = engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss.float().item()
        totals += torch.tensor([loss * tokens, tokens], dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    engine.train()
    return (totals[0] / totals[1].clamp_min(1)).item()


# ---- pruning updates -----------------------------------------------------------------------------------


def in_update_window(step: int, pruning) -> bool:
    return pruning.start_step < step <= pruning.end_step and (step - pruning.start_step) % pruning.update_every == 0


def salience_update(salience: SalienceAccumulator, state: AptState, shape: ModelShape, rho: float, apt, pruning):
    """One all-reduce of every rank's sums and mask checksum; then EMA and the budget search, same on all ranks."""
    world_size, rank = dist.world_size(), dist.rank()
    checksums = torch.zeros(world_size, dtype=torch.float64)
    checksums[rank] = mask_checksum(state.target)
    flat = torch.cat([salience.pack(), checksums])
    dist.all_reduce_sum(flat)
    salience.load_packed(flat[:-world_size])
    disagree = [r for r in range(world_size) if flat[-world_size + r] != flat[-world_size]]
    if disagree:
        raise RuntimeError(f"step {state.step}: ranks {disagree} hold other masks than rank 0; "
                           f"the ranks have diverged (non-deterministic search or corrupted state)")
    ema = ema_update(state.ema, salience.scores(), apt.salience_momentum)
    salience.reset()
    target = search_masks(shape, ema, rho, attention_mode=pruning.attention_mode, layout=pruning.layout,
                          round_to=pruning.round_to, min_hidden=pruning.min_hidden)
    return ema, target


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


# ---- compaction ----------------------------------------------------------------------------------------


def compact(engine, plan: CompactionPlan, state: AptState, salience: SalienceAccumulator, ds_config: dict, train,
            model_cfg, run_dir: Path):
    """Cut the plan's dead blocks out of the model, its optimizer state and the APT state; write the smaller base.

    Collective (every rank holds the same masks, so the same plan). Returns the new engine and accumulator.
    """
    started = time.perf_counter()
    engine = compact_engine(engine, plan, ds_config, optimizer_factory(train))
    state.masks, state.target = slice_masks(state.masks, plan), slice_masks(state.target, plan)
    state.ema = None if state.ema is None else slice_scores(state.ema, plan)
    compacted = compact_accumulator(salience, plan)
    salience.detach()
    compacted.attach(engine.module)
    state.alive = narrow_alive(state.alive or MaskSet.ones(plan.before), plan)
    state.base_model = f"compacted/step{state.step:06d}"
    if dist.is_main():
        write_compacted_base(base_model_dir(model_cfg, run_dir), state.alive, run_dir / "finetune" / state.base_model,
                             model_cfg.trust_remote_code)
    sizes = plan.summary()
    log.info("compaction at step %d: hidden %d->%d, heads %d->%d, KV heads %d->%d, neurons %d->%d, parameters "
             "%d->%d (%.2fx); rebuilt in %.1fs", state.step, sizes["hidden_before"], sizes["hidden_after"],
             sizes["heads_before"], sizes["heads_after"], sizes["kv_heads_before"], sizes["kv_heads_after"],
             sizes["neurons_before"], sizes["neurons_after"], sizes["params_before"], sizes["params_after"],
             sizes["params_after"] / sizes["params_before"], time.perf_counter() - started)
    return engine, compacted


def write_compacted_base(original_dir: Path, alive: MaskSet, out_dir: Path, trust_remote_code: bool) -> None:
    """The original base sliced to the blocks still alive, streamed from its safetensors in its own dtype."""
    dtype = BaseWeights(original_dir).get("model.norm.weight").dtype
    export_pruned(base_dir=original_dir, adapters_path=None, masks=alive, scaling=0.0, dtype=dtype, out_dir=out_dir,
                  trust_remote_code=trust_remote_code)


def timed_compaction(compactions: list[dict], step: int, step_times: list[float]) -> None:
    """Fill in the step time after the latest compaction: steps 2-4 after it (the first one warms the new engine)."""
    if compactions and "step_time_after" not in compactions[-1] and step - compactions[-1]["step"] == 4:
        event = compactions[-1]
        event["step_time_after"] = sum(step_times[-3:]) / 3
        log.info("step time %.3fs before the step-%d compaction, %.3fs after (%.2fx)", event["step_time_before"],
                 event["step"], event["step_time_after"], event["step_time_after"] / event["step_time_before"])


# ---- checkpoints ---------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def grow(engine, adapter_scores: dict[str, float], apt, budget: float, ds_config: dict, train, seed: int):
    """Give the most salient adapters more rank and rebuild the engine, carrying optimizer state over."""
    adapters = list(named_adapters(engine.module))
    plan = plan_rank_growth(adapters, adapter_scores, initial_rank=apt.rank, max_multiplier=apt.max_rank_multiplier,
                            budget_params=budget)
    if not plan:
        return engine
    log.info("rank growth: %d adapters grow by %d ranks in all", len(plan), sum(plan.values()))
    generator = torch.Generator().manual_seed(seed)  # the same new rows on every rank
    return rebuild_engine(engine, ds_config, optimizer_factory(train),
                          reshape=lambda model: grow_adapters(model, plan, generator))


def meta_file(checkpoints: Path, tag: str) -> Path:
    return checkpoints / f"meta-{tag}.json"


def latest_meta(checkpoints: Path) -> dict | None:
    """What `save` recorded beside the checkpoint `latest` names (None: nothing to resume)."""
    latest = checkpoints / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return {"tag": tag} | json.loads(meta_file(checkpoints, tag).read_text())


def resume_point(checkpoints: Path, meta: dict | None, world_size: int) -> ResumePoint | None:
    """Where a restart continues, converting a checkpoint written by another number of ranks first.

    DeepSpeed's ZeRO files are per rank; `ds_to_universal` rewrites them per parameter, which any world size
    loads. Rank 0 converts (once, to a temporary folder renamed on success) while the others wait.
    """
    if meta is None:
        return None
    tag = meta["tag"]
    if meta["world_size"] == world_size:
        return ResumePoint(tag, meta, tag)
    universal = checkpoints / f"{tag}_universal"
    if dist.is_main() and not universal.is_dir():
        log.info("checkpoint %s was written by %d ranks; converting it for %d (DeepSpeed universal checkpoint)",
                 tag, meta["world_size"], world_size)
        partial = checkpoints / f"{tag}_universal.partial"
        shutil.rmtree(partial, ignore_errors=True)
        ds_to_universal.main(argparse.Namespace(
            input_folder=str(checkpoints / tag), output_folder=str(partial), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
        partial.rename(universal)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return ResumePoint(tag, meta, universal.name)


def keep_global_batch(train, world_size: int, meta: dict):
    """The train section with grad_accum set so micro·accum·world equals the checkpoint's global batch.

    The batch size is part of the optimisation (and of the data order), so a run resumed on another number of
    ranks keeps it by changing the accumulation, as DeepSpeed's elastic training does.
    """
    per_accum = train.micro_batch_size * world_size
    saved = meta["global_batch"]
    if saved % per_accum:
        raise ValueError(f"the checkpoint was trained with a global batch of {saved} sequences; "
                         f"{world_size} ranks x micro_batch_size {train.micro_batch_size} cannot make it up. "
                         f"Resume on a number of ranks that divides {saved // train.micro_batch_size}")
    grad_accum = saved // per_accum
    if grad_accum != train.grad_accum:
        log.info("keeping the checkpoint's global batch of %d: grad_accum %d -> %d on %d ranks",
                 saved, train.grad_accum, grad_accum, world_size)
    if train.nonfinite == "skip" and grad_accum != 1:
        raise ValueError(f"on {world_size} ranks the global batch of {saved} needs grad_accum {grad_accum}, "
                         f"which train.nonfinite=skip does not support; resume with nonfinite=stop or "
                         f"{saved // train.micro_batch_size} ranks")
    return dataclasses.replace(train, grad_accum=grad_accum)


def regrow(model, adapter_ranks: dict[str, int], seed: int) -> None:
    """Grow a fresh model's adapters to the ranks a checkpoint was saved with (its values overwrite them)."""
    generator = torch.Generator().manual_seed(seed)
    for name, adapter in named_adapters(model):
        if adapter_ranks[name] > adapter.rank:
            grow_rank(adapter, adapter_ranks[name] - adapter.rank, generator)


def save(engine, checkpoints: Path, state: AptState, salience: SalienceAccumulator, train, world_size: int) -> None:
    """Trainable weights + optimizer (DeepSpeed) and the APT state as client state; `latest` moves last.

    DeepSpeed's rank 0 would write `latest` as soon as its own files are done; here it is written (atomically)
    after DeepSpeed's closing barrier, so it never names a tag whose other ranks' files are still being written.
    """
    tag = f"step{state.step}"
    if dist.is_main():  # written before `latest` names the tag, so a resume always finds it
        meta = {"adapter_ranks": {name: adapter.rank for name, adapter in named_adapters(engine.module)},
                "world_size": world_size, "global_batch": train.micro_batch_size * train.grad_accum * world_size,
                "base_model": state.base_model}
        write_atomic(meta_file(checkpoints, tag), json.dumps(meta, indent=1))
    client_state = {
        "apt_step": state.step,
        "apt_skipped_steps": state.skipped_steps,
        "apt_growth_budget": state.growth_budget,
        "apt_masks": state.masks.to_dict(),
        "apt_target": state.target.to_dict(),
        "apt_ema": None if state.ema is None else asdict(state.ema),
        "apt_salience_sums": salience.state_dict(),
        "apt_teacher": state.teacher,
        "apt_alive": None if state.alive is None else state.alive.to_dict(),
        "apt_base_model": state.base_model,
        "apt_rng": rng_state(),
    }
    try:
        engine.save_checkpoint(str(checkpoints), tag=tag, client_state=client_state,
                               exclude_frozen_parameters=True, save_latest=False)
    except (OSError, RuntimeError) as e:  # torch.save's zip writer raises an errno-less RuntimeError
        failure = write_failure(e, checkpoints / tag)
        if failure is None:
            raise
        previous = (checkpoints / LATEST).read_text().strip() if (checkpoints / LATEST).is_file() else None
        resumable = WriteFailed(failure.errno, f"{failure.strerror}; a rerun resumes from "
                                               f"{previous or 'the start'}, which is intact")
        resumable.fix = failure.fix
        raise resumable from e
    if dist.is_main():
        write_atomic(checkpoints / LATEST, tag)


def resume(engine, checkpoints: Path, load_tag: str, salience: SalienceAccumulator) -> AptState:
    _, client = engine.load_checkpoint(str(checkpoints), tag=load_tag, load_module_strict=False)
    if client is None:
        raise RuntimeError(f"{checkpoints / load_tag}: the checkpoint could not be loaded; "
                           f"delete {checkpoints} to start this stage over")
    salience.load_state_dict(client["apt_salience_sums"])
    rng = client["apt_rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    ema, alive = client["apt_ema"], client.get("apt_alive")
    return AptState(step=client["apt_step"], masks=MaskSet.from_dict(client["apt_masks"]),
                    target=MaskSet.from_dict(client["apt_target"]),
                    ema=None if ema is None else SalienceScores(**ema), teacher=client["apt_teacher"],
                    skipped_steps=client["apt_skipped_steps"], growth_budget=client["apt_growth_budget"],
                    alive=None if alive is None else MaskSet.from_dict(alive), base_model=client.get("apt_base_model"))


def trainable_fp32(engine) -> dict[str, torch.Tensor]:
    """The fp32 master copy of every trainable parameter (the adapters), whole on every rank."""
    return {name: safe_get_full_fp32_param(param).detach().cpu().clone()
            for name, param in engine.module.named_parameters() if param.requires_grad}


def write_apt_state(stage_dir: Path, state: AptState) -> None:
    """The final masks and salience beside the checkpoints, for the later stages (in the compacted base's shape,
    whose folder `base_model` names; `alive.*` places it in the original model)."""
    tensors = {f"masks.{k}": v for k, v in state.masks.to_dict().items()}
    tensors |= {f"target.{k}": v for k, v in state.target.to_dict().items()}
    if state.ema is not None:
        tensors |= {f"ema.{k}": v for k, v in asdict(state.ema).items()}
    if state.alive is not None:
        tensors |= {f"alive.{k}": v for k, v in state.alive.to_dict().items()}
    save_tensors(tensors, stage_dir / "apt_state.safetensors")
    write_atomic(stage_dir / FINETUNE_STATE, json.dumps({"step": state.step, "base_model": state.base_model}, indent=2))
