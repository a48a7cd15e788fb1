"""`make run`'s job as it is: configs/tiny.yaml unchanged, the trained base pruned to half, lm-eval scored."""

import json
import subprocess
import sys

import pytest

from harness import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_the_default_run_ends_with_a_summary_lm_eval_scores_and_mlflow_metrics(tmp_path):
    command = [sys.executable, "-m", "pipeline.cli", "run", "--config", "configs/tiny.yaml", f"run.root={tmp_path}",
               f"deepspeed.master_port={free_port()}"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "tiny"
    for line in ("run summary", "parameters   869,504 -> ", "lm-eval      apt_heldout: word_perplexity",
                 "speed-up     ", 'load it      AutoModelForCausalLM.from_pretrained("'):
        assert line in result.stderr, line

    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    for name in ("base", "pruned"):
        assert set(metrics[name]["lm_eval"]["apt_heldout"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert abs(metrics["params_ratio"] - 0.5) < 0.02

    from mlflow.tracking import MlflowClient

    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    run = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}").get_run(run_id)
    assert run.data.metrics["eval/pruned_val_perplexity"] == pytest.approx(metrics["pruned"]["val_perplexity"])
    assert "eval/base_apt_heldout_bits_per_byte" in run.data.metrics and "eval/speedup" in run.data.metrics
    assert run.data.tags["export_path"] == str((run_dir / "merge" / "model").resolve())

    # The export loads in plain transformers, in a process that never imports the pipeline.
    load = ("import sys, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "print(sum(p.numel() for p in m.parameters()))")
    loaded = subprocess.run([sys.executable, "-c", load, str(run_dir / "merge" / "model")], capture_output=True,
                            text=True, check=True)
    assert int(loaded.stdout) == metrics["pruned"]["params"]
