"""Export: fold the adapters into the base weights, cut the pruned blocks out, write a sharded HF checkpoint.

Base weights stream from the base's safetensors (memory-mapped) one layer at a time and each layer is written as its
own shard, so an export holds about one layer in memory whatever the model size. The merge stage writes the final
model with it; finetune writes each compacted base with it (no adapters, the base alone sliced).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from pipeline import hetero
from pipeline.apt.blocks import ModelShape
from pipeline.apt.masks import MaskSet, empty_layers
from pipeline.apt.slicing import (
    BIASES,
    LayerKeep,
    biased_layer_error,
    keep_layers_in_config,
    kept_indices,
    kept_layers,
    layer_slices,
    plan_layer,
)
from pipeline.stage import write_atomic

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""`export.dtype` names -> torch dtypes."""
MODELING_FILE = "modeling_apt.py"
"""The per-layer classes' source (`pipeline/hetero.py`), written beside a per-layer export: its config's `auto_map`
names them, so transformers builds the model with `trust_remote_code=True` where the pipeline is not installed."""


class BaseWeights:
    """Reads single tensors from a (possibly sharded) safetensors checkpoint without loading the rest."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        elif (directory / "model.safetensors").is_file():
            self.files = dict.fromkeys(_tensor_names(directory / "model.safetensors"), directory / "model.safetensors")
        else:
            raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json; "
                                    f"the base checkpoint must be in safetensors format")
        for path in sorted(set(self.files.values())):  # open every shard once now: fail before writing anything
            _tensor_names(path)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise KeyError(f"{name} is not in the base checkpoint")
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)


def _tensor_names(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-download or re-save the "
                         f"checkpoint") from e


class ShardWriter:
    """Writes one safetensors shard per call into a folder and keeps the index's weight map and parameter count."""

    def __init__(self, folder: Path, shard_count: int, dtype: torch.dtype):
        self.folder, self.shard_count, self.dtype = folder, shard_count, dtype
        self.weight_map: dict[str, str] = {}
        self.params = 0

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        name = f"model-{index + 1:05d}-of-{self.shard_count:05d}.safetensors"
        save_file({k: v.to(self.dtype).contiguous() for k, v in tensors.items()}, str(self.folder / name),
                  metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.params += sum(v.numel() for v in tensors.values())

    def write_index(self) -> None:
        index = {"metadata": {"total_parameters": self.params}, "weight_map": self.weight_map}
        write_atomic(self.folder / "model.safetensors.index.json", json.dumps(index, indent=2))


@torch.no_grad()
def export_pruned(*, base_dir: Path, adapters_path: Path | None, masks: MaskSet, scaling: float, dtype: torch.dtype,
                  out_dir: Path, trust_remote_code: bool = False) -> dict:
    """Write W + s·B·A sliced by binary `masks` as a sharded safetensors checkpoint with a matching config.

    Equal sizes in every layer give a plain config; per-layer sizes, or a layer's attention or MLP cut whole, give
    the registered `apt_<type>` type. Without `adapters_path` the base alone is sliced (finetune's compacted base)."""
    config = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=trust_remote_code)
    shape = ModelShape.from_config(config)
    base = BaseWeights(base_dir)
    kept = kept_layer_indices(masks, base)
    plans = [plan_layer(i, masks.head_mask[i], masks.kv_mask[i], masks.neuron_mask[i], sublayers_may_go=True)
             for i in kept]
    check_cut_sublayers(base, kept, plans)
    sizes = global_sizes(plans)
    # A cut sublayer's 0 never equals a global size: any cut makes the export per-layer.
    per_layer = {i: plan.sizes() for i, plan in enumerate(plans) if plan.sizes() != sizes}
    hidden = kept_indices(masks.hidden_mask, "hidden_mask")
    if adapters_path is not None and not adapters_path.is_file():
        raise FileNotFoundError(f"{adapters_path} not found; run the finetune stage first")
    adapters = load_file(str(adapters_path)) if adapters_path is not None else {}

    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = ShardWriter(tmp, len(kept) + 1, dtype)
    for index, (source, plan) in enumerate(zip(kept, plans, strict=True)):
        layer = merged_layer(base, adapters, scaling, source, plan, hidden, shape.head_dim)
        shards.write(index, renumbered(layer, source, index))
    shards.write(len(kept), outer_weights(base, hidden, config.tie_word_embeddings))
    shards.write_index()
    keep_layers_in_config(config, kept)
    pruned_config(config, sizes, per_layer, hidden.numel(), shape.head_dim, dtype).save_pretrained(str(tmp))
    if per_layer:
        shutil.copyfile(hetero.__file__, tmp / MODELING_FILE)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return {"params": shards.params, "hidden_size": hidden.numel(), **sizes, "per_layer": bool(per_layer)}


def kept_layer_indices(masks: MaskSet, base: BaseWeights) -> list[int]:
    """The layers the export keeps (`slicing.kept_layers`), once no layer it removes has a sublayer bias."""
    for index in empty_layers(masks):
        biases = [f"model.layers.{index}.{path}.bias" for path in ("self_attn.o_proj", "mlp.down_proj")]
        if any(name in base for name in biases):
            raise biased_layer_error(index)
    return kept_layers(masks)


def check_cut_sublayers(base: BaseWeights, kept: list[int], plans: list[LayerKeep]) -> None:
    """A layer's attention or MLP leaves whole only where it adds nothing: no o_proj (down_proj) bias."""
    for source, plan in zip(kept, plans, strict=True):
        for sublayer, present in (("attention", plan.has_attention), ("MLP", plan.has_mlp)):
            if not present and f"model.layers.{source}.{BIASES[sublayer]}.bias" in base:
                raise biased_layer_error(source, sublayer)


def global_sizes(plans: list[LayerKeep]) -> dict[str, int]:
    """The config's top-level sizes: heads from the first layer that keeps its attention, neurons from the first
    that keeps its MLP (a loader builds its shared parts with them, so never 0)."""
    with_attention = next((plan for plan in plans if plan.has_attention), None)
    with_mlp = next((plan for plan in plans if plan.has_mlp), None)
    for sublayer, plan in (("attention", with_attention), ("MLP", with_mlp)):
        if plan is None:
            raise ValueError(f"every layer's {sublayer} is cut: the masks must keep one layer's {sublayer}")
    attention, mlp = with_attention.sizes(), with_mlp.sizes()
    return {"num_attention_heads": attention["num_attention_heads"],
            "num_key_value_heads": attention["num_key_value_heads"], "intermediate_size": mlp["intermediate_size"]}


def renumbered(tensors: dict[str, torch.Tensor], source: int, index: int) -> dict[str, torch.Tensor]:
    """A layer's tensors named for its place among the kept layers."""
    old, new = f"model.layers.{source}.", f"model.layers.{index}."
    return {new + name.removeprefix(old): tensor for name, tensor in tensors.items()}


def merged_layer(base: BaseWeights, adapters: dict, scaling: float, index: int, plan: LayerKeep,
                 hidden: torch.Tensor, head_dim: int) -> dict[str, torch.Tensor]:
    """One decoder layer's weights with its adapters folded in, sliced to the kept heads, neurons and channels."""
    tensors = {}
    for path, (rows, columns) in layer_slices(plan, hidden, head_dim).items():
        prefix = f"model.layers.{index}.{path}"
        weight = base.get(f"{prefix}.weight").float()
        if f"{prefix}.lora_A" in adapters:
            weight = weight + scaling * adapters[f"{prefix}.lora_B"].float() @ adapters[f"{prefix}.lora_A"].float()
        weight = weight.index_select(0, rows)
        tensors[f"{prefix}.weight"] = weight if columns is None else weight.index_select(1, columns)
        if f"{prefix}.bias" in base:
            tensors[f"{prefix}.bias"] = base.get(f"{prefix}.bias").index_select(0, rows)
    return tensors


def outer_weights(base: BaseWeights, hidden: torch.Tensor, tied: bool) -> dict[str, torch.Tensor]:
    """Embedding, final norm and (untied) LM head, sliced to the kept hidden channels."""
    outer = {"model.embed_tokens.weight": base.get("model.embed_tokens.weight").index_select(1, hidden),
             "model.norm.weight": base.get("model.norm.weight").index_select(0, hidden)}
    if not tied:
        outer["lm_head.weight"] = base.get("lm_head.weight").index_select(1, hidden)
    return outer


def pruned_config(config, sizes: dict[str, int], per_layer: dict, hidden_size: int, head_dim: int,
                  dtype: torch.dtype):
    """The base's config with the kept (`global_sizes`) sizes; per-layer sizes give transformers' per-layer format."""
    config.hidden_size = hidden_size
    config.head_dim = head_dim  # explicit: it no longer equals hidden_size // num_attention_heads
    for key, value in sizes.items():
        setattr(config, key, value)
    config.dtype = dtype
    if per_layer:  # the layers whose sizes differ from the global ones list them (0: that sublayer is cut)
        config = heterogeneous_config(config, per_layer)
    return config


def heterogeneous_config(config, per_layer: dict[int, dict[str, int]]):
    """The pruned config in transformers' per-layer format, as the registered `apt_<type>` of its family
    (`apt_llama`, `apt_mistral`, `apt_qwen2`), its classes also named in `MODELING_FILE` for remote code."""
    config_class, model_class = hetero.HETEROGENEOUS[config.model_type]
    values = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures",
                                                                    "transformers_version", "auto_map")}
    module = Path(MODELING_FILE).stem
    auto_map = {"AutoConfig": f"{module}.{config_class.__name__}",
                "AutoModelForCausalLM": f"{module}.{model_class.__name__}"}
    return config_class(**values, per_layer_config=per_layer, architectures=[model_class.__name__],
                        auto_map=auto_map)


def write_compacted_base(original_dir: Path, alive: MaskSet, out_dir: Path, trust_remote_code: bool) -> None:
    """The original base sliced to the blocks still alive, streamed from its safetensors in its own dtype."""
    dtype = BaseWeights(original_dir).get("model.norm.weight").dtype
    export_pruned(base_dir=original_dir, adapters_path=None, masks=alive, scaling=0.0, dtype=dtype, out_dir=out_dir,
                  trust_remote_code=trust_remote_code)
