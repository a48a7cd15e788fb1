"""Generation speed of pipeline exports against their dense model: width, depth and auto shapes side by side.

Every model is loaded with plain `AutoModelForCausalLM.from_pretrained` and timed in one process, interleaved with a
rotating order (bench/inference_speed.py's rounds), greedy generation of exactly `--new-tokens` tokens at each
batch size. A speed-up is the median over rounds of dense time / export time within the same round. With
`--study` the perplexities and shapes of the runs come from a study.json (one record per export's run name).
Run from the repository root (bench/RESULTS.md gives the command of the recorded run):
`.venv/bin/python bench/export_speed.py --dense bench/out/study/pretrained --export width=bench/out/study/apt-50-s0
 --export depth=bench/out/study/apt-depth-50-s0 --study bench/results/study.json --results bench/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch
import transformers
from inference_speed import WALL, Workload, generate, load, time_rounds

from pipeline.evaluation import model_sizes

from report import environment_lines, write_section

SECTION = "## Generation speed: width, depth and auto exports"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", type=Path, required=True, help="the unpruned model (a from_pretrained folder)")
    parser.add_argument("--export", action="append", required=True, metavar="NAME=DIR",
                        help="a pipeline run directory (its merge/model is timed) or a model folder; repeat for each")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes; each is timed")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens per row")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (medians over them)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--study", type=Path, default=None, help="a study.json with each run's perplexity")
    parser.add_argument("--json", type=Path, default=Path("bench/results/export_speed.json"))
    parser.add_argument("--results", type=Path, default=None, help=f"markdown file whose '{SECTION}' section to write")
    args = parser.parse_args(argv)
    args.exports = dict(item.split("=", 1) for item in args.export)
    for name, directory in args.exports.items():
        if model_dir(directory) is None:
            parser.error(f"--export {name}={directory}: neither merge/model/config.json nor config.json there")
    return args


def model_dir(directory: str) -> Path | None:
    """The model folder of a run directory (its merge/model) or the folder itself; None if it holds no model."""
    for candidate in (Path(directory) / "merge" / "model", Path(directory)):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def workloads(args: argparse.Namespace, vocab_size: int) -> list[Workload]:
    """Greedy generation at every batch size, the same random prompt rows for every model."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab_size, (max(args.batch), args.prompt), generator=generator)
    return [Workload("generate", batch, lambda model, rows=ids[:batch]: generate(
        model, rows, torch.ones_like(rows), args.new_tokens)) for batch in args.batch]


def measure(args: argparse.Namespace) -> dict:
    """Load every model, time the interleaved rounds; per export and batch its tok/s and paired speed-up."""
    torch.set_num_threads(args.threads)
    models = {("float32", "dense"): load(args.dense, "float32")}
    models |= {("float32", name): load(model_dir(directory), "float32") for name, directory in args.exports.items()}
    rounds = time_rounds(models, workloads(args, models[("float32", "dense")].config.vocab_size), args.warmup,
                         args.repeats)
    rows = []
    for (_, name), model in models.items():
        sizes = model_sizes(model.config)
        for batch in args.batch:
            key, dense_key = ("float32", name, "generate", batch), ("float32", "dense", "generate", batch)
            rows.append({"model": name, "batch": batch,
                         "params": sum(p.numel() for p in model.parameters()),
                         "layers": sizes["layers"], "hidden": sizes["hidden"], "heads": sizes["heads"],
                         "neurons": sizes["intermediate"],
                         "tokens_per_s": batch * args.new_tokens / statistics.median(r[key][WALL] for r in rounds),
                         "speedup": statistics.median(r[dense_key][WALL] / r[key][WALL] for r in rounds)})
    return {"rows": rows, "exports": args.exports, "dense": str(args.dense), "rounds": args.repeats,
            "threads": args.threads, "new_tokens": args.new_tokens, "prompt": args.prompt}


def perplexities(study: Path | None, exports: dict[str, str]) -> dict[str, float]:
    """Each export's held-out perplexity from the study's record of its run (by run directory name)."""
    if study is None:
        return {}
    results = json.loads(study.read_text())
    records = {f"{r['method']}-{round(r['target'] * 100)}-s{r['seed']}": r for r in results["runs"]}
    return {"dense": results["dense"]["perplexity"]} | {
        name: records[Path(run_dir).name]["perplexity"] for name, run_dir in exports.items()
        if Path(run_dir).name in records}


def report(command: str, result: dict, ppl: dict[str, float]) -> str:
    lines = [SECTION, "", f"`{command}`", "", *environment_lines(),
             f"- greedy generation, prompt {result['prompt']} tokens, exactly {result['new_tokens']} new tokens; "
             f"medians of {result['rounds']} interleaved rounds (order rotating), {result['threads']} thread(s); "
             "speed-up = median over rounds of dense time / export time in the same round", "",
             "| model | batch | parameters | layers × hidden / heads / neurons | perplexity | tok/s | speed-up |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for row in result["rows"]:
        perplexity = f"{ppl[row['model']]:.2f}" if row["model"] in ppl else "–"
        lines.append(f"| {row['model']} | {row['batch']} | {row['params']:,} | {row['layers']} × {row['hidden']} / "
                     f"{row['heads']} / {row['neurons']} | {perplexity} | {row['tokens_per_s']:,.1f} | "
                     f"**{row['speedup']:.2f}×** |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *argv])
    result = measure(args)
    result["command"] = command
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    section = report(command, result, perplexities(args.study, args.exports))
    print(section)
    if args.results is not None:
        write_section(args.results, SECTION, section)


if __name__ == "__main__":
    main()
