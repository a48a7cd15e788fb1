"""DeepSpeed's own multi-node path: its pdsh runner starts the ranks over ssh on node-a and node-b.

Both hosts are this machine (the `ssh_hosts` fixture: a real sshd, names in /etc/hosts), so the ranks still meet
over TCP through the master address, and each rank starts in the login shell an ssh session gives it. Two hosts
of one rank must end as one node of two ranks (the session's `reference_run`); a host lost mid-finetune must stop
the job naming it, and the surviving host must finish it as if nothing had happened.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from chains import ENV, REFERENCE
from safetensors.torch import load_file

from pipeline.tracking import read_metric_rows

from harness import assert_same_finetune_outputs, free_port

pytestmark = [pytest.mark.dist, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
FORWARDED = {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
             "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}
"""What the driver's environment must give ranks started over ssh (tests/conftest.py sets most of it)."""


def cli(verb, root, corpus, name, *placement) -> list[str]:
    """`apt-pipeline VERB` on the tiny config with the test's data, steps and run directory root/name."""
    return [sys.executable, "-m", "pipeline.cli", *verb, "--config", "tests/tiny.yaml",
            *overrides(root, corpus, name, f"deepspeed.master_port={free_port()}", *placement)]


def overrides(root, corpus, name, *more) -> list[str]:
    return [f"run.root={root}", f"run.name={name}", f"data.sources=[{corpus}]", *REFERENCE, *more]


def on_hosts(hostfile, hosts, port, ranks_per_host) -> list[str]:
    return [f"deepspeed.hostfile={hostfile}", f"deepspeed.num_nodes={hosts}", f"deepspeed.num_gpus={ranks_per_host}",
            f"deepspeed.host_check_port={port}"]


def succeeds(command, **env) -> str:
    result = subprocess.run(command, cwd=REPO, env={**ENV, **env}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def tensors(folder: Path, pattern: str) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob(pattern)):
        out |= {f"{path.name}:{key}": value for key, value in load_file(str(path)).items()}
    assert out, f"no {pattern} in {folder}"
    return out


def assert_same_tensors(expected: dict, actual: dict, atol: float) -> None:
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=atol, msg=key)


def rank_hosts(stage_dir: Path) -> dict[int, str]:
    records = [json.loads(path.read_text()) for path in (stage_dir / ".ranks").glob("rank*.json")]
    return {record["rank"]: record["host"] for record in records}


def test_two_hosts_through_the_pdsh_runner_equal_one_node_of_two_ranks(tmp_path, ssh_hosts, reference_run,
                                                                        small_corpus):
    hostfile = ssh_hosts.hostfile(tmp_path / "hostfile", {"node-a": 1, "node-b": 1})
    # As a user starts it: launch/multi_node.sh, which runs `apt-pipeline run` with the deepspeed.* placement.
    script = ["launch/multi_node.sh", "--config", "tests/tiny.yaml", "--hostfile", str(hostfile), "--nodes", "2",
              "--gpus-per-node", "1", "--master-port", str(free_port()),
              *overrides(tmp_path, small_corpus, "run", f"deepspeed.host_check_port={ssh_hosts.port}")]
    output = succeeds(script, APT_PIPELINE=str(Path(sys.executable).with_name("apt-pipeline")))
    run_dir = tmp_path / "run"

    assert "cmd = pdsh" in output and "--master_addr node-a" in output  # the runner's multi-node path
    for stage in ("finetune", "salience"):
        assert json.loads((run_dir / stage / "manifest.json").read_text())["world_size"] == 2, stage
        assert rank_hosts(run_dir / stage) == {0: "node-a", 1: "node-b"}, stage  # each rank on its own host
    assert_same_finetune_outputs(reference_run, run_dir)
    assert_same_tensors(tensors(reference_run / "finalize", "masks.safetensors"),
                        tensors(run_dir / "finalize", "masks.safetensors"), atol=0)
    assert_same_tensors(tensors(reference_run / "merge" / "model", "*.safetensors"),
                        tensors(run_dir / "merge" / "model", "*.safetensors"), atol=1e-6)


def processes_of(host: str) -> dict[int, dict[str, str]]:
    """The processes started on `host` (its launcher and ranks), by the node name in their environment."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            raw = (proc / "environ").read_bytes()
        except (OSError, ValueError):  # gone, or not a process folder
            continue
        env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
        if proc.name.isdigit() and env.get("APT_NODE_NAME") == host:
            found[int(proc.name)] = env
    return found


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss; a step logged twice (before the loss of a node and again after the resume) counts last."""
    rows = read_metric_rows(run_dir / "finetune" / "metrics.jsonl")
    return {step: values["loss"] for step, _, values in rows if "loss" in values}


def test_a_lost_host_stops_the_job_naming_it_and_the_survivor_resumes(tmp_path, ssh_hosts, reference_run, small_corpus):
    both = ssh_hosts.hostfile(tmp_path / "both", {"node-a": 1, "node-b": 1})
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run / "prep", run_dir / "prep")  # the same data
    finetune = cli(["stage", "finetune"], tmp_path, small_corpus, "run", *on_hosts(both, 2, ssh_hosts.port, 1))
    proc = subprocess.Popen(finetune, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        latest = run_dir / "finetune" / "checkpoints" / "latest"
        deadline = time.time() + 300
        while not latest.is_file():
            assert proc.poll() is None and time.time() < deadline, "finetune ended before its first checkpoint"
            time.sleep(0.05)
        rank1 = json.loads((run_dir / "finetune" / ".ranks" / "rank1.json").read_text())
        lost = processes_of("node-b")  # its launcher and its rank
        assert rank1["host"] == "node-b" and rank1["pid"] in lost and len(lost) >= 2, (rank1, lost.keys())
        for env in lost.values():  # what the runner's ssh hop carried to the host
            assert {key: env.get(key) for key in FORWARDED} == FORWARDED
        for pid in lost:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
        output, _ = proc.communicate(timeout=120)
        stopped_after = time.time() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and stopped_after < 30, output[-3000:]
    assert f"rank 1 (pid {rank1['pid']} on node-b) died without an error" in output

    survivor = ssh_hosts.hostfile(tmp_path / "survivor", {"node-a": 2})
    survivor_only = on_hosts(survivor, 1, ssh_hosts.port, 2)
    output = succeeds(cli(["stage", "finetune"], tmp_path, small_corpus, "run", *survivor_only))
    assert "--force_multi" in output and "resumed from step" in output  # over ssh to node-a, from the checkpoint
    assert rank_hosts(run_dir / "finetune") == {0: "node-a", 1: "node-a"}
    expected, actual = losses(reference_run), losses(run_dir)
    assert sorted(actual) == list(range(1, 31))
    for step in actual:
        assert actual[step] == pytest.approx(expected[step], rel=1e-5), step
    assert_same_finetune_outputs(reference_run, run_dir, atol=1e-5)
