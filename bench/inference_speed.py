"""Inference speed of the APT export on the CPU: a dense LLaMA against its ~50%-parameter pruned export.

The dense model is saved with `save_pretrained`, pruned by `search_masks` (uniform layout, fixed random scores;
with `--depth N` by the pipeline's depth search: N layers kept, the widths of those filling the budget),
exported by `export_pruned` with no adapters (pure slicing), and both are loaded back with plain
`AutoModelForCausalLM.from_pretrained`. Greedy generation and prefill are timed in one process, the models
interleaved with a rotating order, so load from other processes hits all of them alike; the tables report medians.
A "floor" model (same depth, heads and vocab, hidden 64) measures the per-step cost that does not shrink with width,
and a profiled batch-1 generate gives each matmul's share of a decode step.
Run from the repository root: `.venv/bin/python bench/inference_speed.py --results bench/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from torch import nn
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pipeline.apt.blocks import ModelShape, kept_sizes, remaining_params, total_params
from pipeline.apt.masks import ATTENTION_MODES
from pipeline.apt.search import search_masks
from pipeline.config import PruningSection
from pipeline.export import DTYPES, export_pruned
from pipeline.shape_choice import search_target

from report import environment_lines, write_section

SECTION = "## Inference speed of the export"
DEPTH_SECTION = "## Inference speed of a depth-pruned export"
"""The section `--depth` writes, beside the width-only one."""
TARGET = 1.8  # the target: generate tokens/s of the ~50% export over the dense model
QUICK = {
    "hidden": 512,
    "layers": 4,
    "heads": 8,
    "kv_heads": 2,
    "intermediate": 1376,
    "vocab": 4096,
    "new_tokens": 16,
    "repeats": 3,
}
"""--quick: a smaller model and fewer rounds, to check that the script runs (its numbers are not the recorded ones)."""
WALL, CPU = 0, 1  # indices of the two clocks in every timing
ROLES = ("q/k/v/o_proj", "gate_proj + up_proj", "down_proj", "lm_head")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("dense model (LlamaForCausalLM, random init, untied embeddings)")
    model.add_argument("--hidden", type=int, default=1024)
    model.add_argument("--layers", type=int, default=8)
    model.add_argument("--heads", type=int, default=16)
    model.add_argument("--kv-heads", type=int, default=4)
    model.add_argument("--intermediate", type=int, default=2816)
    model.add_argument("--vocab", type=int, default=8000)
    model.add_argument("--seed", type=int, default=0)
    prune = parser.add_argument_group("pruning and export")
    prune.add_argument("--remaining", type=float, default=0.5, help="target remaining parameter fraction")
    prune.add_argument("--attention-mode", choices=ATTENTION_MODES, default="kv_group")
    prune.add_argument("--round-to", type=int, default=8, help="neurons and hidden channels kept in multiples of it")
    prune.add_argument("--depth", type=int, default=None,
                       help="layers the export keeps (the rest cut whole, widths filling the budget); default: "
                            "widths only")
    prune.add_argument(
        "--dtype", nargs="+", choices=sorted(DTYPES), default=["float32"], help="export dtypes; each is timed"
    )
    work = parser.add_argument_group("workload")
    work.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes; each is timed")
    work.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    work.add_argument("--new-tokens", type=int, default=32, help="generated tokens (min_new_tokens = max_new_tokens)")
    work.add_argument("--repeats", type=int, default=7, help="timed rounds (medians over them)")
    work.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    # One thread by default: when other processes hold a core, every OpenMP barrier of a 2-thread run waits for
    # the descheduled thread; a decode step of the floor model measured 3 ms with one thread and 160 ms with two.
    work.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's choice)")
    work.add_argument("--no-floor", action="store_true", help="skip the hidden-64 overhead-floor model")
    work.add_argument("--no-profile", action="store_true", help="skip the profiled batch-1 matmul breakdown")
    work.add_argument("--quick", action="store_true", help=f"smaller and shorter: {QUICK}")
    parser.add_argument("--results", type=Path, default=None, help=f"markdown file whose '{SECTION}' section to write")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (ms/step divides by new_tokens - 1)")
    return args


# ---- models -----------------------------------------------------------------------------------------------


def build_dense(args: argparse.Namespace, **overrides) -> LlamaForCausalLM:
    """The benchmark's decoder (sizes from `args`, then `overrides`) with the same random weights on every call."""
    sizes = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt + args.new_tokens,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(LlamaConfig(**{**sizes, **overrides})).eval()


def build_floor(args: argparse.Namespace, dtype: str) -> LlamaForCausalLM:
    """The dense config at hidden 64: same op count per step, almost no arithmetic or bytes behind each op."""
    return build_dense(args, hidden_size=64, intermediate_size=64, head_dim=4).to(DTYPES[dtype])


def random_scores(shape: ModelShape, seed: int) -> dict[str, torch.Tensor]:
    """Fixed random salience: which blocks go does not matter for speed, only how many."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "head": torch.rand(shape.num_layers, shape.num_heads, generator=generator),
        "neuron": torch.rand(shape.num_layers, shape.intermediate_size, generator=generator),
        "hidden": torch.rand(shape.hidden_size, generator=generator),
    }


def pruned_masks(args: argparse.Namespace, shape: ModelShape):
    """Uniform masks at `--remaining` on fixed random scores: widths only (`search_masks`), or with `--depth` the
    last layers cut whole and the widths of the rest filling the budget (the pipeline's `pruning.depth` search)."""
    scores = random_scores(shape, args.seed)
    if args.depth is None:
        return search_masks(shape, scores, args.remaining, attention_mode=args.attention_mode, layout="uniform",
                            round_to=args.round_to)
    pruning = PruningSection(depth=args.depth, attention_mode=args.attention_mode, round_to=args.round_to,
                             shape_candidates=1, min_hidden=args.round_to)
    order = list(range(shape.num_layers))[::-1]  # which layers go does not matter for speed either
    masks, _, _ = search_target(shape, scores, args.remaining, pruning, layer_order=order)
    return masks


def export(args: argparse.Namespace, workdir: Path) -> tuple[Path, dict[str, Path], dict]:
    """Save the dense model, search uniform masks, export one pruned copy per dtype; the checkpoint directories."""
    dense_dir = workdir / "dense"
    dense = build_dense(args)
    dense.save_pretrained(str(dense_dir))  # safetensors, which export_pruned streams from
    shape = ModelShape.from_config(dense.config)
    del dense
    masks = pruned_masks(args, shape)
    save_file({}, str(workdir / "adapters.safetensors"))  # no adapters: the merge is pure slicing
    pruned_dirs, summary = {}, {}
    for dtype in args.dtype:
        pruned_dirs[dtype] = workdir / f"pruned-{dtype}"
        summary = export_pruned(
            base_dir=dense_dir,
            adapters_path=workdir / "adapters.safetensors",
            masks=masks,
            scaling=1.0,
            dtype=DTYPES[dtype],
            out_dir=pruned_dirs[dtype],
        )
    summary["expected_params"] = remaining_params(shape, kept_sizes(masks))
    summary["dense_params"] = total_params(shape)
    return dense_dir, pruned_dirs, summary


def load(directory: Path, dtype: str) -> nn.Module:
    """Plain transformers, as a user of the export would load it."""
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=DTYPES[dtype]).eval()


def count_params(model: nn.Module) -> tuple[int, int]:
    """All parameters, and those of the embedding and lm_head."""
    outer = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()), outer


# ---- timing -----------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """One timed call on a model."""

    name: str
    batch: int
    run: Callable[[nn.Module], None]


def prompts(args: argparse.Namespace, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random prompt rows for every model (ids 0-2 are pad/bos/eos); all-ones attention mask."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(3, args.vocab, (max(args.batch), args.prompt), generator=generator)[:batch]
    return ids, torch.ones_like(ids)


def generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> None:
    model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # random weights may emit EOS; every run must do the same work
        do_sample=False,
        pad_token_id=0,
    )


def prefill(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
    # logits_to_keep=1: the last position's logits only, as generate's own prefill computes them.
    model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)


def workloads(args: argparse.Namespace) -> list[Workload]:
    """Per batch size: greedy generation of exactly `new_tokens`, and one prefill forward on the prompt."""
    result = []
    for batch in args.batch:
        ids, mask = prompts(args, batch)
        result.append(
            Workload("generate", batch, lambda m, ids=ids, mask=mask: generate(m, ids, mask, args.new_tokens))
        )
        result.append(Workload("prefill", batch, lambda m, ids=ids, mask=mask: prefill(m, ids, mask)))
    return result


@torch.no_grad()
def time_rounds(models: dict[tuple, nn.Module], loads: list[Workload], warmup: int, repeats: int) -> list[dict]:
    """Per round, (wall, CPU) seconds per (dtype, model, workload, batch); the model order rotates every round."""
    rounds = []
    keys = list(models)
    for index in range(warmup + repeats):
        seconds = {}
        offset = index % len(keys)
        for load_ in loads:
            for key in keys[offset:] + keys[:offset]:  # adjacent in time, so a load spike hits neighbours alike
                wall, cpu = time.perf_counter(), time.process_time()
                load_.run(models[key])
                seconds[(*key, load_.name, load_.batch)] = (time.perf_counter() - wall, time.process_time() - cpu)
        if index >= warmup:
            rounds.append(seconds)
        label = "warm-up" if index < warmup else f"round {index - warmup + 1}/{repeats}"
        print(f"{label}: {sum(t[WALL] for t in seconds.values()):.1f}s", file=sys.stderr, flush=True)
    return rounds


def median(rounds: list[dict], key: tuple, clock: int) -> float:
    return statistics.median(r[key][clock] for r in rounds)


def paired_speedup(rounds: list[dict], dtype: str, workload: str, batch: int, clock: int) -> float:
    """Median over rounds of dense time / pruned time within the same round."""
    dense, pruned = (dtype, "dense", workload, batch), (dtype, "pruned", workload, batch)
    return statistics.median(r[dense][clock] / r[pruned][clock] for r in rounds)


def decode_step_ms(rounds: list[dict], dtype: str, model: str, batch: int, new_tokens: int) -> float:
    """CPU milliseconds per decode step: generate minus its prefill, over the other new_tokens - 1 steps."""
    generate_, prefill_ = (dtype, model, "generate", batch), (dtype, model, "prefill", batch)
    return 1e3 * statistics.median((r[generate_][CPU] - r[prefill_][CPU]) / (new_tokens - 1) for r in rounds)


# ---- matmul breakdown -------------------------------------------------------------------------------------


def matmul_role(config, inputs: int, outputs: int) -> str:
    """Which projection an [inputs -> outputs] matmul is; q/k/v/o are told apart by neither model, so grouped."""
    if outputs == config.vocab_size:
        return "lm_head"
    if (inputs, outputs) == (config.hidden_size, config.intermediate_size):
        return "gate_proj + up_proj"
    if (inputs, outputs) == (config.intermediate_size, config.hidden_size):
        return "down_proj"
    return "q/k/v/o_proj"


@torch.no_grad()
def matmul_profile(model: nn.Module, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Per matmul role: ms and weight bytes per batch-1 decode step, from torch.profiler over one generate."""
    ids, mask = prompts(args, 1)
    generate(model, ids, mask, 2)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        generate(model, ids, mask, args.new_tokens)
    steps = args.new_tokens - 1
    element = next(model.parameters()).element_size()
    per_role = defaultdict(lambda: [0.0, 0.0])
    for event in prof.key_averages(group_by_input_shape=True):
        # nn.Linear without bias runs aten::mm on [rows, in] x [in, out]; one row is a decode step at batch 1.
        if event.key != "aten::mm" or len(event.input_shapes) != 2 or event.input_shapes[0][0] != 1:
            continue
        inputs, outputs = event.input_shapes[1]
        role = per_role[matmul_role(model.config, inputs, outputs)]
        role[0] += event.self_cpu_time_total / 1e3 / steps
        role[1] += event.count * inputs * outputs * element / steps
    per_role["all matmuls"] = [sum(values[i] for values in per_role.values()) for i in (0, 1)]
    return {name: tuple(values) for name, values in per_role.items()}


def profile_interleaved(models: dict[tuple, nn.Module], args: argparse.Namespace, runs: int = 3) -> dict:
    """Per model and matmul role, the median (ms, bytes) per step over `runs` profiles, dense and pruned alternating."""
    samples = defaultdict(list)
    for _ in range(runs):  # the profiler times wall clock, so one load spike must not decide the table
        for name in ("dense", "pruned"):
            samples[name].append(matmul_profile(models[(args.dtype[0], name)], args))
    medians = {}
    for name, profiles in samples.items():
        medians[name] = {
            role: (statistics.median(p[role][0] for p in profiles), size) for role, (_, size) in profiles[0].items()
        }
    return medians


def measure(args: argparse.Namespace | None = None) -> dict:
    """Export, load and time the models interleaved in this process: speed-ups per dtype, workload and batch.

    `args` as `parse_args` makes them (None: the defaults). Sets torch's thread count when `args.threads` > 0.
    """
    args = args or parse_args([])
    transformers.utils.logging.disable_progress_bar()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="apt-inference-") as workdir:
        dense_dir, pruned_dirs, summary = export(args, Path(workdir))
        models = {}
        for dtype in args.dtype:
            models[(dtype, "dense")] = load(dense_dir, dtype)
            models[(dtype, "pruned")] = load(pruned_dirs[dtype], dtype)
            if not args.no_floor:
                models[(dtype, "floor")] = build_floor(args, dtype)
        rounds = time_rounds(models, workloads(args), args.warmup, args.repeats)
        profiles = {} if args.no_profile else profile_interleaved(models, args)
    names = ("dense", "pruned")
    params = {name: count_params(models[(args.dtype[0], name)]) for name in names}
    dense, pruned = params["dense"][0], params["pruned"][0]
    if not dense == summary["dense_params"] or not pruned == summary["params"] == summary["expected_params"]:
        raise RuntimeError(f"parameter counts disagree: loaded {dense:,} / {pruned:,}, accounting {summary}")
    speedup = {}
    for dtype in args.dtype:
        for batch in args.batch:
            for workload in ("generate", "prefill"):
                speedup[(dtype, workload, batch)] = {
                    "wall": paired_speedup(rounds, dtype, workload, batch, WALL),
                    "cpu": paired_speedup(rounds, dtype, workload, batch, CPU),
                }
    return {
        "summary": summary,
        "params": params,
        "remaining": pruned / dense,
        "configs": {name: models[(args.dtype[0], name)].config for name in names},
        "rounds": rounds,
        "profiles": profiles,
        "speedup": speedup,
    }


# ---- report -----------------------------------------------------------------------------------------------


def params_table(args: argparse.Namespace, result: dict) -> list[str]:
    (dense, dense_outer), (pruned, pruned_outer) = result["params"]["dense"], result["params"]["pruned"]
    summary = result["summary"]
    return [
        "| model | params | sizes | embedding + lm_head share |",
        "|---|---:|---|---:|",
        f"| dense | {dense:,} | {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} KV, "
        f"intermediate {args.intermediate} | {dense_outer / dense:.1%} |",
        f"| pruned | {pruned:,} (**{pruned / dense:.4f}**) | {result['configs']['pruned'].num_hidden_layers} "
        f"layers, hidden {summary['hidden_size']}, "
        f"{summary['num_attention_heads']} heads / {summary['num_key_value_heads']} KV, "
        f"intermediate {summary['intermediate_size']} | {pruned_outer / pruned:.1%} |",
    ]


def decode_cells(args: argparse.Namespace, rounds: list[dict], dtype: str, batch: int) -> list[str]:
    """ms per decode step of dense, pruned and floor, and the dense / pruned ratio once the floor is taken off."""
    dense, pruned = (decode_step_ms(rounds, dtype, m, batch, args.new_tokens) for m in ("dense", "pruned"))
    if args.no_floor:
        return [f"{dense:.1f}", f"{pruned:.1f}", "–", "–"]
    floor = decode_step_ms(rounds, dtype, "floor", batch, args.new_tokens)
    return [f"{dense:.1f}", f"{pruned:.1f}", f"{floor:.1f}", f"{(dense - floor) / (pruned - floor):.2f}×"]


def speed_table(args: argparse.Namespace, rounds: list[dict]) -> list[str]:
    lines = [
        "| dtype | batch | workload | dense tok/s | pruned tok/s | speedup (wall) | speedup (CPU time) | "
        "ms/step dense | ms/step pruned | ms/step floor | speedup above floor |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype in args.dtype:
        for batch in args.batch:
            for workload, tokens in (("generate", batch * args.new_tokens), ("prefill", batch * args.prompt)):
                dense = median(rounds, (dtype, "dense", workload, batch), WALL)
                pruned = median(rounds, (dtype, "pruned", workload, batch), WALL)
                cells = [dtype, str(batch), workload, f"{tokens / dense:,.1f}", f"{tokens / pruned:,.1f}"]
                cells += [f"**{paired_speedup(rounds, dtype, workload, batch, clock):.2f}×**" for clock in (WALL, CPU)]
                cells += decode_cells(args, rounds, dtype, batch) if workload == "generate" else [""] * 4
                lines.append("| " + " | ".join(cells) + " |")
    return lines


def row_lengths(config) -> dict[str, str]:
    """Per matmul role, the length K of the weight rows each output dots over (the GEMV's inner dimension)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "q/k/v/o_proj": f"{config.hidden_size}, o {config.num_attention_heads * head_dim}",
        "gate_proj + up_proj": str(config.hidden_size),
        "down_proj": str(config.intermediate_size),
        "lm_head": str(config.hidden_size),
        "all matmuls": "",
    }


def matmul_table(profiles: dict[str, dict[str, tuple[float, float]]], configs: dict) -> list[str]:
    lines = [
        "| matmul (batch-1 decode step) | row length K, dense → pruned | dense ms | dense GB/s | pruned ms | "
        "pruned GB/s | bytes pruned / dense | time pruned / dense |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    dense_k, pruned_k = row_lengths(configs["dense"]), row_lengths(configs["pruned"])
    for role in (*ROLES, "all matmuls"):
        (dense_ms, dense_bytes), (pruned_ms, pruned_bytes) = profiles["dense"][role], profiles["pruned"][role]
        lengths = f"{dense_k[role]} → {pruned_k[role]}" if dense_k[role] else ""
        lines.append(
            f"| {role} | {lengths} | {dense_ms:.2f} | {dense_bytes / dense_ms / 1e6:.1f} | {pruned_ms:.2f} | "
            f"{pruned_bytes / pruned_ms / 1e6:.1f} | {pruned_bytes / dense_bytes:.3f} | {pruned_ms / dense_ms:.3f} |"
        )
    return lines


def reading_lines(args: argparse.Namespace, rounds: list[dict], summary: dict, profiles: dict) -> list[str]:
    """Number-driven notes: the target per batch, and what keeps batch 1 from the parameter ratio."""
    lines = []
    for dtype in args.dtype:
        for batch in args.batch:
            speedup = paired_speedup(rounds, dtype, "generate", batch, CPU)
            verdict = "meets" if speedup >= TARGET else "misses"
            lines.append(
                f"- {dtype}, batch {batch}: generate {speedup:.2f}× (CPU time), {verdict} the ≥ {TARGET}× target"
            )
    dtype = args.dtype[0]
    smallest = min(args.batch)
    pruned = decode_step_ms(rounds, dtype, "pruned", smallest, args.new_tokens)
    if not args.no_floor:
        floor = decode_step_ms(rounds, dtype, "floor", smallest, args.new_tokens)
        lines.append(
            f"- per-step floor at batch {smallest}: {floor:.1f} ms of Python, `generate` bookkeeping and op "
            f"dispatch, {floor / pruned:.0%} of a pruned step; it does not shrink with the weights"
        )
    if profiles:
        dense_ms, dense_bytes = profiles["dense"]["all matmuls"]
        pruned_ms, pruned_bytes = profiles["pruned"]["all matmuls"]
        dense_rate, pruned_rate = dense_bytes / dense_ms / 1e6, pruned_bytes / pruned_ms / 1e6
        line = (
            f"- batch-1 matmuls: the pruned model reads {pruned_bytes / dense_bytes:.3f} of the dense weight bytes "
            f"per step in {pruned_ms / dense_ms:.3f} of the time ({pruned_rate:.1f} against {dense_rate:.1f} GB/s)"
        )
        if pruned_rate < 0.9 * dense_rate:
            line += (
                "; at batch 1 each x @ Wᵀ is a GEMV over rows K long, and the rows that pruning the hidden size "
                "shortens read slower per byte"
            )
        lines.append(line)
    lines.append(
        f"- lm_head shrinks with the kept hidden size only ({summary['hidden_size']}/{args.hidden} = "
        f"{summary['hidden_size'] / args.hidden:.3f}), not with heads or neurons; the embedding is a lookup"
    )
    return lines


def report(args: argparse.Namespace, command: str, result: dict) -> str:
    """The markdown section: setup, parameters, speed table, matmul breakdown, reading."""
    rounds, profiles = result["rounds"], result["profiles"]
    lines = [
        SECTION if args.depth is None else DEPTH_SECTION,
        "",
        f"`{command}`",
        "",
        *environment_lines(),
        f"- dense: LlamaForCausalLM, {args.layers} layers, vocab {args.vocab}, untied, random init (seed "
        f"{args.seed}), `save_pretrained` → `export_pruned` (no adapters; uniform masks from "
        f"{'`search_masks`' if args.depth is None else f'the depth search ({args.depth} layers kept)'} at "
        f"{args.remaining} on fixed random scores, {args.attention_mode}, round_to {args.round_to}); both loaded "
        "with `AutoModelForCausalLM.from_pretrained` in the listed dtype",
        f"- generate: greedy, prompt {args.prompt} tokens, exactly {args.new_tokens} new tokens, tok/s = batch × "
        f"new tokens / wall time (prefill included); prefill: one forward on batch × {args.prompt} tokens with "
        "`logits_to_keep=1`, tok/s = prompt tokens / wall time",
        f"- medians of {args.repeats} rounds after {args.warmup} warm-up; models interleaved in one process, order "
        "rotating; speedup = median over rounds of dense time / pruned time in the same round, by wall time and "
        "by process CPU time (which leaves out time other processes held the core); ms/step = CPU time of "
        "(generate − prefill) / (new tokens − 1); floor = the dense config at hidden 64, intermediate 64, "
        "head_dim 4; speedup above floor = (dense − floor) / (pruned − floor)",
        "",
        *params_table(args, result),
        "",
        *speed_table(args, rounds),
    ]
    if profiles:
        lines += [
            "",
            f"Matmuls of one batch-1 decode step ({args.dtype[0]}, torch.profiler (wall clock) over a generate of "
            f"{args.new_tokens} tokens, median of 3 per model, alternating; GB/s = weight bytes read / time):",
            "",
            *matmul_table(profiles, result["configs"]),
        ]
    lines += ["", "Reading:", "", *reading_lines(args, rounds, result["summary"], profiles)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *argv])
    section = report(args, command, measure(args))
    print(section)
    if args.results is not None:
        write_section(args.results, SECTION if args.depth is None else DEPTH_SECTION, section)


if __name__ == "__main__":
    main()
