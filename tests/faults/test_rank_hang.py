"""A rank that hangs: the others give up at the next collective after `deepspeed.timeout_minutes`, not never.

Real gloo ranks; rank 1 stops taking part (as a rank stuck in I/O or a deadlock does) while rank 0 all-reduces.
"""

import os
import time

import pytest
import torch

from harness import spawn

pytestmark = pytest.mark.dist

TIMEOUT_MINUTES = 0.2  # 12 s: also the limit for the ranks to meet at start-up and in new_group, so not less


def reduce_while_rank_1_hangs(rank, world_size, out_dir, subgroup):
    from pipeline import dist

    dist.init_distributed(TIMEOUT_MINUTES)  # what every rank of a stage does, with deepspeed.timeout_minutes
    # DeepSpeed's ZeRO collectives run on groups it creates without a timeout argument.
    group = torch.distributed.new_group([0, 1]) if subgroup else None
    report = out_dir / "rank0.txt"
    if rank == 1:
        deadline = time.monotonic() + 120
        while not report.exists() and time.monotonic() < deadline:  # never joins the all-reduce
            time.sleep(0.1)
        return
    started = time.monotonic()
    try:
        torch.distributed.all_reduce(torch.ones(4), group=group)
        report.write_text("the all-reduce returned")
    except RuntimeError as e:
        report.write_text(f"{time.monotonic() - started:.1f}\n{e}")
    # A gloo group whose work timed out may abort ("terminate called without an active exception") when it is
    # destroyed at interpreter exit; the report is written, so leave without running that teardown.
    os._exit(0)


@pytest.mark.parametrize("subgroup", [False, True], ids=["world", "deepspeed-style-subgroup"])
def test_a_collective_with_a_hung_rank_fails_after_the_configured_timeout(tmp_path, subgroup):
    spawn(reduce_while_rank_1_hangs, 2, tmp_path, subgroup)
    seconds, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert TIMEOUT_MINUTES * 60 <= float(seconds) < TIMEOUT_MINUTES * 60 + 15, message
    assert "timed out" in message.lower() or "timeout" in message.lower(), message
