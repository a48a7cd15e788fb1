"""What every benchmark's report shares: the machine it ran on and its section of bench/RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch
import transformers


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def environment_lines() -> list[str]:
    """Markdown bullets: processor, cores, threads, load, versions, date."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- machine: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
        f"1-minute load average {os.getloadavg()[0]:.1f} at the end (other processes share the machine)",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
        f"- date: {now}",
    ]


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace the `heading` section of a markdown file (or append it), keeping every other section."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("" if end < 0 else text[end:])
    path.write_text(text)
