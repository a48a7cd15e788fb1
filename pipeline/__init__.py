"""apt-pipeline: Adaptive Pruning and Tuning (APT) for LLaMA-family models, staged under DeepSpeed."""

from pipeline.hetero import register as _register_models

__version__ = "0.1.0"

_register_models()  # a per_layer export then loads with AutoModelForCausalLM, no trust_remote_code
