"""The one scoring function every model of the study (and the bundled demo model) is measured by."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pipeline.evaluation import perplexity

EVAL_BATCH = 16


def load_model(directory: Path):
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def count_params(model) -> int:
    """Parameters of the model as it is (an exported, pruned model counts only what it keeps)."""
    return sum(p.numel() for p in model.parameters())


def evaluate(model, validation) -> float:
    """Held-out perplexity over every validation block: the pipeline's eval-stage perplexity (token-weighted mean
    loss), run over the whole split."""
    return perplexity(model.eval(), validation, EVAL_BATCH, max_batches=len(validation))
