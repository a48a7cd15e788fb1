"""eval: validation perplexity and generation speed of the base model against the exported one.

Both load through plain `transformers.AutoModelForCausalLM.from_pretrained`, run the same batches in
the same process, and are timed side by side, so the ratios are meaningful on a noisy machine.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM

from pipeline import dist
from pipeline.model_io import base_model_dir
from pipeline.stage import write_atomic

SECTIONS = ("model", "eval")

log = dist.get_logger("apt.eval")


def run(cfg, run_dir: Path) -> dict:
    section = cfg.eval
    validation = datasets.load_from_disk(str(run_dir / "prep" / "dataset" / "validation")).with_format("torch")
    models = {"base": base_model_dir(cfg.model, run_dir), "pruned": run_dir / "merge" / "model"}
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
    write_atomic(run_dir / "eval" / "metrics.json", json.dumps(metrics, indent=2))
    log.info("eval: perplexity %.2f -> %.2f, params x%.3f, generation speed x%.2f",
             metrics["base"]["val_perplexity"], metrics["pruned"]["val_perplexity"], metrics["params_ratio"],
             metrics["speedup"])
    return {"base_perplexity": metrics["base"]["val_perplexity"],
            "pruned_perplexity": metrics["pruned"]["val_perplexity"],
            "params_ratio": metrics["params_ratio"], "speedup": metrics["speedup"]}


@torch.no_grad()
def perplexity(model, split, batch_size: int, max_batches: int) -> float:
    """Token-weighted perplexity over the first `max_batches` batches of `split`."""
    loss_sum, tokens = 0.0, 0
    for start in range(0, min(len(split), batch_size * max_batches), batch_size):
        batch = split[start:start + batch_size]
        count = int((batch["labels"][:, 1:] != -100).sum())
        loss_sum += model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item() * count
        tokens += count
    return math.exp(loss_sum / max(tokens, 1))


@torch.no_grad()
def generation_speed(model, prompts: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Greedy-decoding tokens per second (median of `repeats`, after one warm-up)."""
    # Unpadded prompts of equal length: every position attends; EOS stands in for the absent pad token.
    options = dict(attention_mask=torch.ones_like(prompts), pad_token_id=model.config.eos_token_id, do_sample=False)
    model.generate(prompts, max_new_tokens=2, **options)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
        times.append(time.perf_counter() - started)
    return prompts.shape[0] * new_tokens / sorted(times)[len(times) // 2]
