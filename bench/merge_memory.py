"""Peak memory of the merge stage's export against the size of the model it exports.

The export streams base weights tensor by tensor and writes one shard per layer, so its peak memory
should track one layer (plus the interpreter and libraries), not the model. Each measurement runs in a
fresh child process, so its peak RSS is its own.

    .venv/bin/python bench/merge_memory.py --hidden 1024 --layers 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import sys, torch
from pathlib import Path
from safetensors.torch import load_file
from pipeline.apt.masks import MaskSet
from pipeline.export import export_pruned

def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])  # KiB

work = Path(sys.argv[1])
masks = MaskSet.from_dict(load_file(str(work / "masks.safetensors")))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS: imports excluded
before = status("VmRSS:")
export_pruned(base_dir=work / "base", adapters_path=work / "adapters.safetensors", masks=masks,
              scaling=2.0, dtype=torch.float32, out_dir=work / "export")
print(before, status("VmHWM:"))
"""


def prepare(work: Path, args) -> dict:
    """Save a random base model, trained-looking adapters and 50% masks; return sizes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.apt.adapters import inject_adapters
    from pipeline.apt.blocks import ModelShape
    from pipeline.apt.search import search_masks

    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=16,
                         num_key_value_heads=4, intermediate_size=args.intermediate, vocab_size=args.vocab)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(work / "base"))
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    shape = ModelShape.from_config(config)
    inject_adapters(model, targets=["q_proj", "v_proj", "up_proj", "down_proj"], rank=8, alpha=16.0)
    save_file({n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
              str(work / "adapters.safetensors"))
    generator = torch.Generator().manual_seed(0)
    scores = {"head": torch.rand(shape.num_layers, shape.num_heads, generator=generator),
              "neuron": torch.rand(shape.num_layers, shape.intermediate_size, generator=generator),
              "hidden": torch.rand(shape.hidden_size, generator=generator)}
    masks = search_masks(shape, scores, 0.5, layout="uniform", round_to=8, min_hidden=64)
    save_file(masks.to_dict(), str(work / "masks.safetensors"))
    model_bytes = sum(p.stat().st_size for p in (work / "base").glob("*.safetensors"))
    return {"model_MB": model_bytes / 2**20, "one_layer_MB": layer_bytes / 2**20}


def export_memory_mb(work: Path) -> tuple[float, float]:
    """(RSS before the export, peak RSS during it) of a fresh child process, in MB."""
    result = subprocess.run([sys.executable, "-c", CHILD, str(work)], check=True, capture_output=True, text=True)
    before, peak = map(int, result.stdout.strip().splitlines()[-1].split())
    return before / 1024, peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=8000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sizes = prepare(work, args)
        before, peak = export_memory_mb(work)
    grown = peak - before
    result = {**sizes, "rss_before_export_MB": before, "peak_during_export_MB": peak, "export_growth_MB": grown}
    print(json.dumps({k: round(v, 1) for k, v in result.items()}, indent=2))
    print(f"the export's peak is {grown:.0f} MB above its starting RSS for a {sizes['model_MB']:.0f} MB model "
          f"({grown / sizes['model_MB']:.2f}x the model; one layer is {sizes['one_layer_MB']:.0f} MB)")


if __name__ == "__main__":
    main()
