import pytest

from pipeline.config import TrainSection
from pipeline.ds_config import fill_ds_config, load_ds_config, zero_stage


@pytest.mark.parametrize("name", ["zero2_cpu", "zero3_cpu", "zero2_bf16", "zero3_bf16", "zero3_offload_bf16"])
def test_templates_fill_from_the_run_config(name):
    train = TrainSection(micro_batch_size=3, grad_accum=2, precision="bf16", grad_clip=0.5)
    config = load_ds_config(f"ds_configs/{name}.json", train, world_size=4)
    assert config["train_batch_size"] == 3 * 2 * 4
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert zero_stage(config) in (2, 3)
    assert "auto" not in str(config)


def test_hard_coded_conflict_is_refused():
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu is 8"):
        fill_ds_config({"train_micro_batch_size_per_gpu": 8}, TrainSection(micro_batch_size=4), world_size=1)
