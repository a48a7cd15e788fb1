"""The run directory: where every stage's artifacts live, in one place, and the readers of the shared ones.

Stages talk only through these files (plus each stage's manifest), so every path a stage writes and a later stage
or a benchmark reads is named here once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.apt.masks import MaskSet

BUILT_BASE = "base_model"
"""Inside finetune/: a model built from the config, saved once so later stages stream the same weights."""
FINETUNE_STATE = "apt_state.json"
"""Inside finetune/: the final step and, after a compaction, the folder of the compacted base (`base_model`)."""


class RunLayout:
    """Paths of one run directory's artifacts; `model_cfg` decides where the original base lives."""

    def __init__(self, run_dir: Path, model_cfg=None):
        self.run_dir = Path(run_dir)
        self.model_cfg = model_cfg

    # prep
    @property
    def tokenizer(self) -> Path:
        return self.run_dir / "prep" / "tokenizer"

    @property
    def dataset(self) -> Path:
        """A `datasets.DatasetDict` saved to disk: splits `train` and `validation`."""
        return self.run_dir / "prep" / "dataset"

    @property
    def heldout_text(self) -> Path:
        """The validation documents as text, one JSON line {"text": ...} each: lm-eval's offline task reads it."""
        return self.run_dir / "prep" / "heldout.jsonl"

    # finetune
    @property
    def finetune(self) -> Path:
        return self.run_dir / "finetune"

    @property
    def checkpoints(self) -> Path:
        return self.finetune / "checkpoints"

    @property
    def adapters(self) -> Path:
        """The fine-tuned adapters, fp32, at the ranks they grew to."""
        return self.finetune / "adapters.safetensors"

    @property
    def apt_state(self) -> Path:
        """Final masks, targets, EMA salience and (after a compaction) the alive map, as tensors."""
        return self.finetune / "apt_state.safetensors"

    @property
    def apt_state_json(self) -> Path:
        return self.finetune / FINETUNE_STATE

    @property
    def updates(self) -> Path:
        """One file per pruning update: the all-reduced EMA salience and the new target masks."""
        return self.finetune / "updates"

    def compacted_base(self, step: int) -> str:
        """The folder (relative to finetune/) of the base compacted at `step`."""
        return f"compacted/step{step:06d}"

    @property
    def base_model(self) -> Path:
        """The original base weights: the user's checkpoint, or the one finetune saved for a built model."""
        if self.model_cfg is not None and self.model_cfg.path is not None:
            return Path(self.model_cfg.path)
        return self.finetune / BUILT_BASE

    @property
    def tuned_base(self) -> Path:
        """The base the fine-tuned adapters and masks belong to: finetune's last compacted base, else the original."""
        state = self.apt_state_json
        compacted = json.loads(state.read_text()).get("base_model") if state.is_file() else None
        return self.finetune / compacted if compacted else self.base_model

    # salience, finalize, merge, eval
    @property
    def salience(self) -> Path:
        return self.run_dir / "salience" / "salience.safetensors"

    @property
    def finalize(self) -> Path:
        return self.run_dir / "finalize"

    @property
    def final_masks(self) -> Path:
        """The binary masks that meet the budget, in the tuned base's shape."""
        return self.finalize / "masks.safetensors"

    @property
    def export(self) -> Path:
        """The merged, pruned model: a plain `from_pretrained` folder."""
        return self.run_dir / "merge" / "model"

    @property
    def eval_metrics(self) -> Path:
        return self.run_dir / "eval" / "metrics.json"


def finetune_masks(layout: RunLayout) -> MaskSet:
    """The binary masks the fine-tune ended with, over the (possibly compacted) tuned base's blocks."""
    masks = _state_masks(layout, "masks")
    if masks is None:
        raise ValueError(f"{layout.apt_state} holds no masks; rerun the finetune stage")
    return masks


def compaction_survivors(layout: RunLayout) -> MaskSet | None:
    """Which of the original model's blocks the fine-tune's compactions kept; None when it never compacted."""
    return _state_masks(layout, "alive")


def _state_masks(layout: RunLayout, prefix: str) -> MaskSet | None:
    path = layout.apt_state
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run the finetune stage first")
    state = load_file(str(path))
    masks = {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
    return MaskSet.from_dict(masks) if masks else None


def salience_scores(layout: RunLayout) -> dict[str, torch.Tensor]:
    """The calibration salience per unit: head [L, n_q], neuron [L, f], hidden [d]."""
    state = load_file(str(layout.salience))
    return {k.removeprefix("scores."): v for k, v in state.items() if k.startswith("scores.")}
