"""Memory and step time of CPU ranks with and without the pipeline's fixed glibc mmap threshold, side by side.

Each round runs bench/scale/memory_worker.py (APT, ZeRO-3, 2 ranks) once without MALLOC_MMAP_THRESHOLD_ (glibc's
adaptive threshold) and once with the value pipeline/run.py gives CPU ranks, the order alternating by round.

    .venv/bin/python -m bench.scale.allocator_ab --layers 12 --rounds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.scale.run_scale import GIB, Shape, build_base
from pipeline.run import CPU_RANK_ENV, rank_environment

SETTINGS = {"glibc adaptive": None, f"fixed {CPU_RANK_ENV['MALLOC_MMAP_THRESHOLD_']}":
            CPU_RANK_ENV["MALLOC_MMAP_THRESHOLD_"]}


def run_worker(model_dir: Path, out: Path, threshold: str | None, steps: int, port: int) -> list[dict]:
    env = rank_environment(ranks_per_node=2)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = threshold
    command = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(port),
               "--no_local_rank", "--module", "bench.scale.memory_worker", "--variant", "apt", "--model",
               str(model_dir), "--steps", str(steps), "--out", str(out)]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return [json.loads((out / f"apt-rank{rank}.json").read_text()) for rank in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="depth of the TinyLlama-shaped model")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="steps per run; the first two (trace, warm-up) untimed")
    parser.add_argument("--work", type=Path, default=Path("/tmp/apt-scale"))
    parser.add_argument("--results", type=Path, default=Path("bench/results/scale-allocator.json"))
    args = parser.parse_args()
    shape = dataclasses.replace(Shape(), layers=args.layers)
    model_dir = args.work / f"base-{args.layers}-layers"
    build_base(model_dir, shape)
    runs = {name: [] for name in SETTINGS}
    for round_ in range(args.rounds):
        order = list(SETTINGS.items()) if round_ % 2 == 0 else list(reversed(SETTINGS.items()))
        for name, threshold in order:
            out = args.work / f"allocator-ab-{round_}-{list(SETTINGS).index(name)}"
            ranks = run_worker(model_dir, out, threshold, args.steps, 29540)
            runs[name].append({"peak_GiB": [round(r["peak_hwm"] / GIB, 3) for r in ranks],
                               "step_seconds": ranks[0]["step_seconds"][2:]})
    summary = {name: {"peak_GiB_max": max(max(r["peak_GiB"]) for r in rs),
                      "median_step_s": statistics.median(s for r in rs for s in r["step_seconds"]), "runs": rs}
               for name, rs in runs.items()}
    fixed, adaptive = (summary[name] for name in reversed(SETTINGS))
    report = {"params": shape.params(), "layers": args.layers, "settings": summary,
              "peak_fixed_over_adaptive": fixed["peak_GiB_max"] / adaptive["peak_GiB_max"],
              "step_fixed_over_adaptive": fixed["median_step_s"] / adaptive["median_step_s"]}
    tmp = args.results.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.results)
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}, indent=2))
    for name, s in summary.items():
        print(f"{name}: peak {s['peak_GiB_max']:.2f} GiB, median step {s['median_step_s']:.2f} s")


if __name__ == "__main__":
    main()
