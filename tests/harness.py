"""Start N real gloo ranks with torch.multiprocessing; results come back through files."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    fn(rank, world_size, *args)


def spawn(fn, world_size: int, *args) -> None:
    """Run fn(rank, world_size, *args) in `world_size` fresh processes; raise if any fails."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


def assert_same_finetune_outputs(expected_run: Path, actual_run: Path, atol: float = 1e-6) -> None:
    """The two runs' final adapters and APT state (masks, targets, EMA) agree tensor by tensor."""
    import torch
    from safetensors.torch import load_file

    for name in ("adapters.safetensors", "apt_state.safetensors"):
        expected = load_file(str(expected_run / "finetune" / name))
        actual = load_file(str(actual_run / "finetune" / name))
        assert expected.keys() == actual.keys(), name
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=atol, msg=key)
