"""Fixtures shared by every test folder: offline settings, a small corpus, a tiny run config."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
from filelock import FileLock

from pipeline import config as config_lib

REPO = Path(__file__).resolve().parents[1]

# Tests never reach a hub, and DeepSpeed runs on the CPU with gloo.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
# Ranks forked from this process build DeepSpeed's ops with the ninja on PATH: the one the driver gives its ranks
# (pipeline.run.rank_environment), or the two would rebuild the ops over each other.
os.environ["PATH"] = os.pathsep.join(dict.fromkeys([str(Path(sys.executable).parent),
                                                    *os.environ.get("PATH", "").split(os.pathsep)]))


LONGEST_FIRST = ["e2e/test_option_matrix.py", "e2e/test_scale_bench.py", "dist/test_finetune.py",
                 "dist/test_pdsh_nodes.py", "e2e/test_default_run.py", "faults/test_checkpoint_faults.py",
                 "e2e/test_resume.py", "faults/test_mlflow_down.py"]
"""The files that take longest (2-15 minutes each on 2 cores), in that order: `make test` hands whole files to its
two workers in collection order, and a long file handed out last leaves one worker idle until it ends."""


def pytest_collection_modifyitems(items):
    """Collect the longest files first (a stable sort: the rest keep pytest's order)."""
    tests = Path(__file__).parent

    def rank(item) -> int:
        path = item.path.relative_to(tests).as_posix()
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


@pytest.fixture(scope="session", autouse=True)
def _default_model_untouched():
    """The committed base model is every default config's model.path: a test that writes there fails the run."""
    folder = REPO / config_lib.DEFAULT_MODEL
    before = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}
    yield
    after = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}
    assert after == before, f"a test changed {folder}; give it ModelSection(path=None) or model.path=null"


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    """Config paths (data/, ds_configs/) are relative to the repository, as in the README."""
    monkeypatch.chdir(REPO)


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder all pytest-xdist workers of this session share (`make test` runs two); one process: its own."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return tmp_path_factory.mktemp(name)
    return tmp_path_factory.getbasetemp().parent / name  # the session's folder, above each worker's


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """The first 12 documents of the bundled corpus: real text, fast to prep (one file for every worker, so runs
    that compare fingerprints read the same path)."""
    folder = shared_dir(tmp_path_factory, "corpus")
    path = folder / "small.jsonl"
    with FileLock(f"{folder}.lock"):
        if not path.is_file():
            folder.mkdir(exist_ok=True)
            lines = (REPO / "data" / "python-docs.jsonl").read_text().splitlines()[:12]
            path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tiny_config(tmp_path, small_corpus):
    """Build a tiny RunConfig in tmp_path: `tiny_config("train.steps=5", ...)`."""

    def make(*overrides: str) -> config_lib.RunConfig:
        base = [f"run.root={tmp_path / 'runs'}", f"data.sources=[{small_corpus}]", "data.num_proc=1"]
        return config_lib.load(REPO / "tests" / "tiny.yaml", [*base, *overrides])

    return make


@pytest.fixture
def write_jsonl(tmp_path):
    """Write records as a .jsonl file in tmp_path and return its path."""

    def write(name: str, records: list[dict]) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path

    return write


@pytest.fixture(scope="module")
def prep_dir(tmp_path_factory, small_corpus) -> Path:
    """One prep output (seq_len 64) shared by a module's finetune runs; copy it into each run directory."""
    from pipeline import run as driver

    root = tmp_path_factory.mktemp("prep")
    cfg = config_lib.load(REPO / "tests" / "tiny.yaml", [f"run.root={root}", f"data.sources=[{small_corpus}]",
                                                          "data.num_proc=1", "data.seq_len=64"])
    driver.run_stage(driver.stage_by_name("prep"), cfg, cfg.run_dir)
    return cfg.run_dir / "prep"


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, small_corpus) -> Path:
    """One uninterrupted chain on one node of two ranks (tests/chains.py REFERENCE), run once per session: the tiny
    chain's own checks read it, and the resumed, multi-host and pdsh runs must end equal to it. Read it, never
    write into it (copy it first). The driver's log lies beside it, in `driver.log`."""
    from chains import REFERENCE, apt_pipeline

    from harness import free_port

    root = shared_dir(tmp_path_factory, "reference")
    with FileLock(f"{root}.lock"):  # the first worker runs it; the other waits and reads it
        if not (root / "driver.log").is_file():  # written once the chain has finished
            root.mkdir(exist_ok=True)
            result = apt_pipeline("run", "--config", "tests/tiny.yaml", f"run.root={root}",
                                  f"data.sources=[{small_corpus}]", f"deepspeed.master_port={free_port()}", *REFERENCE)
            (root / "driver.log").write_text(result.stderr)
    return root / "tiny"
