"""finetune: APT under DeepSpeed ZeRO — masked adapters train while salience decides what to prune.

Runs on every rank (the driver starts it with the `deepspeed` launcher). Each step: forward/backward
with salience hooks accumulating on every rank, optimizer step, masks move one `mask_step` toward
their targets. Every `pruning.update_every` steps inside the window: ONE all-reduce of the packed
salience sums (plus each rank's mask checksum), EMA, budget search at the cubic schedule's ρ_t.
Checkpoints hold only trainable weights plus the APT state, and a restart resumes from `latest`.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import deepspeed
import numpy as np
import torch
from deepspeed.utils import safe_get_full_fp32_param
from tqdm import tqdm
from transformers import AutoTokenizer

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
from pipeline.apt.distill import distill_loss, freeze_adapters, match_layers, teacher_mode
from pipeline.apt.masks import MaskSet, step_toward
from pipeline.apt.salience import SalienceAccumulator, SalienceScores, ema_update
from pipeline.apt.schedule import remaining_fraction
from pipeline.apt.search import search_masks
from pipeline.checkpoints import check_checkpoint
from pipeline.ds_config import load_ds_config, zero_stage
from pipeline.engine import global_adapter_salience, grow_adapters, rebuild_engine
from pipeline.model_io import load_base_model
from pipeline.stage import save_tensors, write_atomic
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


def run(cfg, run_dir: Path) -> dict:
    stage_dir = run_dir / "finetune"
    train, pruning = cfg.train, cfg.pruning
    check_checkpoint(stage_dir / "checkpoints")  # a truncated or missing `latest` tag fails here, naming the fix
    dist.init_distributed(cfg.deepspeed.timeout_minutes)
    world_size, rank = dist.world_size(), dist.rank()
    seed_everything(cfg.run.seed)

    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "prep" / "tokenizer"))
    splits = datasets.load_from_disk(str(run_dir / "prep" / "dataset")).with_format("torch")
    ds_config = load_ds_config(cfg.deepspeed.config, train, world_size)

    model = load_base_model(cfg.model, len(tokenizer), ds_config, run_dir, cfg.run.seed)
    shape = ModelShape.from_config(model.config)
    inject_adapters(model, targets=cfg.apt.adapter_targets, rank=cfg.apt.rank, alpha=cfg.apt.alpha,
                    dropout=cfg.apt.dropout, generator=torch.Generator().manual_seed(cfg.run.seed))
    salience = SalienceAccumulator(shape)
    salience.attach(model)
    growth_budget = cfg.apt.tuning_budget * adapter_params(list(named_adapters(model)))  # of the initial adapters
    checkpoints = stage_dir / "checkpoints"
    regrow_to_checkpoint(model, checkpoints, cfg.run.seed)  # grown adapters must exist before their weights load
    engine = build_engine(model, ds_config, train)
    total = total_params(shape)

    state = AptState(masks=MaskSet.ones(shape), target=MaskSet.ones(shape))
    if (checkpoints / "latest").is_file():
        state = resume(engine, checkpoints, salience)
        log.info("resumed from %s at step %d", (checkpoints / "latest").read_text().strip(), state.step)
    set_masks(engine.module, state.masks)

    batches = BatchOrder(len(splits["train"]), train.micro_batch_size, world_size, rank, cfg.run.seed)
    metrics = metric_logger(stage_dir)
    tokens_per_step = train.micro_batch_size * train.grad_accum * world_size * splits["train"][0]["input_ids"].numel()
    row: dict = {}
    progress = tqdm(total=train.steps, initial=state.step, desc="finetune", disable=not dist.is_main())
    while state.step < train.steps:
        started = time.perf_counter()
        loss_sum = objective_sum = 0.0
        grow_now = cfg.apt.grow_every > 0 and (state.step + 1) % cfg.apt.grow_every == 0
        if cfg.apt.distill and state.teacher is None and state.step >= pruning.start_step:
            state.teacher = freeze_adapters(engine.module, read=safe_get_full_fp32_param)  # collective
        for micro in range(train.grad_accum):
            batch = splits["train"][batches.indices(state.step * train.grad_accum + micro)]
            salience.grad_scale = world_size * loss_scale(engine)
            loss, task_loss = training_loss(engine, batch, state.teacher, salience, cfg.apt.distill_weight)
            engine.backward(loss)
            if grow_now and micro == train.grad_accum - 1:  # full gradients exist only before the step
                adapter_scores = global_adapter_salience(named_adapters(engine.module))
            engine.step()
            loss_sum += task_loss.item()
            objective_sum += loss.item()
        state.step += 1
        if grow_now:
            engine = grow(engine, adapter_scores, cfg.apt, growth_budget, ds_config, train, cfg.run.seed + state.step)

        rho = remaining_fraction(state.step, start=pruning.start_step, end=pruning.end_step,
                                 final=pruning.target_remaining)
        if in_update_window(state.step, pruning):
            state.ema, state.target = salience_update(salience, state, shape, rho, cfg.apt, pruning)
            if dist.is_main():
                save_update(stage_dir / "updates", state)
        state.masks = step_toward(state.masks, state.target, pruning.mask_step)
        set_masks(engine.module, state.masks)

        step_time = time.perf_counter() - started
        kept = kept_sizes(state.masks)
        row = {"loss": loss_sum / train.grad_accum, "objective": objective_sum / train.grad_accum,
               "lr": engine.get_lr()[0], "remaining_target": rho,
               "adapter_params": adapter_params(list(named_adapters(engine.module))),
               "remaining": remaining_params(shape, kept) / total, "kept_hidden": kept.hidden,
               "kept_heads": sum(kept.heads), "kept_neurons": sum(kept.neurons),
               "tokens_per_s": tokens_per_step / step_time}
        metrics.log_metrics(row, step=state.step)
        progress.update(1)
        progress.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}", rem=f"{row['remaining']:.2f}")
        if state.step % train.checkpoint_every == 0 or state.step == train.steps:
            save(engine, checkpoints, state, salience)
    progress.close()

    val_loss = evaluate(engine, splits["validation"], train.micro_batch_size, train.eval_batches, world_size, rank)
    salience.detach()
    kept = kept_sizes(state.masks)
    summary = {"steps": state.step, "final_loss": row.get("loss"),
               "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0)),
               "remaining_fraction": remaining_params(shape, kept) / total,
               "target_remaining": pruning.target_remaining,
               "kept_hidden": kept.hidden, "kept_heads": list(kept.heads), "kept_neurons": list(kept.neurons),
               "zero_stage": zero_stage(ds_config), "precision": train.precision, "world_size": world_size}
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
    """Global batch b is rows perm_epoch[b·G:(b+1)·G] with G = micro·world; rank r reads its micro slice.

    Depends only on (seed, b), so N ranks read exactly the rows one rank would read with an N× batch,
    and a resumed run continues with the very next batch.
    """

    def __init__(self, rows: int, micro_batch: int, world_size: int, rank: int, seed: int):
        self.global_batch = micro_batch * world_size
        if rows < self.global_batch:
            raise ValueError(f"the train split has {rows} rows, fewer than one global batch ({self.global_batch})")
        self.rows, self.micro, self.rank, self.seed = rows, micro_batch, rank, seed
        self.per_epoch = rows // self.global_batch
        self._epoch, self._perm = -1, None

    def indices(self, batch: int) -> list[int]:
        epoch, within = divmod(batch, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.rows, generator=torch.Generator().manual_seed(self.seed + epoch))
        start = within * self.global_batch + self.rank * self.micro
        return self._perm[start:start + self.micro].tolist()


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


def ranks_file(checkpoints: Path, tag: str) -> Path:
    return checkpoints / f"ranks-{tag}.json"


def regrow_to_checkpoint(model, checkpoints: Path, seed: int) -> None:
    """Grow a fresh model's adapters to the ranks the latest checkpoint was saved with."""
    latest = checkpoints / "latest"
    if not latest.is_file():
        return
    saved = json.loads(ranks_file(checkpoints, latest.read_text().strip()).read_text())
    generator = torch.Generator().manual_seed(seed)  # values are overwritten by the checkpoint
    for name, adapter in named_adapters(model):
        if saved[name] > adapter.rank:
            grow_rank(adapter, saved[name] - adapter.rank, generator)


def save(engine, checkpoints: Path, state: AptState, salience: SalienceAccumulator) -> None:
    """Trainable weights + optimizer (DeepSpeed) and the APT state as client state; `latest` moves last."""
    tag = f"step{state.step}"
    if dist.is_main():  # written before `latest` names the tag, so a resume always finds it
        ranks = {name: adapter.rank for name, adapter in named_adapters(engine.module)}
        write_atomic(ranks_file(checkpoints, tag), json.dumps(ranks, indent=1))
    client_state = {
        "apt_step": state.step,
        "apt_masks": state.masks.to_dict(),
        "apt_target": state.target.to_dict(),
        "apt_ema": None if state.ema is None else asdict(state.ema),
        "apt_salience_sums": salience.state_dict(),
        "apt_teacher": state.teacher,
        "apt_rng": rng_state(),
    }
    engine.save_checkpoint(str(checkpoints), tag=tag, client_state=client_state,
                           exclude_frozen_parameters=True)


def resume(engine, checkpoints: Path, salience: SalienceAccumulator) -> AptState:
    _, client = engine.load_checkpoint(str(checkpoints), load_module_strict=False)
    if client is None:
        raise RuntimeError(f"{checkpoints}: the checkpoint named by 'latest' could not be loaded; "
                           f"delete {checkpoints} to start this stage over")
    salience.load_state_dict(client["apt_salience_sums"])
    rng = client["apt_rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    ema = client["apt_ema"]
    return AptState(step=client["apt_step"], masks=MaskSet.from_dict(client["apt_masks"]),
                    target=MaskSet.from_dict(client["apt_target"]),
                    ema=None if ema is None else SalienceScores(**ema), teacher=client["apt_teacher"])


def trainable_fp32(engine) -> dict[str, torch.Tensor]:
    """The fp32 master copy of every trainable parameter (the adapters), whole on every rank."""
    return {name: safe_get_full_fp32_param(param).detach().cpu().clone()
            for name, param in engine.module.named_parameters() if param.requires_grad}


def write_apt_state(stage_dir: Path, state: AptState) -> None:
    """The final masks and salience beside the checkpoints, for the later stages."""
    tensors = {f"masks.{k}": v for k, v in state.masks.to_dict().items()}
    tensors |= {f"target.{k}": v for k, v in state.target.to_dict().items()}
    if state.ema is not None:
        tensors |= {f"ema.{k}": v for k, v in asdict(state.ema).items()}
    save_tensors(tensors, stage_dir / "apt_state.safetensors")
    write_atomic(stage_dir / "apt_state.json", json.dumps({"step": state.step}, indent=2))
