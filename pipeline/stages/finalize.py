"""finalize: binary masks at the final target, exact budget, GQA-consistent, written with a report.

Finalize has no model; it respects the shape the fine-tune reached. Blocks the fine-tune pruned stay pruned
(their adapters were trained without them): the masks it starts from are intersected with the fine-tune's.
With `pruning.shape_search: measured` (or a `pruning.target_shape`) they are the masks the salience stage chose
by measured loss among shapes within the fine-tune's (`salience/shape.safetensors`); with `global`, the budget
search on the calibration salience with the fine-tune's pruned blocks ranked last. When the fine-tune reached the
target (it does, unless its window was cut short) either way gives the fine-tune's masks, now checked against the
exact budget; otherwise the calibration salience (and, measured, the loss) decides which further blocks go.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline import dist
from pipeline.apt.blocks import ModelShape, kept_sizes, remaining_params, total_params
from pipeline.apt.compaction import physical_fraction
from pipeline.apt.masks import MaskSet
from pipeline.apt.search import search_masks
from pipeline.config import FinalizeConfig
from pipeline.layout import RunLayout, finetune_masks, salience_scores
from pipeline.model_io import model_shape
from pipeline.shape_choice import SHAPE_MASKS, final_remaining
from pipeline.stage import save_tensors, write_atomic

Config = FinalizeConfig
PRUNED_SCORE = -1e30
"""Score given to blocks the fine-tune pruned: finite (no inf arithmetic), below any real salience."""
BUDGET_TOLERANCE = 0.01
"""A result further than this below the target remaining fraction is logged as a warning."""

log = dist.get_logger("apt.finalize")


def run(cfg: FinalizeConfig, run_dir: Path) -> dict:
    pruning, layout = cfg.pruning, RunLayout(run_dir, cfg.model)
    # After a compaction the masks describe the compacted base; the budget is still the original model's.
    original, shape = (model_shape(directory, cfg.model.trust_remote_code)
                       for directory in (layout.base_model, layout.tuned_base))
    target = final_remaining(pruning, original)
    trained = finetune_masks(layout)
    trained.check_gqa(shape, pruning.attention_mode)
    if pruning.shape_search == "global" and pruning.target_shape is None:
        chosen = searched_masks(pruning, shape, physical_fraction(target, original, shape), trained,
                                salience_scores(layout))
    else:
        chosen = measured_masks(layout, shape, pruning.attention_mode)
    # Blocks the fine-tune pruned stay pruned: their adapters were trained without them.
    masks = MaskSet(**{name: torch.minimum(a, b) for (name, a), b in
                       zip(chosen.to_dict().items(), trained.to_dict().values(), strict=True)})
    masks.check_gqa(shape, pruning.attention_mode)

    total = total_params(original)
    kept = kept_sizes(masks)
    remaining = remaining_params(shape, kept)
    if remaining > target * total:
        raise RuntimeError(f"finalize: masks keep {remaining} of {total} parameters, above the target "
                           f"{target}; the fine-tune's masks do not fit the budget")
    if target - remaining / total > BUDGET_TOLERANCE:
        log.warning("finalize: %.4f of the parameters kept, more than %.2f below the target %.4f (the fine-tune "
                    "pruned past it, or the model's granularity allows no closer shape)", remaining / total,
                    BUDGET_TOLERANCE, target)
    report = {
        "target_remaining": target,
        "remaining_params": remaining,
        "total_params": total,
        "remaining_fraction": remaining / total,
        "kept_hidden": kept.hidden,
        "kept_heads": list(kept.heads),
        "kept_kv_heads": list(kept.kv_heads),
        "kept_neurons": list(kept.neurons),
        "layout": pruning.layout,
        "attention_mode": pruning.attention_mode,
        "shape_search": pruning.shape_search if pruning.target_shape is None else "target_shape",
        "changed_from_finetune": not all(torch.equal(a, b) for a, b in
                                         zip(masks.to_dict().values(), trained.to_dict().values(), strict=True)),
    }
    save_tensors(masks.to_dict(), layout.final_masks)
    write_atomic(layout.finalize / "masks.json", json.dumps(report, indent=2))
    plot_masks(shape, masks, layout.finalize / "masks.png")
    log.info("finalize: %d of %d parameters kept (%.3f, target %.3f)", remaining, total, remaining / total, target)
    return {k: report[k] for k in ("remaining_params", "total_params", "remaining_fraction", "kept_hidden")}


def searched_masks(pruning, shape: ModelShape, budget: float, trained: MaskSet, scores: dict) -> MaskSet:
    """`pruning.shape_search: global`: one density list, the fine-tune's pruned blocks ranked below any other."""
    ranked = {
        "head": scores["head"].masked_fill(trained.head_mask == 0, PRUNED_SCORE),
        "neuron": scores["neuron"].masked_fill(trained.neuron_mask == 0, PRUNED_SCORE),
        "hidden": scores["hidden"].masked_fill(trained.hidden_mask == 0, PRUNED_SCORE),
    }
    return search_masks(shape, ranked, budget, attention_mode=pruning.attention_mode, layout=pruning.layout,
                        round_to=pruning.round_to, min_hidden=pruning.min_hidden)


def measured_masks(layout: RunLayout, shape: ModelShape, attention_mode: str) -> MaskSet:
    """The masks the salience stage chose by measured loss (it has the model; finalize does not)."""
    path = layout.salience.parent / SHAPE_MASKS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pruning.shape_search=measured (or a pruning.target_shape) needs "
                                f"the salience stage to choose the shape: rerun it")
    masks = MaskSet.from_dict(load_file(str(path)))
    masks.check_gqa(shape, attention_mode)
    return masks


def plot_masks(shape: ModelShape, masks: MaskSet, path: Path) -> None:
    """Heat-map of the kept fraction per layer for query heads, KV heads and neurons, plus hidden."""
    # Imported here: every rank and driver imports this module, and only finalize draws (matplotlib: ~0.5 s).
    from matplotlib.figure import Figure

    kept = torch.stack([masks.head_mask.mean(1), masks.kv_mask.mean(1), masks.neuron_mask.mean(1),
                        masks.hidden_mask.mean().expand(shape.num_layers)], dim=1)
    figure = Figure(figsize=(4.5, 1.6 + 0.25 * shape.num_layers))  # no pyplot: no global state, no display
    axis = figure.subplots()
    image = axis.imshow(kept.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    axis.set_xticks(range(4), ["query heads", "KV heads", "neurons", "hidden"], rotation=20)
    axis.set_ylabel("layer")
    for (layer, column), value in zip(torch.cartesian_prod(torch.arange(kept.shape[0]), torch.arange(4)).tolist(),
                                      kept.flatten().tolist(), strict=True):
        axis.text(column, layer, f"{value:.2f}", ha="center", va="center", fontsize=7,
                  color="white" if value < 0.5 else "black")
    figure.colorbar(image, ax=axis, label="kept fraction")
    axis.set_title("kept fraction per layer")
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=120)
    tmp.replace(path)
