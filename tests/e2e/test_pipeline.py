"""The whole chain as a user runs it: `apt-pipeline run` on the tiny config with 2 CPU ranks (the session's
`reference_run`), what each stage left, a rerun that skips, and a changed option that reruns only what it touches."""

import json
import shutil
from pathlib import Path

import pytest
from chains import REFERENCE, apt_pipeline, assert_export_is_the_trained_model, grown_ranks, run_config

from harness import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STAGES = ["prep", "finetune", "salience", "finalize", "merge", "eval"]


def test_every_stage_leaves_its_manifest_and_the_export_meets_the_budget(reference_run):
    for stage in STAGES:
        assert (reference_run / stage / "manifest.json").is_file(), stage
    report = json.loads((reference_run / "finalize" / "masks.json").read_text())
    metrics = json.loads((reference_run / "eval" / "metrics.json").read_text())
    assert metrics["pruned"]["params"] == report["remaining_params"]
    assert report["remaining_fraction"] <= 0.5
    assert (reference_run / "finalize" / "masks.png").stat().st_size > 1000


def test_finetune_and_salience_share_one_launch(reference_run):
    """Their ranks start once (interpreter, imports, process group) and run both stages."""
    log = (reference_run.parent / "driver.log").read_text()
    launches = [line for line in log.splitlines() if " launching: " in line]
    assert len(launches) == 1 and "finetune, salience launching: " in launches[0], launches
    assert launches[0].endswith(" stage finetune salience --worker --config " + str(reference_run / "config.yaml"))


def test_the_launch_leaves_no_shared_memory_behind(reference_run):
    """DeepSpeed's CPU all-reduce maps a 66 MB /dev/shm segment per rank and never unlinks it; the ranks do."""
    port = run_config(reference_run).deepspeed.master_port
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_the_chain_reads_grown_adapters_and_the_export_equals_the_trained_model(reference_run):
    """Issue 14: the salience stage injected adapters at `apt.rank` and refused the grown shapes."""
    ranks = grown_ranks(reference_run)
    assert max(ranks.values()) > 8 and min(ranks.values()) >= 8  # apt.rank 8, grown at steps 10 and 20
    assert_export_is_the_trained_model(reference_run)


def test_a_rerun_skips_every_stage_and_a_changed_option_reruns_only_what_it_touches(reference_run, small_corpus,
                                                                                    tmp_path):
    shutil.copytree(reference_run, tmp_path / "tiny", ignore=shutil.ignore_patterns("mlflow*", "mlartifacts"))
    overrides = [f"run.root={tmp_path}", f"data.sources=[{small_corpus}]", f"deepspeed.master_port={free_port()}",
                 *REFERENCE]
    again = apt_pipeline("run", "--config", "tests/tiny.yaml", *overrides)
    assert all(f"{stage:<9} done, skipped" in again.stderr for stage in STAGES)

    changed = apt_pipeline("run", "--config", "tests/tiny.yaml", *overrides, "export.dtype=bfloat16")
    assert "merge     done, skipped" not in changed.stderr and "finalize  done, skipped" in changed.stderr
