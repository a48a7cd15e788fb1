"""eval: the base model against the export: perplexity, lm-eval-harness scores, generation speed-up.

Both load through plain `transformers.AutoModelForCausalLM.from_pretrained` and stay loaded, so they run the
same batches in the same process and are timed in interleaved rounds: the ratio holds on a busy machine. They sit on
the accelerator when there is one, in their own dtype (`eval_placement`); on CPU ranks in fp32.
Writes `eval/metrics.json`; its scalars also go to the stage's metrics, which the driver logs to MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import dist, tracking
from pipeline.config import EvalConfig
from pipeline.evaluation import interleaved_speedup, model_sizes, perplexity
from pipeline.layout import RunLayout
from pipeline.lm_eval_tasks import lm_eval_scores
from pipeline.stage import write_atomic

Config = EvalConfig

log = dist.get_logger("apt.eval")


def run(cfg: EvalConfig, run_dir: Path) -> dict:
    section, layout = cfg.eval, RunLayout(run_dir, cfg.model)
    validation = datasets.load_from_disk(str(layout.dataset / "validation")).with_format("torch")
    if section.lm_eval_tasks and not layout.heldout_text.is_file():
        raise FileNotFoundError(f"{layout.heldout_text} not found: the prep stage of an older version wrote "
                                f"none; run again with --from prep, or set eval.lm_eval_tasks=[]")
    models = {name: load_for_eval(directory, cfg.model.trust_remote_code)
              for name, directory in (("base", layout.base_model), ("pruned", layout.export))}
    tokenizer = AutoTokenizer.from_pretrained(str(layout.tokenizer))
    metrics = {}
    for name, model in models.items():
        metrics[name] = {"params": sum(p.numel() for p in model.parameters()), "shape": model_sizes(model.config),
                         "val_perplexity": perplexity(model, validation, section.batch_size, section.batches)}
        if section.lm_eval_tasks:
            metrics[name]["lm_eval"] = lm_eval_scores(model, tokenizer, section.lm_eval_tasks, layout.heldout_text,
                                                      batch_size=section.batch_size, limit=section.lm_eval_limit)
    metrics["params_ratio"] = metrics["pruned"]["params"] / metrics["base"]["params"]
    prompts = validation[: section.batch_size]["input_ids"][:, : section.prompt_tokens]
    metrics["speed"] = interleaved_speedup(models["base"], models["pruned"], prompts, section.new_tokens,
                                           section.rounds, section.max_spread)
    write_atomic(layout.eval_metrics, json.dumps(metrics, indent=2))
    logger = tracking.metric_logger(layout.eval_metrics.parent)
    logger.log_metrics(scalar_metrics(metrics), step=0)
    logger.close()
    speed = metrics["speed"]
    log.info("eval: perplexity %.2f -> %.2f, params x%.3f, generation speed x%.2f (spread %.0f%%%s)",
             metrics["base"]["val_perplexity"], metrics["pruned"]["val_perplexity"], metrics["params_ratio"],
             speed["speedup"], 100 * speed["spread"], "" if speed["reliable"] else ", unreliable")
    return {"base_perplexity": metrics["base"]["val_perplexity"],
            "pruned_perplexity": metrics["pruned"]["val_perplexity"], "params_ratio": metrics["params_ratio"],
            "speedup": speed["speedup"], "speedup_reliable": speed["reliable"]}


def load_for_eval(directory: Path, trust_remote_code: bool):
    """A checkpoint in eval mode where `eval_placement` says; on an accelerator read straight onto it (device_map),
    so the host never holds a whole copy."""
    device, dtype = eval_placement()
    on_accelerator = device.type != "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, trust_remote_code=trust_remote_code,
                                                 device_map=str(device) if on_accelerator else None)
    return model.to(device).eval()


def eval_placement() -> tuple[torch.device, torch.dtype | str]:
    """Where the two models run: DeepSpeed's accelerator in each checkpoint's own dtype ("auto"), or the CPU in
    fp32 (a CPU has no fast 16-bit matmul in general, and the CPU figures stay comparable across runs)."""
    if dist.on_cpu():
        return torch.device("cpu"), torch.float32
    return dist.device(), "auto"


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The figures a run table lines up: `<model>_<metric>` and `<model>_<task>_<metric>`, ratio and speed-up."""
    out = {"params_ratio": metrics["params_ratio"], "speedup": metrics["speed"]["speedup"],
           "speedup_spread": metrics["speed"]["spread"]}
    for name in ("base", "pruned"):
        out[f"{name}_params"] = metrics[name]["params"]
        out[f"{name}_val_perplexity"] = metrics[name]["val_perplexity"]
        for task, scores in metrics[name].get("lm_eval", {}).items():
            out |= {f"{name}_{task}_{metric}": value for metric, value in scores.items()}
    return out
