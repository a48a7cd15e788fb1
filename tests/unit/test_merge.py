"""The export: merged, sliced weights that plain transformers loads, with the masked model's logits."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from pipeline import hetero
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
            # The last position again, decoded from the KV cache of the others: the cache's positions must hold.
            cache = model(ids[:, :-1], use_cache=True).cache
            step = model(ids[:, -1:], cache=cache, use_cache=True).logits[:, -1]
        cached, uncached = (model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, use_cache=use_cache)
                            for use_cache in (True, False))
        assert "pipeline" not in sys.modules
        torch.save({"logits": logits, "step": step, "params": sum(p.numel() for p in model.parameters()),
                    "cached": cached, "uncached": uncached, "model_type": model.config.model_type,
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
    # Layer 0 without attention: its KV cache slot would stay empty were the attentions not renumbered.
    "llama-per_layer-sublayers": dict(arch="llama", num_kv_heads=2, mode="kv_group", layout="per_layer",
                                      cut_attention=0, cut_mlp=2),
    "qwen2-bias-per_layer-no-attention": dict(arch="qwen2", num_kv_heads=2, mode="kv_group", layout="per_layer",
                                              cut_attention=1),
    "mistral-per_layer-no-mlp": dict(arch="mistral", num_kv_heads=2, mode="query_in_group", layout="per_layer",
                                     cut_mlp=0),
}


def export_case(case: str, folder, input_ids, tiny_model) -> dict:
    """Export a 3-layer model of `case` with trained-looking adapters pruned to half; what the loader must see."""
    spec = dict(CASES[case])
    mode, layout, removed = spec.pop("mode"), spec.pop("layout", "uniform"), spec.pop("remove_layer", None)
    cut_attention, cut_mlp = spec.pop("cut_attention", None), spec.pop("cut_mlp", None)
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
    if cut_attention is not None:  # every query and KV head: the attention and its input norm leave the export
        masks.head_mask[cut_attention] = masks.kv_mask[cut_attention] = 0
    if cut_mlp is not None:
        masks.neuron_mask[cut_mlp] = 0
    masks.check_gqa(shape, mode)
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
    torch.testing.assert_close(result["step"], made["expected"][:, -1], rtol=0, atol=1e-5)
    assert result["params"] == summary["params"] == remaining_params(made["shape"], kept_sizes(masks))
    assert result["cached"].shape[1] == 4 + 5 and result["layers"] == made["layers"]
    assert torch.equal(result["cached"], result["uncached"])
    assert summary["per_layer"] == (layout == "per_layer")  # the scores above give unequal layers
    if layout == "per_layer":
        kept = kept_sizes(masks)
        assert len(set(kept.heads)) > 1 and len(set(kept.neurons)) > 1
    assert result["model_type"] == (f"apt_{made['arch']}" if layout == "per_layer" else made["arch"])
    assert (made["folder"] / "export" / MODELING_FILE).is_file() == (layout == "per_layer")


def test_a_cut_sublayer_leaves_no_weights_and_loads_with_the_registered_classes(exported):
    made = exported["llama-per_layer-sublayers"]
    folder = made["folder"] / "export"
    config = json.loads((folder / "config.json").read_text())
    weights = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert not [name for name in weights if name.startswith(("model.layers.0.self_attn.",
                                                              "model.layers.0.input_layernorm.",
                                                              "model.layers.2.mlp.",
                                                              "model.layers.2.post_attention_layernorm."))]
    layers = {int(index): sizes for index, sizes in config["per_layer_config"].items()}
    assert layers[0]["num_attention_heads"] == layers[0]["num_key_value_heads"] == 0
    assert layers[2]["intermediate_size"] == 0
    kept = kept_sizes(made["masks"])  # the global sizes: layer 1's heads (the first attention), layer 0's neurons
    assert (config["num_attention_heads"], config["intermediate_size"]) == (kept.heads[1], kept.neurons[0])
    assert made["summary"]["num_attention_heads"] == kept.heads[1]

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()  # `import pipeline` did
    assert type(model) is hetero.AptLlamaForCausalLM
    with torch.no_grad():
        input_ids = torch.load(made["folder"] / "input_ids.pt", weights_only=True)
        torch.testing.assert_close(model(input_ids).logits, made["expected"], rtol=0, atol=1e-5)
    assert isinstance(model.model.layers[0].self_attn, hetero.CutAttention)
    assert [layer.self_attn.layer_idx for layer in model.model.layers[1:]] == [0, 1]
    # A static cache sized up front would give the renumbered attentions the layers' KV head counts.
    prompt = input_ids[:1, :4]
    static = model.generate(prompt, max_new_tokens=5, do_sample=False, cache_implementation="static",
                            prefill_chunk_size=2)
    assert torch.equal(static, made["result"]["uncached"])


def test_a_cut_attention_is_0_query_and_0_kv_heads_and_needs_one_cache_type_in_every_layer():
    sizes = dict(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8)
    with pytest.raises(Exception, match="positive multiple of num_key_value_heads \\(1\\), or both 0"):
        hetero.AptLlamaConfig(**sizes, per_layer_config={1: {"num_attention_heads": 0}})
    config = hetero.AptQwen2Config(**sizes, use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                   per_layer_config={0: {"num_attention_heads": 0, "num_key_value_heads": 0}})
    with pytest.raises(ValueError, match="mix attention types"):
        hetero.AptQwen2ForCausalLM(config)
    config.layer_types = ["sliding_attention"] * 2
    assert isinstance(hetero.AptQwen2ForCausalLM(config).model.layers[0].self_attn, hetero.CutAttention)


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


def test_a_cut_sublayer_with_a_bias_or_every_attention_cut_is_refused_before_writing(export_inputs, tiny_model):
    masks = export_inputs["masks"]
    masks.head_mask[:] = masks.kv_mask[:] = 0
    with pytest.raises(ValueError, match="every layer's attention is cut"):
        export_pruned(**export_inputs)
    biased = tiny_model(attention_bias=True)  # LLaMA's o_proj bias adds to the residual stream with no head kept
    biased.save_pretrained(str(export_inputs["base_dir"]))
    masks.head_mask[0] = masks.kv_mask[0] = 1
    with pytest.raises(ValueError, match="layer 1's attention is masked whole but its self_attn.o_proj bias"):
        export_pruned(**export_inputs)
    assert not export_inputs["out_dir"].exists()
