"""What the DeepSpeed engine tests share: a tiny adapted LLaMA, per-rank data, and one spawn of 2 gloo ranks that
runs a scenario under each ZeRO stage and writes its measurements."""

import json

import torch

from harness import spawn

STAGES = ("zero2", "zero3")


def tiny_llama(targets, *, rank=4, alpha=8.0, tie=False, seed=0):
    """A 2-layer GQA LLaMA at torch's default init from `seed`, with APT adapters on `targets`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.apt.adapters import inject_adapters

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    return inject_adapters(model, targets=targets, rank=rank, alpha=alpha, generator=generator)


def new_engine(model, ds_config, make):
    """A DeepSpeed engine training `model`'s trainable parameters with `make`'s optimizer and scheduler."""
    import deepspeed

    optimizer, scheduler = make([p for p in model.parameters() if p.requires_grad])
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def batch(step, rank):
    """Each rank its own data, the same for a given step in every run."""
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1000 * step + rank))


def train_step(engine, ids):
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


@torch.no_grad()
def logits(engine):
    return engine(input_ids=batch(99, 0)).logits.float()


def full_adapters(engine):
    """Module name of every adapter parameter -> a copy of its full fp32 value (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = engine.module.named_parameters()
    return {name: safe_get_full_fp32_param(p).clone() for name, p in params if p.requires_grad}


def replica_diff(engine):
    """The largest difference between any rank's adapter values and rank 0's (collective)."""
    flat = torch.cat([t.flatten() for t in full_adapters(engine).values()])
    gathered = [torch.zeros_like(flat) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, flat)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def run_each_stage(rank, world_size, out_dir, train_options, scenario):
    """One rank's part: `scenario(stage, ds_config, train, rank, world_size)` under each stage, in the same process;
    the results by stage go to rank<rank>.json."""
    import deepspeed

    from pipeline.config import TrainSection
    from pipeline.ds_config import load_ds_config

    deepspeed.init_distributed(dist_backend="gloo")
    train = TrainSection(**train_options)
    results = {}
    for stage in STAGES:
        ds_config = load_ds_config(f"ds_configs/{stage}_cpu.json", train, world_size)
        results[stage] = scenario(stage, ds_config, train, rank, world_size)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))


def measure_each_stage(tmp_path_factory, scenario, **train_options):
    """Both ranks' results by stage, from one spawn of 2 gloo ranks (a launch costs most of the time)."""
    out_dir = tmp_path_factory.mktemp(scenario.__name__)
    spawn(run_each_stage, 2, out_dir, train_options, scenario)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
