"""LLaMA, Mistral and Qwen2 models whose layers keep different sizes (the `per_layer` export), registered with
the Auto classes.

The config is transformers' own heterogeneous format: global sizes plus `per_layer_config`, a map from
layer index to the attributes that differ. transformers 5.23's Llama, Mistral and Qwen2 modeling do not build
such a config yet; `import pipeline` registers small classes that do (model types `apt_llama`, `apt_mistral`,
`apt_qwen2`), so `AutoModelForCausalLM` loads the export without `trust_remote_code`. Where the pipeline is not
installed, the export's own copy of this file (`modeling_apt.py`, named by the config's `auto_map`) builds it with
`trust_remote_code=True`: it imports only torch, transformers and huggingface_hub. Only the layer construction
differs from the base family's `...ForCausalLM`; one mixin pair serves all three families.
"""

from __future__ import annotations

import copy

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
        """Only the GQA grouping constrains the sizes: query heads a multiple of KV heads, in every layer."""
        if self.is_heterogeneous:
            for layer_config in self.per_layer_config:
                layer_config.validate_architecture()
        elif self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")


class HeterogeneousForCausalLM:
    """Mixin for a family's `...ForCausalLM`: each decoder layer is built from its own view of the config."""

    decoder_layer: type[nn.Module]

    def __init__(self, config):
        super().__init__(_global_sizes(config))
        self.model.layers = nn.ModuleList(
            self.decoder_layer(config.per_layer_config[index], index) for index in range(config.num_hidden_layers)
        )
        for layer in self.model.layers:
            # Attention reads only the attention implementation from its config at run time: share the model's,
            # so the choice transformers makes at load time (sdpa, eager) reaches every layer.
            layer.self_attn.config = self.model.config
        self.config = config
        self.post_init()


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
