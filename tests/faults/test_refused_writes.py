"""A stage whose output write the file system refuses (RLIMIT_FSIZE, as `ulimit -f` sets it): `apt-pipeline`
exits 1 with one line naming the file and the fix, the finished stage keeps its outputs, and nothing half-written
is left. (A refused checkpoint write inside finetune: test_checkpoint_faults.py.)
"""

import json
import resource
import subprocess
import sys

import pytest

from pipeline.stage import MANIFEST, sha256_file

pytestmark = pytest.mark.e2e

LIMIT = 64 << 10
TWO_STAGES = """
import sys
from pipeline import cli, run
from pipeline.config import FinalizeConfig, PrepConfig
from pipeline.stage import write_atomic


def small(cfg, run_dir):
    write_atomic(run_dir / "small" / "out.bin", b"s" * 1000)
    return {}


def big(cfg, run_dir):
    write_atomic(run_dir / "big" / "out.bin", b"b" * 2 * int(sys.argv[2]))
    return {}


run.STAGES = (run.Stage("small", PrepConfig, (), small), run.Stage("big", FinalizeConfig, ("small",), big))
root = sys.argv[1]
assert cli.main(["stage", "small", f"run.root={root}"]) == 0
sys.exit(cli.main(["stage", "big", f"run.root={root}"]))
"""


def test_a_refused_stage_output_fails_in_one_line_and_keeps_the_finished_stage(tmp_path):
    result = subprocess.run([sys.executable, "-c", TWO_STAGES, str(tmp_path), str(LIMIT)],
                            capture_output=True, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT)))

    run_dir = tmp_path / "tiny"
    assert result.returncode == 1, result.stderr[-3000:]
    message = [line for line in result.stderr.splitlines() if line.startswith("apt-pipeline: ")]
    assert message == [f"apt-pipeline: stage big failed: [Errno 27] could not write {run_dir / 'big' / 'out.bin'} "
                       f"(File too large): the file is larger than the file-size limit ({LIMIT} bytes for this "
                       f"process); raise it (`ulimit -f unlimited`, or the job scheduler's file-size limit) and run "
                       f"the same command again"]
    assert "Traceback" not in result.stderr
    small = json.loads((run_dir / "small" / MANIFEST).read_text())
    assert {name: sha256_file(run_dir / "small" / name) for name in small["outputs"]} == small["outputs"]
    assert sorted(p.name for p in (run_dir / "big").iterdir()) == []  # no manifest, no output, no temp file
