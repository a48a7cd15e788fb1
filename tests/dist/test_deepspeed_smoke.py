"""The DeepSpeed CPU harness later issues build on: 2 gloo ranks, ZeRO-2/3, a real engine step."""

import json

import pytest
import torch

from harness import spawn

pytestmark = pytest.mark.dist


def train_two_steps(rank, world_size, template, precision, out_dir):
    import deepspeed
    import torch.distributed as dist

    from pipeline.config import TrainSection
    from pipeline.ds_config import load_ds_config

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    train = TrainSection(micro_batch_size=4, precision=precision, lr=0.1)
    ds_config = load_ds_config(template, train, world_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=train.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    losses = []
    for _ in range(2):
        x = torch.randn(4, 16, generator=generator).to(dtype)
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        flat = torch.cat([p.detach().float().flatten() for p in engine.module.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    (out_dir / f"rank{rank}.json").write_text(json.dumps({
        "losses": losses,
        "max_param_diff_across_ranks": max((g - gathered[0]).abs().max().item() for g in gathered),
        "numel": flat.numel(),
    }))
    engine.destroy()


@pytest.mark.parametrize("template, precision", [("ds_configs/zero2_cpu.json", "fp32"),
                                                 ("ds_configs/zero3_cpu.json", "bf16")])
def test_two_gloo_ranks_train_in_lockstep(tmp_path, template, precision):
    spawn(train_two_steps, 2, template, precision, tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["numel"] == 16 * 32 + 32 + 32 + 1
    assert results[0]["losses"] != results[1]["losses"]  # the ranks saw different data...
    for result in results:
        assert result["max_param_diff_across_ranks"] == 0.0  # ...and hold the same weights after the step
