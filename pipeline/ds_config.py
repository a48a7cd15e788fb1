"""Fill a DeepSpeed JSON template from the run config, the way transformers' integration does.

Fields the run config owns are written `"auto"` in `ds_configs/*.json`; a template that hard-codes
one of them to a different value is refused, so the two never silently disagree.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import TrainSection


def load_ds_config(path: str | Path, train: TrainSection, world_size: int) -> dict:
    """Read a template and fill its "auto" fields for this world size."""
    try:
        template = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return fill_ds_config(template, train, world_size)


def fill_ds_config(template: dict, train: TrainSection, world_size: int) -> dict:
    owned = {
        ("train_micro_batch_size_per_gpu",): train.micro_batch_size,
        ("gradient_accumulation_steps",): train.grad_accum,
        ("train_batch_size",): train.micro_batch_size * train.grad_accum * world_size,
        ("gradient_clipping",): train.grad_clip,
        ("bf16", "enabled"): train.precision == "bf16",
        ("fp16", "enabled"): train.precision == "fp16",
    }
    config = json.loads(json.dumps(template))  # deep copy
    conflicts = []
    for keys, value in owned.items():
        parent = config
        for key in keys[:-1]:
            parent = parent.setdefault(key, {})
        current = parent.get(keys[-1], "auto")
        if current == "auto":
            parent[keys[-1]] = value
        elif current != value:
            conflicts.append(f"{'.'.join(keys)} is {current!r} but the run config gives {value!r}")
    if conflicts:
        raise ValueError('DeepSpeed config disagrees with the run config (write "auto" there): ' + "; ".join(conflicts))
    return config


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))
