"""The self-distillation teacher: the model as it was when pruning started, every block in, adapters frozen.

Until the first compaction the teacher shares the student's backbone (`teacher_mode`: the frozen adapters and every
mask at one, for one forward), which costs only the adapter copies. A compaction cuts blocks out of that backbone,
so just before the first one the teacher becomes a model of its own: the original base with the frozen adapters
merged in, written once by the streaming export and loaded frozen, whole on every rank. Both forms compute the same
function, so the switch leaves the teacher as it was.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import dist
from pipeline.apt.distill import TeacherAdapters, teacher_mode
from pipeline.apt.masks import MaskSet
from pipeline.export import export_pruned
from pipeline.model_io import load_base_model, model_shape
from pipeline.stage import save_tensors

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""`train.precision` -> the dtype the teacher is stored and run in (the student's compute dtype)."""


class SharedTeacher:
    """The student's own backbone with the frozen adapters and no masks, for one forward at a time."""

    def __init__(self, adapters: TeacherAdapters):
        self.adapters = adapters

    def outputs(self, engine, input_ids: torch.Tensor):
        with teacher_mode(engine.module, self.adapters):
            return engine(input_ids=input_ids, output_hidden_states=True)

    def destroy(self) -> None:
        pass


class FrozenTeacher:
    """A separate frozen model of the original shape."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def outputs(self, engine, input_ids: torch.Tensor):
        return self.model(input_ids=input_ids, output_hidden_states=True)

    def destroy(self) -> None:
        self.model = None


def write_teacher(adapters: TeacherAdapters, base_dir: Path, out_dir: Path, scaling: float, dtype: torch.dtype,
                  trust_remote_code: bool) -> None:
    """The original base with the frozen adapters folded in, every block kept (rank 0; streamed per layer)."""
    adapters_file = out_dir.with_name(f".{out_dir.name}-adapters.safetensors")
    tensors = {}
    for name, (lora_a, lora_b) in adapters.items():
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = lora_a.float(), lora_b.float()
    save_tensors(tensors, adapters_file)
    shape = model_shape(base_dir, trust_remote_code)
    export_pruned(base_dir=base_dir, adapters_path=adapters_file, masks=MaskSet.ones(shape), scaling=scaling,
                  dtype=dtype, out_dir=out_dir, trust_remote_code=trust_remote_code)
    adapters_file.unlink()


def load_teacher(model_cfg, directory: Path, dtype: torch.dtype, device: torch.device) -> FrozenTeacher:
    """The written teacher, frozen and whole on every rank's `device`, in the training dtype (every rank calls this).

    A plain module, not partitioned under ZeRO-3 (that would need a second, optimizer-less engine): it costs one bf16
    copy of the base per rank, which `apt-pipeline plan` shows as "+ teacher".
    """
    # {}: no ZeRO-3 partitioning; read in the training dtype directly, not through a whole fp32 copy.
    model = load_base_model(directory, model_cfg, {}, dtype)
    model.requires_grad_(False)
    return FrozenTeacher(model.to(device).eval())


def materialize(shared: SharedTeacher, model_cfg, base_dir: Path, out_dir: Path, scaling: float, dtype: torch.dtype,
                device: torch.device) -> FrozenTeacher:
    """Turn the shared teacher into its own model before a compaction cuts the backbone (collective)."""
    if dist.is_main():
        write_teacher(shared.adapters, base_dir, out_dir, scaling, dtype, model_cfg.trust_remote_code)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank reads what rank 0 wrote
    return load_teacher(model_cfg, out_dir, dtype, device)
