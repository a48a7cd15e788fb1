"""Metric loggers: one small protocol, a stdout/JSONL logger now, MLflow behind the same four methods.

Only rank 0 logs; other ranks get a `NullLogger`, so call sites need no rank checks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Protocol

from pipeline.dist import is_main


class MetricLogger(Protocol):
    def log_params(self, params: dict) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger:
    """Appends one JSON line per call to `path`; a resumed run appends to the same file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a")  # noqa: SIM115 - closed in close()

    def log_params(self, params: dict) -> None:
        self._write({"params": params})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._write({"step": step, **metrics})

    def log_artifact(self, path: Path) -> None:
        self._write({"artifact": str(path)})

    def close(self) -> None:
        self._file.close()

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps({"time": time.time(), **record}) + "\n")
        self._file.flush()


def metric_logger(stage_dir: Path) -> MetricLogger:
    """The logger a stage writes its metrics to (rank 0 only)."""
    return JsonlLogger(stage_dir / "metrics.jsonl") if is_main() else NullLogger()
