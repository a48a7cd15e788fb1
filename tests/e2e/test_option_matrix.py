"""Every option combination runs the whole chain or is refused at start-up: pairwise coverage of the options.

Each row of `ROWS` is one combination. A combination the pipeline supports runs prep -> eval on a tiny model (two
CPU ranks) and its export loads in plain transformers with the parameter count finalize reported; one it does not
support exits 2 before any stage, naming the option. `test_rows_cover_every_pair` keeps the rows honest.
"""

import itertools
import json
import subprocess
import sys

import pytest
import torch

from harness import free_port

OPTIONS = {
    "model.model_type": ["llama", "mistral", "qwen2"],
    "model.tie_word_embeddings": [False, True],
    "pruning.attention_mode": ["kv_group", "query_in_group"],
    "pruning.layout": ["uniform", "per_layer"],
    "apt.grow_every": [0, 4],
    "apt.distill": [False, True],
    "pruning.compact": [False, True],
    "deepspeed.config": ["ds_configs/zero2_cpu.json", "ds_configs/zero3_cpu.json"],
}
FAST = ["train.steps=12", "pruning.end_step=6", "pruning.update_every=3", "pruning.mask_step=0.2",
        "train.checkpoint_every=12", "train.eval_batches=2", "salience.batches=2", "eval.batches=2",
        "eval.rounds=1", "eval.new_tokens=4", "data.seq_len=64", "data.num_proc=1"]


def refused_option(row: dict) -> str | None:
    """The option a combination is refused for at start-up, or None when it must run."""
    if row["apt.distill"] and row["deepspeed.config"].endswith("zero3_cpu.json"):
        return "apt.distill"
    return None


def pairs(row: dict) -> set:
    return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(OPTIONS, 2)}


def pairwise_rows() -> list[dict]:
    """Greedy pairwise cover: runnable rows for every pair a runnable row can hold, then one row per refusal."""
    every = [dict(zip(OPTIONS, values, strict=True)) for values in itertools.product(*OPTIONS.values())]
    runnable = [row for row in every if refused_option(row) is None]
    needed, rows = set().union(*(pairs(row) for row in runnable)), []
    while needed:
        best = max(runnable, key=lambda row: len(pairs(row) & needed))
        rows.append(best)
        needed -= pairs(best)
    refused = {refused_option(row): row for row in every if refused_option(row)}  # one row per refusal
    return rows + list(refused.values())


ROWS = pairwise_rows()


def row_id(row: dict) -> str:
    short = {"ds_configs/zero2_cpu.json": "z2", "ds_configs/zero3_cpu.json": "z3"}
    return "-".join(str(short.get(value, value)) for value in row.values())


def test_rows_cover_every_pair():
    every = [dict(zip(OPTIONS, values, strict=True)) for values in itertools.product(*OPTIONS.values())]
    reachable = set().union(*(pairs(row) for row in every if refused_option(row) is None))
    assert reachable <= set().union(*(pairs(row) for row in ROWS))
    assert len(ROWS) <= 12  # pairwise, not the full product of 384


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_combination_runs_the_chain_or_is_refused_at_start(tmp_path, small_corpus, row):
    overrides = [f"{key}={json.dumps(value)}" for key, value in row.items()]
    command = [sys.executable, "-m", "pipeline.cli", "run", "--config", "tests/tiny.yaml", f"run.root={tmp_path}",
               f"data.sources=[{small_corpus}]", f"deepspeed.master_port={free_port()}", *FAST, *overrides]
    result = subprocess.run(command, capture_output=True, text=True)
    refused = refused_option(row)
    if refused is not None:
        assert result.returncode == 2, result.stderr[-3000:]
        assert refused in result.stderr and "nothing was run or written" in result.stderr
        assert not (tmp_path / "tiny").exists()
        return
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "tiny"
    assert_export_loads(run_dir, json.loads((run_dir / "finalize" / "masks.json").read_text()))


def assert_export_loads(run_dir, report: dict) -> None:
    """A fresh process's view: `import pipeline` (registers the per-layer model types), from_pretrained, one forward."""
    from transformers import AutoModelForCausalLM

    import pipeline  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "merge" / "model"), dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == report["remaining_params"]
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
