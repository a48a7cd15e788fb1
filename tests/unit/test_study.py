"""The quality study's own code (bench/study): baseline scores, masks at the exact budget, recovery, its configs."""

from __future__ import annotations

import copy
import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch

from pipeline import config as config_lib
from pipeline.apt.blocks import ModelShape, kept_sizes, remaining_params, total_params
from pipeline.apt.slicing import slice_model
from pipeline.apt.weight_scores import random_scores

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/ is not an installed package; `python -m pytest` from the root has it already
    sys.path.insert(0, str(REPO))
apt_run = importlib.import_module("bench.study.apt_run")
baselines = importlib.import_module("bench.study.baselines")
recover = importlib.import_module("bench.study.recover")
run_study = importlib.import_module("bench.study.run_study")

PRUNING = config_lib.PruningSection(round_to=8, min_hidden=16)
ZEROED_LAYER, ZEROED_NEURON, ZEROED_HEAD = 1, 5, 2


@pytest.fixture
def model(tiny_model):
    """hidden 64, 2 layers, 4 heads / 2 KV heads, intermediate 96, vocab 128."""
    return tiny_model("llama")


def zero_blocks(model) -> None:
    """Zero one MLP neuron (gate and up rows, down column) and one query head (q rows, o columns)."""
    layer = model.model.layers[ZEROED_LAYER]
    head_dim = layer.self_attn.head_dim
    rows = slice(ZEROED_HEAD * head_dim, (ZEROED_HEAD + 1) * head_dim)
    with torch.no_grad():
        layer.mlp.gate_proj.weight[ZEROED_NEURON] = 0
        layer.mlp.up_proj.weight[ZEROED_NEURON] = 0
        layer.mlp.down_proj.weight[:, ZEROED_NEURON] = 0
        layer.self_attn.q_proj.weight[rows] = 0
        layer.self_attn.o_proj.weight[:, rows] = 0


def train_split(rows: int = 16, seq_len: int = 12, vocab: int = 128):
    ids = torch.randint(0, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(3))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")


@pytest.mark.parametrize("method", ["magnitude", "taylor"])
def test_a_zeroed_block_scores_zero_and_is_pruned_first(model, method):
    zero_blocks(model)
    batches = [train_split()[:4], train_split()[4:8]]
    scores = baselines.magnitude_scores(model) if method == "magnitude" else baselines.taylor_scores(model, batches)
    assert scores.neuron[ZEROED_LAYER, ZEROED_NEURON] == 0
    assert int(scores.neuron[ZEROED_LAYER].argmin()) == ZEROED_NEURON
    assert scores.neuron[ZEROED_LAYER].sort().values[1] > 0  # the only zero
    shape = ModelShape.from_config(model.config)
    masks = baselines.prune_masks(shape, scores, 0.8, PRUNING)
    assert masks.neuron_mask[ZEROED_LAYER, ZEROED_NEURON] == 0
    assert 0 < masks.neuron_mask[ZEROED_LAYER].sum() < shape.intermediate_size  # pruned while others were kept


def test_taylor_scores_leave_the_model_as_they_found_it(model):
    model.requires_grad_(False)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    baselines.taylor_scores(model, [train_split()[:4]])
    for name, param in model.named_parameters():
        assert not param.requires_grad and param.grad is None
        assert torch.equal(param, before[name])


@pytest.mark.parametrize("method", baselines.METHODS)
@pytest.mark.parametrize("remaining", [0.7, 0.5, 0.3])
def test_masks_meet_the_budget_exactly(model, method, remaining):
    """Within the budget, and the sliced model has exactly the parameters the formula gives."""
    shape = ModelShape.from_config(model.config)
    scores = {"magnitude": lambda: baselines.magnitude_scores(model),
              "random": lambda: random_scores(shape, seed=0),
              "taylor": lambda: baselines.taylor_scores(model, [train_split()[:4]])}[method]()
    masks = baselines.prune_masks(shape, scores, remaining, PRUNING)
    masks.check_gqa(shape, PRUNING.attention_mode)
    expected = remaining_params(shape, kept_sizes(masks))
    assert expected <= remaining * total_params(shape)
    sliced = slice_model(model, masks)
    assert recover.count_params(sliced) == expected


def test_recovery_trains_adapters_and_returns_the_sliced_model(model):
    shape = ModelShape.from_config(model.config)
    masks = baselines.prune_masks(shape, baselines.magnitude_scores(model), 0.5, PRUNING)
    untrained = slice_model(copy.deepcopy(model), masks)
    cfg = SimpleNamespace(run=config_lib.RunSection(seed=0), apt=config_lib.AptSection(rank=4, alpha=8.0),
                          train=config_lib.TrainSection(steps=2, micro_batch_size=4, lr=1e-2, warmup_steps=0))
    recovered = recover.recover(model, masks, train_split(), cfg)
    assert not hasattr(recovered, "apt_masks")  # merged: a plain LlamaForCausalLM
    assert recovered.config.hidden_size == int(masks.hidden_mask.sum())
    assert recover.count_params(recovered) == remaining_params(shape, kept_sizes(masks))
    ids = train_split()[:2]["input_ids"]
    with torch.no_grad():
        after, before = recovered(input_ids=ids).logits, untrained(input_ids=ids).logits
    assert torch.isfinite(after).all() and not torch.allclose(after, before)  # the adapters learned something
    assert recover.evaluate(recovered, train_split()) > 1


@pytest.mark.parametrize("mode", ["kv_group", "query_in_group"])
def test_recovery_on_the_cut_model_equals_recovery_on_the_masked_one(tiny_model, mode):
    """Cutting the pruned blocks out before training changes the cost, not what is learned."""
    pruning = config_lib.PruningSection(attention_mode=mode, round_to=8, min_hidden=16)
    cfg = SimpleNamespace(run=config_lib.RunSection(seed=0), apt=config_lib.AptSection(rank=4, alpha=8.0),
                          train=config_lib.TrainSection(steps=3, micro_batch_size=4, lr=1e-2, warmup_steps=1))
    shape = ModelShape.from_config(tiny_model("llama").config)
    masks = baselines.prune_masks(shape, random_scores(shape, seed=1), 0.5, pruning)
    cut = recover.recover(tiny_model("llama"), masks, train_split(), cfg, compact=True)
    masked = recover.recover(tiny_model("llama"), masks, train_split(), cfg, compact=False)
    ids = train_split()[:2]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(cut(input_ids=ids).logits, masked(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", ["full", "quick"])
def test_presets_give_valid_pipeline_configs(tmp_path, preset):
    """The APT runs' configs load (pruning window, mask steps and train steps agree) for every target."""
    settings = run_study.PRESETS[preset]
    for target in run_study.TARGETS:
        cfg = apt_run.run_config(tmp_path, "apt", settings.data, settings.recovery, model_path=tmp_path,
                                 tokenizer_path=tmp_path, target_remaining=target)
        assert cfg.pruning.end_step < cfg.train.steps and cfg.deepspeed.num_gpus == 1
        assert cfg.train.steps == settings.recovery.steps and cfg.apt.rank == settings.recovery.rank
