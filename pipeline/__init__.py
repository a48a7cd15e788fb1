"""apt-pipeline: Adaptive Pruning and Tuning (APT) for LLaMA-family models, staged under DeepSpeed."""

__version__ = "0.1.0"
