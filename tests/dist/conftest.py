"""Fixtures of the DeepSpeed engine tests; their helpers are in engine_harness.py."""

import pytest
from engine_harness import STAGES


@pytest.fixture(params=STAGES)
def results(request, measured):
    """Both ranks' measurements under one ZeRO stage, from the test module's own `measured`."""
    return [per_rank[request.param] for per_rank in measured]
