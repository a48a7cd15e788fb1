"""Loading the base model and the fine-tuned adapters, shared by the stages that need a live model."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from pipeline import dist
from pipeline.apt.adapters import grow_rank, named_adapters
from pipeline.apt.blocks import ModelShape
from pipeline.ds_config import zero_stage


def build_config(model_cfg, vocab_size: int):
    """The transformers config of a model built from the run config (no checkpoint)."""
    return AutoConfig.for_model(
        model_cfg.model_type, vocab_size=model_cfg.vocab_size or vocab_size, hidden_size=model_cfg.hidden_size,
        num_hidden_layers=model_cfg.num_layers, num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_kv_heads, intermediate_size=model_cfg.intermediate_size,
        max_position_embeddings=model_cfg.max_position_embeddings, tie_word_embeddings=model_cfg.tie_word_embeddings,
    )


def model_shape(path: Path | str, trust_remote_code: bool = False) -> ModelShape:
    """The shape of the model whose config is at `path` (a from_pretrained folder or a config.json)."""
    return ModelShape.from_config(AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code))


def load_base_model(directory: Path, model_cfg, ds_config: dict, dtype: torch.dtype | None = None):
    """The frozen base in the from_pretrained folder `directory`.

    Under ZeRO-3 it is loaded partitioned (HfDeepSpeedConfig), so no rank holds the whole model, and read in the
    dtype ZeRO-3 partitions in. Otherwise it is read in `dtype` (default fp32; DeepSpeed casts it).
    """
    if not (directory / "config.json").is_file():  # model.path was checked at start-up: a run's own folder is gone
        raise FileNotFoundError(f"{directory}/config.json not found: a base model this run wrote (and its "
                                f"checkpoints refer to) is missing; restore it, or delete {directory.parent} to "
                                f"start that stage over")
    zero3 = zero_stage(ds_config) == 3
    # Keeping this object alive while from_pretrained runs makes it build the model ZeRO-3-partitioned.
    _ds_context = HfDeepSpeedConfig(ds_config) if zero3 else None  # noqa: F841
    # ZeRO-3 keeps the partitions in its 16-bit dtype anyway: reading the shards in fp32 would only add an fp32
    # copy of each shard (2 GB per 1 GB shard on the rank that reads them).
    dtype = partition_dtype(ds_config) if zero3 else dtype or torch.float32
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype,
                                                trust_remote_code=model_cfg.trust_remote_code)


def original_base(model_cfg, directory: Path, vocab_size: int, ds_config: dict, seed: int,
                  dtype: torch.dtype | None = None):
    """The run's original base: loaded from `directory`, or, the first time a run without `model.path` starts,
    built from the model section with the same seed on every rank and saved there by rank 0."""
    if model_cfg.path is not None:
        return load_base_model(directory, model_cfg, ds_config, dtype)
    saved = (directory / "config.json").is_file()
    # Every rank looks before rank 0 writes: a rank that looked later would load (under ZeRO-3, partitioned, its
    # broadcasts unmatched) while the others build, and the ranks would hang.
    dist.barrier()
    if saved:
        return load_base_model(directory, model_cfg, ds_config, dtype)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config(model_cfg, vocab_size), dtype=torch.float32)
    if dist.is_main():
        tmp = directory.with_name(f".{directory.name}.tmp")
        model.save_pretrained(str(tmp))
        os.replace(tmp, directory)
    return model


def partition_dtype(ds_config: dict) -> torch.dtype:
    """The dtype ZeRO-3 stores weights in: the config's 16-bit type, else fp32 (what `zero.Init` picks)."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def load_adapters(model, path: Path, max_rank: int | None = None) -> None:
    """Copy fine-tuned adapter tensors (fp32, full) into an injected model before the engine is built.

    Rank growth leaves adapters at ranks above `apt.rank`: each injected adapter is first grown to the rank its
    tensors in the file have (`grow_rank`, which keeps the scaling at alpha / initial rank, as in training and in
    the merge), then its values are copied in. An adapter missing from either side, a file rank below the injected
    one or above `max_rank` (apt.max_rank_multiplier × apt.rank: was apt.rank changed?) or any other shape that does
    not match is refused with the tensor's name.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run the finetune stage first")
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    trainable = {name for name, param in params.items() if param.requires_grad}
    unexpected, missing = sorted(set(tensors) - trainable), sorted(trainable - set(tensors))
    if unexpected or missing:
        raise ValueError(f"{path}: the adapters do not match the model (were apt.adapter_targets or apt.rank "
                         f"changed?): in the file only {unexpected[:3]}, in the model only {missing[:3]}")
    file_ranks = {}
    for name, adapter in named_adapters(model):
        file_rank = file_ranks[name] = tensors[f"{name}.lora_A"].shape[0]
        if file_rank < adapter.rank:
            raise ValueError(f"{path}: {name}.lora_A has rank {file_rank}, below the injected rank {adapter.rank} "
                             f"(was apt.rank changed?); rerun the finetune stage")
        if max_rank is not None and file_rank > max_rank:
            raise ValueError(f"{path}: {name}.lora_A has rank {file_rank}, above the most rank growth gives "
                             f"({max_rank} = apt.max_rank_multiplier × apt.rank; was apt.rank changed?); rerun the "
                             f"finetune stage")
    regrow(model, file_ranks, seed=0)  # the new rows are overwritten below; the global RNG stays as it is
    params = dict(model.named_parameters())  # growth made new parameter objects
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected = tuple(params[name].shape)
            if expected != tuple(tensor.shape):
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model {expected}")
            params[name].copy_(tensor)


def regrow(model, adapter_ranks: dict[str, int], seed: int) -> None:
    """Grow an injected model's adapters to `adapter_ranks` (a checkpoint's or a file's; its values overwrite the
    new rows), drawing the new rows from one generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    for name, adapter in named_adapters(model):
        if adapter_ranks[name] > adapter.rank:
            grow_rank(adapter, adapter_ranks[name] - adapter.rank, generator)
