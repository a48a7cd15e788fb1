"""Real OS faults while finetune writes a checkpoint: a rank SIGKILLed halfway through its file, then a write
the file system refuses (RLIMIT_FSIZE). `latest` must stay on the last complete checkpoint, finished work must
stay intact, and a rerun must end exactly where an uninterrupted run ends.

One interrupted run goes through the phases in order (module fixtures), so each fault costs one launch.
"""

import json
import os
import resource
import shutil
import subprocess
import sys

import pytest

from pipeline import config as config_lib
from pipeline import run as driver
from pipeline.checkpoints import LATEST, CheckpointError, check_checkpoint
from pipeline.stage import MANIFEST, sha256_file

from harness import assert_same_finetune_outputs, free_port, spawn

pytestmark = [pytest.mark.dist, pytest.mark.slow]

COMMON = ["data.seq_len=64", "train.steps=20", "train.checkpoint_every=10", "pruning.end_step=8",
          "pruning.update_every=4", "pruning.mask_step=0.2", "train.precision=fp32", "train.eval_batches=2",
          "deepspeed.config=ds_configs/zero2_cpu.json", "pruning.compact=false"]
"""Compaction off: it rewrites the base model mid-run (a file far above FILE_SIZE_LIMIT) and shrinks later
checkpoints; its own resume is tested in tests/dist/test_compaction.py."""
FILE_SIZE_LIMIT = 32 << 10
"""Above every file finetune writes between two checkpoints (metrics rows, update masks, status files),
below each checkpoint file (about 60-80 KiB on the tiny model)."""
KILL_HOOK = '''"""Fault injection (tests/faults): the process that saves a path containing every part of TARGET writes
half of the bytes and SIGKILLs itself, as a rank does when its node dies in the middle of a write."""
import io
import os
import signal
import sys

TARGET = {target!r}


def wrap_torch_save(event, args):
    # torch.save's zip writer opens the file in C++, unseen by the `open` audit event, so torch.save itself
    # is wrapped, at the first import after torch has defined it.
    if event != "import":
        return
    torch = sys.modules.get("torch")
    save = getattr(torch, "save", None)
    if save is None or getattr(save, "fault_injected", False):
        return

    def save_half_then_die(obj, f, *args, **kwargs):
        if not (isinstance(f, (str, os.PathLike)) and all(part in os.fspath(f) for part in TARGET)):
            return save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        save(obj, buffer, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            out.flush()
            os.fsync(out.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    save_half_then_die.fault_injected = True
    torch.save = save_half_then_die


sys.addaudithook(wrap_torch_save)
'''
VICTIM = ("/step20/", "zero_pp_rank_1_")
"""Rank 1's optimizer-state file of the second checkpoint."""


def make_run(root, prep_dir) -> tuple[config_lib.RunConfig, list[str]]:
    """A run directory with prep done, and the `apt-pipeline stage finetune` command that trains it."""
    cfg = config_lib.load("tests/tiny.yaml", [f"run.root={root}", *COMMON, f"deepspeed.master_port={free_port()}"])
    shutil.copytree(prep_dir, cfg.run_dir / "prep")
    config_path = root / "config.yaml"
    config_path.write_text(config_lib.dump(cfg))
    return cfg, [sys.executable, "-m", "pipeline.cli", "stage", "finetune", "--config", str(config_path)]


def finetune(command, *, env=None, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, preexec_fn=preexec_fn)


def hashes(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def finetune_rank(rank, world_size, cfg):
    driver.execute_stage(driver.stage_by_name("finetune"), cfg, cfg.run_dir)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, prep_dir):
    """The uninterrupted run, on 2 ranks started in-process (cheaper than the launcher, the same training)."""
    cfg, _ = make_run(tmp_path_factory.mktemp("straight"), prep_dir)
    with pytest.MonkeyPatch.context() as patch:  # the BLAS threads per rank the driver gives launched ranks
        patch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // 2))))
        spawn(finetune_rank, 2, cfg)
    return cfg


@pytest.fixture(scope="module")
def killed(tmp_path_factory, prep_dir):
    """Phase 1: rank 1 is SIGKILLed halfway through writing its part of the step-20 checkpoint."""
    root = tmp_path_factory.mktemp("faults")
    cfg, command = make_run(root, prep_dir)
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK.format(target=VICTIM))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    return cfg, command, finetune(command, env=env)


@pytest.fixture(scope="module")
def refused(killed):
    """Phase 2: the rerun may write no file beyond FILE_SIZE_LIMIT bytes, so its step-20 checkpoint write fails."""
    cfg, command, _ = killed
    run_dir = cfg.run_dir
    before = {"step10": hashes(run_dir / "finetune" / "checkpoints" / "step10"), "prep": hashes(run_dir / "prep")}
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # a .pyc over the limit would fail (silently) too
    result = finetune(command, env=env, preexec_fn=lambda: resource.setrlimit(
        resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT)))
    return cfg, command, result, before


def test_kill_9_while_writing_a_checkpoint_leaves_latest_on_the_previous_one(killed):
    cfg, _, result = killed
    checkpoints = cfg.run_dir / "finetune" / "checkpoints"
    victim = next((checkpoints / "step20").glob("*zero_pp_rank_1_*"))  # the fault fired: half a file
    assert result.returncode != 0 and "rank 1" in result.stderr and "died without an error" in result.stderr
    assert (checkpoints / LATEST).read_text().strip() == "step10", "latest names a checkpoint a rank never finished"
    check_checkpoint(checkpoints)  # what latest names loads
    with pytest.raises(CheckpointError, match=f"{victim.name}: truncated"):
        check_checkpoint(checkpoints, "step20")
    assert not (cfg.run_dir / "finetune" / MANIFEST).exists()


def test_a_refused_checkpoint_write_fails_clearly_and_keeps_what_was_done(refused):
    cfg, _, result, before = refused
    run_dir = cfg.run_dir
    checkpoints = run_dir / "finetune" / "checkpoints"
    errors = [line for line in result.stderr.splitlines() if line.startswith("rank ") and " raised: " in line]
    assert result.returncode != 0 and errors, result.stderr[-3000:]
    for line in errors:  # each rank names what it could not write, why, and what to do
        assert str(checkpoints / "step20") in line and "file-size limit" in line and "ulimit -f" in line, line
    assert (checkpoints / LATEST).read_text().strip() == "step10"
    assert hashes(checkpoints / "step10") == before["step10"]
    assert hashes(run_dir / "prep") == before["prep"]
    prep_manifest = json.loads((run_dir / "prep" / MANIFEST).read_text())
    assert {name: sha256_file(run_dir / "prep" / name) for name in prep_manifest["outputs"]} == prep_manifest["outputs"]
    assert not (run_dir / "finetune" / MANIFEST).exists()
    assert not [p for p in run_dir.rglob("*.tmp")], "a temp file of an atomic write was left behind"


def test_the_rerun_resumes_from_the_previous_checkpoint_and_ends_like_an_uninterrupted_run(refused, straight):
    cfg, command, _, _ = refused
    result = finetune(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step10 at step 10" in result.stderr
    assert_same_finetune_outputs(straight.run_dir, cfg.run_dir)
