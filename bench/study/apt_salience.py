"""Where an APT run's budget went: salience per parameter of each block type at every pruning update.

The budget search keeps the blocks with the highest salience per parameter across all block types, so the order
in which APT removes query heads, MLP neurons and hidden channels follows these densities. Reads the finetune
stage's `updates/step*.safetensors` (EMA salience and target masks of each update) of one run directory:

    .venv/bin/python -m bench.study.apt_salience bench/out/study/apt-30
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline import config as config_lib
from pipeline.apt.blocks import ModelShape, params_per_hidden_channel, params_per_neuron, params_per_query_head
from pipeline.model_io import model_shape

BLOCKS = ("head", "neuron", "hidden")


def update_shape(base: ModelShape, tensors: dict[str, torch.Tensor]) -> ModelShape:
    """The training model's shape at one update (smaller than the base after a compaction)."""
    layers, heads = tensors["ema.head"].shape
    return ModelShape(vocab_size=base.vocab_size, hidden_size=tensors["ema.hidden"].numel(), num_layers=layers,
                      num_heads=heads, num_kv_heads=tensors["target.kv_mask"].shape[1], head_dim=base.head_dim,
                      intermediate_size=tensors["ema.neuron"].shape[1], tie_word_embeddings=base.tie_word_embeddings,
                      qkv_bias=base.qkv_bias, o_proj_bias=base.o_proj_bias)


def densities(shape: ModelShape, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EMA salience per parameter the block owns, per block type (what the search sorts by)."""
    owned = {"head": params_per_query_head(shape), "neuron": params_per_neuron(shape),
             "hidden": params_per_hidden_channel(shape)}
    return {block: tensors[f"ema.{block}"].flatten().double() / owned[block] for block in BLOCKS}


def table(run_dir: Path) -> str:
    """One markdown row per update: kept sizes of its target masks, and min / median / max density per type."""
    model = config_lib.load(run_dir / "config.yaml").model
    base = model_shape(model.path, model.trust_remote_code)
    lines = ["| step | kept hidden / heads / neurons per layer | query head: min / median / max | "
             "MLP neuron: min / median / max | hidden channel: min / median / max |",
             "|---:|---|---|---|---|"]
    for path in sorted((run_dir / "finetune" / "updates").glob("step*.safetensors")):
        tensors = load_file(str(path))
        per_type = densities(update_shape(base, tensors), tensors)
        kept = (f"{int(tensors['target.hidden_mask'].sum())} / {int(tensors['target.head_mask'][0].sum())} / "
                f"{int(tensors['target.neuron_mask'][0].sum())}")
        cells = [" / ".join(f"{value:.3g}" for value in (d.min(), d.median(), d.max())) for d in per_type.values()]
        lines.append(f"| {int(path.stem.removeprefix('step'))} | {kept} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a study APT run directory, e.g. bench/out/study/apt-30")
    print(table(parser.parse_args(argv).run_dir))


if __name__ == "__main__":
    main()
