"""Where a restarted finetune continues: the checkpoint `latest` names, its meta file, and elastic resume.

Beside each DeepSpeed tag, `meta-<tag>.json` records what a restart must know before it builds anything: the
adapters' ranks (rank growth), the world size and global batch, and the compacted base the weights belong to.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from deepspeed.checkpoint import ds_to_universal

from pipeline import dist
from pipeline.checkpoints import LATEST
from pipeline.stage import write_atomic

log = dist.get_logger("apt.finetune")


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a restart continues from, and how the ranks that wrote it differ from this run's."""

    tag: str
    """The tag `latest` names."""
    meta: dict
    """What `write_meta` wrote beside it: adapter_ranks, world_size, global_batch, base_model."""
    load_tag: str
    """The folder DeepSpeed loads: `tag`, or its universal conversion when the world size changed."""

    @property
    def universal(self) -> bool:
        return self.load_tag != self.tag


def meta_file(checkpoints: Path, tag: str) -> Path:
    return checkpoints / f"meta-{tag}.json"


def write_meta(checkpoints: Path, tag: str, meta: dict) -> None:
    """Written before `latest` names the tag, so a resume always finds it."""
    write_atomic(meta_file(checkpoints, tag), json.dumps(meta, indent=1))


def latest_meta(checkpoints: Path) -> dict | None:
    """What `write_meta` recorded beside the checkpoint `latest` names (None: nothing to resume)."""
    latest = checkpoints / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return {"tag": tag} | json.loads(meta_file(checkpoints, tag).read_text())


def resume_point(checkpoints: Path, meta: dict | None, world_size: int) -> ResumePoint | None:
    """Where a restart continues, converting a checkpoint written by another number of ranks first.

    DeepSpeed's ZeRO files are per rank; `ds_to_universal` rewrites them per parameter, which any world size
    loads. Rank 0 converts (once, to a temporary folder renamed on success) while the others wait.
    """
    if meta is None:
        return None
    tag = meta["tag"]
    if meta["world_size"] == world_size:
        return ResumePoint(tag, meta, tag)
    universal = checkpoints / f"{tag}_universal"
    if dist.is_main() and not universal.is_dir():
        log.info("checkpoint %s was written by %d ranks; converting it for %d (DeepSpeed universal checkpoint)",
                 tag, meta["world_size"], world_size)
        partial = checkpoints / f"{tag}_universal.partial"
        shutil.rmtree(partial, ignore_errors=True)
        ds_to_universal.main(argparse.Namespace(
            input_folder=str(checkpoints / tag), output_folder=str(partial), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
        partial.rename(universal)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return ResumePoint(tag, meta, universal.name)


def keep_global_batch(train, world_size: int, meta: dict):
    """The train section with grad_accum set so micro·accum·world equals the checkpoint's global batch.

    The batch size is part of the optimisation (and of the data order), so a run resumed on another number of
    ranks keeps it by changing the accumulation, as DeepSpeed's elastic training does.
    """
    per_accum = train.micro_batch_size * world_size
    saved = meta["global_batch"]
    if saved % per_accum:
        raise ValueError(f"the checkpoint was trained with a global batch of {saved} sequences; "
                         f"{world_size} ranks x micro_batch_size {train.micro_batch_size} cannot make it up. "
                         f"Resume on a number of ranks that divides {saved // train.micro_batch_size}")
    grad_accum = saved // per_accum
    if grad_accum != train.grad_accum:
        log.info("keeping the checkpoint's global batch of %d: grad_accum %d -> %d on %d ranks",
                 saved, train.grad_accum, grad_accum, world_size)
    if train.nonfinite == "skip" and grad_accum != 1:
        raise ValueError(f"on {world_size} ranks the global batch of {saved} needs grad_accum {grad_accum}, "
                         f"which train.nonfinite=skip does not support; resume with nonfinite=stop or "
                         f"{saved // train.micro_batch_size} ranks")
    return dataclasses.replace(train, grad_accum=grad_accum)
