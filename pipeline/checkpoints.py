"""Checks that the DeepSpeed checkpoint a resume would load is complete and safe, before any model is built.

DeepSpeed writes each file as a torch zip archive, whose central directory comes last: a file cut short
(full disk, an interrupted copy) fails to open as a zip. DeepSpeed's `load_checkpoint` then unpickles every
file in full (`torch.load(weights_only=False)`), which runs whatever code a crafted pickle names; so each
file's pickle is first scanned statically (never unpickled) and any global outside `SAFE_GLOBALS` refused.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from pipeline.config import ConfigError

LATEST = "latest"
"""The file DeepSpeed writes last, naming the tag (sub-folder) `load_checkpoint` reads."""
FOLDER = "checkpoints"
"""Inside a resumable stage's folder: the DeepSpeed checkpoints and `latest`."""
SAFE_GLOBALS = frozenset({
    # DeepSpeed 0.19 ZeRO-2/3 optimizer states (bf16, fp32, universal) beside their tensors
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # fp16 training (GPUs) stores this one instead
    # finetune's client state: numpy's RNG state holds a uint32 array
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
})
"""Globals our checkpoints' pickles name besides those torch's weights_only loader allows (tensors, dtypes,
OrderedDict, ...), found by scanning checkpoints written by finetune (ZeRO-2/3 x fp32/bf16, universal)."""


class CheckpointError(ConfigError):
    """The checkpoint a resume would load is missing, truncated or unsafe; the message says what to do."""


def check_checkpoint(folder: Path, tag: str | None = None) -> None:
    """Raise CheckpointError if checkpoint `tag` (default: the one `latest` names) in `folder` is missing, has
    unreadable files or names a global outside SAFE_GLOBALS. Without `latest` there is nothing to resume."""
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
    raise CheckpointError(f"checkpoint {folder / tag} (named by {LATEST}) cannot be resumed:\n  "
                          + "\n  ".join(problems) + f"\nFix: {fix}")


def tag_problems(tag_dir: Path) -> list[str]:
    """What makes the checkpoint folder `tag_dir` unloadable: missing, no model states, truncated or unsafe files."""
    if not tag_dir.is_dir():
        return [f"{tag_dir} does not exist"]
    files = sorted(tag_dir.rglob("*.pt"))  # a universal checkpoint keeps one folder per parameter
    problems = [] if any(f.name.endswith("model_states.pt") for f in files) else [
        f"{tag_dir} holds no *model_states.pt file"]
    for path in files:
        name = path.relative_to(tag_dir)
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            problems.append(f"{name}: truncated or unreadable ({e})")
            continue
        if not any(entry.endswith("/data.pkl") for entry in names):
            problems.append(f"{name}: not a torch checkpoint (no data.pkl inside)")
            continue
        unsafe = unsafe_globals(path)
        if unsafe:
            problems.append(f"{name}: refers to {', '.join(unsafe)}, which no checkpoint of this pipeline contains; "
                            f"DeepSpeed unpickles checkpoints in full, so loading it could run code it carries "
                            f"(not loaded; if you wrote it on purpose, see SAFE_GLOBALS in pipeline/checkpoints.py)")
    return problems


def unsafe_globals(path: Path) -> list[str]:
    """The globals `path`'s pickle names outside torch's weights_only set and SAFE_GLOBALS, read without unpickling.

    A pickle the static scan cannot read (opcodes torch.save never writes) counts as unsafe too."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        found = get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # whatever the scanner cannot read, torch.save did not write
        return [f"<a pickle torch.save does not write: {type(e).__name__}: {e}>"]
    return sorted(set(found) - SAFE_GLOBALS)


def complete_tags(folder: Path) -> list[str]:
    """Tags in `folder` whose checkpoint passes `tag_problems`, oldest first (by the step number they end in)."""
    tags = [d.name for d in folder.iterdir() if d.is_dir() and not tag_problems(d)] if folder.is_dir() else []
    return sorted(tags, key=lambda tag: (_trailing_number(tag), tag))


def _trailing_number(tag: str) -> int:
    match = re.search(r"\d+$", tag)
    return int(match[0]) if match else -1
