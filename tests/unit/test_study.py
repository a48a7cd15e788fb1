"""The quality study's own code (bench/study): its rows' configs and ingredients, the run plan, the report."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/ is not an installed package; `python -m pytest` from the root has it already
    sys.path.insert(0, str(REPO))
apt_run = importlib.import_module("bench.study.apt_run")
rows = importlib.import_module("bench.study.rows")
run_study = importlib.import_module("bench.study.run_study")
study_report = importlib.import_module("bench.study.study_report")


def row_config(tmp_path, method: str, target: float = 0.5, preset: str = "full"):
    for folder in ("pretrained", "data/prep/tokenizer"):  # what `prepare` leaves for every run
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    args = run_study.parse_args(["--out", str(tmp_path)] + (["--quick"] if preset == "quick" else []))
    return run_study.method_config(args, method, target, seed=1, port=29999)


@pytest.mark.parametrize("preset", ["full", "quick"])
def test_every_row_gives_a_valid_pipeline_config(tmp_path, preset):
    """The configs load (pruning window, mask steps and train steps agree) for every row and target."""
    settings = run_study.PRESETS[preset]
    for method in rows.ROWS:
        for target in (*run_study.TARGETS, 1.0):
            cfg = row_config(tmp_path, method, target, preset)
            assert cfg.deepspeed.num_gpus == 1 and cfg.run.seed == 1 and cfg.deepspeed.master_port == 29999
            recovery = dataclasses.replace(settings.recovery, **rows.ROWS[method].recovery)
            assert cfg.train.steps == recovery.steps and cfg.apt.rank == recovery.rank


def test_rows_differ_from_apt_only_in_their_recipe(tmp_path):
    """Equal recovery: the one-shot rows keep APT's distillation, growth, steps and tokens; LLM-Pruner's has neither."""
    apt = rows.ingredients(row_config(tmp_path, "apt"))
    assert apt | {"criterion": "apt", "schedule": "gradual"} == apt and apt["distill"] and apt["grow"]
    assert apt["teacher_forwards"] == apt["steps"]  # the window starts at step 0
    for method in rows.EQUAL_RECOVERY:
        got = rows.ingredients(row_config(tmp_path, method))
        assert got == apt | {"criterion": method, "schedule": "one_shot", "calibration_batches": 8}
    llm_pruner = rows.ingredients(row_config(tmp_path, "llm-pruner"))
    assert llm_pruner == apt | {"criterion": "taylor", "schedule": "one_shot", "calibration_batches": 8,
                                "distill": False, "grow": False, "teacher_forwards": 0}


def test_the_plan_runs_every_row_seed_first(tmp_path):
    args = run_study.parse_args(["--out", str(tmp_path)])
    planned = run_study.planned_runs(args)
    ablations = [method for method in rows.ABLATIONS if method not in rows.OPT_IN]
    per_seed = 1 + 3 * len(rows.MAIN) + sum(len(rows.ROWS[method].targets) for method in ablations)
    assert len(planned) == len(set(planned)) == 3 * per_seed + 3 * len(rows.NO_RECOVERY)  # no-recovery: first seed
    assert [seed for _, _, seed in planned] == sorted(seed for _, _, seed in planned)
    assert {(m, t) for m, t, s in planned if m == rows.LORA} == {(rows.LORA, 1.0)}
    part = run_study.parse_args(["--out", str(tmp_path), "--targets", "0.5", "--seeds", "2", "--methods", "apt"])
    assert run_study.planned_runs(part) == [("apt", 0.5, 2)]
    ablation = run_study.parse_args(["--out", str(tmp_path), "--targets", "0.3", "--seeds", "0", "--methods",
                                     "apt-activation", "apt-late"])
    assert run_study.planned_runs(ablation) == [("apt-activation", 0.3, 0)]  # each ablation at its own targets


def metrics(tmp_path, remaining: list[float]) -> Path:
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps({"step": i + 1, "remaining": r}) for i, r in enumerate(remaining)))
    return path


def test_steps_at_the_final_structure(tmp_path):
    assert run_study.final_structure_steps(metrics(tmp_path, [0.5] * 6)) == 6  # one-shot: every step
    assert run_study.final_structure_steps(metrics(tmp_path, [1.0, 0.8, 0.5, 0.6, 0.5, 0.5])) == 1  # step 6 only


def record(method, target, seed, perplexity, wall=10.0):
    return {"method": method, "target": target, "seed": seed, "params": 500, "perplexity": perplexity,
            "kept": {"hidden": 64, "heads": 4, "kv_heads": 2, "neurons": 96}, "final_structure_steps": 40,
            "ingredients": {"criterion": "apt", "schedule": "gradual", "distill": True, "grow": True,
                            "shape_search": "measured", "steps": 96, "tokens": 98304, "teacher_forwards": 96,
                            "calibration_batches": 0},
            "pipeline_seconds": 60.0, "finetune_wall_seconds": wall, "finetune_cpu_seconds": wall}


def test_the_report_is_rebuilt_from_the_records_alone(tmp_path):
    """--from-results writes the section and the plot from study.json; a loss is reported as one."""
    runs = [record(m, 0.5, s, p + s) for m, p in (("apt", 20.0), ("taylor", 19.0), ("activation", 25.0),
                                                   ("magnitude", 26.0), ("random", 30.0), ("llm-pruner", 24.0))
            for s in (0, 1, 2)]
    runs += [record("apt", 0.3, s, 30.0 + s) for s in (0, 1, 2)] + [record("taylor", 0.3, s, 35.0) for s in (0, 1, 2)]
    runs += [record(rows.LORA, 1.0, s, 9.0, wall=8.0) for s in (0, 1, 2)]
    results = {"settings": {"targets": [0.5, 0.3], "seeds": [0, 1, 2],
                            "pretrain": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                                         "intermediate_size": 96, "steps": 10},
                            "recovery": {"steps": 96, "micro_batch_size": 8, "rank": 8, "lr": 2e-3,
                                         "adapter_targets": ["q_proj"]}},
               "data": {"vocab_size": 1024, "seq_len": 128, "train_blocks": 100, "validation_blocks": 10},
               "dense": {"params": 1000, "perplexity": 9.0, "embedding_share": 0.3},
               "runs": runs, "wall_seconds": 60.0, "jobs": 2, "threads": 1, "environment": ["- machine: test"]}
    study_json, results_md, plot = tmp_path / "study.json", tmp_path / "RESULTS.md", tmp_path / "plot.png"
    study_json.write_text(json.dumps(results))
    run_study.main(["--from-results", str(study_json), "--results", str(results_md), "--plot", str(plot)])
    section = results_md.read_text()
    assert study_report.SECTION in section and plot.is_file()
    assert "by more than the seed spread at: 0.3" in section and "not at: 0.5" in section
    assert "+5.0% ± 0.3% vs taylor (3 seeds)" in section  # APT loses at 0.5, plainly
    assert "1.25× ± 0.00× at 0.5" in section  # APT's finetune time over LoRA's
    assert section.count("| LLM-Pruner's recipe |") == 3 + 3  # quality header, ingredients, cost; three runs
