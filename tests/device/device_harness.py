"""A GPU's device rules on a CPU-only machine: `meta` stands in for the accelerator.

The model, the engine and everything the code puts on the accelerator live on `meta`; a tensor the code forgot to
place stays on the CPU. `StrictDevices` then refuses what CUDA refuses (an op mixing the two, a CPU generator
filling an accelerator tensor), the `accelerator` fixture (conftest.py) makes `pipeline.dist` name `meta` and its
collectives refuse buffers that are not on it (as NCCL refuses CPU tensors), and `StandInEngine` is a DeepSpeed
engine whose forward refuses inputs that are not on its device. `meta` holds no values: reading one back gives
zeros (a truth value: True), so loops run to the end.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ACCELERATOR = torch.device("meta")
aten = torch.ops.aten


class DeviceMismatch(RuntimeError):
    """What CUDA would raise: a tensor is not on the device the operation runs on."""


class StrictDevices(TorchDispatchMode):
    """Every op sees one device (a 0-dim CPU tensor counts as a number, as in CUDA); a generator fills only tensors
    on its own device; a number read off `meta` is zero, a truth value True."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func is aten._local_scalar_dense.default and tensors[0].is_meta:
            return True if tensors[0].dtype == torch.bool else 0
        if func is aten._to_copy.default and tensors[0].is_meta and kwargs.get("device") == torch.device("cpu"):
            return torch.zeros(tensors[0].shape, dtype=kwargs.get("dtype") or tensors[0].dtype)
        if func is aten.copy_.default and tensors[1].is_meta and tensors[0].device.type == "cpu":
            return tensors[0].zero_()
        devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1 and func not in (aten._to_copy.default, aten.copy_.default):
            raise DeviceMismatch(f"{func}: tensors on {sorted(map(str, devices))}")
        generator = kwargs.get("generator")
        if generator is not None and any(t.device.type != generator.device.type for t in tensors):
            raise DeviceMismatch(f"{func}: a {generator.device} generator fills a tensor on {tensors[0].device}")
        return func(*args, **kwargs)


class Collectives:
    """What the stand-in process group received: one entry per all-reduce, its buffer's device."""

    def __init__(self):
        self.devices: list[torch.device] = []

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        if tensor.device != ACCELERATOR:
            raise DeviceMismatch(f"all_reduce of a buffer on {tensor.device}; the backend takes {ACCELERATOR} only")
        self.devices.append(tensor.device)


class StandInOptimizer:
    """A ZeRO optimizer's loss-scale interface: `loss_scale` reads and sets `loss_scaler.cur_scale`."""

    def __init__(self, scale: float):
        self.loss_scaler = SimpleNamespace(cur_scale=scale)

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.cur_scale

    @loss_scale.setter
    def loss_scale(self, value: float) -> None:
        self.loss_scaler.cur_scale = value


class StandInEngine:
    """The part of a DeepSpeed engine the recipe and the stages use, around a module on `device`. With `fp16`,
    `backward` scales the loss by the dynamic loss scale, as DeepSpeed does."""

    def __init__(self, module, device=ACCELERATOR, step_applied: bool = True, fp16: bool = False):
        self.module, self.device, self.step_applied, self.fp16 = module.to(device), device, step_applied, fp16
        self.optimizer = StandInOptimizer(2.0**16 if fp16 else 1.0)
        self.steps = 0

    def __call__(self, **inputs):
        for name, value in inputs.items():
            if torch.is_tensor(value) and value.device != self.device:
                raise DeviceMismatch(f"engine forward: {name} is on {value.device}, the engine on {self.device}")
        return self.module(**inputs)

    def backward(self, loss):
        (loss * self.optimizer.loss_scale).backward()

    def step(self):
        self.steps += 1
        self.module.zero_grad(set_to_none=True)

    def was_step_applied(self) -> bool:
        return self.step_applied

    def zero_grad(self):
        self.module.zero_grad(set_to_none=True)

    def fp16_enabled(self) -> bool:
        return self.fp16

    def get_lr(self):
        return [1e-3]

    @property
    def training(self) -> bool:
        return self.module.training

    def eval(self):
        return self.train(False)

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self


def tiny_llama(rank: int = 4, seed: int = 0):
    """A 2-layer GQA LLaMA with APT adapters and masks, on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.apt.adapters import inject_adapters

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return inject_adapters(model, targets=["q_proj", "v_proj", "up_proj", "down_proj"], rank=rank, alpha=8.0,
                           generator=torch.Generator().manual_seed(seed))


def rows(count: int = 8, seq_len: int = 16, seed: int = 0):
    """A dataset split in torch format, as `datasets` gives it: CPU tensors."""
    import datasets

    ids = torch.randint(0, 128, (count, seq_len), generator=torch.Generator().manual_seed(seed))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")
