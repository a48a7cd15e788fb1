"""The device rule (docs/design.md §9) under a GPU's rules, on CPU: each test puts the model, the engine or the
accelerator on `meta` (see device_harness.py), where a tensor left on the CPU fails as it would on a GPU."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import dist
from pipeline.apt.adapters import APTLinear, grow_rank, inject_adapters, named_adapters
from pipeline.apt.blocks import ModelShape
from pipeline.apt.salience import SalienceAccumulator
from pipeline.apt.state import AptState
from pipeline.config import FinetuneConfig

from device_harness import ACCELERATOR, StandInEngine, rows, tiny_llama

pytestmark = pytest.mark.device


# ---- adapters: drawn on the CPU from the seeded generator, then moved ----------------------------------------


def test_adapter_rows_are_drawn_on_the_cpu_and_land_on_the_model_device(strict):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama().config).to(ACCELERATOR)  # the weights already on the device (ZeRO-3)
    inject_adapters(model, targets=["q_proj", "up_proj"], rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    adapters = dict(named_adapters(model))
    assert {adapter.lora_A.device for adapter in adapters.values()} == {ACCELERATOR}
    growth = grow_rank(next(iter(adapters.values())), 2, torch.Generator().manual_seed(1))
    assert growth.new_A.device == ACCELERATOR and growth.new_A.shape[0] == 6


def test_adapter_rows_keep_the_numbers_a_seeded_cpu_draw_gives():
    base = torch.nn.Linear(32, 16)
    adapter = APTLinear(base, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(7))
    expected = torch.nn.init.kaiming_uniform_(torch.empty(4, 32), a=math.sqrt(5),
                                              generator=torch.Generator().manual_seed(7))
    assert torch.equal(adapter.lora_A.detach(), expected)


def test_a_resumed_run_regrows_its_adapters_on_the_device(strict):
    from pipeline.model_io import regrow

    model = tiny_llama(rank=4).to(ACCELERATOR)
    ranks = {name: 6 for name, _ in named_adapters(model)}
    regrow(model, ranks, seed=0)
    assert {(a.rank, a.lora_A.device) for _, a in named_adapters(model)} == {(6, ACCELERATOR)}


def test_the_salience_stage_grows_loaded_adapters_on_the_device(tmp_path, strict):
    from pipeline.model_io import load_adapters
    from pipeline.stage import save_tensors

    trained = tiny_llama(rank=4)
    for _, adapter in named_adapters(trained):
        grow_rank(adapter, 2, torch.Generator().manual_seed(0))
    save_tensors({name: p.detach() for name, p in trained.named_parameters() if p.requires_grad},
                 tmp_path / "adapters.safetensors")
    model = tiny_llama(rank=4).to(ACCELERATOR)
    load_adapters(model, tmp_path / "adapters.safetensors", max_rank=8)
    assert {(a.rank, a.lora_B.device) for _, a in named_adapters(model)} == {(6, ACCELERATOR)}


# ---- batches and collectives --------------------------------------------------------------------------------


def test_validation_moves_its_batches_and_reduces_on_the_device(accelerator, strict):
    from pipeline.training import evaluate

    engine = StandInEngine(tiny_llama())
    evaluate(engine, rows(), micro_batch=2, max_batches=2, world_size=2, rank=0)
    assert accelerator.devices == [ACCELERATOR]


def test_shape_choice_moves_its_batches_and_reduces_on_the_device(accelerator, strict):
    from pipeline.apt.adapters import set_masks
    from pipeline.apt.masks import MaskSet
    from pipeline.shape_choice import choose_shape

    engine = StandInEngine(tiny_llama())
    shape = ModelShape.from_config(engine.module.config)
    split = rows()
    choice = choose_shape(engine, [MaskSet.ones(shape), MaskSet.ones(shape)], [split[0:2], split[2:4]],
                          lambda masks: set_masks(engine.module, masks))
    assert choice.index == 0 and accelerator.devices == [ACCELERATOR]


def test_losses_are_reduced_on_their_device(accelerator, strict):
    from pipeline.training import reduce_losses

    loss = torch.tensor(2.0, device=ACCELERATOR)
    bad_ranks, _, _ = reduce_losses(loss, loss)
    assert accelerator.devices == [ACCELERATOR] and bad_ranks == []


def test_a_cpu_buffer_given_to_the_dist_helpers_is_reduced_on_the_device(accelerator, strict):
    dist.all_reduce_sum(torch.zeros(3))
    dist.all_reduce_mean(torch.zeros(3))
    assert accelerator.devices == [ACCELERATOR, ACCELERATOR]


def test_the_salience_stage_accumulates_and_reduces_on_the_device(accelerator, strict):
    from pipeline.calibration import accumulate

    engine = StandInEngine(tiny_llama())
    accumulator = SalienceAccumulator(ModelShape.from_config(engine.module.config), device=dist.device())
    accumulator.attach(engine.module)
    flat = accumulate(engine, accumulator, [[0, 1], [2, 3]], rows())
    assert flat.device == ACCELERATOR and accumulator.pack().device == ACCELERATOR
    assert accelerator.devices == [ACCELERATOR] * 3  # each batch's overflow flag, then the sums


def test_calibration_retries_an_overflowing_fp16_batch_at_a_lower_loss_scale():
    """The salience stage takes no optimizer step, so DeepSpeed never tunes its loss scale: the stage does."""
    from pipeline.calibration import accumulate

    model = tiny_llama()
    engine = StandInEngine(model, device=torch.device("cpu"), fp16=True)

    def overflow_above_2_to_the_10th(module, args, out):  # the first tries' gradients are inf
        if out.requires_grad and engine.optimizer.loss_scale > 2**10:
            out.register_hook(lambda grad: grad * math.inf)

    model.model.layers[0].mlp.register_forward_hook(overflow_above_2_to_the_10th)
    accumulator = SalienceAccumulator(ModelShape.from_config(model.config), device=torch.device("cpu"))
    accumulator.attach(model)
    flat = accumulate(engine, accumulator, [[0, 1], [2, 3]], rows())
    assert engine.optimizer.loss_scale == 2**10 and torch.isfinite(flat).all()
    assert flat[-1] == 4 * 16  # both batches counted once


# ---- the finetune recipe --------------------------------------------------------------------------------------


def bare_recipe(tiny_config, tmp_path, engine, *overrides):
    """A recipe set up by hand around `engine` (what `setup` builds from disk), on 2 ranks, rank 0."""
    from pipeline.recipe import AptFinetuneRecipe
    from pipeline.training import BatchOrder

    cfg = tiny_config("apt.distill=false", "apt.grow_every=0", *overrides).select(FinetuneConfig)
    recipe = AptFinetuneRecipe(cfg, tmp_path / "run")
    recipe.layout.finetune.mkdir(parents=True)
    recipe.engine, recipe.world_size, recipe.rank, recipe.device = engine, dist.world_size(), 0, dist.device()
    recipe.shape = recipe.original_shape = ModelShape.from_config(engine.module.config)
    recipe.salience = SalienceAccumulator(recipe.shape, device=recipe.device)
    recipe.salience.attach(engine.module)
    recipe.state, recipe.teacher = AptState.start(recipe.shape, growth_budget=0.0), None
    recipe.fixed_scores, recipe.collects_salience = None, True  # the default criterion: scored from the sums
    split = rows()
    recipe.splits = {"train": split}
    recipe.batches = BatchOrder(len(split), 2, 1, recipe.world_size, 0, 0)
    recipe.shape_batches = [split[0:2]]
    return recipe


def test_a_training_step_and_a_pruning_update_run_on_the_device(accelerator, strict, tiny_config, tmp_path):
    recipe = bare_recipe(tiny_config, tmp_path, StandInEngine(tiny_llama()), "pruning.update_every=1",
                         "pruning.start_step=0")
    step = recipe.train_step()
    recipe.prune_update()
    assert not step.skipped and recipe.state.step == 1 and recipe.engine.steps == 1
    assert recipe.salience.pack().device == ACCELERATOR
    assert set(accelerator.devices) == {ACCELERATOR} and len(accelerator.devices) >= 2  # the losses, the update


def built(tiny_config, tmp_path, monkeypatch, *overrides, device=ACCELERATOR, ds_config=None):
    """`build_adapted_engine` for a fresh run, the base built from the config, the engine a stand-in on `device`;
    returns (what it built, the dtypes the base was asked for)."""
    from transformers import LlamaForCausalLM

    from pipeline import adapted
    from pipeline.layout import RunLayout

    dtypes = []

    def build(model_cfg, directory, vocab_size, ds_config, seed, dtype=None):
        dtypes.append(dtype)
        return LlamaForCausalLM(tiny_llama().config).to(device)  # a base without adapters, where the rank has it

    monkeypatch.setattr(adapted, "original_base", build)
    monkeypatch.setattr(adapted, "build_engine", lambda model, ds_config, train: StandInEngine(model, device=device))
    cfg = tiny_config(*overrides).select(FinetuneConfig)
    layout = RunLayout(tmp_path / "run", cfg.model)
    return adapted.build_adapted_engine(cfg, layout, layout.base_model, ds_config or {}, 128), dtypes


def test_the_builder_puts_its_salience_accumulator_on_the_device(accelerator, strict, tiny_config, tmp_path,
                                                                monkeypatch):
    adapted, _ = built(tiny_config, tmp_path, monkeypatch)
    assert adapted.salience.pack().device == ACCELERATOR


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_zero2_ranks_read_the_base_in_the_training_dtype(tiny_config, tmp_path, monkeypatch, precision):
    _, dtypes = built(tiny_config, tmp_path, monkeypatch, f"train.precision={precision}",
                      device=torch.device("cpu"), ds_config={"zero_optimization": {"stage": 2}})
    assert dtypes == [{"bf16": torch.bfloat16, "fp16": torch.float16}[precision]]  # not a whole fp32 copy per rank


def test_a_step_deepspeed_skips_leaves_the_salience_as_it_was(tiny_config, tmp_path):
    """fp16 overflow: the gradients of the step were inf, DeepSpeed dropped the update (`was_step_applied`)."""
    model = tiny_llama()
    model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: _inf_gradient(out))
    recipe = bare_recipe(tiny_config, tmp_path, StandInEngine(model, device=torch.device("cpu"), step_applied=False))
    before = recipe.salience.pack()
    step = recipe.train_step()
    assert step.skipped and step.adapter_scores is None
    assert recipe.state.step == 1 and recipe.state.overflow_steps == 1
    assert torch.equal(recipe.salience.pack(), before)
    recipe.engine.step_applied = True
    recipe.train_step()  # an applied step adds its (finite) statistics
    assert torch.isfinite(recipe.salience.pack()).all() and not torch.equal(recipe.salience.pack(), before)


def _inf_gradient(output: torch.Tensor) -> None:
    if output.requires_grad and not getattr(_inf_gradient, "done", False):
        _inf_gradient.done = True
        output.register_hook(lambda grad: grad * math.inf)


# ---- teacher, eval, backend -----------------------------------------------------------------------------------


def test_the_teacher_model_is_loaded_onto_the_device(tmp_path):
    from pipeline.config import ModelSection
    from pipeline.teacher import load_teacher

    tiny_llama(rank=0).save_pretrained(tmp_path / "teacher")
    teacher = load_teacher(ModelSection(path=None), tmp_path / "teacher", torch.bfloat16, ACCELERATOR)
    assert {(p.device, p.dtype) for p in teacher.model.parameters()} == {(ACCELERATOR, torch.bfloat16)}


def test_the_frozen_teacher_adapters_live_on_the_device(strict):
    from pipeline.apt.distill import freeze_adapters

    model = tiny_llama().to(ACCELERATOR)
    # Under ZeRO with optimizer offload the fp32 copy DeepSpeed reads back is on the CPU.
    frozen = freeze_adapters(model, read=lambda p: torch.zeros(p.shape), device=ACCELERATOR)
    assert {t.device for pair in frozen.values() for t in pair} == {ACCELERATOR}


def test_a_resumed_shared_teacher_returns_to_the_device(accelerator, tiny_config, tmp_path):
    recipe = bare_recipe(tiny_config, tmp_path, StandInEngine(tiny_llama()))
    recipe.state.teacher = {"model.layers.0.self_attn.q_proj": (torch.zeros(4, 64), torch.zeros(64, 4))}
    teacher = recipe.resumed_teacher()
    assert {t.device for pair in teacher.adapters.values() for t in pair} == {ACCELERATOR}


def test_eval_runs_on_the_accelerator_in_the_checkpoints_dtype(accelerator, strict):
    from pipeline.evaluation import generate_seconds, perplexity
    from pipeline.stages.eval import eval_placement

    assert eval_placement() == (ACCELERATOR, "auto")
    model = tiny_llama(rank=0).to(ACCELERATOR).eval()
    perplexity(model, rows(), batch_size=2, max_batches=2)
    prompts = rows()[0:2]["input_ids"][:, :4]
    generate_seconds(model, prompts, 2)


def test_the_process_group_backend_is_the_accelerators_and_each_rank_gets_its_device(monkeypatch):
    import deepspeed

    class Nccl:
        devices: list[int] = []

        def communication_backend_name(self):
            return "nccl"

        def set_device(self, index):
            self.devices.append(index)

    import torch.distributed.distributed_c10d as c10d

    backends = []
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):  # init_distributed sets them; put them back
        monkeypatch.setattr(c10d, name, getattr(c10d, name))
    monkeypatch.setattr(dist, "accelerator", lambda: Nccl())
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend, timeout: backends.append(dist_backend))
    monkeypatch.setenv("LOCAL_RANK", "3")
    dist.init_distributed(1.0)
    # Set before the model and the salience sums are created (DeepSpeed itself sets it only in initialize).
    assert backends == ["nccl"] and Nccl.devices == [3]
