"""APT against other pruners' recipes, every row through the same pipeline (issues 8, 14, 25: the quality study).

1. prep: the pipeline's prep stage trains a SentencePiece tokenizer on data/python-docs.jsonl and writes the
   train / held-out validation blocks every run then uses.
2. pretrain: a small GQA LLaMA from scratch on the train split (reused when it exists with the same settings).
3. every row (`bench/study/rows.py`) at each target remaining fraction and seed: the whole pipeline on one rank with
   the row's `pruning.criterion` / `pruning.schedule` / `apt` overrides and the same steps, data and adapters.
   APT's ablations run at 0.5 with every seed, each criterion's cut without recovery at every target with the
   first seed; LoRA on the dense model (target 1.0) with every seed, for the finetune-time ratio.
4. score every export with one function on the same validation blocks; write bench/results/study.json (every
   number the report prints), the section of bench/RESULTS.md, and the plot.

Each finished run leaves `<out>/runs/<name>.json`; a rerun skips those, so the study can run in parts (`--targets`,
`--seeds`, `--methods`, or two processes with other `--port`s) whose records merge. `--jobs 2` runs two pipelines
at once, one thread each. `--from-results bench/results/study.json` rebuilds the report and the plot from the
records alone. From the repository root: `.venv/bin/python -m bench.study.run_study --jobs 2`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import transformers

from bench.report import environment_lines, write_section
from bench.study import study_report
from bench.study.apt_run import DataSettings, RecoverySettings, prepare_data, run_apt, run_config
from bench.study.pretrain import PretrainSettings, pretrain
from bench.study.rows import ABLATIONS, LORA, MAIN, NO_RECOVERY, OPT_IN, ROWS, ingredients
from bench.study.scoring import count_params, evaluate, load_model
from pipeline.evaluation import model_sizes
from pipeline.stage import write_atomic

TARGETS = (0.7, 0.5, 0.3)
SEEDS = (0, 1, 2)


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
        RecoverySettings(steps=96),
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
    parser.add_argument("--methods", nargs="+", choices=list(ROWS), help="rows to run (default: every row but "
                        f"{', '.join(OPT_IN)})", default=[method for method in ROWS if method not in OPT_IN])
    parser.add_argument("--targets", nargs="+", type=float, default=None, help="targets to run (default: the preset's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds to run (default: the preset's)")
    parser.add_argument("--jobs", type=int, default=1, help="pipelines at once (each with --threads torch threads)")
    # One thread per pipeline: with other processes on the 2 cores, a 2-thread step waits at every OpenMP barrier
    # for a descheduled partner (a pretraining step measured 1.4-1.7 s with one thread and 5-7.6 s with two).
    parser.add_argument("--threads", type=int, default=1, help="torch threads per pipeline and its DeepSpeed rank")
    parser.add_argument("--port", type=int, default=29731,
                        help="first DeepSpeed master port (the plan's n-th run uses port + n)")
    parser.add_argument("--out", type=Path, default=None, help="working folder (default bench/out/study[-quick])")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"markdown file whose '{study_report.SECTION}' section to write (default: "
                             f"bench/RESULTS.md for the full study, none with --quick)")
    parser.add_argument("--json", type=Path, default=None,
                        help="every record (default bench/results/study.json, or inside --out with --quick)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of perplexity against remaining parameters")
    parser.add_argument("--from-results", type=Path, default=None, metavar="STUDY_JSON",
                        help="run nothing: rebuild the report and plot from a study.json")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    args.out = args.out or Path("bench/out") / ("study-quick" if args.quick else "study")
    if args.results is None and not args.quick:
        args.results = Path("bench/RESULTS.md")
    args.json = args.json or (args.out / "study.json" if args.quick else Path("bench/results/study.json"))
    args.plot = args.plot or (args.out / "study_perplexity.png" if args.quick else Path("bench/study_perplexity.png"))
    args.preset = PRESETS[mode]
    args.targets = tuple(args.targets or args.preset.targets)
    args.seeds = tuple(args.seeds or args.preset.seeds)
    return args


def prepare(args: argparse.Namespace) -> dict:
    """prep and pretrain (or reuse); the dense model's size and perplexity; what every run shares."""
    preset, out = args.preset, args.out
    started = time.perf_counter()
    prep_dir, data_id = prepare_data(run_config(out, "data", preset.data))
    splits = datasets.load_from_disk(str(prep_dir / "dataset")).with_format("torch")
    vocab_size = len(transformers.AutoTokenizer.from_pretrained(str(prep_dir / "tokenizer")))
    pretrained = out / "pretrained"
    pretrain_record = pretrain(preset.pretrain, splits["train"], vocab_size, data_id, pretrained)
    dense = load_model(pretrained)
    shared = {
        "settings": {name: dataclasses.asdict(getattr(preset, name)) for name in ("data", "pretrain", "recovery")}
        | {"targets": list(args.targets), "seeds": list(args.seeds)},
        "data": {"train_blocks": len(splits["train"]), "validation_blocks": len(splits["validation"]),
                 "seq_len": splits["train"][0]["input_ids"].numel(), "vocab_size": vocab_size},
        "pretrain": pretrain_record,
        "dense": {"params": count_params(dense), "perplexity": evaluate(dense, splits["validation"]),
                  "embedding_share": embedding_share(dense)},
        "prepare_seconds": time.perf_counter() - started,
    }
    print(f"dense: {shared['dense']['params']:,} parameters, perplexity {shared['dense']['perplexity']:.2f}",
          flush=True)
    return shared


def embedding_share(model) -> float:
    """Share of the parameters in the input embeddings and the LM head (one matrix when tied)."""
    matrices = {id(p): p.numel() for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    return sum(matrices.values()) / count_params(model)


def planned_runs(args: argparse.Namespace) -> list[tuple[str, float, int]]:
    """(method, target, seed) of every run, seed-major, so a study cut short still compares every row."""
    runs = []
    for index, seed in enumerate(args.seeds):
        runs += [(LORA, 1.0, seed)] if LORA in args.methods else []
        for target in args.targets:
            runs += [(method, target, seed) for method in MAIN if method in args.methods]
            if index == 0:
                runs += [(method, target, seed) for method in NO_RECOVERY if method in args.methods]
        runs += [(method, target, seed) for method in ABLATIONS if method in args.methods
                 for target in ROWS[method].targets if target in args.targets]
    return runs


def run_name(method: str, target: float, seed: int) -> str:
    return f"{method}-{round(target * 100)}-s{seed}"


def method_config(args: argparse.Namespace, method: str, target: float, seed: int, port: int):
    """The pipeline config of one (method, target, seed): run.seed = seed, the row's overrides."""
    overrides = {section: dict(values) for section, values in ROWS[method].overrides.items()}
    overrides["deepspeed"] = {"master_port": port}
    recovery = dataclasses.replace(args.preset.recovery, **ROWS[method].recovery)
    return run_config(args.out, run_name(method, target, seed), args.preset.data, recovery,
                      model_path=args.out / "pretrained", tokenizer_path=args.out / "data" / "prep" / "tokenizer",
                      target_remaining=target, seed=seed, overrides=overrides)


def run_one(args: argparse.Namespace, method: str, target: float, seed: int, port: int) -> dict:
    """One row's pipeline run, scored; its record is written to <out>/runs/<name>.json (skipped when there)."""
    record_path = args.out / "runs" / f"{run_name(method, target, seed)}.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    torch.set_num_threads(args.threads)
    cfg = method_config(args, method, target, seed, port)
    split_cfg = method_config(args, method, target, args.preset.data.seed, port)
    print(f"{method} at {target}, seed {seed}: the pipeline", flush=True)
    started = time.perf_counter()
    model = load_model(run_apt(cfg, split_cfg))
    pipeline_seconds = time.perf_counter() - started
    validation = datasets.load_from_disk(str(args.out / "data" / "prep" / "dataset" / "validation"))
    finetune = json.loads((cfg.run_dir / "finetune" / "manifest.json").read_text())["summary"]
    sizes = model_sizes(model.config)  # lists per layer for a per-layer export
    record = {"method": method, "target": target, "seed": seed, "params": count_params(model),
              "perplexity": evaluate(model, validation.with_format("torch")),
              "kept": {"hidden": sizes["hidden"], "heads": sizes["heads"], "kv_heads": sizes["kv_heads"],
                       "neurons": sizes["intermediate"], "layers": sizes["layers"]},
              "final_structure_steps": final_structure_steps(cfg.run_dir / "finetune" / "metrics.jsonl"),
              "ingredients": ingredients(cfg), "pipeline_seconds": pipeline_seconds,
              "finetune_wall_seconds": finetune["train_wall_seconds"],
              "finetune_cpu_seconds": finetune["train_cpu_seconds"]}
    record_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(record_path, json.dumps(record, indent=2))
    print(f"{method} at {target}, seed {seed}: {record['params']:,} parameters, perplexity "
          f"{record['perplexity']:.2f}, finetune {record['finetune_wall_seconds']:.0f}s", flush=True)
    return record


def final_structure_steps(metrics_path: Path) -> int:
    """Steps the finetune trained with its final structure: after the last step at which a block's mask was
    still above 0 (the logged remaining fraction counts blocks whose mask is > 0)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    final = rows[-1]["remaining"]
    reached = next((row["step"] for index, row in enumerate(rows)
                    if all(later["remaining"] == final for later in rows[index:])), rows[-1]["step"])
    return rows[-1]["step"] - reached + (1 if rows[0]["remaining"] == final else 0)


def run(args: argparse.Namespace) -> dict:
    """prepare, then every planned run (`--jobs` at once); returns the study's records."""
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    shared = prepare(args)
    planned = planned_runs(args)
    if args.jobs == 1:
        records = [run_one(args, *run, port=args.port) for run in planned]
    else:
        with ProcessPoolExecutor(args.jobs) as pool:  # each run launches its own DeepSpeed rank
            # A port per run, not per job slot: runs end out of order, so two runs of one slot can overlap.
            futures = [pool.submit(run_one, args, *run, port=args.port + index) for index, run in enumerate(planned)]
            records = [future.result() for future in futures]
    done = {run_name(r["method"], r["target"], r["seed"]) for r in records}
    earlier = [json.loads(path.read_text()) for path in sorted((args.out / "runs").glob("*.json"))
               if path.stem not in done]  # other parts' runs
    return shared | {"runs": records + earlier, "wall_seconds": time.perf_counter() - started,
                     "environment": environment_lines(), "jobs": args.jobs, "threads": args.threads}


def earlier_parts(study_json: Path) -> list[dict]:
    """The parts an existing study.json records (a study run in parts lists each one's command and wall time)."""
    if not study_json.is_file():
        return []
    earlier = json.loads(study_json.read_text())
    if "parts" in earlier:
        return earlier["parts"]
    return [{"command": earlier["command"], "wall_seconds": earlier["wall_seconds"]}] if "command" in earlier else []


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # the dense model's evaluation here, and what the report says
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the DeepSpeed rank of each run inherits it
    transformers.utils.logging.disable_progress_bar()
    command = shlex.join([os.path.relpath(sys.executable), "-m", "bench.study.run_study", *argv])
    if args.from_results is not None:
        results = json.loads(args.from_results.read_text())
    else:
        results = run(args)
        results["parts"] = earlier_parts(args.json) + [{"command": command, "wall_seconds": results["wall_seconds"],
                                                         "runs_done_here": len(planned_runs(args)),
                                                         "opt_in": set(args.methods) <= set(OPT_IN)}]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.json, json.dumps(results, indent=2) + "\n")
    study_report.plot(results, args.plot)
    section = study_report.report(results, str(args.json), str(args.plot))
    print(section)
    if args.results is not None:
        write_section(args.results, study_report.SECTION, section)


if __name__ == "__main__":
    main()
