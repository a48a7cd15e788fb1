"""lm-eval-harness scores of a loaded model: the offline held-out task, and any task lm-eval knows.

The metrics are lm-eval's own; this module only names the local task and flattens lm-eval's results.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

HELDOUT_TASK = "apt_heldout"
"""Rolling log-likelihood of every held-out document the prep stage wrote (`prep/heldout.jsonl`); offline."""
HELDOUT_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def heldout_task(path: Path) -> dict:
    """lm-eval's config of the local task, as its wikitext task is built, on a JSON-lines file of {"text": ...}."""
    return {"task": HELDOUT_TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
            "doc_to_target": "{{text}}", "metric_list": [{"metric": name} for name in HELDOUT_METRICS],
            "metadata": {"version": 1.0}}


def task_specs(names: tuple[str, ...], heldout: Path) -> list[str | dict]:
    """What `lm_eval.simple_evaluate` takes: hub task names as they are, the local task as its config."""
    return [heldout_task(heldout) if name == HELDOUT_TASK else name for name in names]


def lm_eval_scores(model, tokenizer, names: tuple[str, ...], heldout: Path, *, batch_size: int,
                   limit: int | None) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of `model` on the named tasks (stderr entries dropped)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    hub = any(name != HELDOUT_TASK for name in names)
    results = simple_evaluate(model=lm, tasks=task_specs(names, heldout), limit=limit, log_samples=False,
                              bootstrap_iters=0, verbosity="WARNING", task_manager=task_manager(hub))
    return {task: {key.split(",")[0]: float(value) for key, value in values.items()  # keys are "metric,filter"
                   if "," in key and isinstance(value, (int, float)) and "_stderr" not in key}
            for task, values in results["results"].items()}


@functools.cache
def task_manager(hub: bool):
    """lm-eval's task index, built once per process: with its own tasks only where a hub task is named (indexing
    its ~15,000 task files takes about 20 s a time; the local task is a config that needs none)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=hub)


def task_problems(names: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """Start-up check of `eval.lm_eval_tasks`: lm-eval installed, every name a task it knows or the local one.
    Also returns {task: hub dataset it reads}, for the caller's offline check."""
    if not names:
        return [], {}
    if importlib.util.find_spec("lm_eval") is None:  # found, not imported: the default run's start-up stays quick
        return ["eval.lm_eval_tasks: lm-eval-harness is not installed; pip install -e '.[eval]' "
                "(make install does), or set eval.lm_eval_tasks=[]"], {}
    hub_names = [name for name in names if name != HELDOUT_TASK]
    if not hub_names:
        return [], {}
    index = task_manager(hub=True).task_index  # parses lm-eval's task YAML files, reads no dataset
    problems = [f"eval.lm_eval_tasks: {name!r} is not an lm-eval task (`lm-eval ls tasks` lists them; "
                f"{HELDOUT_TASK!r} is the offline held-out task)" for name in hub_names if name not in index]
    datasets = {name: index[name].cfg["dataset_path"] for name in hub_names
                if name in index and (index[name].cfg or {}).get("dataset_path")}
    return problems, datasets
