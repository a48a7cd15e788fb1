import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline import run as driver
from pipeline.stage import Stage, fingerprint, is_done, write_atomic


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
        from pipeline.stage import Stage
        def slow(cfg, run_dir):
            (run_dir / "slow" / "part.bin").write_bytes(b"x" * 1000)
            print("writing", flush=True)
            time.sleep(60)
        cfg = config.load(None, ["run.root={tmp_path}"])
        run.run_stage(Stage("slow", ("data",), (), slow), cfg, cfg.run_dir)
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

    stages = (Stage("a", ("data",), (), make("a")), Stage("b", ("train",), ("a",), make("b")))
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
