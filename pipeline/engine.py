"""Rebuilding a DeepSpeed engine around a reshaped model; adapter salience all ranks share (docs/design.md §5, §6b).

DeepSpeed cannot change a parameter's shape inside an engine. `rebuild_engine` reads the full fp32 weight and
optimizer moments of every trainable parameter, destroys the engine, builds a new one on the same (reshaped) module
and writes every surviving element back; the step counters and the LR schedule continue where they were. A reshape
either grows a parameter (rank growth: the old values sit inside the new one) or slices it (compaction: the new one
is a selection of the old one). ZeRO stages 1-3. Every function here is collective: call it on every rank, in the
same order.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable, Iterable

import deepspeed
import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_grad,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)
from torch import nn

from pipeline import dist
from pipeline.apt.adapters import APTLinear, grow_rank, named_adapters
from pipeline.apt.compaction import CompactionPlan, compact_model
from pipeline.apt.slicing import Selected
from pipeline.ds_config import zero_stage

Carry = dict[nn.Parameter, tuple[nn.Parameter, tuple[slice, ...] | Selected]]
"""Replaced parameter -> (its replacement, where its values go): a tuple of slices says where the old values sit
inside the larger replacement (`RankGrowth.carry()`); a `Selected` says which old elements the smaller replacement
holds (`compaction.compact_model`)."""

Reshape = Callable[[nn.Module], Carry]
"""Changes a model's shapes in place and returns the carry; runs inside `rebuild_engine`, before the old engine goes."""

MakeOptimizer = Callable[[list[nn.Parameter]], tuple[torch.optim.Optimizer, object]]
"""Trainable parameters -> (client optimizer, LR scheduler), the way the first engine was built."""

ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")
ENGINE_HOOKS = ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check")
ZERO3_BACKWARD_STATE = ("pre_bwd_fn", "post_bwd_fn", "applied_pre_backward_ref_cnt")


def rebuild_engine(engine, ds_config: dict, make_optimizer: MakeOptimizer, reshape: Reshape | None = None):
    """Destroy `engine` and return a new one on its module, carrying every trainable element's fp32 state.

    `reshape(module)` changes shapes in place and says where old values went (`grow_adapters`, or the slices of
    `compact_engine`); elements it adds, and parameters the old engine did not train, start at zero optimizer
    state. Call this at a step boundary (after `engine.step()`) and drop every reference to the old engine
    afterwards.
    """
    if not engine.zero_optimization():
        raise ValueError("rebuild_engine carries state through DeepSpeed's ZeRO optimizer; use ZeRO stage 1, 2 or 3")
    # ZeRO-3: a forward outside training (evaluation, a teacher) can leave prefetched weights gathered. Release them
    # while this engine still tracks them, before `reshape` adds parameters it does not know.
    engine.empty_partition_cache()
    model = engine.module
    carry = reshape(model) if reshape is not None else {}
    sources = {new: (old, index) for old, (new, index) in carry.items()}
    trainable = [param for param in model.parameters() if param.requires_grad]
    moments, step = _optimizer_layout(engine)
    saved = [_read_state(param, *sources.get(param, (param, None)), moments) for param in trainable]
    counters = {name: getattr(engine, name) for name in ENGINE_COUNTERS}
    scheduler_state = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    loss_scaler = engine.optimizer.loss_scaler
    engine.destroy()
    _remove_module_hooks(engine, model)
    _release(engine, [*model.parameters(), *carry])
    gc.collect()  # DeepSpeed's hooks and buffers form reference cycles; collect what destroy() unlinked
    dist.empty_cache()  # the new engine allocates in memory the old one had, not beside it

    optimizer, scheduler = make_optimizer(trainable)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    for name, value in counters.items():
        setattr(engine, name, value)
    engine.optimizer.loss_scaler = loss_scaler  # fp16: keep the dynamic scale (DeepSpeed's own resume does this)
    if scheduler_state is not None:
        _resume_schedule(engine.lr_scheduler, scheduler_state)
    if step is not None:
        _create_optimizer_state(engine.optimizer, moments, step)
    for param, state in zip(trainable, saved, strict=True):
        _write_state(param, state)
    return engine


def _write_state(param: nn.Parameter, state: dict[str, torch.Tensor]) -> None:
    """A parameter's full fp32 value and moments into the new engine. ZeRO-3 writes each rank's own partition:
    DeepSpeed 0.19's full-value setter reads past the end of a parameter whose size the ranks do not divide."""
    if not hasattr(param, "ds_id"):
        safe_set_full_fp32_param(param, state.pop("param"))
        for key, value in state.items():
            safe_set_full_optimizer_state(param, value, key)
        return
    safe_set_local_fp32_param(param, _local_partition(param, state.pop("param")))
    for key, value in state.items():
        safe_set_local_optimizer_state(param, _local_partition(param, value), key)


def _local_partition(param: nn.Parameter, value: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a full value, zero-padded at the end as DeepSpeed pads the last one."""
    size = param.ds_tensor.numel()
    start = torch.distributed.get_rank(group=param.ds_process_group) * size
    part = value.flatten()[start:start + size]
    return torch.cat([part, part.new_zeros(size - part.numel())])


def _remove_module_hooks(engine, model: nn.Module) -> None:
    """Detach from the module what `destroy()` leaves on it (DeepSpeed 0.19), so the old engine can be freed.

    The engine's own forward hooks would run the old engine's prologue on every later forward. ZeRO-3 creates its
    backward-hook functions once per module (`"pre_bwd_fn" not in module.__dict__`), bound to the first engine, so
    a new engine would prefetch through the destroyed engine's coordinator; without them it binds its own.
    """
    for name in ENGINE_HOOKS:
        handle = getattr(engine, name, None)
        if handle is not None:
            handle.remove()
    for module in model.modules():
        for name in ZERO3_BACKWARD_STATE:
            module.__dict__.pop(name, None)


def _release(engine, params: list[nn.Parameter]) -> None:
    """Drop what a destroyed engine holds beyond the module (fp32 partitions, Adam moments, gradient buckets): the
    caller's reference to the old engine, alive until the rebuild returns, then keeps only an empty shell.

    `params`: the model's parameters and those a reshape replaced; ZeRO-3 gives each a reference to its optimizer.
    The ZeRO optimizer is emptied as well: under ZeRO-3 compaction something of DeepSpeed's keeps the replaced
    weights, and through them the optimizer object, alive until the rebuild returns; empty, it holds no memory.
    """
    optimizer = engine.optimizer
    for name in ("optimizer", "basic_optimizer", "client_optimizer", "lr_scheduler", "client_lr_scheduler"):
        if name in engine.__dict__:
            engine.__dict__[name] = None
    for param in params:
        param.__dict__.pop("_z3_optimizer", None)
    optimizer.__dict__.clear()


def _optimizer_layout(engine) -> tuple[list[str], torch.Tensor | int | None]:
    """The per-element state keys (Adam: exp_avg, exp_avg_sq) and the step count; none before the first step."""
    states = list(engine.optimizer.optimizer.state.values())
    if not states:
        return [], None
    moments = [key for key, value in states[0].items() if torch.is_tensor(value) and value.dim() > 0]
    return moments, states[0]["step"]


def _read_state(param: nn.Parameter, old: nn.Parameter, index, moments: list[str]) -> dict[str, torch.Tensor]:
    """The full fp32 weight and moments `param` starts from: the old parameter's, placed at `index` inside it,
    or the `Selected` part of it."""
    weight = safe_get_full_fp32_param(old)
    if weight is None:  # the old engine did not train it: a new parameter starts from its value, zero state
        return {"param": param.detach().float().cpu(), **{key: torch.zeros(param.shape) for key in moments}}
    # CPU copies: the accelerator holds the old and the new engine at once for a moment.
    old_state = {"param": weight.cpu(), **{key: safe_get_full_optimizer_state(old, key).cpu() for key in moments}}
    if index is None:
        return old_state
    if isinstance(index, Selected):
        return {key: index.take(value) for key, value in old_state.items()}
    state = {"param": param.detach().float().cpu(), **{key: torch.zeros(param.shape) for key in moments}}
    for key, value in old_state.items():
        state[key][index] = value
    return state


def _resume_schedule(scheduler, state: dict) -> None:
    """Put a fresh scheduler at the old one's position, and its optimizer at the LR of that position."""
    scheduler.load_state_dict(state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


def _create_optimizer_state(zero_optimizer, moments: list[str], step: torch.Tensor | int) -> None:
    """Create the state torch's Adam would create at its first step, so carried values have a place to go.

    The step count is shared by every element (one flat partition per group), so new elements continue at
    `step` with zero moments, as a parameter whose gradients were zero so far would.
    """
    inner = zero_optimizer.optimizer
    # ZeRO-3 and ZeRO-1/2 name their flat fp32 partitions differently.
    flat_partitions = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
    if flat_partitions is None:
        flat_partitions = zero_optimizer.single_partition_of_fp32_groups
    for flat in flat_partitions:
        inner.state[flat] = {"step": copy.deepcopy(step), **{key: torch.zeros_like(flat) for key in moments}}
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 link each parameter's fragment to the state after the first step; link them now.
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def global_adapter_salience(adapters: Iterable[tuple[str, APTLinear]]) -> dict[str, float]:
    """Σ|θ·∂L/∂θ| per adapter from the full, rank-averaged gradient; bit-identical on every rank.

    Call it after `engine.backward` and before `engine.step` (DeepSpeed frees the reduced gradients at the step).
    Each full gradient and fp32 weight is assembled by a DeepSpeed collective, so every rank computes on the same
    tensors; with fp16 the gradients carry the loss scale, which does not change the ranking. The sums stay on the
    device and are read once, at the end.
    """
    names, totals = [], []
    for name, adapter in adapters:
        terms = [(safe_get_full_fp32_param(param) * safe_get_full_grad(param).float()).abs().sum(dtype=torch.float64)
                 for param in (adapter.lora_A, adapter.lora_B)]
        names.append(name)
        totals.append(terms[0] + terms[1])
    values = torch.stack(totals).tolist() if totals else []
    return dict(zip(names, values, strict=True))


@torch.no_grad()
def grow_adapters(model: nn.Module, plan: dict[str, int], generator: torch.Generator) -> Carry:
    """Apply a rank-growth plan in name order and return the carry: a `reshape` for `rebuild_engine`.

    Under ZeRO-3 each adapter is gathered while it grows. `generator` must be seeded alike on every rank, so the
    new rows of A are the same everywhere.
    """
    adapters = dict(named_adapters(model))
    carry: Carry = {}
    for name in sorted(plan):
        adapter = adapters[name]
        with deepspeed.zero.GatheredParameters([adapter.lora_A, adapter.lora_B]):
            carry |= grow_rank(adapter, plan[name], generator).carry()
    return carry


def compact_engine(engine, plan: CompactionPlan, ds_config: dict, make_optimizer: MakeOptimizer):
    """Cut the plan's dead blocks out of the engine's model and rebuild it; the adapters keep their fp32 values and
    Adam moments at every kept element. Collective; call it at a step boundary, as `rebuild_engine`.

    Under ZeRO-3 each layer's partitions are gathered while it is sliced; the new engine partitions the new
    parameters. The masks in the model shrink with it; slice the caller's own copies with `compaction.slice_*`.
    """
    settle = _partitioner(ds_config) if zero_stage(ds_config) == 3 else None
    return rebuild_engine(
        engine, ds_config, make_optimizer,
        reshape=lambda model: compact_model(model, plan, gather=_gathered, settle=settle),
    )


def _gathered(params: list[nn.Parameter]):
    # Read-only: the sliced copies are new parameters, so the partitions need no write-back (no modifier_rank).
    return deepspeed.zero.GatheredParameters(params)


def _partitioner(ds_config: dict):
    """ZeRO-3: partition a sliced module's new frozen weights right away (DeepSpeed's `zero.Init(module=...)`), so
    a rank holds one whole sliced layer at a time, never the whole compacted model. Weights already partitioned are
    left alone, and so are the adapters: they are small, and the new engine partitions them before `_write_state`
    fills them."""
    def partition(module: nn.Module) -> None:
        frozen = nn.Module()  # a holder: Init converts the parameter objects, which the layer shares
        for index, param in enumerate(p for p in module.parameters() if not p.requires_grad):
            frozen.register_parameter(f"p{index}", param)
        deepspeed.zero.Init(module=frozen, config_dict_or_path=ds_config)

    return partition
