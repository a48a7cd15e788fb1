"""Bad inputs fail at start-up with a message naming the key or file, and nothing is written.

The start-up cases go through the real entry point (`pipeline.cli.main`), so the check provably runs before
prep. Model folders here are fakes: a config.json and a tiny safetensors file, no real weights.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import torch
from safetensors.torch import save_file
from transformers import LlamaTokenizer

from pipeline import cli, corpus, preflight
from pipeline import config as config_lib
from pipeline import run as driver
from pipeline.checkpoints import CheckpointError, check_checkpoint
from pipeline.stages import prep

REPO = Path(__file__).resolve().parents[2]
SUPPORTED = "supported: llama, mistral, qwen2"


@pytest.fixture
def run_root(tmp_path) -> Path:
    """Where a run would write; every start-up failure must leave it absent."""
    return tmp_path / "runs"


@pytest.fixture
def apt_pipeline(run_root, small_corpus, capsys):
    """Call `apt-pipeline run` (or `command`) on the tiny config with overrides; return (exit code, stderr)."""

    def call(*overrides: str, command: tuple[str, ...] = ("run",)) -> tuple[int, str]:
        base = [f"run.root={run_root}", f"data.sources=[{small_corpus}]", "data.num_proc=1"]
        code = cli.main([*command, "--config", "tests/tiny.yaml", *base, *overrides])
        return code, capsys.readouterr().err

    return call


def write_model_dir(directory: Path, model_type: str = "llama", vocab_size: int = 128) -> Path:
    """A from_pretrained-shaped folder: config.json plus one small safetensors file."""
    directory.mkdir(parents=True)
    config = {"model_type": model_type, "vocab_size": vocab_size, "hidden_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32,
              "max_position_embeddings": 256}
    (directory / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": torch.zeros(vocab_size, 16)}, str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="session")
def sentencepiece_file(tmp_path_factory, small_corpus) -> Path:
    """A SentencePiece model trained on the small corpus (about 500 pieces)."""
    texts = [json.loads(record)["text"] for record in small_corpus.read_text().splitlines()]
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    path = tmp_path_factory.mktemp("tokenizer") / "sp.model"
    path.write_bytes(prep.train_sentencepiece(lines, 512))
    return path


@pytest.fixture
def hf_tokenizer_dir(tmp_path, sentencepiece_file) -> Path:
    """The same tokenizer as a HF tokenizer folder."""
    source = tmp_path / "sp"
    source.mkdir()
    shutil.copy(sentencepiece_file, source / "tokenizer.model")
    LlamaTokenizer.from_pretrained(str(source)).save_pretrained(str(tmp_path / "hf_tokenizer"))
    return tmp_path / "hf_tokenizer"


# ---- config values (checked by config.load) ----------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    pytest.param("train.foo=1", "train.foo: unknown key", id="unknown-key"),
    pytest.param("pruning.update_evry=5", "pruning.update_evry: unknown key", id="mistyped-key"),
    pytest.param("train.steps=ten", "train.steps: 'ten' is not an integer", id="mistyped-value"),
    pytest.param("pruning.target_remaining=0", "pruning.target_remaining: 0.0 must be in (0, 1]", id="sparsity"),
    pytest.param("pruning.target_remaining=1.5", "pruning.target_remaining: 1.5 must be in (0, 1]",
                 id="sparsity-negative"),
    pytest.param("pruning.end_step=0", "pruning.end_step: 0 must be > start_step", id="schedule"),
    pytest.param("pruning.update_every=0", "pruning.update_every: 0 must be >= 1", id="update-every-0"),
    pytest.param("model.path=no/such/model", "model.path: 'no/such/model' is not a directory", id="missing-model-dir"),
])
def test_bad_config_fails_before_anything_is_written(apt_pipeline, run_root, override, message):
    code, err = apt_pipeline(override)
    assert code == 2 and message in err
    assert not run_root.exists()


# ---- the model folder (checked by preflight) ------------------------------------------------------------


@pytest.mark.parametrize("command", [("run",), ("stage", "prep")], ids=["run", "stage-prep"])
def test_non_llama_model_fails_at_start_up_naming_the_supported_types(apt_pipeline, run_root, tmp_path, command):
    model_dir = write_model_dir(tmp_path / "gpt2", model_type="gpt2")
    code, err = apt_pipeline(f"model.path={model_dir}", command=command)
    assert code == 2 and f"{model_dir / 'config.json'} has model_type 'gpt2'" in err and SUPPORTED in err
    assert not run_root.exists()


@pytest.mark.parametrize("names", [("finetune", "salince"), ()], ids=["misspelt", "none"])
def test_stage_names_an_unknown_or_no_stage_and_lists_them(apt_pipeline, run_root, capsys, names):
    with pytest.raises(SystemExit) as exited:
        apt_pipeline(command=("stage", *names))
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "stages: prep, finetune, salience, finalize, merge, eval" in err
    assert ("unknown stage salince" if names else "name a stage") in err
    assert not run_root.exists()


def test_model_folder_without_config_json(apt_pipeline, run_root, tmp_path):
    model_dir = write_model_dir(tmp_path / "model")
    (model_dir / "config.json").unlink()
    code, err = apt_pipeline(f"model.path={model_dir}")
    assert code == 2 and f"model.path: {model_dir / 'config.json'} not found" in err
    assert not run_root.exists()


def test_corrupt_safetensors_header(apt_pipeline, run_root, tmp_path):
    model_dir = write_model_dir(tmp_path / "model")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # cut inside the JSON header
    code, err = apt_pipeline(f"model.path={model_dir}")
    assert code == 2 and f"{weights} is not a readable safetensors file" in err
    assert not run_root.exists()


def test_missing_shard_named_by_the_index(apt_pipeline, run_root, tmp_path):
    model_dir = write_model_dir(tmp_path / "model")
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors"}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    code, err = apt_pipeline(f"model.path={model_dir}")
    assert code == 2 and f"{model_dir / 'model-00002-of-00002.safetensors'} is named in" in err
    assert not run_root.exists()


def test_bin_only_checkpoint_is_refused_with_how_to_convert(apt_pipeline, run_root, tmp_path):
    model_dir = write_model_dir(tmp_path / "model")
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"never unpickled")
    code, err = apt_pipeline(f"model.path={model_dir}")
    assert code == 2 and f"model.path: {model_dir} has PyTorch .bin weights only" in err and "save_pretrained" in err
    assert not run_root.exists()


@pytest.mark.parametrize("kind", ["sentencepiece-file", "hf-folder"])
def test_tokenizer_larger_than_the_model_vocab(apt_pipeline, run_root, tmp_path, sentencepiece_file, hf_tokenizer_dir,
                                               kind):
    tokenizer = sentencepiece_file if kind == "sentencepiece-file" else hf_tokenizer_dir
    model_dir = write_model_dir(tmp_path / "model", vocab_size=128)
    code, err = apt_pipeline(f"model.path={model_dir}", f"tokenizer.path={tokenizer}")
    size = spm.SentencePieceProcessor(model_file=str(sentencepiece_file)).get_piece_size()
    assert code == 2 and f"tokenizer.path: {tokenizer} has {size} tokens, more than the model's vocab_size 128" in err
    assert not run_root.exists()


def test_folder_without_tokenizer_files(apt_pipeline, run_root, tmp_path):
    model_dir = write_model_dir(tmp_path / "model")  # config.json alone makes transformers build an empty tokenizer
    code, err = apt_pipeline(f"model.path={model_dir}", f"tokenizer.path={model_dir}")
    assert code == 2 and f"tokenizer.path: {model_dir} holds none of tokenizer.json" in err
    assert not run_root.exists()


def test_a_valid_checkpoint_and_tokenizer_pass(tiny_config, tmp_path, hf_tokenizer_dir):
    model_dir = write_model_dir(tmp_path / "model", vocab_size=1024)
    preflight.check(tiny_config(f"model.path={model_dir}", f"tokenizer.path={hf_tokenizer_dir}"))


# ---- the corpus ------------------------------------------------------------------------------------------


def test_empty_corpus(apt_pipeline, run_root, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    code, err = apt_pipeline(f"data.sources=[{tmp_path / 'empty.jsonl'}]")
    assert code == 2 and "data.sources:" in err and "empty.jsonl" in err and "are empty" in err
    assert not run_root.exists()


@pytest.mark.parametrize("name, content", [
    pytest.param("notes.jsonl", b"this is not JSON\n", id="jsonl"),
    pytest.param("table.parquet", b"PAR1 cut short", id="parquet"),
    pytest.param("book.txt", b"\xff\xfe\x00binary", id="txt-not-utf8"),
])
def test_unreadable_corpus(apt_pipeline, run_root, tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    code, err = apt_pipeline(f"data.sources=[{tmp_path / name}]")
    assert code == 2 and f"data.sources: {tmp_path / name} is unreadable" in err
    assert not run_root.exists()


REFUSED = "apt-pipeline: invalid inputs (nothing was run or written)"
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def write_source(directory: Path, name: str, records: list[dict]) -> Path:
    """Records as a .jsonl or .parquet file, or their `text` values as a .txt."""
    path = directory / name
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    elif path.suffix == ".txt":
        path.write_text("\n\n".join(r["text"] for r in records))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("name, records, overrides, message", [
    pytest.param("nottext.jsonl", [{"nottext": 1}], (), "data.text_field: 'text' not in the columns of {path}:1 "
                 "['nottext']; set data.text_field", id="jsonl-without-text-field"),
    pytest.param("body.parquet", [{"body": "words"}], (), "data.text_field: 'text' not in the columns of {path} "
                 "['body']", id="parquet-without-the-column"),
    pytest.param("book.txt", [{"text": "words"}], ("data.text_field=body",), "data.text_field: 'body' not in the "
                 "columns of {path}:1 ['text']", id="txt-with-another-text-field"),
    pytest.param("chat.jsonl", [{"messages": CHAT}] * 3, ("data.format=instruction",),
                 "data.sources: {path}:1: chat `messages` records need a tokenizer with a chat template (set "
                 "tokenizer.path", id="chat-without-a-chat-template"),
    pytest.param("chat.parquet", [{"messages": CHAT}] * 3, ("data.format=instruction",),
                 "data.sources: {path}: chat `messages` records need a tokenizer with a chat template",
                 id="chat-parquet-without-a-chat-template"),
    pytest.param("chat.jsonl", [{"messages": CHAT[:1]}], ("data.format=instruction",),
                 "data.sources: {path}:1: a chat record must end with an assistant message, got 'user'",
                 id="chat-ending-with-the-user"),
    pytest.param("alpaca.jsonl", [{"instruction": "Add 1 and 1.", "output": "2"}, {"instruction": "Add 2 and 2."}],
                 ("data.format=instruction",), "data.sources: {path}:2: instruction records need "
                 "instruction/output fields or messages; got ['instruction']", id="alpaca-without-output"),
    pytest.param("alpaca.parquet", [{"instruction": "Add 1 and 1.", "response": "2"}], ("data.format=instruction",),
                 "data.sources: {path}: instruction records need instruction/output fields or messages; got "
                 "['instruction', 'response']", id="alpaca-parquet-without-output"),
    pytest.param("book.txt", [{"text": "words"}], ("data.format=instruction",), "data.sources: {path}:1: "
                 "instruction records need instruction/output fields or messages; got ['text']",
                 id="instruction-format-on-plain-text"),
])
def test_corpus_records_prep_cannot_use(apt_pipeline, run_root, tmp_path, name, records, overrides, message):
    path = write_source(tmp_path, name, records)
    code, err = apt_pipeline(f"data.sources=[{path}]", *overrides)
    assert code == 2 and REFUSED in err and message.format(path=path) in err
    assert not run_root.exists()


def test_stage_prep_refuses_a_corpus_without_the_text_field(apt_pipeline, run_root, write_jsonl):
    path = write_jsonl("nottext.jsonl", [{"nottext": 1}])
    code, err = apt_pipeline(f"data.sources=[{path}]", command=("stage", "prep"))
    assert code == 2 and "data.text_field: 'text' not in the columns of" in err
    assert not run_root.exists()


def test_only_the_first_records_are_read(tiny_config, write_jsonl):
    good = [{"text": f"document {i}"} for i in range(corpus.HEAD_RECORDS)]
    path = write_jsonl("big.jsonl", good + [{"nottext": 1}])
    with path.open("a") as file:
        file.write("not JSON: never read at start-up\n")
    preflight.check(tiny_config(f"data.sources=[{path}]"))


def test_chat_records_with_a_chat_template_pass(tiny_config, tmp_path, write_jsonl, hf_tokenizer_dir):
    tokenizer = LlamaTokenizer.from_pretrained(str(hf_tokenizer_dir))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(str(tmp_path / "chat_tokenizer"))
    path = write_jsonl("chat.jsonl", [{"messages": CHAT}] * 3)
    preflight.check(tiny_config(f"data.sources=[{path}]", "data.format=instruction",
                                f"tokenizer.path={tmp_path / 'chat_tokenizer'}"))


def test_a_json_array_is_not_parsed_at_start_up(tiny_config, tmp_path):
    (tmp_path / "docs.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}], indent=1))
    preflight.check(tiny_config(f"data.sources=[{tmp_path / 'docs.json'}]"))


def test_many_bad_files_are_counted_not_listed(apt_pipeline, run_root, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(preflight.MAX_CORPUS_PROBLEMS + 3):
        write_source(folder, f"{i:02}.jsonl", [{"nottext": 1}])
    code, err = apt_pipeline(f"data.sources=[{folder}]")
    assert code == 2 and err.count("data.text_field:") == preflight.MAX_CORPUS_PROBLEMS
    assert "data.sources: 3 more file(s) like these" in err
    assert not run_root.exists()


def test_hub_dataset_not_cached_while_offline(apt_pipeline, run_root, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    code, err = apt_pipeline("data.hub_name=someone/corpus")
    assert code == 2 and REFUSED in err
    assert "data.hub_name: 'someone/corpus' is not in the local datasets cache" in err and "HF_HUB_OFFLINE" in err
    assert not run_root.exists()


def test_hub_dataset_in_the_cache_passes_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    (tmp_path / "hf_cache" / "someone___corpus" / "default" / "0.0.0" / "0123abcd").mkdir(parents=True)
    assert preflight.hub_problem("someone/corpus") is None
    assert preflight.hub_problem(str(tmp_path)) is None  # a local folder needs no hub


def test_seq_len_above_the_checkpoint_positions(apt_pipeline, run_root, tmp_path):
    model_dir = write_model_dir(tmp_path / "model")  # max_position_embeddings 256
    code, err = apt_pipeline(f"model.path={model_dir}", "data.seq_len=300")
    assert code == 2 and "data.seq_len: 300 exceeds the model's max_position_embeddings (256" in err
    assert not run_root.exists()


def test_tokenizer_without_an_eos_token(apt_pipeline, run_root, tmp_path, hf_tokenizer_dir):
    config_path = hf_tokenizer_dir / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "eos_token": None}))
    code, err = apt_pipeline(f"tokenizer.path={hf_tokenizer_dir}")
    assert code == 2 and f"tokenizer.path: {hf_tokenizer_dir} has no EOS token" in err
    assert not run_root.exists()


# ---- hosts -----------------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("host, port", [("node-b.invalid", 22), ("127.0.0.2", None), ("192.0.2.1", 22)],
                         ids=["unresolvable", "refused", "no-answer"])  # 192.0.2.0/24: documentation-only, unrouted
def test_unreachable_host_fails_fast_naming_it(apt_pipeline, run_root, tmp_path, host, port):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"# head node first\nlocalhost slots=2\n{host} slots=2\n")
    started = time.monotonic()
    code, err = apt_pipeline(f"deepspeed.hostfile={hostfile}", "deepspeed.num_nodes=2",
                             f"deepspeed.host_check_port={port or closed_port()}")
    assert code == 2 and f"deepspeed.hostfile: host {host!r} does not" in err and "check" in err
    assert time.monotonic() - started < preflight.HOST_TIMEOUT_S + 2
    assert not run_root.exists()


def test_hostfile_with_fewer_hosts_than_nodes(apt_pipeline, run_root, tmp_path):
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    code, err = apt_pipeline(f"deepspeed.hostfile={tmp_path / 'hosts'}", "deepspeed.num_nodes=2")
    assert code == 2 and "names 1 host(s), fewer than deepspeed.num_nodes (2)" in err
    assert not run_root.exists()


def test_hosts_that_answer_on_the_configured_port_pass(tiny_config, tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.2", 0))
        server.listen()
        (tmp_path / "hosts").write_text("localhost slots=2\n127.0.0.2 slots=2\n")
        preflight.check(tiny_config(f"deepspeed.hostfile={tmp_path / 'hosts'}", "deepspeed.num_nodes=2",
                                    f"deepspeed.host_check_port={server.getsockname()[1]}"))


# ---- the tracking server ---------------------------------------------------------------------------------


def test_unreachable_tracking_server_fails_fast_naming_the_uri_and_the_fixes(apt_pipeline, run_root):
    uri = f"http://user:pw@127.0.0.2:{closed_port()}"
    started = time.monotonic()
    code, err = apt_pipeline(f"tracking.uri={uri}")
    assert code == 2 and "tracking.uri: no MLflow server answers at http://user:***@127.0.0.2:" in err
    assert "Connection refused" in err and "launch/mlflow_server.sh" in err and "unset tracking.uri" in err
    assert "pw" not in err.replace("port", "")
    assert time.monotonic() - started < 10
    assert not run_root.exists()


# ---- a DeepSpeed checkpoint to resume from --------------------------------------------------------------


def write_checkpoint(folder: Path, tag: str) -> Path:
    """A tag folder shaped like DeepSpeed's: model states and one rank's optimizer states (torch zip files)."""
    (folder / tag).mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(3)}}, folder / tag / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {}}, folder / tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (folder / "latest").write_text(tag)
    return folder / tag


def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


def test_truncated_deepspeed_checkpoint_names_the_folder_and_the_previous_tag(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    write_checkpoint(checkpoints, "step10")
    broken = write_checkpoint(checkpoints, "step20")
    states = broken / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    os.truncate(states, states.stat().st_size // 2)
    before = listing(checkpoints)
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(checkpoints)
    message = str(err.value)
    assert f"checkpoint {broken} (named by latest)" in message and f"{states.name}: truncated" in message
    assert f"echo step10 > {checkpoints / 'latest'}" in message and f"delete {checkpoints}" in message
    assert listing(checkpoints) == before


def test_latest_naming_a_missing_folder(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    write_checkpoint(checkpoints, "step10")
    (checkpoints / "latest").write_text("step20")
    with pytest.raises(CheckpointError, match=f"{checkpoints / 'step20'} does not exist(.|\n)*echo step10"):
        check_checkpoint(checkpoints)


def test_complete_checkpoint_or_none_passes(tmp_path):
    check_checkpoint(tmp_path / "checkpoints")  # no latest: a fresh start
    write_checkpoint(tmp_path / "checkpoints", "step10")
    check_checkpoint(tmp_path / "checkpoints")


def test_truncated_checkpoint_stops_the_stage_before_any_rank_starts(apt_pipeline, run_root, prep_dir, small_corpus):
    # An interrupted finetune that the same command would resume, its newest checkpoint cut short.
    cfg = config_lib.load("tests/tiny.yaml", [f"run.root={run_root}", f"data.sources=[{small_corpus}]",
                                                "data.num_proc=1", "data.seq_len=64"])
    stage_dir = cfg.run_dir / "finetune"
    shutil.copytree(prep_dir, cfg.run_dir / "prep")
    stage_dir.mkdir()
    (stage_dir / driver.RESUME_KEY).write_text(driver.expected_fingerprint(driver.stage_by_name("finetune"), cfg,
                                                                           cfg.run_dir))
    write_checkpoint(stage_dir / "checkpoints", "step10")
    states = write_checkpoint(stage_dir / "checkpoints", "step20") / "mp_rank_00_model_states.pt"
    os.truncate(states, 100)
    before = listing(stage_dir)

    code, err = apt_pipeline("data.seq_len=64", command=("stage", "finetune"))

    assert code == 2 and f"{states.name}: truncated" in err and "echo step10 >" in err
    assert listing(stage_dir) == before  # no rank started: each would have written .ranks/rank<N>.json


# ---- safe loading ----------------------------------------------------------------------------------------


class RunsCommand:
    """Unpickling this runs a shell command: what a poisoned checkpoint would carry."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_checkpoint_naming_an_unsafe_global_is_refused_without_unpickling(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    write_checkpoint(checkpoints, "step10")
    poisoned = write_checkpoint(checkpoints, "step20") / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "code_ran"
    torch.save({"optimizer_state_dict": {"loss_scaler": RunsCommand(f"touch {marker}")}}, poisoned)

    with pytest.raises(CheckpointError) as err:
        check_checkpoint(checkpoints)

    message = str(err.value)
    assert f"{poisoned.name}: refers to {os.system.__module__}.system" in message and "not loaded" in message
    assert f"echo step10 > {checkpoints / 'latest'}" in message
    assert not marker.exists()


def test_trust_remote_code_and_pickle_appear_only_behind_the_config():
    """trust_remote_code is passed the config's value, never a literal; the package never imports pickle."""
    offenders = []
    for path in (REPO / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and isinstance(node.value,
                                                                                                 ast.Constant):
                offenders.append(f"{path.relative_to(REPO)}:{node.value.lineno}: trust_remote_code={node.value.value}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                if any(name.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for name in names):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: imports {names}")
    assert not offenders


def test_trust_remote_code_is_off_unless_the_config_sets_it(tmp_path):
    assert config_lib.load(None).model.trust_remote_code is False
    tokenizer_dir = tmp_path / "remote_tokenizer"
    tokenizer_dir.mkdir()
    marker = tmp_path / "code_ran"
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "RemoteTokenizer", "auto_map": {"AutoTokenizer": ["remote.RemoteTokenizer", None]}}))
    (tokenizer_dir / "vocab.json").write_text("{}")
    (tokenizer_dir / "remote.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    _, problems = preflight.inspect_tokenizer(str(tokenizer_dir), None, trust_remote_code=False)
    assert len(problems) == 1 and "trust_remote_code" in problems[0]
    assert not marker.exists()


def test_every_torch_load_in_the_repository_is_weights_only():
    unsafe = []
    for folder in ("pipeline", "tests", "bench", "launch", "data"):
        for path in (REPO / folder).rglob("*.py"):
            if path.is_relative_to(REPO / "bench" / "out"):  # run outputs: DeepSpeed copies its zero_to_fp32.py there
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                    keywords = {k.arg: k.value for k in node.keywords}
                    weights_only = keywords.get("weights_only")
                    if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                        unsafe.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


@pytest.mark.parametrize("extra, host", [((), "127.0.0.1"), (("--host", "0.0.0.0"), "0.0.0.0")],
                         ids=["default", "told-otherwise"])
def test_mlflow_server_script_binds_loopback_unless_told_otherwise(tmp_path, extra, host):
    result = subprocess.run(["bash", str(REPO / "launch" / "mlflow_server.sh"), str(tmp_path / "store"), *extra],
                            capture_output=True, text=True, env={**os.environ, "MLFLOW": "echo"}, check=True)
    assert result.stdout.split()[:3] == ["server", "--host", host]
