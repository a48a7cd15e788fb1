"""The shape chosen by measured loss (docs/design.md §4): each candidate's masks on the model, forward only.

`choose_shape` sets every candidate's binary masks on the (masked = sliced) model in turn and takes the mean
causal-LM loss over the same calibration batches, without gradients; one SUM all-reduce of the per-candidate loss
and token sums makes every rank pick the same candidate. `search_target` is what a pruning update or the salience
stage calls: the target masks for a budget under `pruning.shape_search` (and `pruning.target_shape`). torch and
`pipeline.dist` only, so the finetune recipe (an engine whose forward takes input_ids / labels) and the salience
stage both use it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from pipeline import dist
from pipeline.apt.blocks import KeptSizes, ModelShape, kept_sizes, remaining_params, total_params
from pipeline.apt.depth import (
    BlockInfluence,
    cut_counts,
    cut_layers,
    gone_units,
    layer_rows,
    mask_rows,
    params_without,
    sizes_with_layers_cut,
    split_units,
    with_layers_cut,
    without_layers,
    without_sublayers,
)
from pipeline.apt.masks import MaskSet
from pipeline.apt.search import search_masks
from pipeline.apt.shapes import (
    candidate_shapes,
    masks_for_shape,
    relative_to_layer,
    shape_fraction,
    uniform_shape,
)

IGNORE_INDEX = -100
"""Label of tokens the causal-LM loss leaves out (transformers' convention)."""
SHAPE_MASKS = "shape.safetensors"
"""Inside salience/: the masks the measured choice (or the path to pruning.target_shape) gave; finalize reads them."""
SHAPE_REPORT = "shape.json"
"""Inside salience/: every candidate's sizes, remaining fraction and measured loss, and which was chosen."""


@dataclass(frozen=True)
class ShapeChoice:
    """Which candidate won, and every candidate's mean loss over all ranks' tokens (inf where not finite)."""

    index: int
    losses: tuple[float, ...]
    tokens: int
    """Tokens each candidate was scored on, over all ranks (0 when there was nothing to choose)."""


def choose_shape(
    model,
    candidates: Sequence[MaskSet],
    batches: Sequence[Mapping[str, torch.Tensor]],
    set_masks_fn: Callable[[MaskSet], None],
    *,
    restore: MaskSet | None = None,
) -> ShapeChoice:
    """The candidate whose masks give the lowest mean LM loss on `batches` (forward only, eval mode, no grad).

    `model(input_ids=..., labels=...)` must return `.loss` (a HF causal LM or a DeepSpeed engine around one);
    `set_masks_fn(masks)` puts masks on it (e.g. `lambda m: set_masks(engine.module, m)`); `restore` is set back
    afterwards. Every rank must call this with the same candidates and the same number of batches (its own share):
    loss and token sums travel in ONE all-reduce when a process group is initialized, so all ranks get the same
    means and the same choice; equal means go to the lower index. A single candidate is returned without a forward.
    """
    if not candidates:
        raise ValueError("no candidate shapes to choose from")
    if len(candidates) == 1:
        return ShapeChoice(index=0, losses=(math.nan,), tokens=0)
    if not batches:
        raise ValueError("choosing between shapes needs at least one calibration batch")
    sums = torch.zeros(2 * len(candidates), dtype=torch.float64, device=dist.device())
    was_training = model.training
    model.eval()  # no adapter dropout: every candidate sees the same function of its masks
    try:
        with torch.no_grad():
            for index, masks in enumerate(candidates):
                set_masks_fn(masks)
                for batch in batches:
                    sums[2 * index: 2 * index + 2] += loss_sum(model, dist.to_device(batch))
    finally:
        model.train(was_training)
        if restore is not None:
            set_masks_fn(restore)
    sums = dist.all_reduce_sum(sums).tolist()  # the one read of the losses: no host sync per batch
    losses = tuple(_mean(sums[2 * i], sums[2 * i + 1]) for i in range(len(candidates)))
    best = min(range(len(candidates)), key=lambda i: (losses[i], i))
    return ShapeChoice(index=best, losses=losses, tokens=int(sums[1]))


def influence_order(model, batches: Sequence[Mapping[str, torch.Tensor]], sublayers: bool = False) -> list[int]:
    """The layers (or, with `sublayers`, the units 2l: attention, 2l + 1: MLP) by ShortGPT's block influence on
    `batches` (its share on each rank), lowest first: the order in which `pruning.depth` cuts them. Forward only,
    eval mode, no grad; ONE SUM all-reduce, so all ranks agree."""
    module = getattr(model, "module", model)  # a DeepSpeed engine's model, or the model itself
    influence = BlockInfluence(len(module.model.layers), device=dist.device(), sublayers=sublayers)
    influence.attach(module)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=dist.to_device(batch)["input_ids"])
    finally:
        influence.detach()
        model.train(was_training)
    influence.load_packed(dist.all_reduce_sum(influence.pack()))
    return influence.scores().cpu().argsort(stable=True).tolist()


def loss_sum(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[loss × scored tokens, scored tokens] of one batch (float64, on its device): the mean weighted into a sum."""
    input_ids = batch["input_ids"]
    labels = batch.get("labels", input_ids)
    loss = model(input_ids=input_ids, labels=labels).loss
    tokens = (labels[..., 1:] != IGNORE_INDEX).sum().double()  # the model shifts labels by one
    return torch.stack([loss.double() * tokens, tokens])


def _mean(loss_sum: float, tokens: float) -> float:
    mean = loss_sum / tokens if tokens > 0 else math.inf
    return mean if math.isfinite(mean) else math.inf


# ---- what the pruning updates and the salience stage call ----------------------------------------------------


def target_kept(pruning, shape: ModelShape) -> KeptSizes | None:
    """`pruning.target_shape`'s widths (hidden, heads, kv_heads, intermediate) in every layer of `shape`; None if
    unset."""
    if pruning.target_shape is None:
        return None
    return uniform_shape(shape, *pruning.target_shape[:4])


def final_remaining(pruning, original: ModelShape) -> float:
    """The fraction the schedule ends at: `pruning.target_shape`'s (with its layer count, if it gives one), when one
    is set, else `target_remaining`."""
    if pruning.target_shape is None:
        return pruning.target_remaining
    layers = pruning.target_layers or original.num_layers
    return target_params(pruning, original, layers) / total_params(original)


def target_params(pruning, shape: ModelShape, layers: int) -> int:
    """Parameters of `layers` layers of `shape` at `pruning.target_shape`'s widths."""
    left = dataclasses.replace(shape, num_layers=layers)
    return remaining_params(left, target_kept(pruning, left))


def target_cuts(pruning, shape: ModelShape, budget: int, forced: int) -> int:
    """Layers a `target_shape` with a layer count has cut at `budget` parameters: the fewest (at least the `forced`
    ones) whose target widths on the layers left fit it, so the widths reach their target before layers go."""
    last = shape.num_layers - pruning.target_layers
    for cut in range(forced, last):
        if target_params(pruning, shape, shape.num_layers - cut) <= budget:
            return cut
    return max(forced, last)


def search_target(
    shape: ModelShape,
    scores,
    rho: float,
    pruning,
    *,
    measure: Callable[[list[MaskSet]], ShapeChoice] | None = None,
    alive: MaskSet | None = None,
    layer_order: Sequence[int] | None = None,
    progress: float = 1.0,
    original_layers: int | None = None,
) -> tuple[MaskSet, list[KeptSizes], ShapeChoice | None]:
    """Binary target masks at remaining fraction `rho` of `shape` (the physical one), by `pruning.shape_search`.

    global: today's single density list (`search_masks`). measured: `candidate_shapes` (each type ranked only
    within itself, `pruning.shape_candidates` of them), masks of each by `masks_for_shape`, and `measure(masks)`
    (e.g. `lambda m: choose_shape(engine, m, batches, set_fn, restore=current)`) picks one; without `measure` the
    first candidate (the even split) is taken. With `pruning.target_shape` the one candidate is the path to that
    shape (its layers cut as `target_cuts` says). `alive` keeps pruned blocks pruned while the budget allows
    (finalize). Under `pruning.depth` the candidates also cut whole layers, lowest in `layer_order` first
    (`progress`: how far the schedule is, 0..1; `original_layers`: the layer count before any compaction,
    default `shape`'s).
    Returns the masks, the candidate shapes and the choice (None where nothing was measured).
    """
    if pruning.shape_search == "global" and pruning.target_shape is None:
        options = dict(attention_mode=pruning.attention_mode, layout=pruning.layout)
        masks = search_masks(shape, scores, rho, round_to=pruning.round_to, min_hidden=pruning.min_hidden, **options)
        return masks, [kept_sizes(masks)], None
    sublayers = pruning.depth_unit == "sublayer"
    forced = [] if alive is None else gone_units(alive, sublayers)
    budget = math.floor(rho * total_params(shape))

    def fits(cut: int) -> bool:  # the model without the first `cut` units holds more than the budget at full width
        return params_without(shape, cut_layers(layer_order or [], forced, cut), sublayers) > budget

    compacted_away = (original_layers or shape.num_layers) - shape.num_layers
    units = shape.num_layers * (2 if sublayers else 1)
    if pruning.target_layers is not None:
        counts = [target_cuts(pruning, shape, budget, len(forced))]
    else:
        counts = cut_counts(pruning.depth, units, len(forced), progress, fits, compacted_away)
    if layer_order is None and max(counts) > len(forced):
        raise ValueError("cutting layers needs their order (layer_order)")
    proposals: dict[KeptSizes, MaskSet] = {}
    for index, count in enumerate(counts):  # the fewest cuts first: every split; then one even split per cut
        removed = cut_layers(layer_order or [], forced, count)
        for kept, masks in shapes_without(shape, scores, rho, pruning, removed, alive,
                                          pruning.shape_candidates if index == 0 else 1):
            proposals.setdefault(kept, masks)
    shapes, candidates = list(proposals), list(proposals.values())
    if len(candidates) == 1 or measure is None:
        return candidates[0], shapes, None
    choice = measure(candidates)
    return candidates[choice.index], shapes, choice


def shapes_without(shape: ModelShape, scores, rho: float, pruning, removed: Sequence[int], alive: MaskSet | None,
                   count: int) -> list[tuple[KeptSizes, MaskSet]]:
    """Up to `count` candidate shapes (and their masks) within ⌊rho·total⌋ parameters with the `removed` units cut
    (layers whole, or sublayers under `pruning.depth_unit`): the width search on what is kept, placed back among
    all the layers."""
    sublayers = pruning.depth_unit == "sublayer"
    options = dict(attention_mode=pruning.attention_mode, layout=pruning.layout)
    whole, attention, mlp = split_units(removed, sublayers)
    small, kept_layers = without_layers(shape, whole)
    small_scores = layer_rows(scores, kept_layers) if whole else scores
    small_alive = mask_rows(alive, kept_layers) if whole and alive is not None else alive
    if attention or mlp:  # a cut sublayer: the width search keeps none of it
        small_alive = without_sublayers(small_alive or MaskSet.ones(small), [kept_layers.index(i) for i in attention],
                                        [kept_layers.index(i) for i in mlp])
        options["sublayers"] = True
    if pruning.layout == "per_layer" and pruning.per_layer_ranking == "relative":
        small_scores = relative_to_layer(small_scores, small_alive)
    fraction = rho
    if removed:  # the same budget in parameters; half a parameter over it so the search's floor lands on it
        fraction = min(1.0, (math.floor(rho * total_params(shape)) + 0.5) / total_params(small))
    shapes = candidate_shapes(small, fraction, scores=small_scores, round_to=pruning.round_to,
                              min_hidden=pruning.min_hidden, count=count, alive=small_alive,
                              target=target_kept(pruning, small), **options)
    proposals = []
    for kept in shapes:
        masks = masks_for_shape(small, small_scores, kept, alive=small_alive, **options)
        if whole:
            kept, masks = (sizes_with_layers_cut(kept, kept_layers, shape.num_layers),
                           with_layers_cut(masks, kept_layers, shape.num_layers))
        proposals.append((kept, masks))
    return proposals


def describe(shape: ModelShape, shapes: Sequence[KeptSizes], choice: ShapeChoice | None) -> list[dict]:
    """One row per candidate for logs and reports: sizes, remaining fraction, measured loss, whether chosen."""
    rows = []
    for index, kept in enumerate(shapes):
        loss = None if choice is None else choice.losses[index]
        rows.append({"hidden": kept.hidden, "heads": list(kept.heads), "kv_heads": list(kept.kv_heads),
                     "neurons": list(kept.neurons), "cut_layers": kept.cut_layers,
                     "cut_attention": kept.cut_attention, "cut_mlp": kept.cut_mlp,
                     "remaining_fraction": shape_fraction(shape, kept),
                     "loss": loss if loss is not None and math.isfinite(loss) else None,
                     "chosen": index == (0 if choice is None else choice.index)})
    return rows


def candidate_line(row: dict) -> str:
    """One `describe` row for the log: sizes (one number where the kept layers agree), cut layers, loss."""
    kept = [layer for layer in range(len(row["heads"])) if layer not in row["cut_layers"]]

    def sizes(values: list[int]):
        values = [values[layer] for layer in kept]
        return values[0] if len(set(values)) == 1 else values

    cut = f", layers {row['cut_layers']} cut" if row["cut_layers"] else ""
    cut += f", attention of {row['cut_attention']} cut" if row.get("cut_attention") else ""
    cut += f", MLP of {row['cut_mlp']} cut" if row.get("cut_mlp") else ""
    loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
    return (f"hidden {row['hidden']}, heads {sizes(row['heads'])}, neurons {sizes(row['neurons'])}{cut} "
            f"({row['remaining_fraction']:.3f} of this model): loss {loss}{' (chosen)' if row['chosen'] else ''}")
