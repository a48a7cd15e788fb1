"""A billion-parameter LLaMA through the whole chain on this machine, and the memory plan checked against it.

Builds a TinyLlama-1.1B-shaped model (random init: this is about the systems side), saves it as sharded bf16
safetensors and runs `apt-pipeline run` on it: ZeRO-3 on 2 CPU ranks, bf16, a short pruning window to 50%,
compaction on. A poller records every stage's wall time and the peak memory of the driver and of every rank; the
per-rank peak of the finetune is set against `apt-pipeline plan --cpu`. Then APT and full fine-tuning are measured
side by side (same ZeRO-3 config, ranks, batch and sequence) on the largest model full fine-tuning fits here.

    .venv/bin/python -m bench.scale.run_scale            # the recorded run (bench/RESULTS.md has its command)
    .venv/bin/python -m bench.scale.run_scale --quick    # a small model: checks the script runs (~3 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.report import environment_lines
from bench.scale.report import write_markdown
from bench.scale.sampler import ProcessPeak, TreeSampler

GIB = 2**30
STAGES = ("prep", "finetune", "salience", "finalize", "merge", "eval")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TOKENIZER_SOURCE = Path("models/tiny-python-docs")
"""The repository's tokenizer (512 tokens): every id fits any vocabulary, and nothing is downloaded."""


@dataclass(frozen=True)
class Shape:
    """A LLaMA decoder shape (GQA, untied embeddings); the defaults are TinyLlama-1.1B's."""

    hidden: int = 2048
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    intermediate: int = 5632
    vocab: int = 32000

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=self.hidden, num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, intermediate_size=self.intermediate,
                           vocab_size=self.vocab, max_position_embeddings=2048, tie_word_embeddings=False)

    def params(self) -> int:
        from pipeline.apt.blocks import ModelShape, total_params

        return total_params(ModelShape.from_config(self.config()))


PROBE_LAYERS = 2
"""Full fine-tuning is first measured at this depth, to learn its bytes per parameter here."""
QUICK = Shape(hidden=512, layers=PROBE_LAYERS, heads=8, kv_heads=2, intermediate=1376, vocab=512)
"""--quick checks that the script runs (tests/e2e/test_scale_bench.py): the tokenizer's vocabulary, not 32000 rows
of embeddings no token reaches, and the probe's depth, so the probe is also the full fine-tune measured."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(Shape):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=field.default)
    parser.add_argument("--quick", action="store_true", help=f"the small shape {QUICK}, fewer steps, --seq 64")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (micro batch 1 per rank)")
    parser.add_argument("--steps", type=int, default=14, help="finetune steps (pruning window: --window)")
    parser.add_argument("--window", type=int, default=8, help="steps until the 50%% target; updates at its half")
    parser.add_argument("--work", type=Path, default=Path("/tmp/apt-scale"),
                        help="where the checkpoints and the run go (several GB; kept, so a rerun reuses them)")
    parser.add_argument("--memory-cap", type=float, default=0.7,
                        help="full fine-tuning is measured at the largest depth whose plan fits this share of RAM")
    parser.add_argument("--skip-chain", action="store_true", help="reuse the chain measured before (in --work)")
    parser.add_argument("--skip-memory", action="store_true", help="reuse the APT / full comparison (in --work)")
    parser.add_argument("--master-port", type=int, default=29500, help="the chain's; the comparison uses the next 3")
    parser.add_argument("--results", type=Path, help="default: bench/results/scale.json (--quick: scale-quick.json)")
    parser.add_argument("--markdown", type=Path, default=Path("bench/RESULTS.md"), help="not written with --quick")
    args = parser.parse_args(argv)
    if args.quick:
        # 64 tokens: bf16 matmuls on CPU made 256-token steps, evals and memory probes 80 % of the check's time
        args.shape, args.steps, args.window, args.seq = QUICK, 10, 4, 64
        args.results = args.results or Path("bench/results/scale-quick.json")
        args.markdown = None
    else:
        args.results = args.results or Path("bench/results/scale.json")
        args.shape = Shape(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Shape)})
    return args


def build_base(directory: Path, shape: Shape, seed: int = 0) -> None:
    """A randomly initialised model of `shape` as sharded bf16 safetensors plus the repository's tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    if (directory / "config.json").is_file():
        return  # built by an earlier run of this script with the same --work
    print(f"building a {shape.params() / 1e9:.2f} B-parameter model in {directory}", flush=True)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no fp32 copy of the whole model
    try:
        model = LlamaForCausalLM(shape.config())
    finally:
        torch.set_default_dtype(default_dtype)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), max_shard_size="1GB")
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_SOURCE / name, tmp / name)
    os.replace(tmp, directory)


def chain_overrides(args, run_root: Path, base: Path) -> list[str]:
    """The default method (configs/tiny.yaml: growth, distillation, compaction) at this size: ZeRO-3, bf16 (the
    precision of the memory plan), micro batch 1, a short window, small evals."""
    half = max(1, args.window // 2)
    return [
        f"run.root={run_root}", "run.name=chain", f"model.path={base}", f"tokenizer.path={base}",
        "deepspeed.config=ds_configs/zero3_cpu.json", f"deepspeed.master_port={args.master_port}",
        f"data.seq_len={args.seq}", "train.micro_batch_size=1", f"train.steps={args.steps}", "train.lr=1e-3",
        f"train.checkpoint_every={args.steps}", "train.eval_batches=2", "train.precision=bf16",
        f"pruning.end_step={args.window}", f"pruning.update_every={half}", "pruning.mask_step=0.25",
        f"apt.grow_every={half + 1}", "pruning.shape_batches=1", "salience.batches=2",
        "eval.batches=2", "eval.batch_size=1", "eval.rounds=3", "eval.new_tokens=16", "eval.lm_eval_limit=8",
    ]


def running_stage(run_dir: Path) -> str | None:
    """The first stage without a manifest: the one the driver runs now (None once all are done)."""
    from pipeline.stage import MANIFEST

    return next((name for name in STAGES if not (run_dir / name / MANIFEST).is_file()), None)


def run_chain(args, base: Path) -> dict:
    """`apt-pipeline run` on the model, polled; every stage's time, memory and output."""
    run_root = args.work / "runs"
    shutil.rmtree(run_root, ignore_errors=True)  # a fresh chain: every stage runs and is measured
    run_dir = run_root / "chain"
    command = [str(Path(sys.executable).with_name("apt-pipeline")), "run", "--config", "configs/tiny.yaml",
               *chain_overrides(args, run_root, base)]
    print("running:", " ".join(command), flush=True)
    log_path = args.work / "chain.log"
    started = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        with TreeSampler(process.pid, lambda: running_stage(run_dir)) as sampler:
            returncode = process.wait()
    ended = time.time()
    if returncode != 0:
        raise SystemExit(f"the chain failed (exit {returncode}); see {log_path}")
    stages = stage_measurements(run_dir, sampler, started)
    return {"command": command, "seconds": ended - started, "stages": stages, "run_dir": str(run_dir),
            "timeline": sampler.timeline,
            "merge": merge_check(run_dir, base, stages["merge"])}


def stage_measurements(run_dir: Path, sampler: TreeSampler, started: float) -> dict:
    """Per stage: wall time as the driver saw it (from the previous stage's end, launcher included), the stage
    body's time, bytes written, peaks of each process (a stage shorter than a poll has no driver sample)."""
    out, previous_end = {}, started
    for name in STAGES:
        manifest = json.loads((run_dir / name / "manifest.json").read_text())
        files = [p for p in (run_dir / name).rglob("*") if p.is_file()]
        peaks = [p for p in sampler.peaks.values() if p.stage == name]
        driver = next((p for p in peaks if p.role == "driver"), ProcessPeak("driver", name, None, first_rss=0))
        ranks = sorted((p for p in peaks if p.role == "rank"), key=lambda p: p.rank)
        wall, previous_end = manifest["finished"] - previous_end, manifest["finished"]
        out[name] = {
            "wall_s": wall, "body_s": manifest["finished"] - manifest["started"],
            "written_bytes": sum(p.stat().st_size for p in files), "written_files": len(files),
            "driver_peak_rss": driver.rss, "driver_start_rss": driver.first_rss, "driver_peak_anon": driver.anon,
            "ranks": [{"rank": p.rank, "peak_hwm": p.hwm, "peak_anon": p.anon} for p in ranks],
            "launcher_peak_rss": max((p.rss for p in peaks if p.role == "launcher"), default=0),
            "summary": manifest["summary"],
        }
    return out


def merge_check(run_dir: Path, base: Path, merge: dict) -> dict:
    """The export's parameter count against finalize/masks.json, and the merge's memory growth against the model."""
    from safetensors import safe_open

    export = run_dir / "merge" / "model"
    params = 0
    for shard in export.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                numel = 1
                for size in f.get_slice(key).get_shape():
                    numel *= size
                params += numel
    masks = json.loads((run_dir / "finalize" / "masks.json").read_text())
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    growth = merge["driver_peak_rss"] - merge["driver_start_rss"]
    return {"export_params": params, "masks_remaining_params": masks["remaining_params"],
            "equal": params == masks["remaining_params"], "base_bytes": base_bytes,
            "growth_bytes": growth, "growth_over_model": growth / base_bytes}


def full_ft_depth(shape: Shape, probe: list[dict], cap_bytes: float) -> int:
    """The most layers of `shape` whose full fine-tuning fits `cap_bytes` on both ranks, extrapolated from the probe:
    its bytes per parameter above the runtime (DeepSpeed's estimate, 18 per parameter over the ranks, misses the
    16-bit gradient buckets and the optimizer step's temporaries on CPU)."""
    runtime = max(rank["runtime_rss"] for rank in probe)
    per_param = (max(rank["peak_hwm"] for rank in probe) - runtime) / probe[0]["trainable_params"]
    for layers in range(shape.layers, 0, -1):
        need = len(probe) * (runtime + per_param * dataclasses.replace(shape, layers=layers).params())
        if need <= cap_bytes:
            return layers
    raise SystemExit(f"full fine-tuning of even one layer of {shape} does not fit {cap_bytes / GIB:.1f} GiB")


def measure_variant(variant: str, model_dir: Path, args, port: int, tag: str = "") -> list[dict]:
    """Peak memory of each rank of a few ZeRO-3 steps of one variant (bench/scale/memory_worker.py)."""
    out = args.work / f"memory{tag}"
    shutil.rmtree(out, ignore_errors=True)
    launcher = Path(sys.executable).with_name("deepspeed")
    command = [str(launcher), "--num_gpus", "2", "--master_port", str(port), "--no_local_rank",
               "--module", "bench.scale.memory_worker", "--variant", variant, "--model", str(model_dir),
               "--seq", str(args.seq), "--out", str(out)]
    from pipeline.run import rank_environment

    env = rank_environment(ranks_per_node=2)  # what the pipeline gives its CPU ranks
    with open(args.work / f"memory{tag}-{variant}.log", "w") as log:
        subprocess.run(command, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    return [json.loads((out / f"{variant}-rank{rank}.json").read_text()) for rank in range(2)]


def compare_memory(args) -> dict:
    """APT and full fine-tuning side by side on the largest depth full fine-tuning fits this machine."""
    import psutil

    probe_shape = dataclasses.replace(args.shape, layers=PROBE_LAYERS)
    build_base(args.work / f"base-{PROBE_LAYERS}-layers", probe_shape)
    probe = measure_variant("full", args.work / f"base-{PROBE_LAYERS}-layers", args, args.master_port + 1,
                            tag="probe")
    cap = args.memory_cap * psutil.virtual_memory().total
    layers = full_ft_depth(args.shape, probe, cap)
    shape = dataclasses.replace(args.shape, layers=layers)
    model_dir = args.work / ("base" if layers == args.shape.layers else f"base-{layers}-layers")
    build_base(model_dir, shape)
    variants = {"apt": measure_variant("apt", model_dir, args, args.master_port + 2)}
    # At the probe's depth the probe is that measurement: the same model (shape, seed), variant and ranks.
    variants["full"] = probe if layers == PROBE_LAYERS else measure_variant("full", model_dir, args,
                                                                          args.master_port + 3)
    peak = {variant: max(r["peak_hwm"] for r in ranks) for variant, ranks in variants.items()}
    runtime = max(r["runtime_rss"] for ranks in variants.values() for r in ranks)
    return {"layers": layers, "params": shape.params(), "cap_bytes": cap, "variants": variants,
            "probe": {"layers": PROBE_LAYERS, "params": probe_shape.params(), "ranks": probe},
            "apt_over_full": peak["apt"] / peak["full"],
            "apt_over_full_above_runtime": (peak["apt"] - runtime) / (peak["full"] - runtime)}


def plan_check(args, chain: dict) -> dict:
    """`apt-pipeline plan --cpu` for the chain's finetune against its measured per-rank peak."""
    from pipeline.apt.blocks import ModelShape
    from pipeline.plan import plan_memory

    plan = plan_memory("scale", ModelShape.from_config(args.shape.config()), 2, gpus_per_node=2, micro_batch=1,
                       seq_len=args.seq, cpu=True)
    own_teacher = (Path(chain["run_dir"]) / "finetune" / "teacher" / "config.json").is_file()  # distilled across a cut
    teacher = plan.teacher_bytes if own_teacher else 0
    planned = plan.zero3 + teacher
    measured = max(r["peak_hwm"] for r in chain["stages"]["finetune"]["ranks"])
    return {"plan_zero3_per_rank": planned, "plan_zero3_without_teacher": plan.zero3, "plan_teacher": teacher,
            "measured_per_rank": measured,
            "measured_over_plan": measured / planned, "within_15_percent": abs(measured / planned - 1) <= 0.15,
            "plan_command": f"apt-pipeline plan --cpu --model-config {args.work / 'base'} --world-size 2 "
                            f"--gpus-per-node 2 --micro-batch 1 --seq-len {args.seq}"}


def gb(value: float) -> float:
    return round(value / GIB, 3)


def results(args, chain: dict, memory: dict) -> dict:
    """bench/results/scale.json: per-stage seconds and peaks in GiB, plan against measured, merge, full FT."""
    stages = {name: {"wall_s": round(s["wall_s"], 1), "body_s": round(s["body_s"], 1),
                     "written_GiB": gb(s["written_bytes"]), "written_files": s["written_files"],
                     "driver_peak_GiB": gb(s["driver_peak_rss"]),
                     "rank_peak_GiB": [gb(r["peak_hwm"]) for r in s["ranks"]],
                     "rank_peak_anon_GiB": [gb(r["peak_anon"]) for r in s["ranks"]]}
              for name, s in chain["stages"].items()}
    plan = plan_check(args, chain)
    merge = chain["merge"]
    return {
        "shape": dataclasses.asdict(args.shape), "params": args.shape.params(), "seq_len": args.seq,
        "steps": args.steps, "chain_seconds": round(chain["seconds"], 1), "stages": stages,
        "plan": {**plan, **{key: gb(plan[key]) for key in ("plan_zero3_per_rank", "plan_zero3_without_teacher",
                                                            "plan_teacher", "measured_per_rank")}},
        "merge": {**merge, "base_GiB": gb(merge["base_bytes"]), "growth_GiB": gb(merge["growth_bytes"])},
        "full_finetune": {"layers": memory["layers"], "params": memory["params"], "seq_len": args.seq,
                          "apt_trainable": memory["variants"]["apt"][0]["trainable_params"],
                          "full_trainable": memory["variants"]["full"][0]["trainable_params"],
                          "apt_peak_GiB": [gb(r["peak_hwm"]) for r in memory["variants"]["apt"]],
                          "full_peak_GiB": [gb(r["peak_hwm"]) for r in memory["variants"]["full"]],
                          "runtime_GiB": gb(max(r["runtime_rss"] for r in memory["variants"]["apt"])),
                          "apt_over_full": round(memory["apt_over_full"], 3),
                          "apt_over_full_above_runtime": round(memory["apt_over_full_above_runtime"], 3)},
        "eval": chain["stages"]["eval"]["summary"], "finetune": chain["stages"]["finetune"]["summary"],
        "chain_command": chain["command"],
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    raw_path = args.work / "raw.json"
    raw = json.loads(raw_path.read_text()) if raw_path.is_file() else {}
    base = args.work / "base"
    build_base(base, args.shape)
    if not args.skip_chain:
        raw["chain"] = run_chain(args, base) | {"argv": sys.argv}
        raw["environment"] = environment_lines()  # the machine as the measurement left it
        raw_path.write_text(json.dumps(raw, indent=2))
    if not args.skip_memory:
        raw["memory"] = compare_memory(args)
        raw_path.write_text(json.dumps(raw, indent=2))
    if not (args.skip_chain or args.skip_memory):
        raw["bench_seconds"] = time.time() - started  # building the models included, where --work had none
        raw_path.write_text(json.dumps(raw, indent=2))
    missing = [part for part in ("chain", "memory") if part not in raw]
    if missing:
        raise SystemExit(f"{raw_path} has no {' and no '.join(missing)} measurement yet; run without --skip-*")
    report = results(args, raw["chain"], raw["memory"]) | {"environment": raw.get("environment", environment_lines()),
                                                            "bench_seconds": raw.get("bench_seconds")}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.results.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.results)
    print(json.dumps({k: report[k] for k in ("params", "chain_seconds", "plan", "merge", "full_finetune")},
                     indent=2))
    if args.markdown is not None:
        write_markdown(args.markdown, report, raw["chain"].get("argv", sys.argv))


if __name__ == "__main__":
    main()
