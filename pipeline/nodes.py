"""What DeepSpeed's pdsh runner needs to start a stage's ranks on the hosts of a hostfile, as the ranks here start.

The runner starts each node's launcher through `pdsh` over ssh, in a fresh login shell: the driver's environment
does not come along, except PYTHON*, MLFLOW*, UCX*, MV2*, the accelerator's prefixes (NCCL* on GPUs) and the lines
of a `.deepspeed_env` file. It also picks the master address by asking the first host for `hostname -I`.
"""

from __future__ import annotations

import contextlib
import platform
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline import preflight
from pipeline.dist import get_logger
from pipeline.stage import NODE_NAME

FORWARDED = frozenset({"DS_ACCELERATOR", "HF_HOME", "TOKENIZERS_PARALLELISM", "PATH", "VIRTUAL_ENV"})
FORWARDED_PREFIXES = ("HF_HUB_", "HF_DATASETS_", "TRANSFORMERS_", "TORCH_", "OMP_", "MKL_", "GLOO_", "MALLOC_")
"""Driver settings the ranks need that the runner does not pass on: the accelerator, the torch extensions build
folder (without it each node rebuilds DeepSpeed's ops, a minute each), offline hub settings, CPU thread counts and
glibc's allocator settings (`CPU_RANK_ENV` in pipeline/run.py).
HF_TOKEN and the like stay home: ranks read the model from shared storage, not from the hub."""
UNSAFE_VALUE = re.compile(r'["$`\\%\n]')
"""Characters the runner's `export K="V";` line would expand or pdsh would substitute (%h, %n)."""

log = get_logger("apt.nodes")


@contextlib.contextmanager
def node_env(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """`env` plus DS_ENV_FILE naming a private `.deepspeed_env` that carries it to every node, for the launch."""
    with tempfile.TemporaryDirectory(prefix="apt-deepspeed-env-") as folder:  # 0700: values stay on this node
        path = Path(folder) / ".deepspeed_env"
        path.write_text("".join(f"{line}\n" for line in env_lines(env)))
        yield {**env, "DS_ENV_FILE": str(path)}


def env_lines(env: dict[str, str]) -> list[str]:
    """`KEY=value` lines for the runner: the forwarded variables, the node's host name, then the user's own file."""
    chosen = {key: value for key, value in env.items() if key in FORWARDED or key.startswith(FORWARDED_PREFIXES)}
    lines = []
    for key, value in sorted(chosen.items()):
        if UNSAFE_VALUE.search(value):
            log.warning("%s is not passed to the other nodes: its value has \" $ ` \\ or %%, which the runner's "
                        "shell line would change; set it in their shell profile", key)
        else:
            lines.append(f"{key}={value}")
    lines.append(f"{NODE_NAME}=%h")  # pdsh puts the host name it reached in place of %h, as %n for the node rank
    return lines + user_env_lines(env)


def user_env_lines(env: dict[str, str]) -> list[str]:
    """The lines of the `.deepspeed_env` files DeepSpeed reads without our DS_ENV_FILE: ~/ then ./, or DS_ENV_FILE."""
    name = env.get("DS_ENV_FILE", ".deepspeed_env")
    files = dict.fromkeys(Path(base, name).expanduser().resolve() for base in ("~", "."))
    lines = [line.strip() for path in files if path.is_file() for line in path.read_text().splitlines()]
    # DeepSpeed splits every line at "=": a blank line stops it, and `export #x=1;` would comment out the command.
    return [line for line in lines if "=" in line and not line.startswith("#")]


def launcher_args(section) -> list[str]:
    """`deepspeed` arguments for a hostfile run, unless deepspeed.launcher_args gives them already."""
    hosts = preflight.parse_hostfile(Path(section.hostfile))[0][:section.num_nodes]
    given = {arg.split("=")[0] for arg in section.launcher_args}
    args = []
    if hosts and "--master_addr" not in given:
        # The first host by the name the other nodes reach it by; DeepSpeed would take the first address that host's
        # `hostname -I` prints, which may be a container bridge or another network's.
        args += ["--master_addr", hosts[0]]
    if len(hosts) == 1 and hosts[0] not in preflight.LOCAL_HOSTS | {platform.node()} and "--force_multi" not in given:
        args.append("--force_multi")  # DeepSpeed starts a one-host job here, whichever host the hostfile names
    return args
