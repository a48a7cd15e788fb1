import dataclasses
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import run as driver
from pipeline.config import DataSection, TrainSection
from pipeline.stage import Stage, WriteFailed, fingerprint, is_done, write_atomic, write_failure


@dataclass(frozen=True)
class DataView:
    """A fake stage's config view: the data section only."""

    data: DataSection


@dataclass(frozen=True)
class TrainView:
    train: TrainSection


def test_fingerprint_depends_on_config_and_inputs():
    base = fingerprint({"data": {"seq_len": 128}}, {})
    assert base == fingerprint({"data": {"seq_len": 128}}, {})
    assert base != fingerprint({"data": {"seq_len": 64}}, {})
    assert base != fingerprint({"data": {"seq_len": 128}}, {"prep": "abc"})


def test_write_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "a" / "m.json"
    write_atomic(path, "first")
    write_atomic(path, b"second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]


def test_killed_stage_leaves_no_manifest(tmp_path):
    # A stage that wrote part of its output and was then killed must not look done.
    script = textwrap.dedent(f"""
        import time, pathlib
        from pipeline import config, run
        from pipeline.config import PrepConfig
        from pipeline.stage import Stage
        def slow(cfg, run_dir):
            (run_dir / "slow" / "part.bin").write_bytes(b"x" * 1000)
            print("writing", flush=True)
            time.sleep(60)
        cfg = config.load(None, ["run.root={tmp_path}"])
        run.run_stage(Stage("slow", PrepConfig, (), slow), cfg, cfg.run_dir)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    stage_dir = tmp_path / "tiny" / "slow"
    assert (stage_dir / "part.bin").exists()
    assert not (stage_dir / "manifest.json").exists()
    assert not is_done(stage_dir, "anything")


@pytest.fixture
def counting_stages(monkeypatch):
    """Two fake stages (b consumes a) that count their runs, in place of the real stage list."""
    calls = []

    def make(name):
        def run(cfg, run_dir):
            calls.append(name)
            (run_dir / name / "out.txt").write_text(f"{name} {sorted(vars(cfg))}")
            return {"n": len(calls)}
        return run

    stages = (Stage("a", DataView, (), make("a")), Stage("b", TrainView, ("a",), make("b")))
    monkeypatch.setattr(driver, "STAGES", stages)
    return calls


def test_runner_skips_done_and_reruns_stale(tmp_path, counting_stages):
    from pipeline import config as config_lib

    def cfg(*overrides):
        return config_lib.load(None, [f"run.root={tmp_path}", *overrides])

    driver.run_pipeline(cfg())
    assert counting_stages == ["a", "b"]
    driver.run_pipeline(cfg())
    assert counting_stages == ["a", "b"]  # both done
    driver.run_pipeline(cfg("train.lr=0.5"))
    assert counting_stages == ["a", "b", "b"]  # only b reads train
    driver.run_pipeline(cfg("train.lr=0.5", "data.seq_len=64"))
    assert counting_stages == ["a", "b", "b", "a", "b"]  # a is stale, so is everything after it
    driver.run_pipeline(cfg("train.lr=0.5", "data.seq_len=64"), from_stage="b")
    assert counting_stages[-1] == "b" and len(counting_stages) == 6
    manifest = json.loads((tmp_path / "tiny" / "b" / "manifest.json").read_text())
    assert manifest["inputs"]["a"] == json.loads((tmp_path / "tiny" / "a" / "manifest.json").read_text())["fingerprint"]
    assert set(manifest) >= {"stage", "fingerprint", "versions", "world_size", "started", "finished", "outputs"}
    assert list(manifest["outputs"]) == ["out.txt"]


def test_deleted_output_makes_stage_stale(tmp_path, counting_stages):
    from pipeline import config as config_lib

    cfg = config_lib.load(None, [f"run.root={tmp_path}"])
    driver.run_pipeline(cfg)
    (tmp_path / "tiny" / "a" / "out.txt").unlink()
    time.sleep(0.01)
    driver.run_pipeline(cfg)
    assert counting_stages == ["a", "b", "a", "b"]


def test_manifest_without_a_declared_output_is_from_an_older_version_and_reruns(tmp_path, counting_stages,
                                                                              monkeypatch):
    from pipeline import config as config_lib

    cfg = config_lib.load(None, [f"run.root={tmp_path}"])
    driver.run_pipeline(cfg)
    # A newer version of stage a also writes new.txt, which b now reads: a's old manifest does not record it.
    a, b = driver.STAGES
    monkeypatch.setattr(driver, "STAGES", (dataclasses.replace(a, outputs=("out.txt", "new.txt")), b))
    driver.run_pipeline(cfg)
    assert counting_stages == ["a", "b", "a", "b"]
    assert not is_done(tmp_path / "tiny" / "a", json.loads((tmp_path / "tiny" / "a" / "manifest.json").read_text())
                       ["fingerprint"], ("out.txt", "new.txt"))  # the fake a never writes it: never done


def test_distributed_stages_in_a_row_share_one_launch(tmp_path, monkeypatch):
    from pipeline import config as config_lib

    def stage(name, inputs, distributed=False):
        return Stage(name, DataView, inputs, None, distributed=distributed)

    a, b, c, d, e = (stage("a", ()), stage("b", ("a",), True), stage("c", ("b",), True), stage("d", ("c",)),
                     stage("e", ("d",), True))
    monkeypatch.setattr(driver, "STAGES", (a, b, c, d, e))
    assert driver.steps_of((a, b, c, d, e)) == [(a,), (b, c), (d,), (e,)]
    assert driver.steps_of((b, d, c)) == [(b,), (d,), (c,)]
    cfg = config_lib.load(None, [f"run.root={tmp_path}"])
    steps = [(stages, runs) for stages, _, runs in driver.plan_steps(cfg, cfg.run_dir)]
    assert steps == [((a,), True), ((b, c), True), ((d,), True), ((e,), True)]


def test_every_stage_declares_what_later_stages_read():
    assert all(stage.outputs for stage in driver.STAGES)
    assert "heldout.jsonl" in driver.stage_by_name("prep").outputs  # lm-eval's task reads it in the eval stage


WRITE_BIG_FILE = """
import sys
from pathlib import Path
from pipeline.stage import save_tensors, write_atomic
path = Path(sys.argv[1])
if sys.argv[2] == "write_atomic":
    write_atomic(path, b"x" * 100_000)
else:
    import torch
    save_tensors({"w": torch.zeros(25_000)}, path)
"""


@pytest.mark.parametrize("writer", ["write_atomic", "save_tensors"])
def test_a_write_over_the_file_size_limit_names_the_file_and_the_fix_and_keeps_the_old_file(tmp_path, writer):
    path = tmp_path / "stage" / "out.safetensors"
    write_atomic(path, b"the previous output")
    limit = 50_000  # RLIMIT_FSIZE: the kernel refuses writes past it (EFBIG; Python ignores SIGXFSZ)
    result = subprocess.run([sys.executable, "-c", WRITE_BIG_FILE, str(path), writer], capture_output=True, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"pipeline.stage.WriteFailed: [Errno {errno.EFBIG}] could not write {path} "), error
    assert f"file-size limit ({limit} bytes for this process)" in error and "ulimit -f" in error
    assert path.read_bytes() == b"the previous output"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_write_failure_knows_refused_writes_and_nothing_else(tmp_path):
    path = tmp_path / "checkpoints" / "step20"
    full = write_failure(OSError(errno.ENOSPC, "No space left on device"), path)
    assert isinstance(full, WriteFailed) and full.errno == errno.ENOSPC
    assert str(full).startswith(f"[Errno {errno.ENOSPC}] could not write {path} (No space left on device): the disk")
    rust = write_failure(RuntimeError("Error while serializing: I/O error: File too large (os error 27)"), path)
    assert rust.errno == errno.EFBIG and "ulimit -f" in str(rust)
    torch_writer = write_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
                                 path)
    assert torch_writer.errno in (errno.EFBIG, errno.ENOSPC, errno.EIO) and "ulimit -f" in str(torch_writer)
    assert write_failure(full, tmp_path) is full
    for other in (FileNotFoundError(errno.ENOENT, "gone"), RuntimeError("CUDA out of memory"), ValueError("bad")):
        assert write_failure(other, path) is None


def test_cpu_ranks_get_thread_and_allocator_settings_unless_the_user_set_them(monkeypatch):
    monkeypatch.setattr(driver, "on_cpu", lambda: True)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    env = driver.rank_environment(ranks_per_node=2)
    assert env["MALLOC_MMAP_THRESHOLD_"] == "131072"
    assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert driver.rank_environment(ranks_per_node=2)["MALLOC_MMAP_THRESHOLD_"] == "65536"
    monkeypatch.setattr(driver, "on_cpu", lambda: False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert "MALLOC_MMAP_THRESHOLD_" not in driver.rank_environment(ranks_per_node=2)  # GPU ranks: left alone


def test_ranks_find_the_tools_beside_the_interpreter_first(monkeypatch):
    """ninja above all: the venv's and the system's would rebuild DeepSpeed's ops over each other."""
    here = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", f"/usr/bin{os.pathsep}{here}{os.pathsep}/bin")
    assert driver.rank_environment(ranks_per_node=2)["PATH"].split(os.pathsep) == [here, "/usr/bin", "/bin"]
