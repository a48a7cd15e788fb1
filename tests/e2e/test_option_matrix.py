"""Every option combination runs the whole chain: pairwise coverage of the options.

Each row of `ROWS` is one combination; it runs prep -> eval on a tiny model (two CPU ranks) and its
export loads in plain transformers with finalize's parameter count and computes the fine-tuned, masked model. The
ZeRO-3 rows start from a user checkpoint, loaded partitioned. `test_rows_cover_every_pair` keeps the rows honest.
(A combination the chain cannot finish must instead be refused at start-up, exit 2 naming the option; none is now:
self-distillation under ZeRO-3, the last one, runs since the ranks match layers alike.)
"""

import itertools
import json
import typing

import pytest
import torch
from chains import apt_pipeline, assert_export_is_the_trained_model

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
Z2, Z3 = OPTIONS["deepspeed.config"]
ROWS = [dict(zip(OPTIONS, values, strict=True)) for values in [
    # model    tied   attention         layout       grow distill compact  ZeRO
    ("mistral", True, "query_in_group", "uniform", 0, False, True, Z3),
    ("mistral", False, "kv_group", "per_layer", 4, True, False, Z2),
    ("llama", False, "kv_group", "per_layer", 0, False, True, Z3),
    ("llama", True, "query_in_group", "uniform", 4, True, False, Z2),
    ("qwen2", False, "query_in_group", "per_layer", 4, True, True, Z3),
    ("qwen2", True, "kv_group", "uniform", 0, False, False, Z2),
    ("qwen2", False, "query_in_group", "uniform", 4, False, True, Z2),
    ("llama", True, "kv_group", "per_layer", 0, True, False, Z3),
]]
"""Eight rows hold every pair of values (a greedy cover took eleven; none exists with six: seven two-valued
options split three model types' pairs of rows more ways than six rows allow)."""
RANKINGS = [("taylor", "one_shot"), ("activation", "gradual"), ("magnitude", "gradual"), ("random", "one_shot"),
            ("activation", "one_shot"), ("random", "gradual"), ("apt", "one_shot"), ("taylor", "gradual")]
"""Each row's (pruning.criterion, pruning.schedule). Every criterion and schedule runs the chain, one-shot under both
ZeRO stages, with and without compaction and distillation. The criterion is only the ranking (the rest of the chain
is the same code, and tests/unit/test_criteria.py checks each ranking), so the rows carry them without covering
every pair: that would take fifteen rows. The default pair (apt, gradual) runs in every other e2e test."""
SCORING = {("taylor", "gradual"): ["pruning.salience_gradient=after_mask"],
           ("apt", "one_shot"): ["apt.outlier_term=false"],
           ("magnitude", "gradual"): ["pruning.per_layer_ranking=salience"]}
"""The salience's own options, each on a row whose ranking reads it: the gradient after the mask where masks fade
(gradual; taylor's products; ZeRO-3, two ranks), the apt criterion without its outlier term, and a per-layer row
ranking units across layers by raw scores instead of relative to each layer."""
TARGET = [32, 2, 1, 64, 1]
"""A fixed final shape with a layer count: [hidden, heads, kv_heads, intermediate, layers]."""
SUBLAYERS = ["pruning.depth=auto", "pruning.depth_unit=sublayer"]
DEPTH = {("magnitude", "gradual"): ["pruning.depth=1"], ("apt", "one_shot"): ["pruning.depth=1"],
         ("activation", "gradual"): SUBLAYERS, ("taylor", "one_shot"): ["pruning.depth=auto"],
         ("activation", "one_shot"): SUBLAYERS, ("random", "gradual"): [f"pruning.target_shape={json.dumps(TARGET)}"]}
"""Whole layers as units (the tiny model has two): one kept layer, reached along the schedule (ZeRO-3, per-layer,
compaction) or at once (ZeRO-2, uniform, one-shot), auto weighing a cut against widths (ZeRO-3, one-shot), and a
target shape of one layer reached without a compaction (the export leaves the masked layer out). A layer's attention
or MLP alone as units on the per-layer rows: gradual under ZeRO-2 (Mistral), one-shot under ZeRO-3 with compaction
(Qwen2's q/k/v biases)."""
FAST = ["train.steps=12", "pruning.end_step=6", "pruning.update_every=3", "pruning.mask_step=0.2",
        "train.checkpoint_every=12", "train.eval_batches=2", "salience.batches=2", "eval.batches=2",
        "eval.rounds=1", "eval.new_tokens=4", "data.seq_len=64", "data.num_proc=1"]


def pairs(row: dict) -> set:
    return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(OPTIONS, 2)}


def every_row() -> list[dict]:
    return [dict(zip(OPTIONS, values, strict=True)) for values in itertools.product(*OPTIONS.values())]


def row_id(row: dict) -> str:
    short = {Z2: "z2", Z3: "z3"}
    return "-".join(str(short.get(value, value)) for value in row.values())


def test_rows_cover_every_pair():
    assert set().union(*(pairs(row) for row in every_row())) <= set().union(*(pairs(row) for row in ROWS))
    assert len(ROWS) <= 12  # pairwise, not the full product of 384


def test_rows_run_every_criterion_and_schedule():
    from pipeline.config import PruningSection

    hints = typing.get_type_hints(PruningSection)
    assert {c for c, _ in RANKINGS} == set(typing.get_args(hints["criterion"]))
    assert {s for _, s in RANKINGS} == set(typing.get_args(hints["schedule"]))
    one_shot = [row for row, (_, schedule) in zip(ROWS, RANKINGS, strict=True) if schedule == "one_shot"]
    for option in ("deepspeed.config", "pruning.compact", "apt.distill"):
        assert {row[option] for row in one_shot} == set(OPTIONS[option])
    assert set(SCORING) <= set(RANKINGS) and set(DEPTH) <= set(RANKINGS)
    depth_rows = [row for row, ranking in zip(ROWS, RANKINGS, strict=True) if ranking in DEPTH]
    assert {row["deepspeed.config"] for row in depth_rows} == set(OPTIONS["deepspeed.config"])


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("row, ranking", zip(ROWS, RANKINGS, strict=True), ids=[row_id(row) for row in ROWS])
def test_combination_runs_the_chain(tmp_path, small_corpus, row, ranking):
    criterion, schedule = ranking
    overrides = [f"{key}={json.dumps(value)}" for key, value in row.items()]
    overrides += [f"pruning.criterion={criterion}", f"pruning.schedule={schedule}", *SCORING.get(ranking, []),
                  *DEPTH.get(ranking, [])]
    sublayers = DEPTH.get(ranking) is SUBLAYERS
    if row["deepspeed.config"] == Z3 or sublayers:
        checkpoint = user_checkpoint(tmp_path / "user_model", overrides, dead_attention=sublayers)
        overrides.append(f"model.path={checkpoint}")
    run_chain(tmp_path, small_corpus, overrides)
    if sublayers:
        assert_first_attention_cut(tmp_path / "tiny")
    if schedule == "one_shot":
        assert_pruned_before_step_one(tmp_path / "tiny", compacted=row["pruning.compact"])
    if "pruning.depth=1" in DEPTH.get(ranking, []):
        assert_one_layer_left(tmp_path / "tiny")
    if ranking == ("random", "gradual"):
        assert_one_layer_left(tmp_path / "tiny")
        config = json.loads((tmp_path / "tiny" / "merge" / "model" / "config.json").read_text())
        assert [config[key] for key in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                        "intermediate_size")] == TARGET[:4]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.device
def test_the_offload_template_runs_the_chain(tmp_path, small_corpus):
    """ZeRO-3 with optimizer and parameters in CPU memory, the client AdamW allowed (zero_force_ds_cpu_optimizer)."""
    run_chain(tmp_path, small_corpus, ["deepspeed.config=ds_configs/zero3_offload_bf16.json", "train.precision=bf16"])


def assert_pruned_before_step_one(run_dir, compacted: bool) -> None:
    """One-shot: every step trains the final structure (with compaction, a model cut to it before step 1)."""
    rows = [json.loads(line) for line in (run_dir / "finetune" / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((run_dir / "finalize" / "masks.json").read_text())
    assert all(row["remaining"] == pytest.approx(report["remaining_fraction"]) for row in rows)
    summary = json.loads((run_dir / "finetune" / "manifest.json").read_text())["summary"]
    assert [event["step"] for event in summary["compactions"]] == ([0] if compacted else [])
    assert (rows[0]["model_params"] < 1) == compacted


def assert_one_layer_left(run_dir) -> None:
    """`pruning.depth=1`: one of the two layers is cut whole (by a compaction, or in finalize's masks, which
    describe the compacted model) and the export has one."""
    report = json.loads((run_dir / "finalize" / "masks.json").read_text())
    assert sum(1 for heads, neurons in zip(report["kept_heads"], report["kept_neurons"], strict=True)
               if heads or neurons) == 1
    config = json.loads((run_dir / "merge" / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1


def assert_first_attention_cut(run_dir) -> None:
    """`pruning.depth_unit=sublayer` on a model whose layer 0 attention adds nothing: the loss chose to cut it (and
    widths less), its MLP stays, and the export's layer 0 has no attention."""
    report = json.loads((run_dir / "finalize" / "masks.json").read_text())
    assert report["kept_heads"][0] == report["kept_kv_heads"][0] == 0 < report["kept_neurons"][0]
    config = json.loads((run_dir / "merge" / "model" / "config.json").read_text())
    assert config["per_layer_config"]["0"]["num_attention_heads"] == 0


def user_checkpoint(directory, overrides: list[str], dead_attention: bool = False):
    """The row's tiny model saved as a user's checkpoint would be (a `model.path` to load); with `dead_attention`
    layer 0's o_proj is zero, so its attention adds nothing (the adapters leave o_proj alone)."""
    from transformers import AutoModelForCausalLM

    from pipeline import config as config_lib
    from pipeline.model_io import build_config

    model_cfg = config_lib.load("tests/tiny.yaml", overrides).model
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(build_config(model_cfg, 512))
    if dead_attention:
        torch.nn.init.zeros_(model.model.layers[0].self_attn.o_proj.weight)
    model.save_pretrained(str(directory))
    return directory


def run_chain(tmp_path, small_corpus, overrides: list[str]) -> None:
    """prep -> eval through the CLI on two CPU ranks; the export is the fine-tuned, masked model.

    (Each row preps its own data: prep's fingerprint covers the model section, which the rows vary, and it takes
    about a second of a row's minute.)"""
    apt_pipeline("run", "--config", "tests/tiny.yaml", f"run.root={tmp_path}",
                 f"data.sources=[{small_corpus}]", f"deepspeed.master_port={free_port()}", *FAST,
                 "export.dtype=float32", *overrides)
    assert_export_is_the_trained_model(tmp_path / "tiny")
