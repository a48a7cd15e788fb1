"""APT against baseline pruners on real text, in one command (issue 8, the quality study; issue 14 item 6).

1. prep: the pipeline's prep stage trains a SentencePiece tokenizer on data/python-docs.jsonl and writes the
   train / held-out validation blocks every method then uses.
2. pretrain: a small GQA LLaMA from scratch on the train split (reused when it exists with the same settings).
3. prune to each target remaining fraction, with each seed (run.seed for APT, the recovery's seed for the
   baselines: data order and adapter init; the random pruner's scores too), with
   apt        the pipeline with its defaults (rank growth, self-distillation, compaction, measured shape search;
              finetune → salience → finalize → merge), its fine-tuning steps being the recovery budget;
   apt-no-growth, apt-no-distill, apt-global   ablations at 0.5, first seed (apt.grow_every 0, apt.distill false,
              pruning.shape_search global);
   magnitude, random, taylor   per-block scores → the pipeline's measured shape choice (`search_target` +
              `choose_shape`, as APT) → the same budget of adapter training with fixed masks → merge + slice.
4. score every model with one function on the same validation blocks; write bench/results/study.json, the
   mean ± std table to bench/RESULTS.md, and the plot.

Run from the repository root: `.venv/bin/python -m bench.study.run_study` (about an hour on 2 shared cores),
or `--quick` (a smaller model, one target, two seeds, a few minutes; results stay in bench/out/study-quick/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
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
from bench.study.baselines import METHODS, magnitude_scores, shape_masks, taylor_scores
from bench.study.pretrain import PretrainSettings, pretrain
from bench.study.recover import count_params, evaluate, recover
from pipeline.apt.blocks import ModelShape
from pipeline.apt.slicing import slice_model
from pipeline.apt.weight_scores import random_scores
from pipeline.recipe import SHAPE_SEED_OFFSET
from pipeline.training import BatchOrder

SECTION = "## Quality: APT against baseline pruners"
TARGETS = (0.7, 0.5, 0.3)
SEEDS = (0, 1, 2)
ABLATION_TARGET = 0.5
ABLATIONS = {"apt-no-growth": {"apt": {"grow_every": 0}}, "apt-no-distill": {"apt": {"distill": False}},
             "apt-global": {"pruning": {"shape_search": "global"}}}
"""Pipeline config overrides of each APT ablation (run at ABLATION_TARGET with the first seed)."""
ALL_METHODS = ("apt", *ABLATIONS, *METHODS)
LABELS = {"apt": "APT (pipeline defaults)", "apt-no-growth": "APT, no rank growth",
          "apt-no-distill": "APT, no self-distillation", "apt-global": "APT, global density search",
          "magnitude": "magnitude (L2)", "random": "random", "taylor": "Taylor (LLM-Pruner)"}
CALIBRATION_SEED_OFFSET = 7_919
"""The Taylor pruner's calibration batches come in another order than the recovery batches."""


@dataclass(frozen=True)
class Preset:
    data: DataSettings
    pretrain: PretrainSettings
    recovery: RecoverySettings
    targets: tuple[float, ...] = TARGETS
    seeds: tuple[int, ...] = SEEDS


PRESETS = {
    "full": Preset(
        DataSettings(vocab_size=1024),
        PretrainSettings(hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=688,
                         steps=600, batch_size=16, warmup_steps=30),
        RecoverySettings(steps=96),  # 12 APT runs and 27 baseline recoveries in about an hour on 2 shared cores
    ),
    "quick": Preset(
        DataSettings(vocab_size=1024),
        PretrainSettings(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=352,
                         steps=80, batch_size=8, warmup_steps=8),
        RecoverySettings(steps=30, calibration_batches=2),
        targets=(0.5,),
        seeds=(0, 1),
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
    parser.add_argument("--from-results", action="store_true",
                        help="run nothing: write the report, records and plot from <out>/results.json (e.g. of a "
                             "cut-short run)")
    parser.add_argument("--json", type=Path, default=None,
                        help="the per-run records (default bench/results/study.json, or inside --out with --quick)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG of perplexity against remaining parameters (default bench/study_perplexity.png, "
                             "or inside --out with --quick)")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    args.out = args.out or Path("bench/out") / ("study-quick" if args.quick else "study")
    if args.results is None and not args.quick:
        args.results = Path("bench/RESULTS.md")
    args.json = args.json or (args.out / "study.json" if args.quick else Path("bench/results/study.json"))
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
    results["settings"] |= {"targets": list(preset.targets), "seeds": list(preset.seeds)}
    study = prepare(args, results, clock)

    def save() -> None:
        results.update(wall_seconds=clock.total, phases=clock.phases, load=clock.loads)
        (out / "results.json").write_text(json.dumps(results, indent=2))

    save()
    for index, seed in enumerate(preset.seeds):  # every target at one seed first: a cut-short run still compares
        for target in preset.targets:
            for method in ("apt", *METHODS):
                if method in args.methods:
                    run_method(study, results, clock, method, target, seed)
                    save()
        if index == 0:
            for method in (m for m in ABLATIONS if m in args.methods and ABLATION_TARGET in preset.targets):
                run_method(study, results, clock, method, ABLATION_TARGET, seed)
                save()
    save()
    return results


@dataclass
class Study:
    """What every run of the study shares: data, the dense checkpoint, its shape, the baselines' scores."""

    out: Path
    preset: Preset
    prep_dir: Path
    pretrained: Path
    train_split: object
    validation: object
    shape: ModelShape
    scores: dict


def prepare(args: argparse.Namespace, results: dict, clock: Clock) -> Study:
    """prep, pretrain (or reuse), score the dense model, compute the baselines' fixed scores."""
    preset, out = args.preset, args.out
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
    results["dense"] = {"params": count_params(dense), "perplexity": evaluate(dense, validation),
                        "embedding_share": embedding_share(dense)}
    print(f"dense: {results['dense']['params']:,} parameters (embeddings {results['dense']['embedding_share']:.1%}),"
          f" perplexity {results['dense']['perplexity']:.2f} (vocabulary {vocab_size})", flush=True)
    clock.record("evaluate", since)
    since = time.perf_counter()
    scores = {"magnitude": magnitude_scores(dense),
              "taylor": taylor_scores(dense, calibration_batches(train_split, preset.recovery, preset.data.seed))}
    clock.record("baseline scores", since)
    return Study(out, preset, prep_dir, pretrained, train_split, validation, shape, scores)


def embedding_share(model) -> float:
    """Share of the parameters in the input embeddings and the LM head (one matrix when tied)."""
    matrices = {id(p): p.numel() for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    return sum(matrices.values()) / count_params(model)


def method_config(study: Study, method: str, target: float, seed: int):
    """The pipeline config of one (method, target, seed): run.seed = seed, the ablation's overrides."""
    name = f"{method}-{round(target * 100)}-s{seed}"
    return run_config(study.out, name, study.preset.data, study.preset.recovery, model_path=study.pretrained,
                      tokenizer_path=study.prep_dir / "tokenizer", target_remaining=target, seed=seed,
                      overrides=ABLATIONS.get(method))


def run_method(study: Study, results: dict, clock: Clock, method: str, target: float, seed: int) -> None:
    """One pruned model: APT (or an ablation) through the pipeline, or a baseline's masks and recovery."""
    cfg = method_config(study, method, target, seed)
    if method in METHODS:
        run_baseline(study, results, clock, method, cfg)
        return
    since = time.perf_counter()
    split_cfg = method_config(study, method, target, study.preset.data.seed)
    print(f"{method} at {target}, seed {seed}: the pipeline", flush=True)
    model = load_model(run_apt(cfg, split_cfg))
    clock.record("apt pipeline", since)
    if not same_tokens(study.prep_dir, cfg.run_dir / "prep"):
        raise RuntimeError(f"{cfg.run_dir / 'prep'} tokenized the corpus differently from {study.prep_dir}")
    since = time.perf_counter()
    add_run(results, method, target, seed, model, study.validation, before=None,
            final_structure_steps=final_structure_steps(cfg.run_dir / "finetune" / "metrics.jsonl"))
    clock.record("evaluate", since)


def shape_batches(train_split, cfg) -> list[dict]:
    """The baselines' held-out shape batches: train rows in their own order, as APT's finetune takes them."""
    order = BatchOrder(rows=len(train_split), micro_batch=cfg.train.micro_batch_size, grad_accum=1, world_size=1,
                       rank=0, seed=cfg.run.seed + SHAPE_SEED_OFFSET)
    return [train_split[order.indices(index, 0)] for index in range(cfg.pruning.shape_batches)]


def run_baseline(study: Study, results: dict, clock: Clock, method: str, cfg) -> None:
    """Scores → measured shape choice (the pipeline's) → masks → recovery with the APT run's budget."""
    target, seed = cfg.pruning.target_remaining, cfg.run.seed
    since = time.perf_counter()
    scores = random_scores(study.shape, seed) if method == "random" else study.scores[method]
    masks, candidates = shape_masks(load_model(study.pretrained), scores, target, cfg.pruning,
                                    shape_batches(study.train_split, cfg))
    clock.record("baseline shape choice", since)
    since = time.perf_counter()
    before = evaluate(slice_model(load_model(study.pretrained), masks), study.validation)
    clock.record("evaluate", since)
    since = time.perf_counter()
    print(f"{method} at {target}, seed {seed}: recovering for {cfg.train.steps} steps", flush=True)
    model = recover(load_model(study.pretrained), masks, study.train_split, cfg,
                    log_every=max(1, cfg.train.steps // 4))
    clock.record(f"{method} recovery", since)
    since = time.perf_counter()
    add_run(results, method, target, seed, model, study.validation, before=before,
            final_structure_steps=cfg.train.steps, candidates=candidates)
    clock.record("evaluate", since)


def final_structure_steps(metrics_path: Path) -> int:
    """Steps APT's finetune trained with its final structure: after the last step at which a block's mask was
    still above 0 (the logged remaining fraction counts blocks whose mask is > 0)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    final = rows[-1]["remaining"]
    reached = next(row["step"] for index, row in enumerate(rows)
                   if all(later["remaining"] == final for later in rows[index:]))
    return rows[-1]["step"] - reached


def add_run(results: dict, method: str, target: float, seed: int, model, validation, before: float | None,
            final_structure_steps: int, candidates: list[dict] | None = None) -> None:
    config = model.config
    entry = {"method": method, "target": target, "seed": seed, "params": count_params(model),
             "perplexity": evaluate(model, validation), "perplexity_before_recovery": before,
             "kept": {"hidden": config.hidden_size, "heads": config.num_attention_heads,
                      "kv_heads": config.num_key_value_heads, "neurons": config.intermediate_size},
             "final_structure_steps": final_structure_steps, "shape_candidates": candidates}
    entry["achieved_fraction"] = entry["params"] / results["dense"]["params"]
    results["runs"].append(entry)
    print(f"{method} at {target}, seed {seed}: {entry['params']:,} parameters ({entry['achieved_fraction']:.3f}), "
          f"perplexity {entry['perplexity']:.2f}" + ("" if before is None else f" (before recovery {before:.2f})"),
          flush=True)


def study_records(results: dict) -> dict:
    """bench/results/study.json: the dense model once, one record per (method, target, seed)."""
    keys = ("method", "target", "seed", "achieved_fraction", "perplexity_before_recovery", "perplexity")
    return {"dense": {key: results["dense"][key] for key in ("params", "perplexity", "embedding_share")},
            "vocab_size": results["data"]["vocab_size"], "targets": results["settings"]["targets"],
            "seeds": results["settings"]["seeds"],
            "records": [{key: entry[key] for key in keys} for entry in results["runs"]]}


# ---- report ---------------------------------------------------------------------------------------------------

MAIN = ("apt", *METHODS)
"""The methods run at every target and seed (the ablations only at ABLATION_TARGET, first seed)."""


def runs_of(results: dict, method: str, target: float) -> list[dict]:
    return [entry for entry in results["runs"] if entry["method"] == method and entry["target"] == target]


def summary(results: dict, method: str, target: float) -> dict | None:
    """Mean and sample std of the perplexity over seeds, mean achieved fraction, seed count; None if not run."""
    entries = runs_of(results, method, target)
    if not entries:
        return None
    values = [entry["perplexity"] for entry in entries]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "fraction": statistics.fmean(entry["achieved_fraction"] for entry in entries)}


def best_method(results: dict, target: float, methods=MAIN) -> str | None:
    """The method with the lowest mean perplexity at `target`."""
    means = {m: stat["mean"] for m in methods if (stat := summary(results, m, target)) is not None}
    return min(means, key=means.get) if means else None


def apt_margin(results: dict, target: float) -> str:
    """APT's perplexity against the best baseline: mean ± std over seeds of the per-seed relative difference."""
    baseline = best_method(results, target, METHODS)
    apt = {entry["seed"]: entry["perplexity"] for entry in runs_of(results, "apt", target)}
    if baseline is None or not apt:
        return "–"
    other = {entry["seed"]: entry["perplexity"] for entry in runs_of(results, baseline, target)}
    diffs = [100 * (apt[seed] / other[seed] - 1) for seed in sorted(apt) if seed in other]
    if not diffs:
        return "–"
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return f"{statistics.fmean(diffs):+.1f}% ± {spread:.1f}% vs {baseline} ({len(diffs)} seeds)"


def quality_table(results: dict) -> str:
    """Target × method → mean ± std perplexity after recovery (mean achieved fraction); best; APT's margin."""
    dense = results["dense"]
    header = "| target remaining | " + " | ".join(LABELS[m] for m in MAIN) + " | best | APT vs best baseline |"
    lines = [header, "|---:|" + "---:|" * len(MAIN) + "---|---|",
             f"| 1.0 (dense) | {dense['perplexity']:.2f} (1.000) |" + " |" * (len(MAIN) - 1) + " – | – |"]
    for target in results["settings"]["targets"]:
        cells = []
        for method in MAIN:
            stat = summary(results, method, target)
            cells.append("–" if stat is None else f"{stat['mean']:.2f} ± {stat['std']:.2f} ({stat['fraction']:.3f})")
        if all(cell == "–" for cell in cells):
            continue
        lines.append(f"| {target} | " + " | ".join(cells) + f" | **{best_method(results, target)}** | "
                     f"{apt_margin(results, target)} |")
    return "\n".join(lines)


def ablation_table(results: dict) -> str:
    """APT and its ablations at ABLATION_TARGET, first seed: perplexity, fraction, change against APT."""
    seed = results["settings"]["seeds"][0]
    runs = {e["method"]: e for e in results["runs"] if e["target"] == ABLATION_TARGET and e["seed"] == seed}
    lines = [f"| variant (target {ABLATION_TARGET}, seed {seed}) | perplexity | remaining | vs APT |",
             "|---|---:|---:|---:|"]
    for method in ("apt", *ABLATIONS):
        if method in runs:
            entry = runs[method]
            change = ("–" if method == "apt" or "apt" not in runs
                      else f"{100 * (entry['perplexity'] / runs['apt']['perplexity'] - 1):+.1f}%")
            lines.append(f"| {LABELS[method]} | {entry['perplexity']:.2f} | {entry['achieved_fraction']:.3f} | "
                         f"{change} |")
    return "\n".join(lines)


def detail_table(results: dict) -> str:
    """Every pruned model: size and shape, steps trained at its final structure, perplexity before and after."""
    settings = results["settings"]["pretrain"]
    dense_shape = (f"{settings['hidden_size']} / {settings['num_heads']} ({settings['num_kv_heads']}) / "
                   f"{settings['intermediate_size']}")
    lines = [f"| target | method | seed | parameters | remaining | hidden / heads (KV) / neurons per layer (dense: "
             f"{dense_shape}) | steps at final structure | perplexity before recovery | perplexity after recovery |",
             "|---:|---|---:|---:|---:|---|---:|---:|---:|"]
    for entry in sorted(results["runs"], key=lambda e: (-e["target"], ALL_METHODS.index(e["method"]), e["seed"])):
        before = entry["perplexity_before_recovery"]
        before_cell = "– (prunes while training)" if before is None else f"{before:.2f}"
        kept = entry["kept"]
        lines.append(f"| {entry['target']} | {LABELS[entry['method']]} | {entry['seed']} | {entry['params']:,} | "
                     f"{entry['achieved_fraction']:.4f} | {kept['hidden']} / {kept['heads']} ({kept['kv_heads']}) / "
                     f"{kept['neurons']} | {entry['final_structure_steps']} | {before_cell} | "
                     f"{entry['perplexity']:.2f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Mean held-out perplexity (± std over seeds) against the achieved remaining fraction; ablations as points."""
    figure = Figure(figsize=(6.5, 4.2))  # no pyplot: no global state, no display
    axis = figure.subplots()
    styles = {"apt": ("o-", "C0"), "magnitude": ("s-", "C1"), "random": ("^-", "C2"), "taylor": ("D-", "C3"),
              "apt-no-growth": ("v", "C4"), "apt-no-distill": ("P", "C5"), "apt-global": ("X", "C6")}
    for method in ALL_METHODS:
        stats = [s for t in results["settings"]["targets"] if (s := summary(results, method, t)) is not None]
        if stats:
            stats.sort(key=lambda s: s["fraction"])
            marker, color = styles[method]
            axis.errorbar([s["fraction"] for s in stats], [s["mean"] for s in stats], yerr=[s["std"] for s in stats],
                          fmt=marker, color=color, capsize=3, label=LABELS[method])
    dense = results["dense"]["perplexity"]
    axis.axhline(dense, color="gray", linestyle=":")
    axis.plot([1.0], [dense], "*", color="black", markersize=10, label="dense")
    axis.set_xlabel("remaining parameters (fraction of the dense model)")
    axis.set_ylabel("held-out perplexity after recovery (lower is better)")
    seeds = len(results["settings"]["seeds"])
    axis.set_title(f"Pruning a {results['dense']['params'] / 1e6:.1f} M-parameter GQA LLaMA on Python docs "
                   f"(mean ± std, {seeds} seeds)", fontsize=9)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def verdict(results: dict) -> str:
    """One line: the best method per target, and at how many APT (pipeline defaults) is best."""
    targets = [t for t in results["settings"]["targets"] if best_method(results, t) is not None]
    best = {t: best_method(results, t) for t in targets}
    wins = sum(method == "apt" for method in best.values())
    per_target = ", ".join(f"{t}: {m}" for t, m in best.items())
    return f"Lowest mean held-out perplexity per target: {per_target}; APT is best at {wins} of {len(targets)}."


def setting_lines(results: dict, args: argparse.Namespace) -> list[str]:
    """The bullet list of what was run: machine, data, model, budget, each method."""
    settings = results["settings"]
    model, recovery, data = settings["pretrain"], settings["recovery"], results["data"]
    cfg = run_config(args.out, "apt", args.preset.data, args.preset.recovery)
    apt, pruning = cfg.apt, cfg.pruning
    pre, dense = results["pretrain"], results["dense"]
    phases = ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in results["phases"].items())
    loads = results["load"]
    seeds = ", ".join(map(str, settings["seeds"]))
    return [
        *environment_lines(),
        f"- wall time of the whole study: **{results['wall_seconds'] / 60:.1f} min** (minutes per phase: {phases}); "
        f"1-minute load average {min(loads):.1f}–{max(loads):.1f} over the run (sampled at each phase; other "
        f"engineers' tests shared the 2 cores); pretrained checkpoint "
        f"{'reused from an earlier run with the same settings' if pre['reused'] else 'trained in this run'}",
        f"- data: the pipeline's prep stage on `data/python-docs.jsonl`: SentencePiece BPE, vocabulary "
        f"{data['vocab_size']}, seq_len {data['seq_len']}, {settings['data']['validation_fraction']:.0%} of the "
        f"documents held out (split seed {settings['data']['seed']}, the same for every run): {data['train_blocks']} "
        f"train blocks, {data['validation_blocks']} validation blocks "
        f"({data['validation_blocks'] * data['seq_len']:,} tokens); every APT run's prep produced the same blocks "
        f"(checked)",
        f"- model: LlamaForCausalLM, hidden {model['hidden_size']}, {model['num_layers']} layers, {model['num_heads']} "
        f"heads / {model['num_kv_heads']} KV heads (GQA), intermediate {model['intermediate_size']}, untied "
        f"embeddings: {dense['params']:,} parameters, **{dense['embedding_share']:.1%} in the embeddings and LM "
        f"head**; pretrained from scratch for {model['steps']} steps × {model['batch_size']} × {data['seq_len']} "
        f"tokens ({pre['tokens']:,} tokens, {pre['epochs']:.2f} epochs), AdamW lr {model['lr']} (warm-up "
        f"{model['warmup_steps']}, cosine to 10%), weight decay {model['weight_decay']}, seed {model['seed']}; "
        f"dense held-out perplexity {dense['perplexity']:.2f} (vocabulary {data['vocab_size']})",
        f"- seeds {seeds} for every (method, target): run.seed for APT, the recovery's seed for the baselines (data "
        f"order and adapter init; the random pruner's scores too); the same dense model",
        f"- recovery budget, the same for every method: {recovery['steps']} steps × {recovery['micro_batch_size']} "
        f"sequences × {data['seq_len']} tokens = {recovery['steps'] * recovery['micro_batch_size'] * data['seq_len']:,}"
        f" training tokens, batches in the seed's `BatchOrder`; adapters rank {recovery['rank']}, alpha "
        f"{recovery['alpha']} on {', '.join(recovery['adapter_targets'])}; AdamW lr {recovery['lr']}, "
        f"{recovery['warmup_steps']} warm-up steps then cosine to 10%, gradient clipping 1.0, fp32",
        f"- **APT** (pipeline defaults): `pipeline.run` stages on 1 DeepSpeed rank (ZeRO-2 on CPU): finetune "
        f"{recovery['steps']} steps, pruning window 0–{cfg.pruning.end_step} (update every "
        f"{pruning.update_every}, mask step {pruning.mask_step}), rank growth every {apt.grow_every} steps (tuning "
        f"budget {apt.tuning_budget}×), self-distillation (weight {apt.distill_weight}), compaction, shape search "
        f"`{pruning.shape_search}` ({pruning.shape_candidates} candidates, {pruning.shape_batches} held-out batches)"
        f"; salience {recovery['calibration_batches']} batches; finalize; merge (fp32); {pruning.attention_mode} "
        f"attention, {pruning.layout} layout, round_to {pruning.round_to} (every method). Ablations at "
        f"{ABLATION_TARGET}, seed {settings['seeds'][0]}: " + "; ".join(
            f"{m}: " + ", ".join(f"{sec}.{k}={v}" for sec, kv in o.items() for k, v in kv.items())
            for m, o in ABLATIONS.items()),
        f"- **baselines**: block scores → the SAME shape machinery as APT (`search_target` with "
        f"`pruning.shape_search: {pruning.shape_search}`: {pruning.shape_candidates} per-type candidate shapes at "
        f"the exact budget, the one with the lowest loss on {pruning.shape_batches} held-out train batches by "
        f"`choose_shape`) → {recovery['steps']} steps of APT adapters with those masks fixed (pruned blocks cut out "
        f"first) → `merge_adapters`. magnitude: Σw² per block; random: uniform density per block (seeded by the "
        f"run's seed); Taylor: Σ|w·∂L/∂w| per block over {recovery['calibration_batches']} calibration batches on "
        f"the dense model. Magnitude and Taylor scores are computed once",
        "- every model is scored by one function (`bench/study/recover.py: evaluate`, token-weighted perplexity) on "
        "all validation blocks; remaining = parameters of the physically pruned model / dense parameters",
    ]


def report(results: dict, args: argparse.Namespace, command: str) -> str:
    """The RESULTS.md section: command, settings, the mean ± std table, ablations, every run."""
    lines = [
        SECTION, "", f"`{command}`", "", *setting_lines(results, args), "",
        "Held-out perplexity after recovery, mean ± std over seeds (mean remaining fraction achieved); the last "
        "column is APT's perplexity relative to the best baseline, per seed, mean ± std (negative: APT lower):",
        "", quality_table(results), "", verdict(results), "",
        "Ablations of APT's defaults:", "", ablation_table(results), "",
        f"Every run (per-run records: `{args.json}`):", "", detail_table(results), "",
        f"Plot: `{args.plot}`.", "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the DeepSpeed rank of each APT run inherits it
    transformers.utils.logging.disable_progress_bar()
    command = shlex.join([os.path.relpath(sys.executable), "-m", "bench.study.run_study", *argv])
    results = json.loads((args.out / "results.json").read_text()) if args.from_results else run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(study_records(results), indent=2) + "\n")
    plot(results, args.plot)
    section = report(results, args, command)
    print(section)
    (args.out / "report.md").write_text(section)
    if args.results is not None:
        write_section(args.results, SECTION, section)


if __name__ == "__main__":
    main()
