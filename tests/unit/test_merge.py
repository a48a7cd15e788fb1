"""The export: merged, sliced weights that plain transformers loads, with the masked model's logits."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from pipeline.apt.adapters import inject_adapters, set_masks
from pipeline.apt.blocks import ModelShape, kept_sizes, remaining_params
from pipeline.apt.search import search_masks
from pipeline.export import MODELING_FILE, export_pruned

LOAD_WITH_TRANSFORMERS_ONLY = textwrap.dedent("""
    import importlib.util, json, sys
    # The project is installed editable (a finder class on sys.meta_path): drop it, so that only transformers is here.
    sys.meta_path = [finder for finder in sys.meta_path if not finder.__module__.startswith("__editable__")]
    assert importlib.util.find_spec("pipeline") is None
    import torch
    from transformers import AutoModelForCausalLM
    for folder, per_layer in json.loads(sys.argv[1]):
        # A per-layer export carries its modeling code (remote code, read from the folder itself); a uniform one is
        # a family's own model.
        model = AutoModelForCausalLM.from_pretrained(folder + "/export", dtype=torch.float32,
                                                     trust_remote_code=per_layer).eval()
        ids = torch.load(folder + "/input_ids.pt")
        with torch.no_grad():
            logits = model(ids).logits
        generated = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
        assert "pipeline" not in sys.modules
        torch.save({"logits": logits, "params": sum(p.numel() for p in model.parameters()),
                    "generated": generated.shape[1], "model_type": model.config.model_type,
                    "layers": model.config.num_hidden_layers}, folder + "/result.pt")
""")
"""Loads each folder's export in a fresh process that has transformers and cannot import the pipeline."""

CASES = {
    "llama-gqa-kv_group": dict(arch="llama", num_kv_heads=2, mode="kv_group"),
    "llama-gqa-query_in_group": dict(arch="llama", num_kv_heads=2, mode="query_in_group"),
    "llama-mha-tied": dict(arch="llama", num_kv_heads=4, tie=True, mode="kv_group"),
    "qwen2-bias": dict(arch="qwen2", num_kv_heads=2, mode="kv_group"),
    "llama-per_layer-kv_group": dict(arch="llama", num_kv_heads=2, mode="kv_group", layout="per_layer"),
    "llama-per_layer-query_in_group": dict(arch="llama", num_kv_heads=2, mode="query_in_group",
                                           layout="per_layer"),
    "mistral-per_layer-query_in_group": dict(arch="mistral", num_kv_heads=2, mode="query_in_group",
                                             layout="per_layer"),
    "qwen2-bias-per_layer-kv_group": dict(arch="qwen2", num_kv_heads=2, mode="kv_group", layout="per_layer"),
    "mistral-depth": dict(arch="mistral", num_kv_heads=2, mode="query_in_group", remove_layer=1),
    "qwen2-bias-per_layer-depth": dict(arch="qwen2", num_kv_heads=2, mode="kv_group", layout="per_layer",
                                       remove_layer=2),
}


def export_case(case: str, folder, input_ids, tiny_model) -> dict:
    """Export a 3-layer model of `case` with trained-looking adapters pruned to half; what the loader must see."""
    spec = dict(CASES[case])
    mode, layout, removed = spec.pop("mode"), spec.pop("layout", "uniform"), spec.pop("remove_layer", None)
    model = tiny_model(**spec, num_layers=3)
    model.save_pretrained(str(folder / "base"))
    shape = ModelShape.from_config(model.config)

    inject_adapters(model, targets=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], rank=4, alpha=8.0,
                    generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # trained-looking adapters: B is no longer zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    adapters = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    save_file(adapters, str(folder / "adapters.safetensors"))

    scores = {"head": torch.rand(shape.num_layers, shape.num_heads, generator=generator),
              "neuron": torch.rand(shape.num_layers, shape.intermediate_size, generator=generator),
              "hidden": torch.rand(shape.hidden_size, generator=generator)}
    if layout == "per_layer":  # layer 0's heads rank first: it keeps more (KV) heads than the others, not only neurons
        scores["head"][0] += 1.0
    masks = search_masks(shape, scores, 0.5, attention_mode=mode, layout=layout, round_to=1, min_hidden=8)
    if removed is not None:  # the whole layer: it leaves the export, the rest renumbered
        for row in (masks.head_mask, masks.kv_mask, masks.neuron_mask):
            row[removed] = 0
    set_masks(model, masks)
    with torch.no_grad():
        expected = model(input_ids).logits
    summary = export_pruned(base_dir=folder / "base", adapters_path=folder / "adapters.safetensors", masks=masks,
                            scaling=8.0 / 4, dtype=torch.float32, out_dir=folder / "export")
    torch.save(input_ids, folder / "input_ids.pt")
    return {"expected": expected, "summary": summary, "shape": shape, "masks": masks, "layout": layout,
            "arch": spec["arch"], "layers": shape.num_layers - (removed is not None)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model) -> dict[str, dict]:
    """Every case exported, then loaded in one fresh process with transformers and without the pipeline (a
    process start costs seconds; eight would cost a minute)."""
    input_ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    cases = {}
    for case in CASES:
        folder = tmp_path_factory.mktemp(case)
        cases[case] = export_case(case, folder, input_ids, tiny_model) | {"folder": folder}
    folders = [(str(made["folder"]), made["layout"] == "per_layer") for made in cases.values()]
    subprocess.run([sys.executable, "-c", LOAD_WITH_TRANSFORMERS_ONLY, json.dumps(folders)], check=True,
                   cwd=tmp_path_factory.getbasetemp())
    for made in cases.values():
        made["result"] = torch.load(made["folder"] / "result.pt", weights_only=True)
    return cases


@pytest.mark.parametrize("case", CASES)
def test_export_loads_in_plain_transformers_with_masked_logits(case, exported):
    made = exported[case]
    result, summary, masks, layout = made["result"], made["summary"], made["masks"], made["layout"]
    torch.testing.assert_close(result["logits"], made["expected"], rtol=0, atol=1e-5)
    assert result["params"] == summary["params"] == remaining_params(made["shape"], kept_sizes(masks))
    assert result["generated"] == 4 + 5 and result["layers"] == made["layers"]
    assert summary["per_layer"] == (layout == "per_layer")  # the scores above give unequal layers
    if layout == "per_layer":
        kept = kept_sizes(masks)
        assert len(set(kept.heads)) > 1 and len(set(kept.neurons)) > 1
    assert result["model_type"] == (f"apt_{made['arch']}" if layout == "per_layer" else made["arch"])
    assert (made["folder"] / "export" / MODELING_FILE).is_file() == (layout == "per_layer")


@pytest.fixture
def export_inputs(tmp_path, tiny_model):
    """A saved tiny base, an empty adapter file and all-ones masks: a valid export to break one piece of."""
    from pipeline.apt.masks import MaskSet

    model = tiny_model()
    model.save_pretrained(str(tmp_path / "base"))
    save_file({}, str(tmp_path / "adapters.safetensors"))
    masks = MaskSet.ones(ModelShape.from_config(model.config))
    return dict(base_dir=tmp_path / "base", adapters_path=tmp_path / "adapters.safetensors", masks=masks,
                scaling=1.0, dtype=torch.float32, out_dir=tmp_path / "export")


def test_corrupt_base_checkpoint_is_refused_before_writing(export_inputs):
    weights = export_inputs["base_dir"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        export_pruned(**export_inputs)
    assert not export_inputs["out_dir"].exists()


def test_missing_adapters_are_refused_before_writing(export_inputs):
    export_inputs["adapters_path"].unlink()
    with pytest.raises(FileNotFoundError, match="run the finetune stage first"):
        export_pruned(**export_inputs)
    assert not export_inputs["out_dir"].exists()


def test_masks_that_break_gqa_are_refused_before_writing(export_inputs):
    export_inputs["masks"].kv_mask[0, 0] = 0  # query heads 0 and 1 would lose their KV head
    with pytest.raises(ValueError, match="KV head is pruned"):
        export_pruned(**export_inputs)
    assert not export_inputs["out_dir"].exists()


def test_export_refuses_fractional_masks(export_inputs):
    export_inputs["masks"].neuron_mask[0, 3] = 0.5
    with pytest.raises(ValueError, match="not binary"):
        export_pruned(**export_inputs)
    assert not export_inputs["out_dir"].exists()
