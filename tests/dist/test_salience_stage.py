"""The salience stage on 2 ranks equals one process on the same global batches."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from pipeline import config as config_lib
from pipeline import run as driver

from harness import spawn

pytestmark = pytest.mark.dist

FAST = ["data.seq_len=64", "train.steps=30", "pruning.end_step=20", "train.checkpoint_every=30",
        "train.eval_batches=2", "train.precision=fp32", "salience.batches=4"]


def stage_rank(rank, world_size, cfg, stage_name):
    driver.execute_stage(driver.stage_by_name(stage_name), cfg, cfg.run_dir)


def test_two_rank_salience_equals_one(tmp_path, small_corpus):
    base = config_lib.load("tests/tiny.yaml", [f"run.root={tmp_path}", "run.name=base", "data.num_proc=1",
                                                 f"data.sources=[{small_corpus}]", *FAST])
    driver.run_stage(driver.stage_by_name("prep"), base, base.run_dir)
    spawn(stage_rank, 2, base, "finetune")

    results = {}
    for name, world_size, micro_batch in (("one", 1, 8), ("two", 2, 4)):
        cfg = config_lib.load("tests/tiny.yaml", [f"run.root={tmp_path}", f"run.name={name}", "data.num_proc=1",
                                                    f"data.sources=[{small_corpus}]", *FAST,
                                                    f"train.micro_batch_size={micro_batch}"])
        for stage in ("prep", "finetune"):
            shutil.copytree(base.run_dir / stage, cfg.run_dir / stage)
        spawn(stage_rank, world_size, cfg, "salience")
        results[name] = load_file(str(cfg.run_dir / "salience" / "salience.safetensors"))

    assert results["one"]["tokens"].item() == results["two"]["tokens"].item() == 4 * 8 * 64
    assert results["one"].keys() == results["two"].keys()
    for key, expected in results["one"].items():
        torch.testing.assert_close(results["two"][key], expected, rtol=1e-5, atol=1e-9, msg=key)
    assert results["one"]["scores.head"].abs().sum() > 0
