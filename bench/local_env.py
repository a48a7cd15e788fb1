"""The environment the benchmarks run in: what `make run` exports (DeepSpeed on the CPU, hubs offline).

The bench packages that start DeepSpeed (bench.study, bench.scale) apply it when imported, before anything imports
deepspeed; a value already set wins.
"""

import os
from pathlib import Path

DEFAULTS = {
    "DS_ACCELERATOR": "cpu",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TORCH_EXTENSIONS_DIR": str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"),
}


def apply_defaults() -> None:
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)
