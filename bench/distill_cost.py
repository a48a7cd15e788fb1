"""What self-distillation costs per training step, before and after the first compaction, and in memory.

Four variants of one APT-wrapped decoder with the same binary masks (`search_masks` at `--remaining` on fixed random
scores, as in bench/compaction.py), each a full step (forwards, backward, AdamW on the adapters), interleaved in one
process with the order rotating:
- dense: every block present, pruned ones masked; causal-LM loss only;
- dense+shared: the same, plus the shared teacher (`teacher_mode`: frozen adapters, masks at one) and the
  distillation objective: what the finetune pays until its first compaction;
- compacted: the masked blocks cut out; causal-LM loss only;
- compacted+own: the compacted student plus the teacher's own frozen model of the original shape
  (`pipeline.teacher.FrozenTeacher`), hidden states widened back: what it pays after the first compaction.
Memory is counted from the tensors themselves (parameters and buffers, in the run's dtype).
Run from the repository root: `.venv/bin/python bench/distill_cost.py --results bench/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from compaction import pruned_masks
from finetune_overhead import adamw, add_model_and_training_args, build_apt_model, build_model, make_batch

from pipeline.apt.adapters import set_masks
from pipeline.apt.blocks import ModelShape, kept_sizes, remaining_params, total_params
from pipeline.apt.compaction import compact_model, plan_compaction
from pipeline.apt.distill import distill_objective, freeze_adapters
from pipeline.teacher import FrozenTeacher, SharedTeacher

from report import environment_lines, write_section

SECTION = "## Self-distillation: step time and memory"
QUICK = {"hidden": 256, "layers": 4, "intermediate": 688, "vocab": 4096, "seq": 128, "steps": 4, "warmup": 1}
JSON = Path(__file__).parent / "results" / "distill_cost.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_training_args(parser)
    parser.add_argument("--remaining", type=float, default=0.5, help="remaining fraction the masks are searched at")
    parser.add_argument("--attention-mode", choices=("kv_group", "query_in_group"), default="kv_group")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--weight", type=float, default=0.5, help="apt.distill_weight")
    parser.add_argument("--steps", type=int, default=12, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before the timed ones")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    parser.add_argument("--quick", action="store_true", help=f"smaller and shorter: {QUICK}")
    parser.add_argument("--results", type=Path, default=None, help=f"markdown file whose '{SECTION}' to write")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


class Plain:
    """A module seen as the recipe sees its engine: callable, the model as `.module`."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kwargs):
        return self.module(**kwargs)


def step_fn(student, teacher, weight: float, channels, input_ids: torch.Tensor):
    """One training step of `student`: LM loss, or the distillation objective when `teacher` is given."""
    optimizer = adamw(student)

    def step() -> None:
        if teacher is None:
            loss = student(input_ids=input_ids, labels=input_ids).loss
        else:
            teacher_out = teacher.outputs(Plain(student), input_ids)
            student_out = student(input_ids=input_ids, labels=input_ids, output_hidden_states=True)
            loss = distill_objective(student_out, teacher_out, weight, channels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def tensor_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def build_variants(args: argparse.Namespace) -> tuple[dict, dict]:
    """The four step functions, and the sizes of the models they train and read."""
    dense = build_apt_model(args)
    shape = ModelShape.from_config(dense.config)
    masks = pruned_masks(args, shape)
    set_masks(dense, masks)
    compacted = build_apt_model(args)
    set_masks(compacted, masks)
    plan = plan_compaction(masks, masks, shape, args.attention_mode)
    compact_model(compacted, plan)
    own = build_model(args).eval().requires_grad_(False)  # the original base; the adapters' B is still zero
    channels = masks.hidden_mask.nonzero().flatten()
    batch = make_batch(args)
    steps = {
        "dense": step_fn(dense, None, args.weight, None, batch),
        "dense+shared": step_fn(dense, SharedTeacher(freeze_adapters(dense)), args.weight, None, batch),
        "compacted": step_fn(compacted, None, args.weight, None, batch),
        "compacted+own": step_fn(compacted, FrozenTeacher(own), args.weight, channels, batch),
    }
    sizes = {"remaining": remaining_params(shape, kept_sizes(masks)) / total_params(shape),
             "student_dense_bytes": tensor_bytes(dense), "student_compacted_bytes": tensor_bytes(compacted),
             "teacher_bytes": tensor_bytes(own), "params_dense": total_params(shape),
             "params_compacted": total_params(plan.after)}
    return steps, sizes


def time_rounds(steps: dict, warmup: int, rounds: int) -> list[dict]:
    """Per round, each variant's process-CPU and wall seconds; the order rotates every round."""
    names, out = list(steps), []
    for index in range(warmup + rounds):
        order = names[index % len(names):] + names[:index % len(names)]
        times = {}
        for name in order:
            wall, cpu = time.perf_counter(), time.process_time()
            steps[name]()
            times[name] = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
        if index >= warmup:
            out.append(times)
        print(f"round {index + 1}: " + ", ".join(f"{n} {t['cpu']:.3f}s" for n, t in times.items()), file=sys.stderr)
    return out


def ratio(rounds: list[dict], name: str, baseline: str, clock: str = "cpu") -> tuple[float, float, float]:
    """Median, min and max over rounds of the per-round ratio name / baseline."""
    values = [r[name][clock] / r[baseline][clock] for r in rounds]
    return statistics.median(values), min(values), max(values)


def report(args, command: str, rounds: list[dict], sizes: dict) -> tuple[str, dict]:
    shared, own = ratio(rounds, "dense+shared", "dense"), ratio(rounds, "compacted+own", "compacted")
    medians = {name: statistics.median(r[name]["cpu"] for r in rounds) for name in rounds[0]}
    result = {**sizes, "rounds": len(rounds), "median_cpu_s": medians, "shared_over_dense": shared,
              "own_over_compacted": own, "own_over_dense_shared": ratio(rounds, "compacted+own", "dense+shared")}
    mb = 1 / 2**20
    lines = [SECTION, "", f"`{command}`", "", *environment_lines(),
             f"- model: LlamaForCausalLM hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} "
             f"heads, intermediate {args.intermediate}, vocab {args.vocab}, fp32; batch {args.batch} × seq "
             f"{args.seq}; adapters rank {args.rank}; masks at {sizes['remaining']:.3f} remaining; distill weight "
             f"{args.weight}; {len(rounds)} timed rounds after {args.warmup}, order rotating; CPU-time ratios "
             "(median, with the min–max over rounds)", "",
             "| variant | median CPU s/step | × its no-distillation variant |", "|---|---:|---:|",
             f"| dense | {medians['dense']:.3f} | 1 |",
             f"| dense+shared (before the first compaction) | {medians['dense+shared']:.3f} | "
             f"{shared[0]:.2f} ({shared[1]:.2f}–{shared[2]:.2f}) |",
             f"| compacted | {medians['compacted']:.3f} | 1 |",
             f"| compacted+own (after it) | {medians['compacted+own']:.3f} | "
             f"{own[0]:.2f} ({own[1]:.2f}–{own[2]:.2f}) |",
             "", f"Memory: the shared teacher adds only the frozen adapter copies; the own teacher is "
             f"{sizes['teacher_bytes'] * mb:.1f} MB here (the original base in the training dtype: "
             f"{sizes['teacher_bytes'] / sizes['student_dense_bytes']:.2f}× the dense student's "
             f"{sizes['student_dense_bytes'] * mb:.1f} MB, "
             f"{sizes['teacher_bytes'] / sizes['student_compacted_bytes']:.2f}× the compacted student's), "
             "on every rank whatever the ZeRO stage (the teacher is not partitioned, docs/design.md §5)."]
    return "\n".join(lines) + "\n", result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *argv])
    steps, sizes = build_variants(args)
    section, result = report(args, command, time_rounds(steps, args.warmup, args.steps), sizes)
    print(section)
    if args.results is not None:
        write_section(args.results, SECTION, section)
        JSON.parent.mkdir(exist_ok=True)
        JSON.write_text(json.dumps({"command": command, **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
