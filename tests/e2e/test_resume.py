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
from chains import ENV, REFERENCE
from safetensors.torch import load_file

from pipeline.tracking import read_metric_rows

from harness import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def command(root, corpus):
    overrides = [f"run.root={root}", f"data.sources=[{corpus}]", f"deepspeed.master_port={free_port()}", *REFERENCE]
    return [sys.executable, "-m", "pipeline.cli", "run", "--config", "tests/tiny.yaml", *overrides]


def exported(run_dir):
    tensors = {}
    for shard in sorted((run_dir / "merge" / "model").glob("*.safetensors")):
        tensors |= load_file(str(shard))
    return tensors


def finetune_summary(run_dir) -> dict:
    """The finetune manifest's summary without wall times (which no two runs share)."""
    summary = json.loads((run_dir / "finetune" / "manifest.json").read_text())["summary"]
    compactions = [{key: value for key, value in event.items() if not key.startswith("step_time")}
                   for event in summary["compactions"]]
    assert all("step_time_before" in event for event in summary["compactions"])
    assert summary["train_wall_seconds"] > 0 and summary["train_cpu_seconds"] > 0
    return {key: value for key, value in summary.items() if not key.endswith("_seconds")} | {"compactions": compactions}


def step_metrics(run_dir) -> dict[int, dict]:
    """Each step's metrics row but its throughput; a step logged again after the resume counts once, as last logged."""
    rows = read_metric_rows(run_dir / "finetune" / "metrics.jsonl")
    return {step: {key: value for key, value in values.items() if key != "tokens_per_s"} for step, _, values in rows}


def assert_same_report(actual, expected) -> None:
    """The same keys and lists; numbers equal to 1e-5, everything else exactly."""
    actual, expected = flat(actual), flat(expected)
    assert actual.keys() == expected.keys()
    for path, value in expected.items():
        if isinstance(value, float):
            assert actual[path] == pytest.approx(value, rel=1e-5), path
        else:
            assert actual[path] == value, path


def flat(value, prefix: str = "") -> dict:
    """Nested dicts and lists as one {path: leaf} dict."""
    if isinstance(value, dict | list):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        return {path: leaf for key, item in items for path, leaf in flat(item, f"{prefix}/{key}").items()}
    return {prefix: value}


def test_kill_a_rank_then_rerun_equals_uninterrupted(tmp_path, small_corpus, reference_run):
    interrupted = command(tmp_path / "killed", small_corpus)
    run_dir = tmp_path / "killed" / "tiny"
    proc = subprocess.Popen(interrupted, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = run_dir / "finetune" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.is_file() and latest.read_text().strip() == "step20"):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-20 checkpoint"
        time.sleep(0.1)
    # Killed after the step-14 compaction (one layer out) and the step-19 one: the rerun rebuilds the compacted,
    # one-layer model from its base.
    assert json.loads((run_dir / "finetune" / "checkpoints" / "meta-step20.json").read_text())["base_model"]
    assert json.loads((run_dir / "finetune" / "compacted" / "step000019" / "config.json").read_text())[
        "num_hidden_layers"] == 1
    victim = json.loads((run_dir / "finetune" / ".ranks" / "rank1.json").read_text())
    os.kill(victim["pid"], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0

    rerun = subprocess.run(interrupted, env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "prep      done, skipped" in rerun.stderr and "resumed from step" in rerun.stderr

    expected, actual = exported(reference_run), exported(run_dir)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)
    # What the run reports, too: every compaction (those before the kill came back with the checkpoint), each
    # step's metrics once.
    assert_same_report(finetune_summary(run_dir), finetune_summary(reference_run))
    assert len(finetune_summary(run_dir)["compactions"]) >= 2
    assert_same_report(step_metrics(run_dir), step_metrics(reference_run))

    client = mlflow.tracking.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_id == (run_dir / "mlflow_run_id").read_text().strip()
    history = client.get_metric_history(runs[0].info.run_id, "finetune/loss")
    assert sorted(m.step for m in history) == list(range(1, 31))  # every step once: no gap, no duplicate
