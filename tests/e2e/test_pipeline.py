"""The whole chain as a user runs it: `apt-pipeline run` on the tiny config with 2 CPU ranks."""

import json
import subprocess
import sys

import pytest

from harness import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def apt_pipeline(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_tiny_chain_end_to_end_and_rerun_skips(tmp_path, small_corpus):
    overrides = [f"run.root={tmp_path}", f"data.sources=[{small_corpus}]", "data.num_proc=1", "data.seq_len=64",
                 f"deepspeed.master_port={free_port()}"]
    apt_pipeline("run", "--config", "tests/tiny.yaml", *overrides)
    run_dir = tmp_path / "tiny"
    stages = ["prep", "finetune", "salience", "finalize", "merge", "eval"]
    for stage in stages:
        assert (run_dir / stage / "manifest.json").is_file(), stage
    report = json.loads((run_dir / "finalize" / "masks.json").read_text())
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["pruned"]["params"] == report["remaining_params"]
    assert report["remaining_fraction"] <= 0.5
    assert (run_dir / "finalize" / "masks.png").stat().st_size > 1000

    again = apt_pipeline("run", "--config", "tests/tiny.yaml", *overrides)
    assert all(f"{stage:<9} done, skipped" in again.stderr for stage in stages)

    changed = apt_pipeline("run", "--config", "tests/tiny.yaml", *overrides, "export.dtype=float32")
    assert "merge     done, skipped" not in changed.stderr and "finalize  done, skipped" in changed.stderr
