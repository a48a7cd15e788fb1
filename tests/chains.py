"""Whole-chain helpers the e2e and dist tests share: run `apt-pipeline` on the tiny config, check what it exported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

REFERENCE = ["data.num_proc=1", "data.seq_len=64", "train.steps=30", "pruning.end_step=20",
             "train.checkpoint_every=10", "train.eval_batches=2", "train.precision=fp32", "export.dtype=float32",
             "pruning.depth=1"]
"""The reference run's settings (the `reference_run` fixture): growth at steps 10 and 20, compactions before the
step-20 checkpoint (the first takes one of the two layers out whole, `pruning.depth=1`, so the equivalences the
reference checks, resumed and two hosts, cover a model rebuilt with fewer layers), fp32 so that two hosts, two
ranks and a resumed run agree to 1e-6."""

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
"""One BLAS thread per process wherever runs are compared: the reference, the resumed runs, the pdsh hosts."""


def apt_pipeline(*args: str, env: dict | None = None, check: bool = True,
                 timeout: float = 900) -> subprocess.CompletedProcess:
    """`apt-pipeline ARGS` in a fresh process from the repository root; fails the test on a non-zero exit."""
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env or ENV,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return result


def run_config(run_dir: Path):
    """The config the driver wrote into the run directory."""
    from pipeline import config as config_lib

    return config_lib.load(run_dir / "config.yaml")


def masked_adapted_model(run_dir: Path):
    """The fine-tuned model as the later stages see it: tuned base, adapters at their grown ranks, final masks."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pipeline.apt.adapters import inject_adapters, set_masks
    from pipeline.apt.masks import MaskSet
    from pipeline.layout import RunLayout
    from pipeline.model_io import load_adapters

    cfg = run_config(run_dir)
    layout, apt = RunLayout(run_dir, cfg.model), cfg.apt
    model = AutoModelForCausalLM.from_pretrained(str(layout.tuned_base), dtype=torch.float32).eval()
    inject_adapters(model, targets=apt.adapter_targets, rank=apt.rank, alpha=apt.alpha)
    load_adapters(model, layout.adapters, max_rank=apt.max_rank_multiplier * apt.rank)
    set_masks(model, MaskSet.from_dict(load_file(str(layout.final_masks))))
    return model


def assert_export_is_the_trained_model(run_dir: Path) -> None:
    """The export loads in transformers with finalize's parameter count and computes the masked, adapted model
    (PEFT's merged-equals-unmerged check, on the whole chain); needs `export.dtype=float32`."""
    from transformers import AutoModelForCausalLM

    import pipeline  # noqa: F401  (registers the per-layer model types)

    report = json.loads((run_dir / "finalize" / "masks.json").read_text())
    exported = AutoModelForCausalLM.from_pretrained(str(run_dir / "merge" / "model"), dtype=torch.float32).eval()
    assert sum(p.numel() for p in exported.parameters()) == report["remaining_params"]
    trained = masked_adapted_model(run_dir)
    input_ids = torch.randint(0, exported.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = trained(input_ids).logits, exported(input_ids).logits
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)


def grown_ranks(run_dir: Path) -> dict[str, int]:
    """Each adapter's rank in finetune's adapters file."""
    from safetensors.torch import load_file

    adapters = load_file(str(run_dir / "finetune" / "adapters.safetensors"))
    return {name: tensor.shape[0] for name, tensor in adapters.items() if name.endswith("lora_A")}
