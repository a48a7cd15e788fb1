"""Writing a full value into ZeRO-3's partitions when the ranks do not divide its size (pipeline/engine.py)."""

from types import SimpleNamespace

import torch

from pipeline import engine


def test_each_rank_gets_its_slice_and_the_last_one_is_padded(monkeypatch):
    value = torch.arange(2065, dtype=torch.float32).reshape(35, 59)  # 2065 = 2 x 1033 - 1: the last rank pads one
    param = SimpleNamespace(ds_tensor=torch.zeros(1033), ds_process_group=None)
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, rank=rank: rank)
        parts.append(engine._local_partition(param, value))
    assert [part.numel() for part in parts] == [1033, 1033]
    assert torch.equal(torch.cat(parts)[:2065], value.flatten()) and parts[1][-1] == 0
