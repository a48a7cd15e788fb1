"""merge: fold the adapters into the base weights, cut the pruned blocks out, write a plain HF checkpoint.

The export streams the base one layer at a time (`pipeline.export`), so the stage holds about one layer in memory
whatever the model size. The result in `merge/model/` loads with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from transformers import AutoTokenizer

from pipeline import dist
from pipeline.apt.masks import MaskSet
from pipeline.config import MergeConfig
from pipeline.export import DTYPES, export_pruned
from pipeline.layout import RunLayout

Config = MergeConfig

log = dist.get_logger("apt.merge")


def run(cfg: MergeConfig, run_dir: Path) -> dict:
    layout = RunLayout(run_dir, cfg.model)
    masks = MaskSet.from_dict(load_file(str(layout.final_masks)))
    summary = export_pruned(
        base_dir=layout.tuned_base,
        adapters_path=layout.adapters,
        masks=masks,
        scaling=cfg.apt.alpha / cfg.apt.rank,
        dtype=DTYPES[cfg.export.dtype],
        out_dir=layout.export,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    AutoTokenizer.from_pretrained(str(layout.tokenizer)).save_pretrained(str(layout.export))
    log.info("merge: wrote %s (%d parameters, %s)", layout.export, summary["params"], cfg.export.dtype)
    return summary
