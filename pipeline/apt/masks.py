"""The canonical mask container and gradual masks (docs/design.md §4)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from pipeline.apt.blocks import ModelShape

ATTENTION_MODES = ("kv_group", "query_in_group")


@dataclass
class MaskSet:
    """Float32 masks, 1 = kept; a query head never survives without its KV head."""

    head_mask: torch.Tensor
    """[L, n_q] query heads, applied at the o_proj input."""
    kv_mask: torch.Tensor
    """[L, n_kv] KV heads (k and v rows)."""
    neuron_mask: torch.Tensor
    """[L, f] SwiGLU neurons."""
    hidden_mask: torch.Tensor
    """[d] residual channels, shared by all layers."""

    @classmethod
    def ones(cls, shape: ModelShape) -> MaskSet:
        """Everything kept."""
        layers = shape.num_layers
        return cls(
            head_mask=torch.ones(layers, shape.num_heads),
            kv_mask=torch.ones(layers, shape.num_kv_heads),
            neuron_mask=torch.ones(layers, shape.intermediate_size),
            hidden_mask=torch.ones(shape.hidden_size),
        )

    def clone(self) -> MaskSet:
        """A copy whose tensors can be written without touching these."""
        return MaskSet(**{name: mask.clone() for name, mask in self.to_dict().items()})

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Field name -> tensor, e.g. for safetensors."""
        return {field.name: getattr(self, field.name) for field in fields(self)}

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor]) -> MaskSet:
        """Inverse of `to_dict`; masks come back as float32."""
        return cls(**{field.name: tensors[field.name].float() for field in fields(cls)})

    def check_gqa(self, shape: ModelShape, mode: str) -> None:
        """Raise ValueError unless these (binary; kept: > 0) masks give a model transformers can load. A layer may
        lose its attention (every query and KV head) or its MLP alone (the per-layer export's classes build it) or
        both (the export leaves it out); not every layer its attention, nor every layer its MLP."""
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode {mode!r} is not one of {ATTENTION_MODES}")
        self._check_shapes(shape)
        layers, num_kv, group = shape.num_layers, shape.num_kv_heads, shape.group_size
        heads_in_group = (self.head_mask > 0).reshape(layers, num_kv, group).sum(dim=2)
        kv_kept = self.kv_mask > 0
        removed = empty_layers(self)
        if len(removed) == layers:
            raise ValueError("every layer is removed")
        kept = [layer for layer in range(layers) if layer not in removed]
        with_attention = [layer for layer in kept if bool(kv_kept[layer].any() or heads_in_group[layer].any())]
        if not with_attention:
            raise ValueError("every layer's attention is cut: keep a query head and its KV head in one layer")
        if not any(bool((self.neuron_mask[layer] > 0).any()) for layer in kept):
            raise ValueError("every layer's MLP is cut: keep a neuron in one layer")
        for layer in with_attention:  # the others keep no head at all: their attention leaves the export
            _check_attention(layer, heads_in_group[layer], kv_kept[layer], group, mode)
        if int((self.hidden_mask > 0).sum()) == 0:
            raise ValueError("no hidden channel is kept")

    def _check_shapes(self, shape: ModelShape) -> None:
        layers = shape.num_layers
        expected = {
            "head_mask": (layers, shape.num_heads),
            "kv_mask": (layers, shape.num_kv_heads),
            "neuron_mask": (layers, shape.intermediate_size),
            "hidden_mask": (shape.hidden_size,),
        }
        for name, size in expected.items():
            if tuple(getattr(self, name).shape) != size:
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected {size}")


def _check_attention(layer: int, heads_in_group: torch.Tensor, kv_kept: torch.Tensor, group: int, mode: str) -> None:
    """One layer's kept attention is loadable: query heads only under kept KV heads, grouped as `mode` says."""
    orphans = ((heads_in_group > 0) & ~kv_kept).nonzero().flatten().tolist()
    if orphans:
        raise ValueError(f"layer {layer}: query heads survive in KV groups {orphans} whose KV head is pruned")
    if int(heads_in_group.sum()) == 0:
        raise ValueError(f"layer {layer} keeps no query head but KV heads {kv_kept.nonzero().flatten().tolist()}: "
                         f"cut its attention whole (every KV head too) or keep a query head")
    counts = heads_in_group[kv_kept].unique().tolist()
    if mode == "kv_group" and counts != [group]:
        raise ValueError(f"layer {layer}: kv_group mode keeps whole groups of {group}, got counts {counts}")
    if mode == "query_in_group" and (not bool(kv_kept.all()) or len(counts) != 1):
        raise ValueError(
            f"layer {layer}: query_in_group mode keeps every KV head and the same number of query heads "
            f"in each group, got per-group counts {heads_in_group.tolist()}"
        )


def empty_layers(masks: MaskSet) -> list[int]:
    """Layers whose masks keep no query head, no KV head and no neuron: with no o_proj or down_proj bias in these
    families such a layer adds nothing to the residual stream, so removing it leaves the output unchanged."""
    rows = (masks.head_mask, masks.kv_mask, masks.neuron_mask)
    empty = torch.stack([row.amax(dim=1) <= 0 for row in rows]).all(dim=0)
    return empty.nonzero().flatten().tolist()


def step_toward(current: MaskSet, target: MaskSet, alpha: float) -> MaskSet:
    """Move every entry by at most alpha toward its binary target, landing exactly on it (linear, not exponential).

    float32 rounding can drift by up to half an ulp per step; a slack of that size lets a mask that started
    at 0 or 1 land on its target after ceil(1/alpha) steps.
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return MaskSet(**{name: _step(mask, getattr(target, name), alpha) for name, mask in current.to_dict().items()})


def _step(current: torch.Tensor, target: torch.Tensor, alpha: float) -> torch.Tensor:
    slack = math.ceil(1 / alpha) * torch.finfo(current.dtype).eps
    moved = current + (target - current).clamp(-alpha, alpha)
    return torch.where((moved - target).abs() <= slack, target.to(current.dtype), moved)


def binarize(masks: MaskSet) -> MaskSet:
    """Round gradual masks to 0/1: an entry >= 0.5 is kept (at the end of the window they already are 0/1)."""
    return MaskSet(**{name: (mask >= 0.5).float() for name, mask in masks.to_dict().items()})
