import hashlib
import json
import shutil

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from pipeline import run as driver
from pipeline.stage import read_manifest
from pipeline.stages import prep


def run_prep(cfg):
    driver.run_stage(driver.stage_by_name("prep"), cfg, cfg.run_dir)
    return cfg.run_dir / "prep"


def token_hash(prep_dir) -> str:
    digest = hashlib.sha256()
    for split in ("train", "validation"):
        part = datasets.load_from_disk(str(prep_dir / "dataset" / split))
        for row in part:
            digest.update(bytes(str(row["input_ids"]), "ascii"))
    return digest.hexdigest()


def test_text_prep_packs_fixed_blocks(tiny_config):
    cfg = tiny_config("data.seq_len=64")
    prep_dir = run_prep(cfg)
    train = datasets.load_from_disk(str(prep_dir / "dataset" / "train"))
    assert train.column_names == ["input_ids", "labels"]
    assert all(len(ids) == 64 for ids in train["input_ids"][:50])
    assert train[0]["input_ids"] == train[0]["labels"]
    summary = read_manifest(prep_dir)["summary"]
    assert summary["train_blocks"] == len(train) and summary["documents"] == 12
    eos = AutoTokenizer.from_pretrained(str(prep_dir / "tokenizer")).eos_token_id
    assert any(eos in ids for ids in train["input_ids"])  # documents separated by EOS


def test_heldout_text_is_the_validation_documents(tiny_config, small_corpus):
    prep_dir = run_prep(tiny_config("data.seq_len=64", "data.validation_fraction=0.25"))
    heldout = [json.loads(line)["text"] for line in (prep_dir / "heldout.jsonl").read_text().splitlines()]
    corpus = [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()]
    assert len(heldout) == 3 and all(text in corpus for text in heldout)
    tokenizer = AutoTokenizer.from_pretrained(str(prep_dir / "tokenizer"))
    first_block = datasets.load_from_disk(str(prep_dir / "dataset" / "validation"))[0]["input_ids"]
    assert first_block[:8] == tokenizer(heldout[0])["input_ids"][:8]  # the blocks are packed from these texts


def test_two_preps_are_identical(tiny_config, tmp_path):
    first = run_prep(tiny_config())
    fingerprint, tokens = read_manifest(first)["fingerprint"], token_hash(first)
    shutil.rmtree(first.parent)
    second = run_prep(tiny_config())
    assert read_manifest(second)["fingerprint"] == fingerprint
    assert token_hash(second) == tokens


def test_trained_tokenizer_round_trips_text(tiny_config):
    prep_dir = run_prep(tiny_config())
    tokenizer = AutoTokenizer.from_pretrained(str(prep_dir / "tokenizer"))
    text = "Hello,   world!\n\tdef f(x): return x ** 2  # ünïcode ✓ 😀"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    sp = spm.SentencePieceProcessor(model_file=str(prep_dir / "tokenizer" / "tokenizer.model"))
    assert sp.encode(text) == ids  # HF and SentencePiece agree exactly


def test_sentencepiece_model_and_hf_dir_are_accepted(tiny_config, tmp_path):
    prep_dir = run_prep(tiny_config())
    model_file = tmp_path / "sp.model"
    shutil.copy(prep_dir / "tokenizer" / "tokenizer.model", model_file)
    hf_dir = tmp_path / "hf"
    shutil.copytree(prep_dir / "tokenizer", hf_dir)
    reference = token_hash(prep_dir)
    for path in (model_file, hf_dir):
        out = run_prep(tiny_config(f"tokenizer.path={path}"))
        assert token_hash(out) == reference


def test_txt_and_parquet_sources(tiny_config, tmp_path):
    text = "\n\n".join(f"Paragraph {i}. " + "Some words to tokenize here. " * 20 for i in range(40))
    (tmp_path / "a.txt").write_text(text)
    prep_dir = run_prep(tiny_config(f"data.sources=[{tmp_path / 'a.txt'}]", "data.text_unit=paragraph",
                                    "tokenizer.vocab_size=300"))
    assert read_manifest(prep_dir)["summary"]["documents"] == 40
    pq.write_table(pa.table({"text": text.split("\n\n")}), tmp_path / "b.parquet")
    prep_dir = run_prep(tiny_config(f"data.sources=[{tmp_path / 'b.parquet'}]", "tokenizer.vocab_size=300"))
    assert read_manifest(prep_dir)["summary"]["documents"] == 40


def test_instruction_records_mask_the_prompt(tiny_config, write_jsonl):
    records = [{"instruction": f"Add {i} and {i}.", "input": "" if i % 2 else "numbers", "output": f"{2 * i}"}
               for i in range(60)]
    path = write_jsonl("alpaca.jsonl", records)
    cfg = tiny_config(f"data.sources=[{path}]", "data.format=instruction", "data.seq_len=128",
                      "tokenizer.vocab_size=300")
    prep_dir = run_prep(cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(prep_dir / "tokenizer"))
    row = datasets.load_from_disk(str(prep_dir / "dataset" / "train"))[0]
    answer = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    assert row["labels"][0] == -100 and answer
    assert tokenizer.decode(answer[:-1]).strip().isdigit() and answer[-1] == tokenizer.eos_token_id


def test_chat_records_need_a_chat_template(tiny_config, write_jsonl):
    path = write_jsonl("chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "hello"}]}] * 20)
    cfg = tiny_config(f"data.sources=[{path}]", "data.format=instruction", "tokenizer.vocab_size=300")
    with pytest.raises(ValueError, match="chat template"):
        run_prep(cfg)


def test_empty_corpus_fails_before_work(tiny_config, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    cfg = tiny_config(f"data.sources=[{tmp_path / 'empty.jsonl'}]")
    with pytest.raises(ValueError, match="empty"):
        run_prep(cfg)
    assert read_manifest(cfg.run_dir / "prep") is None


def test_seq_len_above_model_positions_fails_before_work(tiny_config, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 32}')
    cfg = tiny_config(f"model.path={model_dir}", "data.seq_len=64")
    with pytest.raises(ValueError, match="data.seq_len: 64 exceeds"):
        run_prep(cfg)
    assert not (cfg.run_dir / "prep" / "dataset").exists()


def test_data_files_refuses_unknown_suffix(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="is not one of"):
        prep.data_files([tmp_path / "x.csv"])
