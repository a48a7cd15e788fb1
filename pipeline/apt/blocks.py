"""Prunable blocks of a LLaMA-family decoder and exact parameter accounting (docs/design.md §2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.apt.masks import MaskSet

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a LLaMA-family decoder that pruning and accounting need."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    """Query heads per layer (n_q)."""
    num_kv_heads: int
    """Key/value heads per layer (n_kv); n_q / n_kv query heads share one."""
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    qkv_bias: bool
    """Biases on q/k/v: Qwen2 always, LLaMA with attention_bias=True, Mistral never."""
    o_proj_bias: bool = False
    """Bias on o_proj: only LLaMA with attention_bias=True (Qwen2's o_proj has none)."""

    @property
    def group_size(self) -> int:
        """g: query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """Read the shape from a `transformers` config; refuse architectures we do not handle."""
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if getattr(config, "mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported (no LLaMA-family checkpoint uses it)")
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        # Only LLaMA's modeling code reads attention_bias, and there it covers o_proj too.
        llama_bias = model_type == "llama" and bool(getattr(config, "attention_bias", False))
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            tie_word_embeddings=bool(config.tie_word_embeddings),
            qkv_bias=model_type == "qwen2" or llama_bias,
            o_proj_bias=llama_bias,
        )


@dataclass(frozen=True)
class KeptSizes:
    """Kept hidden channels, and per layer the kept query heads, KV heads and MLP neurons."""

    hidden: int
    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    neurons: tuple[int, ...]

    @property
    def cut_layers(self) -> list[int]:
        """Layers that keep no query head and no neuron: cut whole (`pruning.depth`), absent from the export."""
        return [layer for layer, (heads, neurons) in enumerate(zip(self.heads, self.neurons, strict=True))
                if heads == 0 and neurons == 0]

    @property
    def cut_attention(self) -> list[int]:
        """Layers that lose their attention alone (`pruning.depth_unit=sublayer`): no query head, some neurons."""
        return [layer for layer, (heads, neurons) in enumerate(zip(self.heads, self.neurons, strict=True))
                if heads == 0 < neurons]

    @property
    def cut_mlp(self) -> list[int]:
        """Layers that lose their MLP alone: no neuron, some query heads."""
        return [layer for layer, (heads, neurons) in enumerate(zip(self.heads, self.neurons, strict=True))
                if neurons == 0 < heads]

    @property
    def attention_layers(self) -> int:
        """Layers that keep their attention (a layer may lose it alone under `pruning.depth_unit=sublayer`)."""
        return sum(heads > 0 for heads in self.heads)

    @property
    def mlp_layers(self) -> int:
        """Layers that keep their MLP."""
        return sum(neurons > 0 for neurons in self.neurons)

    @classmethod
    def full(cls, shape: ModelShape) -> KeptSizes:
        """The unpruned sizes."""
        layers = shape.num_layers
        return cls(
            hidden=shape.hidden_size,
            heads=(shape.num_heads,) * layers,
            kv_heads=(shape.num_kv_heads,) * layers,
            neurons=(shape.intermediate_size,) * layers,
        )


def count_params(shape: ModelShape, *, hidden, heads, kv_heads, neurons, attention_layers: int | None = None,
                 mlp_layers: int | None = None):
    """Exact parameter count for kept `hidden` and kept heads / KV heads / neurons summed over the layers, of which
    `attention_layers` keep their attention and `mlp_layers` their MLP (default all; a sublayer that leaves takes
    its norm with it, a layer masked whole both, `masks.empty_layers`).

    The count is linear in the per-layer sizes, so layer totals suffice; works on ints and on tensors alike.
    """
    attention_layers = shape.num_layers if attention_layers is None else attention_layers
    mlp_layers = shape.num_layers if mlp_layers is None else mlp_layers
    embeddings = shape.vocab_size * (1 if shape.tie_word_embeddings else 2)
    norms = attention_layers + mlp_layers + 1
    o_biases = attention_layers if shape.o_proj_bias else 0
    # q rows + o columns per query head, k + v rows per KV head, gate + up rows + down column per neuron.
    per_hidden_channel = embeddings + norms + o_biases + 2 * shape.head_dim * (heads + kv_heads) + 3 * neurons
    qkv_biases = shape.head_dim * (heads + 2 * kv_heads) if shape.qkv_bias else 0
    return hidden * per_hidden_channel + qkv_biases


def remaining_params(shape: ModelShape, kept: KeptSizes) -> int:
    """Parameters of the model physically pruned to `kept` (docs/design.md §2's exact formula)."""
    for name in ("heads", "kv_heads", "neurons"):
        if len(getattr(kept, name)) != shape.num_layers:
            raise ValueError(f"kept.{name} has {len(getattr(kept, name))} entries, expected {shape.num_layers}")
    return count_params(shape, hidden=kept.hidden, heads=sum(kept.heads), kv_heads=sum(kept.kv_heads),
                        neurons=sum(kept.neurons), attention_layers=kept.attention_layers, mlp_layers=kept.mlp_layers)


def total_params(shape: ModelShape) -> int:
    """Parameters of the unpruned model."""
    return remaining_params(shape, KeptSizes.full(shape))


def params_per_query_head(shape: ModelShape) -> int:
    """Parameters one query head owns at full size: its q rows, o columns and q bias."""
    return 2 * shape.hidden_size * shape.head_dim + (shape.head_dim if shape.qkv_bias else 0)


def params_per_group(shape: ModelShape) -> int:
    """Parameters one KV group owns at full size: its g query heads plus its k and v rows (and biases)."""
    kv_head = 2 * shape.hidden_size * shape.head_dim + (2 * shape.head_dim if shape.qkv_bias else 0)
    return shape.group_size * params_per_query_head(shape) + kv_head


def params_per_neuron(shape: ModelShape) -> int:
    """Parameters one SwiGLU neuron owns at full size: gate row, up row, down column."""
    return 3 * shape.hidden_size


def params_per_hidden_channel(shape: ModelShape) -> int:
    """Parameters one residual channel owns at full size, across embeddings, norms and every layer."""
    layers = shape.num_layers
    full = dict(
        heads=layers * shape.num_heads, kv_heads=layers * shape.num_kv_heads, neurons=layers * shape.intermediate_size
    )
    # The count is affine in the hidden size; its slope is what one channel owns.
    return count_params(shape, hidden=1, **full) - count_params(shape, hidden=0, **full)


def kept_sizes(masks: MaskSet) -> KeptSizes:
    """Count the blocks still present (mask > 0); for binary masks these are the kept ones."""
    return KeptSizes(
        hidden=int((masks.hidden_mask > 0).sum()),
        heads=tuple((masks.head_mask > 0).sum(dim=1).tolist()),
        kv_heads=tuple((masks.kv_mask > 0).sum(dim=1).tolist()),
        neurons=tuple((masks.neuron_mask > 0).sum(dim=1).tolist()),
    )
