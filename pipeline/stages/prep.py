"""prep: load the corpus, get a tokenizer (or train one), tokenize, pack, split, save.

Writes `prep/tokenizer/` (a HF tokenizer) and `prep/dataset/{train,validation}` (columns
`input_ids` and `labels`, every row exactly `seq_len` long; labels are -100 where no loss is taken), and
`prep/heldout.jsonl`, the validation documents as text for lm-eval.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import datasets
import sentencepiece as spm
from transformers import AutoConfig, AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

from pipeline.config import PrepConfig
from pipeline.corpus import DATA_SUFFIXES, data_files, instruction_problem, text_field_problem
from pipeline.dist import get_logger
from pipeline.layout import RunLayout
from pipeline.stage import write_atomic

Config = PrepConfig
IGNORE_INDEX = -100
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"

log = get_logger("apt.prep")


def run(cfg: PrepConfig, run_dir: Path) -> dict:
    layout = RunLayout(run_dir)
    data, model = cfg.data, cfg.model
    files = data_files(data.sources) if data.hub_name is None else []
    check_seq_len(data.seq_len, model)

    raw = load_corpus(data, files)
    if len(raw) == 0:
        raise ValueError(f"data: the corpus {data.hub_name or list(data.sources)} has no records")
    log.info("corpus: %d documents from %s", len(raw), data.hub_name or ", ".join(map(str, files)))

    tokenizer = get_tokenizer(cfg.tokenizer, raw, data, layout.tokenizer, model.trust_remote_code)
    check_vocab(tokenizer, model)

    split = raw.train_test_split(test_size=data.validation_fraction, seed=cfg.run.seed)
    encode = pack_text if data.format == "text" else encode_instruction
    fn_kwargs = {"tokenizer": tokenizer, "data": data}
    splits = {}
    for name, part in (("train", split["train"]), ("validation", split["test"])):
        splits[name] = part.map(encode, batched=True, fn_kwargs=fn_kwargs, remove_columns=part.column_names,
                                num_proc=min(data.num_proc, max(1, len(part) // 2)), desc=f"tokenize {name}")
        if len(splits[name]) == 0:
            raise ValueError(f"data: the {name} split holds no {data.seq_len}-token block; "
                             f"lower data.seq_len or add text")
    dataset = datasets.DatasetDict(splits)
    write_atomic(layout.heldout_text, heldout_jsonl(split["test"], tokenizer, data))

    tmp = layout.dataset.with_name(".dataset.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    shutil.rmtree(layout.dataset, ignore_errors=True)
    os.replace(tmp, layout.dataset)

    summary = {"documents": len(raw), "vocab_size": len(tokenizer), "seq_len": data.seq_len}
    for name, part in splits.items():
        summary[f"{name}_blocks"] = len(part)
        summary[f"{name}_tokens"] = len(part) * data.seq_len
    log.info("prep: %d documents -> %d train / %d validation blocks of %d tokens (%d train tokens)",
             len(raw), summary["train_blocks"], summary["validation_blocks"], data.seq_len, summary["train_tokens"])
    return summary


def check_seq_len(seq_len: int, model) -> None:
    if model.path is not None:
        config_path = Path(model.path) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"model.path: {config_path} not found; is {model.path} a from_pretrained folder?")
        config = AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
        max_positions = config.max_position_embeddings
    else:
        max_positions = model.max_position_embeddings
    if seq_len > max_positions:
        raise ValueError(f"data.seq_len: {seq_len} exceeds the model's max_position_embeddings ({max_positions})")


def check_vocab(tokenizer: PreTrainedTokenizerBase, model) -> None:
    if model.path is not None:
        vocab = AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code).vocab_size
    else:
        vocab = model.vocab_size
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(f"tokenizer: {len(tokenizer)} tokens do not fit the model's vocab_size {vocab}; "
                         f"use the model's own tokenizer or a smaller tokenizer.vocab_size")


def load_corpus(data, files: list[Path]) -> datasets.Dataset:
    if data.hub_name is not None:
        corpus = datasets.load_dataset(data.hub_name, data.hub_config, split=data.hub_split)
    else:
        kind = DATA_SUFFIXES[files[0].suffix]
        kwargs = {"sample_by": data.text_unit} if kind == "text" else {}
        try:
            corpus = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", **kwargs)
        except Exception as e:
            raise ValueError(f"data.sources: could not read {[str(f) for f in files]} as {kind}: {e}") from e
    if data.format == "text":
        if (problem := text_field_problem(corpus.column_names, data.text_field)) is not None:
            raise ValueError(problem)
        corpus = corpus.select_columns([data.text_field]).filter(lambda r: bool(r[data.text_field].strip()))
    return corpus


def get_tokenizer(section, corpus: datasets.Dataset, data, out_dir: Path,
                  trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """Load the configured tokenizer, or train SentencePiece BPE on the corpus; save it to `out_dir`."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    if section.path is None:
        model_proto = train_sentencepiece(corpus_lines(corpus, data, section.train_sentences), section.vocab_size)
        (out_dir / "tokenizer.model").write_bytes(model_proto)
        tokenizer = LlamaTokenizer.from_pretrained(str(out_dir), add_bos_token=True)
        log.info("trained a SentencePiece BPE tokenizer with %d pieces (asked for %d)", len(tokenizer),
                 section.vocab_size)
    elif Path(section.path).is_file():
        shutil.copy(section.path, out_dir / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(str(out_dir), add_bos_token=True)
    else:
        # The one loader here that can run code shipped with the files (LlamaTokenizer is a fixed class).
        tokenizer = AutoTokenizer.from_pretrained(section.path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer: {section.path} has no EOS token; prep needs one to separate documents")
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def corpus_lines(corpus: datasets.Dataset, data, limit: int):
    """Non-empty lines of the corpus text (chat message contents included), at most `limit`."""
    count = 0
    for record in corpus:
        texts = [record[data.text_field]] if data.format == "text" else [
            m["content"] for m in record.get("messages") or []] + [
            str(v) for k, v in record.items() if k != "messages" and isinstance(v, str)]
        for line in "\n".join(texts).splitlines():
            if line.strip():
                yield line
                count += 1
                if count >= limit:
                    return


def train_sentencepiece(lines, vocab_size: int) -> bytes:
    """BPE with byte fallback and identity normalisation, so HF and SentencePiece ids agree exactly."""
    lines = list(lines)
    if not lines:
        raise ValueError("tokenizer: the corpus has no text to train a tokenizer on; set tokenizer.path")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=1 << 16,
        num_threads=1, minloglevel=2, hard_vocab_limit=False,  # a small corpus gets a smaller vocabulary
    )
    return model.getvalue()


def pack_text(batch: dict, tokenizer: PreTrainedTokenizerBase, data) -> dict:
    """Concatenate documents with EOS between them and cut into seq_len blocks (the tail is dropped)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(batch[data.text_field], add_special_tokens=True)["input_ids"]:
        stream += ids + [eos]
    n = len(stream) // data.seq_len
    blocks = [stream[i * data.seq_len:(i + 1) * data.seq_len] for i in range(n)]
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


def heldout_jsonl(part: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, data) -> str:
    """The held-out documents as JSON lines of {"text": ...}; an instruction record as its prompt and answer."""
    if data.format == "text":
        texts = part[data.text_field]
    else:
        texts = ["".join(render_instruction(record, tokenizer)[:2]) for record in part]
    return "".join(json.dumps({"text": text}) + "\n" for text in texts)


def encode_instruction(batch: dict, tokenizer: PreTrainedTokenizerBase, data) -> dict:
    """One example per row, padded or cut to seq_len; loss only on the answer tokens.

    Records whose prompt alone fills seq_len are dropped (the summary's block count shows it)."""
    rows = len(next(iter(batch.values())))
    input_ids, labels = [], []
    for i in range(rows):
        prompt, answer, templated = render_instruction({k: v[i] for k, v in batch.items()}, tokenizer)
        prompt_ids = tokenizer(prompt, add_special_tokens=not templated)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt_ids) >= data.seq_len:
            continue  # no answer token would survive the cut: nothing to learn from this record
        ids = (prompt_ids + answer_ids)[:data.seq_len]
        target = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:data.seq_len]
        pad = data.seq_len - len(ids)
        input_ids.append(ids + [tokenizer.eos_token_id] * pad)
        labels.append(target + [IGNORE_INDEX] * pad)
    return {"input_ids": input_ids, "labels": labels}


def render_instruction(record: dict, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str, bool]:
    """(prompt, answer, templated) of an Alpaca or a chat `messages` record; a chat template adds its own BOS."""
    if (problem := instruction_problem(record, bool(tokenizer.chat_template))) is not None:
        raise ValueError(problem)  # the start-up checks refuse it in the first records of each file
    if record.get("messages"):
        messages = record["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        return prompt, messages[-1]["content"], True
    extra = record.get("input") or ""
    input_block = f"### Input:\n{extra}\n\n" if extra else ""
    return ALPACA_PROMPT.format(instruction=record["instruction"], input_block=input_block), record["output"], False

