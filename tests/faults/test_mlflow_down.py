"""The MLflow tracking server dies while the pipeline runs: training goes on (one warning), the metrics stay in
metrics.jsonl, and the next `apt-pipeline run` with the server back logs what is missing, each (key, step) once.
(A server that is down at start-up fails the run at once: tests/unit/test_bad_inputs.py.)
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from pipeline import cli, tracking
from pipeline.tracking import JsonlLogger, MlflowLogger

from harness import free_port

pytestmark = pytest.mark.e2e

PIPELINE = ["data.seq_len=64", "data.num_proc=1", "train.steps=20", "train.checkpoint_every=20",
            "pruning.end_step=8", "pruning.update_every=4", "pruning.mask_step=0.2", "train.eval_batches=1",
            "salience.batches=2", "eval.batches=1", "eval.rounds=1", "eval.new_tokens=4"]


class Warnings(logging.Handler):
    """Collects the warnings one logger emits (the pipeline's loggers do not propagate to the root)."""

    def __init__(self, name: str):
        super().__init__(logging.WARNING)
        self.logger, self.messages = logging.getLogger(name), []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> Warnings:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc_info) -> None:
        self.logger.removeHandler(self)


@pytest.fixture(autouse=True)
def short_http_retries(monkeypatch):
    """The values the driver sets for a tracking server, restored after the test (they live in os.environ)."""
    for name, value in tracking.HTTP_DEFAULTS.items():
        monkeypatch.setenv(name, value)


def history(url: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(url).get_metric_history(run_id, key))


def test_a_lost_server_is_skipped_after_one_warning_and_the_next_run_logs_the_rest(tmp_path, mlflow_server):
    metrics = tmp_path / "finetune" / "metrics.jsonl"
    writer = JsonlLogger(metrics)
    for step in (1, 2, 3):
        writer.log_metrics({"loss": 1.0 / step}, step=step)
    logger = MlflowLogger(mlflow_server.url, "apt-faults", tmp_path)
    assert logger.replay_jsonl(metrics, "finetune") == 3

    mlflow_server.kill()
    for step in (4, 5):
        writer.log_metrics({"loss": 1.0 / step}, step=step)
    with Warnings("apt.tracking") as warned:
        started = time.monotonic()
        assert logger.replay_jsonl(metrics, "finetune") == 0
        logger.set_tag("stage.finetune", "done")
        logger.close()
    assert time.monotonic() - started < 30  # short retries, then the calls are skipped
    assert len(warned.messages) == 1 and f"MLflow server {mlflow_server.url} stopped answering" in warned.messages[0]
    assert logger.lost is not None

    writer.close()
    mlflow_server.start()  # the same port and store
    resumed = MlflowLogger(mlflow_server.url, "apt-faults", tmp_path)
    assert resumed.run_id == logger.run_id and resumed.replay_jsonl(metrics, "finetune") == 2
    assert history(mlflow_server.url, resumed.run_id, "finetune/loss") == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_server_killed_mid_finetune_training_goes_on_and_the_rerun_logs_every_step_once(
        tmp_path, small_corpus, mlflow_server, monkeypatch):
    monkeypatch.setattr(tracking, "LIVE_SYNC_SECONDS", 1.0)  # so that some steps reach the server before it dies
    run_dir = tmp_path / "tiny"
    args = ["run", "--config", "tests/tiny.yaml", f"run.root={tmp_path}", f"data.sources=[{small_corpus}]",
            f"deepspeed.master_port={free_port()}", f"tracking.uri={mlflow_server.url}", *PIPELINE]
    cursor_at_kill = {}

    def kill_once_finetune_metrics_arrive() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            sync = run_dir / tracking.SYNC_FILE
            last = json.loads(sync.read_text())["last_step"].get("finetune") if sync.is_file() else None
            if last is not None:
                mlflow_server.kill()
                cursor_at_kill["finetune"] = last
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_once_finetune_metrics_arrive, daemon=True)
    killer.start()
    with Warnings("apt.tracking") as warned:
        assert cli.main(args) == 0  # every stage ran: losing the server stopped nothing
    killer.join(timeout=5)
    assert cursor_at_kill, "the server was never killed: no finetune metrics reached it"
    rows = [json.loads(line) for line in (run_dir / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 21))
    assert (run_dir / "eval" / "manifest.json").is_file()
    lost = [m for m in warned.messages if m.startswith(f"MLflow server {mlflow_server.url} stopped answering")]
    assert len(lost) == 1 and "run the same command again once" in warned.messages[-1], warned.messages
    missing_from = json.loads((run_dir / tracking.SYNC_FILE).read_text())["last_step"]["finetune"]
    assert missing_from < 20  # the steps after the kill are not in MLflow yet

    mlflow_server.start()
    assert cli.main(args) == 0  # every stage is done: this run only logs what the first one could not

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.url)
    run_id = (run_dir / tracking.RUN_ID_FILE).read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    keys = sorted(key for key in run.data.metrics if key.startswith("finetune/"))
    assert {"finetune/loss", "finetune/lr", "finetune/remaining"} <= set(keys)
    for key in keys:  # each (key, step) exactly once, the steps before and after the kill alike
        assert history(mlflow_server.url, run_id, key) == list(range(1, 21)), key
    artifacts = {f.path for folder in ("finalize", "eval") for f in client.list_artifacts(run_id, folder)}
    assert {"finalize/masks.json", "eval/metrics.json"} <= artifacts
