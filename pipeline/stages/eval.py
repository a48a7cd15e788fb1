"""eval: validation perplexity and generation speed of the base model against the exported one.

Both load through plain `transformers.AutoModelForCausalLM.from_pretrained`, run the same batches in
the same process, and are timed side by side, so the ratios are meaningful on a noisy machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM

from pipeline import dist
from pipeline.config import EvalConfig
from pipeline.evaluation import generation_speed, perplexity
from pipeline.layout import RunLayout
from pipeline.stage import write_atomic

Config = EvalConfig

log = dist.get_logger("apt.eval")


def run(cfg: EvalConfig, run_dir: Path) -> dict:
    section, layout = cfg.eval, RunLayout(run_dir, cfg.model)
    validation = datasets.load_from_disk(str(layout.dataset / "validation")).with_format("torch")
    models = {"base": layout.base_model, "pruned": layout.export}
    prompts = validation[: section.batch_size]["input_ids"][:, : section.prompt_tokens]
    metrics = {}
    for name, directory in models.items():
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                     trust_remote_code=cfg.model.trust_remote_code).eval()
        metrics[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "val_perplexity": perplexity(model, validation, section.batch_size, section.batches),
            "generate_tokens_per_s": generation_speed(model, prompts, section.new_tokens, section.repeats),
        }
        del model
    metrics["params_ratio"] = metrics["pruned"]["params"] / metrics["base"]["params"]
    metrics["speedup"] = metrics["pruned"]["generate_tokens_per_s"] / metrics["base"]["generate_tokens_per_s"]
    write_atomic(layout.eval_metrics, json.dumps(metrics, indent=2))
    log.info("eval: perplexity %.2f -> %.2f, params x%.3f, generation speed x%.2f",
             metrics["base"]["val_perplexity"], metrics["pruned"]["val_perplexity"], metrics["params_ratio"],
             metrics["speedup"])
    return {"base_perplexity": metrics["base"]["val_perplexity"],
            "pruned_perplexity": metrics["pruned"]["val_perplexity"],
            "params_ratio": metrics["params_ratio"], "speedup": metrics["speedup"]}
