"""Rank helpers and rank-0 logging. Works with or without an initialised process group."""

from __future__ import annotations

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


def init_distributed(timeout_minutes: float) -> None:
    """Join the process group the launcher set up: NCCL on GPUs, gloo on CPUs; a hung peer fails after the timeout."""
    import datetime

    import deepspeed
    import torch

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    # DeepSpeed creates its ZeRO sub-groups without a timeout, so torch gives them its module default (30 min on
    # gloo, 10 on NCCL): make that default ours, so a hung rank fails every collective after the same time.
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)


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
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor):
    """MEAN all-reduce in place over the ranks (a no-op without a process group); gloo has no AVG, so SUM / N."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor
