"""The shape chosen by measured loss: lowest mean LM loss wins, the same on N ranks as in one process."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline import config as config_lib
from pipeline.apt.adapters import get_masks, inject_adapters, set_masks
from pipeline.apt.blocks import ModelShape, kept_sizes
from pipeline.apt.masks import MaskSet
from pipeline.apt.search import search_masks
from pipeline.apt.shapes import candidate_shapes, masks_for_shape, shape_fraction, uniform_shape
from pipeline.config import PruningSection
from pipeline.shape_choice import choose_shape, final_remaining, influence_order, search_target

from harness import spawn

BATCHES = 4


def tiny_llama():
    """A wrapped 2-layer GQA LLaMA with random weights (the same in every process)."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    inject_adapters(model, targets=["q_proj", "v_proj"], rank=2, alpha=4.0, dropout=0.5,
                    generator=torch.Generator().manual_seed(0))
    return model.train()


def batches() -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(BATCHES):
        input_ids = torch.randint(0, 64, (2, 12), generator=generator)
        labels = input_ids.clone()
        labels[0, :5] = -100  # prompt tokens the loss leaves out: batches weigh by scored tokens
        out.append({"input_ids": input_ids, "labels": labels})
    return out


def candidates(model) -> list[MaskSet]:
    shape = ModelShape.from_config(model.config)
    generator = torch.Generator().manual_seed(2)
    scores = {"head": torch.rand(2, 4, generator=generator), "neuron": torch.rand(2, 48, generator=generator),
              "hidden": torch.rand(32, generator=generator)}
    shapes = candidate_shapes(shape, 0.55, attention_mode="query_in_group", round_to=4, min_hidden=8, count=5)
    return [masks_for_shape(shape, scores, kept, attention_mode="query_in_group") for kept in shapes]


def direct_losses(model, masks_list, data) -> list[float]:
    """Mean loss over every scored token of all batches, by hand."""
    model.eval()
    losses = []
    with torch.no_grad():
        for masks in masks_list:
            set_masks(model, masks)
            total, count = 0.0, 0
            for batch in data:
                logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
                targets = batch["labels"][:, 1:]
                total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1),
                                                                 ignore_index=-100, reduction="sum"))
                count += int((targets != -100).sum())
            losses.append(total / count)
    return losses


def test_choose_shape_picks_the_lowest_loss_and_restores_the_model():
    model = tiny_llama()
    masks_list = candidates(model)
    assert len(masks_list) >= 3
    current = get_masks(model)
    current.neuron_mask[:, :3] = 0.5  # gradual masks, as mid-window
    set_masks(model, current)
    choice = choose_shape(model, masks_list, batches(), lambda m: set_masks(model, m), restore=current)
    assert model.training  # train mode is back (the choice ran in eval mode: no adapter dropout)
    assert torch.equal(get_masks(model).neuron_mask, current.neuron_mask)
    expected = direct_losses(tiny_llama(), masks_list, batches())
    assert choice.losses == pytest.approx(expected, rel=1e-5)
    assert choice.index == min(range(len(expected)), key=expected.__getitem__)
    assert choice.tokens == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches())


def test_ties_go_to_the_first_candidate_and_one_candidate_needs_no_forward():
    model = tiny_llama()
    masks = candidates(model)
    choice = choose_shape(model, [masks[1], masks[0], masks[1]], batches()[:1], lambda m: set_masks(model, m))
    assert choice.losses[0] == choice.losses[2]
    assert choice.index == (0 if choice.losses[0] <= choice.losses[1] else 1)

    def never(_):
        raise AssertionError("no forward is needed for one candidate")

    assert choose_shape(model, masks[:1], [], never).index == 0
    with pytest.raises(ValueError, match="no candidate"):
        choose_shape(model, [], batches(), never)


def rank_choice(rank, world_size, out_dir):
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = tiny_llama()
        choice = choose_shape(model, candidates(model), batches()[rank::world_size], lambda m: set_masks(model, m))
        order = influence_order(model, batches()[rank::world_size])
        (out_dir / f"rank{rank}.json").write_text(json.dumps({"index": choice.index, "losses": choice.losses,
                                                              "tokens": choice.tokens, "order": order}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_choose_what_one_process_chooses(tmp_path):
    spawn(rank_choice, 2, tmp_path)
    model = tiny_llama()
    one = choose_shape(model, candidates(model), batches(), lambda m: set_masks(model, m))
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert results[0] == results[1]  # bit-equal on both ranks: one all-reduce, the same reduced sums
    assert results[0]["index"] == one.index and results[0]["tokens"] == one.tokens
    assert results[0]["order"] == influence_order(model, batches())  # the layers by influence, lowest first
    assert results[0]["losses"] == pytest.approx(list(one.losses), rel=1e-9)


def pruning(**fields) -> PruningSection:
    defaults = dict(shape_search="measured", shape_candidates=5, attention_mode="kv_group", round_to=8, min_hidden=8,
                    target_remaining=0.5)
    return dataclasses.replace(PruningSection(), **(defaults | fields))


def test_search_target_by_shape_search():
    shape = ModelShape.from_config(tiny_llama().config)
    generator = torch.Generator().manual_seed(3)
    scores = {"head": torch.rand(2, 4, generator=generator), "neuron": torch.rand(2, 48, generator=generator),
              "hidden": torch.rand(32, generator=generator)}
    masks, shapes, choice = search_target(shape, scores, 0.6, pruning(shape_search="global"))
    assert choice is None and shapes == [kept_sizes(masks)]
    assert torch.equal(masks.hidden_mask, search_masks(shape, scores, 0.6, round_to=8, min_hidden=8).hidden_mask)

    picked = []

    def measure(masks_list):
        picked.append(len(masks_list))
        return SimpleNamespace(index=len(masks_list) - 1, losses=(0.0,) * len(masks_list))

    masks, shapes, choice = search_target(shape, scores, 0.6, pruning(), measure=measure)
    assert picked == [len(shapes)] and len(shapes) > 1 and kept_sizes(masks) == shapes[-1]
    masks, shapes, choice = search_target(shape, scores, 0.6, pruning())  # no measure: the even split
    assert kept_sizes(masks) == shapes[0] and choice is None

    target = pruning(target_shape=(16, 2, 1, 24))
    masks, shapes, _ = search_target(shape, scores, 0.01, target, measure=measure)
    assert kept_sizes(masks).hidden == 16 and kept_sizes(masks).neurons == (24, 24)
    assert final_remaining(target, shape) == shape_fraction(shape, uniform_shape(shape, 16, 2, 1, 24))
    assert final_remaining(pruning(), shape) == 0.5


def test_config_checks_the_new_pruning_fields(tiny_config):
    cfg = tiny_config()
    assert cfg.pruning.shape_search == "measured" and cfg.pruning.target_shape is None
    assert tiny_config("pruning.target_shape=[32, 2, 1, 64]").pruning.target_shape == (32, 2, 1, 64)
    for override, message in (("pruning.target_shape=[32, 3, 2, 64]", "multiple of kv_heads"),
                              ("pruning.target_shape=[30, 4, 2, 64]", "multiple of heads"),
                              ("pruning.target_shape=[32, 4, 2]", "four or five sizes"),
                              ("pruning.shape_candidates=0", "shape_candidates"),
                              ("pruning.shape_batches=0", "shape_batches"),
                              ("pruning.shape_search=best", "shape_search")):
        with pytest.raises(config_lib.ConfigError, match=message):
            tiny_config(override)
    with pytest.raises(config_lib.ConfigError, match="needs layout uniform"):
        tiny_config("pruning.target_shape=[32, 2, 1, 64]", "pruning.layout=per_layer")


def test_influence_order_ranks_layers_by_block_influence_lowest_first():
    from pipeline.apt.depth import BlockInfluence

    model = tiny_llama().eval()
    influence = BlockInfluence(2)
    influence.attach(model)
    with torch.no_grad():
        for batch in batches():
            model(input_ids=batch["input_ids"])
    influence.detach()
    assert influence_order(model, batches()) == influence.scores().argsort().tolist()
    assert model.training is False and not any(layer._forward_hooks for layer in model.model.layers)
