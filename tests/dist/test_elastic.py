"""Elastic resume: a finetune checkpoint written by 2 ranks continues on 1, and one from 1 rank on 2.

The rewound copy of a finished run is exactly what a run interrupted after its step-10 checkpoint leaves.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pipeline import config as config_lib
from pipeline import run as driver

from harness import assert_same_finetune_outputs, spawn

pytestmark = pytest.mark.dist

COMMON = ["train.steps=20", "train.checkpoint_every=10", "pruning.end_step=8", "pruning.update_every=4",
          "pruning.mask_step=0.2", "train.precision=fp32", "train.eval_batches=2", "pruning.depth=1"]
"""One of the two layers is cut (`pruning.depth=1`) and compacted away before the step-10 checkpoint: the other
number of ranks resumes a model rebuilt with fewer layers."""


def make_config(tmp_path, prep_dir, name, *overrides) -> config_lib.RunConfig:
    cfg = config_lib.load("tests/tiny.yaml", [f"run.root={tmp_path}", f"run.name={name}", "data.seq_len=64",
                                                *COMMON, *overrides])
    shutil.copytree(prep_dir, cfg.run_dir / "prep")
    return cfg


def finetune_rank(rank, world_size, cfg):
    driver.execute_stage(driver.stage_by_name("finetune"), cfg, cfg.run_dir)


def rewound_copy(finished: config_lib.RunConfig, cfg: config_lib.RunConfig) -> None:
    """Copy `finished`'s finetune folder into `cfg`'s run as it was right after the step-10 checkpoint."""
    stage_dir = cfg.run_dir / "finetune"
    shutil.copytree(finished.run_dir / "finetune", stage_dir)
    checkpoints = stage_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step20")
    (checkpoints / "meta-step20.json").unlink()
    (checkpoints / "latest").write_text("step10")
    for name in ("manifest.json", "adapters.safetensors", "apt_state.safetensors", "apt_state.json"):
        (stage_dir / name).unlink()
    rows = (stage_dir / "metrics.jsonl").read_text().splitlines()
    (stage_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in rows[:10]))


def logged(cfg, key="loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (cfg.run_dir / "finetune" / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row[key] for row in rows if key in row}


@pytest.mark.parametrize(("template", "before", "after"), [("zero2_cpu", 2, 1), ("zero3_cpu", 1, 2)])
def test_resume_on_another_number_of_ranks_continues_the_run(tmp_path, prep_dir, template, before, after):
    # Global batch 8 either way: 2 ranks x micro 4 x accum 1, or 1 rank x micro 4 x accum 2.
    overrides = [f"deepspeed.config=ds_configs/{template}.json", "train.micro_batch_size=4",
                 f"train.grad_accum={2 // before}"]
    straight = make_config(tmp_path, prep_dir, "straight", *overrides)
    spawn(finetune_rank, before, straight)

    elastic = make_config(tmp_path, prep_dir, "elastic", *overrides)
    rewound_copy(straight, elastic)
    spawn(finetune_rank, after, elastic)

    checkpoints = elastic.run_dir / "finetune" / "checkpoints"
    assert (checkpoints / "step10_universal").is_dir() and (checkpoints / "latest").read_text() == "step20"
    meta = json.loads((checkpoints / "meta-step20.json").read_text())
    assert meta["world_size"] == after and meta["global_batch"] == 8
    base = json.loads((checkpoints / "meta-step10.json").read_text())["base_model"]
    assert json.loads((elastic.run_dir / "finetune" / base / "config.json").read_text())["num_hidden_layers"] == 1
    # The loss curve continues where it was: every step after the resume is the step the uninterrupted run took.
    straight_loss, elastic_loss = logged(straight), logged(elastic)
    assert sorted(elastic_loss) == list(range(1, 21))
    for step in range(11, 21):
        assert elastic_loss[step] == pytest.approx(straight_loss[step], rel=1e-5), step
    assert_same_finetune_outputs(straight.run_dir, elastic.run_dir, atol=1e-5)

    # The final masks are binary and within the budget (the search undershoots by at most a rounded block).
    summary = json.loads((elastic.run_dir / "finetune" / "manifest.json").read_text())["summary"]
    assert summary["world_size"] == after
    assert 0.4 < summary["remaining_fraction"] <= summary["target_remaining"] == 0.5
    state = load_file(str(elastic.run_dir / "finetune" / "apt_state.safetensors"))
    assert all(torch.isin(mask, torch.tensor([0.0, 1.0])).all() for key, mask in state.items()
               if key.startswith("masks."))

def test_a_global_batch_the_new_ranks_cannot_make_up_is_refused(tmp_path, prep_dir):
    straight = make_config(tmp_path, prep_dir, "straight", "train.micro_batch_size=4",
                           "deepspeed.config=ds_configs/zero2_cpu.json")
    spawn(finetune_rank, 1, straight)  # global batch 4
    elastic = make_config(tmp_path, prep_dir, "elastic", "train.micro_batch_size=4")
    rewound_copy(straight, elastic)
    with pytest.raises(Exception, match="global batch of 4"):
        spawn(finetune_rank, 2, elastic)  # 2 ranks x micro 4 = 8 > 4
