"""The APT state of a fine-tune: what a resumed run needs besides the engine's weights and optimizer.

It owns its (de)serialisation: `to_checkpoint` / `from_checkpoint` for the DeepSpeed client state of every
checkpoint, `final_tensors` for the safetensors file later stages read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

from pipeline.apt.blocks import ModelShape
from pipeline.apt.masks import MaskSet
from pipeline.apt.salience import SalienceScores

PREFIX = "apt_"
"""Client-state keys are `apt_<field>`: DeepSpeed's own keys never collide with them."""
STEP_TIMES_KEPT = 3


@dataclass
class AptState:
    """Everything besides the DeepSpeed weights/optimizer that a resumed run needs to continue exactly."""

    step: int = 0
    masks: MaskSet | None = None
    target: MaskSet | None = None
    ema: SalienceScores | None = None
    teacher: dict | None = None
    """Self-distillation: the adapters frozen at the start of the pruning window (name -> (A, B))."""
    skipped_steps: int = 0
    """Steps dropped because a loss was inf/NaN (train.nonfinite=skip)."""
    overflow_steps: int = 0
    """fp16 steps DeepSpeed skipped for gradient overflow (the loss scale's search; not a divergence)."""
    growth_budget: float = 0.0
    """Adapter parameters rank growth may reach: apt.tuning_budget x those of the initial, uncompacted model."""
    alive: MaskSet | None = None
    """After a compaction: 1 where a block of the ORIGINAL model is still in the training model."""
    base_model: str | None = None
    """After a compaction: the compacted base's folder inside finetune/ (masks, EMA, adapters follow its shape)."""
    teacher_model: str | None = None
    """With distillation, once the backbone was first compacted: the frozen teacher model's folder inside finetune/."""
    compactions: list[dict] = field(default_factory=list)
    """Each compaction so far: step, parameters before and after, step time before and (4 steps on) after."""
    step_times: list[float] = field(default_factory=list)
    """The wall times of the last `STEP_TIMES_KEPT` steps, for throughput and the compactions' before/after."""

    @classmethod
    def start(cls, shape: ModelShape, growth_budget: float) -> AptState:
        """Step 0: every block kept, no salience seen yet."""
        return cls(masks=MaskSet.ones(shape), target=MaskSet.ones(shape), growth_budget=growth_budget)

    def record_step_time(self, seconds: float) -> None:
        self.step_times = [*self.step_times, seconds][-STEP_TIMES_KEPT:]

    def mean_step_time(self) -> float | None:
        """The mean of the last few steps' wall times; None before the first step."""
        return sum(self.step_times) / len(self.step_times) if self.step_times else None

    def to_checkpoint(self) -> dict:
        """`apt_<field>` -> plain value (tensors, dicts of tensors, numbers), for DeepSpeed's client state."""
        return {PREFIX + f.name: _encode(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_checkpoint(cls, client: dict) -> AptState:
        """The inverse of `to_checkpoint`; a field an older checkpoint lacks keeps its default."""
        values = {}
        for f in fields(cls):
            if PREFIX + f.name in client:
                values[f.name] = _decode(f.name, client[PREFIX + f.name])
        return cls(**values)

    def final_tensors(self) -> dict[str, torch.Tensor]:
        """masks.*, target.*, ema.* and alive.* as one flat dict, for `finetune/apt_state.safetensors`."""
        tensors = {f"masks.{k}": v for k, v in self.masks.to_dict().items()}
        tensors |= {f"target.{k}": v for k, v in self.target.to_dict().items()}
        if self.ema is not None:
            tensors |= {f"ema.{k}": v for k, v in asdict(self.ema).items()}
        if self.alive is not None:
            tensors |= {f"alive.{k}": v for k, v in self.alive.to_dict().items()}
        return tensors


_MASK_FIELDS = ("masks", "target", "alive")


def _encode(value):
    if isinstance(value, MaskSet):
        return value.to_dict()
    if isinstance(value, SalienceScores):
        return asdict(value)
    return value


def _decode(name: str, value):
    if value is None:
        return None
    if name in _MASK_FIELDS:
        return MaskSet.from_dict(value)
    if name == "ema":
        return SalienceScores(**value)
    return value
