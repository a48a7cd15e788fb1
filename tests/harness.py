"""Start N real gloo ranks with torch.multiprocessing; results come back through files."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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


class MlflowServer:
    """`mlflow server` on 127.0.0.1:<port> with a SQLite store in `store`; `kill` is SIGKILL, as a crash."""

    def __init__(self, store: Path):
        self.store, self.port = store, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        store.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 120) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", "1", "--backend-store-uri", f"sqlite:///{self.store / 'mlflow.db'}",
                   "--artifacts-destination", str(self.store / "mlartifacts")]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner processes left behind
        with open(self.store / "server.log", "a") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)  # its uvicorn worker goes down with it
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"mlflow server did not answer on {self.url} within {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log(self) -> str:
        return (self.store / "server.log").read_text()[-3000:]
