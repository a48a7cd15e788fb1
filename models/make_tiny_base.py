"""Rebuild models/tiny-python-docs/: the small trained GQA LLaMA that `make run` prunes.

Run once by a maintainer from the repository root (`.venv/bin/python -m models.make_tiny_base`, a few
minutes on one core); the output is committed so that no run trains a base model. The steps:
1. the pipeline's own prep stage on data/python-docs.jsonl with configs/tiny.yaml's data section and seed:
   a SentencePiece BPE tokenizer and the same train / held-out split a `make run` makes, so the held-out
   documents the run scores on were never trained on;
2. the study's pretraining loop (bench/study/pretrain.py) on the train split, fp32, fixed seed;
3. the checkpoint, its tokenizer and a model card written to a temp folder, then renamed into place.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import datasets
import torch
import transformers
import yaml

from bench.study.apt_run import prepare_data
from bench.study.pretrain import SETTINGS_FILE, PretrainSettings, pretrain
from bench.study.scoring import evaluate
from pipeline import config as config_lib

OUT = Path("models/tiny-python-docs")
SETTINGS = PretrainSettings(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=352,
                            steps=800, batch_size=16, lr=3e-3, warmup_steps=40)


def data_config(work: Path) -> config_lib.RunConfig:
    """configs/tiny.yaml's run seed and data section, with a tokenizer trained by prep (no model.path)."""
    tiny = yaml.safe_load(Path("configs/tiny.yaml").read_text())
    raw = {"run": {"name": "tiny-base-data", "root": str(work), "seed": tiny["run"]["seed"]},
           "data": tiny["data"], "tokenizer": {"path": None, "vocab_size": tiny["tokenizer"]["vocab_size"]},
           "model": {"path": None, "max_position_embeddings": tiny["model"]["max_position_embeddings"]}}
    return config_lib.from_dict(raw)


def model_card(record: dict, perplexity: float, vocab_size: int) -> str:
    """README.md of the checkpoint: what it is, how it was made, its licence."""
    s = record["settings"]
    return f"""# tiny-python-docs

A {record['params']:,}-parameter LLaMA (GQA) trained from scratch on the Python documentation corpus bundled in
`data/python-docs.jsonl`. It is apt-pipeline's embedded default: `make run` prunes it to half its size.
Made by `python -m models.make_tiny_base` (its docstring says how); nothing here came from elsewhere.

- architecture: LlamaForCausalLM, hidden {s['hidden_size']}, {s['num_layers']} layers, {s['num_heads']} query /
  {s['num_kv_heads']} KV heads, intermediate {s['intermediate_size']}, untied embeddings, fp32 weights
- tokenizer: SentencePiece BPE with byte fallback, {vocab_size} pieces, trained by the pipeline's prep stage on
  the same corpus (`tokenizer.json`)
- training: {s['steps']} steps x {s['batch_size']} x 128 tokens ({record['tokens']:,} tokens,
  {record['epochs']:.1f} epochs of the train split), AdamW (lr {s['lr']}, warm-up {s['warmup_steps']}, cosine to
  10%, weight decay {s['weight_decay']}), seed {s['seed']}, {record['seconds']:.0f} s on one CPU core
- held-out perplexity {perplexity:.2f} (vocabulary {vocab_size}) on the 5% of documents `configs/tiny.yaml`
  holds out (split by document with run.seed 0; a run with another seed or fraction may score on trained text)

Licence: the weights are derived from the Python documentation, under the PSF licence
(`data/LICENSE-python-docs.txt`); use them under the same terms.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("bench/out/tiny-base"), help="scratch folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    prep_dir, data_id = prepare_data(data_config(args.work))
    splits = datasets.load_from_disk(str(prep_dir / "dataset")).with_format("torch")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(prep_dir / "tokenizer"))
    trained = args.work / "pretrained"
    record = pretrain(SETTINGS, splits["train"], len(tokenizer), data_id, trained)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(trained), dtype=torch.float32).eval()
    perplexity = evaluate(model, splits["validation"])
    print(f"held-out perplexity {perplexity:.2f} (loss {math.log(perplexity):.3f})", flush=True)

    tmp = OUT.with_name(f".{OUT.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    record = {key: value for key, value in record.items() if key != "reused"}
    (tmp / "training.json").write_text(json.dumps(record | {"heldout_perplexity": perplexity}, indent=2) + "\n")
    (tmp / "README.md").write_text(model_card(record, perplexity, len(tokenizer)))
    (tmp / SETTINGS_FILE).unlink(missing_ok=True)
    shutil.rmtree(OUT, ignore_errors=True)
    os.replace(tmp, OUT)
    print(f"wrote {OUT}", flush=True)


if __name__ == "__main__":
    main()
