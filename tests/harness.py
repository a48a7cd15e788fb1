"""Start N real gloo ranks with torch.multiprocessing; results come back through files."""

from __future__ import annotations

import os
import pwd
import shutil
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
    import torch

    # A forked child must not use the parent's OpenMP pool (libgomp's workers do not survive a fork); one thread
    # per rank also keeps two ranks from oversubscribing the cores.
    torch.set_num_threads(1)
    os.environ.update(OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    fn(rank, world_size, *args)


def spawn(fn, world_size: int, *args) -> None:
    """Run fn(rank, world_size, *args) in `world_size` forked processes; raise if any fails.

    Forked, not spawned: a rank starts with torch, transformers and DeepSpeed already imported (a spawned one spends
    about ten seconds of a core importing them again) and leaves without the interpreter's teardown."""
    import torch.distributed

    assert not torch.distributed.is_initialized(), "a forked rank would inherit this process's process group"
    mp.start_processes(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True,
                       start_method="fork")


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


def sshd() -> str | None:
    """sshd's path; /usr/sbin is not on every PATH."""
    return shutil.which("sshd", path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin{os.pathsep}/sbin")


class SshHosts:
    """node-a and node-b: two ssh hosts on this machine, as DeepSpeed's pdsh runner reaches cluster nodes.

    Each name resolves (/etc/hosts) to its own loopback address, where one sshd with its own config, port and host
    key listens; ~/.ssh/config gives ssh the test's client key and port for those names. `stop` undoes it all.
    """

    ADDRESSES = {"node-a": "127.0.0.2", "node-b": "127.0.0.3"}
    MARK = "# apt-pipeline test hosts (tests/harness.py SshHosts)"

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.process: subprocess.Popen | None = None
        self.saved: dict[Path, str | None] = {}  # each edited file as it was (None: it did not exist)
        self.made: list[Path] = []  # folders this made, removed by stop

    def start(self, timeout: float = 30) -> None:
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.folder / name)], check=True)
        (self.folder / "authorized_keys").write_text((self.folder / "client_key.pub").read_text())
        (self.folder / "sshd_config").write_text(self._sshd_config())
        hosts = "".join(f"{address} {name}\n" for name, address in self.ADDRESSES.items())
        self._add(Path("/etc/hosts"), f"{self.MARK}\n{hosts}")
        ssh_dir = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh"  # ssh reads the passwd home, not $HOME
        self._make_dir(ssh_dir, 0o700)
        self._add(ssh_dir / "config", self._client_config(), first=True)  # ssh takes the first value it finds
        (ssh_dir / "config").chmod(0o600)
        self._make_dir(Path("/run/sshd"), 0o755)  # sshd's privilege separation folder
        with open(self.folder / "sshd.log", "a") as log:
            self.process = subprocess.Popen([sshd(), "-D", "-e", "-f", str(self.folder / "sshd_config")],
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_listening(timeout)
        for name in self.ADDRESSES:
            answer = subprocess.run(["ssh", name, "hostname"], capture_output=True, text=True, timeout=timeout)
            if answer.returncode != 0:
                raise RuntimeError(f"ssh {name} failed: {answer.stderr}\nsshd log:\n{self.log()}")

    def _sshd_config(self) -> str:
        listen = "".join(f"ListenAddress {address}\n" for address in self.ADDRESSES.values())
        return (f"Port {self.port}\n{listen}HostKey {self.folder / 'host_key'}\nPidFile {self.folder / 'sshd.pid'}\n"
                f"AuthorizedKeysFile {self.folder / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                "StrictModes no\n")  # the keys are under the world-writable tmp folder, which strict modes refuse

    def _client_config(self) -> str:
        return (f"{self.MARK}\nHost {' '.join(self.ADDRESSES)}\n  Port {self.port}\n"
                f"  User {pwd.getpwuid(os.getuid()).pw_name}\n  IdentityFile {self.folder / 'client_key'}\n"
                "  IdentitiesOnly yes\n  BatchMode yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
                "  LogLevel ERROR\n\n")

    def _add(self, path: Path, text: str, first: bool = False) -> None:
        """Add `text` to `path` (first: above what is there), keeping the original for `stop`."""
        old = path.read_text() if path.exists() else None
        self.saved.setdefault(path, old)
        old = old or ""
        if old and not old.endswith("\n"):
            old += "\n"
        _write_in_place(path, text + old if first else old + text)

    def _make_dir(self, path: Path, mode: int) -> None:
        if not path.exists():
            path.mkdir(mode=mode)
            self.made.append(path)

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for address in self.ADDRESSES.values():
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"sshd exited with {self.process.returncode}:\n{self.log()}")
                try:
                    socket.create_connection((address, self.port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"sshd is not listening on {address}:{self.port}:\n{self.log()}") from None
                    time.sleep(0.1)

    def hostfile(self, path: Path, slots: dict[str, int]) -> Path:
        path.write_text("".join(f"{host} slots={n}\n" for host, n in slots.items()))
        return path

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the listener; sessions end with their commands
            self.process.wait(timeout=30)
        for path, text in self.saved.items():
            if text is None:
                path.unlink(missing_ok=True)
            else:
                _write_in_place(path, text)
        for path in reversed(self.made):
            shutil.rmtree(path, ignore_errors=True)

    def log(self) -> str:
        return (self.folder / "sshd.log").read_text()[-3000:]


def _write_in_place(path: Path, text: str) -> None:
    with open(path, "w") as f:  # not a rename: /etc/hosts is often a bind mount, which a rename would not replace
        f.write(text)
