"""Kill a rank mid-finetune, run the same command again: the result equals an uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from harness import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def command(root, corpus):
    overrides = [f"run.root={root}", f"data.sources=[{corpus}]", "data.num_proc=1", "data.seq_len=64",
                 "train.steps=40", "train.checkpoint_every=20", "export.dtype=float32",
                 f"deepspeed.master_port={free_port()}"]
    return [sys.executable, "-m", "pipeline.cli", "run", "--config", "tests/tiny.yaml", *overrides]


def exported(run_dir):
    tensors = {}
    for shard in sorted((run_dir / "merge" / "model").glob("*.safetensors")):
        tensors |= load_file(str(shard))
    return tensors


def test_kill_a_rank_then_rerun_equals_uninterrupted(tmp_path, small_corpus):
    straight = subprocess.run(command(tmp_path / "straight", small_corpus), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]

    interrupted = command(tmp_path / "killed", small_corpus)
    run_dir = tmp_path / "killed" / "tiny"
    proc = subprocess.Popen(interrupted, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = run_dir / "finetune" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.is_file() and latest.read_text().strip() == "step20"):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-20 checkpoint"
        time.sleep(0.1)
    # Killed after the step-14 and step-19 compactions: the rerun rebuilds the compacted model from its base.
    assert json.loads((run_dir / "finetune" / "checkpoints" / "meta-step20.json").read_text())["base_model"]
    victim = json.loads((run_dir / "finetune" / ".ranks" / "rank1.json").read_text())
    os.kill(victim["pid"], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0

    rerun = subprocess.run(interrupted, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "prep      done, skipped" in rerun.stderr and "resumed from step" in rerun.stderr

    expected, actual = exported(tmp_path / "straight" / "tiny"), exported(run_dir)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)

    client = mlflow.tracking.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_id == (run_dir / "mlflow_run_id").read_text().strip()
    history = client.get_metric_history(runs[0].info.run_id, "finetune/loss")
    assert sorted(m.step for m in history) == list(range(1, 41))  # every step once: no gap, no duplicate
