"""Fine-tuning overhead of APT on the CPU: step time against LoRA, peak memory against full fine-tuning.

Step times come from one process that runs the variants round-robin (the order rotates every round), so load
from other processes hits all of them alike; peak memory comes from one child process per run and variant.
Run from the repository root (bench/RESULTS.md gives the command of the recorded run):
`.venv/bin/python bench/finetune_overhead.py --threads 1 --results bench/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.apt.adapters import APTLinear, inject_adapters, set_masks
from pipeline.apt.blocks import ModelShape, total_params
from pipeline.apt.masks import MaskSet
from pipeline.apt.salience import SalienceAccumulator

from report import environment_lines, write_section

SECTION = "## Fine-tuning overhead"
MIB = 1024 * 1024
TARGET = 1.10  # APT step over LoRA step (same wrapped model, hooks off)
QUICK = {
    "hidden": 256,
    "layers": 4,
    "intermediate": 688,
    "vocab": 4096,
    "seq": 128,
    "steps": 4,
    "warmup": 1,
    "memory_repeats": 1,
}
"""--quick: a smaller model and fewer rounds, to check that the script runs (its numbers are not the recorded ones)."""


def add_model_and_training_args(parser: argparse.ArgumentParser) -> None:
    """The model and training-step options every training benchmark shares (this one and compaction.py)."""
    model = parser.add_argument_group("model (LlamaForCausalLM, random init)")
    model.add_argument("--hidden", type=int, default=512)
    model.add_argument("--layers", type=int, default=8)
    model.add_argument("--heads", type=int, default=8)
    model.add_argument("--kv-heads", type=int, default=4)
    model.add_argument("--intermediate", type=int, default=1376)
    model.add_argument("--vocab", type=int, default=8192)
    train = parser.add_argument_group("training")
    train.add_argument("--seq", type=int, default=256)
    train.add_argument("--batch", type=int, default=2)
    train.add_argument("--rank", type=int, default=8, help="adapter rank")
    train.add_argument(
        "--targets",
        type=lambda text: tuple(text.split(",")),
        default=("q_proj", "v_proj", "up_proj", "down_proj"),
        help="comma-separated projections that get adapters",
    )
    train.add_argument("--seed", type=int, default=0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_training_args(parser)
    run = parser.add_argument_group("measurement")
    run.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    run.add_argument("--warmup", type=int, default=3, help="untimed rounds before the timed ones")
    run.add_argument("--memory-steps", type=int, default=2, help="steps in each peak-memory child")
    run.add_argument("--memory-repeats", type=int, default=3, help="children per memory variant (median)")
    run.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice; 1 is steadier on a shared machine)",
    )
    run.add_argument(
        "--reference-salience",
        type=Path,
        default=None,
        help="another salience.py (e.g. `git show HEAD:pipeline/apt/salience.py > /tmp/s.py`) timed as apt-ref",
    )
    run.add_argument("--skip-memory", action="store_true", help="time steps only")
    run.add_argument("--quick", action="store_true", help=f"smaller and shorter: {QUICK}")
    run.add_argument("--results", type=Path, default=None, help=f"markdown file whose '{SECTION}' section to write")
    run.add_argument("--child", choices=sorted(MEMORY_VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


# ---- models -----------------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace) -> LlamaForCausalLM:
    """The benchmark's decoder, in training mode, with the same random weights on every call."""
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).train()


def build_apt_model(args: argparse.Namespace) -> nn.Module:
    """The decoder wrapped by `inject_adapters`: mask sites everywhere, adapters on `args.targets`."""
    model = build_model(args)
    generator = torch.Generator().manual_seed(args.seed)
    return inject_adapters(model, targets=args.targets, rank=args.rank, alpha=2.0 * args.rank, generator=generator)


def build_plain_lora_model(args: argparse.Namespace) -> nn.Module:
    """The decoder with adapters on `args.targets` only: no mask wrappers, the model's own norms and embedding."""
    model = build_model(args)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(args.seed)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in args.targets:
                if hasattr(parent, name):
                    adapter = APTLinear(
                        getattr(parent, name), rank=args.rank, alpha=2.0 * args.rank, generator=generator
                    )
                    setattr(parent, name, adapter)
    return model


def gradual_masks(shape: ModelShape) -> MaskSet:
    """Masks part-way through a pruning window: some heads, neurons and hidden channels below one."""
    masks = MaskSet.ones(shape)
    masks.head_mask[:, : shape.num_heads // 4] = 0.7
    masks.neuron_mask[:, : shape.intermediate_size // 3] = 0.5
    masks.hidden_mask[: shape.hidden_size // 8] = 0.9
    return masks


def make_batch(args: argparse.Namespace) -> torch.Tensor:
    generator = torch.Generator().manual_seed(args.seed + 1)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)


def adamw(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor) -> None:
    """Forward, backward, AdamW step: what one fine-tuning step costs."""
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---- step time --------------------------------------------------------------------------------------------


class HookTimer:
    """Wall time spent inside one accumulator's `add_activations` and `add_gradients`: the hooks' own work."""

    def __init__(self, accumulator: SalienceAccumulator):
        self.seconds = 0.0
        # Instance attributes shadow the methods, and the hooks call them through `self`.
        for name in ("add_activations", "add_gradients"):
            setattr(accumulator, name, self._timed(getattr(accumulator, name)))

    def _timed(self, method: Callable) -> Callable:
        def timed(*args) -> None:
            started = time.perf_counter()
            method(*args)
            self.seconds += time.perf_counter() - started

        return timed


@dataclass
class TimedVariant:
    """One way to train; `prepare` puts a (possibly shared) model in this variant's state before its step."""

    name: str
    description: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    prepare: Callable[[], None]
    hooks: HookTimer | None = None


def load_reference_accumulator(path: Path) -> type:
    """`SalienceAccumulator` from another copy of salience.py, to time old hooks beside the current ones."""
    spec = importlib.util.spec_from_file_location("reference_salience", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SalienceAccumulator


def timed_variants(args: argparse.Namespace) -> list[TimedVariant]:
    """APT and LoRA share one wrapped model (and optimizer); plain LoRA has its own."""
    apt_model = build_apt_model(args)
    shape = ModelShape.from_config(apt_model.config)
    apt_optimizer = adamw(apt_model)
    accumulators = {"apt": SalienceAccumulator(shape)}
    if args.reference_salience is not None:
        accumulators["apt-ref"] = load_reference_accumulator(args.reference_salience)(shape)

    def use(masks: MaskSet, accumulator: SalienceAccumulator | None) -> Callable[[], None]:
        def prepare() -> None:
            for other in accumulators.values():
                other.detach()
            set_masks(apt_model, masks)
            if accumulator is not None:
                accumulator.attach(apt_model)

        return prepare

    variants = [
        TimedVariant(
            "apt",
            "salience hooks on, gradual masks",
            apt_model,
            apt_optimizer,
            use(gradual_masks(shape), accumulators["apt"]),
            HookTimer(accumulators["apt"]),
        ),
        TimedVariant(
            "lora",
            "same wrapped model, hooks off, masks all ones",
            apt_model,
            apt_optimizer,
            use(MaskSet.ones(shape), None),
        ),
    ]
    if "apt-ref" in accumulators:
        variants.append(
            TimedVariant(
                "apt-ref",
                f"as apt, hooks from {args.reference_salience}",
                apt_model,
                apt_optimizer,
                use(gradual_masks(shape), accumulators["apt-ref"]),
                HookTimer(accumulators["apt-ref"]),
            )
        )
    plain = build_plain_lora_model(args)
    variants.append(TimedVariant("lora-plain", "adapters only, no mask wrappers", plain, adamw(plain), lambda: None))
    return variants


def time_steps(variants: list[TimedVariant], input_ids: torch.Tensor, warmup: int, steps: int) -> list[dict]:
    """Per round, each variant's step time in seconds, on the wall clock and as process CPU time.

    The order rotates so no variant always runs first. CPU time is the steadier measure on a loaded machine
    with one torch thread (it does not count time spent descheduled); with more threads it also counts spinning.
    """
    rounds = []
    for index in range(warmup + steps):
        offset = index % len(variants)
        times = {}
        for variant in variants[offset:] + variants[:offset]:
            variant.prepare()
            hooks = variant.hooks.seconds if variant.hooks else 0.0
            wall, cpu = time.perf_counter(), time.process_time()
            train_step(variant.model, variant.optimizer, input_ids)
            times[variant.name] = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
            times[variant.name]["hooks"] = variant.hooks.seconds - hooks if variant.hooks else 0.0
        if index >= warmup:
            rounds.append(times)
        summary = ", ".join(f"{name} {t['wall']:.3f}s/{t['cpu']:.3f}s cpu" for name, t in times.items())
        print(f"round {index + 1}/{warmup + steps}: {summary}", file=sys.stderr, flush=True)
    return rounds


def median_time(rounds: list[dict], name: str, clock: str) -> float:
    return statistics.median(r[name][clock] for r in rounds)


def paired_ratio(rounds: list[dict], name: str, baseline: str, clock: str) -> float:
    """Median over rounds of this variant's time over the baseline's time in the same round."""
    return statistics.median(r[name][clock] / r[baseline][clock] for r in rounds)


# ---- peak memory ------------------------------------------------------------------------------------------


def memory_model_full(args: argparse.Namespace) -> nn.Module:
    return build_model(args)  # every parameter trains


def memory_model_apt(args: argparse.Namespace) -> nn.Module:
    model = build_apt_model(args)
    shape = ModelShape.from_config(model.config)
    set_masks(model, gradual_masks(shape))
    model.salience = SalienceAccumulator(shape)  # kept alive with the model: its sums count too
    model.salience.attach(model)
    return model


MEMORY_VARIANTS: dict[str, Callable[[argparse.Namespace], nn.Module]] = {
    "full": memory_model_full,
    "apt": memory_model_apt,
    "lora-plain": build_plain_lora_model,
}


def rss_bytes(field: str) -> int:
    """`VmRSS` (now) or `VmHWM` (peak) of this process, from /proc/self/status (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_memory_child(args: argparse.Namespace) -> None:
    """Inside a child: train `args.memory_steps` steps of one variant, print peak and runtime RSS as JSON."""
    runtime_bytes = rss_bytes("VmRSS")  # torch and transformers imported, nothing built yet
    model = MEMORY_VARIANTS[args.child](args)
    optimizer = adamw(model)
    input_ids = make_batch(args)
    for _ in range(args.memory_steps):
        train_step(model, optimizer, input_ids)
    # VmHWM, not getrusage: ru_maxrss survives exec, so a child would report its parent's peak.
    peak_bytes = rss_bytes("VmHWM")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"peak": peak_bytes, "runtime": runtime_bytes, "trainable": trainable}))


def child_argv(args: argparse.Namespace, variant: str) -> list[str]:
    """The command line of a memory child: every setting that shapes its model, batch and steps, then `--child`."""
    options = {
        "--hidden": args.hidden,
        "--layers": args.layers,
        "--heads": args.heads,
        "--kv-heads": args.kv_heads,
        "--intermediate": args.intermediate,
        "--vocab": args.vocab,
        "--seq": args.seq,
        "--batch": args.batch,
        "--rank": args.rank,
        "--targets": ",".join(args.targets),
        "--seed": args.seed,
        "--memory-steps": args.memory_steps,
        "--threads": args.threads,
    }
    argv = [str(part) for option, value in options.items() if value is not None for part in (option, value)]
    return [*argv, "--child", variant]


def measure_memory(args: argparse.Namespace) -> dict[str, dict]:
    """Median peak RSS per variant over `args.memory_repeats` children, run one after another, interleaved."""
    samples = {name: [] for name in MEMORY_VARIANTS}
    for _ in range(args.memory_repeats):
        for name in MEMORY_VARIANTS:
            command = [sys.executable, __file__, *child_argv(args, name)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            samples[name].append(json.loads(output.strip().splitlines()[-1]))
            print(f"memory {name}: peak {samples[name][-1]['peak'] / MIB:.0f} MiB", file=sys.stderr, flush=True)
    return {
        name: {key: statistics.median(s[key] for s in runs) for key in ("peak", "runtime", "trainable")}
        for name, runs in samples.items()
    }


def measure(args: argparse.Namespace | None = None) -> dict:
    """Step times of the variants interleaved in this process, APT / LoRA, and (unless skipped) peak RSS per variant.

    `args` as `parse_args` makes them (None: the defaults). Sets torch's thread count when `args.threads` is set.
    """
    args = args or parse_args([])
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    variants = timed_variants(args)
    rounds = time_steps(variants, make_batch(args), args.warmup, args.steps)
    result = {
        "params": total_params(ModelShape.from_config(variants[0].model.config)),
        "variants": [{"name": v.name, "description": v.description, "hooks": v.hooks is not None} for v in variants],
        "rounds": rounds,
        "ratio_wall": paired_ratio(rounds, "apt", "lora", "wall"),
        "ratio_cpu": paired_ratio(rounds, "apt", "lora", "cpu"),
        "memory": {},
    }
    del variants  # the memory children run next; this process need not hold the models meanwhile
    if not args.skip_memory:
        memory = result["memory"] = measure_memory(args)
        full, apt = memory["full"], memory["apt"]
        result["peak_ratio"] = apt["peak"] / full["peak"]
        result["peak_ratio_above_runtime"] = (apt["peak"] - apt["runtime"]) / (full["peak"] - full["runtime"])
    return result


# ---- report -----------------------------------------------------------------------------------------------


def step_table(variants: list[dict], rounds: list[dict], tokens: int) -> list[str]:
    lines = [
        "| variant | what | median wall (s) | median CPU (s) | of which hooks (ms) | tokens/s (wall) "
        "| × lora wall | × lora CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in variants:
        name = variant["name"]
        wall, cpu = median_time(rounds, name, "wall"), median_time(rounds, name, "cpu")
        hooks = f"{median_time(rounds, name, 'hooks') * 1e3:.0f}" if variant["hooks"] else "–"
        ratios = [paired_ratio(rounds, name, "lora", clock) for clock in ("wall", "cpu")]
        lines.append(
            f"| {name} | {variant['description']} | {wall:.3f} | {cpu:.3f} | {hooks} | {tokens / wall:.0f} "
            f"| {ratios[0]:.3f} | {ratios[1]:.3f} |"
        )
    return lines


def memory_table(memory: dict[str, dict]) -> list[str]:
    lines = [
        "| variant | trainable params | peak RSS (MiB) | peak − runtime RSS (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for name, row in memory.items():
        lines.append(
            f"| {name} | {row['trainable']:,} | {row['peak'] / MIB:.0f} | {(row['peak'] - row['runtime']) / MIB:.0f} |"
        )
    return lines


def report(args: argparse.Namespace, command: str, result: dict) -> str:
    """The markdown section: setup, step-time table, memory table, headline ratios."""
    tokens = args.batch * args.seq
    rounds, memory = result["rounds"], result["memory"]
    lines = [
        SECTION,
        "",
        f"`{command}`",
        "",
        *environment_lines(),
        f"- model: LlamaForCausalLM hidden {args.hidden}, {args.layers} layers, {args.heads} heads / "
        f"{args.kv_heads} KV heads, intermediate {args.intermediate}, vocab {args.vocab}, fp32, random init; "
        f"batch {args.batch} × seq {args.seq}; adapters rank {args.rank} on {', '.join(args.targets)}; AdamW",
        f"- step = forward + backward + AdamW step; {len(rounds)} timed rounds after {args.warmup} warm-up, "
        "variants interleaved in one process, order rotating each round",
        "",
        *step_table(result["variants"], rounds, tokens),
        "",
        "Ratios are medians over rounds of the per-round ratio (both variants of a round ran back to back)."
        + (
            f" apt-ref is apt with `SalienceAccumulator` taken from {args.reference_salience} (e.g. an earlier"
            " commit's salience.py), to compare hook implementations in the same run."
            if args.reference_salience is not None
            else ""
        ),
        "",
        f"**APT / LoRA step time: {result['ratio_wall']:.3f}× wall, {result['ratio_cpu']:.3f}× CPU** "
        f"(same wrapped model, hooks off; target ≤ {TARGET:.2f}×); "
        f"APT / plain LoRA: {paired_ratio(rounds, 'apt', 'lora-plain', 'wall'):.3f}× wall, "
        f"{paired_ratio(rounds, 'apt', 'lora-plain', 'cpu'):.3f}× CPU.",
    ]
    if memory:
        lines += [
            "",
            f"Peak memory: one child process per run, {args.memory_steps} steps each, median of "
            f"{args.memory_repeats} runs; runtime RSS = after importing torch and transformers, before the model.",
            "",
            *memory_table(memory),
            "",
            f"**APT / full fine-tuning peak RSS: {result['peak_ratio']:.3f}×** "
            f"(above runtime: {result['peak_ratio_above_runtime']:.3f}×).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child is not None:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        run_memory_child(args)
        return
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *argv])
    section = report(args, command, measure(args))
    print(section)
    if args.results is not None:
        write_section(args.results, SECTION, section)


if __name__ == "__main__":
    main()
