"""Prunable blocks of a LLaMA-family decoder and exact parameter accounting (DESIGN.md §2)."""

from __future__ import annotations

from dataclasses import dataclass

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
    """Qwen2 has biases on q/k/v; LLaMA and Mistral have none."""

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
        qkv_bias = model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            tie_word_embeddings=bool(config.tie_word_embeddings),
            qkv_bias=qkv_bias,
        )
