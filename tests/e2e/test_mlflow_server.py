"""MlflowLogger against a real `mlflow server` on 127.0.0.1, read back through MlflowClient."""

from __future__ import annotations

import pytest

from pipeline.tracking import JsonlLogger, MlflowLogger

from harness import MlflowServer

pytestmark = pytest.mark.e2e


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """A server on a free local port with a SQLite store in tmp_path; always killed."""
    server = MlflowServer(tmp_path / "server")
    try:
        server.start()
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a dead server fails the test, not a long retry
        yield server.url, server.store
    finally:
        server.kill()


def test_logger_writes_through_a_real_server(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    url, store = mlflow_server
    run_dir = tmp_path / "run"
    write = JsonlLogger(run_dir / "finetune" / "metrics.jsonl")
    for step in (1, 2, 3):
        write.log_metrics({"loss": 1.0 / step}, step=step)
    write.close()
    (run_dir / "config.yaml").write_text("train: {lr: 0.001}\n")

    logger = MlflowLogger(url, "apt-e2e", run_dir, run_name="tiny")
    logger.log_params({"train": {"lr": 0.001}, "hub": {"hf_token": "hf_secret"}})
    logger.log_metrics({"tokens_per_s": 1234.0}, step=3)
    logger.log_artifact(run_dir / "config.yaml")
    assert logger.replay_jsonl(run_dir / "finetune" / "metrics.jsonl", "finetune") == 3
    logger.close()
    resumed = MlflowLogger(url, "apt-e2e", run_dir)
    assert resumed.replay_jsonl(run_dir / "finetune" / "metrics.jsonl", "finetune") == 0
    resumed.close()

    reader = MlflowClient(tracking_uri=url)
    run = reader.get_run(logger.run_id)
    assert resumed.run_id == logger.run_id and run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.001"}
    assert [m.step for m in reader.get_metric_history(logger.run_id, "finetune/loss")] == [1, 2, 3]
    assert run.data.metrics["tokens_per_s"] == 1234.0
    assert [f.path for f in reader.list_artifacts(logger.run_id)] == ["config.yaml"]
    assert list(store.rglob("config.yaml")), "the server keeps proxied artifacts in --artifacts-destination"
    assert logger.where() == f"{url}/#/experiments/{logger.experiment_id}/runs/{logger.run_id}"
