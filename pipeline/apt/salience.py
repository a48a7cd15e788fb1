"""Outlier-aware salience from running sums, mergeable across batches and ranks (docs/design.md §3).

Per channel c of a block's activation H (taken before its mask, with ∂L/∂H of that same tensor):
`S_c = Σ|∂L/∂H_c| · Σ|H_c| + sqrt(Kurt(H_c))`, Kurt = m4 / m2² (Pearson) of H itself — the seeds' form, not the
official APT code's kurtosis of W_:j ∘ X_j — because raw moment sums merge exactly under one SUM all-reduce.
A residual channel is scored at every sublayer output separately (one row of sums per site: o_proj and down_proj
outputs, 2L sites, the embedding output not among them) and its score is the sum of the per-site scores, never a
product of sums pooled over sites. Nothing is stored per token: hooks add to per-channel sums.

The same sums score the other activation criteria (`pruning.criterion`): `taylor` is |Σ H_c · ∂L/∂H_c| summed over
a block's channels before the absolute value (the first-order loss change of zeroing the block, LLM-Pruner's
group Taylor), `activation` the mean square of H_c (Minitron's activation norm).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial

import torch
from torch import nn

from pipeline.apt.adapters import ChannelMask
from pipeline.apt.blocks import ModelShape

BLOCKS = ("attention", "mlp", "hidden")
STATS = ("act_abs", "grad_abs", "act_grad", "count", "sum1", "sum2", "sum3", "sum4")
"""Σ|H|, Σ|∂L/∂H|, ΣH·∂L/∂H, n, Σx, Σx², Σx³, Σx⁴ per channel (n per row: every channel of a row sees the same
tokens). ΣH·∂L/∂H is summed only for the `taylor` criterion (`SalienceAccumulator(products=True)`)."""
ACTIVATION_CRITERIA = ("apt", "taylor", "activation")
"""`pruning.criterion` values scored from these sums; `magnitude` and `random` need no activations."""
ACTIVATION_STATS = ("act_abs", "sum1", "sum2", "sum3", "sum4")
"""The rows of `power_sums`, in order."""


@dataclass
class SalienceScores:
    """Block salience: per query head [L, n_q], per neuron [L, f], per residual channel [d]."""

    head: torch.Tensor
    neuron: torch.Tensor
    hidden: torch.Tensor

    def to(self, device: torch.device | str) -> SalienceScores:
        return SalienceScores(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def ema_update(prev: SalienceScores | None, new: SalienceScores, momentum: float) -> SalienceScores:
    """`momentum · prev + (1 − momentum) · new`; the first update (prev None) is `new` itself."""
    if prev is None:
        return new
    return SalienceScores(
        **{f.name: momentum * getattr(prev, f.name) + (1 - momentum) * getattr(new, f.name) for f in fields(new)}
    )


def kurtosis_from_moments(
    count: torch.Tensor, sum1: torch.Tensor, sum2: torch.Tensor, sum3: torch.Tensor, sum4: torch.Tensor
) -> torch.Tensor:
    """Pearson kurtosis m4 / m2² from raw power sums (float64); 0 where a channel has no spread or no data."""
    n = count.clamp_min(1)
    mean = sum1 / n
    raw2, raw3, raw4 = sum2 / n, sum3 / n, sum4 / n
    m2 = raw2 - mean**2
    m4 = raw4 - 4 * mean * raw3 + 6 * mean**2 * raw2 - 3 * mean**4
    has_spread = m2 > 0
    safe_m2 = torch.where(has_spread, m2, torch.ones_like(m2))
    return torch.where(has_spread, m4 / safe_m2**2, torch.zeros_like(m2))


@torch.no_grad()
def power_sums(h: torch.Tensor) -> torch.Tensor:
    """Σ|x|, Σx, Σx², Σx³, Σx⁴ over the rows of a [tokens, C] batch, as float64 [5, C] on its device.

    Float64 throughout, since central moments come from raw sums by cancellation. Two [tokens, C] buffers,
    overwritten in place, serve every power: a fresh buffer per power (allocation, page faults) cost more.
    """
    x = h.to(torch.float64, copy=True)  # ours to overwrite, whatever h's dtype
    power = x * x
    sum1, sum2 = x.sum(0), power.sum(0)
    sum3 = power.mul_(x).sum(0)  # power now holds x³
    sum4 = power.mul_(x).sum(0)  # and now x⁴
    return torch.stack([x.abs_().sum(0), sum1, sum2, sum3, sum4])


class SalienceAccumulator:
    """Per-channel sums for the attention (o_proj input), mlp (down_proj input) and hidden (residual) blocks;
    the hidden block has one row per sublayer output (`hidden_sites`).

    `attach(model)` hooks every `ChannelMask` of an APT-wrapped model; `pack()` gives one flat float64 buffer
    for a single SUM all-reduce, `load_packed()` takes the reduced buffer back. Collect without activation
    checkpointing: its recomputed forward would count activations twice.
    """

    def __init__(self, shape: ModelShape, device: torch.device | str | None = None, products: bool = False,
                 after_mask: bool = False, outlier: bool = True):
        self.shape = shape
        self.products = products
        """Also sum H·∂L/∂H (the `taylor` criterion): each hooked activation is kept until its gradient arrives."""
        self.after_mask = after_mask
        """Sum the gradient of the mask's output m⊙H instead of its input H (`pruning.salience_gradient`)."""
        self.outlier = outlier
        """The apt criterion adds sqrt(kurtosis) (`apt.outlier_term`)."""
        self.enabled = True
        self.grad_scale = 1.0
        """Divisor for captured gradients: the fp16 loss scale, so sums hold true gradients."""
        channels = {
            "attention": (shape.num_layers, shape.num_heads * shape.head_dim),
            "mlp": (shape.num_layers, shape.intermediate_size),
            # One row per site: row 2l the attention output (o_proj) of layer l, row 2l + 1 its MLP output.
            "hidden": (hidden_sites(shape), shape.hidden_size),
        }
        self.sums = {
            block: {
                stat: torch.zeros(rows if stat == "count" else (rows, width), dtype=torch.float64, device=device)
                for stat in STATS
            }
            for block, (rows, width) in channels.items()
        }
        self._handles = []
        self._pending: dict[tuple[str, int], torch.Tensor | None] = {}
        """after_mask: a counted input's activations (for the products) until its mask's output is hooked."""

    # ---- accumulation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def add_activations(self, block: str, row: int, h: torch.Tensor) -> None:
        """Add a batch of activations [..., C] of one block row to the sums."""
        sums = self.sums[block]
        flat = h.detach().reshape(-1, h.shape[-1])
        batch_sums = power_sums(flat).to(sums["sum1"].device)  # one transfer for all five
        sums["count"][row] += flat.shape[0]
        for stat, batch_sum in zip(ACTIVATION_STATS, batch_sums, strict=True):
            sums[stat][row] += batch_sum

    @torch.no_grad()
    def add_gradients(self, block: str, row: int, grad: torch.Tensor, h: torch.Tensor | None = None) -> None:
        """Add a batch of gradients ∂L/∂H [..., C] of one block row, divided by `grad_scale`; with the
        activations `h` of the same tokens, also their products."""
        sums = self.sums[block]
        flat = grad.reshape(-1, grad.shape[-1]).float()
        sums["grad_abs"][row] += flat.abs().sum(0).to(sums["grad_abs"].device, torch.float64) / self.grad_scale
        if h is not None:
            products = (h.reshape(flat.shape).to(torch.float64) * flat.to(torch.float64)).sum(0)
            sums["act_grad"][row] += products.to(sums["act_grad"].device) / self.grad_scale

    # ---- hooks --------------------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Hook every mask site of an APT-wrapped model (`inject_adapters`) but the embedding output's."""
        if self._handles:
            raise RuntimeError("the accumulator is already attached")
        for name, module in model.named_modules():
            if isinstance(module, ChannelMask):
                row = _site_row(name, module)
                if row is None:
                    continue
                self._handles.append(module.register_forward_pre_hook(partial(self._on_mask_input, module.block, row)))
                if self.after_mask:
                    self._handles.append(module.register_forward_hook(partial(self._on_mask_output, module.block,
                                                                              row)))
        if not self._handles:
            raise ValueError("the model has no mask sites; call inject_adapters first")

    def detach(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending = {}

    def _on_mask_input(self, block: str, row: int, module: nn.Module, args: tuple) -> tuple | None:
        # Only passes that will be differentiated count (evaluation under no_grad does not), so the
        # activation and gradient sums describe the same tokens.
        if not self.enabled or not torch.is_grad_enabled():
            return None
        (h,) = args
        if not h.requires_grad:
            # Nothing upstream trains (e.g. the frozen embedding), so autograd would never form ∂L/∂H: make H a
            # leaf that requires grad; the graph below it is unchanged.
            h = h.detach().requires_grad_()
        self.add_activations(block, row, h)
        held = h.detach() if self.products else None
        if self.after_mask:
            self._pending[(block, row)] = held
        else:
            h.register_hook(partial(self._on_grad, block, row, held))
        return (h,)

    def _on_mask_output(self, block: str, row: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        # The pre-hook of this same call counted the input; its gradient is taken here, after the mask.
        if (block, row) in self._pending:
            output.register_hook(partial(self._on_grad, block, row, self._pending.pop((block, row))))

    def _on_grad(self, block: str, row: int, h: torch.Tensor | None, grad: torch.Tensor) -> None:
        self.add_gradients(block, row, grad, h)

    # ---- merge, checkpoint --------------------------------------------------------------------------------

    def _tensors(self) -> list[torch.Tensor]:
        return [self.sums[block][stat] for block in BLOCKS for stat in STATS]

    def pack(self) -> torch.Tensor:
        """Every sum in one flat float64 tensor, in a fixed order, for one SUM all-reduce."""
        return torch.cat([t.reshape(-1) for t in self._tensors()])

    @torch.no_grad()
    def load_packed(self, flat: torch.Tensor) -> None:
        """Replace every sum by the matching slice of a `pack()`-shaped buffer (e.g. after the all-reduce)."""
        tensors = self._tensors()
        expected = sum(t.numel() for t in tensors)
        if flat.numel() != expected:
            raise ValueError(f"packed buffer has {flat.numel()} elements; expected {expected}")
        for tensor, chunk in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            tensor.copy_(chunk.view_as(tensor))

    @torch.no_grad()
    def reset(self) -> None:
        """Zero every sum."""
        for tensor in self._tensors():
            tensor.zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the sums, keyed `"<block>.<stat>"`."""
        return {f"{block}.{stat}": self.sums[block][stat].clone() for block in BLOCKS for stat in STATS}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load sums saved by `state_dict` (same keys and shapes)."""
        expected = {f"{block}.{stat}" for block in BLOCKS for stat in STATS}
        if set(state) != expected:
            raise KeyError(
                f"salience state keys differ: missing {sorted(expected - set(state))}, "
                f"unexpected {sorted(set(state) - expected)}"
            )
        for key, value in state.items():
            block, stat = key.split(".")
            target = self.sums[block][stat]
            if value.shape != target.shape:
                raise ValueError(f"{key} has shape {tuple(value.shape)}; expected {tuple(target.shape)}")
            target.copy_(value)

    # ---- scores -------------------------------------------------------------------------------------------

    def channel_scores(self, block: str, criterion: str = "apt") -> torch.Tensor:
        """Per channel of a block, [rows, C] float64. apt: S_c = Σ|∂L/∂H_c|·Σ|H_c| + sqrt(Kurt(H_c));
        taylor: ΣH_c·∂L/∂H_c (signed: `scores` takes the absolute value per block); activation: mean H_c²."""
        sums = self.sums[block]
        if criterion == "taylor":
            return sums["act_grad"]
        if criterion == "activation":
            return sums["sum2"] / sums["count"].clamp_min(1)[:, None]
        if criterion != "apt":
            raise ValueError(f"criterion {criterion!r} is not scored from activations; one of {ACTIVATION_CRITERIA}")
        first_order = sums["grad_abs"] * sums["act_abs"]
        if not self.outlier:
            return first_order
        kurtosis = kurtosis_from_moments(sums["count"][:, None], sums["sum1"], sums["sum2"], sums["sum3"], sums["sum4"])
        # Rounding can leave a tiny negative m4 for near-constant channels.
        return first_order + kurtosis.clamp_min(0).sqrt()

    def scores(self, criterion: str = "apt") -> SalienceScores:
        """Block salience: a query head sums its head_dim channels, a residual channel its per-site scores
        (`taylor`: the absolute value of each block's sum, the first-order change of zeroing all of it)."""
        if criterion == "taylor" and not self.products:
            raise ValueError("the taylor criterion needs SalienceAccumulator(products=True)")
        shape = self.shape
        head = self.channel_scores("attention", criterion).view(shape.num_layers, shape.num_heads,
                                                                shape.head_dim).sum(-1)
        scores = SalienceScores(head=head, neuron=self.channel_scores("mlp", criterion),
                                hidden=self.channel_scores("hidden", criterion).sum(0))
        if criterion == "taylor":
            scores = SalienceScores(head=scores.head.abs(), neuron=scores.neuron.abs(), hidden=scores.hidden.abs())
        return scores


def hidden_sites(shape: ModelShape) -> int:
    """Rows of hidden sums: the attention and the MLP output of every layer (docs/design.md §3)."""
    return 2 * shape.num_layers


def _site_row(name: str, module: ChannelMask) -> int | None:
    """The accumulator row a mask site adds to; None for the embedding output, which is not a salience site.

    Hidden sites are told apart by the projection they mask: `...o_proj.out_mask` (row 2l) and
    `...down_proj.out_mask` (row 2l + 1), as `inject_adapters` names them.
    """
    if module.block != "hidden":
        return module.layer
    if module.layer is None:
        return None
    if name.endswith("o_proj.out_mask"):
        return 2 * module.layer
    if name.endswith("down_proj.out_mask"):
        return 2 * module.layer + 1
    raise ValueError(f"{name}: a hidden mask site that is neither an o_proj nor a down_proj output")
