"""MlflowLogger against a real `mlflow server` on 127.0.0.1, read back through MlflowClient."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from pipeline.tracking import JsonlLogger, MlflowLogger

from harness import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """A server on a free local port with a SQLite store in tmp_path; always terminated."""
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
               "--artifacts-destination", str(store / "mlartifacts")]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    # Its own session, so that the uvicorn worker it forks goes down with it; the background job runner
    # (MLflow's GenAI jobs) is not needed and would leave worker processes behind.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(server, url, tmp_path / "server.log")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a dead server fails the test, not a long retry
        yield url, store
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def wait_until_up(server: subprocess.Popen, url: str, log_path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"mlflow server did not answer on {url} within {timeout} s:\n{log_path.read_text()[-3000:]}")


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
