"""The speed table from one command: fine-tuning overhead, compaction, export inference and memory ratios.

Runs the `measure` of bench/finetune_overhead.py, bench/compaction.py and bench/inference_speed.py one after
another in this process, each with its own interleaved rounds (and finetune_overhead's peak-memory children), at
each script's default sizes (`--quick`: their --quick sizes), and prints one table of ratios. Run from the
repository root: `.venv/bin/python bench/speed_table.py [--quick] [--results bench/RESULTS.md]`.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import compaction
import finetune_overhead
import inference_speed

from report import environment_lines, write_section

SECTION = "## Speed table (one command)"
SCRIPTS = {"finetune_overhead": finetune_overhead, "compaction": compaction, "inference_speed": inference_speed}


@dataclass
class Ratio:
    """One row: a ratio by wall clock (and by CPU time), what it was measured on, and its target if it has one."""

    item: int  # the numbering: 1 salience overhead, 2 compaction, 3 export inference, 4 peak memory
    what: str
    wall: float
    cpu: float | None
    model: str
    rounds: str
    target: str = "–"
    met: bool | None = None
    script: str = ""  # the script that measured it; its own command gives the full report
    load: tuple[float, float] = (math.nan, math.nan)  # 1-minute load average before and after that script ran


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every script's --quick sizes and rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    parser.add_argument("--results", type=Path, default=None, help=f"markdown file whose '{SECTION}' section to write")
    return parser.parse_args(argv)


def script_argv(quick: bool, threads: int) -> dict[str, list[str]]:
    """Per script, the command-line arguments its measurement runs with (the floor model and profile add no ratio)."""
    common = ["--threads", str(threads), *(["--quick"] if quick else [])]
    inference = ["--dtype", "float32", "--batch", "16", "1", "--no-floor", "--no-profile"]
    return {"finetune_overhead": common, "compaction": common, "inference_speed": [*common, *inference]}


def training_model(args: argparse.Namespace, params: int) -> str:
    return (
        f"{params / 1e6:.1f}M params: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / "
        f"{args.kv_heads} KV; batch {args.batch} × seq {args.seq}"
    )


def finetune_rows(args: argparse.Namespace, result: dict) -> list[Ratio]:
    model = training_model(args, result["params"])
    steps = f"{len(result['rounds'])} rounds + {args.warmup} warm-up, threads {args.threads}"
    rows = [
        Ratio(
            1,
            "salience overhead: APT step / LoRA step",
            result["ratio_wall"],
            result["ratio_cpu"],
            model,
            steps,
            f"≤ {finetune_overhead.TARGET:.2f}×",
            bool(result["ratio_cpu"] <= finetune_overhead.TARGET),
        )
    ]
    if result["memory"]:
        children = (
            f"child processes per variant: {args.memory_repeats}, {args.memory_steps} steps each, "
            f"threads {args.threads}"
        )
        rows.append(Ratio(4, "peak RSS: APT / full fine-tuning", result["peak_ratio"], None, model, children))
    return rows


def compaction_rows(args: argparse.Namespace, result: dict) -> list[Ratio]:
    dense, compacted = result["dense"], result["compacted"]
    model = training_model(args, dense["params"]) + f"; compacted {compacted['params'] / 1e6:.1f}M"
    return [
        Ratio(
            2,
            f"compaction: compacted step / dense step at {result['remaining']:.3f} of the parameters",
            result["ratio_wall"],
            result["ratio_cpu"],
            model,
            f"{result['rounds']} rounds + {args.warmup} warm-up, threads {args.threads}",
            f"≤ {compaction.TARGET:.2f}×",
            bool(result["ratio_cpu"] <= compaction.TARGET),
        )
    ]


def inference_rows(args: argparse.Namespace, result: dict) -> list[Ratio]:
    (dense, _), (pruned, _) = result["params"]["dense"], result["params"]["pruned"]
    summary = result["summary"]
    model = (
        f"{dense / 1e6:.1f}M → {pruned / 1e6:.1f}M params: hidden {args.hidden} → {summary['hidden_size']}, "
        f"{args.layers} layers; prompt {args.prompt} + {args.new_tokens} new tokens"
    )
    rounds = f"{args.repeats} rounds + {args.warmup} warm-up, threads {args.threads}"
    rows = []
    for workload, target in (("generate", inference_speed.TARGET), ("prefill", None)):
        for batch in args.batch:
            speedup = result["speedup"][(args.dtype[0], workload, batch)]
            rows.append(
                Ratio(
                    3,
                    f"export at {result['remaining']:.3f} of the parameters / dense: {workload} tok/s, batch {batch}",
                    speedup["wall"],
                    speedup["cpu"],
                    model,
                    rounds,
                    "–" if target is None else f"≥ {target:.1f}×",
                    None if target is None else bool(speedup["cpu"] >= target),
                )
            )
    return rows


ROWS = {"finetune_overhead": finetune_rows, "compaction": compaction_rows, "inference_speed": inference_rows}


def measure_rows(argvs: dict[str, list[str]]) -> tuple[list[Ratio], dict]:
    """Run every script's `measure` with its arguments from `argvs`; the rows in the issue's order, and the results."""
    rows, results = [], {}
    for name, module in SCRIPTS.items():
        print(f"== {name} {shlex.join(argvs[name])}", file=sys.stderr, flush=True)
        args = module.parse_args(argvs[name])
        load_before, started = os.getloadavg()[0], time.perf_counter()
        results[name] = module.measure(args)
        results[name]["seconds"] = time.perf_counter() - started
        for row in ROWS[name](args, results[name]):
            row.script, row.load = name, (load_before, os.getloadavg()[0])
            rows.append(row)
    return sorted(rows, key=lambda row: row.item), results


def table(rows: list[Ratio]) -> list[str]:
    lines = [
        "| # | ratio | wall clock | CPU time | target | model | rounds, threads | load avg | measured by |",
        "|---:|---|---:|---:|---|---|---|---|---|",
    ]
    for row in rows:
        cpu = "–" if row.cpu is None else f"{row.cpu:.2f}×"
        target = row.target if row.met is None else f"{row.target} ({'met' if row.met else '**missed**'})"
        lines.append(
            f"| {row.item} | {row.what} | {row.wall:.2f}× | {cpu} | {target} | {row.model} | {row.rounds} "
            f"| {row.load[0]:.1f} → {row.load[1]:.1f} | `{row.script}.py` |"
        )
    return lines


def report(command: str, argvs: dict[str, list[str]], rows: list[Ratio], results: dict, quick: bool = False) -> str:
    """The markdown section: command, machine, table, what each ratio is, and each script's full-report command."""
    finetune = results["finetune_overhead"]
    quick_note = "- --quick: every script's smaller sizes and fewer rounds, to check the command runs"
    lines = [
        SECTION,
        "",
        f"`{command}`",
        "",
        *environment_lines(),
        "- each script's `measure` ran in this one process, one script after another; per row, the 1-minute load "
        "average before and after its script ran",
        *([quick_note] if quick else []),
        "",
        *table(rows),
        "",
        "- 1, 2: median over rounds of the per-round ratio of training-step times (forward + backward + AdamW), "
        "both variants back to back in each round, order rotating; LoRA = the same wrapped model with the "
        "salience hooks off and all-ones masks; APT / plain LoRA (adapters without mask wrappers): "
        f"{finetune_overhead.paired_ratio(finetune['rounds'], 'apt', 'lora-plain', 'cpu'):.2f}× CPU time",
        "- 3: speed-up = median over rounds of dense time / pruned time (above 1: the export is faster); greedy "
        "generate of exactly the listed new tokens, prefill = one forward over the prompt; both models loaded with "
        "`AutoModelForCausalLM.from_pretrained` in float32",
    ]
    if finetune["memory"]:
        lines.append(
            "- 4: median peak RSS (VmHWM) of child processes, each training a few steps of one variant; above the "
            f"runtime's RSS (torch and transformers imported): {finetune['peak_ratio_above_runtime']:.2f}×"
        )
    seconds = ", ".join(f"{name} {results[name]['seconds']:.0f} s" for name in SCRIPTS)
    lines += [
        f"- time: {seconds}",
        "- the same measurements with each script's full report:",
        *(f"  - `.venv/bin/python bench/{name}.py {shlex.join(argvs[name])}`" for name in SCRIPTS),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *argv])
    argvs = script_argv(args.quick, args.threads)
    rows, results = measure_rows(argvs)
    section = report(command, argvs, rows, results, args.quick)
    print(section)
    if args.results is not None:
        write_section(args.results, SECTION, section)


if __name__ == "__main__":
    main()
