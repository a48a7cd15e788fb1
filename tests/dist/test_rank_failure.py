"""A rank that dies takes the stage down quickly, and the driver names it."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline import config as config_lib
from pipeline import run as driver

from harness import free_port

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_killed_rank_fails_the_stage_within_a_minute_and_is_named(tmp_path, small_corpus):
    cfg = config_lib.load("tests/tiny.yaml", [f"run.root={tmp_path}", f"data.sources=[{small_corpus}]",
                                                "data.num_proc=1", "data.seq_len=64", "train.steps=2000",
                                                "train.checkpoint_every=1000", f"deepspeed.master_port={free_port()}"])
    driver.run_stage(driver.stage_by_name("prep"), cfg, cfg.run_dir)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config_lib.dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "stage", "finetune", "--config", str(config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = cfg.run_dir / "finetune" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, "finetune did not start training"
        time.sleep(0.2)
    victim = json.loads((cfg.run_dir / "finetune" / ".ranks" / "rank1.json").read_text())
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.time()
    try:
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert time.time() - killed_at < 60
    assert f"rank 1 (pid {victim['pid']}" in output and "died without an error" in output
