"""LLaMA, Mistral and Qwen2 models whose layers keep different sizes (the `per_layer` export), registered with
the Auto classes.

The config is transformers' own heterogeneous format: global sizes plus `per_layer_config`, a map from
layer index to the attributes that differ. A layer may lose its attention (0 query and 0 KV heads) or its MLP
(intermediate_size 0) whole: it then has neither the sublayer's weights nor the norm in front of it. transformers'
Llama, Mistral and Qwen2 modeling (5.x, checked on 5.25) do not build such a config; `import pipeline` registers
small classes that do (model types `apt_llama`, `apt_mistral`, `apt_qwen2`), so `AutoModelForCausalLM` loads the
export without `trust_remote_code`. Where the pipeline is not installed, the export's own copy of this file
(`modeling_apt.py`, named by the config's `auto_map`) builds it with `trust_remote_code=True`: it imports only
torch, transformers and huggingface_hub. Only the layer construction differs from the base family's
`...ForCausalLM`; one mixin pair serves all three families.
"""

from __future__ import annotations

import copy

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer


class HeterogeneousConfig:
    """Mixin for a family's config: head_dim is explicit in a pruned model, so hidden_size need not be a
    multiple of the head count; each layer's own view is checked."""

    def validate_architecture(self):
        """Only the GQA grouping constrains the sizes: query heads a multiple of KV heads, in every layer; a layer
        whose attention is cut has 0 of each."""
        if self.is_heterogeneous:
            for layer_config in self.per_layer_config:
                layer_config.validate_architecture()
            return
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if heads == kv_heads == 0:
            return
        if not heads or not kv_heads or heads % kv_heads:
            raise ValueError(f"num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads "
                             f"({kv_heads}), or both 0 (the layer's attention cut)")


class CutAttention(nn.Module):
    """A layer's attention cut whole: with no o_proj bias (the export refuses to cut one) it adds nothing."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return hidden_states.new_zeros(()), None  # broadcast in the residual add: no [batch, seq, hidden] zeros


class CutMLP(nn.Module):
    """A layer's MLP cut whole: with no down_proj bias (the export refuses to cut one) it adds nothing."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.new_zeros(())


class HeterogeneousForCausalLM:
    """Mixin for a family's `...ForCausalLM`: each decoder layer is built from its own view of the config."""

    decoder_layer: type[nn.Module]

    def __init__(self, config):
        super().__init__(_global_sizes(config))
        layer_configs = [config.per_layer_config[index] for index in range(config.num_hidden_layers)]
        attending = [index for index, layer in enumerate(layer_configs) if layer.num_attention_heads]
        if len(attending) < len(layer_configs):
            _check_one_cache_type(config)
        self.model.layers = nn.ModuleList(self._decoder_layer(layer, i) for i, layer in enumerate(layer_configs))
        for ordinal, index in enumerate(attending):
            attention = self.model.layers[index].self_attn
            # Attention reads only the attention implementation from its config at run time: share the model's,
            # so the choice transformers makes at load time (sdpa, eager) reaches every layer.
            attention.config = self.model.config
            # The cache reads the sequence length from its layer 0 (`Cache.get_seq_length`): were layer 0's attention
            # cut, that cache layer would stay empty and a decode step would get position 0. Numbering the
            # attentions that remain 0, 1, 2, ... gives cache layer 0 to a real one.
            attention.layer_idx = ordinal
        self.config = config
        self.post_init()

    def _decoder_layer(self, layer_config: PreTrainedConfig, index: int) -> nn.Module:
        """The family's decoder layer, its attention or MLP (with the norm before it) swapped out where cut."""
        attention, mlp = layer_config.num_attention_heads > 0, layer_config.intermediate_size > 0
        if attention and mlp:
            return self.decoder_layer(layer_config, index)
        buildable = copy.copy(layer_config)  # the family's layer needs nonzero sizes: the smallest, thrown away
        if not attention:
            buildable.num_attention_heads = buildable.num_key_value_heads = 1
        if not mlp:
            buildable.intermediate_size = 1
        layer = self.decoder_layer(buildable, index)
        if not attention:
            layer.self_attn, layer.input_layernorm = CutAttention(), nn.Identity()
        if not mlp:
            layer.mlp, layer.post_attention_layernorm = CutMLP(), nn.Identity()
        return layer

    def _get_static_cache_init_shape(self):
        """None (a static cache then sizes each layer at its first update) where attentions are renumbered: the
        per-layer KV head counts transformers would read belong to the layers, not to the renumbered attentions."""
        if any(isinstance(layer.self_attn, CutAttention) for layer in self.model.layers):
            return None
        return super()._get_static_cache_init_shape()


def _check_one_cache_type(config: PreTrainedConfig) -> None:
    """Renumbered attentions (a cut one) use other layers' cache slots, so every layer must share one cache type."""
    layer_types = getattr(config, "layer_types", None) or []
    if len(set(layer_types)) > 1:
        raise ValueError(f"a layer's attention is cut, but the layers mix attention types {sorted(set(layer_types))} "
                         f"(sliding windows): the remaining attentions could not share the KV cache's slots")


def _global_sizes(config: PreTrainedConfig) -> PreTrainedConfig:
    """A homogeneous copy (layer sizes from the global fields) for the parts every layer shares."""
    uniform = copy.copy(config)
    uniform.__dict__.pop("_heterogeneity_spec", None)
    uniform.__dict__.pop("per_layer_config", None)
    return uniform


def _heterogeneous(name: str, config_base: type[PreTrainedConfig], model_base: type[PreTrainedModel],
                   decoder_layer: type[nn.Module]) -> tuple[type, type]:
    """The config and causal-LM classes `Apt{name}Config` / `Apt{name}ForCausalLM` (model type `apt_{name}`)."""
    namespace = {"__module__": __name__, "model_type": f"apt_{name.lower()}"}
    config_class = strict(type(f"Apt{name}Config", (HeterogeneousConfig, config_base), namespace))
    model_namespace = {"__module__": __name__, "config_class": config_class, "decoder_layer": decoder_layer}
    return config_class, type(f"Apt{name}ForCausalLM", (HeterogeneousForCausalLM, model_base), model_namespace)


AptLlamaConfig, AptLlamaForCausalLM = _heterogeneous("Llama", LlamaConfig, LlamaForCausalLM, LlamaDecoderLayer)
AptMistralConfig, AptMistralForCausalLM = _heterogeneous("Mistral", MistralConfig, MistralForCausalLM,
                                                         MistralDecoderLayer)
AptQwen2Config, AptQwen2ForCausalLM = _heterogeneous("Qwen2", Qwen2Config, Qwen2ForCausalLM, Qwen2DecoderLayer)

HETEROGENEOUS = {"llama": (AptLlamaConfig, AptLlamaForCausalLM),
                 "mistral": (AptMistralConfig, AptMistralForCausalLM),
                 "qwen2": (AptQwen2Config, AptQwen2ForCausalLM)}
"""Base model type -> the (config, model) classes its per-layer export is written and loaded as."""


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know `apt_llama`, `apt_mistral` and `apt_qwen2` (idempotent)."""
    for config_class, model_class in HETEROGENEOUS.values():
        try:
            AutoConfig.register(config_class.model_type, config_class)
            AutoModelForCausalLM.register(config_class, model_class)
        except ValueError:  # already registered in this process
            pass
