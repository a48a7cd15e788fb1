"""A NaN loss on one rank: every rank skips that step (salience untouched) or every rank stops, as configured."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pipeline import config as config_lib
from pipeline import run as driver

from harness import spawn

pytestmark = pytest.mark.dist

COMMON = ["train.steps=12", "train.checkpoint_every=2", "pruning.end_step=8", "pruning.update_every=4",
          "pruning.mask_step=0.25", "train.precision=fp32", "train.eval_batches=1"]


def make_config(tmp_path, prep_dir, *overrides) -> config_lib.RunConfig:
    cfg = config_lib.load("tests/tiny.yaml", [f"run.root={tmp_path}", "data.seq_len=64", *COMMON, *overrides])
    shutil.copytree(prep_dir, cfg.run_dir / "prep")
    return cfg


def finetune_with_poison(rank, world_size, cfg, poisoned_rank, poisoned_forwards):
    """Run finetune; on `poisoned_rank`, the training forwards numbered in `poisoned_forwards` produce NaN."""
    from pipeline import adapted

    original_base = adapted.original_base
    forwards = {"count": 0}

    def poison(module, args, output):
        if not torch.is_grad_enabled():  # evaluation
            return None
        forwards["count"] += 1
        return output * float("nan") if forwards["count"] in poisoned_forwards else None

    def load_and_poison(*args, **kwargs):
        model = original_base(*args, **kwargs)
        if rank == poisoned_rank:
            model.model.layers[0].mlp.register_forward_hook(poison)
        return model

    adapted.original_base = load_and_poison
    driver.execute_stage(driver.stage_by_name("finetune"), cfg, cfg.run_dir)


def test_skip_drops_the_step_on_every_rank_and_keeps_salience_clean(tmp_path, prep_dir):
    cfg = make_config(tmp_path, prep_dir, "train.nonfinite=skip")
    spawn(finetune_with_poison, 2, cfg, 1, {3})

    stage_dir = cfg.run_dir / "finetune"
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 13))
    assert "loss" not in rows[2] and all("loss" in row for i, row in enumerate(rows) if i != 2)
    assert rows[2]["skipped_steps"] == 1 and rows[-1]["skipped_steps"] == 1
    summary = json.loads((stage_dir / "manifest.json").read_text())["summary"]
    assert summary["skipped_steps"] == 1 and summary["steps"] == 12
    # The poisoned forward ran through the salience hooks; had its activations stayed in the sums,
    # the step-4 EMA (and every later one) would be NaN.
    for update in sorted((stage_dir / "updates").glob("*.safetensors")):
        for key, tensor in load_file(str(update)).items():
            assert torch.isfinite(tensor).all(), (update.name, key)
    adapters = load_file(str(stage_dir / "adapters.safetensors"))
    assert all(torch.isfinite(tensor).all() for tensor in adapters.values())


def test_stop_fails_every_rank_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, prep_dir):
    cfg = make_config(tmp_path, prep_dir)  # train.nonfinite defaults to stop
    with pytest.raises(Exception, match=r"step 5: the loss is inf/NaN on rank\(s\) \[0\]; stopping"):
        spawn(finetune_with_poison, 2, cfg, 0, {5})
    checkpoints = cfg.run_dir / "finetune" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step4"
    assert not (cfg.run_dir / "finetune" / "manifest.json").exists()


def test_skip_gives_up_after_max_skipped_steps(tmp_path, prep_dir):
    cfg = make_config(tmp_path, prep_dir, "train.nonfinite=skip", "train.max_skipped_steps=2")
    with pytest.raises(Exception, match="2 steps were skipped already"):
        spawn(finetune_with_poison, 2, cfg, 1, set(range(3, 100)))


def test_skip_with_gradient_accumulation_is_refused_at_load():
    with pytest.raises(config_lib.ConfigError, match="nonfinite: 'skip' needs grad_accum 1"):
        config_lib.load("tests/tiny.yaml", ["train.nonfinite=skip", "train.grad_accum=2"])
