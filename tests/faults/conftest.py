"""A real `mlflow server` the fault tests can kill and start again on the same port and store."""

from __future__ import annotations

import pytest

from harness import MlflowServer


@pytest.fixture
def mlflow_server(tmp_path):
    """A started MlflowServer; killed at the end of the test whatever happened."""
    server = MlflowServer(tmp_path / "mlflow_server")
    try:
        server.start()
        yield server
    finally:
        server.kill()
