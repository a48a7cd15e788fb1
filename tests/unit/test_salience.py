"""Outlier-aware salience: moments merge exactly, hooks capture pre-mask activations and their gradients."""

import math

import pytest
import scipy.stats
import torch
from builders import make_shape, train_like

from pipeline.apt.adapters import APTLinear, inject_adapters, set_masks
from pipeline.apt.blocks import ModelShape
from pipeline.apt.masks import MaskSet
from pipeline.apt.salience import SalienceAccumulator, SalienceScores, ema_update, kurtosis_from_moments

SMALL = make_shape(vocab_size=16, hidden_size=6, num_heads=2, num_kv_heads=1, head_dim=3, intermediate_size=5)


def test_kurtosis_of_merged_chunks_equals_scipy_on_the_whole_data():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # StudentT samples from the global generator
    # Heavy tails and an offset mean: the raw-to-central conversion must not lose precision.
    data = 3.0 + torch.distributions.StudentT(5.0).sample((3000, SMALL.intermediate_size)).to(torch.float32)
    data[torch.randint(3000, (20,), generator=generator)] *= 8
    chunks = data.split([700, 1500, 800])
    packed = []
    for chunk in chunks:  # one accumulator per "rank", each seeing part of the data in two batches
        rank = SalienceAccumulator(SMALL)
        for batch in chunk.chunk(2):
            rank.add_activations("mlp", 1, batch.view(1, -1, SMALL.intermediate_size))
        packed.append(rank.pack())
    merged = SalienceAccumulator(SMALL)
    merged.load_packed(torch.stack(packed).sum(0))  # what a SUM all-reduce produces

    sums = merged.sums["mlp"]
    kurtosis = kurtosis_from_moments(
        sums["count"][1], sums["sum1"][1], sums["sum2"][1], sums["sum3"][1], sums["sum4"][1]
    )
    expected = scipy.stats.kurtosis(data.double().numpy(), axis=0, fisher=False)
    torch.testing.assert_close(kurtosis, torch.from_numpy(expected), rtol=1e-6, atol=0)
    torch.testing.assert_close(sums["act_abs"][1], data.double().abs().sum(0), rtol=1e-6, atol=0)
    assert sums["count"].tolist() == [0, 3000] and sums["sum1"][0].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kurtosis_survives_a_large_mean_and_bf16_activations(dtype):
    # Raw power sums lose the spread to cancellation unless powers and sums keep float64 digits (x⁴ at x ≈ 100
    # in float32 rounds by more than the whole central m4). One 20000-token batch: the error must not grow with it.
    generator = torch.Generator().manual_seed(2)
    data = (100.0 + torch.randn(24000, SMALL.intermediate_size, generator=generator)).to(dtype)
    data[torch.randint(24000, (30,), generator=generator)] += 12  # outliers, as activations have
    packed = []
    for chunk in data.split([20000, 1000, 3000]):
        rank = SalienceAccumulator(SMALL)
        for batch in chunk.split(1000 if len(chunk) < 20000 else 20000):
            rank.add_activations("mlp", 0, batch)
        packed.append(rank.pack())
    merged = SalienceAccumulator(SMALL)
    merged.load_packed(torch.stack(packed).sum(0))

    sums = merged.sums["mlp"]
    kurtosis = kurtosis_from_moments(
        sums["count"][0], sums["sum1"][0], sums["sum2"][0], sums["sum3"][0], sums["sum4"][0]
    )
    exact = data.double()
    expected = scipy.stats.kurtosis(exact.numpy(), axis=0, fisher=False)
    torch.testing.assert_close(kurtosis, torch.from_numpy(expected), rtol=1e-6, atol=0)
    torch.testing.assert_close(sums["act_abs"][0], exact.abs().sum(0), rtol=1e-6, atol=0)


def test_sums_do_not_depend_on_how_tokens_are_split_into_batches_and_ranks():
    # Zero-mean data, so Σx and Σx³ cancel to a small fraction of Σ|x| and Σ|x|³: the merged sums must still agree
    # with one pass over all tokens element by element, as N ranks must agree with one process.
    data = torch.randn(4096, SMALL.hidden_size, generator=torch.Generator().manual_seed(3))
    whole = SalienceAccumulator(SMALL)
    whole.add_activations("hidden", 0, data)
    packed = []
    for chunk in data.split([1536, 2560]):
        rank = SalienceAccumulator(SMALL)
        for batch in chunk.split(512):
            rank.add_activations("hidden", 0, batch)
        packed.append(rank.pack())
    torch.testing.assert_close(torch.stack(packed).sum(0), whole.pack(), rtol=1e-9, atol=1e-9)


def test_channel_score_on_a_hand_computed_case():
    accumulator = SalienceAccumulator(SMALL)
    h = torch.zeros(4, SMALL.hidden_size)
    h[:, 0] = torch.tensor([0.0, 0.0, 0.0, 4.0])
    g = torch.zeros(4, SMALL.hidden_size)
    g[:, 0] = torch.tensor([1.0, -2.0, 0.5, -0.5])
    accumulator.add_activations("hidden", 0, h)
    accumulator.add_gradients("hidden", 0, g)
    # mean 1, deviations (-1, -1, -1, 3): m2 = 12/4 = 3, m4 = 84/4 = 21, Kurt = 21/9 = 7/3.
    # Σ|g| = 4, Σ|h| = 4  ->  S = 16 + sqrt(7/3). Constant channels (all zero) score 0.
    scores = accumulator.scores()
    assert scores.hidden[0].item() == pytest.approx(16 + math.sqrt(7 / 3), rel=1e-12)
    assert scores.hidden[1:].abs().sum() == 0


def test_block_scores_sum_channels_per_head_neuron_and_hidden_channel():
    accumulator = SalienceAccumulator(SMALL)
    generator = torch.Generator().manual_seed(1)
    for block, width in (("attention", 6), ("mlp", 5)):
        for layer in range(2):
            accumulator.add_activations(block, layer, torch.randn(9, width, generator=generator))
            accumulator.add_gradients(block, layer, torch.randn(9, width, generator=generator))
    scores = accumulator.scores()
    channels = accumulator.channel_scores("attention")
    assert scores.head.shape == (2, 2) and scores.neuron.shape == (2, 5) and scores.hidden.shape == (6,)
    torch.testing.assert_close(scores.head[1, 0], channels[1, :3].sum())
    torch.testing.assert_close(scores.head[0, 1], channels[0, 3:].sum())
    torch.testing.assert_close(scores.neuron, accumulator.channel_scores("mlp"))


def _captured_model(tiny_model):
    """A wrapped model with gradual head/neuron masks; returns it and a dict filled by hand-made hooks."""
    model = tiny_model("llama", num_kv_heads=2, num_layers=2)
    inject_adapters(model, targets=["q_proj", "v_proj", "up_proj", "down_proj"], rank=2, alpha=4.0)
    shape = ModelShape.from_config(model.config)
    masks = MaskSet.ones(shape)
    generator = torch.Generator().manual_seed(4)
    masks.head_mask = torch.rand(masks.head_mask.shape, generator=generator)
    masks.neuron_mask = torch.rand(masks.neuron_mask.shape, generator=generator)
    set_masks(model, masks)
    model.model.embed_tokens.weight.requires_grad_(True)  # so the hand capture can retain its output's grad
    return model, shape


def _capture(model):
    """Record the tensors salience must see: o_proj/down_proj inputs (pre-mask), and the residual-stream
    outputs (the hidden mask is all ones, so post-mask equals pre-mask in value and gradient)."""
    captured = {"attention": [], "mlp": [], "hidden": []}

    def keep(block, tensor):
        tensor.retain_grad()
        captured[block].append(tensor)

    model.model.embed_tokens.register_forward_hook(lambda m, a, out: keep("hidden", out))
    for layer in model.model.layers:
        for proj, block in ((layer.self_attn.o_proj, "attention"), (layer.mlp.down_proj, "mlp")):
            assert isinstance(proj, APTLinear)
            proj.register_forward_pre_hook(lambda m, args, block=block: keep(block, args[0]))
            proj.register_forward_hook(lambda m, a, out: keep("hidden", out))
    return captured


def test_hooks_sum_pre_mask_activations_and_their_gradients(tiny_model, input_ids):
    model, shape = _captured_model(tiny_model)
    accumulator = SalienceAccumulator(shape)
    accumulator.attach(model)
    captured = _capture(model)
    model(input_ids, labels=input_ids).loss.backward()

    def flat(tensors):
        return [t.detach().double().reshape(-1, t.shape[-1]) for t in tensors]

    for block in ("attention", "mlp"):
        sums = accumulator.sums[block]
        for layer, (h, g) in enumerate(zip(flat(captured[block]), flat(t.grad for t in captured[block]), strict=True)):
            torch.testing.assert_close(sums["act_abs"][layer], h.abs().sum(0), rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(sums["grad_abs"][layer], g.abs().sum(0), rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(sums["sum2"][layer], (h**2).sum(0), rtol=1e-12, atol=0)
            torch.testing.assert_close(sums["sum3"][layer], (h**3).sum(0), rtol=1e-12, atol=1e-15)
            assert sums["count"][layer] == h.shape[0] == input_ids.numel()
    # Hidden sums: one row per sublayer output, in forward order (o_proj then down_proj of every layer); the
    # embedding output (captured first) is not a salience site (docs/design.md §3).
    assert len(captured["hidden"]) == 1 + 2 * shape.num_layers
    sites = captured["hidden"][1:]
    sums = accumulator.sums["hidden"]
    assert sums["act_abs"].shape == (2 * shape.num_layers, shape.hidden_size)
    for row, (h, g) in enumerate(zip(flat(sites), flat(t.grad for t in sites), strict=True)):
        torch.testing.assert_close(sums["act_abs"][row], h.abs().sum(0), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(sums["grad_abs"][row], g.abs().sum(0), rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(sums["sum4"][row], (h**4).sum(0), rtol=1e-12, atol=0)
        assert sums["count"][row] == h.shape[0] == input_ids.numel()
    assert all(accumulator.sums[block]["grad_abs"].sum() > 0 for block in ("attention", "mlp", "hidden"))


def test_after_mask_gradients_are_the_before_mask_ones_divided_by_the_mask(tiny_model, input_ids):
    """∂L/∂H = m ⊙ ∂L/∂(m⊙H): after_mask sums equal before_mask ones over m, and a channel masked to zero still
    gets a gradient (it can be chosen again), where before_mask gives it none."""
    model, shape = _captured_model(tiny_model)
    masks = model.apt_masks
    masks.neuron_mask[0, 0] = 0.0
    sums = {}
    for after_mask in (False, True):
        accumulator = SalienceAccumulator(shape, products=True, after_mask=after_mask)
        accumulator.attach(model)
        model(input_ids, labels=input_ids).loss.backward()
        accumulator.detach()
        sums[after_mask] = accumulator.sums
    per_channel = {"attention": masks.head_mask.double().repeat_interleave(shape.head_dim, dim=1),
                   "mlp": masks.neuron_mask.double()}
    for block, mask in per_channel.items():
        before, after = sums[False][block], sums[True][block]
        torch.testing.assert_close(before["act_abs"], after["act_abs"], rtol=0, atol=0)
        torch.testing.assert_close(before["grad_abs"], mask * after["grad_abs"], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(before["act_grad"], mask * after["act_grad"], rtol=1e-4, atol=1e-10)  # signed sums
    assert sums[False]["mlp"]["grad_abs"][0, 0] == 0 < sums[True]["mlp"]["grad_abs"][0, 0]
    torch.testing.assert_close(sums[False]["hidden"]["grad_abs"], sums[True]["hidden"]["grad_abs"])  # masks one


def test_hidden_score_sums_per_site_scores_on_a_tiny_model(tiny_model, input_ids):
    """S_c = Σ_sites (Σ|∂L/∂H_s,c|·Σ|H_s,c| + sqrt(Kurt(H_s,c))), computed here directly from the captured
    sublayer outputs, with kurtosis from scipy: a sum of per-site products, not a product of pooled sums."""
    model, shape = _captured_model(tiny_model)
    accumulator = SalienceAccumulator(shape)
    accumulator.attach(model)
    captured = _capture(model)
    model(input_ids, labels=input_ids).loss.backward()

    expected = torch.zeros(shape.hidden_size, dtype=torch.float64)
    for site in captured["hidden"][1:]:
        h = site.detach().double().reshape(-1, shape.hidden_size)
        g = site.grad.double().reshape(-1, shape.hidden_size)
        kurtosis = torch.from_numpy(scipy.stats.kurtosis(h.numpy(), axis=0, fisher=False))
        expected += g.abs().sum(0) * h.abs().sum(0) + kurtosis.sqrt()
    torch.testing.assert_close(accumulator.scores().hidden, expected, rtol=1e-6, atol=1e-9)


def test_without_the_outlier_term_the_apt_score_is_the_first_order_product(tiny_model, input_ids):
    model, shape = _captured_model(tiny_model)
    with_term, without = SalienceAccumulator(shape), SalienceAccumulator(shape, outlier=False)
    for accumulator in (with_term, without):
        accumulator.attach(model)
        model(input_ids, labels=input_ids).loss.backward()
        accumulator.detach()
    for block in ("attention", "mlp", "hidden"):
        sums = without.sums[block]
        torch.testing.assert_close(without.channel_scores(block), sums["grad_abs"] * sums["act_abs"])
        assert bool((with_term.channel_scores(block) > without.channel_scores(block)).any())


def test_frozen_embedding_output_still_gets_its_gradient(tiny_model, input_ids):
    # No attention adapters: with the embedding frozen, nothing upstream of layer 0's o_proj input and output
    # trains, so only the hook's leaf makes their gradients exist.
    model = tiny_model("llama", num_kv_heads=2, num_layers=2)
    inject_adapters(model, targets=["up_proj", "down_proj"], rank=2, alpha=4.0)
    train_like(model)
    shape = ModelShape.from_config(model.config)
    model.model.embed_tokens.weight.requires_grad_(True)
    trainable, frozen = SalienceAccumulator(shape), SalienceAccumulator(shape)
    trainable.attach(model)
    model(input_ids, labels=input_ids).loss.backward()
    trainable.detach()
    model.model.embed_tokens.weight.requires_grad_(False)  # as after inject_adapters: nothing upstream trains
    frozen.attach(model)
    model(input_ids, labels=input_ids).loss.backward()
    torch.testing.assert_close(frozen.pack(), trainable.pack(), rtol=1e-6, atol=1e-12)
    assert bool((frozen.sums["hidden"]["grad_abs"][0] > 0).all())  # layer 0's attention output


def test_grad_scale_switch_and_detach(tiny_model, input_ids):
    model, shape = _captured_model(tiny_model)
    reference, scaled = SalienceAccumulator(shape), SalienceAccumulator(shape)
    reference.attach(model)
    model(input_ids, labels=input_ids).loss.backward()
    reference.detach()
    scaled.attach(model)
    scaled.grad_scale = 1024.0  # fp16 loss scaling: captured grads are divided back
    (1024.0 * model(input_ids, labels=input_ids).loss).backward()
    torch.testing.assert_close(scaled.pack(), reference.pack(), rtol=1e-6, atol=1e-12)

    before = scaled.pack()
    scaled.enabled = False
    model(input_ids, labels=input_ids).loss.backward()
    scaled.enabled = True
    with torch.no_grad():
        model(input_ids)
    scaled.detach()
    model(input_ids, labels=input_ids).loss.backward()
    assert torch.equal(scaled.pack(), before)


def test_state_dict_round_trip_reset_and_packed_size_check():
    accumulator = SalienceAccumulator(SMALL)
    accumulator.add_activations("attention", 1, torch.randn(3, 6))
    accumulator.add_gradients("hidden", 0, torch.randn(3, 6))
    restored = SalienceAccumulator(SMALL)
    restored.load_state_dict(accumulator.state_dict())
    assert torch.equal(restored.pack(), accumulator.pack())
    accumulator.reset()
    assert accumulator.pack().abs().sum() == 0 and accumulator.pack().dtype == torch.float64
    with pytest.raises(ValueError, match="packed buffer"):
        accumulator.load_packed(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(KeyError):
        accumulator.load_state_dict({})


def test_ema_update_starts_from_the_first_scores():
    first = SalienceScores(head=torch.ones(2, 2), neuron=torch.ones(2, 5), hidden=torch.ones(6))
    second = SalienceScores(head=torch.zeros(2, 2), neuron=torch.full((2, 5), 2.0), hidden=torch.zeros(6))
    assert ema_update(None, first, 0.85) is first
    smoothed = ema_update(first, second, 0.85)
    torch.testing.assert_close(smoothed.head, torch.full((2, 2), 0.85))
    torch.testing.assert_close(smoothed.neuron, torch.full((2, 5), 0.85 + 0.15 * 2))
