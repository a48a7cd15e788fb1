"""A checkpoint loaded under ZeRO-3 on 2 real gloo ranks: partitioned as it loads, read in the dtype ZeRO-3 keeps,
with the checkpoint's values. At 1.1 B parameters the shards were first read in fp32 (a 2 GB copy of each 1 GB
shard on the reading rank, bench/scale); they are read in bf16 now."""

import json

import pytest
import torch

from harness import spawn

pytestmark = pytest.mark.dist


def load_partitioned(rank, world_size, model_dir, out_dir):
    import deepspeed
    from safetensors.torch import load_file

    from pipeline import dist, model_io
    from pipeline.config import ModelSection, TrainSection
    from pipeline.ds_config import load_ds_config

    dist.init_distributed(5.0)
    read_as = []
    from_pretrained = model_io.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):  # records the dtype the shards are read in, then loads as usual
        read_as.append(str(kwargs["dtype"]))
        return from_pretrained(*args, **kwargs)

    model_io.AutoModelForCausalLM.from_pretrained = spy
    train = TrainSection(micro_batch_size=1, precision="bf16")
    ds_config = load_ds_config("ds_configs/zero3_cpu.json", train, world_size)
    model = model_io.load_base_model(model_dir, ModelSection(path=str(model_dir)), ds_config)
    params = dict(model.named_parameters())
    partitioned = all(p.ds_tensor.numel() <= -(-p.ds_numel // world_size) for p in params.values())
    expected = load_file(str(model_dir / "model.safetensors"))
    with deepspeed.zero.GatheredParameters(list(params.values())):
        differences = {name: (p.detach() != expected[name]).sum().item() for name, p in params.items()}
        dtypes = sorted({str(p.dtype) for p in params.values()})
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"read_as": read_as, "partitioned": partitioned,
                                                          "differences": differences, "dtypes": dtypes}))


def test_zero3_reads_a_checkpoint_partitioned_in_bf16_with_its_values(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(tmp_path / "model"))

    spawn(load_partitioned, 2, tmp_path / "model", tmp_path)

    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["read_as"] == ["torch.bfloat16"]
        assert result["partitioned"]
        assert result["dtypes"] == ["torch.bfloat16"]
        assert set(result["differences"].values()) == {0}, result["differences"]
