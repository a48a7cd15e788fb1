"""`apt-pipeline plan`: per-GPU memory of an APT finetune for a model × ZeRO stage × world size.

DeepSpeed's estimators assume every parameter trains; in APT only the adapters do. So the frozen bf16 base
(replicated under ZeRO-2, partitioned under ZeRO-3, in CPU memory with offload) and the weights ZeRO-3 keeps
gathered are counted here, the adapters' states come from `estimate_zero{2,3}_model_states_mem_needs`, and
activations are added to every column. `--cpu` plans DeepSpeed's CPU ranks, whose runtime shares their memory.
Checked against a 1.1 B-parameter run by bench/scale/run_scale.py.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pipeline.apt.blocks import ModelShape, total_params
from pipeline.model_io import model_shape

GIB = 2**30
BF16_BYTES = 2
ACTIVATION_VALUES_PER_CHANNEL = 23
"""bf16 values kept for backward per token, hidden channel and layer of a LLaMA block with APT masks and adapters
(SDPA, no activation checkpointing); measured with saved-tensor hooks: 20.9 at f = 2.7d (LLaMA-2), 22.6 at f = 3.5d
(LLaMA-3), 16-17 without APT (Korthikanti et al.'s 34 bytes). Linear in sequence length: SDPA keeps no scores."""
CPU_RANK_RUNTIME_BYTES = int(0.6 * GIB)
"""DeepSpeed on CPU: what one rank process holds before any model is loaded (interpreter, torch, transformers,
DeepSpeed, datasets imported): 0.50-0.54 GiB measured (bench/scale/memory_worker.py, the pipeline's imports), with
room for gloo's buffers."""
ZERO3_MAX_LIVE_PARAMETERS = 10**9
"""DeepSpeed's default `stage3_max_live_parameters`, which the ZeRO-3 templates keep: ZeRO-3 leaves gathered (bf16)
up to this many parameters whose next use is near, on top of the partitions (measured at 1.1 B, bench/scale)."""
LOSS_BYTES_PER_LOGIT = 10
"""The loss's peak per token and vocabulary entry: bf16 logits, their fp32 copy, the fp32 log-softmax."""
DISTILL_BYTES_PER_LOGIT = 22
"""Self-distillation's addition per token and vocabulary entry: the teacher's bf16 logits (2), the student's and the
teacher's fp32 logits at temperature T (4 + 4), their log-softmaxes (4 + 4) and the KL's pointwise term (4), as
`apt.distill.distill_loss` computes them (itemised, not measured). About 11 GiB at 4 x 1024 tokens of LLaMA-3."""
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
"""Bytes per frozen base weight for each `train.precision`."""
DEFAULT_TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")
DEFAULT_WORLD_SIZES = (8, 16, 64)
BUILTIN_MODELS = {
    # Published config.json values (Meta's Hugging Face releases): no download needed to plan.
    "llama-2-7b": ModelShape(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                             head_dim=128, intermediate_size=11008, tie_word_embeddings=False, qkv_bias=False),
    "llama-2-13b": ModelShape(vocab_size=32000, hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40,
                              head_dim=128, intermediate_size=13824, tie_word_embeddings=False, qkv_bias=False),
    "llama-2-70b": ModelShape(vocab_size=32000, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                              head_dim=128, intermediate_size=28672, tie_word_embeddings=False, qkv_bias=False),
    "llama-3-8b": ModelShape(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                             head_dim=128, intermediate_size=14336, tie_word_embeddings=False, qkv_bias=False),
}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one GPU needs for each ZeRO setup (model states + activations), and what offload puts in CPU memory."""

    model: str
    world_size: int
    base_params: int
    adapter_params: int
    activation_bytes: int
    zero2: int
    zero3: int
    zero3_offload: int
    offload_cpu_per_node: int
    teacher_bytes: int
    """Self-distillation with compaction: the teacher's own bf16 copy of the base, whole on every GPU from the first
    compaction on (docs/design.md §5); add it to the column in use when `apt.distill` is on."""


def projection_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection of one decoder layer."""
    d, f = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def adapter_params(shape: ModelShape, targets: tuple[str, ...], rank: int) -> int:
    """Trainable parameters: A (rank x in) and B (out x rank) on every target projection of every layer."""
    shapes = projection_shapes(shape)
    unknown = sorted(set(targets) - set(shapes))
    if unknown:
        raise ValueError(f"unknown adapter targets {unknown}; choose from {list(shapes)}")
    return shape.num_layers * sum(rank * sum(shapes[name]) for name in targets)


def largest_layer_params(shape: ModelShape) -> int:
    """The biggest module ZeRO-3 gathers whole: the embedding / LM head, or the widest projection."""
    return max(shape.vocab_size * shape.hidden_size, *(i * o for i, o in projection_shapes(shape).values()))


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, distill: bool = False) -> int:
    """What one micro batch keeps for backward: every layer's activations plus the loss over the vocabulary; with
    self-distillation also the teacher's logits and hidden states and the KL over the vocabulary."""
    tokens = micro_batch * seq_len
    layers = tokens * shape.hidden_size * shape.num_layers * ACTIVATION_VALUES_PER_CHANNEL * BF16_BYTES
    loss = tokens * shape.vocab_size * LOSS_BYTES_PER_LOGIT
    if not distill:
        return layers + loss
    teacher_hidden = tokens * shape.hidden_size * (shape.num_layers + 1) * BF16_BYTES
    return layers + loss + tokens * shape.vocab_size * DISTILL_BYTES_PER_LOGIT + teacher_hidden


def plan_memory(name: str, shape: ModelShape, world_size: int, *, gpus_per_node: int = 8, micro_batch: int = 1,
                seq_len: int = 2048, rank: int = 64, targets: tuple[str, ...] = DEFAULT_TARGETS,
                max_live_parameters: int = ZERO3_MAX_LIVE_PARAMETERS, cpu: bool = False, distill: bool = False,
                weight_bytes: int = BF16_BYTES) -> MemoryPlan:
    """Per-GPU memory of an APT finetune of `shape` on `world_size` GPUs under ZeRO-2, ZeRO-3 and ZeRO-3+offload.

    `cpu`: DeepSpeed on CPU, one process per rank; each rank's own runtime is added to every column. `distill`:
    self-distillation's activations are counted (its teacher model is the separate '+ teacher' column).
    `weight_bytes`: per frozen weight (2 in bf16/fp16, 4 in fp32).
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if world_size % gpus_per_node and world_size > gpus_per_node:
        raise ValueError(f"world size {world_size} is not a whole number of {gpus_per_node}-GPU nodes")
    per_node = min(gpus_per_node, world_size)
    nodes = world_size // per_node
    base = total_params(shape)
    adapters = adapter_params(shape, targets, rank)
    largest = largest_layer_params(shape)
    activations = activation_bytes(shape, micro_batch, seq_len, distill)
    runtime = CPU_RANK_RUNTIME_BYTES if cpu else 0
    gathered = weight_bytes * min(max_live_parameters, base)
    hardware = {"num_gpus_per_node": per_node, "num_nodes": nodes}
    _, zero2_adapters = estimate_zero2_model_states_mem_needs(adapters, cpu_offload=False, **hardware)
    _, zero3_adapters, _ = estimate_zero3_model_states_mem_needs(adapters, largest, cpu_offload=False,
                                                                 cpu_offload_params=False, **hardware)
    offload_cpu, offload_gpu, _ = estimate_zero3_model_states_mem_needs(adapters, largest, cpu_offload=True,
                                                                        cpu_offload_params=True, **hardware)
    return MemoryPlan(
        model=name, world_size=world_size, base_params=base, adapter_params=adapters, activation_bytes=activations,
        zero2=weight_bytes * base + zero2_adapters + activations + runtime,
        zero3=weight_bytes * base // world_size + gathered + zero3_adapters + activations + runtime,
        zero3_offload=offload_gpu + gathered + activations + runtime,
        offload_cpu_per_node=weight_bytes * base // nodes + offload_cpu, teacher_bytes=weight_bytes * base,
    )


def markdown_table(plans: list[MemoryPlan]) -> str:
    """One row per model and world size; memory in GiB per GPU (CPU per node for offload)."""
    header = ("| model | GPUs | base params | adapter params | activations | ZeRO-2 | ZeRO-3 | ZeRO-3 + offload "
              "| offload CPU / node | + teacher |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in plans:
        gib = [f"{value / GIB:.1f}" for value in (p.activation_bytes, p.zero2, p.zero3, p.zero3_offload,
                                                  p.offload_cpu_per_node, p.teacher_bytes)]
        lines.append(f"| {p.model} | {p.world_size} | {p.base_params / 1e9:.2f} B | {p.adapter_params / 1e6:.0f} M "
                     f"| {' | '.join(gib)} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="a run config: its model, micro batch, sequence length, precision, distillation, "
                             "world size (num_gpus x num_nodes) and adapter rank cap are planned (the flags below "
                             "override them); its paths need not exist here")
    parser.add_argument("--model", action="append", choices=sorted(BUILTIN_MODELS),
                        help="a built-in shape (repeatable; default: all four unless --model-config is given)")
    parser.add_argument("--model-config", type=Path, action="append", default=[], metavar="PATH",
                        help="a model's config.json (or its folder); repeatable")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run the modeling code a --model-config folder ships")
    parser.add_argument("--world-size", type=int, action="append", metavar="N",
                        help=f"GPUs in all (repeatable; default: {', '.join(map(str, DEFAULT_WORLD_SIZES))})")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, help="sequences per GPU per forward (default 1)")
    parser.add_argument("--seq-len", type=int, help="default 2048")
    parser.add_argument("--rank", type=int,
                        help="adapter rank to plan for; default apt.rank 8 x max_rank_multiplier 8, the cap growth "
                             "can reach (an upper bound: APT grows only the most salient adapters)")
    parser.add_argument("--targets", help=f"comma-separated adapted projections (default {','.join(DEFAULT_TARGETS)})")
    parser.add_argument("--distill", action=argparse.BooleanOptionalAction, default=None,
                        help="count self-distillation's teacher logits and KL over the vocabulary (default: off, "
                             "or the config's apt.distill)")
    parser.add_argument("--max-live-parameters", type=float, default=ZERO3_MAX_LIVE_PARAMETERS, metavar="N",
                        help="the ZeRO-3 template's stage3_max_live_parameters (default: DeepSpeed's 1e9, which "
                             "ds_configs/zero3_*.json keep): ZeRO-3 keeps up to this many parameters gathered")
    parser.add_argument("--cpu", action="store_true",
                        help="DeepSpeed on CPU (DS_ACCELERATOR=cpu): memory per rank process, its runtime included; "
                             "--gpus-per-node is then the ranks per host")


@dataclass(frozen=True)
class Setup:
    """What a plan is computed for, from the flags, else the run config, else the defaults."""

    models: list[tuple[str, ModelShape]]
    world_sizes: list[int]
    micro_batch: int
    seq_len: int
    rank: int
    targets: tuple[str, ...]
    distill: bool
    weight_bytes: int
    model_not_here: bool = False
    """--config named a model.path that this machine does not have (and no flag named a model)."""


def resolve_setup(args: argparse.Namespace) -> Setup:
    """Flags first, then the run config's sections (`--config`), then the defaults."""
    run = config_values(args.config) if args.config is not None else {}
    models = [(name, BUILTIN_MODELS[name]) for name in args.model or ()]
    models += [(str(path), model_shape(path, args.trust_remote_code)) for path in args.model_config]
    model_not_here = not models and args.config is not None and "model" not in run
    if not models:
        models = [run["model"]] if "model" in run else list(BUILTIN_MODELS.items())
    targets = args.targets.split(",") if args.targets else run.get("targets", DEFAULT_TARGETS)
    return Setup(models=models, world_sizes=args.world_size or run.get("world_sizes", list(DEFAULT_WORLD_SIZES)),
                 micro_batch=args.micro_batch or run.get("micro_batch", 1),
                 seq_len=args.seq_len or run.get("seq_len", 2048), rank=args.rank or run.get("rank", 64),
                 targets=tuple(t.strip() for t in targets if t.strip()),
                 distill=args.distill if args.distill is not None else run.get("distill", False),
                 weight_bytes=run.get("weight_bytes", BF16_BYTES), model_not_here=model_not_here)


def config_values(path: Path) -> dict:
    """What a run config says about memory; its model's shape when `model.path` holds a config.json (else the
    model it would build), or none when that path is not on this machine (then --model names it)."""
    from pipeline.config import read_sections
    from pipeline.model_io import build_config

    s = read_sections(path, ("model", "tokenizer", "data", "apt", "train", "deepspeed"))
    values = {"world_sizes": [s["deepspeed"].num_gpus * s["deepspeed"].num_nodes],
              "micro_batch": s["train"].micro_batch_size, "seq_len": s["data"].seq_len,
              "rank": s["apt"].rank * s["apt"].max_rank_multiplier, "targets": tuple(s["apt"].adapter_targets),
              "distill": s["apt"].distill, "weight_bytes": PRECISION_BYTES[s["train"].precision]}
    model = s["model"]
    if model.path is None:  # built: its vocabulary is the tokenizer's (a trained one's size; else assume 32000)
        tokenizer = s["tokenizer"]
        config = build_config(model, vocab_size=tokenizer.vocab_size if tokenizer.path is None else 32000)
        values["model"] = (f"{path.name} (built)", ModelShape.from_config(config))
    elif (Path(model.path) / "config.json").is_file():
        values["model"] = (model.path, model_shape(model.path, model.trust_remote_code))
    return values


def main(args: argparse.Namespace) -> int:
    """Print the markdown table for the chosen models and world sizes."""
    setup = resolve_setup(args)
    plans = [plan_memory(name, shape, world_size, gpus_per_node=args.gpus_per_node, micro_batch=setup.micro_batch,
                         seq_len=setup.seq_len, rank=setup.rank, targets=setup.targets,
                         max_live_parameters=int(args.max_live_parameters), cpu=args.cpu, distill=setup.distill,
                         weight_bytes=setup.weight_bytes)
             for name, shape in setup.models for world_size in setup.world_sizes]
    print(markdown_table(plans))
    unit = "GiB per rank process (DeepSpeed on CPU, runtime included)" if args.cpu else "GiB per GPU"
    distill = ("; self-distillation's teacher logits, hidden states and KL over the vocabulary included"
               if setup.distill else "")
    print(f"\n{unit}: frozen base at {setup.weight_bytes} bytes a weight (ZeRO-3: its partition plus up to "
          f"{args.max_live_parameters:.0e} parameters kept gathered) + adapter states (DeepSpeed's estimators) + "
          f"activations (micro batch {setup.micro_batch} x {setup.seq_len} tokens, no activation checkpointing"
          f"{distill}); adapter rank {setup.rank} on {', '.join(setup.targets)}. With apt.distill and compaction "
          f"(the defaults), add '+ teacher' from the first compaction on: the teacher's own copy of the base, whole "
          f"on every rank.")
    if setup.model_not_here:
        print(f"\n{args.config}: model.path is not on this machine, so every built-in shape is shown; "
              f"--model names the one it holds.")
    return 0
