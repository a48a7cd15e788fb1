"""pruning.criterion: each score is what its docstring says, computed independently here."""

import pytest
import torch
from builders import with_trained_adapters

from pipeline import criteria
from pipeline.apt.blocks import ModelShape
from pipeline.apt.compaction import narrow_alive, plan_compaction, slice_scores
from pipeline.apt.masks import MaskSet
from pipeline.apt.salience import SalienceAccumulator
from pipeline.apt.weight_scores import magnitude_scores, random_scores, select_alive

TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")


def named_weights(model):
    params = dict(model.named_parameters())
    return params.__getitem__, params.__contains__


@pytest.mark.parametrize("arch, tie", [("llama", False), ("qwen2", True)])
def test_magnitude_splits_every_weight_once(tiny_model, arch, tie):
    """Every weight lies in one hidden channel (q/k/v biases in none), every attention weight and bias in one
    head's share, every MLP weight in one neuron."""
    model = tiny_model(arch, tie=tie)
    shape = ModelShape.from_config(model.config)
    scores = magnitude_scores(shape, *named_weights(model))
    squares = {name: param.detach().double().square().sum() for name, param in model.named_parameters()}
    biases = {name: value for name, value in squares.items() if name.endswith("_proj.bias")}
    assert (len(biases) > 0) == (arch == "qwen2")
    torch.testing.assert_close(scores.hidden.sum(), sum(squares.values()) - sum(biases.values()))
    for index in range(shape.num_layers):
        attention = sum(value for name, value in squares.items() if name.startswith(f"model.layers.{index}.self_attn"))
        mlp = sum(value for name, value in squares.items() if name.startswith(f"model.layers.{index}.mlp"))
        torch.testing.assert_close(scores.head[index].sum(), attention)
        torch.testing.assert_close(scores.neuron[index].sum(), mlp)


def test_magnitude_reads_the_checkpoint_as_the_model_holds_it(tiny_model, tmp_path):
    model = tiny_model("mistral", tie=True)
    model.save_pretrained(str(tmp_path))
    shape = ModelShape.from_config(model.config)
    from_disk = criteria.fixed_scores("magnitude", tmp_path, shape, seed=0)
    in_memory = magnitude_scores(shape, *named_weights(model))
    for name in ("head", "neuron", "hidden"):
        torch.testing.assert_close(getattr(from_disk, name), getattr(in_memory, name))


def test_random_scores_follow_the_seed_and_activation_criteria_have_none(tmp_path):
    shape = ModelShape(vocab_size=8, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4,
                       intermediate_size=12, tie_word_embeddings=False, qkv_bias=False)
    first, again, other = (criteria.fixed_scores("random", tmp_path, shape, seed) for seed in (0, 0, 1))
    assert torch.equal(first.neuron, again.neuron) and not torch.equal(first.neuron, other.neuron)
    assert torch.equal(first.hidden, random_scores(shape, criteria.RANDOM_SEED_OFFSET).hidden)
    assert all(criteria.fixed_scores(name, tmp_path, shape, 0) is None for name in ("apt", "taylor", "activation"))


def backward_once(model, accumulator, input_ids):
    accumulator.attach(model)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    accumulator.detach()


def test_taylor_is_the_gradient_of_the_loss_by_a_block_mask(tiny_model, input_ids):
    """|∂L/∂m| for a head's and a neuron's mask, taken by autograd through the mask itself."""
    model = with_trained_adapters(tiny_model("llama"), TARGETS)
    shape = ModelShape.from_config(model.config)
    accumulator = SalienceAccumulator(shape, products=True)
    backward_once(model, accumulator, input_ids)
    scores = accumulator.scores("taylor")

    store = model.apt_masks
    store.head_mask = torch.ones_like(store.head_mask, requires_grad=True)
    store.neuron_mask = torch.ones_like(store.neuron_mask, requires_grad=True)
    model.zero_grad()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    torch.testing.assert_close(scores.head, store.head_mask.grad.double().abs(), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(scores.neuron, store.neuron_mask.grad.double().abs(), rtol=1e-4, atol=1e-9)
    act_grad = accumulator.sums["hidden"]["act_grad"]
    torch.testing.assert_close(scores.hidden, act_grad.sum(0).abs())  # every sublayer output of the channel
    with pytest.raises(ValueError, match="products=True"):
        SalienceAccumulator(shape).scores("taylor")


def test_activation_is_the_mean_square_of_the_block_input(tiny_model, input_ids):
    model = with_trained_adapters(tiny_model("llama"), TARGETS)
    shape = ModelShape.from_config(model.config)
    seen = {}
    site = model.model.layers[1].mlp.down_proj.in_mask
    handle = site.register_forward_pre_hook(lambda module, args: seen.setdefault("h", args[0].detach()))
    accumulator = SalienceAccumulator(shape)
    backward_once(model, accumulator, input_ids)
    handle.remove()
    h = seen["h"].reshape(-1, shape.intermediate_size).double()
    torch.testing.assert_close(accumulator.scores("activation").neuron[1], h.square().mean(0))


def test_a_compacted_model_gets_its_surviving_blocks_fixed_scores(tiny_model):
    """select_alive on the original scores = the scores sliced along with the model (how an EMA follows a cut)."""
    model = tiny_model("llama")
    shape = ModelShape.from_config(model.config)
    scores = magnitude_scores(shape, *named_weights(model))
    masks = MaskSet.ones(shape)
    masks.kv_mask[:, 0] = 0
    masks.head_mask[:, :2] = 0
    masks.neuron_mask[:, ::3] = 0
    masks.hidden_mask[:16] = 0
    plan = plan_compaction(masks, masks, shape, "kv_group")
    alive = narrow_alive(MaskSet.ones(shape), plan)
    selected, sliced = select_alive(scores, alive), slice_scores(scores, plan)
    for name in ("head", "neuron", "hidden"):
        torch.testing.assert_close(getattr(selected, name), getattr(sliced, name))
