"""What the driver hands DeepSpeed's pdsh runner for a hostfile run (the hop itself: tests/dist/test_pdsh_nodes.py)."""

import json
import subprocess
from pathlib import Path

import pytest

from pipeline import nodes
from pipeline import run as driver
from pipeline.config import DeepSpeedSection
from pipeline.stage import NODE_NAME, describe_rank_failures, write_rank_status


def section(tmp_path, hosts, **fields) -> DeepSpeedSection:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{host} slots=2\n" for host in hosts))
    return DeepSpeedSection(hostfile=str(hostfile), **fields)


def test_the_ranks_on_other_hosts_get_the_drivers_settings_and_their_host_name(tmp_path):
    user_file = tmp_path / "my_env"
    user_file.write_text("# mine\nNCCL_SOCKET_IFNAME=ib0\n\nFOO=bar\n")
    env = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": "/shared/ext", "OMP_NUM_THREADS": "4",
           "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_secret", "PATH": "/usr/bin:/bin", "HOME": "/root",
           "CUDA_VISIBLE_DEVICES": "0", "TORCH_DISTRIBUTED_DEBUG": 'a"b', "DS_ENV_FILE": str(user_file)}
    lines = nodes.env_lines(env)
    assert lines[:5] == ["DS_ACCELERATOR=cpu", "HF_HUB_OFFLINE=1", "OMP_NUM_THREADS=4",
                         "PATH=/usr/bin:/bin", "TORCH_EXTENSIONS_DIR=/shared/ext"]
    # The host name pdsh reached, then the user's own file, whose lines win (later exports override).
    assert lines[5:] == [f"{NODE_NAME}=%h", "NCCL_SOCKET_IFNAME=ib0", "FOO=bar"]


def test_the_env_file_lives_for_the_launch_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./.deepspeed_env here
    with nodes.node_env({"PATH": "/bin", "DS_ENV_FILE": str(tmp_path / "none")}) as env:
        path = Path(env["DS_ENV_FILE"])
        assert path.read_text().splitlines()[-1] == f"{NODE_NAME}=%h"
        assert path.parent.stat().st_mode & 0o077 == 0
    assert not path.exists()


def test_the_launcher_gets_the_first_host_as_master_address(tmp_path):
    command = driver.deepspeed_command(section(tmp_path, ["node-a", "node-b"], num_nodes=2), ["finetune"], Path("c"))
    assert command[command.index("--master_addr") + 1] == "node-a" and "--force_multi" not in command
    given = section(tmp_path, ["node-a", "node-b"], num_nodes=2, launcher_args=("--master_addr=10.0.0.1",))
    assert driver.deepspeed_command(given, ["finetune"], Path("c")).count("--master_addr") == 0


def test_a_single_remote_host_is_reached_over_ssh_not_run_here(tmp_path):
    # DeepSpeed would start a one-host job on this machine whichever host the hostfile names.
    assert "--force_multi" in nodes.launcher_args(section(tmp_path, ["node-b"]))
    assert "--force_multi" in nodes.launcher_args(section(tmp_path, ["node-b", "node-a"], num_nodes=1))
    assert "--force_multi" not in nodes.launcher_args(section(tmp_path, ["localhost"]))


def test_a_rank_records_its_hostfile_name(tmp_path, monkeypatch):
    monkeypatch.setenv(NODE_NAME, "node-b")
    write_rank_status(tmp_path, 1, "running")
    assert json.loads((tmp_path / ".ranks" / "rank1.json").read_text())["host"] == "node-b"
    assert " on node-b) died without an error" in describe_rank_failures(tmp_path)


@pytest.mark.parametrize("script", ["launch/multi_node.sh", "launch/slurm.sbatch"])
def test_the_launch_scripts_parse_and_refuse_missing_arguments(script):
    # multi_node.sh runs for real in tests/dist/test_pdsh_nodes.py; slurm.sbatch needs an allocation's scontrol.
    subprocess.run(["bash", "-n", script], check=True)
    result = subprocess.run(["bash", script], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr.lower()
