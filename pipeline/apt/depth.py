"""Whole decoder layers as prunable units: ShortGPT's block influence from mergeable sums (docs/design.md §6).

Block influence of layer l is `BI_l = 1 − mean_t cos(x_l,t, y_l,t)`, x the layer's input hidden state and y its
output, over every token seen: a layer whose output is nearly its input changes the residual stream least. Each
rank keeps, per layer, Σ cos and the token count, so one SUM all-reduce gives what one process computes on all the
batches. Nothing is stored per token. The helpers below let the shape search (`pipeline.shape_choice`) cut whole
layers under `pruning.depth`: how many at a choice, which ones, and the width search on the layers left.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.apt.blocks import KeptSizes, ModelShape
from pipeline.apt.masks import MaskSet


class BlockInfluence:
    """Per-layer Σ cos(input, output) and token counts, from forward hooks on every decoder layer."""

    def __init__(self, num_layers: int, device: torch.device | str | None = None):
        self.sums = torch.zeros(2, num_layers, dtype=torch.float64, device=device)
        """Row 0: Σ cos over tokens; row 1: tokens."""
        self._handles = []

    def attach(self, model: nn.Module) -> None:
        """Hook every decoder layer of a HF causal LM (`model.model.layers`)."""
        if self._handles:
            raise RuntimeError("block influence is already attached")
        layers = model.model.layers
        if len(layers) != self.sums.shape[1]:
            raise ValueError(f"the model has {len(layers)} layers; the sums are for {self.sums.shape[1]}")
        for index, layer in enumerate(layers):
            hook = partial(self._on_layer, index)
            self._handles.append(layer.register_forward_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def _on_layer(self, index: int, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        inputs = args[0] if args else kwargs["hidden_states"]
        outputs = output[0] if isinstance(output, tuple) else output
        self.add(index, inputs, outputs)

    @torch.no_grad()
    def add(self, layer: int, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        """Add one batch of a layer's input and output hidden states [..., hidden]."""
        cos = F.cosine_similarity(inputs.to(torch.float64), outputs.to(torch.float64), dim=-1)
        self.sums[0, layer] += cos.sum().to(self.sums.device)
        self.sums[1, layer] += cos.numel()

    def scores(self) -> torch.Tensor:
        """BI per layer [L], float64: 1 − the mean cosine (higher: the layer matters more)."""
        return 1 - self.sums[0] / self.sums[1].clamp_min(1)

    def pack(self) -> torch.Tensor:
        """The sums as one flat tensor for a SUM all-reduce."""
        return self.sums.reshape(-1)

    @torch.no_grad()
    def load_packed(self, flat: torch.Tensor) -> None:
        """Replace the sums by a reduced `pack()`-shaped buffer."""
        if flat.numel() != self.sums.numel():
            raise ValueError(f"packed buffer has {flat.numel()} elements; expected {self.sums.numel()}")
        self.sums.copy_(flat.view_as(self.sums))


# ---- layer cuts in the shape search ------------------------------------------------------------------------


def cut_counts(depth: str | int, num_layers: int, forced: int, progress: float,
               fits: Callable[[int], bool], removed: int = 0) -> list[int]:
    """How many of the `num_layers` layers the candidates of one shape choice cut, by `pruning.depth`.

    off: none (or the `forced` layers already gone); a number N: the schedule's share round(C · progress) of the
    whole cut C = L − N of the original L layers, less the `removed` ones a compaction has already taken out;
    auto: every k from `forced` up while the model without k layers still holds more than the budget at full width
    (`fits(k)`), so widths spend the rest of it exactly.
    """
    if depth == "off":
        return [forced]
    if depth == "auto":
        counts = [forced]
        while counts[-1] + 1 < num_layers and fits(counts[-1] + 1):
            counts.append(counts[-1] + 1)
        return counts
    whole = num_layers + removed - int(depth)
    due = round(whole * min(max(progress, 0.0), 1.0)) - removed
    return [max(forced, min(whole - removed, due))]


def cut_layers(order: Sequence[int], forced: Sequence[int], count: int) -> tuple[int, ...]:
    """The `count` layers a candidate cuts: the `forced` ones (already gone), then the lowest in `order`."""
    removed = list(forced)
    removed += [layer for layer in order if layer not in removed][:max(0, count - len(removed))]
    return tuple(sorted(removed))


def without_layers(shape: ModelShape, removed: Sequence[int]) -> tuple[ModelShape, list[int]]:
    """The shape of the model with `removed` layers gone, and the original indices of the layers it keeps."""
    gone = set(removed)
    kept = [layer for layer in range(shape.num_layers) if layer not in gone]
    return dataclasses.replace(shape, num_layers=len(kept)), kept


def layer_rows(scores, kept: Sequence[int]) -> dict[str, torch.Tensor]:
    """Head and neuron rows of the kept layers (hidden as it is), from a mapping or `SalienceScores`."""
    read = (lambda name: scores[name]) if isinstance(scores, Mapping) else (lambda name: getattr(scores, name))
    rows = torch.tensor(list(kept))
    return {"head": read("head")[rows], "neuron": read("neuron")[rows], "hidden": read("hidden")}


def mask_rows(masks: MaskSet, kept: Sequence[int]) -> MaskSet:
    """The kept layers' masks."""
    rows = torch.tensor(list(kept))
    return MaskSet(head_mask=masks.head_mask[rows], kv_mask=masks.kv_mask[rows], neuron_mask=masks.neuron_mask[rows],
                   hidden_mask=masks.hidden_mask)


def with_layers_cut(masks: MaskSet, kept: Sequence[int], num_layers: int) -> MaskSet:
    """Masks of the kept layers placed back among `num_layers`, every other layer masked whole."""
    rows = torch.tensor(list(kept))

    def place(small: torch.Tensor) -> torch.Tensor:
        full = small.new_zeros(num_layers, small.shape[1])
        full[rows] = small
        return full

    return MaskSet(head_mask=place(masks.head_mask), kv_mask=place(masks.kv_mask),
                   neuron_mask=place(masks.neuron_mask), hidden_mask=masks.hidden_mask)


def sizes_with_layers_cut(kept_sizes: KeptSizes, kept: Sequence[int], num_layers: int) -> KeptSizes:
    """`kept_sizes` of the kept layers placed back among `num_layers`, zero for every cut layer."""
    def place(values: tuple[int, ...]) -> tuple[int, ...]:
        full = [0] * num_layers
        for layer, value in zip(kept, values, strict=True):
            full[layer] = value
        return tuple(full)

    return KeptSizes(hidden=kept_sizes.hidden, heads=place(kept_sizes.heads), kv_heads=place(kept_sizes.kv_heads),
                     neurons=place(kept_sizes.neurons))
