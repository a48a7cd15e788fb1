"""Physical removal of masked query heads, KV heads, neurons and hidden channels (docs/design.md §2, §6).

`slice_model` works in place on a plain HF Llama/Mistral/Qwen2 causal LM, and on an APT-wrapped one (compaction)
as long as every layer keeps the same counts, since the model's masks must stay rectangular [L, ·]; for
per-layer sizes merge the adapters first (`adapters.merge_adapters`), then slice. `slice_kept` does the same from
kept indices instead of masks, one layer at a time inside a caller's `gather` context (ZeRO-3), and says which
parameter replaced which, so an optimizer's state can follow (`pipeline.engine.rebuild_engine`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.apt.adapters import APTLinear, MaskStore
from pipeline.apt.masks import MaskSet, empty_layers

Gather = Callable[[list[nn.Parameter]], AbstractContextManager]
"""Parameters -> a context in which their full values can be read (ZeRO-3: `deepspeed.zero.GatheredParameters`)."""
Settle = Callable[[nn.Module], None]
"""Called on each module as soon as it is sliced (ZeRO-3: partition its new weights, so no rank holds the whole
sliced model at once)."""


@dataclass(frozen=True)
class LayerKeep:
    """Indices one decoder layer keeps: query heads, KV heads, neurons."""

    heads: torch.Tensor
    kv_heads: torch.Tensor
    neurons: torch.Tensor

    @property
    def has_attention(self) -> bool:
        """False for a layer whose attention is cut whole (no query and no KV head): it leaves the export."""
        return self.heads.numel() > 0

    @property
    def has_mlp(self) -> bool:
        """False for a layer whose MLP is cut whole (no neuron)."""
        return self.neurons.numel() > 0

    def sizes(self) -> dict[str, int]:
        """The layer's config attributes after slicing (0 heads / 0 neurons: that sublayer is cut)."""
        return {
            "num_attention_heads": self.heads.numel(),
            "num_key_value_heads": self.kv_heads.numel(),
            "intermediate_size": self.neurons.numel(),
        }


@dataclass(frozen=True)
class Selected:
    """A sliced parameter holds these elements of the one it replaced: `old[rows][:, columns]` (None: all)."""

    rows: torch.Tensor | None
    columns: torch.Tensor | None = None

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The selection applied to a tensor shaped like the old parameter (its value, an optimizer moment)."""
        if self.rows is not None:
            tensor = tensor.index_select(0, self.rows.to(tensor.device))
        if self.columns is not None:
            tensor = tensor.index_select(1, self.columns.to(tensor.device))
        return tensor


BIASES = {"attention": "self_attn.o_proj", "MLP": "mlp.down_proj"}
"""A sublayer -> the projection whose bias, if any, it adds to the residual stream whatever its input."""

Replaced = dict[nn.Parameter, tuple[nn.Parameter, Selected]]
"""Old trainable parameter -> (the parameter that replaced it, which of its elements it holds)."""


def kept_indices(mask: torch.Tensor, name: str) -> torch.Tensor:
    """Indices where a binary mask is 1; refuses fractional masks."""
    if not torch.all((mask == 0) | (mask == 1)):
        raise ValueError(f"{name} is not binary; slicing needs masks of exactly 0 or 1")
    return mask.nonzero().flatten()


def plan_layer(layer_index: int, head_row: torch.Tensor, kv_row: torch.Tensor, neuron_row: torch.Tensor, *,
               sublayers_may_go: bool = False) -> LayerKeep:
    """Kept indices of one layer, checked by `check_layer`: GQA-consistent, and with at least one query head and
    one neuron unless `sublayers_may_go` (the per-layer export, which may cut a layer's attention or MLP whole)."""
    heads = kept_indices(head_row, f"head_mask[{layer_index}]")
    kv_heads = kept_indices(kv_row, f"kv_mask[{layer_index}]")
    neurons = kept_indices(neuron_row, f"neuron_mask[{layer_index}]")
    return check_layer(layer_index, LayerKeep(heads, kv_heads, neurons), head_row.numel() // kv_row.numel(),
                       sublayers_may_go=sublayers_may_go)


def check_layer(layer_index: int, keep: LayerKeep, group_size: int, *, sublayers_may_go: bool = False) -> LayerKeep:
    """`keep` itself, if it is a loadable layer: heads only under kept KV heads, as many under each, one at least.

    `sublayers_may_go` also takes a layer without attention (no query and no KV head) or without MLP, not both."""
    if not sublayers_may_go and (keep.heads.numel() == 0 or keep.neurons.numel() == 0):
        # Slicing and compaction keep every layer a family's own (rectangular) decoder layer.
        raise ValueError(f"layer {layer_index} would keep no query head or no neuron")
    if not keep.has_attention and not keep.has_mlp:
        raise ValueError(f"layer {layer_index} would keep no query head and no neuron: it is empty, not sliced")
    if not keep.has_attention:
        if keep.kv_heads.numel():
            raise ValueError(f"layer {layer_index} keeps KV heads {keep.kv_heads.tolist()} but no query head: cut "
                             f"its attention whole (every KV head too) or keep a query head")
        return keep
    kv_of_head = keep.heads // group_size
    if not torch.isin(kv_of_head, keep.kv_heads).all():
        raise ValueError(f"layer {layer_index} keeps a query head whose KV head is pruned")
    heads_per_kv = (kv_of_head[:, None] == keep.kv_heads[None, :]).sum(dim=0)
    if not torch.all(heads_per_kv == heads_per_kv[0]):
        raise ValueError(
            f"layer {layer_index} keeps {heads_per_kv.tolist()} query heads per kept KV group; "
            "an exported model needs the same number in every group"
        )
    return keep


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Channel indices of whole heads in a [heads · head_dim] projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


@torch.no_grad()
def slice_model(model: nn.Module, masks: MaskSet) -> nn.Module:
    """Remove every unit whose binary mask is 0, in place, and update the config and module attributes.

    Layers may keep different counts (per-layer layout). The config then carries layer 0's sizes; the other
    layers' sizes come from `per_layer_config(model)`.
    """
    decoder = model.model
    hidden = kept_indices(masks.hidden_mask, "hidden_mask")
    if hidden.numel() == 0:
        raise ValueError("hidden_mask keeps no channel")
    kept = kept_layers(masks)
    if len(kept) < len(decoder.layers):
        _check_removable(model, empty_layers(masks))
    plans = []
    for index in kept:
        widths = {
            "head_mask": masks.head_mask[index],
            "kv_mask": masks.kv_mask[index],
            "neuron_mask": masks.neuron_mask[index],
        }
        for (name, row), (attribute, size) in zip(widths.items(), layer_sizes(decoder.layers[index]).items(),
                                                  strict=True):
            if row.numel() != size:
                raise ValueError(f"{name}[{index}] has {row.numel()} entries; the layer has {attribute}={size}")
        plans.append(plan_layer(index, *widths.values()))
    drop_layers(model, kept)  # every check has passed: only now does the model change
    slice_kept(model, plans, hidden)
    return model


def kept_layers(masks: MaskSet) -> list[int]:
    """Indices of the layers the masks keep: all but those masked whole; masks that keep none are refused."""
    removed = set(empty_layers(masks))
    kept = [index for index in range(masks.head_mask.shape[0]) if index not in removed]
    if not kept:
        raise ValueError("the masks keep no layer")
    return kept


def _check_removable(model: nn.Module, removed: list[int]) -> None:
    """Whole layers leave only a merged model, and only where they add nothing: no o_proj or down_proj bias."""
    if hasattr(model, "apt_masks"):
        raise ValueError("the masks remove whole layers: merge the adapters first (`adapters.merge_adapters`)")
    for index in removed:
        layer = model.model.layers[index]
        if layer.self_attn.o_proj.bias is not None or layer.mlp.down_proj.bias is not None:
            raise biased_layer_error(index)


def biased_layer_error(index: int, sublayer: str | None = None) -> ValueError:
    """The refusal for a layer masked whole (or one `sublayer` of it: "attention", "MLP") whose o_proj or down_proj
    bias would still change the output without it."""
    if sublayer is not None:
        return ValueError(f"layer {index}'s {sublayer} is masked whole but its {BIASES[sublayer]} bias still adds to "
                          f"the residual stream: the {sublayer} cannot be cut")
    return ValueError(f"layer {index} keeps no head and no neuron but its o_proj or down_proj bias still adds to the "
                      f"residual stream: it cannot be removed")


def drop_layers(model: nn.Module, keep: list[int]) -> None:
    """Keep only the decoder layers indexed by `keep`, in place: renumbered for the KV cache, with the config's
    layer count and per-layer attention types (Qwen2's sliding layers) matching, so it saves as a plain model."""
    decoder, config = model.model, model.config
    decoder.layers = nn.ModuleList([decoder.layers[index] for index in keep])
    for index, layer in enumerate(decoder.layers):
        layer.self_attn.layer_idx = index
    keep_layers_in_config(config, keep)


def keep_layers_in_config(config, keep: list[int]) -> None:
    """The layer count, and the per-layer attention types (Qwen2's sliding layers) of the kept layers."""
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[index] for index in keep]
    config.num_hidden_layers = len(keep)


@torch.no_grad()
def slice_kept(
    model: nn.Module, plans: list[LayerKeep], hidden: torch.Tensor, gather: Gather | None = None,
    settle: Settle | None = None,
) -> Replaced:
    """Keep the indexed units of every layer and the `hidden` channels, in place; returns what replaced each
    trainable parameter (frozen ones are not held on to, so each old layer can be freed as soon as it is sliced).

    An APT-wrapped model's masks keep their current (possibly fractional) values at the kept positions. `gather`
    is entered around each layer's parameters, then around the embeddings and the final norm; `settle` is called
    on each layer once it is sliced, and on the whole model at the end.
    """
    gather = gather or (lambda params: nullcontext())
    settle = settle or (lambda module: None)
    decoder = model.model
    head_dim = decoder.layers[0].self_attn.head_dim
    if len(plans) != len(decoder.layers):
        raise ValueError(f"{len(plans)} layer plans for {len(decoder.layers)} layers")
    store: MaskStore | None = getattr(model, "apt_masks", None)
    if store is not None:
        if len({tuple(plan.sizes().values()) for plan in plans}) > 1:
            raise ValueError(
                "an APT-wrapped model keeps rectangular masks: slice it with the same kept counts in "
                "every layer, or merge the adapters first"
            )
        store.replace(select_masks(store.as_mask_set(), plans, hidden))

    replaced: Replaced = {}
    for layer, plan in zip(decoder.layers, plans, strict=True):
        with gather(list(layer.parameters())):
            replaced |= _slice_layer(layer, plan, hidden, head_dim)
        settle(layer)
    outer = [decoder.embed_tokens.weight, model.lm_head.weight, decoder.norm.weight]
    with gather(list(dict.fromkeys(outer))):  # tied embeddings: one parameter, gathered once
        replaced |= _slice_embeddings(model, hidden)
        replaced |= _slice_vector(decoder.norm, hidden)
    settle(model)
    _update_config(model.config, hidden.numel(), head_dim, plans[0])
    return replaced


def per_layer_config(model: nn.Module) -> dict[int, dict[str, int]]:
    """Layers whose sizes differ from the config's, in transformers' `per_layer_config` format (index → overrides)."""
    config = model.config
    overrides = {}
    for index, layer in enumerate(model.model.layers):
        differing = {key: value for key, value in layer_sizes(layer).items() if getattr(config, key) != value}
        if differing:
            overrides[index] = differing
    return overrides


def layer_sizes(layer: nn.Module) -> dict[str, int]:
    """A decoder layer's head, KV-head and neuron counts, read from its projections' shapes."""
    attention, head_dim = layer.self_attn, layer.self_attn.head_dim
    return {
        "num_attention_heads": attention.q_proj.out_features // head_dim,
        "num_key_value_heads": attention.k_proj.out_features // head_dim,
        "intermediate_size": layer.mlp.up_proj.out_features,
    }


def select_masks(masks: MaskSet, plans: list[LayerKeep], hidden: torch.Tensor) -> MaskSet:
    """The masks' (possibly fractional) values at the kept positions; every layer must keep the same counts."""
    return MaskSet(
        head_mask=torch.stack([masks.head_mask[i, plan.heads] for i, plan in enumerate(plans)]),
        kv_mask=torch.stack([masks.kv_mask[i, plan.kv_heads] for i, plan in enumerate(plans)]),
        neuron_mask=torch.stack([masks.neuron_mask[i, plan.neurons] for i, plan in enumerate(plans)]),
        hidden_mask=masks.hidden_mask[hidden],
    )


def layer_slices(plan: LayerKeep, hidden: torch.Tensor, head_dim: int) -> dict[str, tuple]:
    """(rows, columns) every weight of one decoder layer keeps, by module path inside the layer (None: all).

    A cut attention leaves with its input norm, a cut MLP with its post-attention norm: neither has a path here."""
    slices = {}
    if plan.has_attention:
        query_channels = head_channels(plan.heads, head_dim)
        kv_channels = head_channels(plan.kv_heads, head_dim)
        slices |= {
            "self_attn.q_proj": (query_channels, hidden),
            "self_attn.k_proj": (kv_channels, hidden),
            "self_attn.v_proj": (kv_channels, hidden),
            "self_attn.o_proj": (hidden, query_channels),
            "input_layernorm": (hidden, None),
        }
    if plan.has_mlp:
        slices |= {
            "mlp.gate_proj": (plan.neurons, hidden),
            "mlp.up_proj": (plan.neurons, hidden),
            "mlp.down_proj": (hidden, plan.neurons),
            "post_attention_layernorm": (hidden, None),
        }
    return slices


def _slice_layer(layer: nn.Module, plan: LayerKeep, hidden: torch.Tensor, head_dim: int) -> Replaced:
    replaced: Replaced = {}
    for path, (rows, columns) in layer_slices(plan, hidden, head_dim).items():
        module = layer.get_submodule(path)
        if columns is None:
            replaced |= _slice_vector(module, rows)
        else:
            replaced |= _slice_projection(module, rows=rows, columns=columns)
    layer.self_attn.num_key_value_groups = plan.heads.numel() // plan.kv_heads.numel()
    layer.mlp.intermediate_size = plan.neurons.numel()
    layer.mlp.hidden_size = layer.hidden_size = hidden.numel()
    return replaced


def _slice_projection(module: nn.Module, *, rows: torch.Tensor, columns: torch.Tensor) -> Replaced:
    """Keep `rows` (outputs) and `columns` (inputs) of an `nn.Linear` or an `APTLinear` (base and adapter)."""
    linear = module.base if isinstance(module, APTLinear) else module
    replaced: Replaced = {}
    linear.weight = _sliced_parameter(replaced, linear.weight, rows, columns)
    if linear.bias is not None:
        linear.bias = _sliced_parameter(replaced, linear.bias, rows)
    linear.out_features, linear.in_features = rows.numel(), columns.numel()
    if isinstance(module, APTLinear):
        module.out_features, module.in_features = rows.numel(), columns.numel()
        if module.rank:
            module.lora_A = _sliced_parameter(replaced, module.lora_A, None, columns)
            module.lora_B = _sliced_parameter(replaced, module.lora_B, rows)
    return replaced


def _slice_embeddings(model: nn.Module, hidden: torch.Tensor) -> Replaced:
    embedding, lm_head = model.model.embed_tokens, model.lm_head
    tied = lm_head.weight is embedding.weight
    replaced: Replaced = {}
    embedding.weight = _sliced_parameter(replaced, embedding.weight, None, hidden)
    embedding.embedding_dim = hidden.numel()
    lm_head.weight = embedding.weight if tied else _sliced_parameter(replaced, lm_head.weight, None, hidden)
    lm_head.in_features = hidden.numel()
    return replaced


def _slice_vector(norm: nn.Module, hidden: torch.Tensor) -> Replaced:
    replaced: Replaced = {}
    norm.weight = _sliced_parameter(replaced, norm.weight, hidden)
    return replaced


def _sliced_parameter(
    replaced: Replaced, param: nn.Parameter, rows: torch.Tensor | None, columns: torch.Tensor | None = None
) -> nn.Parameter:
    """A new parameter holding `param[rows][:, columns]`, recorded in `replaced` if it trains."""
    selected = Selected(rows, columns)
    sliced = nn.Parameter(selected.take(param.detach()).contiguous(), requires_grad=param.requires_grad)
    if param.requires_grad:
        replaced[param] = (sliced, selected)
    return sliced


def _update_config(config, hidden_size: int, head_dim: int, first_layer: LayerKeep) -> None:
    config.hidden_size = hidden_size
    config.head_dim = head_dim  # explicit: it no longer equals hidden_size // num_attention_heads
    for key, value in first_layer.sizes().items():
        setattr(config, key, value)
