import dataclasses

import pytest

from pipeline import config as config_lib


def test_tiny_yaml_is_the_embedded_default():
    assert config_lib.load("configs/tiny.yaml") == config_lib.load(None)


def test_override_sets_typed_value():
    cfg = config_lib.load(None, ["train.lr=1e-4", "data.seq_len=64", "apt.adapter_targets=[q_proj]"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.seq_len == 64
    assert cfg.apt.adapter_targets == ("q_proj",)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.foo=1", "train.foo: unknown key"),
        ("trian.lr=1", "trian: unknown section"),
        ("train.steps=ten", "train.steps: 'ten' is not an integer"),
        ("train.steps=2.5", "train.steps: 2.5 is not an integer"),
        ("apt.distill=yes please", "apt.distill: 'yes please' is not true or false"),
        ("train.precision=fp8", "train.precision: 'fp8' is not one of ['fp32', 'bf16', 'fp16']"),
        ("pruning.target_remaining=1.5", "pruning.target_remaining: 1.5 must be in (0, 1]"),
        ("pruning.update_every=0", "pruning.update_every: 0 must be >= 1"),
        ("model.num_heads=3", "model.num_heads: 3 must be a multiple of num_kv_heads (2)"),
        ("data.seq_len=4096", "data.seq_len: 4096 exceeds model.max_position_embeddings (512)"),
        ("data.sources=[no/such/file.txt]", "data.sources: 'no/such/file.txt' does not exist"),
        ("model.path=no/such/dir", "model.path: 'no/such/dir' is not a directory"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.load(None, ["model.path=null", override])  # a model built from the config
    assert message in str(err.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.load(None, ["train.steps=0", "pruning.round_to=0", "export.nope=1"])
    text = str(err.value)
    assert "train.steps" in text and "pruning.round_to" in text and "export.nope" in text


def test_malformed_override():
    with pytest.raises(config_lib.ConfigError, match="section.key=value"):
        config_lib.load(None, ["train.lr"])


def test_dump_round_trips(tmp_path):
    cfg = config_lib.load(None, ["train.lr=3e-4", "run.name=other"])
    path = tmp_path / "c.yaml"
    path.write_text(config_lib.dump(cfg))
    assert config_lib.load(path) == cfg


def test_select_gives_only_the_view_sections():
    cfg = config_lib.load(None)
    view = cfg.select(config_lib.FinalizeConfig)
    assert isinstance(view, config_lib.FinalizeConfig)
    assert (view.model, view.pruning) == (cfg.model, cfg.pruning)
    assert not hasattr(view, "train")


@pytest.mark.parametrize("name", ["llama2-7b", "llama3-8b"])
def test_real_scale_examples_load_once_paths_exist(name, tmp_path):
    # The examples point at local checkpoints that this machine does not have; with those paths
    # supplied they must be valid configs.
    (tmp_path / "corpus.txt").write_text("text\n")
    cfg = config_lib.load(f"configs/{name}.yaml", [f"model.path={tmp_path}", f"data.sources=[{tmp_path}]",
                                                    f"tokenizer.path={tmp_path}", "deepspeed.hostfile=null",
                                                    "deepspeed.num_nodes=1"])
    assert dataclasses.asdict(cfg)["model"]["path"] == str(tmp_path)


def test_where_a_run_lives_and_runs_is_not_part_of_its_fingerprints():
    base = config_lib.load("tests/tiny.yaml")
    moved = config_lib.load("tests/tiny.yaml", ["run.name=moved", "run.root=/elsewhere", "deepspeed.num_gpus=1",
                                                  "deepspeed.master_port=30000", "deepspeed.timeout_minutes=5"])
    retrained = config_lib.load("tests/tiny.yaml", ["run.seed=1"])
    sections = ("run", "train", "deepspeed")
    assert moved.fingerprint_sections(*sections) == base.fingerprint_sections(*sections)
    assert retrained.fingerprint_sections(*sections) != base.fingerprint_sections(*sections)
