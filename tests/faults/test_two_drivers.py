"""Two drivers on one run directory: the second is refused at once, naming the first; a killed driver's lock goes
with it (the kernel releases an fcntl lock when its process dies)."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pipeline import run_lock

from harness import free_port

pytestmark = pytest.mark.e2e


def driver(tmp_path, small_corpus) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "run", "--config", "tests/tiny.yaml", f"run.root={tmp_path}",
            f"data.sources=[{small_corpus}]", "data.num_proc=1", f"deepspeed.master_port={free_port()}"]


def wait_for_lock(path, pid: int, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.is_file() and f"pid {pid}" in path.read_text():
            return
        time.sleep(0.2)
    raise TimeoutError(f"the first driver (pid {pid}) never took {path}")


def test_a_second_driver_is_refused_and_a_killed_one_leaves_no_lock(tmp_path, small_corpus):
    run_dir = tmp_path / "tiny"
    first = subprocess.Popen(driver(tmp_path, small_corpus), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        wait_for_lock(run_dir / run_lock.LOCK_FILE, first.pid)
        second = subprocess.run(driver(tmp_path, small_corpus), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"in use by the driver on {socket.gethostname()}, pid {first.pid}" in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the ranks it launched
        first.wait()
    with run_lock.hold(run_dir):  # nothing stale: the next driver gets it
        assert f"pid {os.getpid()}" in (run_dir / run_lock.LOCK_FILE).read_text()
