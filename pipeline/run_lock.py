"""One driver per run directory: an exclusive `fcntl` lock held for the driver's life.

Two drivers on one run directory (a Slurm requeue while the old job still runs, a second terminal) would interleave
their writes. The kernel drops the lock when its process dies, however it dies, so a crash never leaves a stale
lock; the file only says who held it last. Ranks started by the driver never take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".driver.lock"


class RunLocked(RuntimeError):
    """Another driver holds the run directory; the message names its host and pid."""


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Take the run directory's lock, or raise `RunLocked` at once naming the driver that holds it."""
    path = run_dir / LOCK_FILE
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            raise RunLocked(f"{run_dir} is in use by the driver {holder}; wait for it to end or stop it (two "
                            f"drivers would interleave their writes), or give this run another run.name") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"on {socket.gethostname()}, pid {os.getpid()}\n")
        handle.flush()
        yield  # closing the file releases the lock
