"""Compaction: cut dead blocks (mask 0 and target 0) out of the training model while it trains (docs/design.md §6).

The compacted model stays rectangular (the same counts in every layer, the same query heads per KV group,
hidden % heads == 0; a layer masked whole leaves entirely), so it is an ordinary smaller LLaMA: a legal config and
a plain `ModelShape`, and every later stage sees a smaller base model. A removed block never comes back. After a
compaction the search runs in the physical shape at `physical_fraction(ρ)`, which keeps the original budget. Pure
torch; under DeepSpeed, `pipeline.engine.compact_engine` runs `compact_model` and carries the optimizer state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.apt.adapters import ChannelMask
from pipeline.apt.blocks import ModelShape, count_params, total_params
from pipeline.apt.depth import mask_rows, without_layers
from pipeline.apt.masks import ATTENTION_MODES, MaskSet, empty_layers
from pipeline.apt.salience import BLOCKS, STATS, SalienceAccumulator, SalienceScores
from pipeline.apt.slicing import (
    Gather,
    LayerKeep,
    Replaced,
    Settle,
    check_layer,
    drop_layers,
    head_channels,
    select_masks,
    slice_kept,
)


@dataclass(frozen=True)
class CompactionPlan:
    """What a compaction keeps: per layer the query heads, KV heads and neurons, and the hidden channels."""

    layers: tuple[LayerKeep, ...]
    """One per kept layer, in order."""
    hidden: torch.Tensor
    before: ModelShape
    """The physical shape the indices refer to."""
    after: ModelShape
    """The physical shape once they are applied."""
    kept_layers: tuple[int, ...] = ()
    """Indices in `before` of the layers that stay (every other one was masked whole); empty: all of them."""

    @property
    def layer_rows(self) -> list[int]:
        """The rows of `before`'s per-layer state that stay, one per entry of `layers`."""
        return list(self.kept_layers) or list(range(self.before.num_layers))

    def summary(self) -> dict[str, int]:
        """Sizes and parameter counts before and after, for logging a compaction event."""
        sizes = {}
        for name, shape in (("before", self.before), ("after", self.after)):
            sizes |= {
                f"layers_{name}": shape.num_layers,
                f"hidden_{name}": shape.hidden_size,
                f"heads_{name}": shape.num_heads,
                f"kv_heads_{name}": shape.num_kv_heads,
                f"neurons_{name}": shape.intermediate_size,
                f"params_{name}": total_params(shape),
            }
        return sizes


def plan_compaction(
    masks: MaskSet, target: MaskSet, shape: ModelShape, attention_mode: str, *, min_fraction: float = 0.0
) -> CompactionPlan | None:
    """The largest rectangular, loadable removal of dead blocks; None when it removes nothing, or less than
    `min_fraction` of every block type (query heads, KV heads, neurons, hidden channels).

    A layer whose every head, KV head and neuron is dead goes whole (`pruning.depth`; not where a sublayer bias
    would still add to the residual stream). In the others the same count k of dead units goes (k = the fewest any
    of them has): whole dead KV groups (the KV head and all its query heads), in `query_in_group` mode dead query
    heads (the same number from every group), dead neurons; all dead hidden channels, except as many as keep hidden
    a multiple of the kept query heads.
    """
    if attention_mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode {attention_mode!r} is not one of {ATTENTION_MODES}")
    if not 0 <= min_fraction <= 1:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    _check_shapes(shape, masks=masks, target=target)
    dead = MaskSet(**{name: (mask == 0) & (getattr(target, name) == 0) for name, mask in masks.to_dict().items()})
    dead_layers = dead.head_mask.all(1) & dead.kv_mask.all(1) & dead.neuron_mask.all(1)
    whole = dead_layers.nonzero().flatten().tolist()
    if shape.o_proj_bias or len(whole) == shape.num_layers:  # a bias would still add; a model keeps a layer
        whole = []
    kept_layers = [layer for layer in range(shape.num_layers) if layer not in whole]
    plan = _width_plan(mask_rows(dead, kept_layers), without_layers(shape, whole)[0], attention_mode, min_fraction,
                       layers_out=len(whole) / shape.num_layers)
    if plan is None:
        return None
    return dataclasses.replace(plan, before=shape, kept_layers=tuple(kept_layers) if whole else ())


def _width_plan(dead: MaskSet, shape: ModelShape, attention_mode: str, min_fraction: float,
                layers_out: float) -> CompactionPlan | None:
    """The rectangular cut of the dead units of `shape`'s layers (those that stay); None when it and `layers_out`
    (the fraction of layers going whole) both remove less than `min_fraction`."""
    layers, num_kv, group = shape.num_layers, shape.num_kv_heads, shape.group_size
    dead_queries = dead.head_mask.reshape(layers, num_kv, group)
    dead_groups = dead.kv_mask & dead_queries.all(dim=2)
    neurons_out = min(int(dead.neuron_mask.sum(dim=1).min()), shape.intermediate_size - 1)
    live_hidden = max(shape.hidden_size - int(dead.hidden_mask.sum()), 1)
    # transformers refuses a LlamaConfig whose hidden size is not a multiple of its query heads; a model that
    # already breaks the rule (an architecture whose config does not check it) needs no rounding.
    heads_divide_hidden = shape.hidden_size % shape.num_heads == 0

    best = None  # (parameters after, groups out, queries out per group, hidden kept)
    for groups_out in range(min(int(dead_groups.sum(dim=1).min()), num_kv - 1), -1, -1):
        kept_groups = ~_first(dead_groups, groups_out)
        queries_out_max = 0
        if attention_mode == "query_in_group":
            dead_in_kept = dead_queries[kept_groups].reshape(layers, num_kv - groups_out, group).sum(dim=2)
            queries_out_max = min(int(dead_in_kept.min()), group - 1)
        for queries_out in range(queries_out_max, -1, -1):
            heads = (num_kv - groups_out) * (group - queries_out)
            hidden = math.ceil(live_hidden / heads) * heads if heads_divide_hidden else live_hidden
            if hidden > shape.hidden_size:
                continue
            params = count_params(
                shape,
                hidden=hidden,
                heads=layers * heads,
                kv_heads=layers * (num_kv - groups_out),
                neurons=layers * (shape.intermediate_size - neurons_out),
            )
            if best is None or params < best[0]:  # ties keep the candidate that removes more heads
                best = (params, groups_out, queries_out, hidden)
    _, groups_out, queries_out, hidden = best  # removing no head always fits: hidden itself is a multiple

    removed = {
        "heads": 1 - (num_kv - groups_out) * (group - queries_out) / shape.num_heads,
        "kv_heads": groups_out / num_kv,
        "neurons": neurons_out / shape.intermediate_size,
        "hidden": 1 - hidden / shape.hidden_size,
        "layers": layers_out,
    }
    if max(removed.values()) == 0 or max(removed.values()) < min_fraction:
        return None
    return _plan(shape, dead, groups_out, queries_out, neurons_out, hidden)


def _plan(
    shape: ModelShape, dead: MaskSet, groups_out: int, queries_out: int, neurons_out: int, hidden: int
) -> CompactionPlan:
    """Kept indices: per row, the first `*_out` dead units go."""
    layers, num_kv, group = shape.num_layers, shape.num_kv_heads, shape.group_size
    dead_queries = dead.head_mask.reshape(layers, num_kv, group)
    kept_groups = ~_first(dead.kv_mask & dead_queries.all(dim=2), groups_out)
    kept_queries = ~_first(dead_queries, queries_out) & kept_groups[:, :, None]
    kept_neurons = ~_first(dead.neuron_mask, neurons_out)
    kept_hidden = ~_first(dead.hidden_mask[None], shape.hidden_size - hidden)[0]
    keeps = tuple(
        check_layer(
            index,
            LayerKeep(
                heads=kept_queries[index].flatten().nonzero().flatten(),
                kv_heads=kept_groups[index].nonzero().flatten(),
                neurons=kept_neurons[index].nonzero().flatten(),
            ),
            group,
        )
        for index in range(layers)
    )
    after = dataclasses.replace(
        shape,
        hidden_size=hidden,
        num_heads=keeps[0].heads.numel(),
        num_kv_heads=keeps[0].kv_heads.numel(),
        intermediate_size=keeps[0].neurons.numel(),
    )
    return CompactionPlan(layers=keeps, hidden=kept_hidden.nonzero().flatten(), before=shape, after=after)


def _first(flags: torch.Tensor, count: int) -> torch.Tensor:
    """Per row (last dimension), the first `count` set entries of a bool tensor; rows must have that many."""
    return flags & (flags.long().cumsum(dim=-1) <= count)


def _check_shapes(shape: ModelShape, **mask_sets: MaskSet) -> None:
    expected = MaskSet.ones(shape).to_dict()
    for label, masks in mask_sets.items():
        for name, tensor in masks.to_dict().items():
            if tensor.shape != expected[name].shape:
                raise ValueError(
                    f"{label}.{name} has shape {tuple(tensor.shape)}; the model's is {tuple(expected[name].shape)}"
                )


def physical_fraction(remaining_fraction: float, original: ModelShape, physical: ModelShape) -> float:
    """The remaining fraction of the physical model that keeps ρ of the original: ρ·total(original)/total(physical).

    Capped at 1: once the budget exceeds the physical size, nothing more needs to go.
    """
    return min(1.0, remaining_fraction * total_params(original) / total_params(physical))


# ---- state that follows the plan -----------------------------------------------------------------------


def compact_model(model: nn.Module, plan: CompactionPlan, gather: Gather | None = None,
                  settle: Settle | None = None) -> Replaced:
    """Slice an APT-wrapped model in place by `plan`: base weights, adapters, norms, embeddings, masks, config.

    Returns old parameter -> (new parameter, its selection), what `pipeline.engine.rebuild_engine` carries.
    `gather` is entered around each layer's parameters (ZeRO-3: `deepspeed.zero.GatheredParameters`); `settle` is
    called on each sliced layer (ZeRO-3: partition it at once).
    """
    current = ModelShape.from_config(model.config)
    if current != plan.before:
        raise ValueError(f"the plan is for a model of shape {plan.before}; this one is {current}")
    if not hasattr(model, "apt_masks"):
        raise ValueError("compaction slices an APT-wrapped model (inject_adapters); this one has no masks")
    if plan.kept_layers:  # layers masked whole leave first; the mask sites of the rest read their new rows
        model.apt_masks.replace(mask_rows(model.apt_masks.as_mask_set(), plan.kept_layers))
        drop_layers(model, list(plan.kept_layers))
        for index, layer in enumerate(model.model.layers):
            for site in layer.modules():
                if isinstance(site, ChannelMask) and site.layer is not None:
                    site.layer = index
    return slice_kept(model, list(plan.layers), plan.hidden, gather, settle)


def slice_masks(masks: MaskSet, plan: CompactionPlan) -> MaskSet:
    """Masks (current or target, gradual values allowed) of the compacted model."""
    return select_masks(mask_rows(masks, plan.layer_rows), list(plan.layers), plan.hidden)


def slice_scores(scores: SalienceScores, plan: CompactionPlan) -> SalienceScores:
    """Block salience (e.g. the EMA) of the compacted model."""
    rows = list(zip(plan.layer_rows, plan.layers, strict=True))
    return SalienceScores(
        head=torch.stack([scores.head[i, keep.heads.to(scores.head.device)] for i, keep in rows]),
        neuron=torch.stack([scores.neuron[i, keep.neurons.to(scores.neuron.device)] for i, keep in rows]),
        hidden=scores.hidden[plan.hidden.to(scores.hidden.device)],
    )


def slice_salience_sums(sums: dict[str, torch.Tensor], plan: CompactionPlan) -> dict[str, torch.Tensor]:
    """A `SalienceAccumulator.state_dict()` of the compacted model: the kept channels' sums, counts as they were."""
    head_dim, layer_rows = plan.before.head_dim, plan.layer_rows
    rows = {"attention": layer_rows, "mlp": layer_rows,  # hidden: the attention and MLP output site of each layer
            "hidden": [2 * layer + site for layer in layer_rows for site in (0, 1)]}
    channels = {
        "attention": [head_channels(keep.heads, head_dim) for keep in plan.layers],
        "mlp": [keep.neurons for keep in plan.layers],
        "hidden": [plan.hidden] * len(rows["hidden"]),  # every site row keeps the same channels
    }
    sliced = {}
    for block in BLOCKS:
        for stat in STATS:
            tensor = sums[f"{block}.{stat}"]
            if stat == "count":  # one count per row: every channel of a row saw the same tokens
                sliced[f"{block}.{stat}"] = tensor[rows[block]].clone()
            else:
                kept = [tensor[row, keep.to(tensor.device)] for row, keep in zip(rows[block], channels[block],
                                                                                  strict=True)]
                sliced[f"{block}.{stat}"] = torch.stack(kept)
    return sliced


def compact_accumulator(accumulator: SalienceAccumulator, plan: CompactionPlan) -> SalienceAccumulator:
    """A new, unattached accumulator for the compacted shape holding the kept channels' sums.

    The caller swaps the hooks: `accumulator.detach(); new.attach(model)`.
    """
    device = accumulator.sums["hidden"]["sum1"].device
    compacted = SalienceAccumulator(plan.after, device=device, products=accumulator.products,
                                     after_mask=accumulator.after_mask, outlier=accumulator.outlier)
    compacted.load_state_dict(slice_salience_sums(accumulator.state_dict(), plan))
    compacted.enabled, compacted.grad_scale = accumulator.enabled, accumulator.grad_scale
    return compacted


def narrow_alive(alive: MaskSet, plan: CompactionPlan) -> MaskSet:
    """Binary masks in the ORIGINAL model's positions of the blocks still present after `plan`.

    `alive` marks what earlier compactions kept (all ones before the first); the plan's indices count only those,
    so the k-th kept position of a row is its k-th alive one, and the physical layer i is the i-th original layer
    not yet removed (a removed layer's rows are all zero). Slicing the original base by the result gives the
    compacted base, which is how finetune writes it: streamed from the original checkpoint, never gathered.
    """
    removed = set(empty_layers(alive))
    present = [layer for layer in range(alive.head_mask.shape[0]) if layer not in removed]
    narrowed = MaskSet(**{name: torch.zeros_like(mask) for name, mask in alive.to_dict().items()})

    def narrow(row: torch.Tensor, kept: torch.Tensor, out: torch.Tensor) -> None:
        out[row.nonzero().flatten()[kept.to(row.device)]] = 1.0

    for physical, keep in zip(plan.layer_rows, plan.layers, strict=True):
        layer = present[physical]
        narrow(alive.head_mask[layer], keep.heads, narrowed.head_mask[layer])
        narrow(alive.kv_mask[layer], keep.kv_heads, narrowed.kv_mask[layer])
        narrow(alive.neuron_mask[layer], keep.neurons, narrowed.neuron_mask[layer])
    narrow(alive.hidden_mask, plan.hidden, narrowed.hidden_mask)
    return narrowed
