"""Self-distillation without a second model (docs/design.md §5).

The teacher is the student's own frozen backbone with a frozen copy of the adapters taken before pruning, run with
every mask at one. `teacher_mode` switches the model into that teacher for one forward and back; only small adapter
tensors are stored, so memory stays near one model. The loss is the official APT/CoFi one: KL at temperature T
(times T²) on the logits plus an MSE between mapped hidden states.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.apt.adapters import MASK_NAMES, named_adapters

TeacherAdapters = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Adapter module name -> frozen (A, B)."""


@torch.no_grad()
def freeze_adapters(model: nn.Module, read: Callable[[nn.Parameter], torch.Tensor] | None = None,
                    device: torch.device | None = None) -> TeacherAdapters:
    """Detached copies of every adapter's (A, B) in the model's dtype, on `device` (default: the parameter's).

    `read` returns a parameter's full value; under ZeRO pass `deepspeed.utils.safe_get_full_fp32_param`
    (a collective: call it on every rank), whose fp32 copy may live elsewhere (CPU with optimizer offload).
    """
    read = read or (lambda param: param.detach())

    def frozen(param: nn.Parameter) -> torch.Tensor:
        return read(param).to(device=device or param.device, dtype=param.dtype, copy=True)

    return {name: (frozen(adapter.lora_A), frozen(adapter.lora_B)) for name, adapter in named_adapters(model)}


@contextmanager
def teacher_mode(model: nn.Module, teacher: TeacherAdapters) -> Iterator[None]:
    """Inside, the model computes the teacher under `torch.no_grad`: frozen adapters, every mask one.

    Nothing the student trains is touched (the adapters read `teacher_lora`, the mask store gets other buffers),
    so DeepSpeed's partitioned parameters stay as they are and leaving restores the student exactly.
    """
    store = model.apt_masks
    student_masks = {name: getattr(store, name) for name in MASK_NAMES}
    adapters = dict(named_adapters(model))
    try:
        for name, mask in student_masks.items():
            setattr(store, name, torch.ones_like(mask))  # replaces the registered buffer, leaves the student's alone
        for name, (teacher_A, teacher_B) in teacher.items():
            adapters[name].teacher_lora = (teacher_A, teacher_B)
        with torch.no_grad():
            yield
    finally:
        for name, mask in student_masks.items():
            setattr(store, name, mask)
        for adapter in adapters.values():
            adapter.teacher_lora = None


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_hidden: tuple[torch.Tensor, ...],
    teacher_hidden: tuple[torch.Tensor, ...],
    layer_map: dict[int, int],
    *,
    temperature: float = 2.0,
    logit_weight: float = 0.1,
    layer_weight: float = 0.9,
) -> torch.Tensor:
    """`logit_weight`·KL(teacher ‖ student) at `temperature` (× T²) + `layer_weight`·Σ MSE(student[j], teacher[i]).

    `layer_map` maps a teacher hidden-state index i to a student index j. The default weights are those of the
    official APT/CoFi code (distill_ce_loss_alpha = 0.1, distill_loss_alpha = 0.9). Pruned residual channels are
    zero in the student and add a constant to the MSE, without gradient.
    """
    vocab = student_logits.shape[-1]
    log_student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    # batchmean over tokens: the KL per token position, as with one logit row per example in the official code.
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2
    mse = sum(
        (F.mse_loss(student_hidden[j].float(), teacher_hidden[i].float()) for i, j in layer_map.items()),
        start=kl.new_zeros(()),
    )
    return logit_weight * kl + layer_weight * mse


@torch.no_grad()
def layer_errors(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
                 teacher_layers: list[int]) -> torch.Tensor:
    """MSE of every (teacher layer, student layer) pair: one row per teacher layer (ascending), one column per
    student hidden state."""
    return torch.stack([torch.stack([F.mse_loss(s.float(), teacher_hidden[i].float()) for s in student_hidden])
                        for i in sorted(teacher_layers)])


def match_layers(
    student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...], teacher_layers: list[int],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[int, int]:
    """For each teacher layer (ascending), the student layer at or after the previous match with the least MSE.

    The official code's "min distance matching with restriction" (layer_distill_version 4): matches never cross.
    `reduce` averages the error table over data-parallel ranks, so every rank picks the map one process would pick
    on the whole batch; a per-rank map would also give the ranks different backward graphs, which ZeRO-3's
    parameter prefetch trace does not survive (the ranks hung).
    """
    errors = layer_errors(student_hidden, teacher_hidden, teacher_layers)
    if reduce is not None:
        errors = reduce(errors)
    layer_map, first = {}, 0
    for i, row in zip(sorted(teacher_layers), errors, strict=True):
        first += int(row[first:].argmin())
        layer_map[i] = first
    return layer_map


def widen_hidden(hidden_states: tuple[torch.Tensor, ...], channels: torch.Tensor | None,
                 width: int) -> tuple[torch.Tensor, ...]:
    """A compacted student's hidden states placed back at their channels of the original width (zeros elsewhere).

    Before a compaction the pruned channels are zero in the student; putting them back as zeros keeps the
    distillation loss, its gradient and the layer matching exactly what they were.
    """
    if channels is None or hidden_states[0].shape[-1] == width:
        return hidden_states
    return tuple(h.new_zeros(*h.shape[:-1], width).index_copy(-1, channels.to(h.device), h) for h in hidden_states)


def distill_objective(student_out, teacher_out, weight: float, channels: torch.Tensor | None = None,
                      reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """`(1 − weight)·task + weight·distill` from the student's and the teacher's outputs (with hidden states).

    `channels`: a compacted student's surviving hidden channels in the teacher's width (None: same width);
    `reduce`: the mean over data-parallel ranks the layer matching uses (see `match_layers`).
    """
    width = teacher_out.hidden_states[0].shape[-1]
    student_hidden = widen_hidden(student_out.hidden_states, channels, width)
    layers = list(range(1, len(teacher_out.hidden_states)))
    layer_map = match_layers(student_hidden, teacher_out.hidden_states, layers, reduce)
    distill = distill_loss(student_out.logits, teacher_out.logits, student_hidden, teacher_out.hidden_states,
                           layer_map)
    return (1 - weight) * student_out.loss + weight * distill
