"""The APT fine-tune as a recipe: masked adapters train under DeepSpeed ZeRO while salience decides what to prune.

Runs on every rank (the driver starts it with the `deepspeed` launcher). Each step: forward/backward with salience
hooks accumulating on every rank, optimizer step, masks move one `mask_step` toward their targets. Every
`pruning.update_every` steps inside the window: one all-reduce of the packed salience sums, EMA, and a target at
the cubic schedule's ρ_t whose shape is chosen by held-out loss (`pipeline.updates`). Every `apt.grow_every` steps
the most salient adapters grow. Once distillation starts, a teacher frozen at the window's start pulls the student.
Blocks whose mask and target reached 0 are cut out of the model (compaction). Checkpoints hold only trainable
weights plus the APT state; a restart resumes from `latest`, on the same number of ranks or (through a DeepSpeed
universal checkpoint) on another one with the same global batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from deepspeed.utils import safe_get_full_fp32_param
from tqdm import tqdm
from transformers import AutoTokenizer

from pipeline import criteria, dist, updates
from pipeline.adapted import build_adapted_engine
from pipeline.apt.adapters import (
    adapter_params,
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
from pipeline.apt.distill import distill_objective, freeze_adapters
from pipeline.apt.masks import MaskSet, step_toward
from pipeline.apt.schedule import remaining_fraction
from pipeline.apt.state import AptState
from pipeline.calibration import accumulate
from pipeline.checkpoints import LATEST, check_checkpoint
from pipeline.config import FinetuneConfig
from pipeline.ds_config import load_ds_config, zero_stage
from pipeline.engine import compact_engine, global_adapter_salience, grow_adapters, rebuild_engine
from pipeline.export import write_compacted_base
from pipeline.layout import RunLayout
from pipeline.model_io import model_shape
from pipeline.resume import ResumePoint, keep_global_batch, latest_meta, resume_point, write_meta
from pipeline.shape_choice import (
    ShapeChoice,
    candidate_line,
    choose_shape,
    describe,
    final_remaining,
    influence_order,
    search_target,
)
from pipeline.stage import WriteFailed, save_tensors, write_atomic, write_failure
from pipeline.teacher import DTYPES, SharedTeacher, load_teacher, materialize
from pipeline.tracking import metric_logger
from pipeline.training import (
    BatchOrder,
    evaluate,
    loss_scale,
    optimizer_factory,
    reduce_losses,
    rng_state,
    seed_everything,
    set_rng_state,
    trainable_fp32,
)

log = dist.get_logger("apt.finetune")

SHAPE_SEED_OFFSET = 2_000_003
"""The shape-choice batches come in their own order, not the next training batches."""
ONE_SHOT_SEED_OFFSET = 4_000_037
"""So do the one-shot schedule's calibration batches."""


class NonFiniteLoss(RuntimeError):
    """A loss was inf/NaN and train.nonfinite says to stop (or too many steps were skipped)."""


@dataclass
class StepResult:
    """What one optimizer step leaves for the rest of the loop."""

    loss_sum: float = 0.0
    """Causal-LM loss summed over the micro-batches (mean over ranks)."""
    objective_sum: float = 0.0
    """The trained objective (with distillation) summed likewise."""
    skipped: bool = False
    adapter_scores: dict[str, float] | None = None
    """On a growth step: each adapter's salience, taken from the full gradients before the optimizer step."""


class AptFinetuneRecipe:
    """One APT fine-tune: `setup`, then `train`, then `finish`; engine, config and state live on the instance."""

    def __init__(self, cfg: FinetuneConfig, run_dir: Path):
        self.cfg = cfg  # its train section changes once, on an elastic resume (grad_accum keeps the global batch)
        self.layout = RunLayout(run_dir, cfg.model)
        self.last_row: dict = {}
        self.loop_seconds: dict = {}
        """Wall and CPU (this process, all its threads) seconds of the training loop in this launch."""

    # ---- setup -------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Ranks, data, the (possibly compacted) base with adapters and salience hooks, a fresh or resumed engine."""
        checkpoints = self.layout.checkpoints
        check_checkpoint(checkpoints)  # a truncated or missing `latest` tag fails here, naming the fix
        dist.init_distributed(self.cfg.deepspeed.timeout_minutes)
        self.world_size, self.rank, self.device = dist.world_size(), dist.rank(), dist.device()
        seed_everything(self.cfg.run.seed)
        meta = latest_meta(checkpoints)
        if meta is not None:
            self.cfg = dataclasses.replace(self.cfg, train=keep_global_batch(self.cfg.train, self.world_size, meta))
        resume_from = resume_point(checkpoints, meta, self.world_size)
        tokenizer = AutoTokenizer.from_pretrained(str(self.layout.tokenizer))
        self.splits = datasets.load_from_disk(str(self.layout.dataset)).with_format("torch")
        self.ds_config = load_ds_config(self.cfg.deepspeed.config, self.cfg.train, self.world_size)

        self.build(len(tokenizer), meta, resume_from)
        self.teacher = self.resumed_teacher()

        train = self.cfg.train
        self.batches = BatchOrder(len(self.splits["train"]), train.micro_batch_size, train.grad_accum,
                                  self.world_size, self.rank, self.cfg.run.seed)
        self.metrics = metric_logger(self.layout.finetune)
        shape_order = BatchOrder(len(self.splits["train"]), train.micro_batch_size, 1, self.world_size, self.rank,
                                 self.cfg.run.seed + SHAPE_SEED_OFFSET)
        self.shape_batches = [self.splits["train"][shape_order.indices(i, 0)]
                              for i in range(self.cfg.pruning.shape_batches)]
        seq_len = self.splits["train"][0]["input_ids"].numel()
        self.tokens_per_step = train.micro_batch_size * train.grad_accum * self.world_size * seq_len

        pruning = self.cfg.pruning
        # The hooks sum salience only where an update will read it: a gradual schedule of an activation criterion.
        self.collects_salience = pruning.schedule == "gradual" and criteria.uses_activations(pruning.criterion)
        if pruning.criterion == "magnitude":
            dist.barrier()  # rank 0 has written a base built from the config (a run without model.path)
        self.fixed_scores = criteria.fixed_scores(pruning.criterion, self.layout.base_model, self.original_shape,
                                                  self.cfg.run.seed)
        if resume_from is None and pruning.schedule == "one_shot":
            self.prune_one_shot()
        if not self.collects_salience:
            self.salience.detach()

    def build(self, vocab_size: int, meta: dict | None, resume_from: ResumePoint | None) -> None:
        """Engine, shapes and APT state: fresh, or the checkpoint's on the base it was written on (the last
        compacted one, if any), adapters grown to its ranks before its weights load."""
        compacted = self.layout.finetune / meta["base_model"] if meta is not None and meta.get("base_model") else None
        ds_config = self.ds_config if resume_from is None else {
            **self.ds_config, "checkpoint": {**self.ds_config.get("checkpoint", {}),
                                             "load_universal": resume_from.universal}}
        built = build_adapted_engine(self.cfg, self.layout, compacted or self.layout.base_model, ds_config,
                                     vocab_size, dropout=self.cfg.apt.dropout,
                                     adapter_ranks=None if resume_from is None else resume_from.meta["adapter_ranks"])
        self.engine, self.shape, self.salience = built.engine, built.shape, built.salience
        self.original_shape = self.shape if compacted is None else model_shape(self.layout.base_model,
                                                                                self.cfg.model.trust_remote_code)
        if resume_from is None:
            growth_budget = self.cfg.apt.tuning_budget * adapter_params(list(named_adapters(self.engine.module)))
            self.state = AptState.start(self.shape, growth_budget)
        else:
            self.resume(resume_from)
        set_masks(self.engine.module, self.state.masks)

    def resumed_teacher(self):
        """The distillation teacher a checkpoint had: its own model after a compaction, else the shared one."""
        state = self.state
        if state.teacher_model is not None:
            return load_teacher(self.cfg.model, self.layout.finetune / state.teacher_model,
                                DTYPES[self.cfg.train.precision], self.device)
        if state.teacher is None:
            return None
        # A checkpoint's tensors come back on the CPU.
        state.teacher = {name: (a.to(self.device), b.to(self.device)) for name, (a, b) in state.teacher.items()}
        return SharedTeacher(state.teacher)

    # ---- the loop ----------------------------------------------------------------------------------------

    def train(self) -> None:
        """Step, grow, prune, compact, log, checkpoint: until `train.steps`."""
        train = self.cfg.train
        progress = tqdm(total=train.steps, initial=self.state.step, desc="finetune", disable=not dist.is_main())
        wall, cpu = time.perf_counter(), time.process_time()
        while self.state.step < train.steps:
            started = time.perf_counter()
            step = self.train_step()
            if step.adapter_scores is not None:
                self.grow(step.adapter_scores)
            rho = self.prune_update()
            self.state.record_step_time(time.perf_counter() - started)
            self.compact()
            self.log_step(step, rho)
            progress.update(1)
            progress.set_postfix(loss=f"{self.last_row.get('loss', float('nan')):.3f}",
                                 lr=f"{self.last_row['lr']:.1e}", rem=f"{self.last_row['remaining']:.2f}")
            if self.state.step % train.checkpoint_every == 0 or self.state.step == train.steps:
                self.save_checkpoint()
        progress.close()
        self.loop_seconds = {"train_wall_seconds": time.perf_counter() - wall,
                             "train_cpu_seconds": time.process_time() - cpu}

    def train_step(self) -> StepResult:
        """One optimizer step over `grad_accum` micro-batches; a step with an inf/NaN loss is dropped on every rank."""
        apt, state, accum = self.cfg.apt, self.state, self.cfg.train.grad_accum
        # No growth on the last step: ranks added there would never train, and the rebuild costs time.
        next_step = state.step + 1
        grow_now = apt.grow_every > 0 and next_step % apt.grow_every == 0 and next_step < self.cfg.train.steps
        if apt.distill and state.teacher is None and state.step >= self.cfg.pruning.start_step:
            self.start_teacher()
        result, step_start = StepResult(), self.salience.pack()
        for micro in range(accum):
            batch = dist.to_device(self.splits["train"][self.batches.indices(state.step, micro)])
            self.salience.grad_scale = self.world_size * loss_scale(self.engine)
            # Activations are summed during the forward; a bad one is rolled back.
            sums_before = step_start if micro == 0 else self.salience.pack()
            loss, task_loss = self.training_loss(batch)
            bad_ranks, loss_mean, task_loss_mean = reduce_losses(loss, task_loss)  # same on every rank
            if bad_ranks:
                self.salience.load_packed(sums_before)
                self.skip_step(bad_ranks)
                return StepResult(skipped=True)
            self.engine.backward(loss)
            if grow_now and micro == accum - 1:  # full gradients exist only before the step
                result.adapter_scores = global_adapter_salience(named_adapters(self.engine.module))
            self.engine.step()
            result.loss_sum += task_loss_mean
            result.objective_sum += loss_mean
        state.step += 1
        if not self.engine.was_step_applied():  # fp16 overflow: DeepSpeed dropped the update, lowered the scale
            self.salience.load_packed(step_start)  # the inf gradients in the sums go with it
            self.overflowed()
            return StepResult(skipped=True)
        return result

    def start_teacher(self) -> None:
        """Freeze the adapters as the distillation teacher: the model as pruning starts (collective)."""
        self.state.teacher = freeze_adapters(self.engine.module, read=safe_get_full_fp32_param, device=self.device)
        self.teacher = SharedTeacher(self.state.teacher)

    def overflowed(self) -> None:
        """Count a step DeepSpeed skipped for gradient overflow; salience and rank growth ignore it (every rank)."""
        self.state.overflow_steps += 1
        log.info("step %d: gradient overflow, DeepSpeed skipped the update (loss scale now %g); its salience is "
                 "discarded (%d such steps so far)", self.state.step, loss_scale(self.engine),
                 self.state.overflow_steps)

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective, causal-LM loss): the objective mixes in self-distillation once a teacher exists (design §5)."""
        if self.teacher is None:
            loss = self.engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            return loss, loss
        self.salience.enabled = False  # the teacher's activations are not the student's salience
        teacher_out = self.teacher.outputs(self.engine, batch["input_ids"])
        self.salience.enabled = True
        student_out = self.engine(input_ids=batch["input_ids"], labels=batch["labels"], output_hidden_states=True)
        alive = None if self.state.alive is None else self.state.alive.hidden_mask.nonzero().flatten()
        objective = distill_objective(student_out, teacher_out, self.cfg.apt.distill_weight, alive,
                                      reduce=dist.all_reduce_mean)  # every rank matches layers alike
        return objective, student_out.loss

    def skip_step(self, bad_ranks: list[int]) -> None:
        """Drop this step if train.nonfinite and max_skipped_steps allow it; raise NonFiniteLoss otherwise."""
        train, state = self.cfg.train, self.state
        where = f"step {state.step + 1}: the loss is inf/NaN on rank(s) {bad_ranks}"
        if train.nonfinite == "stop":
            raise NonFiniteLoss(f"{where}; stopping (train.nonfinite=stop). The last checkpoint is intact; set "
                                f"train.nonfinite=skip to drop such steps, or lower train.lr if the run diverges")
        if state.skipped_steps >= train.max_skipped_steps:
            raise NonFiniteLoss(f"{where}, and {state.skipped_steps} steps were skipped already "
                                f"(train.max_skipped_steps); the run is diverging: lower train.lr or check the data")
        state.step += 1
        state.skipped_steps += 1
        log.warning("step %d skipped: inf/NaN loss on rank(s) %s (%d skipped so far)", state.step, bad_ranks,
                    state.skipped_steps)

    def grow(self, adapter_scores: dict[str, float]) -> None:
        """Give the most salient adapters more rank and rebuild the engine, carrying optimizer state over."""
        apt = self.cfg.apt
        plan = plan_rank_growth(list(named_adapters(self.engine.module)), adapter_scores, initial_rank=apt.rank,
                                max_multiplier=apt.max_rank_multiplier, budget_params=self.state.growth_budget)
        if not plan:
            return
        log.info("rank growth: %d adapters grow by %d ranks in all", len(plan), sum(plan.values()))
        generator = torch.Generator().manual_seed(self.cfg.run.seed + self.state.step)  # same new rows on every rank
        self.engine = rebuild_engine(self.engine, self.ds_config, optimizer_factory(self.cfg.train),
                                     reshape=lambda model: grow_adapters(model, plan, generator))

    def prune_one_shot(self) -> None:
        """`pruning.schedule: one_shot`: the final masks from the dense model's scores, fixed before step 0. The cut
        blocks leave the model at once; without a cut the engine is rebuilt, dropping the calibration's gradients."""
        pruning, state, train = self.cfg.pruning, self.state, self.cfg.train
        if self.cfg.apt.distill:
            self.start_teacher()  # the dense model teaches the pruned one
        calibrated = criteria.uses_activations(pruning.criterion)
        if calibrated:
            order = BatchOrder(len(self.splits["train"]), train.micro_batch_size, 1, self.world_size, self.rank,
                               self.cfg.run.seed + ONE_SHOT_SEED_OFFSET)
            accumulate(self.engine, self.salience, [order.indices(i, 0) for i in range(pruning.one_shot_batches)],
                       self.splits["train"], desc="one-shot scores")
        state.ema = criteria.block_scores(pruning.criterion, self.salience, self.fixed_scores, state.alive).to("cpu")
        self.salience.reset()
        state.target, shapes, choice = search_target(self.shape, state.ema, final_remaining(pruning, self.shape),
                                                     pruning, measure=self.measure_shapes,
                                                     layer_order=self.measure_layers())
        state.masks = state.target.clone()
        set_masks(self.engine.module, state.masks)
        if dist.is_main():
            updates.save_update(self.layout.updates, state)
            log_choice(state.step, self.shape, shapes, choice)
        if not self.compact() and calibrated:
            self.engine = rebuild_engine(self.engine, self.ds_config, optimizer_factory(train))

    def prune_update(self) -> float:
        """Inside the window, a salience update and a new target; masks move toward it. Returns ρ_t."""
        pruning, state = self.cfg.pruning, self.state
        if pruning.schedule == "one_shot":  # the masks were fixed before step 0
            return final_remaining(pruning, self.original_shape)
        rho = remaining_fraction(state.step, start=pruning.start_step, end=pruning.end_step,
                                 final=final_remaining(pruning, self.original_shape))
        if updates.in_update_window(state.step, pruning):
            budget = physical_fraction(rho, self.original_shape, self.shape)
            final = final_remaining(pruning, self.original_shape)
            shapes, choice = updates.salience_update(
                self.salience, state, self.shape, budget, self.cfg.apt, pruning, measure=self.measure_shapes,
                fixed=self.fixed_scores, layer_order=self.measure_layers(),
                progress=(1 - rho) / (1 - final) if final < 1 else 1.0,
                original_layers=self.original_shape.num_layers)
            if dist.is_main():
                updates.save_update(self.layout.updates, state)
                log_choice(state.step, self.shape, shapes, choice)
        state.masks = step_toward(state.masks, state.target, pruning.mask_step)
        set_masks(self.engine.module, state.masks)
        return rho

    def measure_shapes(self, candidates: list[MaskSet]) -> ShapeChoice:
        """Each candidate's held-out LM loss on the current model (forward only; collective). Under no_grad, so the
        salience hooks count none of these forwards (they count only passes that will be differentiated)."""
        return choose_shape(self.engine, candidates, self.shape_batches,
                            lambda masks: set_masks(self.engine.module, masks), restore=self.state.masks)

    def measure_layers(self) -> list[int] | None:
        """The layers by block influence on the shape batches, where the run cuts layers (forward only,
        under no_grad like `measure_shapes`; collective)."""
        pruning = self.cfg.pruning
        if not pruning.cuts_layers:
            return None
        return influence_order(self.engine, self.shape_batches, sublayers=pruning.depth_unit == "sublayer")

    # ---- compaction --------------------------------------------------------------------------------------

    def compact(self) -> bool:
        """Cut blocks whose mask and target reached 0 out of the model when enough of them have (collective).
        Returns whether it cut."""
        pruning = self.cfg.pruning
        plan = plan_compaction(self.state.masks, self.state.target, self.shape, pruning.attention_mode,
                               min_fraction=pruning.compact_min_fraction) if pruning.compact else None
        if plan is not None:
            self.cut(plan)
            self.state.compactions.append({"step": self.state.step, "params_before": total_params(plan.before),
                                           "params_after": total_params(plan.after),
                                           "step_time_before": self.state.mean_step_time()})
        self.time_compaction()
        return plan is not None

    def cut(self, plan: CompactionPlan) -> None:
        """Slice the engine, its optimizer state, the masks, the EMA and the accumulator; write the smaller base."""
        started, state = time.perf_counter(), self.state
        if isinstance(self.teacher, SharedTeacher):  # the cut would take blocks out of the teacher too
            self.keep_teacher()
        self.engine = compact_engine(self.engine, plan, self.ds_config, optimizer_factory(self.cfg.train))
        state.masks, state.target = slice_masks(state.masks, plan), slice_masks(state.target, plan)
        state.ema = None if state.ema is None else slice_scores(state.ema, plan)
        compacted = compact_accumulator(self.salience, plan)
        self.salience.detach()
        if self.collects_salience:
            compacted.attach(self.engine.module)
        self.salience, self.shape = compacted, plan.after
        state.alive = narrow_alive(state.alive or MaskSet.ones(plan.before), plan)
        state.base_model = self.layout.compacted_base(state.step)
        if dist.is_main():
            write_compacted_base(self.layout.base_model, state.alive, self.layout.finetune / state.base_model,
                                 self.cfg.model.trust_remote_code)
        sizes = plan.summary()
        log.info("compaction at step %d: layers %d->%d, hidden %d->%d, heads %d->%d, KV heads %d->%d, neurons "
                 "%d->%d, parameters %d->%d (%.2fx); rebuilt in %.1fs", state.step, sizes["layers_before"],
                 sizes["layers_after"], sizes["hidden_before"], sizes["hidden_after"],
                 sizes["heads_before"], sizes["heads_after"], sizes["kv_heads_before"], sizes["kv_heads_after"],
                 sizes["neurons_before"], sizes["neurons_after"], sizes["params_before"], sizes["params_after"],
                 sizes["params_after"] / sizes["params_before"], time.perf_counter() - started)

    def keep_teacher(self) -> None:
        """Give the teacher a model of its own (the original base, frozen adapters merged) before the first cut."""
        started, state = time.perf_counter(), self.state
        state.teacher_model = "teacher"
        self.teacher = materialize(self.teacher, self.cfg.model, self.layout.base_model,
                                   self.layout.finetune / state.teacher_model, self.cfg.apt.alpha / self.cfg.apt.rank,
                                   DTYPES[self.cfg.train.precision], self.device)
        log.info("distillation teacher written to %s before the first compaction (%.1fs)",
                 self.layout.finetune / state.teacher_model, time.perf_counter() - started)

    def time_compaction(self) -> None:
        """Fill in the step time after the latest compaction: steps 2-4 after it (the first warms the new engine)."""
        compactions = self.state.compactions
        if not compactions or "step_time_after" in compactions[-1]:
            return
        event = compactions[-1]
        if self.state.step - event["step"] == 4:
            event["step_time_after"] = self.state.mean_step_time()
            if event["step_time_before"] is None:  # a one-shot cut before step 0: nothing ran before it
                return
            log.info("step time %.3fs before the step-%d compaction, %.3fs after (%.2fx)", event["step_time_before"],
                     event["step"], event["step_time_after"], event["step_time_after"] / event["step_time_before"])

    # ---- metrics, checkpoints, the end ---------------------------------------------------------------------

    def log_step(self, step: StepResult, rho: float) -> None:
        """One metrics row: losses (absent on a skipped step), LR, sizes, throughput."""
        accum, total, kept = self.cfg.train.grad_accum, total_params(self.original_shape), kept_sizes(self.state.masks)
        losses = {} if step.skipped else {"loss": step.loss_sum / accum, "objective": step.objective_sum / accum}
        self.last_row = {**losses, "lr": self.engine.get_lr()[0], "remaining_target": rho,
                         "adapter_params": adapter_params(list(named_adapters(self.engine.module))),
                         "remaining": remaining_params(self.shape, kept) / total, "kept_hidden": kept.hidden,
                         "kept_heads": sum(kept.heads), "kept_neurons": sum(kept.neurons),
                         "tokens_per_s": self.tokens_per_step / self.state.step_times[-1],
                         "skipped_steps": self.state.skipped_steps, "overflow_steps": self.state.overflow_steps,
                         "model_params": total_params(self.shape) / total}
        self.metrics.log_metrics(self.last_row, step=self.state.step)

    def save_checkpoint(self) -> None:
        """Trainable weights + optimizer (DeepSpeed) and the APT state as client state; `latest` moves last.

        DeepSpeed's rank 0 would write `latest` as soon as its own files are done; here it is written (atomically)
        after DeepSpeed's closing barrier, so it never names a tag whose other ranks' files are still being written.
        """
        checkpoints, tag, train = self.layout.checkpoints, f"step{self.state.step}", self.cfg.train
        if dist.is_main():
            write_meta(checkpoints, tag, {
                "adapter_ranks": {name: adapter.rank for name, adapter in named_adapters(self.engine.module)},
                "world_size": self.world_size, "base_model": self.state.base_model,
                "global_batch": train.micro_batch_size * train.grad_accum * self.world_size})
        client_state = self.state.to_checkpoint() | {"apt_salience_sums": self.salience.state_dict(),
                                                     "apt_rng": rng_state()}
        try:
            self.engine.save_checkpoint(str(checkpoints), tag=tag, client_state=client_state,
                                        exclude_frozen_parameters=True, save_latest=False)
        except (OSError, RuntimeError) as e:  # torch.save's zip writer raises an errno-less RuntimeError
            failure = resumable_write_failure(e, checkpoints, tag)
            if failure is None:
                raise
            raise failure from e
        if dist.is_main():
            write_atomic(checkpoints / LATEST, tag)

    def resume(self, point: ResumePoint) -> None:
        """The checkpoint's adapters, optimizer and APT state into the engine; RNG restored."""
        checkpoints = self.layout.checkpoints
        _, client = self.engine.load_checkpoint(str(checkpoints), tag=point.load_tag, load_module_strict=False)
        if client is None:
            raise RuntimeError(f"{checkpoints / point.load_tag}: the checkpoint could not be loaded; "
                               f"delete {checkpoints} to start this stage over")
        self.salience.load_state_dict(client["apt_salience_sums"])
        set_rng_state(client["apt_rng"])
        self.state = AptState.from_checkpoint(client)
        log.info("resumed from %s at step %d%s", point.tag, self.state.step,
                 f" (written by {point.meta['world_size']} ranks, via {point.load_tag})" if point.universal else "")

    def finish(self) -> dict:
        """Validation loss, the final adapters and APT state for the later stages; the stage's summary."""
        train, pruning, state = self.cfg.train, self.cfg.pruning, self.state
        val_loss = evaluate(self.engine, self.splits["validation"], train.micro_batch_size, train.eval_batches,
                            self.world_size, self.rank)
        self.salience.detach()
        kept = kept_sizes(state.masks)
        summary = {"steps": state.step, "final_loss": self.last_row.get("loss"),
                   "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0)),
                   "remaining_fraction": remaining_params(self.shape, kept) / total_params(self.original_shape),
                   "target_remaining": pruning.target_remaining,
                   "kept_hidden": kept.hidden, "kept_heads": list(kept.heads), "kept_neurons": list(kept.neurons),
                   "zero_stage": zero_stage(self.ds_config), "precision": train.precision,
                   "world_size": self.world_size, "skipped_steps": state.skipped_steps,
                   "overflow_steps": state.overflow_steps,
                   "compactions": state.compactions, **self.loop_seconds}
        adapters = trainable_fp32(self.engine)  # every rank takes part: under ZeRO-3 this gathers partitions
        if dist.is_main():
            save_tensors(state.final_tensors(), self.layout.apt_state)
            write_atomic(self.layout.apt_state_json, json_state(state))
            save_tensors(adapters, self.layout.adapters)
        self.metrics.close()
        if self.teacher is not None:
            self.teacher.destroy()
        self.engine.destroy()
        return summary


def log_choice(step: int, shape: ModelShape, shapes: list, choice: ShapeChoice | None) -> None:
    """The candidate shapes of one update and their measured losses, on rank 0."""
    if choice is None:
        return
    for row in describe(shape, shapes, choice):
        log.info("step %d shape candidate: %s", step, candidate_line(row))


def resumable_write_failure(error: BaseException, checkpoints: Path, tag: str) -> WriteFailed | None:
    """A refused checkpoint write, named with its fix and the checkpoint a rerun resumes from (None: not one)."""
    failure = write_failure(error, checkpoints / tag)
    if failure is None:
        return None
    previous = (checkpoints / LATEST).read_text().strip() if (checkpoints / LATEST).is_file() else None
    resumable = WriteFailed(failure.errno, f"{failure.strerror}; a rerun resumes from "
                                           f"{previous or 'the start'}, which is intact")
    resumable.fix = failure.fix
    return resumable


def json_state(state: AptState) -> str:
    """`finetune/apt_state.json`: the final step and the compacted base's folder, for the later stages."""
    return json.dumps({"step": state.step, "base_model": state.base_model}, indent=2)
