"""The APT state round-trips through a checkpoint's client state, every field, and writes the later stages' file."""

import dataclasses

import torch
from builders import GQA

from pipeline.apt.masks import MaskSet
from pipeline.apt.salience import SalienceScores
from pipeline.apt.state import AptState


def full_state(random_masks) -> AptState:
    generator = torch.Generator().manual_seed(0)
    scores = SalienceScores(head=torch.rand(2, 4), neuron=torch.rand(2, GQA.intermediate_size), hidden=torch.rand(64))
    return AptState(step=7, masks=random_masks(GQA, generator), target=random_masks(GQA, generator), ema=scores,
                    teacher={"model.layers.0.self_attn.q_proj": (torch.ones(4, 64), torch.zeros(64, 4))},
                    skipped_steps=2, growth_budget=123.0, alive=MaskSet.ones(GQA), base_model="compacted/step000007",
                    teacher_model="teacher", step_times=[0.4, 0.5, 0.6],
                    compactions=[{"step": 5, "params_before": 100, "params_after": 60, "step_time_before": 0.5}])


def equal(a, b) -> bool:
    if dataclasses.is_dataclass(a):
        return all(equal(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return all(equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_every_field_round_trips_through_the_client_state(random_masks):
    state = full_state(random_masks)
    client = state.to_checkpoint()
    assert set(client) == {f"apt_{f.name}" for f in dataclasses.fields(AptState)}
    assert equal(AptState.from_checkpoint(client), state)


def test_a_fresh_state_round_trips_and_older_checkpoints_keep_defaults():
    state = AptState.start(GQA, growth_budget=5.0)
    assert equal(AptState.from_checkpoint(state.to_checkpoint()), state)
    older = {k: v for k, v in state.to_checkpoint().items() if k not in ("apt_alive", "apt_teacher_model")}
    assert AptState.from_checkpoint(older).teacher_model is None


def test_final_tensors_hold_masks_targets_ema_and_alive(random_masks):
    tensors = full_state(random_masks).final_tensors()
    assert {key.split(".")[0] for key in tensors} == {"masks", "target", "ema", "alive"}
    assert "masks.hidden_mask" in tensors and "ema.head" in tensors


def test_only_the_last_step_times_are_kept():
    state = AptState()
    for seconds in (1.0, 2.0, 3.0, 4.0):
        state.record_step_time(seconds)
    assert state.step_times == [2.0, 3.0, 4.0] and state.mean_step_time() == 3.0
