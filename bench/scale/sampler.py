"""Peak memory of a process tree while the pipeline runs: the driver, every rank of every stage, the launchers.

Polled from outside, so the pipeline runs unchanged. A rank's peak is its kernel high-water mark (VmHWM), exact up
to the last poll before it exits; the driver lives through every stage, so its per-stage figure is the highest
resident set (VmRSS) sampled while that stage ran, and so is a rank's in the later stages of a launch that runs
several (the high-water mark would still hold the earlier stage's peak). Anonymous memory (RssAnon) is sampled
beside it: the part of the resident set that is not a mapped file (safetensors are read through mmap).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

KIB = 1024


@dataclass
class ProcessPeak:
    """The largest figures seen for one process (bytes)."""

    role: str
    """driver, rank or launcher."""
    stage: str
    rank: int | None
    hwm: int = 0
    rss: int = 0
    anon: int = 0
    first_rss: int | None = None
    """The driver's resident set when the stage started: the base the stage's growth is measured from."""


@dataclass
class TreeSampler:
    """Samples `root` and its descendants every `interval` s on a thread; `stage_of()` names the running stage."""

    root: int
    stage_of: callable
    interval: float = 0.2
    peaks: dict[tuple, ProcessPeak] = field(default_factory=dict)
    timeline: list[tuple[float, str, str, int | None, int]] = field(default_factory=list)
    """(time, role, stage, rank, resident bytes) of the driver and the ranks, one row per process and second."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _roles: dict[int, tuple[str, tuple[str, ...], int | None]] = field(default_factory=dict)
    _first_stage: dict[int, str] = field(default_factory=dict)
    _last_row: dict[int, float] = field(default_factory=dict)

    def __enter__(self) -> TreeSampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        """One poll of every live process of the tree."""
        stage = self.stage_of()
        try:
            processes = [psutil.Process(self.root), *psutil.Process(self.root).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            status = read_status(process.pid)
            if status is None:
                continue
            role, own_stages, rank = self._role(process)
            own_stage = own_stages[0] if len(own_stages) == 1 else stage  # a launch of several: the running one
            key = (role, own_stage or stage, rank, process.pid if role == "launcher" else None)
            peak = self.peaks.setdefault(key, ProcessPeak(role, own_stage or stage or "-", rank))
            if peak.first_rss is None:
                peak.first_rss = status["VmRSS"]
            first_stage = self._first_stage.setdefault(process.pid, peak.stage)
            peak.hwm = max(peak.hwm, status["VmHWM"] if peak.stage == first_stage else status["VmRSS"])
            peak.rss = max(peak.rss, status["VmRSS"])
            peak.anon = max(peak.anon, status.get("RssAnon", 0))
            now = time.time()
            if role != "launcher" and now - self._last_row.get(process.pid, 0.0) >= 1.0:
                self._last_row[process.pid] = now
                self.timeline.append((round(now, 1), role, peak.stage, rank, status["VmRSS"]))

    def _role(self, process: psutil.Process) -> tuple[str, tuple[str, ...], int | None]:
        """(driver | rank | launcher, the stages a rank runs, its rank). Only a rank is cached per pid: a process
        polled between fork and exec still shows its launcher's command line and environment."""
        if process.pid in self._roles:
            return self._roles[process.pid]
        role = classify(process, self.root)
        if role[0] == "rank":
            self._roles[process.pid] = role
        return role


def classify(process: psutil.Process, root: int) -> tuple[str, tuple[str, ...], int | None]:
    """A rank runs `pipeline.cli stage NAME [NAME ...] --worker` with RANK in its environment; the rest launch them
    (the launcher's own command line names the stages too, but it has no RANK)."""
    if process.pid == root:
        return "driver", (), None
    try:
        command, environ = process.cmdline(), process.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "launcher", (), None
    if "--worker" in command and "stage" in command and "RANK" in environ:
        names = command[command.index("stage") + 1:command.index("--worker")]
        return "rank", tuple(names), int(environ.get("RANK", 0))
    return "launcher", (), None


def read_status(pid: int) -> dict[str, int] | None:
    """VmHWM, VmRSS and RssAnon of a live process in bytes (None once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS", "RssAnon"):
            fields[name] = int(value.split()[0]) * KIB
    return fields if "VmHWM" in fields else None
