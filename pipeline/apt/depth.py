"""Whole decoder layers as prunable units: ShortGPT's block influence from mergeable sums (docs/design.md §6).

Block influence of layer l is `BI_l = 1 − mean_t cos(x_l,t, y_l,t)`, x the layer's input hidden state and y its
output, over every token seen: a layer whose output is nearly its input changes the residual stream least. Each
rank keeps, per layer, Σ cos and the token count, so one SUM all-reduce gives what one process computes on all the
batches. Nothing is stored per token.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


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
