"""Checks that the DeepSpeed checkpoint a resume would load is complete, before any model is built.

DeepSpeed writes each file as a torch zip archive, whose central directory comes last: a file cut short
(full disk, an interrupted copy) fails to open as a zip. Files are opened as archives, never unpickled.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

LATEST = "latest"
"""The file DeepSpeed writes last, naming the tag (sub-folder) `load_checkpoint` reads."""


def check_checkpoint(folder: Path, tag: str | None = None) -> None:
    """Raise if checkpoint `tag` (default: the one `latest` names) in `folder` is missing or has unreadable files.

    Without `latest` there is nothing to resume, so nothing to check. The error names the fix."""
    folder = Path(folder)
    if tag is None:
        if not (folder / LATEST).is_file():
            return
        tag = (folder / LATEST).read_text().strip()
    problems = tag_problems(folder / tag) if tag else [f"{folder / LATEST} is empty"]
    if not problems:
        return
    others = [t for t in complete_tags(folder) if t != tag]
    if others:
        fix = (f"point {folder / LATEST} at the newest complete checkpoint ({others[-1]}: "
               f"echo {others[-1]} > {folder / LATEST}) to resume from there, or delete {folder} to start over")
    else:
        fix = f"no complete checkpoint is left; delete {folder} to start this stage over"
    raise RuntimeError(f"checkpoint {folder / tag} (named by {LATEST}) cannot be resumed:\n  "
                       + "\n  ".join(problems) + f"\nFix: {fix}")


def tag_problems(tag_dir: Path) -> list[str]:
    """What makes the checkpoint folder `tag_dir` unloadable: missing, no model states, or truncated files."""
    if not tag_dir.is_dir():
        return [f"{tag_dir} does not exist"]
    files = sorted(tag_dir.glob("*.pt"))
    problems = [] if any(f.name.endswith("model_states.pt") for f in files) else [
        f"{tag_dir} holds no *model_states.pt file"]
    for path in files:
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            problems.append(f"{path.name}: truncated or unreadable ({e})")
            continue
        if not any(name.endswith("/data.pkl") for name in names):
            problems.append(f"{path.name}: not a torch checkpoint (no data.pkl inside)")
    return problems


def complete_tags(folder: Path) -> list[str]:
    """Tags in `folder` whose checkpoint passes `tag_problems`, oldest first (by the step number they end in)."""
    tags = [d.name for d in folder.iterdir() if d.is_dir() and not tag_problems(d)] if folder.is_dir() else []
    return sorted(tags, key=lambda tag: (_trailing_number(tag), tag))


def _trailing_number(tag: str) -> int:
    match = re.search(r"\d+$", tag)
    return int(match[0]) if match else -1
