"""Whole decoder layers, or a layer's attention or MLP alone, as prunable units: ShortGPT's block influence from
mergeable sums (docs/design.md §6).

Block influence of layer l is `BI_l = 1 − mean_t cos(x_l,t, y_l,t)`, x the layer's input hidden state and y its
output, over every token seen: a layer whose output is nearly its input changes the residual stream least. With
`pruning.depth_unit=sublayer` the units are the sublayers, unit 2l layer l's attention (x → x + attn) and 2l + 1
its MLP (h → h + mlp, h = x + attn). Each rank keeps, per unit, Σ cos and the token count, so one SUM all-reduce
gives what one process computes on all the batches. Nothing is stored per token. The helpers below let the shape
search (`pipeline.shape_choice`) cut units under `pruning.depth`: how many at a choice, which ones, and the width
search on what is left.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.apt.blocks import KeptSizes, ModelShape, count_params
from pipeline.apt.masks import MaskSet, empty_layers
from pipeline.apt.search import score_reader


class BlockInfluence:
    """Per-unit Σ cos(input, output) and token counts, from forward hooks on every decoder layer (and, for
    sublayers, on its attention)."""

    def __init__(self, num_layers: int, device: torch.device | str | None = None, sublayers: bool = False):
        self.sublayers = sublayers
        self.sums = torch.zeros(2, num_layers * (2 if sublayers else 1), dtype=torch.float64, device=device)
        """Row 0: Σ cos over tokens; row 1: tokens."""
        self._handles = []
        self._residual: torch.Tensor | None = None
        """Sublayers: the residual stream before the sublayer running now."""

    def attach(self, model: nn.Module) -> None:
        """Hook every decoder layer of a HF causal LM (`model.model.layers`)."""
        if self._handles:
            raise RuntimeError("block influence is already attached")
        layers = model.model.layers
        if len(layers) * (2 if self.sublayers else 1) != self.sums.shape[1]:
            raise ValueError(f"the model has {len(layers)} layers; the sums are for {self.sums.shape[1]} units")
        for index, layer in enumerate(layers):
            if self.sublayers:
                self._handles += [
                    layer.register_forward_pre_hook(self._on_layer_input, with_kwargs=True),
                    layer.self_attn.register_forward_hook(partial(self._on_attention, index)),
                ]
            self._handles.append(layer.register_forward_hook(partial(self._on_layer, index), with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def _on_layer(self, index: int, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        outputs = output[0] if isinstance(output, tuple) else output
        if self.sublayers:  # the MLP's input is the residual stream after the attention
            self.add(2 * index + 1, self._residual, outputs)
            self._residual = None
        else:
            self.add(index, args[0] if args else kwargs["hidden_states"], outputs)

    def _on_layer_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._residual = args[0] if args else kwargs["hidden_states"]

    @torch.no_grad()
    def _on_attention(self, index: int, module: nn.Module, args: tuple, output) -> None:
        attended = output[0] if isinstance(output, tuple) else output
        after = self._residual + attended  # what the decoder layer adds to its residual stream
        self.add(2 * index, self._residual, after)
        self._residual = after

    @torch.no_grad()
    def add(self, layer: int, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        """Add one batch of a layer's input and output hidden states [..., hidden]."""
        cos = F.cosine_similarity(inputs.to(torch.float64), outputs.to(torch.float64), dim=-1)
        self.sums[0, layer] += cos.sum().to(self.sums.device)
        self.sums[1, layer] += cos.numel()

    def scores(self) -> torch.Tensor:
        """BI per unit [L] or [2L], float64: 1 − the mean cosine (higher: the unit matters more)."""
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


def gone_units(alive: MaskSet, sublayers: bool) -> list[int]:
    """The units `alive` keeps nothing of: the empty layers, or (sublayers) every attention with no KV head and
    every MLP with no neuron."""
    if not sublayers:
        return empty_layers(alive)
    attention = (alive.kv_mask.amax(dim=1) <= 0).tolist()
    mlp = (alive.neuron_mask.amax(dim=1) <= 0).tolist()
    return [2 * layer + kind for layer, gone in enumerate(zip(attention, mlp, strict=True))
            for kind in (0, 1) if gone[kind]]


def split_units(units: Sequence[int], sublayers: bool) -> tuple[list[int], list[int], list[int]]:
    """Cut units as layers: (cut whole, attention cut alone, MLP cut alone), each sorted."""
    if not sublayers:
        return sorted(units), [], []
    attention, mlp = {unit // 2 for unit in units if unit % 2 == 0}, {unit // 2 for unit in units if unit % 2}
    return sorted(attention & mlp), sorted(attention - mlp), sorted(mlp - attention)


def params_without(shape: ModelShape, units: Sequence[int], sublayers: bool) -> int:
    """Parameters of the model at full width with `units` cut (none when that leaves no attention or no MLP)."""
    whole, attention, mlp = split_units(units, sublayers)
    layers = shape.num_layers - len(whole)
    attention_layers, mlp_layers = layers - len(attention), layers - len(mlp)
    if attention_layers < 1 or mlp_layers < 1:
        return 0
    return count_params(shape, hidden=shape.hidden_size, heads=attention_layers * shape.num_heads,
                        kv_heads=attention_layers * shape.num_kv_heads, neurons=mlp_layers * shape.intermediate_size,
                        attention_layers=attention_layers, mlp_layers=mlp_layers)


def without_sublayers(alive: MaskSet, attention: Sequence[int], mlp: Sequence[int]) -> MaskSet:
    """`alive` with the `attention` layers' heads and KV heads and the `mlp` layers' neurons cut."""
    masks = alive.clone()
    for layer in attention:
        masks.head_mask[layer] = 0
        masks.kv_mask[layer] = 0
    for layer in mlp:
        masks.neuron_mask[layer] = 0
    return masks


def cut_counts(depth: str | int, num_layers: int, forced: int, progress: float,
               fits: Callable[[int], bool], removed: int = 0) -> list[int]:
    """How many of the `num_layers` layers (or units) the candidates of one shape choice cut, by `pruning.depth`.

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
    """The `count` layers (or units) a candidate cuts: the `forced` ones (already gone), then the lowest in
    `order`."""
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
    read = score_reader(scores)
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
