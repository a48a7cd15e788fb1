"""Fixtures of the multi-rank tests: the DeepSpeed engine tests' (helpers in engine_harness.py) and two ssh hosts."""

import os
import shutil

import pytest
from engine_harness import STAGES

from harness import SshHosts, sshd


@pytest.fixture(params=STAGES)
def results(request, measured):
    """Both ranks' measurements under one ZeRO stage, from the test module's own `measured`."""
    return [per_rank[request.param] for per_rank in measured]


@pytest.fixture(scope="module")
def ssh_hosts(tmp_path_factory):
    """node-a and node-b, reachable over a real sshd on this machine; /etc/hosts and ~/.ssh/config restored after."""
    if os.geteuid() != 0:
        pytest.skip("the ssh hosts need root: they edit /etc/hosts and run sshd as root")
    missing = [tool for tool in ("ssh", "ssh-keygen", "pdsh") if shutil.which(tool) is None]
    missing += [] if sshd() else ["sshd"]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install openssh-server pdsh; .ci/run does)")
    hosts = SshHosts(tmp_path_factory.mktemp("ssh"))
    try:
        hosts.start()
        yield hosts
    finally:
        hosts.stop()
