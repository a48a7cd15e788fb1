"""finetune: APT under DeepSpeed ZeRO, on every rank (the driver starts it with the `deepspeed` launcher).

The work is `pipeline.recipe.AptFinetuneRecipe`; this stage runs it and hands its summary to the manifest.
Writes `finetune/adapters.safetensors`, `finetune/apt_state.safetensors` (+ `.json`) and the checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import FinetuneConfig
from pipeline.recipe import AptFinetuneRecipe

Config = FinetuneConfig


def run(cfg: FinetuneConfig, run_dir: Path) -> dict:
    recipe = AptFinetuneRecipe(cfg, run_dir)
    recipe.setup()
    recipe.train()
    return recipe.finish()
