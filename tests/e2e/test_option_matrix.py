"""Every option combination runs the whole chain: pairwise coverage of the options.

Each row of `ROWS` is one combination; it runs prep -> eval on a tiny model (two CPU ranks) and its export loads in
plain transformers with the parameter count finalize reported. `test_rows_cover_every_pair` keeps the rows honest.
(A combination the chain cannot finish must instead be refused at start-up, exit 2 naming the option; none is now:
self-distillation under ZeRO-3, the last one, runs since the ranks match layers alike.)
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


def pairs(row: dict) -> set:
    return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(OPTIONS, 2)}


def every_row() -> list[dict]:
    return [dict(zip(OPTIONS, values, strict=True)) for values in itertools.product(*OPTIONS.values())]


def pairwise_rows() -> list[dict]:
    """Greedy pairwise cover: the row holding the most uncovered pairs, until every pair is in some row."""
    every = every_row()
    needed, rows = set().union(*(pairs(row) for row in every)), []
    while needed:
        best = max(every, key=lambda row: len(pairs(row) & needed))
        rows.append(best)
        needed -= pairs(best)
    return rows


ROWS = pairwise_rows()


def row_id(row: dict) -> str:
    short = {"ds_configs/zero2_cpu.json": "z2", "ds_configs/zero3_cpu.json": "z3"}
    return "-".join(str(short.get(value, value)) for value in row.values())


def test_rows_cover_every_pair():
    assert set().union(*(pairs(row) for row in every_row())) <= set().union(*(pairs(row) for row in ROWS))
    assert len(ROWS) <= 12  # pairwise, not the full product of 384


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_combination_runs_the_chain(tmp_path, small_corpus, row):
    run_chain(tmp_path, small_corpus, [f"{key}={json.dumps(value)}" for key, value in row.items()])


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.device
def test_the_offload_template_runs_the_chain(tmp_path, small_corpus):
    """ZeRO-3 with optimizer and parameters in CPU memory, the client AdamW allowed (zero_force_ds_cpu_optimizer)."""
    run_chain(tmp_path, small_corpus, ["deepspeed.config=ds_configs/zero3_offload_bf16.json", "train.precision=bf16"])


def run_chain(tmp_path, small_corpus, overrides: list[str]) -> None:
    """prep -> eval through the CLI on two CPU ranks; the export must load with finalize's parameter count."""
    command = [sys.executable, "-m", "pipeline.cli", "run", "--config", "tests/tiny.yaml", f"run.root={tmp_path}",
               f"data.sources=[{small_corpus}]", f"deepspeed.master_port={free_port()}", *FAST, *overrides]
    result = subprocess.run(command, capture_output=True, text=True)
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
