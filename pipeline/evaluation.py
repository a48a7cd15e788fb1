"""Scoring a plain `transformers` model: perplexity on packed batches and greedy-generation speed."""

from __future__ import annotations

import math
import statistics
import time

import torch

from pipeline import dist


@torch.no_grad()
def perplexity(model, split, batch_size: int, max_batches: int) -> float:
    """Token-weighted perplexity over the first `max_batches` batches of `split`."""
    device = next(model.parameters()).device
    loss_sum, tokens = 0.0, 0
    for start in range(0, min(len(split), batch_size * max_batches), batch_size):
        batch = dist.to_device(split[start:start + batch_size], device)
        count = int((batch["labels"][:, 1:] != -100).sum())
        loss_sum += model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item() * count
        tokens += count
    return math.exp(loss_sum / max(tokens, 1))


@torch.no_grad()
def generate_seconds(model, prompts: torch.Tensor, new_tokens: int) -> float:
    """Wall seconds of one greedy generation of exactly `new_tokens` tokens after each prompt."""
    # Unpadded prompts of equal length: every position attends; EOS stands in for the absent pad token.
    prompts = prompts.to(next(model.parameters()).device)
    options = dict(attention_mask=torch.ones_like(prompts), pad_token_id=model.config.eos_token_id, do_sample=False)
    dist.synchronize()  # an accelerator's queue is empty before the clock starts, and drained before it stops
    started = time.perf_counter()
    model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
    dist.synchronize()
    return time.perf_counter() - started


def interleaved_speedup(base, pruned, prompts: torch.Tensor, new_tokens: int, rounds: int,
                        max_spread: float) -> dict:
    """Generation speed-up of `pruned` over `base`, timed in alternating order round by round after a warm-up.

    Each round's ratio pairs two runs seconds apart, so load that comes and goes hits both; the median ratio
    is the figure, its interquartile range the spread, and a spread above `max_spread` marks it unreliable."""
    for model in (base, pruned):
        generate_seconds(model, prompts, 2)
    seconds = {"base": [], "pruned": []}
    for index in range(rounds):
        order = ("base", "pruned") if index % 2 == 0 else ("pruned", "base")
        for name in order:
            seconds[name].append(generate_seconds(base if name == "base" else pruned, prompts, new_tokens))
    ratios = [b / p for b, p in zip(seconds["base"], seconds["pruned"], strict=True)]
    median = statistics.median(ratios)
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (median, median, median)
    tokens, spread = prompts.shape[0] * new_tokens, (q3 - q1) / median
    return {"speedup": median, "spread": spread, "reliable": spread <= max_spread,
            "ratios": ratios, "rounds": rounds, "threads": torch.get_num_threads(),
            "base_tokens_per_s": tokens / statistics.median(seconds["base"]),
            "pruned_tokens_per_s": tokens / statistics.median(seconds["pruned"])}


def model_sizes(config) -> dict:
    """The sizes a reader compares: hidden, layers, query / KV heads, MLP neurons (a list per layer for per_layer,
    0 where a layer lost its attention or MLP)."""
    per_layer = bool(getattr(config, "is_heterogeneous", False))

    def size(name: str):  # transformers refuses a global read of an attribute that differs per layer
        return [getattr(layer, name) for layer in config.per_layer_config] if per_layer else getattr(config, name)

    return {"hidden": config.hidden_size, "layers": config.num_hidden_layers, "heads": size("num_attention_heads"),
            "kv_heads": size("num_key_value_heads"), "intermediate": size("intermediate_size"), "per_layer": per_layer}
