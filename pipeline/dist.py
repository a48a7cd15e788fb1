"""Ranks, devices and collectives, and rank-0 logging. Works with or without an initialised process group.

The device rule (docs/design.md §9): DeepSpeed's accelerator names the device every rank computes on and the
backend its process group uses; whatever the recipe and the stages create lives on `device()`, and every
collective here runs on a buffer on that device (NCCL refuses CPU tensors; gloo takes the CPU ones).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import torch.distributed as dist


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def accelerator():
    """DeepSpeed's accelerator: `DS_ACCELERATOR` when set, else what DeepSpeed detects (CUDA, then CPU)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def device():
    """The device this rank computes on: `cuda:<local rank>` on GPUs, `cpu` on CPU ranks."""
    import torch

    return torch.device(accelerator().current_device_name())


def to_device(batch: dict, target=None) -> dict:
    """A batch of dataset rows (CPU tensors) on `target` (default `device()`): DeepSpeed's forward does not move
    its inputs."""
    import torch

    here = target or device()
    return {key: value.to(here, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


def on_cpu() -> bool:
    """True when DeepSpeed runs on CPU ranks (`DS_ACCELERATOR=cpu`, or no GPU)."""
    return accelerator().device_name() == "cpu"


def empty_cache() -> None:
    """Hand the accelerator's cached free blocks back (a no-op on CPU), e.g. between two engines."""
    accelerator().empty_cache()


def synchronize() -> None:
    """Wait for the accelerator's queued work, so a wall-clock reading covers it (a no-op on CPU)."""
    accelerator().synchronize()


def init_distributed(timeout_minutes: float) -> None:
    """Join the process group the launcher set up, on the backend of DeepSpeed's accelerator (NCCL for CUDA, gloo
    for CPU ranks), so the group and the engine never disagree, with this rank's device made current; a hung peer
    fails after the timeout."""
    import datetime

    import deepspeed

    # Each rank computes on the device of its local rank from here on: what it creates before the engine exists
    # (the model under ZeRO-3, the salience sums) must not all land on device 0.
    accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = accelerator().communication_backend_name()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    # DeepSpeed creates its ZeRO sub-groups without a timeout, so torch gives them its module default (30 min on
    # gloo, 10 on NCCL): make that default ours, so a hung rank fails every collective after the same time.
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    unlink_shm_workspace()


SHM_WORKSPACE = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"
"""The shared-memory segment of DeepSpeed's CPU all-reduce (its shm comm op) for one rank of one launch."""


def unlink_shm_workspace() -> None:
    """Remove this rank's name of DeepSpeed's CPU all-reduce workspace once every peer has mapped it. DeepSpeed
    (0.19) never unlinks it: each launch on a new master port left 66 MB per rank in /dev/shm, which is RAM (22 GB
    on a test machine after a day of runs). The mappings stay valid until the process exits."""
    if "LOCAL_SIZE" not in os.environ or not hasattr(os, "getuid"):  # DeepSpeed maps it only under its launcher
        return
    barrier()  # every rank's init has mapped every peer's segment
    name = SHM_WORKSPACE.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                                port=os.environ.get("MASTER_PORT", ""), rank=rank())
    with contextlib.suppress(FileNotFoundError):  # ranks on several hosts, or a DeepSpeed that makes none
        os.unlink(name)


def get_logger(name: str = "apt") -> logging.Logger:
    """A logger that prints on rank 0 and stays quiet (warnings only) elsewhere."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if is_main() else logging.WARNING)
    return logger


COLLECTIVE_CALLS = {"all_reduce": 0}
"""How many all-reduces this process issued through `all_reduce_sum` (tests count them)."""


def all_reduce_sum(tensor):
    """SUM all-reduce in place (a no-op without a process group); the one collective of a salience update."""
    COLLECTIVE_CALLS["all_reduce"] += 1
    return _all_reduce(tensor)


def all_reduce_mean(tensor):
    """MEAN all-reduce in place over the ranks (a no-op without a process group); gloo has no AVG, so SUM / N."""
    _all_reduce(tensor)
    if _grouped():
        tensor /= dist.get_world_size()
    return tensor


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def leave_process_group() -> None:
    """Meet every rank, then destroy the group (a no-op without one). Left to the interpreter's exit, a gloo group's
    threads may be torn down in the wrong order and abort a rank that had finished its work."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(tensor):
    """SUM in place on the accelerator's device: a buffer elsewhere travels there and back (one copy each way)."""
    if not _grouped():
        return tensor
    here = device()
    if tensor.device == here:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    on_device = tensor.to(here)
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
    return tensor.copy_(on_device)
