"""Whole layers as units: ShortGPT's block influence merges exactly and matches the hidden states it is read from."""

import torch
import torch.nn.functional as F

from pipeline.apt.depth import BlockInfluence


def test_block_influence_is_one_minus_the_mean_cosine_between_a_layers_input_and_output(tiny_model, input_ids):
    model = tiny_model("llama", num_layers=3)
    influence = BlockInfluence(3)
    influence.attach(model)
    with torch.no_grad():
        states = model(input_ids, output_hidden_states=True).hidden_states
    influence.detach()
    # hidden_states[l] is layer l's input and hidden_states[l + 1] its output, except the last (the final norm's).
    for layer in range(2):
        cos = F.cosine_similarity(states[layer].double(), states[layer + 1].double(), dim=-1)
        torch.testing.assert_close(influence.scores()[layer], 1 - cos.mean(), rtol=1e-9, atol=1e-12)
    assert influence.sums[1].tolist() == [input_ids.numel()] * 3


def test_sums_merged_over_batches_equal_one_pass_over_all_of_them(tiny_model, input_ids):
    model = tiny_model("qwen2", num_layers=2)
    whole, parts = BlockInfluence(2), [BlockInfluence(2), BlockInfluence(2)]
    whole.attach(model)
    with torch.no_grad():
        model(input_ids)
    whole.detach()
    for part, rows in zip(parts, input_ids.split(1), strict=True):
        part.attach(model)
        with torch.no_grad():
            model(rows)
        part.detach()
    merged = BlockInfluence(2)
    merged.load_packed(sum(part.pack() for part in parts))  # what one SUM all-reduce of two ranks gives
    # float32 forwards of one row and of two differ in rounding only
    torch.testing.assert_close(merged.scores(), whole.scores(), rtol=1e-6, atol=1e-9)
    assert torch.equal(merged.sums[1], whole.sums[1])
