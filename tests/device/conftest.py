"""Fixtures of the device tests: GPU rules on CPU (`device_harness.py` says how)."""

from __future__ import annotations

import pytest
import torch

from device_harness import ACCELERATOR, Collectives, StrictDevices


@pytest.fixture
def strict():
    with StrictDevices():
        yield


@pytest.fixture
def accelerator(monkeypatch) -> Collectives:
    """`pipeline.dist` on a 2-rank group whose accelerator is `meta`; returns the collectives' record."""
    from pipeline import dist

    collectives = Collectives()
    monkeypatch.setattr(dist, "device", lambda: ACCELERATOR)
    monkeypatch.setattr(dist, "on_cpu", lambda: False)
    monkeypatch.setattr(dist, "synchronize", lambda: None)
    monkeypatch.setattr(dist, "empty_cache", lambda: None)
    for name, value in (("is_initialized", lambda: True), ("get_world_size", lambda group=None: 2),
                        ("get_rank", lambda group=None: 0), ("barrier", lambda *a, **k: None),
                        ("all_reduce", collectives.all_reduce)):
        monkeypatch.setattr(torch.distributed, name, value)
    return collectives
