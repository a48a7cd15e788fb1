"""A LLaMA whose layers keep different sizes (the `per_layer` export), registered with the Auto classes.

The config is transformers' own heterogeneous format: global sizes plus `per_layer_config`, a map from
layer index to the attributes that differ. transformers 5.23's Llama modeling does not build such a
config yet; `import pipeline` registers this small class that does, so `AutoModelForCausalLM` loads the
export without `trust_remote_code`. Only the layer construction differs from `LlamaForCausalLM`.
"""

from __future__ import annotations

import copy

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

MODEL_TYPE = "apt_llama"


@strict
class AptLlamaConfig(LlamaConfig):
    model_type = MODEL_TYPE

    def validate_architecture(self):
        """head_dim is explicit in a pruned model, so hidden_size need not be a multiple of the head count."""
        if self.is_heterogeneous:
            for layer_config in self.per_layer_config:
                layer_config.validate_architecture()
        elif self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")


class AptLlamaForCausalLM(LlamaForCausalLM):
    config_class = AptLlamaConfig

    def __init__(self, config: AptLlamaConfig):
        super().__init__(_global_sizes(config))
        # Each decoder layer is built from its own view of the config (its per-layer overrides applied).
        self.model.layers = nn.ModuleList(
            LlamaDecoderLayer(config.per_layer_config[index], index) for index in range(config.num_hidden_layers)
        )
        for layer in self.model.layers:
            # Attention reads only the attention implementation from its config at run time: share the model's,
            # so the choice transformers makes at load time (sdpa, eager) reaches every layer.
            layer.self_attn.config = self.model.config
        self.config = config
        self.post_init()


def _global_sizes(config: AptLlamaConfig) -> AptLlamaConfig:
    """A homogeneous copy (layer sizes from the global fields) for the parts every layer shares."""
    uniform = copy.copy(config)
    uniform.__dict__.pop("_heterogeneity_spec", None)
    uniform.__dict__.pop("per_layer_config", None)
    return uniform


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know `apt_llama` (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, AptLlamaConfig)
        AutoModelForCausalLM.register(AptLlamaConfig, AptLlamaForCausalLM)
    except ValueError:  # already registered in this process
        pass
