"""The quality study of issue 8: APT against magnitude, random and Taylor pruners on the bundled corpus.

`python -m bench.study.run_study` (from the repository root) runs it end to end; `--quick` gives a few-minute look.
"""

from bench.local_env import apply_defaults

# The study runs DeepSpeed on the CPU and reads only local files; set before anything imports deepspeed.
apply_defaults()
