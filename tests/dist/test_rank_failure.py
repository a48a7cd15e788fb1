"""A rank that dies takes its launch down quickly, the driver names it, and a stage launched before it stays done."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline import config as config_lib
from pipeline import run as driver
from pipeline.stage import MANIFEST

from harness import free_port

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_killed_rank_fails_the_stage_within_a_minute_and_is_named(tmp_path, small_corpus):
    cfg = config_lib.load("tests/tiny.yaml", [f"run.root={tmp_path}", f"data.sources=[{small_corpus}]",
                                                "data.num_proc=1", "data.seq_len=64", "train.steps=12",
                                                "pruning.end_step=2", "salience.batches=5000",
                                                f"deepspeed.master_port={free_port()}"])
    driver.run_stage(driver.stage_by_name("prep"), cfg, cfg.run_dir)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config_lib.dump(cfg))
    # finetune and salience share one launch; rank 1 dies in the second
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "stage", "finetune", "salience",
                             "--config", str(config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    status = cfg.run_dir / "salience" / ".ranks" / "rank1.json"
    deadline = time.time() + 240
    while not status.is_file():
        assert proc.poll() is None and time.time() < deadline, "salience did not start"
        time.sleep(0.2)
    time.sleep(2)  # into the calibration batches
    victim = json.loads(status.read_text())
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.time()
    try:
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert time.time() - killed_at < 60
    assert output.count("launching:") == 1
    assert "stage salience failed" in output
    assert f"rank 1 (pid {victim['pid']}" in output and "died without an error" in output
    assert (cfg.run_dir / "finetune" / MANIFEST).is_file()  # done: a rerun starts at salience
    assert not (cfg.run_dir / "salience" / MANIFEST).exists()
