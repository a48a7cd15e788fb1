"""The quality study: APT against other pruners' recipes, every one through the pipeline, on the bundled corpus.

`python -m bench.study.run_study` (from the repository root) runs it end to end; `--quick` gives a few-minute look.
"""

from bench.local_env import apply_defaults

# The study runs DeepSpeed on the CPU and reads only local files; set before anything imports deepspeed.
apply_defaults()
