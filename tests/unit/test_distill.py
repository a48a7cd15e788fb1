"""Self-distillation: the teacher is the same model with frozen adapters and masks off, switched in and out."""

import pytest
import torch
from builders import with_trained_adapters

from pipeline.apt.adapters import get_masks, named_adapters, set_masks
from pipeline.apt.blocks import ModelShape
from pipeline.apt.distill import distill_loss, freeze_adapters, layer_errors, match_layers, teacher_mode
from pipeline.apt.masks import MaskSet

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def student(tiny_model, seed=0):
    """A tiny LLaMA with adapters whose B is nonzero, as after some training."""
    return with_trained_adapters(tiny_model(), TARGETS, seed)


def forward(model, input_ids):
    return model(input_ids, output_hidden_states=True)


def perturb_adapters(model, seed=2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in named_adapters(model):
            adapter.lora_B.add_(0.1 * torch.randn(adapter.lora_B.shape, generator=generator))


def test_teacher_with_the_students_adapters_and_full_masks_gives_zero_loss(tiny_model, input_ids):
    model = student(tiny_model)
    teacher = freeze_adapters(model)
    out = forward(model, input_ids)
    with teacher_mode(model, teacher):
        teacher_out = forward(model, input_ids)
    layer_map = {i: i for i in range(1, len(out.hidden_states))}
    loss = distill_loss(out.logits, teacher_out.logits, out.hidden_states, teacher_out.hidden_states, layer_map)
    assert loss.item() == 0.0


def test_teacher_mode_restores_the_student_exactly(tiny_model, input_ids, random_masks):
    model = student(tiny_model)
    teacher = freeze_adapters(model)
    perturb_adapters(model)
    masks = random_masks(ModelShape.from_config(model.config), torch.Generator().manual_seed(3))
    set_masks(model, masks)
    before = forward(model, input_ids).logits
    with teacher_mode(model, teacher):
        teacher_logits = forward(model, input_ids).logits
    after = forward(model, input_ids).logits
    assert torch.equal(before, after)
    assert not torch.allclose(teacher_logits, before)
    assert all(torch.equal(getattr(get_masks(model), k), getattr(masks, k)) for k in masks.to_dict())


def test_teacher_is_the_model_with_frozen_adapters_and_masks_off(tiny_model, input_ids, random_masks):
    model = student(tiny_model)
    teacher = freeze_adapters(model)
    expected = forward(model, input_ids).logits  # masks are all ones after injection
    perturb_adapters(model)
    set_masks(model, random_masks(ModelShape.from_config(model.config), torch.Generator().manual_seed(3)))
    with teacher_mode(model, teacher):
        assert torch.equal(forward(model, input_ids).logits, expected)


def test_gradients_reach_only_the_student_adapters(tiny_model, input_ids, random_masks):
    model = student(tiny_model)
    teacher = freeze_adapters(model)
    frozen = {name: (a.clone(), b.clone()) for name, (a, b) in teacher.items()}
    perturb_adapters(model)
    set_masks(model, random_masks(ModelShape.from_config(model.config), torch.Generator().manual_seed(3)))
    with teacher_mode(model, teacher):
        teacher_out = forward(model, input_ids)
    out = forward(model, input_ids)
    layer_map = match_layers(out.hidden_states, teacher_out.hidden_states, [1, 2])
    loss = distill_loss(out.logits, teacher_out.logits, out.hidden_states, teacher_out.hidden_states, layer_map)
    loss.backward()
    adapter_params = {id(p) for _, a in named_adapters(model) for p in (a.lora_A, a.lora_B)}
    for name, param in model.named_parameters():
        has_grad = param.grad is not None and param.grad.abs().sum() > 0
        assert has_grad == (id(param) in adapter_params), name
    assert teacher_out.logits.grad_fn is None
    for name, (a, b) in teacher.items():
        assert not a.requires_grad and torch.equal(a, frozen[name][0]) and torch.equal(b, frozen[name][1])


def test_kl_term_is_temperature_scaled_and_layer_term_is_mse():
    student_logits, teacher_logits = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    hidden = (torch.zeros(2, 3, 4), torch.ones(2, 3, 4))
    t = 2.0
    p = torch.softmax(teacher_logits / t, -1)
    kl = (p * (p.log() - torch.log_softmax(student_logits / t, -1))).sum(-1).mean() * t**2
    loss = distill_loss(student_logits, teacher_logits, hidden, hidden[::-1], {0: 0}, logit_weight=1.0,
                        layer_weight=1.0)
    torch.testing.assert_close(loss, kl + 1.0)


def test_layer_matching_takes_the_nearest_student_layer_without_crossing():
    base = [torch.full((1, 2), float(v)) for v in (0, 1, 2, 3)]
    student_hidden = tuple(base)
    teacher_hidden = (base[0], base[2], base[1], base[3])
    assert match_layers(student_hidden, teacher_hidden, [1, 2, 3]) == {1: 2, 2: 2, 3: 3}


def test_ranks_match_layers_as_one_process_on_the_whole_batch():
    # Teacher layer 1 is zero. Alone, rank 0 would match student layer 1 (error 0 < 1), rank 1 student layer 2
    # (1 < 9); over the whole batch layer 2 wins (mean errors 4.5 against 1).
    def hidden(*values):
        return tuple(torch.full((1, 2), float(v)) for v in values)

    ranks = [(hidden(5, 0, 1, 5), hidden(0, 0)), (hidden(5, 3, 1, 5), hidden(0, 0))]
    whole = tuple(tuple(torch.cat(layers) for layers in zip(*side, strict=True)) for side in zip(*ranks, strict=True))
    tables = [layer_errors(student_hidden, teacher_hidden, [1]) for student_hidden, teacher_hidden in ranks]

    def all_reduce_mean(errors):  # what dist.all_reduce_mean returns on both ranks
        return sum(tables) / len(tables)

    assert [match_layers(*rank, [1]) for rank in ranks] == [{1: 1}, {1: 2}]  # without the reduce they disagree
    assert match_layers(*whole, [1]) == {1: 2}
    assert [match_layers(*rank, [1], reduce=all_reduce_mean) for rank in ranks] == [{1: 2}, {1: 2}]


def test_masks_are_restored_even_when_the_teacher_forward_fails(tiny_model):
    model = student(tiny_model)
    masks = MaskSet.ones(ModelShape.from_config(model.config))
    masks.hidden_mask[:8] = 0
    set_masks(model, masks)
    with pytest.raises(RuntimeError, match="boom"), teacher_mode(model, freeze_adapters(model)):
        raise RuntimeError("boom")
    assert torch.equal(get_masks(model).hidden_mask, masks.hidden_mask)
    assert all(adapter.teacher_lora is None for _, adapter in named_adapters(model))
