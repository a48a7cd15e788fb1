"""Metric loggers: one small protocol; JSONL for the stages, MLflow for the pipeline run (docs/design.md §7).

Workers never talk to MLflow: a stage's rank 0 appends to `<stage>/metrics.jsonl` (other ranks get a
`NullLogger`) and the driver replays new rows into the pipeline's MLflow run, during the stage and at its end.
Compute nodes then need no route to the tracking server nor `import mlflow`, an embedded SQLite store has a
single writer, and "each (key, step) once" is enforced in one place: a per-stage cursor in the run directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit, urlunsplit
from urllib.request import urlopen

from pipeline.config import ConfigError
from pipeline.dist import get_logger, is_main
from pipeline.stage import read_manifest, write_atomic

METRICS_FILE = "metrics.jsonl"
RUN_ID_FILE = "mlflow_run_id"
SYNC_FILE = "mlflow_sync.json"
"""Per MLflow run: the last step replayed per stage and the manifest whose files were logged."""
STAGE_ARTIFACT_SUFFIXES = (".json", ".png")
"""A stage's top-level files that go to MLflow: manifest, masks.json, masks.png, metrics.json."""
CONFIG_ID_TAG = "apt.config_id"
PREVIOUS_RUN_TAG = "apt.previous_run_id"
LIVE_SYNC_SECONDS = 30.0
"""While a stage runs, the driver copies its new metrics rows into MLflow this often."""
SERVER_TIMEOUT_S = 3.0
"""How long the start-up check, and the check after a failed call, wait for the tracking server to answer."""
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
"""MLflow's own defaults retry a dead server for minutes (7 retries, 120 s timeout); a user's values win."""
MAX_METRICS_PER_BATCH = 1000
"""MLflow's limit per log_batch call."""
SECRET_PARTS = frozenset({"password", "passwd", "secret", "credential", "credentials", "apikey"})
SECRET_LAST_PARTS = frozenset({"token", "key"})
"""Secret only as the last part: `hf_token`, `api_key`, but not `num_key_value_heads` or `token_budget`."""

log = get_logger("apt.tracking")


class MetricLogger(Protocol):
    def log_params(self, params: dict) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger:
    """Appends one JSON line per call to `path`; a resumed run appends to the same file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        cut_short = _ends_mid_line(path)
        self._file = open(path, "a")  # noqa: SIM115 - closed in close()
        if cut_short:  # a killed writer left half a line; start ours on a fresh one
            self._file.write("\n")

    def log_params(self, params: dict) -> None:
        self._write({"params": params})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._write({"step": step, **metrics})

    def log_artifact(self, path: Path) -> None:
        self._write({"artifact": str(path)})

    def close(self) -> None:
        self._file.close()

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps({"time": time.time(), **record}) + "\n")
        self._file.flush()


def metric_logger(stage_dir: Path) -> MetricLogger:
    """The logger a stage writes its metrics to (rank 0 only); the driver copies them into MLflow."""
    return JsonlLogger(stage_dir / METRICS_FILE) if is_main() else NullLogger()


def _ends_mid_line(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def read_metric_rows(path: Path) -> Iterator[tuple[int, float, dict[str, float]]]:
    """(step, time, numeric values) of each complete metrics row; a line still being written is left for later."""
    if not path.is_file():
        return
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith("\n"):
                return
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the fragment a killed writer left; the resumed stage logs on
                log.warning("%s:%d is not JSON (a stage killed mid-write?); skipped", path, number)
                continue
            step = row.get("step")
            if not isinstance(step, int) or isinstance(step, bool):
                continue
            values = {k: float(v) for k, v in row.items()
                      if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
            yield step, float(row.get("time", time.time())), values


def is_secret(name: str) -> bool:
    """Whether a config key looks like a secret (`api_key`, `hf_token`, `db_password`, `clientSecret`), by name part."""
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
    parts = [p for p in re.split(r"[^a-z0-9]+", words) if p]
    return bool(parts) and (parts[-1] in SECRET_LAST_PARTS or any(p in SECRET_PARTS for p in parts))


def without_password(value: str) -> str:
    """`https://user:pw@host/x` -> `https://user:***@host/x`; anything else unchanged."""
    if "://" not in value or "@" not in value:
        return value
    parts = urlsplit(value)
    if parts.password is None:
        return value
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def is_server(uri: str | None) -> bool:
    return bool(uri) and uri.startswith(("http://", "https://"))


def server_problem(uri: str | None, timeout: float = SERVER_TIMEOUT_S) -> str | None:
    """Why the MLflow server at `uri` does not answer its /health page; None when it does or `uri` is no server.

    Any HTTP answer below 500 counts as up (a proxy may want a login the check does not send)."""
    if not is_server(uri):
        return None
    parts = urlsplit(uri)
    url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])).rstrip("/") + "/health"
    try:
        with urlopen(url, timeout=timeout):
            return None
    except HTTPError as e:
        return None if e.code < 500 else f"it answers HTTP {e.code} {e.reason}"
    except (URLError, OSError) as e:  # refused, unknown host, timed out
        reason = getattr(e, "reason", e)
        # A TLS handshake took place: the server is up (MLflow may trust a certificate urllib does not).
        return None if isinstance(reason, ssl.SSLError) else str(reason)


def server_down(uri: str, problem: str) -> str:
    """The start-up error for a tracking server that does not answer: what, where, and the two fixes."""
    port = urlsplit(uri).port or (443 if uri.startswith("https") else 80)
    return (f"tracking.uri: no MLflow server answers at {without_password(uri)} ({problem}); start it "
            f"(launch/mlflow_server.sh DIR --port {port}) or unset tracking.uri to log into the run directory")


def flatten_params(config: dict, prefix: str = "") -> dict[str, str]:
    """`{"train": {"lr": 0.1}}` -> `{"train.lr": "0.1"}`, leaving out secret-looking keys and URL passwords."""
    flat = {}
    for key, value in config.items():
        if is_secret(str(key)):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(list(value), default=str)
        else:
            flat[name] = without_password(str(value))
    return flat


class MlflowLogger:
    """The MLflow run of one run directory (rank 0 only), resumed by the id in `<run_dir>/mlflow_run_id` unless
    its `config_id` differs (MLflow refuses to change a logged param; a new run then names the old one).
    `uri` None: the embedded store `sqlite:///<run_dir>/mlflow.db`, artifacts in `<run_dir>/mlartifacts`.

    A tracking server that stops answering mid-run does not stop the pipeline: one warning, then every call is
    skipped (`lost` says why); metrics stay in metrics.jsonl and the next run logs what is missing."""

    def __init__(self, uri: str | None, experiment: str, run_dir: Path, *, run_name: str | None = None,
                 config_id: str | None = None):
        if not is_main():
            raise RuntimeError("MlflowLogger belongs to rank 0; other ranks log through metric_logger()")
        from mlflow.tracking import MlflowClient  # ≈1 s to import: paid by the one process that logs

        self.run_dir = run_dir.resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = uri or f"sqlite:///{self.run_dir / 'mlflow.db'}"
        self.lost: str | None = None
        """Why the tracking server stopped answering; None while it answers."""
        if is_server(self.tracking_uri):
            for name, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)  # read by MLflow at each request
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.experiment_id = self._experiment_id(experiment)
        self.run_id = self._open_run(run_name, config_id)

    def log_params(self, params: dict) -> None:
        """Log `params` flattened to `section.key`, secrets left out; logging an unchanged value again is a no-op."""
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in flatten_params(params).items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._send(self.client.log_batch, self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log_metric_batch([Metric(key, float(value), now, step) for key, value in metrics.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> bool:
        """Copy a file or a folder into the run's artifacts (under `artifact_path`); False if the server is lost."""
        send = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
        return self._send(send, self.run_id, str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self._send(self.client.set_tag, self.run_id, key, value)

    def replay_jsonl(self, path: Path, prefix: str) -> int:
        """Log the metrics.jsonl rows past this run's cursor for `prefix` (in mlflow_sync.json) as `<prefix>/<key>`.
        Each (key, step) is logged once however often a stage resumes; for a step a resumed stage logs again,
        the first value stays. Returns how many steps were logged.

        The cursor moves after each batch the server took. A batch whose answer was lost (the server died after
        storing it) is sent again by the next run; the store keeps one row per identical (key, step, timestamp,
        value), and those come from metrics.jsonl, so it still lands once."""
        from mlflow.entities import Metric

        sync = self._read_sync()
        last = sync["last_step"].get(prefix)
        new: dict[int, dict[str, Metric]] = {}
        for step, seconds, values in read_metric_rows(path):
            if last is not None and step <= last:
                continue
            row = new.setdefault(step, {})
            for key, value in values.items():
                row.setdefault(key, Metric(f"{prefix}/{key}", value, int(seconds * 1000), step))
        by_step = {step: list(row.values()) for step, row in new.items()}
        logged = 0
        for steps in step_batches(by_step):
            metrics = [metric for step in steps for metric in by_step[step]]
            if not self._send(self.client.log_batch, self.run_id, metrics=metrics):
                break
            sync["last_step"][prefix] = steps[-1]
            self._write_sync(sync)
            logged += len(steps)
        return logged

    def sync_stage(self, stage_dir: Path) -> None:
        """Replay the stage's metrics and, once per manifest, log its top-level .json/.png files under `<stage>/`."""
        stage = stage_dir.name
        self.replay_jsonl(stage_dir / METRICS_FILE, stage)
        manifest = read_manifest(stage_dir)
        sync = self._read_sync()
        if manifest is None or sync["manifests"].get(stage) == manifest["fingerprint"]:
            return
        for path in sorted(stage_dir.iterdir()):
            if path.is_file() and path.suffix in STAGE_ARTIFACT_SUFFIXES and not path.name.startswith("."):
                if not self.log_artifact(path, stage):
                    return  # the server is gone: the next run logs this stage's files again
        sync["manifests"][stage] = manifest["fingerprint"]
        self._write_sync(sync)

    def where(self) -> str:
        """How to look at this run: the server's page, or the `mlflow ui` command for a local store."""
        if self.tracking_uri.startswith(("http://", "https://")):
            base = without_password(self.tracking_uri).rstrip("/")
            return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"mlflow ui --backend-store-uri {without_password(self.tracking_uri)}   (run {self.run_id})"

    def close(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED; a resumed pipeline sets it RUNNING again."""
        self._send(self.client.set_terminated, self.run_id, status)

    def _send(self, call, *args, **kwargs) -> bool:
        """Make one MLflow call. If it fails and the server no longer answers, warn once and skip this and every
        later call (False): losing the tracking server must not stop a training run."""
        if self.lost is not None:
            return False
        try:
            call(*args, **kwargs)
        except Exception as e:
            problem = server_problem(self.tracking_uri)
            if problem is None:  # the store answers (or is no server): the error is real
                raise
            self.lost = problem
            log.warning("MLflow server %s stopped answering (%s: %s; %s). The pipeline goes on without it: metrics "
                        "stay in <stage>/metrics.jsonl; run the same command again once the server is back and "
                        "what is missing is logged then", without_password(self.tracking_uri), type(e).__name__,
                        str(e)[:200], problem)
            return False
        return True

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            return self.client.create_experiment(name, artifact_location=self._artifact_location())
        if found.lifecycle_stage != "active":
            raise RuntimeError(f"MLflow experiment {name!r} is deleted in {without_password(self.tracking_uri)}; "
                               f"restore it (`mlflow experiments restore --experiment-id {found.experiment_id}`) "
                               f"or set tracking.experiment to another name")
        return found.experiment_id

    def _artifact_location(self) -> str | None:
        # Unset, a local store would put artifacts in ./mlruns of whatever directory the driver started in.
        if self.tracking_uri.startswith("sqlite:///"):
            database = Path(self.tracking_uri.removeprefix("sqlite:///")).resolve()
            return (database.parent / "mlartifacts").as_uri()
        return None  # a server (or a shared database) decides where its artifacts live

    def _open_run(self, run_name: str | None, config_id: str | None) -> str:
        id_file = self.run_dir / RUN_ID_FILE
        stored_id = id_file.read_text().strip() if id_file.is_file() else None
        stored = self._find_run(stored_id) if stored_id else None
        if (stored is not None and stored.info.lifecycle_stage == "active"
                and stored.info.experiment_id == self.experiment_id
                and stored.data.tags.get(CONFIG_ID_TAG) == config_id):
            self.client.update_run(stored.info.run_id, status="RUNNING")
            log.info("MLflow: resuming run %s", stored.info.run_id)
            return stored.info.run_id
        tags = {"apt.run_dir": str(self.run_dir)}
        if config_id is not None:
            tags[CONFIG_ID_TAG] = config_id
        if stored_id:
            tags[PREVIOUS_RUN_TAG] = stored_id
            log.info("MLflow: run %s was started under another config, experiment or store; starting a new run",
                     stored_id)
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        write_atomic(id_file, run.info.run_id + "\n")
        return run.info.run_id

    def _find_run(self, run_id: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return None  # the stored id belongs to another store (tracking.uri changed)

    def _log_metric_batch(self, metrics: list) -> None:
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self._send(self.client.log_batch, self.run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH])

    def _read_sync(self) -> dict:
        path = self.run_dir / SYNC_FILE
        state = json.loads(path.read_text()) if path.is_file() else {}
        if state.get("run_id") != self.run_id:  # a new MLflow run has seen nothing yet
            state = {"run_id": self.run_id, "last_step": {}, "manifests": {}}
        return state

    def _write_sync(self, state: dict) -> None:
        write_atomic(self.run_dir / SYNC_FILE, json.dumps(state, indent=2))


def step_batches(metrics_by_step: dict[int, list], limit: int = MAX_METRICS_PER_BATCH) -> Iterator[list[int]]:
    """Consecutive runs of steps (ascending) whose metrics fit one batch; a step is never split across two."""
    steps: list[int] = []
    size = 0
    for step in sorted(metrics_by_step):
        count = len(metrics_by_step[step])
        if steps and size + count > limit:
            yield steps
            steps, size = [], 0
        steps.append(step)
        size += count
    if steps:
        yield steps


class LiveReplay:
    """While a stage runs, replay its metrics.jsonl into MLflow every `every` seconds (a background thread)."""

    def __init__(self, logger: MlflowLogger, stage_dir: Path, every: float):
        self._logger, self._stage_dir, self._every = logger, stage_dir, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"mlflow-{stage_dir.name}", daemon=True)

    def __enter__(self) -> LiveReplay:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._logger.replay_jsonl(self._stage_dir / METRICS_FILE, self._stage_dir.name)
            except Exception as e:  # a thread's exception would be lost; the stage's end replays again
                log.warning("live MLflow sync of %s stopped (%s: %s); its metrics are logged when it ends",
                            self._stage_dir.name, type(e).__name__, e)
                return


def config_id(config: dict) -> str:
    """A short hash of the params a config logs: a stored MLflow run is resumed only under the same one."""
    return hashlib.sha256(json.dumps(flatten_params(config), sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def pipeline_run(cfg) -> Iterator[MlflowLogger]:
    """The driver's MLflow run for `cfg.run_dir`: params = the flattened config, plus the resolved config file.
    Ends it FINISHED, FAILED or KILLED (Ctrl-C) and logs where to look at it."""
    tracking = cfg.tracking
    try:
        logger = MlflowLogger(tracking.uri, tracking.experiment, cfg.run_dir, run_name=cfg.run.name,
                              config_id=config_id(cfg.to_dict()))
    except Exception as e:  # the server went away since the start-up check: say so, not MLflow's retry trace
        problem = server_problem(tracking.uri)
        if problem is None:
            raise
        raise ConfigError(server_down(tracking.uri, problem)) from e
    logger.log_params(cfg.to_dict())
    if (cfg.run_dir / "config.yaml").is_file():
        logger.log_artifact(cfg.run_dir / "config.yaml")
    status = "FAILED"
    try:
        yield logger
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        logger.close(status)
        log.info("tracking: MLflow run %s (%s); open it with: %s", logger.run_id, status.lower(), logger.where())
        if logger.lost is not None:
            log.warning("tracking: the MLflow run misses what came after the server stopped answering; run the "
                        "same command again once %s is back: done stages are skipped and their metrics and files "
                        "are logged then", without_password(logger.tracking_uri))


@contextlib.contextmanager
def tracked_stages(logger: MlflowLogger, stage_dirs: list[Path], *, live_every: float | None = None) -> Iterator[None]:
    """Tag each `stage.<name>` running, then done or failed; their metrics reach MLflow while they run (every
    `live_every` seconds, default LIVE_SYNC_SECONDS) and at their end. Stages launched together that fail: the
    ones that wrote their manifest are done."""
    every = LIVE_SYNC_SECONDS if live_every is None else live_every
    for stage_dir in stage_dirs:
        logger.set_tag(f"stage.{stage_dir.name}", "running")
    try:
        with contextlib.ExitStack() as replays:
            for stage_dir in stage_dirs:
                replays.enter_context(LiveReplay(logger, stage_dir, every))
            yield
    except BaseException:
        for stage_dir in stage_dirs:
            finished = read_manifest(stage_dir) is not None  # a launch removes its stages' manifests first
            if finished:
                logger.sync_stage(stage_dir)
            else:
                logger.replay_jsonl(stage_dir / METRICS_FILE, stage_dir.name)  # the steps it made before failing
            logger.set_tag(f"stage.{stage_dir.name}", "done" if finished else "failed")
        raise
    for stage_dir in stage_dirs:
        logger.sync_stage(stage_dir)
        logger.set_tag(f"stage.{stage_dir.name}", "done")


def record_skipped(logger: MlflowLogger, stage_dir: Path) -> None:
    """Tag a done stage `skipped`; a new MLflow run still gets its metrics and files."""
    logger.sync_stage(stage_dir)
    logger.set_tag(f"stage.{stage_dir.name}", "skipped")
