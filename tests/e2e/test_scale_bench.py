"""bench/scale at a size CI affords: the whole chain under ZeRO-3 on 2 ranks, polled, and the memory comparison."""

import json
import subprocess
import sys

import pytest

from harness import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_the_scale_bench_measures_every_stage_and_both_variants(tmp_path):
    results = tmp_path / "scale.json"
    command = [sys.executable, "-m", "bench.scale.run_scale", "--quick", "--work", str(tmp_path / "work"),
               "--results", str(results), "--master-port", str(free_port())]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]

    report = json.loads(results.read_text())
    assert list(report["stages"]) == ["prep", "finetune", "salience", "finalize", "merge", "eval"]
    for name in ("finetune", "salience"):  # the distributed stages: both ranks polled
        assert len(report["stages"][name]["rank_peak_GiB"]) == 2
        assert min(report["stages"][name]["rank_peak_GiB"]) > 0.2  # at least torch and transformers imported
    assert report["merge"]["equal"]  # the export's parameters are what finalize/masks.json says
    assert report["plan"]["plan_zero3_per_rank"] > 0 and report["plan"]["measured_per_rank"] > 0
    full = report["full_finetune"]
    assert full["layers"] >= 1 and len(full["apt_peak_GiB"]) == len(full["full_peak_GiB"]) == 2
    assert 0 < full["apt_over_full"] < 1  # a frozen base costs less than training every weight, even this small
