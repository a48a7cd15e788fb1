"""Metric loggers: JSONL, and MLflow against a real SQLite store (resume, replay without duplicates, stage tags)."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.tracking import JsonlLogger, MlflowLogger

EXPERIMENT = "apt-tests"


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory) -> MlflowLogger:
    """A logger on the embedded default store, whose database the other tests share (its schema takes seconds)."""
    return MlflowLogger(None, EXPERIMENT, tmp_path_factory.mktemp("run"), run_name="tiny")


@pytest.fixture(scope="module")
def store_uri(embedded_run) -> str:
    return embedded_run.tracking_uri


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def steps_of(logger: MlflowLogger, key: str) -> list[tuple[int, float]]:
    history = client(logger.tracking_uri).get_metric_history(logger.run_id, key)
    return sorted((m.step, m.value) for m in history)


def write_rows(path: Path, steps, loss=lambda step: 1.0 / step) -> None:
    """Append metrics rows as finetune's rank 0 does."""
    logger = JsonlLogger(path)
    for step in steps:
        logger.log_metrics({"loss": loss(step), "kept_hidden": 64}, step=step)
    logger.close()


def test_jsonl_logger_appends_and_recovers_from_a_line_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_rows(path, [1, 2])
    with open(path, "a") as f:
        f.write('{"time": 1.0, "step": 3, "lo')  # the worker was killed mid-write
    write_rows(path, [3])

    rows = list(tracking.read_metric_rows(path))

    assert [step for step, _, _ in rows] == [1, 2, 3]
    assert rows[2][2] == {"loss": pytest.approx(1 / 3), "kept_hidden": 64.0}


def test_a_line_still_being_written_is_left_for_the_next_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_rows(path, [1])
    with open(path, "a") as f:
        f.write(json.dumps({"step": 2, "loss": 0.5}))  # no newline yet

    assert [step for step, _, _ in tracking.read_metric_rows(path)] == [1]


@pytest.mark.parametrize("name", ["api_key", "hf_token", "password", "db_password_hash", "aws_secret_access_key",
                                  "clientSecret", "accessToken", "credentials"])
def test_secret_names(name):
    assert tracking.is_secret(name)


@pytest.mark.parametrize("name", ["hidden_size", "num_key_value_heads", "prompt_tokens", "new_tokens", "tokenizer",
                                  "token_budget", "keep_ratio", "monkey", "uri"])
def test_names_that_are_not_secrets(name):
    assert not tracking.is_secret(name)


def test_flatten_params_uses_section_dot_key_and_leaves_secrets_out():
    config = {"train": {"lr": 1e-4, "steps": 30}, "apt": {"adapter_targets": ("q_proj", "v_proj")},
              "tracking": {"uri": "https://me:hunter2@mlflow.example:5000", "api_key": "abc", "experiment": "x"},
              "hub": {"hf_token": "hf_abc"}}

    flat = tracking.flatten_params(config)

    assert flat == {"train.lr": "0.0001", "train.steps": "30", "apt.adapter_targets": '["q_proj", "v_proj"]',
                    "tracking.uri": "https://me:***@mlflow.example:5000", "tracking.experiment": "x"}


def test_embedded_default_store_and_artifacts_live_in_the_run_dir(embedded_run):
    logger, run_dir = embedded_run, embedded_run.run_dir
    (run_dir / "config.yaml").write_text("train: {lr: 0.1}\n")
    logger.log_params({"train": {"lr": 0.1}, "tracking": {"password": "x"}})
    logger.log_artifact(run_dir / "config.yaml")
    logger.close()

    assert logger.tracking_uri == f"sqlite:///{run_dir / 'mlflow.db'}"
    assert (run_dir / "mlflow.db").is_file()
    assert (run_dir / "mlflow_run_id").read_text().strip() == logger.run_id
    assert (run_dir / "mlartifacts" / logger.run_id / "artifacts" / "config.yaml").is_file()
    run = client(logger.tracking_uri).get_run(logger.run_id)
    assert run.data.params == {"train.lr": "0.1"} and run.info.status == "FINISHED"
    assert logger.where().startswith(f"mlflow ui --backend-store-uri sqlite:///{run_dir}/mlflow.db")


def test_resume_by_stored_id_appends_to_the_same_run(tmp_path, store_uri):
    first = MlflowLogger(store_uri, EXPERIMENT, tmp_path, config_id="a")
    first.log_params({"train": {"lr": 0.1}})
    first.log_metrics({"loss": 2.0}, step=1)
    first.close("FAILED")

    second = MlflowLogger(store_uri, EXPERIMENT, tmp_path, config_id="a")
    assert client(store_uri).get_run(second.run_id).info.status == "RUNNING"
    second.log_params({"train": {"lr": 0.1}})  # the same value again is fine
    second.log_metrics({"loss": 1.0}, step=2)
    second.close()

    assert second.run_id == first.run_id
    assert steps_of(second, "loss") == [(1, 2.0), (2, 1.0)]
    same_dir = f"tags.`apt.run_dir` = '{tmp_path.resolve()}'"
    assert len(client(store_uri).search_runs([first.experiment_id], same_dir)) == 1


def test_a_changed_config_gets_a_new_run_that_names_the_previous_one(tmp_path, store_uri):
    first = MlflowLogger(store_uri, EXPERIMENT, tmp_path, config_id="a")
    first.log_params({"train": {"lr": 0.1}})
    first.close()

    second = MlflowLogger(store_uri, EXPERIMENT, tmp_path, config_id="b")
    second.log_params({"train": {"lr": 0.2}})  # MLflow would refuse this in the first run

    assert second.run_id != first.run_id
    assert (tmp_path / "mlflow_run_id").read_text().strip() == second.run_id
    assert client(store_uri).get_run(second.run_id).data.tags[tracking.PREVIOUS_RUN_TAG] == first.run_id


def test_a_stored_id_unknown_to_the_store_starts_a_new_run(tmp_path, store_uri):
    (tmp_path / "mlflow_run_id").write_text("0" * 32 + "\n")  # e.g. written against another tracking.uri

    logger = MlflowLogger(store_uri, EXPERIMENT, tmp_path)

    assert logger.run_id != "0" * 32
    assert client(store_uri).get_run(logger.run_id).data.tags[tracking.PREVIOUS_RUN_TAG] == "0" * 32


def test_replay_logs_each_step_once_across_resumes(tmp_path, store_uri):
    jsonl = tmp_path / "finetune" / "metrics.jsonl"
    write_rows(jsonl, range(1, 6))
    first = MlflowLogger(store_uri, EXPERIMENT, tmp_path)
    assert first.replay_jsonl(jsonl, "finetune") == 5
    first.close("FAILED")

    # The stage resumes from its step-3 checkpoint: it logs 4 and 5 again (other values), then 6..8.
    write_rows(jsonl, range(4, 9), loss=lambda step: 100.0 + step)
    resumed = MlflowLogger(store_uri, EXPERIMENT, tmp_path)
    assert resumed.replay_jsonl(jsonl, "finetune") == 3
    assert resumed.replay_jsonl(jsonl, "finetune") == 0

    assert resumed.run_id == first.run_id
    history = steps_of(resumed, "finetune/loss")
    assert [step for step, _ in history] == list(range(1, 9))
    assert history[4] == (5, pytest.approx(1 / 5)) and history[7] == (8, 108.0)  # the first value for a step stays
    assert json.loads((tmp_path / tracking.SYNC_FILE).read_text())["last_step"] == {"finetune": 8}


def make_stage_dir(run_dir: Path, name: str, fingerprint: str = "f1") -> Path:
    stage_dir = run_dir / name
    write_rows(stage_dir / "metrics.jsonl", [1, 2])
    (stage_dir / "masks.json").write_text("{}")
    (stage_dir / "checkpoints").mkdir()
    (stage_dir / "checkpoints" / "big.pt").write_bytes(b"x")
    (stage_dir / "manifest.json").write_text(json.dumps({"stage": name, "fingerprint": fingerprint}))
    return stage_dir


def artifact_names(logger: MlflowLogger, folder: str) -> list[str]:
    return sorted(Path(f.path).name for f in client(logger.tracking_uri).list_artifacts(logger.run_id, folder))


def test_tracked_stage_tags_status_and_logs_metrics_and_files(tmp_path, store_uri):
    logger = MlflowLogger(store_uri, EXPERIMENT, tmp_path)
    stage_dir = tmp_path / "finalize"

    with tracking.tracked_stages(logger, [stage_dir]):
        assert client(store_uri).get_run(logger.run_id).data.tags["stage.finalize"] == "running"
        make_stage_dir(tmp_path, "finalize")

    assert client(store_uri).get_run(logger.run_id).data.tags["stage.finalize"] == "done"
    assert [step for step, _ in steps_of(logger, "finalize/loss")] == [1, 2]
    assert artifact_names(logger, "finalize") == ["manifest.json", "masks.json"]  # not checkpoints/, not .jsonl


def test_a_failed_stage_is_tagged_failed_with_the_steps_it_made(tmp_path, store_uri):
    """Two stages of one launch: the first finished (its manifest is there), the second failed."""
    logger = MlflowLogger(store_uri, EXPERIMENT, tmp_path)

    with pytest.raises(RuntimeError, match="rank 1 died"), tracking.tracked_stages(
            logger, [tmp_path / "finetune", tmp_path / "salience"]):
        make_stage_dir(tmp_path, "finetune")
        write_rows(tmp_path / "salience" / "metrics.jsonl", [1, 2, 3])
        raise RuntimeError("rank 1 died")

    tags = client(store_uri).get_run(logger.run_id).data.tags
    assert (tags["stage.finetune"], tags["stage.salience"]) == ("done", "failed")
    assert artifact_names(logger, "finetune") == ["manifest.json", "masks.json"]
    assert [step for step, _ in steps_of(logger, "salience/loss")] == [1, 2, 3]


def test_skipped_stages_reach_a_new_run_once(tmp_path, store_uri):
    make_stage_dir(tmp_path, "eval")
    first = MlflowLogger(store_uri, EXPERIMENT, tmp_path, config_id="a")
    tracking.record_skipped(first, tmp_path / "eval")
    tracking.record_skipped(first, tmp_path / "eval")
    second = MlflowLogger(store_uri, EXPERIMENT, tmp_path, config_id="b")
    tracking.record_skipped(second, tmp_path / "eval")

    for logger in (first, second):
        assert client(store_uri).get_run(logger.run_id).data.tags["stage.eval"] == "skipped"
        assert [step for step, _ in steps_of(logger, "eval/loss")] == [1, 2]
        assert artifact_names(logger, "eval") == ["manifest.json", "masks.json"]


def test_metrics_reach_mlflow_while_the_stage_runs(tmp_path, store_uri):
    logger = MlflowLogger(store_uri, EXPERIMENT, tmp_path)

    with tracking.tracked_stages(logger, [tmp_path / "finetune"], live_every=0.05):
        write_rows(tmp_path / "finetune" / "metrics.jsonl", [1, 2])
        deadline = time.monotonic() + 20
        while not steps_of(logger, "finetune/loss") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [step for step, _ in steps_of(logger, "finetune/loss")] == [1, 2]


def test_pipeline_run_logs_the_flat_config_and_ends_the_run(tiny_config, store_uri):
    cfg = tiny_config(f"tracking.uri={store_uri}")
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text("resolved\n")

    with tracking.pipeline_run(cfg) as logger:
        pass
    with pytest.raises(KeyboardInterrupt), tracking.pipeline_run(cfg) as resumed:
        raise KeyboardInterrupt

    run = client(store_uri).get_run(logger.run_id)
    assert resumed.run_id == logger.run_id and run.info.status == "KILLED"
    assert run.data.params["train.lr"] == str(cfg.train.lr) and run.data.params["run.name"] == cfg.run.name
    assert run.info.run_name == cfg.run.name
    assert [Path(f.path).name for f in client(store_uri).list_artifacts(run.info.run_id)] == ["config.yaml"]


def test_replay_batches_hold_whole_steps():
    # The sync cursor moves per batch the server took, so a batch must end at a step boundary.
    by_step = {3: ["m"] * 400, 1: ["m"] * 400, 2: ["m"] * 400, 4: ["m"] * 1200, 5: ["m"]}
    assert list(tracking.step_batches(by_step, limit=1000)) == [[1, 2], [3], [4], [5]]


@pytest.mark.parametrize("status, down", [(200, False), (401, False), (404, False), (503, True)])
def test_a_server_counts_as_up_when_it_answers_below_500(status, down):
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        problem = tracking.server_problem(f"http://user:pw@127.0.0.1:{server.server_address[1]}/prefix")
        server.shutdown()
    assert (problem is not None) == down and (not down or "HTTP 503" in problem)


def test_no_server_is_checked_for_a_local_store_and_a_closed_port_is_down():
    assert tracking.server_problem(None) is None and tracking.server_problem("sqlite:///x/mlflow.db") is None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert "refused" in tracking.server_problem(f"http://127.0.0.1:{port}")
