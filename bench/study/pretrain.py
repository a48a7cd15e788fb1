"""Train the study's small GQA LLaMA from scratch on the prep stage's train split, and save it once.

A plain PyTorch loop (AdamW, linear warm-up then cosine to 10%, gradient clipping), fixed seed, fp32.
The checkpoint is written with `save_pretrained` (safetensors) next to a `study_pretrain.json` of the
settings and data it was trained with; a later run with the same settings reuses it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SETTINGS_FILE = "study_pretrain.json"


@dataclass(frozen=True)
class PretrainSettings:
    """Model sizes and the pretraining run."""

    hidden_size: int = 320
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int = 864
    steps: int = 500
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 25
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0


def build_model(settings: PretrainSettings, vocab_size: int, seq_len: int) -> LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM (untied embeddings), seeded."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        intermediate_size=settings.intermediate_size,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
    )
    torch.manual_seed(settings.seed)
    return LlamaForCausalLM(config)


def lr_at(step: int, settings: PretrainSettings) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak at the last step."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def pretrain(settings: PretrainSettings, train_split, vocab_size: int, data_id: str, out_dir: Path) -> dict:
    """Train and save to `out_dir`, or reuse what is there if it was made with the same settings and data.

    `data_id` names the tokens (e.g. the prep stage's fingerprint). Returns the record in SETTINGS_FILE, and
    whether it was reused.
    """
    wanted = {"settings": dataclasses.asdict(settings), "data": data_id, "vocab_size": vocab_size}
    record_path = out_dir / SETTINGS_FILE
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if {key: record.get(key) for key in wanted} == wanted:
            print(f"pretrain: reusing {out_dir} (same settings and data)", flush=True)
            return record | {"reused": True}
    seq_len = train_split[0]["input_ids"].numel()
    model = build_model(settings, vocab_size, seq_len)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # norms: no weight decay, as usual
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.empty(0, dtype=torch.long)
    losses = []
    started = time.perf_counter()
    model.train()
    for step in range(settings.steps):
        if len(order) < settings.batch_size:  # a new epoch: a fresh permutation of the train rows
            order = torch.randperm(len(train_split), generator=generator)
        rows, order = order[:settings.batch_size], order[settings.batch_size:]
        batch = train_split[rows.tolist()]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 25 == 0 or step + 1 == settings.steps:
            recent = losses[-25:]
            print(f"pretrain step {step + 1}/{settings.steps}: loss {sum(recent) / len(recent):.3f} "
                  f"({time.perf_counter() - started:.0f}s)", flush=True)
    tokens = settings.steps * settings.batch_size * seq_len
    record = {**wanted, "params": sum(p.numel() for p in model.parameters()), "tokens": tokens,
              "epochs": tokens / (len(train_split) * seq_len),
              "final_train_loss": sum(losses[-25:]) / len(losses[-25:]), "seconds": time.perf_counter() - started}
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))  # safetensors
    (tmp / SETTINGS_FILE).write_text(json.dumps(record, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return record | {"reused": False}
