"""The stage contract: manifests, fingerprints and atomic writes (docs/design.md §1).

A stage is done iff its manifest exists and records the fingerprint the current config gives it.
The manifest is written last, through a temp file and a rename, so a killed stage leaves none.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

MANIFEST = "manifest.json"
RANKS = ".ranks"
"""Inside a distributed stage's folder: one status file per rank, so a failure can be pinned on a rank."""
NODE_NAME = "APT_NODE_NAME"
"""Set on the ranks of a hostfile launch to their node's name in the hostfile (pipeline/nodes.py)."""
TRACKED_PACKAGES = ("torch", "deepspeed", "transformers", "datasets", "sentencepiece", "mlflow", "apt-pipeline")
TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "unexpected pos", "file write failed")
"""What torch.save's C++ zip writer raises (a RuntimeError without errno) when the file system refuses a write."""
RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")


class WriteFailed(OSError):
    """The file system refused a write (full disk, file-size limit, quota); the message names the file and the fix."""

    fix: str = ""
    """The fix alone (the message without the file and the errno)."""


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: what it reads, what it consumes, how it runs."""

    name: str
    config: type
    """The stage's typed config view (`pipeline.config.FinetuneConfig`, ...): the sections it reads, which (with
    its inputs' fingerprints) make its fingerprint."""
    inputs: tuple[str, ...]
    """Earlier stages whose outputs it reads."""
    run: Callable
    """`run(cfg, run_dir) -> dict` of summary figures; `cfg` is an instance of `config`."""
    distributed: bool = False
    outputs: tuple[str, ...] = ()
    """Files and folders (relative to the stage's folder) that later stages read. A manifest without one was
    written by an older version of the stage: the stage is not done, so it runs again before anything reads it."""

    @property
    def sections(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.config))


def fingerprint(sections: dict, input_fingerprints: dict[str, str]) -> str:
    """sha256 over the stage's config sections and the fingerprints of what it consumed."""
    payload = json.dumps({"config": sections, "inputs": input_fingerprints}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    Readers see the old file or the whole new one; a failed write leaves no temp file and raises an OSError
    that names `path`, the cause (full disk, file-size limit, ...) and the fix."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        failure = write_failure(e, path)
        if failure is None:
            raise
        raise failure from e


def write_failure(error: BaseException, path: Path) -> WriteFailed | None:
    """`error` as a WriteFailed naming `path`, the cause and the fix, if it is a write the file system refused
    (an OSError such as ENOSPC/EFBIG, a Rust I/O error, torch.save's errno-less RuntimeError); else None."""
    if isinstance(error, WriteFailed):
        return error
    rust_io = RUST_IO_ERROR.search(str(error))  # safetensors and tokenizers report the errno in their text
    if isinstance(error, OSError):
        code = error.errno
    elif rust_io is not None:
        code = int(rust_io[1])
    elif isinstance(error, RuntimeError) and any(text in str(error) for text in TORCH_WRITE_FAILURES):
        code = likely_write_errno(path)
    else:
        return None
    fix = write_fix(code, path)
    if fix is None:
        return None
    failure = WriteFailed(code, f"could not write {path} ({os.strerror(code)}): {fix}")
    failure.fix = fix
    return failure


def likely_write_errno(path: Path) -> int:
    """Why a write under `path` failed when the error did not say: a file-size limit, a full disk, or EIO."""
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return errno.EFBIG
    folder = next((p for p in (path, *path.parents) if p.is_dir()), Path("/"))
    if shutil.disk_usage(folder).free < 64 << 20:
        return errno.ENOSPC
    return errno.EIO


def write_fix(code: int | None, path: Path) -> str | None:
    """What to do about a refused write, by errno; None for errors that are not about space or limits."""
    if code == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        where = "" if limit == resource.RLIM_INFINITY else f" ({limit} bytes for this process)"
        return (f"the file is larger than the file-size limit{where}; raise it (`ulimit -f unlimited`, or the "
                f"job scheduler's file-size limit) and run the same command again")
    if code == errno.ENOSPC:
        return (f"the disk holding {path.parent} is full; free space (or set run.root to a larger disk) "
                f"and run the same command again")
    if code == errno.EDQUOT:
        return "the disk quota is used up; free space or raise the quota and run the same command again"
    if code == errno.EROFS:
        return "the file system is read-only; set run.root to a writable folder"
    if code == errno.EIO:
        return ("the file system reported an I/O error; check free space (`df`), the file-size limit "
                "(`ulimit -f`) and the disk, then run the same command again")
    return None


def save_tensors(tensors: dict, path: Path) -> None:
    """Write tensors as safetensors through `write_atomic`: readers see the old file or the whole new one."""
    from safetensors.torch import save

    write_atomic(path, save({name: tensor.contiguous() for name, tensor in tensors.items()}))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def read_manifest(stage_dir: Path) -> dict | None:
    path = stage_dir / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def is_done(stage_dir: Path, expected_fingerprint: str, required: tuple[str, ...] = ()) -> bool:
    """Done = a manifest with this fingerprint whose recorded outputs all still exist and include `required`."""
    manifest = read_manifest(stage_dir)
    if manifest is None or manifest.get("fingerprint") != expected_fingerprint:
        return False
    recorded = manifest.get("outputs", {})
    if not all(any(rel == name or rel.startswith(f"{name}/") for rel in recorded) for name in required):
        return False
    return all((stage_dir / rel).is_file() for rel in recorded)


def is_output(path: Path, stage_dir: Path) -> bool:
    """Dot-named files and folders are bookkeeping (temp files, rank status, resume key), not outputs."""
    relative = path.relative_to(stage_dir)
    return path.is_file() and path.name != MANIFEST and not any(part.startswith(".") for part in relative.parts)


def write_manifest(stage_dir: Path, *, stage: str, fingerprint: str, inputs: dict[str, str], world_size: int,
                   started: float, summary: dict) -> dict:
    """Hash every file the stage wrote and record it all; this is the stage's last write."""
    files = [p for p in sorted(stage_dir.rglob("*")) if is_output(p, stage_dir)]
    outputs = {str(p.relative_to(stage_dir)): sha256_file(p) for p in files}
    manifest = {
        "stage": stage,
        "fingerprint": fingerprint,
        "inputs": inputs,
        "versions": package_versions(),
        "world_size": world_size,
        "started": started,
        "finished": time.time(),
        "outputs": outputs,
        "summary": summary,
    }
    write_atomic(stage_dir / MANIFEST, json.dumps(manifest, indent=2, default=str))
    return manifest



def write_rank_status(stage_dir: Path, rank: int, status: str, detail: str = "") -> None:
    """Record what this rank is doing (running, done, failed) for the driver to read after a failure."""
    # The hostfile's name for the node is the one a user can act on (and the only one that tells apart nodes
    # that share a machine, as the tests' do).
    host = os.environ.get(NODE_NAME) or platform.node()
    record = {"rank": rank, "status": status, "detail": detail, "pid": os.getpid(), "host": host, "time": time.time()}
    write_atomic(stage_dir / RANKS / f"rank{rank}.json", json.dumps(record))


def describe_rank_failures(stage_dir: Path) -> str:
    """Which ranks raised (with their error) and which vanished while running (killed, out of memory)."""
    lines = []
    for path in sorted((stage_dir / RANKS).glob("rank*.json"), key=lambda p: int(p.stem[4:])):
        record = json.loads(path.read_text())
        if record["status"] == "running":
            lines.append(f"rank {record['rank']} (pid {record['pid']} on {record['host']}) died without an error: "
                         f"killed, out of memory, or its node went down")
        elif record["status"] == "failed":
            lines.append(f"rank {record['rank']} (pid {record['pid']} on {record['host']}) raised: {record['detail']}")
    return "\n".join(lines)
