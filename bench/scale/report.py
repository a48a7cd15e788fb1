"""The bench/RESULTS.md section of the scale run: per-stage table, plan against measured, merge, full fine-tuning."""

from __future__ import annotations

import shlex
from pathlib import Path

from bench.report import write_section

SECTION = "## Scale: 1 B parameters through the chain"


def write_markdown(path: Path, report: dict, argv: list[str]) -> None:
    """Replace the scale section of `path` with this run's tables."""
    write_section(path, SECTION, "\n".join(section_lines(report, argv)) + "\n")


def section_lines(report: dict, argv: list[str]) -> list[str]:
    shape, billions = report["shape"], report["params"] / 1e9
    overrides = [arg for arg in report["chain_command"] if "=" in arg]
    lines = [
        SECTION, "",
        f"`.venv/bin/python -m bench.scale.run_scale {shlex.join(argv[1:])}`".replace(" `", "`"), "",
        *report["environment"],
        f"- model: {report['params']:,} parameters (hidden {shape['hidden']}, {shape['layers']} layers, "
        f"{shape['heads']} query / {shape['kv_heads']} KV heads, intermediate {shape['intermediate']}, vocabulary "
        f"{shape['vocab']}, untied; random init), sharded bf16 safetensors",
        f"- chain: `apt-pipeline run --config configs/tiny.yaml` with {' '.join(f'`{o}`' for o in overrides)}: "
        f"ZeRO-3 on 2 CPU ranks, bf16, {report['steps']} steps: the default method (rank growth, "
        f"self-distillation, compaction, measured shape choice) on a short schedule. "
        f"{report['chain_seconds'] / 60:.1f} min for the chain"
        + (f", {report['bench_seconds'] / 60:.1f} min for the whole script (models built, comparison run)."
           if report.get("bench_seconds") else "."),
        "- memory: a poller reads every process's VmHWM (ranks: the exact peak) and VmRSS (the driver, per stage) "
        "five times a second (bench/scale/sampler.py)", "",
        *stage_table(report["stages"], billions), "", *plan_lines(report), "", *merge_lines(report), "",
        *full_finetune_lines(report["full_finetune"]),
    ]
    return lines


def stage_table(stages: dict, billions: float) -> list[str]:
    lines = ["| stage | wall s | s per B params | driver peak GiB | rank peaks GiB | written GiB (files) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, s in stages.items():
        ranks = " / ".join(f"{v:.2f}" for v in s["rank_peak_GiB"]) or "-"
        lines.append(f"| {name} | {s['wall_s']:.1f} | {s['wall_s'] / billions:.1f} | {s['driver_peak_GiB']:.2f} "
                     f"| {ranks} | {s['written_GiB']:.2f} ({s['written_files']}) |")
    lines.append("")
    lines.append("Wall time is the driver's (launcher start-up and model loading included). The finetune is the "
                 "only stage that trains; salience and merge work on the compacted half-size model.")
    return lines


def plan_lines(report: dict) -> list[str]:
    plan = report["plan"]
    verdict = "within" if plan["within_15_percent"] else "outside"
    teacher = (f" ({plan['plan_zero3_without_teacher']:.2f} for ZeRO-3 + {plan['plan_teacher']:.2f} for the "
               f"distillation teacher's own copy)" if plan.get("plan_teacher") else "")
    return [f"**Plan against measured (finetune, per rank):** `{plan['plan_command']}` gives "
            f"{plan['plan_zero3_per_rank']:.2f} GiB{teacher}; the ranks peaked at {plan['measured_per_rank']:.2f} "
            f"GiB: {plan['measured_over_plan']:.2f}x the plan, {verdict} 15%."]


def merge_lines(report: dict) -> list[str]:
    merge = report["merge"]
    same = "equals" if merge["equal"] else "DIFFERS FROM"
    return [f"**Merge:** the driver grew by {merge['growth_GiB']:.2f} GiB while exporting from a "
            f"{merge['base_GiB']:.2f} GiB checkpoint ({merge['growth_over_model']:.2f}x the model); the export's "
            f"{merge['export_params']:,} parameters {same} finalize/masks.json's {merge['masks_remaining_params']:,}."]


def full_finetune_lines(full: dict) -> list[str]:
    apt = " / ".join(f"{v:.2f}" for v in full["apt_peak_GiB"])
    everything = " / ".join(f"{v:.2f}" for v in full["full_peak_GiB"])
    teacher = 2 * full["params"] / 2**30
    return [
        f"**APT against full fine-tuning** (bench/scale/memory_worker.py, same checkpoint, ZeRO-3 template, 2 ranks, "
        f"micro batch 1 x {full.get('seq_len', 256)} tokens, 3 steps): the largest depth full fine-tuning fits here is "
        f"{full['layers']} layers ({full['params'] / 1e9:.2f} B parameters; chosen from a 2-layer probe's bytes per "
        f"parameter against 70% of RAM).", "",
        "| variant | trainable params | rank peaks GiB |", "|---|---:|---:|",
        f"| APT (masked adapters, salience hooks) | {full['apt_trainable']:,} | {apt} |",
        f"| full fine-tuning | {full['full_trainable']:,} | {everything} |", "",
        f"APT / full fine-tuning peak: **{full['apt_over_full']:.2f}x** (goal <= 0.5x); above the "
        f"{full['runtime_GiB']:.2f} GiB each rank holds before loading a model: "
        f"{full['apt_over_full_above_runtime']:.2f}x. The APT variant trains without the distillation teacher; "
        f"from the first compaction on the teacher's own bf16 copy adds {teacher:.2f} GiB per rank, which would make "
        f"it {(max(full['apt_peak_GiB']) + teacher) / max(full['full_peak_GiB']):.2f}x (added, not measured; the "
        f"chain above measures it at 1.1 B).",
    ]
