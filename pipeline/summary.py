"""The end-of-run summary the driver prints: what was pruned, how it scores, how fast it is, where it is."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.layout import RunLayout


def run_summary(run_dir: Path, base_model: str) -> str | None:
    """The summary of a finished run from `eval/metrics.json`; None when the eval stage wrote none."""
    layout = RunLayout(run_dir)
    if not layout.eval_metrics.is_file():
        return None
    metrics = json.loads(layout.eval_metrics.read_text())
    base, pruned = metrics["base"], metrics["pruned"]
    lines = [f"model        {base_model} -> {layout.export}",
             f"parameters   {base['params']:,} -> {pruned['params']:,} (x{metrics['params_ratio']:.3f})",
             f"shape        {describe_shape(base['shape'])} -> {describe_shape(pruned['shape'])}",
             f"perplexity   {base['val_perplexity']:.2f} -> {pruned['val_perplexity']:.2f} "
             f"(x{pruned['val_perplexity'] / base['val_perplexity']:.2f}) on the held-out blocks"]
    for task, scores in base.get("lm_eval", {}).items():
        after = pruned["lm_eval"][task]
        figures = ", ".join(f"{metric} {value:.4g} -> {after[metric]:.4g}" for metric, value in scores.items())
        lines.append(f"lm-eval      {task}: {figures}")
    lines.append(f"speed-up     {describe_speed(metrics['speed'])}")
    remote = ", trust_remote_code=True" if pruned["shape"]["per_layer"] else ""  # its modeling code is beside it
    load = f'AutoModelForCausalLM.from_pretrained("{layout.export}"{remote})'
    lines.append(f"load it      {load}")
    return "run summary\n  " + "\n  ".join(lines)


def describe_shape(shape: dict) -> str:
    """Sizes in one line; a per-layer model's lists run over its layers (records before lists held layer 0's)."""
    per_layer = ", per layer" if shape["per_layer"] else ""
    return (f"hidden {shape['hidden']} / {shape['heads']} heads ({shape['kv_heads']} KV) / "
            f"{shape['intermediate']} neurons x {shape['layers']} layers{per_layer}")


def describe_speed(speed: dict) -> str:
    """The median generation speed-up, or why it is not a result (the spread over the rounds)."""
    where = f"over {speed['rounds']} interleaved rounds, {speed['threads']} thread(s)"
    if speed["reliable"]:
        return f"x{speed['speedup']:.2f} generation (interquartile spread {speed['spread']:.0%} {where})"
    return (f"not measured reliably: x{speed['speedup']:.2f} with a spread of {speed['spread']:.0%} {where} "
            f"(a busy machine?); bench/inference_speed.py measures it with more rounds")
