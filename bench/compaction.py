"""Training step time of a compacted model against the dense model it came from (issue 7: ≤ 0.60 at ~50 %).

Both variants are the same APT-wrapped decoder with the same binary masks (a `search_masks` result at
`--remaining`, uniform layout, on fixed random scores), salience hooks attached, AdamW on the adapters; in the
compacted one the masked blocks are cut out (`plan_compaction` + `compact_model`), so it is the model finetune
trains once every pruned block is dead. Step times come from one process running both round-robin (the order
alternates), as in bench/finetune_overhead.py. Run from the repository root (bench/RESULTS.md gives the command of
the recorded run): `.venv/bin/python bench/compaction.py --results bench/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch
from finetune_overhead import (
    HookTimer,
    TimedVariant,
    adamw,
    add_model_and_training_args,
    build_apt_model,
    make_batch,
    median_time,
    paired_ratio,
    time_steps,
)

from pipeline.apt.adapters import set_masks
from pipeline.apt.blocks import ModelShape, kept_sizes, remaining_params, total_params
from pipeline.apt.compaction import compact_model, plan_compaction
from pipeline.apt.salience import SalienceAccumulator, SalienceScores
from pipeline.apt.search import search_masks

from report import environment_lines, write_section

SECTION = "## Compaction: training step time"
TARGET = 0.60  # compacted step over dense step at ~50 % remaining parameters
QUICK = {"hidden": 256, "layers": 4, "intermediate": 688, "vocab": 4096, "seq": 128, "steps": 4, "warmup": 1}
"""--quick: a smaller model and fewer rounds, to check that the script runs (its numbers are not the recorded ones)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_training_args(parser)
    pruning = parser.add_argument_group("pruning")
    pruning.add_argument("--remaining", type=float, default=0.5, help="remaining fraction the masks are searched at")
    pruning.add_argument("--attention-mode", choices=("kv_group", "query_in_group"), default="kv_group")
    pruning.add_argument("--round-to", type=int, default=8)
    run = parser.add_argument_group("measurement")
    run.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    run.add_argument("--warmup", type=int, default=3, help="untimed rounds before the timed ones")
    run.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    run.add_argument("--quick", action="store_true", help=f"smaller and shorter: {QUICK}")
    run.add_argument("--results", type=Path, default=None, help=f"markdown file whose '{SECTION}' section to write")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


def pruned_masks(args: argparse.Namespace, shape: ModelShape):
    """Binary masks at `args.remaining` from the budget search on fixed random salience."""
    generator = torch.Generator().manual_seed(args.seed + 2)
    scores = SalienceScores(
        head=torch.rand(shape.num_layers, shape.num_heads, generator=generator),
        neuron=torch.rand(shape.num_layers, shape.intermediate_size, generator=generator),
        hidden=torch.rand(shape.hidden_size, generator=generator),
    )
    return search_masks(
        shape, scores, args.remaining, attention_mode=args.attention_mode, layout="uniform", round_to=args.round_to
    )


def apt_variant(name: str, description: str, model, shape: ModelShape) -> TimedVariant:
    """A training variant with its own optimizer and salience accumulator (hooks attached for good)."""
    accumulator = SalienceAccumulator(shape)
    accumulator.attach(model)
    return TimedVariant(name, description, model, adamw(model), lambda: None, HookTimer(accumulator))


def measure(args: argparse.Namespace | None = None) -> dict:
    """Median step times of the dense and the compacted model, interleaved in this process, and their ratio.

    `args` as `parse_args` makes them (None: the defaults). Sets torch's thread count to `args.threads`.
    """
    args = args or parse_args([])
    torch.set_num_threads(args.threads)
    dense = build_apt_model(args)
    shape = ModelShape.from_config(dense.config)
    masks = pruned_masks(args, shape)
    set_masks(dense, masks)
    compacted = build_apt_model(args)
    set_masks(compacted, masks)
    plan = plan_compaction(masks, masks, shape, args.attention_mode)  # every masked block is dead: mask = target = 0
    compact_model(compacted, plan)

    variants = [
        apt_variant("dense", "all blocks present, pruned ones masked", dense, shape),
        apt_variant("compacted", "masked blocks cut out", compacted, plan.after),
    ]
    rounds = time_steps(variants, make_batch(args), args.warmup, args.steps)
    tokens = args.batch * args.seq
    result = {
        "remaining": remaining_params(shape, kept_sizes(masks)) / total_params(shape),
        "rounds": len(rounds),
        "tokens_per_step": tokens,
        "ratio_wall": paired_ratio(rounds, "compacted", "dense", "wall"),
        "ratio_cpu": paired_ratio(rounds, "compacted", "dense", "cpu"),
    }
    for variant, variant_shape in zip(variants, (shape, plan.after), strict=True):
        result[variant.name] = {
            "description": variant.description,
            "params": total_params(variant_shape),
            "sizes": f"hidden {variant_shape.hidden_size}, {variant_shape.num_heads} heads / "
            f"{variant_shape.num_kv_heads} KV, intermediate {variant_shape.intermediate_size}",
            "wall": median_time(rounds, variant.name, "wall"),
            "cpu": median_time(rounds, variant.name, "cpu"),
            "hooks": median_time(rounds, variant.name, "hooks"),
        }
    return result


def report(args: argparse.Namespace, command: str, result: dict) -> str:
    """The markdown section: command, machine, setup, table, headline ratio."""
    lines = [
        SECTION,
        "",
        f"`{command}`",
        "",
        *environment_lines(),
        f"- model: LlamaForCausalLM hidden {args.hidden}, {args.layers} layers, {args.heads} heads / "
        f"{args.kv_heads} KV heads, intermediate {args.intermediate}, vocab {args.vocab}, untied, fp32, random init; "
        f"batch {args.batch} × seq {args.seq}; adapters rank {args.rank} on {', '.join(args.targets)}; AdamW",
        f"- masks: `search_masks` at remaining {args.remaining} on fixed random scores ({args.attention_mode}, "
        f"uniform, round_to {args.round_to}); the compacted model is the same wrapped model with every masked block "
        "cut out by `plan_compaction` + `compact_model`; salience hooks on in both",
        f"- step = forward + backward + AdamW step; {result['rounds']} timed rounds after {args.warmup} warm-up, "
        "both variants in one process, order alternating each round; ratios are medians over rounds of the "
        "per-round ratio",
        "",
        "| variant | what | base params | sizes | median wall (s) | median CPU (s) | of which hooks (ms) "
        "| tokens/s (wall) | × dense wall | × dense CPU |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("dense", "compacted"):
        row = result[name]
        ratios = (1.0, 1.0) if name == "dense" else (result["ratio_wall"], result["ratio_cpu"])
        lines.append(
            f"| {name} | {row['description']} | {row['params']:,} | {row['sizes']} | {row['wall']:.3f} "
            f"| {row['cpu']:.3f} | {row['hooks'] * 1e3:.0f} | {result['tokens_per_step'] / row['wall']:.0f} "
            f"| {ratios[0]:.3f} | {ratios[1]:.3f} |"
        )
    verdict = "meets" if result["ratio_cpu"] <= TARGET else "misses"
    lines += [
        "",
        f"**Compacted / dense step time at {result['remaining']:.3f} remaining parameters: "
        f"{result['ratio_wall']:.3f}× wall, {result['ratio_cpu']:.3f}× CPU** ({verdict} the ≤ {TARGET:.2f} target).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *argv])
    result = measure(args)
    section = report(args, command, result)
    print(section)
    if args.results is not None:
        write_section(args.results, SECTION, section)


if __name__ == "__main__":
    main()
