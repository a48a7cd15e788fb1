"""Scoring a plain `transformers` model: perplexity on packed batches and greedy-generation speed."""

from __future__ import annotations

import math
import time

import torch


@torch.no_grad()
def perplexity(model, split, batch_size: int, max_batches: int) -> float:
    """Token-weighted perplexity over the first `max_batches` batches of `split`."""
    loss_sum, tokens = 0.0, 0
    for start in range(0, min(len(split), batch_size * max_batches), batch_size):
        batch = split[start:start + batch_size]
        count = int((batch["labels"][:, 1:] != -100).sum())
        loss_sum += model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item() * count
        tokens += count
    return math.exp(loss_sum / max(tokens, 1))


@torch.no_grad()
def generation_speed(model, prompts: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Greedy-decoding tokens per second (median of `repeats`, after one warm-up)."""
    # Unpadded prompts of equal length: every position attends; EOS stands in for the absent pad token.
    options = dict(attention_mask=torch.ones_like(prompts), pad_token_id=model.config.eos_token_id, do_sample=False)
    model.generate(prompts, max_new_tokens=2, **options)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
        times.append(time.perf_counter() - started)
    return prompts.shape[0] * new_tokens / sorted(times)[len(times) // 2]
