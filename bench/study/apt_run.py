"""The study's pipeline runs: one config shape for the data prep, APT itself, and the baselines' budget.

`run_config` is the single source of the recovery budget: every row of the study runs the pipeline with it (finetune,
salience, finalize, merge through the driver's own step plan, one rank), its row's overrides on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pipeline import config as config_lib
from pipeline import preflight
from pipeline.run import expected_fingerprint, plan_steps, run_stage, run_step, stage_by_name
from pipeline.stage import is_done, write_atomic

CORPUS = "data/python-docs.jsonl"
DS_CONFIG = "ds_configs/zero2_cpu.json"
MASTER_PORT = 29731
"""Not DeepSpeed's default 29500, which other jobs on a shared machine (tests) may hold."""


@dataclass(frozen=True)
class RecoverySettings:
    """The budget every method gets: steps × micro batch × seq_len tokens, adapters, optimizer."""

    steps: int = 120
    micro_batch_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 10
    rank: int = 8
    alpha: float = 16.0
    adapter_targets: tuple[str, ...] = ("q_proj", "v_proj", "up_proj", "down_proj")
    window_fraction: float = 0.6
    """APT's pruning window ends at this fraction of the steps; the rest trains with its final masks."""
    update_every: int = 5
    mask_step: float = 0.1
    calibration_batches: int = 8
    """Batches of micro_batch_size rows for the salience stage and the one-shot rows' scores."""
    attention_mode: str = "query_in_group"
    """With 2 KV heads a kv_group unit (one KV group in every layer) is ~8% of the model, so the prefix search
    can stop several points under a target; trimming query heads evenly per group (~3%) lands every method closer."""
    layout: str = "uniform"

    @property
    def end_step(self) -> int:
        """window_fraction of the steps, or earlier where the gradual masks would not reach 0 or 1 by the end."""
        latest = self.steps - math.ceil(1 / self.mask_step)
        return max(1, min(math.floor(self.window_fraction * self.steps), latest))

    @property
    def grow_every(self) -> int:
        """configs/tiny.yaml's proportion (30 steps, growth every 10): two growths, at 1/3 and 2/3 of the steps."""
        return max(1, self.steps // 3)


@dataclass(frozen=True)
class DataSettings:
    vocab_size: int = 4096
    seq_len: int = 128
    validation_fraction: float = 0.1
    seed: int = 0


def run_config(root: Path, name: str, data: DataSettings, recovery: RecoverySettings | None = None, *,
               model_path: Path | None = None, tokenizer_path: Path | None = None,
               target_remaining: float = 0.5, seed: int | None = None,
               overrides: dict[str, dict] | None = None) -> config_lib.RunConfig:
    """The pipeline config of one study run; `recovery` None is the data-only run (prep trains the tokenizer).

    `seed` (default data.seed) is run.seed: data order, adapter init; `overrides` update sections (ablations).
    """
    raw = {
        "run": {"name": name, "root": str(root), "seed": data.seed if seed is None else seed},
        "data": {"sources": [CORPUS], "seq_len": data.seq_len, "validation_fraction": data.validation_fraction},
        "tokenizer": {"path": None if tokenizer_path is None else str(tokenizer_path), "vocab_size": data.vocab_size},
        "model": {"path": None if model_path is None else str(model_path), "max_position_embeddings": data.seq_len},
        "deepspeed": {"config": DS_CONFIG, "num_gpus": 1, "master_port": MASTER_PORT},
        "export": {"dtype": "float32"},  # scored in fp32 like the baselines
    }
    if recovery is not None:
        raw |= {
            "apt": {"adapter_targets": list(recovery.adapter_targets), "rank": recovery.rank, "alpha": recovery.alpha,
                    "grow_every": recovery.grow_every},
            "pruning": {"target_remaining": target_remaining, "start_step": 0, "end_step": recovery.end_step,
                        "update_every": recovery.update_every, "mask_step": recovery.mask_step,
                        "attention_mode": recovery.attention_mode, "layout": recovery.layout,
                        "one_shot_batches": recovery.calibration_batches},
            "train": {"steps": recovery.steps, "micro_batch_size": recovery.micro_batch_size, "grad_accum": 1,
                      "lr": recovery.lr, "warmup_steps": recovery.warmup_steps, "precision": "fp32",
                      "checkpoint_every": recovery.steps, "eval_batches": 2},
            "salience": {"batches": recovery.calibration_batches},
            # The eval stage's own numbers are not the study's (every model is scored by recover.evaluate);
            # keep its generation timing short.
            "eval": {"batches": 2, "new_tokens": 4, "rounds": 1, "lm_eval_tasks": []},
        }
    for section, values in (overrides or {}).items():
        raw[section] = raw.get(section, {}) | values
    return config_lib.from_dict(raw)


def prepare_data(cfg: config_lib.RunConfig) -> tuple[Path, str]:
    """Run the prep stage unless it is done; the run's prep folder and the stage's fingerprint."""
    stage = stage_by_name("prep")
    fingerprint = expected_fingerprint(stage, cfg, cfg.run_dir)
    if not is_done(cfg.run_dir / "prep", fingerprint):
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        run_stage(stage, cfg, cfg.run_dir)
    return cfg.run_dir / "prep", fingerprint


def run_apt(cfg: config_lib.RunConfig, split_cfg: config_lib.RunConfig | None = None) -> Path:
    """The whole pipeline on one rank (stages already done with this config are skipped); the merged model.

    prep runs with `split_cfg` (the study's data seed), so every seed's run trains and is scored on the same
    train / validation split; the later stages run with `cfg` (its run.seed: data order, adapter init).
    """
    preflight.check(cfg)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.yaml", config_lib.dump(cfg))
    for stages, stage_cfg, runs in plan_steps(cfg, run_dir, configs={"prep": split_cfg} if split_cfg else None):
        if runs:
            run_step(stages, stage_cfg, run_dir)
    return run_dir / "merge" / "model"
