"""Two 'nodes' on this machine: one DeepSpeed per-node launcher each (node ranks 0 and 1), one master address.

This is what the `deepspeed` multi-node runner starts on every host of a hostfile (over pdsh/ssh, which this
machine cannot do to itself); the ranks then meet over TCP exactly as on separate hosts. Two nodes of one
rank must train exactly like one node of two ranks.
"""

import base64
import json
import shutil
import subprocess
import sys

import pytest

from pipeline import config as config_lib
from pipeline import run as driver

from harness import assert_same_finetune_outputs, free_port, spawn

pytestmark = [pytest.mark.dist, pytest.mark.slow]

FAST = ["data.seq_len=64", "train.steps=30", "pruning.end_step=20", "train.checkpoint_every=30",
        "train.eval_batches=2", "train.precision=fp32"]


def finetune_rank(rank, world_size, cfg):
    driver.execute_stage(driver.stage_by_name("finetune"), cfg, cfg.run_dir)


def test_two_nodes_of_one_rank_equal_one_node_of_two(tmp_path, small_corpus):
    def make(name):
        return config_lib.load("tests/tiny.yaml", [f"run.root={tmp_path}", f"run.name={name}", "data.num_proc=1",
                                                     f"data.sources=[{small_corpus}]", *FAST])

    one_node, two_nodes = make("one_node"), make("two_nodes")
    driver.run_stage(driver.stage_by_name("prep"), one_node, one_node.run_dir)
    shutil.copytree(one_node.run_dir / "prep", two_nodes.run_dir / "prep")
    spawn(finetune_rank, 2, one_node)

    config_path = tmp_path / "two_nodes.yaml"
    config_path.write_text(config_lib.dump(two_nodes))
    world_info = base64.urlsafe_b64encode(json.dumps({"node-a": [0], "node-b": [0]}).encode()).decode()
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
                               f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "--module", "--no_local_rank", "pipeline.cli", "stage", "finetune", "--worker",
                               "--config", str(config_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for node_rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]

    manifest = json.loads((two_nodes.run_dir / "finetune" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert_same_finetune_outputs(one_node.run_dir, two_nodes.run_dir)
