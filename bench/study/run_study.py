"""APT against baseline pruners on real text, in one command (issue 8, the quality study).

1. prep: the pipeline's prep stage trains a SentencePiece tokenizer on data/python-docs.jsonl and writes the
   train / held-out validation blocks every method then uses.
2. pretrain: a small GQA LLaMA from scratch on the train split (reused when it exists with the same settings).
3. prune to each target remaining fraction with
   apt        the pipeline itself (finetune → salience → finalize → merge → eval, one rank), its fine-tuning
              steps being the recovery budget;
   magnitude, random, taylor   per-block scores → the pipeline's `search_masks` → the same budget of adapter
              training with fixed masks → `merge_adapters` + `slice_model`.
4. score every model (dense, each baseline before recovery, every pruned model) with one function on the same
   validation blocks; print the table, plot perplexity against remaining parameters, write bench/RESULTS.md.

Run from the repository root: `.venv/bin/python -m bench.study.run_study` (about 30 minutes on 2 shared cores),
or `--quick` (a smaller model and budget, a few minutes; results stay in bench/out/study-quick/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import transformers
from matplotlib.figure import Figure
from transformers import AutoModelForCausalLM

from bench.report import environment_lines, write_section
from bench.study.apt_run import DataSettings, RecoverySettings, prepare_data, run_apt, run_config
from bench.study.baselines import METHODS, magnitude_scores, prune_masks, random_scores, taylor_scores
from bench.study.pretrain import PretrainSettings, pretrain
from bench.study.recover import count_params, evaluate, recover
from pipeline.apt.blocks import ModelShape
from pipeline.apt.slicing import slice_model
from pipeline.training import BatchOrder

SECTION = "## Quality: APT against baseline pruners"
TARGETS = (0.7, 0.5, 0.3)
ALL_METHODS = ("apt", *METHODS)
LABELS = {"apt": "APT (pipeline)", "magnitude": "magnitude (L2)", "random": "random", "taylor": "Taylor (LLM-Pruner)"}
CALIBRATION_SEED_OFFSET = 7_919
"""The Taylor pruner's calibration batches come in another order than the recovery batches."""


@dataclass(frozen=True)
class Preset:
    data: DataSettings
    pretrain: PretrainSettings
    recovery: RecoverySettings


PRESETS = {
    "full": Preset(DataSettings(), PretrainSettings(), RecoverySettings()),
    "quick": Preset(
        DataSettings(),
        PretrainSettings(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=352,
                         steps=80, batch_size=8, warmup_steps=8),
        RecoverySettings(steps=30, calibration_batches=2),
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller model and budget for a few-minute look")
    # One thread by default: with other processes on the 2 cores, a 2-thread step waits at every OpenMP barrier
    # for a descheduled partner; a pretraining step measured 1.4-1.7 s with one thread and 5-7.6 s with two.
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in the DeepSpeed rank")
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(ALL_METHODS),
                        help="pruners to run (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="working folder (default bench/out/study[-quick])")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"markdown file whose '{SECTION}' section to write (default: bench/RESULTS.md for "
                             f"the full study, none with --quick)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG of perplexity against remaining parameters (default bench/study_perplexity.png, "
                             "or inside --out with --quick)")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    args.out = args.out or Path("bench/out") / ("study-quick" if args.quick else "study")
    if args.results is None and not args.quick:
        args.results = Path("bench/RESULTS.md")
    args.plot = args.plot or (args.out / "study_perplexity.png" if args.quick else Path("bench/study_perplexity.png"))
    args.preset = PRESETS[mode]
    return args


class Clock:
    """Wall time per phase, and the machine's 1-minute load average at every phase boundary."""

    def __init__(self):
        self.started = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.loads = [os.getloadavg()[0]]

    def record(self, phase: str, since: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - since
        self.loads.append(os.getloadavg()[0])

    @property
    def total(self) -> float:
        return time.perf_counter() - self.started


def load_model(directory: Path):
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def calibration_batches(train_split, recovery: RecoverySettings, seed: int) -> list[dict]:
    order = BatchOrder(rows=len(train_split), micro_batch=recovery.micro_batch_size, grad_accum=1, world_size=1,
                       rank=0, seed=seed + CALIBRATION_SEED_OFFSET)
    return [train_split[order.indices(index, 0)] for index in range(recovery.calibration_batches)]


def same_tokens(prep_a: Path, prep_b: Path) -> bool:
    """Whether two prep folders hold identical train and validation blocks."""
    a, b = (datasets.load_from_disk(str(p / "dataset")).with_format("torch") for p in (prep_a, prep_b))
    return all(torch.equal(a[s][:]["input_ids"], b[s][:]["input_ids"]) for s in ("train", "validation"))


def run(args: argparse.Namespace) -> dict:
    """The whole study; returns every measured number (also written to <out>/results.json as it goes)."""
    preset, out, clock = args.preset, args.out, Clock()
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"settings": {name: dataclasses.asdict(getattr(preset, name))
                                  for name in ("data", "pretrain", "recovery")}, "runs": []}

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=2))

    since = time.perf_counter()
    prep_dir, data_id = prepare_data(run_config(out, "data", preset.data))
    splits = datasets.load_from_disk(str(prep_dir / "dataset")).with_format("torch")
    train_split, validation = splits["train"], splits["validation"]
    vocab_size = len(transformers.AutoTokenizer.from_pretrained(str(prep_dir / "tokenizer")))
    seq_len = train_split[0]["input_ids"].numel()
    results["data"] = {"train_blocks": len(train_split), "validation_blocks": len(validation), "seq_len": seq_len,
                       "vocab_size": vocab_size}
    clock.record("prep", since)

    since = time.perf_counter()
    pretrained = out / "pretrained"
    results["pretrain"] = pretrain(preset.pretrain, train_split, vocab_size, data_id, pretrained)
    clock.record("pretrain", since)

    since = time.perf_counter()
    dense = load_model(pretrained)
    shape = ModelShape.from_config(dense.config)
    results["dense"] = {"params": count_params(dense), "perplexity": evaluate(dense, validation)}
    print(f"dense: {results['dense']['params']:,} parameters, perplexity {results['dense']['perplexity']:.2f}",
          flush=True)
    clock.record("evaluate", since)

    since = time.perf_counter()
    scores = {"magnitude": magnitude_scores(dense), "random": random_scores(shape, preset.data.seed),
              "taylor": taylor_scores(dense, calibration_batches(train_split, preset.recovery, preset.data.seed))}
    del dense
    clock.record("baseline scores", since)
    save()

    for target in TARGETS:
        cfg = run_config(out, f"apt-{round(target * 100)}", preset.data, preset.recovery, model_path=pretrained,
                         tokenizer_path=prep_dir / "tokenizer", target_remaining=target)
        if "apt" in args.methods:
            since = time.perf_counter()
            model = load_model(run_apt(cfg))
            clock.record("apt pipeline", since)
            if not same_tokens(prep_dir, cfg.run_dir / "prep"):
                raise RuntimeError(f"{cfg.run_dir / 'prep'} tokenized the corpus differently from {prep_dir}")
            since = time.perf_counter()
            add_run(results, "apt", target, model, validation, before=None,
                    final_structure_steps=final_structure_steps(cfg.run_dir / "finetune" / "metrics.jsonl"))
            clock.record("evaluate", since)
            save()
        for method in (m for m in METHODS if m in args.methods):
            masks = prune_masks(shape, scores[method], target, cfg.pruning)
            since = time.perf_counter()
            before = evaluate(slice_model(load_model(pretrained), masks), validation)
            clock.record("evaluate", since)
            since = time.perf_counter()
            print(f"{method} at {target}: recovering for {cfg.train.steps} steps", flush=True)
            model = recover(load_model(pretrained), masks, train_split, cfg, log_every=max(1, cfg.train.steps // 4))
            clock.record(f"{method} recovery", since)
            since = time.perf_counter()
            add_run(results, method, target, model, validation, before=before,
                    final_structure_steps=cfg.train.steps)
            clock.record("evaluate", since)
            save()

    results["wall_seconds"] = clock.total
    results["phases"] = clock.phases
    results["load"] = clock.loads
    save()
    return results


def final_structure_steps(metrics_path: Path) -> int:
    """Steps APT's finetune trained with its final structure: after the last step at which a block's mask was
    still above 0 (the logged remaining fraction counts blocks whose mask is > 0)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    final = rows[-1]["remaining"]
    reached = next(row["step"] for index, row in enumerate(rows)
                   if all(later["remaining"] == final for later in rows[index:]))
    return rows[-1]["step"] - reached


def add_run(results: dict, method: str, target: float, model, validation, before: float | None,
            final_structure_steps: int) -> None:
    config = model.config
    entry = {"method": method, "target": target, "params": count_params(model),
             "perplexity": evaluate(model, validation), "perplexity_before_recovery": before,
             "kept": {"hidden": config.hidden_size, "heads": config.num_attention_heads,
                      "kv_heads": config.num_key_value_heads, "neurons": config.intermediate_size},
             "final_structure_steps": final_structure_steps}
    entry["remaining"] = entry["params"] / results["dense"]["params"]
    results["runs"].append(entry)
    print(f"{method} at {target}: {entry['params']:,} parameters ({entry['remaining']:.3f}), perplexity "
          f"{entry['perplexity']:.2f}" + ("" if before is None else f" (before recovery {before:.2f})"), flush=True)


# ---- report ---------------------------------------------------------------------------------------------------


def runs_at(results: dict, target: float) -> dict[str, dict]:
    return {entry["method"]: entry for entry in results["runs"] if entry["target"] == target}


def best_cell(by_method: dict[str, dict]) -> str:
    """The method with the lowest perplexity; when it is not APT, say so and by how much APT trails."""
    best = min(by_method, key=lambda method: by_method[method]["perplexity"])
    if best == "apt" or "apt" not in by_method:
        return f"**{best}**"
    behind = by_method["apt"]["perplexity"] / by_method[best]["perplexity"] - 1
    return f"**{best}** (APT not best: +{100 * behind:.1f}% perplexity)"


def quality_table(results: dict) -> str:
    """Target × method → held-out perplexity after recovery (achieved remaining fraction), with a best column."""
    dense = results["dense"]
    header = "| target remaining | " + " | ".join(LABELS[m] for m in ALL_METHODS) + " | best |"
    lines = [header, "|---:|" + "---:|" * len(ALL_METHODS) + "---|",
             f"| 1.0 (dense) | {dense['perplexity']:.2f} (1.000) |" + " |" * (len(ALL_METHODS) - 1) + " – |"]
    for target in TARGETS:
        by_method = runs_at(results, target)
        if not by_method:
            continue
        cells = [f"{by_method[m]['perplexity']:.2f} ({by_method[m]['remaining']:.3f})" if m in by_method else "–"
                 for m in ALL_METHODS]
        lines.append(f"| {target} | " + " | ".join(cells) + f" | {best_cell(by_method)} |")
    return "\n".join(lines)


def detail_table(results: dict) -> str:
    """Every pruned model: size and shape, steps trained at its final structure, perplexity before and after."""
    settings = results["settings"]["pretrain"]
    dense_shape = (f"{settings['hidden_size']} / {settings['num_heads']} ({settings['num_kv_heads']}) / "
                   f"{settings['intermediate_size']}")
    lines = [f"| target | method | parameters | remaining | hidden / heads (KV) / neurons per layer (dense: "
             f"{dense_shape}) | steps at final structure | perplexity before recovery | perplexity after recovery |",
             "|---:|---|---:|---:|---|---:|---:|---:|"]
    for entry in results["runs"]:
        before = entry["perplexity_before_recovery"]
        before_cell = "– (prunes while training)" if before is None else f"{before:.2f}"
        kept = entry["kept"]
        lines.append(f"| {entry['target']} | {LABELS[entry['method']]} | {entry['params']:,} | "
                     f"{entry['remaining']:.4f} | {kept['hidden']} / {kept['heads']} ({kept['kv_heads']}) / "
                     f"{kept['neurons']} | {entry['final_structure_steps']} | {before_cell} | "
                     f"{entry['perplexity']:.2f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Held-out perplexity against the achieved remaining fraction, one line per method."""
    figure = Figure(figsize=(6, 4))  # no pyplot: no global state, no display
    axis = figure.subplots()
    styles = {"apt": ("o-", "C0"), "magnitude": ("s-", "C1"), "random": ("^-", "C2"), "taylor": ("D-", "C3")}
    for method in ALL_METHODS:
        entries = sorted((e for e in results["runs"] if e["method"] == method), key=lambda e: e["remaining"])
        if entries:
            marker, color = styles[method]
            axis.plot([e["remaining"] for e in entries], [e["perplexity"] for e in entries], marker, color=color,
                      label=LABELS[method])
    dense = results["dense"]["perplexity"]
    axis.axhline(dense, color="gray", linestyle=":")
    axis.plot([1.0], [dense], "*", color="black", markersize=10, label="dense")
    axis.set_xlabel("remaining parameters (fraction of the dense model)")
    axis.set_ylabel("held-out perplexity after recovery (lower is better)")
    axis.set_title(f"Pruning a {results['dense']['params'] / 1e6:.1f} M-parameter GQA LLaMA trained on Python docs",
                   fontsize=10)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def verdict(results: dict, best: dict[float, str]) -> str:
    """One line: at how many targets APT has the lowest perplexity, and which method wins elsewhere."""
    if not any(entry["method"] == "apt" for entry in results["runs"]):
        return "APT was not run (--methods)."
    others = {target: method for target, method in best.items() if method != "apt"}
    line = f"APT has the lowest held-out perplexity at {len(best) - len(others)} of {len(best)} targets"
    if not others:
        return line + "."
    return line + "; not at " + ", ".join(f"{target} (best: {method})" for target, method in others.items()) + "."


def report(results: dict, args: argparse.Namespace, command: str) -> str:
    """The RESULTS.md section: command, machine, settings, what each method got, the tables."""
    settings = results["settings"]
    model, recovery, data = settings["pretrain"], settings["recovery"], results["data"]
    tokens_per_step = recovery["micro_batch_size"] * data["seq_len"]
    end_step = args.preset.recovery.end_step
    final_masks_from = end_step + round(1 / recovery["mask_step"])
    pre = results["pretrain"]
    held_out = settings["data"]["validation_fraction"]
    phases = ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in results["phases"].items())
    loads = results["load"]
    best = {t: min(runs_at(results, t), key=lambda m: runs_at(results, t)[m]["perplexity"])
            for t in TARGETS if runs_at(results, t)}
    lines = [
        SECTION,
        "",
        f"`{command}`",
        "",
        *environment_lines(),
        f"- wall time of the whole study: **{results['wall_seconds'] / 60:.1f} min** (minutes per phase: {phases}); "
        f"1-minute load average {min(loads):.1f}–{max(loads):.1f} over the run (sampled at each phase; other "
        f"engineers' tests shared the 2 cores); pretrained checkpoint "
        f"{'reused from an earlier run' if pre['reused'] else 'trained in this run'}",
        f"- data: the pipeline's prep stage on `data/python-docs.jsonl`: SentencePiece BPE, vocabulary "
        f"{data['vocab_size']}, seq_len {data['seq_len']}, {held_out:.0%} of the documents held out (seed "
        f"{settings['data']['seed']}): {data['train_blocks']} train blocks, {data['validation_blocks']} validation "
        f"blocks ({data['validation_blocks'] * data['seq_len']:,} tokens); every APT run's prep produced the same "
        f"blocks (checked)",
        f"- model: LlamaForCausalLM, hidden {model['hidden_size']}, {model['num_layers']} layers, {model['num_heads']} "
        f"heads / {model['num_kv_heads']} KV heads (GQA), intermediate {model['intermediate_size']}, untied "
        f"embeddings: {results['dense']['params']:,} parameters; pretrained from scratch for {model['steps']} steps × "
        f"{model['batch_size']} × {data['seq_len']} tokens ({pre['tokens']:,} tokens, {pre['epochs']:.2f} epochs), "
        f"AdamW lr {model['lr']} (warm-up {model['warmup_steps']}, cosine to 10%), weight decay "
        f"{model['weight_decay']}, seed {model['seed']}",
        f"- recovery budget, the same for every method: {recovery['steps']} steps × {recovery['micro_batch_size']} "
        f"sequences × {data['seq_len']} tokens = {recovery['steps'] * tokens_per_step:,} training tokens, the same "
        f"batches in the same order (`BatchOrder`, seed {settings['data']['seed']}); APT adapters rank "
        f"{recovery['rank']}, alpha {recovery['alpha']} on {', '.join(recovery['adapter_targets'])}; AdamW lr "
        f"{recovery['lr']}, {recovery['warmup_steps']} warm-up steps then cosine to 10%, gradient clipping 1.0, fp32",
        f"- **APT**: the pipeline (`pipeline.run.run_pipeline`, 1 DeepSpeed rank, ZeRO-2 on CPU): finetune "
        f"{recovery['steps']} steps, pruning window steps 0–{end_step} (cubic schedule, salience update every "
        f"{recovery['update_every']} steps, masks move {recovery['mask_step']} per step, so they are final by step "
        f"{final_masks_from} at the latest and the last ≥ {recovery['steps'] - final_masks_from} steps train with the "
        f"final masks); salience stage {recovery['calibration_batches']} calibration batches (no training); finalize; "
        f"merge (fp32 export); {recovery['attention_mode']} attention mode, {recovery['layout']} layout, round_to 8 "
        f"(every method)",
        f"- **baselines**: block scores → `search_masks` (same mode, layout, rounding and exact budget as APT) → "
        f"{recovery['steps']} steps of APT adapters with those masks fixed (`inject_adapters` + `set_masks`, pruned "
        f"blocks cut out first with `slice_model`, which trains what the masked model trains; the finetune stage's "
        f"optimizer factory) → `merge_adapters`. magnitude: Σw² per block; random: "
        f"uniform density per block (seed {settings['data']['seed']}); Taylor: Σ|w·∂L/∂w| per block, gradients "
        f"accumulated over {recovery['calibration_batches']} calibration batches of {recovery['micro_batch_size']} "
        f"train sequences on the dense model. Scores are computed once and serve every target",
        "- every model (the dense one, each baseline before recovery, every pruned model) is scored by one function "
        "(`bench/study/recover.py: evaluate`, the eval stage's token-weighted perplexity) on all validation blocks; "
        "remaining = parameters of the physically pruned model / dense parameters",
        "",
        "Held-out perplexity after recovery (remaining fraction achieved):",
        "",
        quality_table(results),
        "",
        detail_table(results),
        "",
        verdict(results, best),
        f"Plot: `{args.plot}`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the DeepSpeed rank of each APT run inherits it
    transformers.utils.logging.disable_progress_bar()
    command = shlex.join([os.path.relpath(sys.executable), "-m", "bench.study.run_study", *argv])
    results = run(args)
    plot(results, args.plot)
    section = report(results, args, command)
    print(section)
    (args.out / "report.md").write_text(section)
    if args.results is not None:
        write_section(args.results, SECTION, section)


if __name__ == "__main__":
    main()
