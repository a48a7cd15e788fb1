"""Compaction of a DeepSpeed engine under ZeRO-2 and ZeRO-3 with 2 gloo ranks: the logits right after equal those
right before, the adapters' Adam moments follow their kept elements, and training goes on with a falling loss.

One spawn runs both stages (a launch costs most of the time) and writes its measurements; the tests check them.
"""

import contextlib
import math
import weakref

import pytest
import torch
from engine_harness import batch, logits, measure_each_stage, new_engine, replica_diff, tiny_llama, train_step

pytestmark = pytest.mark.dist

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
TIED = {"zero2": False, "zero3": True}
STEPS_AFTER = 6
ATTENTION_MODE = "kv_group"


def masks_with_dead_blocks(shape):
    """(masks, target): a dead KV group per layer, dead neurons (more in layer 0), dead hidden channels, and units
    still stepping down (mask 0.5, target 0) or kept at a fractional value."""
    from pipeline.apt.masks import MaskSet

    target = MaskSet.ones(shape)
    target.kv_mask[0, 1] = target.kv_mask[1, 0] = 0
    target.head_mask[0, 2:] = target.head_mask[1, :2] = 0
    target.neuron_mask[0, :40] = target.neuron_mask[1, 64:96] = 0
    target.hidden_mask[8:24] = 0
    masks = MaskSet(**{name: tensor.clone() for name, tensor in target.to_dict().items()})
    masks.neuron_mask[1, 90:96] = 0.5  # not dead yet: layer 1 has 26 dead neurons, layer 0 has 40
    masks.hidden_mask[20:24] = 0.5  # 12 dead channels; 52 live ones round up to 52 (a multiple of 2 heads)
    masks.neuron_mask[:, 100] = 0.8
    return masks, target


def adamw_with_decay(lr):
    """AdamW with a decaying LR, so a schedule that restarted at the rebuild would show."""

    def make(params):
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))

    return make


def adapter_state(engine):
    """Module name of every adapter parameter -> its full fp32 value and Adam moments (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    return {name: {"param": safe_get_full_fp32_param(p).cpu(),
                   **{key: safe_get_full_optimizer_state(p, key).cpu() for key in ("exp_avg", "exp_avg_sq")}}
            for name, p in engine.module.named_parameters() if p.requires_grad}


def expected_slices(state, plan):
    """The old adapter state cut by the plan, computed from its indices (rows of B, columns of A)."""
    from pipeline.apt.slicing import layer_slices

    head_dim = plan.before.head_dim
    sliced = {}
    for name, values in state.items():
        layer = int(name.split(".")[2])  # model.layers.<i>.self_attn.q_proj.lora_A
        path = name.split(".", 3)[3].rsplit(".", 1)[0]
        rows, columns = layer_slices(plan.layers[layer], plan.hidden, head_dim)[path]
        take = (lambda t, c=columns: t[:, c]) if name.endswith("lora_A") else (lambda t, r=rows: t[r])
        sliced[name] = {key: take(value) for key, value in values.items()}
    return sliced


def physical_params(engine):
    """Frozen base parameters of the engine's model, counted at full size (ZeRO-3 keeps only partitions)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if not p.requires_grad)


def compaction(stage, ds_config, train, rank, world_size):
    """Train, compact the engine by a plan with dead blocks, train on; ZeRO-2 untied, ZeRO-3 tied embeddings."""
    from pipeline.apt.adapters import set_masks
    from pipeline.apt.blocks import ModelShape, total_params
    from pipeline.apt.compaction import plan_compaction
    from pipeline.engine import compact_engine

    make = adamw_with_decay(train.lr)
    engine = new_engine(tiny_llama(TARGETS, tie=TIED[stage]), ds_config, make)
    ids = batch(0, rank)
    for _ in range(2):  # moments and B nonzero
        train_step(engine, ids)
    shape = ModelShape.from_config(engine.module.config)
    masks, target = masks_with_dead_blocks(shape)
    set_masks(engine.module, masks)
    plan = plan_compaction(masks, target, shape, ATTENTION_MODE)

    before = logits(engine)
    loss_before = train_step(engine, ids)  # the step that compaction follows
    before_after_step, old_state, lr = logits(engine), adapter_state(engine), engine.get_lr()
    with watch_rebuild(engine) as rebuild:
        engine = compact_engine(engine, plan, ds_config, make)
    new_state = adapter_state(engine)
    expected = expected_slices(old_state, plan)
    result = {
        "sizes": plan.summary(),
        "shape_matches_plan": ModelShape.from_config(engine.module.config) == plan.after,
        "physical_params": physical_params(engine),
        "planned_params": total_params(plan.after),
        "logits_diff": (logits(engine) - before_after_step).abs().max().item(),
        "logits_moved_by_the_step": (before_after_step - before).abs().max().item(),
        "state_diff": max((new_state[n][k] - expected[n][k]).abs().max().item() for n in expected for k in
                          expected[n]),
        "shapes_match": all(new_state[n][k].shape == expected[n][k].shape for n in expected for k in expected[n]),
        "exp_avg_norm": sum(v["exp_avg"].abs().sum().item() for v in new_state.values()),
        "lr": [lr, engine.get_lr()],
        "global_steps": engine.global_steps,
        "losses": [loss_before] + [train_step(engine, ids) for _ in range(STEPS_AFTER)],
        "replica_diff": replica_diff(engine),
        **rebuild,
    }
    engine.destroy()
    return result


@contextlib.contextmanager
def watch_rebuild(engine):
    """What holds memory at the moment the new engine is built: the old optimizer, whole (unpartitioned) frozen
    weights."""
    import deepspeed

    old_optimizer, seen, initialize = weakref.ref(engine.optimizer), {}, deepspeed.initialize

    def spy(model, **kwargs):
        # Freed, or (ZeRO-3, see engine._release) an empty object that holds nothing.
        seen["old_optimizer_freed"] = old_optimizer() is None or not vars(old_optimizer())
        seen["whole_weights"] = sum(p.numel() for p in model.parameters() if not hasattr(p, "ds_id")
                                    and not p.requires_grad)  # the adapters: small, the new engine partitions them
        return initialize(model=model, **kwargs)

    deepspeed.initialize = spy
    try:
        yield seen
    finally:
        deepspeed.initialize = initialize


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Both ranks' compaction results by stage, from one spawn."""
    return measure_each_stage(tmp_path_factory, compaction, micro_batch_size=2, precision="fp32", lr=5e-3,
                              warmup_steps=1, steps=20, weight_decay=0.0)


def test_compaction_cuts_the_planned_blocks(results):
    for result in results:
        sizes = result["sizes"]
        assert (sizes["kv_heads_before"], sizes["kv_heads_after"]) == (2, 1)
        assert (sizes["neurons_before"], sizes["neurons_after"]) == (128, 102)  # the fewer dead of the two layers
        assert (sizes["hidden_before"], sizes["hidden_after"]) == (64, 52)
        assert result["shape_matches_plan"]
        assert result["physical_params"] == result["planned_params"] == sizes["params_after"]


def test_logits_right_after_compaction_equal_those_right_before(results):
    for result in results:
        assert result["logits_diff"] <= 1e-5
        assert result["logits_moved_by_the_step"] > 1e-3  # the comparison is after the last step, not a stale one


def test_adapter_weights_and_adam_moments_follow_their_kept_elements(results):
    for result in results:
        assert result["shapes_match"]
        assert result["state_diff"] == 0.0
        assert result["exp_avg_norm"] > 0
        assert result["lr"][0] == result["lr"][1]
        assert result["global_steps"] == 3


@pytest.mark.device
def test_the_new_engine_is_built_after_the_old_one_let_go(measured):
    """The old optimizer's memory is free, and under ZeRO-3 every sliced weight already partitioned (layer by
    layer as it was sliced), when the new engine allocates its own: a rebuild does not double memory."""
    for by_stage in measured:
        assert by_stage["zero2"]["old_optimizer_freed"]
        assert by_stage["zero3"]["whole_weights"] == 0
        assert by_stage["zero3"]["old_optimizer_freed"]


def test_training_goes_on_with_a_falling_loss(results):
    for result in results:
        losses = result["losses"]
        assert all(math.isfinite(loss) for loss in losses)
        assert losses[-1] < losses[1] < losses[0]
        assert result["replica_diff"] == 0.0
