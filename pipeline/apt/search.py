"""Budget search: keep the densest blocks whose exact parameter count fits ρ·total (docs/design.md §4).

Units of every block type are merged into one list sorted by salience density (mandatory units first).
Each prefix of that list is projected to loadable kept sizes (rounding, GQA, LlamaConfig rules), and the
exact parameter count of every prefix comes from one cumsum per block type; the largest prefix whose count
fits the budget wins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.apt.blocks import (
    ModelShape,
    count_params,
    params_per_group,
    params_per_hidden_channel,
    params_per_neuron,
    params_per_query_head,
    total_params,
)
from pipeline.apt.masks import ATTENTION_MODES, MaskSet

LAYOUTS = ("uniform", "per_layer")
_ATTENTION, _NEURON, _HIDDEN = 0, 1, 2


@dataclass(frozen=True)
class _Densities:
    """Salience per parameter of every prunable entry; units are ordered by it and masks keep the densest."""

    attention: torch.Tensor
    """[L, m] a layer's attention units: its KV groups, or the r-th best query head of every group."""
    query_heads: torch.Tensor
    """[L, n_kv, g]"""
    neurons: torch.Tensor
    """[L, f]"""
    hidden: torch.Tensor
    """[d]"""


@dataclass(frozen=True)
class _Units:
    """One block type's search units, in the type's own order (nested units by rank)."""

    density: torch.Tensor
    """[n] salience per parameter."""
    pool: torch.Tensor
    """[n] the layer a unit belongs to; 0 where one unit spans every layer or the pool is global."""
    rank: torch.Tensor
    """[n] 0-based rank within its pool, densest first: the order in which the pool's units are kept."""
    mandatory: torch.Tensor
    """[n] kept whatever the budget."""


def search_masks(
    shape: ModelShape,
    scores: Mapping[str, torch.Tensor],
    remaining_fraction: float,
    *,
    attention_mode: str = "kv_group",
    layout: str = "uniform",
    round_to: int = 8,
    min_hidden: int = 8,
) -> MaskSet:
    """Binary masks keeping the densest blocks whose exact parameter count is at most ρ·total.

    `scores` holds per-unit salience, EMA'd by the caller: "head" [L, n_q], "neuron" [L, f], "hidden" [d]
    (a mapping, or an object with those attributes such as `salience.SalienceScores`).
    """
    _check_arguments(shape, remaining_fraction, attention_mode, layout, round_to, min_hidden)
    densities = _densities(shape, _read_scores(shape, scores), attention_mode)
    uniform = layout == "uniform"
    layers = shape.num_layers
    heads_per_unit, _ = _attention_unit(shape, attention_mode)
    hidden_min = _hidden_minimum(shape, heads_per_unit if uniform else 1, round_to, min_hidden)
    units = (
        _row_units(densities.attention, 1, uniform),
        _row_units(densities.neurons, round_to, uniform),
        _row_units(densities.hidden[None], hidden_min, uniform=False),
    )
    kind, pool, rank = _merge(units)

    if uniform:
        attention_per_layer, neurons_per_layer, hidden_kept = _uniform_prefixes(
            shape, attention_mode, kind, rank, units, round_to, hidden_min
        )
        attention_total, neuron_total = layers * attention_per_layer, layers * neurons_per_layer
    else:
        attention_total = _prefix_counts(kind == _ATTENTION, rank, 1)
        neuron_total = _prefix_counts(kind == _NEURON, rank, round_to)
        hidden_kept = _prefix_counts(kind == _HIDDEN, rank, round_to)
    kv_total = attention_total if attention_mode == "kv_group" else layers * shape.num_kv_heads
    remaining = count_params(
        shape, hidden=hidden_kept, heads=heads_per_unit * attention_total, kv_heads=kv_total, neurons=neuron_total
    )
    num_mandatory = sum(int(unit.mandatory.sum()) for unit in units)
    kept = _largest_fitting_prefix(remaining, math.floor(remaining_fraction * total_params(shape)), num_mandatory)

    if uniform:
        attention_counts = torch.full((layers,), int(attention_per_layer[kept]))
        neuron_counts = torch.full((layers,), int(neurons_per_layer[kept]))
    else:
        attention_counts = torch.bincount(pool[:kept][kind[:kept] == _ATTENTION], minlength=layers)
        neuron_counts = torch.bincount(pool[:kept][kind[:kept] == _NEURON], minlength=layers) // round_to * round_to
    return _masks(shape, attention_mode, densities, attention_counts, neuron_counts, int(hidden_kept[kept]))


def _check_arguments(shape, remaining_fraction, attention_mode, layout, round_to, min_hidden) -> None:
    if not 0 < remaining_fraction <= 1:
        raise ValueError(f"remaining fraction must be in (0, 1], got {remaining_fraction}")
    if attention_mode not in ATTENTION_MODES:
        raise ValueError(f"attention_mode {attention_mode!r} is not one of {ATTENTION_MODES}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    if round_to < 1 or min_hidden < 1:
        raise ValueError(f"round_to and min_hidden must be >= 1, got {round_to} and {min_hidden}")
    if round_to > shape.intermediate_size:
        raise ValueError(f"round_to={round_to} exceeds intermediate_size={shape.intermediate_size}")


def score_reader(scores):
    """name -> tensor, from a mapping ("head", "neuron", "hidden") or an object with those attributes."""
    return (lambda name: scores[name]) if isinstance(scores, Mapping) else (lambda name: getattr(scores, name))


def _read_scores(shape: ModelShape, scores) -> dict[str, torch.Tensor]:
    """float64 copies of the scores, from a mapping or an object with .head/.neuron/.hidden (SalienceScores)."""
    expected = {
        "head": (shape.num_layers, shape.num_heads),
        "neuron": (shape.num_layers, shape.intermediate_size),
        "hidden": (shape.hidden_size,),
    }
    checked = {}
    for name, size in expected.items():
        score = scores.get(name) if isinstance(scores, Mapping) else getattr(scores, name, None)
        if score is None:
            raise ValueError(f"scores lack {name!r}; expected {sorted(expected)}")
        score = score.detach().to("cpu", torch.float64)
        if tuple(score.shape) != size:
            raise ValueError(f"scores[{name!r}] has shape {tuple(score.shape)}, expected {size}")
        if not bool(torch.isfinite(score).all()):
            raise ValueError(f"scores[{name!r}] has non-finite entries")
        checked[name] = score
    return checked


def _attention_unit(shape: ModelShape, attention_mode: str) -> tuple[int, int]:
    """Query heads and parameters of one attention unit in one layer."""
    if attention_mode == "kv_group":
        return shape.group_size, params_per_group(shape)
    return shape.num_kv_heads, shape.num_kv_heads * params_per_query_head(shape)


def _densities(shape: ModelShape, scores: dict[str, torch.Tensor], attention_mode: str) -> _Densities:
    """Divide each unit's salience by the parameters it owns at full size (docs/design.md §2's table)."""
    query_heads = scores["head"].reshape(shape.num_layers, shape.num_kv_heads, shape.group_size)
    if attention_mode == "kv_group":
        attention = query_heads.sum(dim=2)
    else:
        # Entry r: the r-th best query head of every group. Non-increasing in r, and the search ranks
        # row entries by sorting, so r-1 always comes before r.
        attention = query_heads.sort(dim=2, descending=True, stable=True).values.sum(dim=1)
    return _Densities(
        attention=attention / _attention_unit(shape, attention_mode)[1],
        query_heads=query_heads / params_per_query_head(shape),
        neurons=scores["neuron"] / params_per_neuron(shape),
        hidden=scores["hidden"] / params_per_hidden_channel(shape),
    )


def _row_units(rows: torch.Tensor, mandatory_per_row: int, uniform: bool) -> _Units:
    """Units from per-row densities [R, m]: every entry, or (uniform) the r-th best of every row at once."""
    num_rows, width = rows.shape
    if uniform:
        # Unit r needs unit r-1: the running minimum keeps float rounding from ranking r before r-1.
        density = rows.sort(dim=1, descending=True, stable=True).values.mean(dim=0).cummin(dim=0).values
        rank = torch.arange(width)
        return _Units(density, torch.zeros_like(rank), rank, rank < mandatory_per_row)
    rank = _ranks(rows).flatten()
    return _Units(rows.flatten(), torch.arange(num_rows).repeat_interleave(width), rank, rank < mandatory_per_row)


def _hidden_minimum(shape: ModelShape, min_heads: int, round_to: int, min_hidden: int) -> int:
    """Fewest hidden channels kept: min_hidden rounded up to a size loadable with `min_heads` query heads."""
    multiple = math.lcm(round_to, min_heads)
    hidden_min = multiple * math.ceil(min_hidden / multiple)
    if hidden_min > shape.hidden_size:
        raise ValueError(
            f"the minimum hidden size {hidden_min} (min_hidden={min_hidden} rounded up to a multiple of "
            f"{multiple}) exceeds hidden_size={shape.hidden_size}"
        )
    return hidden_min


def _merge(units: tuple[_Units, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kind, pool and in-pool rank of every unit, sorted by density with mandatory units first.

    The stable sort breaks ties by position, as `_ranks` does, so within a pool the merged order is the rank
    order (nested units stay r-1 before r); mandatory units lead, in any order.
    """
    density = torch.cat([unit.density for unit in units])
    mandatory = torch.cat([unit.mandatory for unit in units])
    order = density.masked_fill(mandatory, math.inf).argsort(descending=True, stable=True)
    kind = torch.cat([torch.full_like(unit.pool, index) for index, unit in enumerate(units)])
    pool = torch.cat([unit.pool for unit in units])
    rank = torch.cat([unit.rank for unit in units])
    return kind[order], pool[order], rank[order]


def _prefix_counts(is_kind: torch.Tensor, rank: torch.Tensor, multiple: int) -> torch.Tensor:
    """[N + 1]: for each prefix length, the sum over pools of the pool's units in it, rounded down to `multiple`."""
    # A pool's rounded count grows by `multiple` exactly when its unit count reaches a multiple of it.
    growth = (is_kind & ((rank + 1) % multiple == 0)).long() * multiple
    return F.pad(growth.cumsum(0), (1, 0))


def _uniform_prefixes(
    shape: ModelShape,
    attention_mode: str,
    kind: torch.Tensor,
    rank: torch.Tensor,
    units: tuple[_Units, ...],
    round_to: int,
    hidden_min: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prefix, the kept attention units and neurons per layer and the kept hidden size.

    transformers needs hidden % kept heads == 0, which no monotone rounding gives, so each prefix takes the
    loadable (attention units, hidden) pair within its counts that keeps the most salience; with at most
    n_kv (or g) candidates per prefix, every prefix is scored at once.
    """
    attention, _, hidden = units
    heads_per_unit, params_per_unit = _attention_unit(shape, attention_mode)
    attention_count = _prefix_counts(kind == _ATTENTION, rank, 1)
    neurons_per_layer = _prefix_counts(kind == _NEURON, rank, round_to)
    hidden_count = _prefix_counts(kind == _HIDDEN, rank, 1)

    candidates = torch.arange(1, len(attention.density) + 1)
    multiple = torch.lcm(candidates * heads_per_unit, torch.tensor(round_to))
    hidden_kept = hidden_count[:, None] // multiple * multiple
    allowed = (candidates <= attention_count[:, None]) & (hidden_kept >= hidden_min)
    # Salience = density x parameters, and all units of one kind own equal parameters.
    attention_salience = F.pad(attention.density.cumsum(0) * params_per_unit * shape.num_layers, (1, 0))
    hidden_by_rank = hidden.density.sort(descending=True, stable=True).values
    hidden_salience = F.pad(hidden_by_rank.cumsum(0) * params_per_hidden_channel(shape), (1, 0))
    kept_salience = (attention_salience[candidates] + hidden_salience[hidden_kept]).masked_fill(~allowed, -math.inf)
    # argmax returns the first maximum; search the reversed candidates so ties keep more heads.
    best = len(candidates) - 1 - kept_salience.flip(1).argmax(dim=1)
    return candidates[best], neurons_per_layer, hidden_kept.gather(1, best[:, None]).squeeze(1)


def _largest_fitting_prefix(remaining: torch.Tensor, budget: int, num_mandatory: int) -> int:
    """Largest prefix length whose exact parameter count fits the budget (never shorter than the mandatory units)."""
    if int(remaining[num_mandatory]) > budget:
        raise ValueError(
            f"the minimum kept sizes need {int(remaining[num_mandatory])} parameters, more than the budget {budget}"
        )
    fits = remaining <= budget
    fits[:num_mandatory] = False
    return int(fits.nonzero().max())


def _masks(
    shape: ModelShape,
    attention_mode: str,
    densities: _Densities,
    attention_counts: torch.Tensor,
    neuron_counts: torch.Tensor,
    hidden_count: int,
) -> MaskSet:
    """Keep the densest `counts` entries of every row: per layer attention units and neurons, and hidden."""
    layers = shape.num_layers
    if attention_mode == "kv_group":
        kv_mask = _top_k_mask(densities.attention, attention_counts)
        head_mask = kv_mask.repeat_interleave(shape.group_size, dim=1)
    else:
        per_group = densities.query_heads.flatten(0, 1)
        head_mask = _top_k_mask(per_group, attention_counts.repeat_interleave(shape.num_kv_heads))
        head_mask = head_mask.reshape(layers, shape.num_heads)
        # Every KV head stays, except in a layer whose attention is cut whole (no query heads at all).
        kv_mask = (attention_counts > 0).float()[:, None].expand(layers, shape.num_kv_heads).clone()
    return MaskSet(
        head_mask=head_mask,
        kv_mask=kv_mask,
        neuron_mask=_top_k_mask(densities.neurons, neuron_counts),
        hidden_mask=_top_k_mask(densities.hidden[None], torch.tensor([hidden_count]))[0],
    )


def _top_k_mask(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Float mask keeping the counts[i] densest entries of row i."""
    return (_ranks(rows) < counts[:, None]).float()


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """0-based rank of each entry within its last dimension, densest first; ties by position."""
    order = values.argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(values.shape[-1]).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)
