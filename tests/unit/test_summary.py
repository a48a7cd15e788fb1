"""The eval stage's interleaved speed-up and the driver's end-of-run summary."""

import json

import pytest
import torch

from pipeline.evaluation import interleaved_speedup, model_sizes
from pipeline.export import heterogeneous_config
from pipeline.layout import RunLayout
from pipeline.summary import describe_shape, describe_speed, run_summary


def test_interleaved_speedup_pairs_rounds_and_reports_spread(tiny_model):
    base = tiny_model(num_layers=2, intermediate_size=96)
    pruned = tiny_model(num_layers=1, intermediate_size=32)
    prompts = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(0))
    speed = interleaved_speedup(base, pruned, prompts, new_tokens=3, rounds=3, max_spread=10.0)
    assert len(speed["ratios"]) == 3 and speed["rounds"] == 3 and speed["threads"] >= 1
    assert speed["speedup"] == sorted(speed["ratios"])[1]
    assert speed["reliable"] and speed["spread"] >= 0


@pytest.mark.parametrize("reliable", [True, False])
def test_speed_is_a_result_only_when_the_spread_allows(reliable):
    speed = {"speedup": 1.5, "spread": 0.05 if reliable else 0.6, "reliable": reliable, "rounds": 7, "threads": 1}
    text = describe_speed(speed)
    assert text.startswith("x1.50 generation") if reliable else text.startswith("not measured reliably")


def test_summary_names_sizes_scores_speed_and_how_to_load(tmp_path):
    layout = RunLayout(tmp_path)
    shape = {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 352, "per_layer": False}
    lm_eval = {"apt_heldout": {"bits_per_byte": 2.5}}
    metrics = {"base": {"params": 1000, "shape": shape, "val_perplexity": 16.0, "lm_eval": lm_eval},
               "pruned": {"params": 500, "shape": shape | {"hidden": 96}, "val_perplexity": 19.0,
                          "lm_eval": {"apt_heldout": {"bits_per_byte": 2.75}}},
               "params_ratio": 0.5, "speed": {"speedup": 1.4, "spread": 0.1, "reliable": True, "rounds": 7,
                                              "threads": 2}}
    assert run_summary(tmp_path, "base-dir") is None
    layout.eval_metrics.parent.mkdir(parents=True)
    layout.eval_metrics.write_text(json.dumps(metrics))
    text = run_summary(tmp_path, "base-dir")
    for expected in ("1,000 -> 500 (x0.500)", "hidden 128 / 4 heads (2 KV) / 352 neurons x 4 layers -> hidden 96",
                     "16.00 -> 19.00 (x1.19)", "bits_per_byte 2.5 -> 2.75", "x1.40 generation",
                     f'AutoModelForCausalLM.from_pretrained("{layout.export}")'):
        assert expected in text, (expected, text)
    metrics["pruned"]["shape"]["per_layer"] = True  # its modeling code travels in the export
    layout.eval_metrics.write_text(json.dumps(metrics))
    assert f'from_pretrained("{layout.export}", trust_remote_code=True)' in run_summary(tmp_path, "base-dir")


def test_the_shape_of_a_per_layer_export_is_read_per_layer(tiny_model):
    config = tiny_model(num_layers=3).config
    hetero = heterogeneous_config(config, {1: {"intermediate_size": 32, "num_attention_heads": 2},
                                           2: {"num_attention_heads": 0, "num_key_value_heads": 0}})
    shape = model_sizes(hetero)
    assert shape == {"hidden": 64, "layers": 3, "heads": [4, 2, 0], "kv_heads": [2, 2, 0], "intermediate": [96, 32, 96],
                     "per_layer": True}
    assert "[4, 2, 0] heads ([2, 2, 0] KV) / [96, 32, 96] neurons x 3 layers, per layer" in describe_shape(shape)
    assert model_sizes(config)["per_layer"] is False
