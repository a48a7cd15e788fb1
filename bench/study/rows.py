"""The study's rows: each pruner's recipe as pipeline config overrides, and what each row got.

Every row runs the whole pipeline (prep → finetune → salience → finalize → merge) with the same data, steps,
adapters and budget; a row changes only what its recipe changes. The equal-recovery rows differ from APT in the
criterion and the schedule alone (distillation and rank growth on, as in APT); LLM-Pruner's row is that recipe as
its authors run it (one-shot Taylor, then LoRA), a reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ABLATION_TARGET = 0.5


@dataclass(frozen=True)
class Row:
    label: str
    overrides: dict = field(default_factory=dict)
    """Pipeline config sections to update (`apt_run.run_config`)."""
    recovery: dict = field(default_factory=dict)
    """RecoverySettings fields to replace (settings the pipeline config derives from the step count)."""
    targets: tuple[float, ...] = (ABLATION_TARGET,)
    """Where an ablation runs (the main rows run at every target of the study)."""


ONE_SHOT = {"schedule": "one_shot"}
ROWS = {
    "apt": Row("APT (pipeline defaults)"),
    "taylor": Row("Taylor one-shot", {"pruning": {"criterion": "taylor", **ONE_SHOT}}),
    "activation": Row("activation one-shot (Minitron)", {"pruning": {"criterion": "activation", **ONE_SHOT}}),
    "magnitude": Row("magnitude one-shot", {"pruning": {"criterion": "magnitude", **ONE_SHOT}}),
    "random": Row("random one-shot", {"pruning": {"criterion": "random", **ONE_SHOT}}),
    "llm-pruner": Row("LLM-Pruner's recipe", {"pruning": {"criterion": "taylor", **ONE_SHOT},
                                              "apt": {"distill": False, "grow_every": 0}}),
    "apt-no-growth": Row("APT, no rank growth", {"apt": {"grow_every": 0}}),
    "apt-no-distill": Row("APT, no self-distillation", {"apt": {"distill": False}}),
    "apt-global": Row("APT, global density search", {"pruning": {"shape_search": "global"}}),
    "apt-early": Row("APT, pruning window ends at 30% of the steps", recovery={"window_fraction": 0.3}),
    "apt-late": Row("APT, pruning window ends at 80% of the steps", recovery={"window_fraction": 0.8}),
    "apt-activation": Row("APT's schedule, activation scores", {"pruning": {"criterion": "activation"}},
                          targets=(0.7, 0.5, 0.3)),
    "apt-one-shot": Row("APT's salience, one-shot", {"pruning": {"criterion": "apt", **ONE_SHOT}},
                        targets=(0.7, 0.5, 0.3)),
    "apt-after-mask": Row("APT, salience gradient after the mask", {"pruning": {"salience_gradient": "after_mask"}}),
    "apt-no-outlier": Row("APT, no outlier (kurtosis) term", {"apt": {"outlier_term": False}}),
    "apt-momentum-50": Row("APT, salience EMA momentum 0.5", {"apt": {"salience_momentum": 0.5}}),
    "apt-momentum-95": Row("APT, salience EMA momentum 0.95", {"apt": {"salience_momentum": 0.95}}),
    "apt-update-10": Row("APT, a pruning update every 10 steps", recovery={"update_every": 10}),
    "apt-depth": Row("APT, 4 of 8 layers kept (pruning.depth=4)", {"pruning": {"depth": 4}}),
    "apt-auto": Row("APT, layer cuts or widths by loss (pruning.depth=auto)", {"pruning": {"depth": "auto"}}),
    "apt-per-layer": Row("APT, per-layer sizes (pruning.layout=per_layer)", {"pruning": {"layout": "per_layer"}}),
    "apt-sublayer": Row("APT, per-layer, a layer's attention or MLP alone cut by loss (depth_unit=sublayer)",
                        {"pruning": {"layout": "per_layer", "depth": "auto", "depth_unit": "sublayer"}}),
    "apt-per-layer-salience": Row("APT, per-layer sizes ranked by raw salience across layers "
                                  "(per_layer_ranking=salience)",
                                  {"pruning": {"layout": "per_layer", "per_layer_ranking": "salience"}}),
    "apt-sublayer-salience": Row("APT, per-layer raw-salience ranking and sublayer cuts",
                                 {"pruning": {"layout": "per_layer", "per_layer_ranking": "salience", "depth": "auto",
                                              "depth_unit": "sublayer"}}),
    "shortgpt": Row("ShortGPT-style: the 4 lowest-influence layers cut one-shot",
                    {"pruning": {"criterion": "magnitude", "depth": 4, **ONE_SHOT}}),
    "lora": Row("LoRA on the dense model (cost reference)", {"pruning": {"criterion": "magnitude", **ONE_SHOT},
                                                             "apt": {"distill": False, "grow_every": 0}}),
}
NO_RECOVERY_ROWS = {
    f"{criterion}-raw": Row(
        f"{criterion} one-shot, no recovery",
        {"pruning": {"criterion": criterion, **ONE_SHOT}, "apt": {"distill": False, "grow_every": 0},
         "train": {"lr": 1e-12}},  # the pipeline trains at least one step: here one that moves nothing
        recovery={"steps": 1, "warmup_steps": 0})
    for criterion in ("apt", "taylor", "activation", "magnitude", "random")
}
ROWS |= NO_RECOVERY_ROWS
EQUAL_RECOVERY = ("taylor", "activation", "magnitude", "random")
"""The rows with APT's whole recovery (adapters, growth, distillation, compaction, shape search)."""
MAIN = ("apt", *EQUAL_RECOVERY, "llm-pruner")
"""Run at every target and seed."""
ABLATIONS = ("apt-no-growth", "apt-no-distill", "apt-global", "apt-early", "apt-late", "apt-activation",
             "apt-one-shot", "apt-after-mask", "apt-no-outlier", "apt-momentum-50", "apt-momentum-95",
             "apt-update-10", "apt-depth", "apt-auto", "apt-per-layer", "apt-sublayer", "apt-per-layer-salience",
             "apt-sublayer-salience", "shortgpt")
"""Run at their row's targets (ABLATION_TARGET unless it says) with every seed (a change to the method is judged
against the seed spread)."""
PREVIOUS_MACHINE_ONLY = ("apt-no-growth", "apt-no-distill", "apt-global", "apt-early", "apt-late")
"""Ablations measured only on the previous machine's pretrained model (bench/results/study-previous-machine.json):
`--methods` runs them; the default study, timed whole on this machine, leaves them out."""
PER_LAYER = ("apt-per-layer", "apt-sublayer", "apt-per-layer-salience", "apt-sublayer-salience")
"""The per-layer layout without and with sublayer cuts, each with the default ranking across layers (relative to
each layer) and with raw salience (`--methods`: 7-9 min a pair here, which would take the default study past its
90-minute budget)."""
OPT_IN = PREVIOUS_MACHINE_ONLY + PER_LAYER
"""Ablations the default run leaves out."""
CRITERION_BY_SCHEDULE = {("apt", "gradual"): "apt", ("apt", "one_shot"): "apt-one-shot",
                         ("activation", "gradual"): "apt-activation", ("activation", "one_shot"): "activation"}
"""APT's salience and activation scores, each with APT's gradual schedule and one-shot: the rows that tell a
criterion's effect from the schedule's, at every target."""
NO_RECOVERY = tuple(NO_RECOVERY_ROWS)
"""Each criterion's one-shot cut of the dense model, scored as cut: how far apart the rankings are before recovery.
Run at every target with the first seed."""
LORA = "lora"
"""Run at target 1.0 (nothing pruned, masks all ones, no hooks) with every seed: the finetune-time reference."""


def ingredients(cfg) -> dict:
    """What a run's recovery consisted of, read from its pipeline config."""
    pruning, apt, train = cfg.pruning, cfg.apt, cfg.train
    teacher_steps = 0
    if apt.distill:
        teacher_steps = train.steps if pruning.schedule == "one_shot" else train.steps - pruning.start_step
    return {"criterion": pruning.criterion, "schedule": pruning.schedule, "distill": apt.distill,
            "grow": apt.grow_every > 0, "steps": train.steps,
            "tokens": train.steps * train.micro_batch_size * train.grad_accum * cfg.data.seq_len,
            "teacher_forwards": teacher_steps, "shape_search": pruning.shape_search,
            "salience_gradient": pruning.salience_gradient, "outlier_term": apt.outlier_term, "depth": pruning.depth,
            "depth_unit": pruning.depth_unit, "layout": pruning.layout, "per_layer_ranking": pruning.per_layer_ranking,
            "calibration_batches": pruning.one_shot_batches if pruning.schedule == "one_shot" else 0}
