"""The distillation teacher keeps the function it had when it gets a model of its own, and a compacted student's
hidden states are compared with it exactly as before the cut."""

import torch
from builders import with_trained_adapters

from pipeline.apt.distill import distill_loss, freeze_adapters, match_layers, widen_hidden
from pipeline.config import ModelSection
from pipeline.teacher import SharedTeacher, load_teacher, write_teacher

BUILT_MODEL = ModelSection(path=None)
"""A model built from the config in the run directory (the default model.path is the committed base model)."""

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


class Plain:
    """What the recipe calls `engine`: callable, with the model as `.module`."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kwargs):
        return self.module(**kwargs)


def test_written_teacher_computes_the_shared_teachers_outputs(tmp_path, tiny_model, input_ids, random_masks):
    base = tiny_model()
    base.save_pretrained(str(tmp_path / "base"))
    student = with_trained_adapters(tiny_model(), TARGETS)
    shared = SharedTeacher(freeze_adapters(student))
    write_teacher(shared.adapters, tmp_path / "base", tmp_path / "teacher", scaling=8.0 / 4, dtype=torch.float32,
                  trust_remote_code=False)
    frozen = load_teacher(BUILT_MODEL, tmp_path / "teacher", torch.float32, torch.device("cpu"))
    assert not any(p.requires_grad for p in frozen.model.parameters())

    expected = shared.outputs(Plain(student), input_ids)
    actual = frozen.outputs(None, input_ids)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-4, atol=1e-5)
    for got, want in zip(actual.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_widened_compacted_student_gives_the_masked_students_loss_and_gradient():
    generator = torch.Generator().manual_seed(0)
    width, alive = 12, torch.tensor([0, 2, 3, 7, 8, 11])
    kept = torch.zeros(width).index_fill(0, alive, 1.0)
    teacher = tuple(torch.randn(2, 5, width, generator=generator) for _ in range(3))
    masked = tuple((torch.randn(2, 5, width, generator=generator) * kept).requires_grad_() for _ in range(3))
    compacted = tuple(h.detach()[..., alive].clone().requires_grad_() for h in masked)
    logits_s, logits_t = torch.randn(2, 5, 7, generator=generator), torch.randn(2, 5, 7, generator=generator)

    def loss(student):
        layer_map = match_layers(student, teacher, [1, 2])
        return distill_loss(logits_s, logits_t, student, teacher, layer_map)

    full, cut = loss(masked), loss(widen_hidden(compacted, alive, width))
    torch.testing.assert_close(cut, full)
    full.backward()
    cut.backward()
    for before, after in zip(masked, compacted, strict=True):  # a student layer no teacher layer took has none
        assert (before.grad is None) == (after.grad is None)
        if before.grad is not None:
            torch.testing.assert_close(after.grad, before.grad[..., alive])
    assert any(h.grad is not None for h in compacted)
    assert widen_hidden(masked, None, width) is masked
