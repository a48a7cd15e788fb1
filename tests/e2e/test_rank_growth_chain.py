"""Rank growth on (the default): the whole chain reads the grown adapters, and the export computes the trained model.

Issue 14: the salience stage injected adapters at `apt.rank` and refused the grown shapes in finetune's adapters file.
"""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from unit.builders import logits

from pipeline import run as driver
from pipeline.apt.adapters import inject_adapters, named_adapters, set_masks
from pipeline.apt.masks import MaskSet
from pipeline.layout import RunLayout
from pipeline.model_io import build_config, load_adapters

from harness import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SHORT = ["data.seq_len=64", "train.steps=20", "pruning.end_step=10", "train.checkpoint_every=10",
         "train.eval_batches=2", "salience.batches=2", "export.dtype=float32"]
"""Growth (apt.grow_every=10 by default) at step 10 and 20; the grown ranks train for the last 10 steps."""


def masked_adapted_model(cfg):
    """The fine-tuned model as the later stages see it: tuned base, adapters at their grown ranks, final masks."""
    layout, apt = RunLayout(cfg.run_dir, cfg.model), cfg.apt
    model = AutoModelForCausalLM.from_pretrained(str(layout.tuned_base), dtype=torch.float32).eval()
    inject_adapters(model, targets=apt.adapter_targets, rank=apt.rank, alpha=apt.alpha)
    load_adapters(model, layout.adapters, max_rank=apt.max_rank_multiplier * apt.rank)
    set_masks(model, MaskSet.from_dict(load_file(str(layout.final_masks))))
    return model


@pytest.mark.parametrize("zero", [2, 3])
def test_the_chain_reads_grown_adapters_and_the_export_equals_the_trained_model(zero, tmp_path, tiny_config):
    overrides = [*SHORT, f"deepspeed.master_port={free_port()}", f"deepspeed.config=ds_configs/zero{zero}_cpu.json"]
    if zero == 3:  # refused at start-up with distillation (docs/design.md §5)
        overrides.append("apt.distill=false")
    if zero == 3:  # a user checkpoint, loaded partitioned
        model_dir = tmp_path / "user_model"
        model_cfg = tiny_config().model
        torch.manual_seed(1)
        AutoModelForCausalLM.from_config(build_config(model_cfg, 512)).save_pretrained(str(model_dir))
        overrides.append(f"model.path={model_dir}")
    cfg = tiny_config(*overrides)
    assert cfg.apt.grow_every > 0  # growth is on by default

    driver.run_pipeline(cfg)

    run_dir = cfg.run_dir
    for stage in ("finetune", "salience", "finalize", "merge", "eval"):
        assert (run_dir / stage / "manifest.json").is_file(), stage
    adapters = load_file(str(run_dir / "finetune" / "adapters.safetensors"))
    ranks = {name: tensor.shape[0] for name, tensor in adapters.items() if name.endswith("lora_A")}
    assert max(ranks.values()) > cfg.apt.rank, ranks  # the adapters really grew
    assert min(ranks.values()) >= cfg.apt.rank

    model = masked_adapted_model(cfg)
    assert {f"{name}.lora_A": adapter.rank for name, adapter in named_adapters(model)} == ranks
    input_ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    exported = AutoModelForCausalLM.from_pretrained(str(run_dir / "merge" / "model"), dtype=torch.float32).eval()
    torch.testing.assert_close(logits(exported, input_ids), logits(model, input_ids), rtol=0, atol=1e-4)
