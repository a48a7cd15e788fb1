"""The quality study of issue 8: APT against magnitude, random and Taylor pruners on the bundled corpus.

`python -m bench.study.run_study` (from the repository root) runs it end to end; `--quick` gives a few-minute look.
"""

import os
from pathlib import Path

# The study runs DeepSpeed on the CPU and reads only local files; set before anything imports deepspeed.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions"))
