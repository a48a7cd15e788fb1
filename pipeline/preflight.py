"""Start-up checks of the inputs a run names, before any stage runs or anything is written.

Only cheap reads: config.json, safetensors headers, the tokenizer, the first records of each corpus file (a
parquet file's schema), the local datasets cache, one TCP connect per host, one request to the MLflow server.
Every problem is collected and raised once, as `config.load` does for the config itself.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import sentencepiece as spm
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoTokenizer

from pipeline import corpus, lm_eval_tasks, model_io, tracking
from pipeline.apt import shapes
from pipeline.apt.blocks import SUPPORTED_MODEL_TYPES, ModelShape, total_params
from pipeline.config import ConfigError, RunConfig

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1"})
"""Hostfile names that need no network check."""
HOST_TIMEOUT_S = 3.0
HOSTFILE_LINE = re.compile(r"(\S+)\s+slots=(\d+)")
"""A hostfile line as DeepSpeed's launcher reads it: `host slots=N`."""
MAX_CORPUS_PROBLEMS = 5
"""Bad corpus files listed by name; a folder of many like them gets a count for the rest."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
"""A tokenizer folder holds at least one; without, transformers 5 builds an empty tokenizer instead of failing."""


def check(cfg: RunConfig, *, tracking_server: bool = True) -> None:
    """Raise ConfigError naming every bad input of `cfg` (model, tokenizer, corpus, hosts, and the MLflow server
    unless `tracking_server` is False: `apt-pipeline stage` logs to no server); return when all are fine."""
    problems = []
    vocab_size = cfg.model.vocab_size
    if cfg.model.path is not None:
        model_config, config_problems = checkpoint_config(cfg.model, cfg.data.seq_len)
        problems += config_problems + weight_problems(Path(cfg.model.path))
        vocab_size = model_config.get("vocab_size") if model_config else None
    chat_template = False  # a trained or SentencePiece .model tokenizer has none
    problems += target_shape_problems(cfg) + depth_problems(cfg)
    if cfg.tokenizer.path is not None:
        chat_template, tokenizer_issues = inspect_tokenizer(cfg.tokenizer.path, vocab_size,
                                                            cfg.model.trust_remote_code)
        problems += tokenizer_issues
    if cfg.data.hub_name is None:
        problems += corpus_problems(cfg.data, chat_template)
    elif (hub := hub_problem(cfg.data.hub_name)) is not None:
        problems.append(hub)
    problems += lm_eval_problems(cfg.eval.lm_eval_tasks)
    if cfg.deepspeed.hostfile is not None and cfg.deepspeed.host_check_port:
        problems += host_problems(cfg.deepspeed)
    if tracking_server and (server := tracking.server_problem(cfg.tracking.uri)) is not None:  # now, not in hours
        problems.append(tracking.server_down(cfg.tracking.uri, server))
    if problems:
        raise ConfigError("invalid inputs (nothing was run or written):\n  " + "\n  ".join(problems))


# ---- model -----------------------------------------------------------------------------------------------


def checkpoint_config(model, seq_len: int) -> tuple[dict | None, list[str]]:
    """config.json of `model.path` as a dict (None if unreadable), and why it is not a model we can prune at
    `seq_len` tokens."""
    config_path = Path(model.path) / "config.json"
    if not config_path.is_file():
        return None, [f"model.path: {config_path} not found; give a from_pretrained folder"]
    try:
        raw = json.loads(config_path.read_text())
    except ValueError as e:
        return None, [f"model.path: {config_path} is not valid JSON ({e})"]
    if not isinstance(raw, dict):
        return None, [f"model.path: {config_path} is not a JSON object"]
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return raw, [f"model.path: {config_path} has model_type {model_type!r}; supported: "
                     f"{', '.join(SUPPORTED_MODEL_TYPES)} (LLaMA-family decoders)"]
    try:  # the shape finetune will read: catches what a supported type can still get wrong (GQA, biases)
        config = AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
        ModelShape.from_config(config)
    except ValueError as e:
        return raw, [f"model.path: {config_path}: {e}"]
    if seq_len > config.max_position_embeddings:  # prep's check_seq_len, before anything is written
        return raw, [f"data.seq_len: {seq_len} exceeds the model's max_position_embeddings "
                     f"({config.max_position_embeddings}, {config_path}); lower data.seq_len"]
    return raw, []


def target_shape_problems(cfg: RunConfig) -> list[str]:
    """`pruning.target_shape` fits the model: no size above the model's, KV heads as `pruning.attention_mode`
    keeps them, a layer count no more than the model has (the config checked its form already)."""
    target = cfg.pruning.target_shape
    if target is None or (shape := configured_shape(cfg.model)) is None:
        return []  # an unreadable model is reported by checkpoint_config
    problems = shapes.target_shape_problems(shape, target[:4], cfg.pruning.attention_mode)
    layers = cfg.pruning.target_layers
    if layers is not None and layers > shape.num_layers:
        problems.append(f"layers {layers} exceeds the model's {shape.num_layers}")
    return [f"pruning.target_shape: {problem}" for problem in problems]


def depth_problems(cfg: RunConfig) -> list[str]:
    """Layer cuts the model allows: a `pruning.depth` count with at least one layer cut and one kept, whose layers
    can hold `target_remaining`; sublayers without an output bias (a layer masked whole must add nothing)."""
    pruning = cfg.pruning
    if not pruning.cuts_layers or (shape := configured_shape(cfg.model)) is None:
        return []
    depth, option = pruning.depth, "pruning.depth" if pruning.depth != "off" else "pruning.target_shape"
    if isinstance(depth, int) and not 1 <= depth < shape.num_layers:
        return [f"pruning.depth: {depth} layers to keep; the model has {shape.num_layers}, so it must be in "
                f"[1, {shape.num_layers - 1}] (or off / auto)"]
    if isinstance(depth, int):
        most = total_params(dataclasses.replace(shape, num_layers=depth)) / total_params(shape)
        if most < pruning.target_remaining:
            return [f"pruning.depth: the {depth} kept layers hold at most {most:.3f} of the parameters, less than "
                    f"pruning.target_remaining {pruning.target_remaining}; keep more layers or lower the target"]
    if shape.o_proj_bias:
        return [f"{option}: cuts whole layers, but this model's o_proj and down_proj have a bias that a layer adds "
                f"even with every head and neuron pruned; keep every layer (pruning.depth=off, no layer count)"]
    return sublayer_problems(cfg)


def sublayer_problems(cfg: RunConfig) -> list[str]:
    """`pruning.depth_unit=sublayer` renumbers the KV cache over the layers that keep attention: every layer must
    use the same kind of attention (no mix of sliding-window and full layers)."""
    if cfg.pruning.depth_unit != "sublayer" or cfg.model.path is None:
        return []
    try:
        config = AutoConfig.from_pretrained(str(cfg.model.path), trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):
        return []  # an unreadable model is reported by checkpoint_config
    kinds = set(getattr(config, "layer_types", None) or [])
    if len(kinds) > 1:
        return [f"pruning.depth_unit: sublayer needs one attention kind in every layer; {cfg.model.path} mixes "
                f"{sorted(kinds)} (config.layer_types); use depth_unit layer"]
    return []


def configured_shape(model) -> ModelShape | None:
    """The shape of `model.path`'s checkpoint (None if it does not load), or of the model built from the config."""
    if model.path is None:
        return ModelShape(vocab_size=model.vocab_size or 1, hidden_size=model.hidden_size, num_layers=model.num_layers,
                          num_heads=model.num_heads, num_kv_heads=model.num_kv_heads,
                          head_dim=model.hidden_size // model.num_heads, intermediate_size=model.intermediate_size,
                          tie_word_embeddings=model.tie_word_embeddings, qkv_bias=model.model_type == "qwen2")
    try:
        return model_io.model_shape(model.path, model.trust_remote_code)
    except (OSError, ValueError):
        return None


def weight_problems(directory: Path) -> list[str]:
    """The safetensors files from_pretrained and merge will read exist and have readable headers (no weights read)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            return [f"model.path: {index} is not a safetensors index with a weight_map ({e!r})"]
        files = [directory / name for name in shards]
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    elif any(directory.glob("*.bin")):
        return [f"model.path: {directory} has PyTorch .bin weights only; the pipeline reads safetensors. Convert "
                f"once (transformers loads .bin with weights_only=True): python -c \"from transformers import "
                f"AutoModelForCausalLM as M; M.from_pretrained('{directory}').save_pretrained('NEW_DIR')\", "
                f"then set model.path=NEW_DIR"]
    else:
        return [f"model.path: {directory} has no model.safetensors or model.safetensors.index.json"]
    problems = []
    for path in files:
        if not path.is_file():
            problems.append(f"model.path: {path} is named in {index.name} but missing")
            continue
        try:
            with safe_open(str(path), framework="pt") as weights:
                weights.keys()
        except (SafetensorError, OSError) as e:
            problems.append(f"model.path: {path} is not a readable safetensors file ({e}); re-download or re-save it")
    return problems


def inspect_tokenizer(path: str, vocab_size: int | None, trust_remote_code: bool) -> tuple[bool | None, list[str]]:
    """Whether the tokenizer has a chat template (None: it did not load), and why prep cannot use it: it does not
    load, has no EOS token or outgrows the model's vocabulary (vocab_size None: the model is built to fit it)."""
    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        return None, [f"tokenizer.path: {path} holds none of {', '.join(TOKENIZER_FILES)}; is it a tokenizer folder?"]
    try:
        if Path(path).is_file():  # a SentencePiece .model, as prep takes it (LlamaTokenizer: EOS </s>, no template)
            size, chat_template, has_eos = spm.SentencePieceProcessor(model_file=path).get_piece_size(), False, True
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            size, chat_template = len(tokenizer), bool(tokenizer.chat_template)
            has_eos = tokenizer.eos_token_id is not None
    except (OSError, RuntimeError, ValueError) as e:
        return None, [f"tokenizer.path: {path} could not be loaded ({e})"]
    problems = []
    if not has_eos:
        problems.append(f"tokenizer.path: {path} has no EOS token; prep needs one to separate documents "
                        f"(set eos_token in its tokenizer_config.json)")
    if vocab_size is not None and size > vocab_size:
        problems.append(f"tokenizer.path: {path} has {size} tokens, more than the model's vocab_size {vocab_size}; "
                        f"use the model's own tokenizer")
    return chat_template, problems


# ---- corpus ----------------------------------------------------------------------------------------------


def corpus_problems(data, chat_template: bool | None) -> list[str]:
    """The corpus files exist, are not all empty, and each starts with records prep can use as data.format says
    (chat_template: whether the tokenizer has one, None if unknown)."""
    try:
        files = corpus.data_files(data.sources)
    except (OSError, ValueError) as e:
        return [str(e)]
    problems = []
    for path in files:
        try:
            problem = corpus.head_problem(path, data, chat_template)
        except (OSError, ValueError) as e:
            problem = f"data.sources: {path} is unreadable as {path.suffix} ({e})"
        if problem is not None:
            problems.append(problem)
    if len(problems) > MAX_CORPUS_PROBLEMS:
        rest = len(problems) - MAX_CORPUS_PROBLEMS
        problems = problems[:MAX_CORPUS_PROBLEMS] + [f"data.sources: {rest} more file(s) like these"]
    return problems


def hub_problem(name: str) -> str | None:
    """With the hub offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE), a hub dataset must be a local folder or in the
    datasets cache, as `datasets.load_dataset` looks for it offline; nothing is fetched."""
    if not datasets.config.HF_HUB_OFFLINE or Path(name).is_dir():
        return None
    if name.count("/") <= 1:
        try:  # the lookup load_dataset falls back to offline: a glob of the cache folder
            datasets.load.CachedDatasetModuleFactory(name).get_module()
            return None
        except FileNotFoundError:
            pass
    return (f"data.hub_name: {name!r} is not in the local datasets cache ({datasets.config.HF_DATASETS_CACHE}) "
            f"and the hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); load it once with the hub reachable, "
            f"unset those variables, or give local files in data.sources")


def lm_eval_problems(tasks: tuple[str, ...]) -> list[str]:
    """Every eval.lm_eval_tasks name is a task lm-eval knows, and with the hub offline its dataset is cached."""
    problems, hub_datasets = lm_eval_tasks.task_problems(tasks)
    for task, dataset in hub_datasets.items():
        if hub_problem(dataset) is not None:
            problems.append(f"eval.lm_eval_tasks: {task!r} reads the hub dataset {dataset!r}, which is not in the "
                            f"local datasets cache while the hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); "
                            f"unset those variables with a network, or drop the task")
    return problems


# ---- hosts -----------------------------------------------------------------------------------------------


def host_problems(section) -> list[str]:
    """The hosts the launcher will use (the hostfile's first num_nodes) parse and answer on host_check_port."""
    hosts, problems = parse_hostfile(Path(section.hostfile))
    if problems:
        return problems
    if len(hosts) < section.num_nodes:
        return [f"deepspeed.hostfile: {section.hostfile} names {len(hosts)} host(s), fewer than "
                f"deepspeed.num_nodes ({section.num_nodes})"]
    remote = [host for host in hosts[:section.num_nodes] if host not in LOCAL_HOSTS]
    if not remote:
        return []
    with ThreadPoolExecutor(max_workers=len(remote)) as pool:  # many dead hosts cost one timeout, not one each
        answers = pool.map(lambda host: unreachable(host, section.host_check_port), remote)
    return [f"deepspeed.hostfile: {answer}" for answer in answers if answer]


def parse_hostfile(path: Path) -> tuple[list[str], list[str]]:
    """Host names in file order, and what is wrong with the file, by the launcher's rules (`#` comments)."""
    hosts, problems = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = HOSTFILE_LINE.match(line)
        if match is None:
            problems.append(f"deepspeed.hostfile: {path}:{number}: {line!r} is not `host slots=N`")
        elif match[1] in hosts:
            problems.append(f"deepspeed.hostfile: {path}:{number}: {match[1]} is listed twice")
        else:
            hosts.append(match[1])
    if not hosts and not problems:
        problems.append(f"deepspeed.hostfile: {path} names no host")
    return hosts, problems


def unreachable(host: str, port: int) -> str | None:
    """Why `host` cannot be reached on TCP `port` within HOST_TIMEOUT_S; None when it answers."""
    try:
        socket.create_connection((host, port), timeout=HOST_TIMEOUT_S).close()
    except socket.gaierror as e:
        return f"host {host!r} does not resolve ({e.strerror}); check the name"
    except OSError as e:  # refused, no route, timed out
        return (f"host {host!r} does not answer on port {port} ({e.strerror or e}); check that it is up and "
                f"runs sshd, or set deepspeed.host_check_port (0 skips this check)")
    return None
