"""The final shape: the salience stage chooses it by measured loss, finalize checks it against the exact budget."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.apt.adapters import get_masks, inject_adapters, set_masks
from pipeline.apt.blocks import ModelShape, kept_sizes, remaining_params, total_params
from pipeline.apt.masks import MaskSet
from pipeline.apt.salience import SalienceScores
from pipeline.apt.search import search_masks
from pipeline.config import FinalizeConfig, ModelSection, PruningSection, SalienceSection
from pipeline.layout import RunLayout
from pipeline.shape_choice import SHAPE_MASKS, SHAPE_REPORT
from pipeline.stage import save_tensors
from pipeline.stages import finalize
from pipeline.stages.salience import choose_final_shape

BUILT_MODEL = ModelSection(path=None)
"""A model built from the config in the run directory (the default model.path is the committed base model)."""


class Engine(nn.Module):
    """What the salience stage hands over: `.module` is the wrapped model, forward goes through to it."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **inputs):
        return self.module(**inputs)


def run_dir_with(tmp_path, trained: MaskSet | None = None):
    """A run directory holding what finalize reads: the base config, the fine-tune's masks, calibration scores."""
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    layout = RunLayout(tmp_path, BUILT_MODEL)
    config.save_pretrained(layout.base_model)
    inject_adapters(model, targets=["q_proj", "v_proj"], rank=2, alpha=4.0)
    shape = ModelShape.from_config(config)
    trained = trained or MaskSet.ones(shape)  # a fine-tune whose window was cut short: nothing pruned yet
    set_masks(model, trained)
    layout.finetune.mkdir(parents=True, exist_ok=True)
    save_tensors({f"masks.{k}": v for k, v in trained.to_dict().items()}, layout.apt_state)
    generator = torch.Generator().manual_seed(1)
    scores = SalienceScores(head=torch.rand(2, 4, generator=generator), neuron=torch.rand(2, 96, generator=generator),
                            hidden=torch.rand(64, generator=generator))
    layout.salience.parent.mkdir(parents=True)
    save_tensors({f"scores.{k}": v for k, v in vars(scores).items()}, layout.salience)
    return layout, model, shape, scores


def batch_at(index: int) -> dict:
    input_ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(index))
    return {"input_ids": input_ids, "labels": input_ids}


@pytest.mark.parametrize("layout_name", ["uniform", "per_layer"])
def test_salience_chooses_the_final_shape_and_finalize_keeps_it(tmp_path, layout_name):
    layout, model, shape, scores = run_dir_with(tmp_path)
    pruning = PruningSection(target_remaining=0.5, layout=layout_name, shape_candidates=4, shape_batches=2)
    cfg = SimpleNamespace(pruning=pruning, model=BUILT_MODEL, salience=SalienceSection(batches=3))
    choose_final_shape(cfg, layout, Engine(model), shape, scores, batch_at)
    assert torch.equal(get_masks(model).hidden_mask, torch.ones(64))  # the fine-tune's masks are back

    report = json.loads((layout.salience.parent / SHAPE_REPORT).read_text())
    rows = report["candidates"]
    assert len(rows) >= 2 and sum(row["chosen"] for row in rows) == 1
    chosen = next(row for row in rows if row["chosen"])
    assert chosen["loss"] == min(row["loss"] for row in rows)
    assert all(0.45 <= row["remaining_fraction"] <= 0.5 for row in rows)  # a tiny model: coarse steps

    summary = finalize.run(FinalizeConfig(model=BUILT_MODEL, pruning=pruning), tmp_path)
    final = MaskSet.from_dict(load_file(str(layout.final_masks)))
    written = MaskSet.from_dict(load_file(str(layout.salience.parent / SHAPE_MASKS)))
    assert all(torch.equal(a, b) for a, b in zip(final.to_dict().values(), written.to_dict().values(), strict=True))
    assert kept_sizes(final).hidden == chosen["hidden"] and list(kept_sizes(final).neurons) == chosen["neurons"]
    assert summary["remaining_fraction"] == pytest.approx(chosen["remaining_fraction"])
    masks_json = json.loads((layout.finalize / "masks.json").read_text())
    assert masks_json["shape_search"] == "measured" and masks_json["changed_from_finetune"]


def test_a_finetune_that_reached_its_target_keeps_its_masks(tmp_path):
    shape = ModelShape.from_config(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=16))
    generator = torch.Generator().manual_seed(5)
    trained = search_masks(shape, {"head": torch.rand(2, 4, generator=generator),
                                   "neuron": torch.rand(2, 96, generator=generator),
                                   "hidden": torch.rand(64, generator=generator)}, 0.5, round_to=8, min_hidden=16)
    layout, model, shape, scores = run_dir_with(tmp_path, trained)
    pruning = PruningSection(target_remaining=0.5)
    cfg = SimpleNamespace(pruning=pruning, model=BUILT_MODEL, salience=SalienceSection(batches=3))
    choose_final_shape(cfg, layout, Engine(model), shape, scores, batch_at)
    rows = json.loads((layout.salience.parent / SHAPE_REPORT).read_text())["candidates"]
    assert len(rows) == 1 and rows[0]["loss"] is None
    finalize.run(FinalizeConfig(model=BUILT_MODEL, pruning=pruning), tmp_path)
    final = MaskSet.from_dict(load_file(str(layout.final_masks)))
    assert all(torch.equal(a, b) for a, b in zip(final.to_dict().values(), trained.to_dict().values(), strict=True))
    assert remaining_params(shape, kept_sizes(final)) <= 0.5 * total_params(shape)


def test_finalize_without_the_chosen_masks_names_the_stage_to_rerun(tmp_path):
    run_dir_with(tmp_path)
    with pytest.raises(FileNotFoundError, match="salience stage"):
        finalize.run(FinalizeConfig(model=BUILT_MODEL, pruning=PruningSection()), tmp_path)
    summary = finalize.run(FinalizeConfig(model=BUILT_MODEL, pruning=PruningSection(shape_search="global")),
                           tmp_path)
    assert summary["remaining_fraction"] <= 0.5
