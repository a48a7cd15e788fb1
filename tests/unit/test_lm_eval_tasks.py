"""lm-eval-harness through the pipeline: the offline held-out task scores a real model with lm-eval's metrics."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from pipeline import preflight
from pipeline.lm_eval_tasks import HELDOUT_METRICS, HELDOUT_TASK, lm_eval_scores, task_problems

REPO = Path(__file__).resolve().parents[2]
TRAINED = REPO / "models" / "tiny-python-docs"


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    """Three documents of the bundled corpus, one {"text": ...} line each, as prep writes them."""
    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    records = [json.loads(line) for line in (REPO / "data" / "python-docs.jsonl").read_text().splitlines()[-3:]]
    path.write_text("".join(json.dumps({"text": r["text"][:600]}) + "\n" for r in records))
    return path


def scores(model, heldout: Path) -> dict[str, float]:
    tokenizer = AutoTokenizer.from_pretrained(str(TRAINED))
    result = lm_eval_scores(model, tokenizer, (HELDOUT_TASK,), heldout, batch_size=2, limit=None)
    return result[HELDOUT_TASK]


def test_the_heldout_task_scores_the_trained_model_far_better_than_a_random_one(heldout):
    trained = AutoModelForCausalLM.from_pretrained(str(TRAINED), dtype=torch.float32).eval()
    torch.manual_seed(0)
    untrained = LlamaForCausalLM(trained.config).eval()
    good, bad = scores(trained, heldout), scores(untrained, heldout)
    assert set(good) == set(HELDOUT_METRICS)
    assert good["bits_per_byte"] == pytest.approx(math.log2(good["byte_perplexity"]))
    # A random 512-piece model spreads its mass over every piece: several bits per byte more than a trained one.
    assert good["byte_perplexity"] < 0.5 * bad["byte_perplexity"], (good, bad)


def test_only_the_local_task_needs_no_task_index():
    assert task_problems((HELDOUT_TASK,)) == ([], {})


def test_unknown_and_uncached_hub_tasks_are_refused_at_start_up(monkeypatch):
    monkeypatch.setattr(preflight.datasets.config, "HF_HUB_OFFLINE", True)
    problems = preflight.lm_eval_problems(("apt_heldout", "no_such_task", "hellaswag"))
    assert any("'no_such_task' is not an lm-eval task" in p for p in problems), problems
    assert any("'hellaswag' reads the hub dataset" in p and "offline" in p for p in problems), problems
