"""One rank of the side-by-side memory measurement: APT or full fine-tuning, a few ZeRO steps, then the peak.

Both variants load the same checkpoint the way the finetune stage does (ZeRO-3: partitioned while it loads), build
the engine with the pipeline's `build_engine` and train on the same random tokens; APT adds the masked adapters
and the salience hooks, full fine-tuning trains every weight. Started by `deepspeed --module`; each rank writes
`<out>/<variant>-rank<r>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from bench.scale.sampler import read_status
from pipeline import dist
from pipeline.apt.adapters import inject_adapters, set_masks
from pipeline.apt.blocks import ModelShape
from pipeline.apt.masks import MaskSet
from pipeline.apt.salience import SalienceAccumulator
from pipeline.config import AptSection, ModelSection, TrainSection
from pipeline.ds_config import load_ds_config
from pipeline.model_io import load_base_model
from pipeline.training import build_engine


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", choices=("apt", "full"), required=True)
    parser.add_argument("--model", type=Path, required=True, help="a from_pretrained folder")
    parser.add_argument("--ds-config", default="ds_configs/zero3_cpu.json")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args()


def prepare(model, variant: str) -> None:
    """APT: frozen base, masked adapters (the finetune's defaults), salience hooks; full: every weight trains."""
    if variant == "full":
        model.requires_grad_(True)
        return
    apt = AptSection()
    inject_adapters(model, targets=apt.adapter_targets, rank=apt.rank, alpha=apt.alpha,
                    generator=torch.Generator().manual_seed(0))
    shape = ModelShape.from_config(model.config)
    SalienceAccumulator(shape).attach(model)
    set_masks(model, MaskSet.ones(shape))


def main() -> None:
    args = parse_args()
    runtime = read_status(os.getpid())["VmRSS"]  # torch, transformers, DeepSpeed imported; nothing loaded
    dist.init_distributed(30.0)
    train = TrainSection(steps=args.steps, micro_batch_size=args.micro_batch, precision="bf16", lr=1e-4,
                         warmup_steps=0)
    ds_config = load_ds_config(args.ds_config, train, dist.world_size())
    model = load_base_model(args.model, ModelSection(path=str(args.model)), ds_config)
    phases = {"loaded": read_status(os.getpid())}
    prepare(model, args.variant)
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()
                    if p.requires_grad)
    engine = build_engine(model, ds_config, train)
    phases["engine"] = read_status(os.getpid())
    generator = torch.Generator().manual_seed(dist.rank())
    vocab = model.config.vocab_size
    step_seconds = []
    for step in range(args.steps):
        started = time.perf_counter()
        tokens = torch.randint(0, vocab, (args.micro_batch, args.seq), generator=generator)
        loss = engine(input_ids=tokens, labels=tokens).loss
        phases[f"forward{step + 1}"] = read_status(os.getpid())
        engine.backward(loss)
        phases[f"backward{step + 1}"] = read_status(os.getpid())
        engine.step()
        phases[f"step{step + 1}"] = read_status(os.getpid())
        step_seconds.append(time.perf_counter() - started)
    status = read_status(os.getpid())
    report = {"variant": args.variant, "rank": dist.rank(), "trainable_params": trainable,
              "runtime_rss": runtime, "peak_hwm": status["VmHWM"], "final_rss": status["VmRSS"], "phases": phases,
              "step_seconds": step_seconds}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.variant}-rank{dist.rank()}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
