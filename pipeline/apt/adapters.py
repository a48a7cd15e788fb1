"""Masked low-rank adapters for LLaMA-family decoders: injection, masks, rank growth, merge (docs/design.md §2, §5).

`inject_adapters` wraps every q/k/v/o/gate/up/down projection in an `APTLinear`, swaps every RMSNorm for a
`MaskedRMSNorm` and the embedding for a `MaskedEmbedding`. The pruning masks live once, in `model.apt_masks`
(a `MaskStore`); the wrappers read the row they need by layer index. With binary masks the wrapped model
computes what the physically sliced model (`slicing.slice_model`) computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.apt.blocks import ModelShape
from pipeline.apt.masks import MaskSet

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
MASK_NAMES = ("head_mask", "kv_mask", "neuron_mask", "hidden_mask")


class MaskStore(nn.Module):
    """The model's one copy of the pruning masks, as float32 buffers (saved, moved and broadcast with it)."""

    def __init__(self, masks: MaskSet):
        super().__init__()
        self.replace(masks)

    def replace(self, masks: MaskSet) -> None:
        """Install new mask tensors, shapes included (after compaction the shapes shrink), on the store's device."""
        for name in MASK_NAMES:
            current = self._buffers.get(name)
            device = current.device if current is not None else None
            self.register_buffer(name, getattr(masks, name).detach().to(device, torch.float32, copy=True))

    def _apply(self, fn, recurse=True):
        # Casting the model (`.bfloat16()`, DeepSpeed's bf16/fp16 setup) must move the masks but keep them float32
        # and exact: a gradual step of 0.01 is not representable in bf16.
        originals = {name: self._buffers[name] for name in MASK_NAMES}
        super()._apply(fn, recurse)
        for name, original in originals.items():
            self._buffers[name] = original.to(self._buffers[name].device)
        return self

    def as_mask_set(self) -> MaskSet:
        """A detached copy of the masks."""
        return MaskSet(**{name: getattr(self, name).detach().clone() for name in MASK_NAMES})


def _keep_reference(module: nn.Module, store: MaskStore) -> None:
    # A plain attribute, not a child: the store is registered once, on the model, so its buffers are
    # saved and moved once, while every wrapper still sees the current tensors.
    module.__dict__["store"] = store


class ChannelMask(nn.Module):
    """Multiplies the last dimension by one row of the model's masks.

    Its input is the block's activation H before masking, so salience hooks attach here (`block`, `layer`).
    """

    def __init__(self, store: MaskStore, block: str, layer: int | None, head_dim: int | None = None):
        super().__init__()
        _keep_reference(self, store)
        self.block = block
        self.layer = layer
        self.head_dim = head_dim

    def mask(self) -> torch.Tensor:
        """The mask row this site applies: per query head, per neuron, or per residual channel."""
        if self.block == "attention":
            return self.store.head_mask[self.layer]
        if self.block == "mlp":
            return self.store.neuron_mask[self.layer]
        return self.store.hidden_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask().to(x.dtype)
        if self.block == "attention":
            # One value per query head, spread over that head's head_dim channels without materialising it.
            return (x.unflatten(-1, (-1, self.head_dim)) * mask[:, None]).flatten(-2)
        return x * mask

    def extra_repr(self) -> str:
        return f"block={self.block}, layer={self.layer}"


class APTLinear(nn.Module):
    """`y = m_out ⊙ (base(m_in ⊙ x) + s·B·A(m_in ⊙ x))` around a frozen `nn.Linear`; rank 0 means masks only.

    The base layer is called, never read, so ZeRO-3 can gather its weight in the base's own forward hooks.
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        rank: int = 0,
        alpha: float = 1.0,
        dropout: float = 0.0,
        in_mask: ChannelMask | None = None,
        out_mask: ChannelMask | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.in_mask = in_mask
        self.out_mask = out_mask
        self.rank = rank
        # s = alpha / r with r the initial rank, fixed for the adapter's life: growth then leaves outputs unchanged.
        self.scaling = alpha / rank if rank else 0.0
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # (A, B) used instead of the trained pair during a teacher forward (`distill.teacher_mode`). Plain tensors,
        # not parameters: DeepSpeed never partitions or steps them, and the trained parameters stay untouched.
        self.teacher_lora: tuple[torch.Tensor, torch.Tensor] | None = None
        if rank:
            factory = {"dtype": base.weight.dtype, "device": base.weight.device}
            self.lora_A = nn.Parameter(_init_lora_rows(rank, self.in_features, generator, **factory))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        else:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
        self.train(base.training)  # a new module starts in training mode; follow the model's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_mask is not None:
            x = self.in_mask(x)
        y = self.base(x)
        if self.teacher_lora is not None:
            teacher_A, teacher_B = self.teacher_lora
            y = y + self.scaling * F.linear(F.linear(x, teacher_A), teacher_B)
        elif self.lora_A is not None:
            y = y + self.scaling * F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        if self.out_mask is not None:
            y = self.out_mask(y)
        return y

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def _init_lora_rows(rows: int, in_features: int, generator: torch.Generator | None, *, dtype: torch.dtype,
                    device: torch.device, draw_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of A drawn like an `nn.Linear` weight (Kaiming-uniform, a=√5), as LoRA does.

    Drawn on the CPU, where a seeded `torch.Generator` lives, in `draw_dtype`, then cast and moved: every rank and
    device gets the same numbers (a CPU generator cannot fill an accelerator's tensor). The draw's dtype matters too:
    a bf16 draw consumes the generator otherwise than an fp32 one.
    """
    rows_of_a = torch.empty(rows, in_features, dtype=draw_dtype)
    nn.init.kaiming_uniform_(rows_of_a, a=math.sqrt(5), generator=generator)
    return rows_of_a.to(device=device, dtype=dtype)


class MaskedRMSNorm(nn.Module):
    """RMSNorm whose mean of squares runs over kept residual channels only; its output is masked too."""

    def __init__(self, norm: nn.Module, store: MaskStore):
        super().__init__()
        _keep_reference(self, store)
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon
        self.plain_class = type(norm)
        self.train(norm.training)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        mask = self.store.hidden_mask
        x = hidden_states.to(torch.float32)
        kept = mask.sum().clamp_min(torch.finfo(torch.float32).tiny)
        # Σ m·x² / Σ m, written as mean(m·x²)·(d / Σ m) so that with every channel kept it is bit-identical
        # to the HF norm (the factor is exactly 1.0).
        variance = (x.pow(2) * mask).mean(-1, keepdim=True) * (mask.numel() / kept)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * (x.to(input_dtype) * mask.to(input_dtype))

    def to_plain(self) -> nn.Module:
        """The architecture's own RMSNorm holding this weight."""
        with torch.device("meta"):
            plain = self.plain_class(self.weight.shape[0], eps=self.variance_epsilon)
        plain.weight = self.weight
        return plain.train(self.training)


class MaskedEmbedding(nn.Embedding):
    """`nn.Embedding` whose output is multiplied by the hidden mask; same weight, so ties and names survive."""

    def __init__(self, embedding: nn.Embedding, store: MaskStore):
        super().__init__(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, device="meta")
        self.weight = embedding.weight
        self.out_mask = ChannelMask(store, "hidden", None)
        self.train(embedding.training)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.out_mask(super().forward(input_ids))

    def to_plain(self) -> nn.Embedding:
        """A plain `nn.Embedding` holding this weight."""
        plain = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device="meta")
        plain.weight = self.weight
        return plain.train(self.training)


def inject_adapters(
    model: nn.Module,
    *,
    targets: list[str] | tuple[str, ...],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Wrap a HF Llama/Mistral/Qwen2 causal LM in place: every base parameter frozen, adapters on `targets`.

    Masks start all ones in `model.apt_masks`; only adapter parameters train.
    """
    unknown = sorted(set(targets) - set(PROJECTIONS))
    if unknown:
        raise ValueError(f"unknown adapter targets {unknown}; choose from {list(PROJECTIONS)}")
    if hasattr(model, "apt_masks"):
        raise ValueError("the model already has APT adapters")
    shape = ModelShape.from_config(model.config)
    decoder = model.model
    model.requires_grad_(False)
    store = MaskStore(MaskSet.ones(shape)).to(decoder.embed_tokens.weight.device).train(model.training)
    model.apt_masks = store

    def wrap(parent: nn.Module, name: str, in_mask=None, out_mask=None) -> None:
        adapter_rank = rank if name in targets else 0
        base = getattr(parent, name)
        wrapped = APTLinear(
            base,
            rank=adapter_rank,
            alpha=alpha,
            dropout=dropout,
            in_mask=in_mask,
            out_mask=out_mask,
            generator=generator,
        )
        setattr(parent, name, wrapped)

    for index, layer in enumerate(decoder.layers):
        attention, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            wrap(attention, name)
        wrap(
            attention,
            "o_proj",
            in_mask=ChannelMask(store, "attention", index, head_dim=shape.head_dim),
            out_mask=ChannelMask(store, "hidden", index),
        )
        for name in ("gate_proj", "up_proj"):
            wrap(mlp, name)
        wrap(mlp, "down_proj", in_mask=ChannelMask(store, "mlp", index), out_mask=ChannelMask(store, "hidden", index))
        layer.input_layernorm = MaskedRMSNorm(layer.input_layernorm, store)
        layer.post_attention_layernorm = MaskedRMSNorm(layer.post_attention_layernorm, store)
    decoder.norm = MaskedRMSNorm(decoder.norm, store)
    decoder.embed_tokens = MaskedEmbedding(decoder.embed_tokens, store)
    return model


def set_masks(model: nn.Module, masks: MaskSet) -> None:
    """Copy `masks` into the model's store (same shapes; gradual values allowed)."""
    store: MaskStore = model.apt_masks
    for name in MASK_NAMES:
        current, new = getattr(store, name), getattr(masks, name)
        if current.shape != new.shape:
            raise ValueError(f"{name} has shape {tuple(new.shape)}; the model's is {tuple(current.shape)}")
        current.copy_(new)


def get_masks(model: nn.Module) -> MaskSet:
    """A copy of the model's current masks."""
    return model.apt_masks.as_mask_set()


def named_adapters(model: nn.Module) -> Iterator[tuple[str, APTLinear]]:
    """Every wrapped projection that carries an adapter (rank > 0), with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, APTLinear) and module.rank > 0:
            yield name, module


@dataclass
class RankGrowth:
    """Adapter parameters before and after `grow_rank`; `new_A[:old_rank]`, `new_B[:, :old_rank]` hold the old ones."""

    old_rank: int
    old_A: nn.Parameter
    new_A: nn.Parameter
    old_B: nn.Parameter
    new_B: nn.Parameter

    def carry(self) -> dict[nn.Parameter, tuple[nn.Parameter, tuple[slice, ...]]]:
        """Old parameter -> (new parameter, where the old values sit in it), as `pipeline.engine` takes it."""
        old_rows = (slice(0, self.old_rank), slice(None))
        old_columns = (slice(None), slice(0, self.old_rank))
        return {self.old_A: (self.new_A, old_rows), self.old_B: (self.new_B, old_columns)}


@torch.no_grad()
def grow_rank(adapter: APTLinear, k: int, generator: torch.Generator | None = None) -> RankGrowth:
    """Add k ranks: k random rows to A, k zero columns to B, so the output does not change.

    The scaling s = alpha / r stays at its initial value (not alpha / new r), which is what keeps outputs equal.
    The parameters are new objects: rebuild the optimizer, carrying old state into the leading rows/columns.
    """
    if adapter.rank == 0:
        raise ValueError("cannot grow an adapter of rank 0 (its scaling is undefined); inject it with rank > 0")
    old_A, old_B = adapter.lora_A, adapter.lora_B
    # Drawn in the adapter's own dtype (the engine's 16-bit one while training), as growth always has.
    new_rows = _init_lora_rows(k, adapter.in_features, generator, dtype=old_A.dtype, device=old_A.device,
                               draw_dtype=old_A.dtype)
    new_columns = torch.zeros(adapter.out_features, k, dtype=old_B.dtype, device=old_B.device)
    adapter.lora_A = nn.Parameter(torch.cat([old_A, new_rows], dim=0), requires_grad=old_A.requires_grad)
    adapter.lora_B = nn.Parameter(torch.cat([old_B, new_columns], dim=1), requires_grad=old_B.requires_grad)
    growth = RankGrowth(adapter.rank, old_A, adapter.lora_A, old_B, adapter.lora_B)
    adapter.rank += k
    return growth


def adapter_salience(adapter: APTLinear) -> torch.Tensor:
    """Σ|θ·∂L/∂θ| over the adapter's parameters (0 before any gradient), as a float32 scalar tensor."""
    terms = [
        (param.detach() * param.grad).abs().sum(dtype=torch.float32)
        for param in (adapter.lora_A, adapter.lora_B)
        if param is not None and param.grad is not None
    ]
    return torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float32)


def adapter_params(adapters: list[tuple[str, APTLinear]]) -> int:
    """Trainable adapter parameters: r·(in + out) per adapter."""
    return sum(adapter.rank * (adapter.in_features + adapter.out_features) for _, adapter in adapters)


def plan_rank_growth(
    adapters: list[tuple[str, APTLinear]],
    salience: dict[str, float],
    *,
    initial_rank: int,
    max_multiplier: int,
    budget_params: int,
) -> dict[str, int]:
    """Ranks to add per adapter: the most salient half grows, one rank each per round, while the budget allows.

    No adapter passes `max_multiplier × initial_rank`, and all adapters together stay within `budget_params`.
    Equal salience is broken by name, so every rank that holds the same salience makes the same plan.
    """
    ranked = sorted(adapters, key=lambda item: (-salience[item[0]], item[0]))
    growing = ranked[: max(1, len(ranked) // 2)]
    free = budget_params - adapter_params(adapters)
    plan = dict.fromkeys((name for name, _ in growing), 0)
    grew = True
    while grew:  # round-robin, most salient first: equal growth when the budget is ample, the top first when not
        grew = False
        for name, adapter in growing:
            cost = adapter.in_features + adapter.out_features
            if adapter.rank + plan[name] < max_multiplier * initial_rank and cost <= free:
                plan[name] += 1
                free -= cost
                grew = True
    return {name: k for name, k in plan.items() if k > 0}


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold W ← W + s·B·A into every base layer and unwrap: the result is a plain HF model (weights stay frozen).

    Masks are not applied; slice the result with the (binary) masks afterwards. Needs full weights (under ZeRO-3,
    gather them first).
    """
    decoder = model.model
    for layer in decoder.layers:
        for parent, names in ((layer.self_attn, ATTENTION_PROJECTIONS), (layer.mlp, MLP_PROJECTIONS)):
            for name in names:
                setattr(parent, name, _merged_linear(getattr(parent, name)))
        layer.input_layernorm = layer.input_layernorm.to_plain()
        layer.post_attention_layernorm = layer.post_attention_layernorm.to_plain()
    decoder.norm = decoder.norm.to_plain()
    decoder.embed_tokens = decoder.embed_tokens.to_plain()
    del model.apt_masks
    return model


def _merged_linear(adapter: APTLinear) -> nn.Linear:
    """The base layer with the adapter's low-rank update added to its weight."""
    base = adapter.base
    if adapter.rank:
        delta = adapter.scaling * (adapter.lora_B.float() @ adapter.lora_A.float())
        base.weight.add_(delta.to(base.weight.dtype))
    return base
