"""bench/speed_table.py's machinery end to end on a tiny model: every row of the table is measured and finite."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:  # the bench scripts import each other as top-level modules, as when run as scripts
    sys.path.insert(0, str(BENCH))
speed_table = importlib.import_module("speed_table")

TINY = ["--threads", "1", "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2"]
TINY += ["--intermediate", "128", "--vocab", "256", "--warmup", "0"]
TRAINING = [*TINY, "--seq", "32", "--steps", "2"]
ARGV = {
    "finetune_overhead": [*TRAINING, "--memory-repeats", "1", "--memory-steps", "1"],
    "compaction": TRAINING,
    "inference_speed": [*TINY, "--prompt", "8", "--new-tokens", "3", "--repeats", "2", "--batch", "16", "1"]
    + ["--dtype", "float32", "--no-floor", "--no-profile"],
}


# ~22 s on the shared 2 cores: the three peak-memory children each import torch and transformers (~7 s apiece).
@pytest.mark.slow
def test_speed_table_has_every_ratio_positive_and_finite():
    rows, results = speed_table.measure_rows(ARGV)

    assert [row.item for row in rows] == [1, 2, 3, 3, 3, 3, 4]  # export: generate and prefill at batch 16 and 1
    for row in rows:
        ratios = [row.wall] if row.cpu is None else [row.wall, row.cpu]
        assert all(math.isfinite(ratio) and ratio > 0 for ratio in ratios), row
        assert all(math.isfinite(load) for load in row.load), row
    section = speed_table.report("bench/speed_table.py", ARGV, rows, results)
    assert section.startswith(speed_table.SECTION + "\n")
    table_rows = [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(line.split("|")[1]) for line in table_rows] == [row.item for row in rows]


def test_the_depth_export_keeps_the_asked_layers_within_the_budget():
    inference_speed = importlib.import_module("inference_speed")
    from pipeline.apt.blocks import ModelShape, kept_sizes, remaining_params, total_params
    from pipeline.apt.masks import empty_layers

    args = inference_speed.parse_args(["--hidden", "64", "--layers", "4", "--heads", "4", "--kv-heads", "2",
                                       "--intermediate", "128", "--vocab", "256", "--depth", "2"])
    shape = ModelShape.from_config(inference_speed.build_dense(args).config)
    masks = inference_speed.pruned_masks(args, shape)
    assert empty_layers(masks) == [2, 3]
    assert 0.45 * total_params(shape) < remaining_params(shape, kept_sizes(masks)) <= 0.5 * total_params(shape)
