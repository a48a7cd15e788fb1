"""Shapes: how many blocks of each type to keep, chosen per type, then filled to the exact budget (docs/design.md §4).

A shape is a `KeptSizes`: the kept hidden size and, per layer, the kept query heads, KV heads and neurons. Heads,
neurons and hidden channels are ranked only within their own type, so the scale of one type's salience never
decides how the budget is split between types. `candidate_shapes` proposes a few splits of the removed parameters
between hidden, attention and MLP, each filled to the exact budget; the caller picks one (by measured loss,
`pipeline.shape_choice`) and `masks_for_shape` keeps the top-scored blocks of each type at that shape. Pure torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.apt.blocks import KeptSizes, ModelShape, count_params, remaining_params, total_params
from pipeline.apt.masks import MaskSet
from pipeline.apt.search import (
    _attention_unit,
    _check_arguments,
    _densities,
    _hidden_minimum,
    _masks,
    _read_scores,
    score_reader,
)

SPLITS: tuple[tuple[float, float, float], ...] = (
    (1, 1, 1),  # every type shrinks alike (Sheared-LLaMA's shapes are close to this)
    (1, 0, 1),  # heads kept, hidden and MLP shrink (Minitron-like)
    (1, 1, 3),  # the MLP goes first
    (1, 0, 4),  # heads kept, the MLP goes much faster than the hidden size
    (3, 1, 1),  # the hidden size goes first
    (0, 1, 1),  # hidden size kept
    (1, 3, 1),  # attention goes first
    (1, 1, 0),  # MLP kept (as far as the exact fill allows)
    (0, 0, 1),  # only the MLP shrinks
)
"""(hidden, attention, MLP) exponents w: a candidate keeps about t**w of each type's units, t set by the budget."""

PRUNED = -1e30
"""Score of a block that is not alive: finite, below any real salience, so it ranks last in its type."""


@dataclass(frozen=True)
class _Steps:
    """One block type's ranked steps, mandatory first: step k adds `size[k]` units to layer `layer[k]`
    (to every layer in the uniform layout, where `layer` is -1). A layer with no steps keeps none of the type."""

    layer: torch.Tensor
    size: torch.Tensor
    mandatory: int
    uniform: bool
    num_layers: int

    @property
    def totals(self) -> torch.Tensor:
        """[S + 1] units kept over all layers after k steps."""
        cum = torch.nn.functional.pad(self.size.cumsum(0), (1, 0))
        return cum * self.num_layers if self.uniform else cum

    def per_layer(self, k: int) -> tuple[int, ...]:
        """Units kept in each layer after k steps."""
        if self.uniform:
            return (int(self.size[:k].sum()),) * self.num_layers
        counts = torch.bincount(self.layer[:k], weights=self.size[:k].double(), minlength=self.num_layers)
        return tuple(int(c) for c in counts.round().long())


@dataclass(frozen=True)
class _Problem:
    """Everything a split is solved against: the axes, their caps and minimums, and the budget."""

    shape: ModelShape
    attention: _Steps
    neurons: _Steps
    hidden_cap: int
    budget: int
    attention_mode: str
    layout: str
    round_to: int
    min_hidden: int
    attention_layers: int
    """Layers that keep their attention (all but those whose attention is cut, `sublayers`)."""
    mlp_layers: int
    """Layers that keep their MLP."""


def candidate_shapes(
    shape: ModelShape,
    remaining_fraction: float,
    *,
    scores=None,
    attention_mode: str = "kv_group",
    layout: str = "uniform",
    round_to: int = 8,
    min_hidden: int = 8,
    count: int = len(SPLITS),
    alive: MaskSet | None = None,
    target: KeptSizes | None = None,
    sublayers: bool = False,
) -> list[KeptSizes]:
    """Up to `count` distinct shapes that split the removed parameters differently between hidden, attention and
    MLP (`SPLITS`, in order), each within ⌊ρ·total⌋ and as close to it as the granularity allows.

    `scores` ("head", "neuron", "hidden" as for `search_masks`) rank each type's units across layers in the
    `per_layer` layout (required there; unused in `uniform`). `alive` (binary masks) caps every type at the blocks
    it keeps. With `target` (a uniform `KeptSizes`, e.g. `pruning.target_shape`), the one candidate follows the
    path from the full model to it: `target` itself once the budget is at or below its size. With `sublayers`
    (per_layer), a layer whose attention or MLP `alive` keeps none of has that sublayer cut: it keeps none.
    """
    _check_arguments(shape, remaining_fraction, attention_mode, layout, round_to, min_hidden)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if layout == "per_layer" and scores is None:
        raise ValueError("the per_layer layout ranks units across layers by salience: pass scores")
    problem = _problem(shape, remaining_fraction, scores, attention_mode, layout, round_to, min_hidden, alive,
                       sublayers)
    if target is not None:
        return [_toward_target(problem, target)]
    shapes: list[KeptSizes] = []
    for split in SPLITS:
        kept = _solve(problem, split)
        if kept is not None and kept not in shapes:
            shapes.append(kept)
        if len(shapes) == count:
            break
    if not shapes:
        minimum = _kept(problem, problem.attention.mandatory, problem.neurons.mandatory, _hidden_floor(problem))
        raise ValueError(f"the minimum kept sizes need {remaining_params(shape, minimum)} parameters, more than "
                         f"the budget {problem.budget}")
    return shapes


def masks_for_shape(
    shape: ModelShape,
    scores,
    kept: KeptSizes,
    *,
    attention_mode: str = "kv_group",
    layout: str = "uniform",
    alive: MaskSet | None = None,
    sublayers: bool = False,
) -> MaskSet:
    """Binary masks of exactly `kept`: in every layer the top-scored attention units and neurons, and the
    top-scored hidden channels; blocks `alive` does not keep rank last (they stay pruned while `kept` allows).
    With `sublayers` a layer may keep no attention or no neurons (that sublayer cut)."""
    _check_arguments(shape, 1.0, attention_mode, layout, 1, 1)
    ranked = _ranked_scores(shape, scores, alive)
    densities = _densities(shape, ranked, attention_mode)
    units = _attention_units(shape, kept, attention_mode)
    if layout == "uniform" and len(set(units)) + len(set(kept.neurons)) != 2:
        raise ValueError(f"the uniform layout keeps the same sizes in every layer, got {kept}")
    least = 0 if sublayers else 1
    if not 1 <= kept.hidden <= shape.hidden_size or not all(least <= n <= shape.intermediate_size
                                                             for n in kept.neurons):
        raise ValueError(f"{kept} does not fit the model {shape}")
    masks = _masks(shape, attention_mode, densities, torch.tensor(units), torch.tensor(kept.neurons), kept.hidden)
    if masks.head_mask.sum(1).tolist() != list(kept.heads) or masks.kv_mask.sum(1).tolist() != list(kept.kv_heads):
        raise ValueError(f"{kept} is not a shape {attention_mode} mode can keep in this model")
    return masks


def relative_to_layer(scores, alive: MaskSet | None = None) -> dict[str, torch.Tensor]:
    """Head and neuron scores divided, layer by layer, by the layer's mean over its live units (`alive`; all by
    default); hidden as it is. Within a layer the order is unchanged: only the ranking across layers moves."""
    read = score_reader(scores)

    def per_layer(rows: torch.Tensor, live: torch.Tensor | None) -> torch.Tensor:
        live = torch.ones_like(rows, dtype=torch.bool) if live is None else live.to(rows.device) > 0
        mean = (rows * live).sum(1, keepdim=True) / live.sum(1, keepdim=True).clamp_min(1)
        # A layer with no live unit (a cut sublayer) or only zero scores has nothing to rank: left as it is.
        return rows / torch.where(mean > 0, mean, torch.ones_like(mean))

    return {"head": per_layer(read("head").double(), None if alive is None else alive.head_mask),
            "neuron": per_layer(read("neuron").double(), None if alive is None else alive.neuron_mask),
            "hidden": read("hidden")}


def shape_fraction(shape: ModelShape, kept: KeptSizes) -> float:
    """Remaining fraction of a model pruned to `kept`."""
    return remaining_params(shape, kept) / total_params(shape)


def uniform_shape(shape: ModelShape, hidden: int, heads: int, kv_heads: int, intermediate: int) -> KeptSizes:
    """The same sizes in every layer (`pruning.target_shape` is hidden, heads, kv_heads, intermediate)."""
    layers = shape.num_layers
    return KeptSizes(hidden=hidden, heads=(heads,) * layers, kv_heads=(kv_heads,) * layers,
                     neurons=(intermediate,) * layers)


def target_shape_problems(shape: ModelShape, target: tuple[int, ...], attention_mode: str) -> list[str]:
    """Why `target` (hidden, heads, kv_heads, intermediate) is not a shape this model can be pruned to."""
    hidden, heads, kv_heads, intermediate = target
    problems = []
    for name, value, full in (("hidden", hidden, shape.hidden_size), ("heads", heads, shape.num_heads),
                              ("kv_heads", kv_heads, shape.num_kv_heads),
                              ("intermediate", intermediate, shape.intermediate_size)):
        if value > full:
            problems.append(f"{name} {value} exceeds the model's {full}")
    if attention_mode == "kv_group" and heads != kv_heads * shape.group_size:
        problems.append(f"kv_group mode keeps whole KV groups of {shape.group_size} query heads: heads must be "
                        f"kv_heads x {shape.group_size} = {kv_heads * shape.group_size}, got {heads}")
    if attention_mode == "query_in_group" and kv_heads != shape.num_kv_heads:
        problems.append(f"query_in_group mode keeps every KV head: kv_heads must be {shape.num_kv_heads}, "
                        f"got {kv_heads}")
    return problems


# ---- the axes --------------------------------------------------------------------------------------------


def _problem(shape, fraction, scores, attention_mode, layout, round_to, min_hidden, alive, sublayers) -> _Problem:
    uniform = layout == "uniform"
    if sublayers and uniform:
        raise ValueError("cutting a layer's attention or MLP alone needs the per_layer layout")
    if scores is None:  # uniform: sizes do not depend on the scores
        scores = {"head": torch.zeros(shape.num_layers, shape.num_heads),
                  "neuron": torch.zeros(shape.num_layers, shape.intermediate_size),
                  "hidden": torch.zeros(shape.hidden_size)}
    densities = _densities(shape, _ranked_scores(shape, scores, alive), attention_mode)
    alive = alive if alive is not None else MaskSet.ones(shape)
    alive_units = _alive_attention_units(shape, alive, attention_mode)
    alive_neurons = (alive.neuron_mask > 0).sum(1)
    return _Problem(
        shape=shape,
        attention=_steps(densities.attention, alive_units, 1, uniform, may_be_empty=sublayers),
        neurons=_steps(densities.neurons, alive_neurons, round_to, uniform, may_be_empty=sublayers),
        hidden_cap=int((alive.hidden_mask > 0).sum()),
        budget=math.floor(fraction * total_params(shape)),
        attention_mode=attention_mode,
        layout=layout,
        round_to=round_to,
        min_hidden=min_hidden,
        attention_layers=int((alive_units > 0).sum()),
        mlp_layers=int((alive_neurons > 0).sum()),
    )


def _ranked_scores(shape: ModelShape, scores, alive: MaskSet | None) -> dict[str, torch.Tensor]:
    """float64 scores with the blocks `alive` does not keep at `PRUNED`."""
    checked = _read_scores(shape, scores)
    if alive is None:
        return checked
    return {
        "head": checked["head"].masked_fill(alive.head_mask.cpu() == 0, PRUNED),
        "neuron": checked["neuron"].masked_fill(alive.neuron_mask.cpu() == 0, PRUNED),
        "hidden": checked["hidden"].masked_fill(alive.hidden_mask.cpu() == 0, PRUNED),
    }


def _alive_attention_units(shape: ModelShape, alive: MaskSet, attention_mode: str) -> torch.Tensor:
    """[L] attention units `alive` keeps per layer: KV groups, or query heads per group."""
    if attention_mode == "kv_group":
        return (alive.kv_mask > 0).sum(1)
    per_group = (alive.head_mask > 0).reshape(shape.num_layers, shape.num_kv_heads, shape.group_size).sum(2)
    return per_group.min(1).values


def _steps(rows: torch.Tensor, alive: torch.Tensor, block: int, uniform: bool, may_be_empty: bool = False) -> _Steps:
    """Ranked steps of `block` units (the last of a row may be smaller) over the alive entries of each row.

    Within a row, units are taken densest first; across rows (per_layer), blocks are ranked by their mean
    density, with a running minimum so a row's blocks stay in order, and the first block of every row leads.
    A row with nothing alive is refused, unless `may_be_empty` (per_layer: that sublayer is cut, no steps).
    """
    num_rows = rows.shape[0]
    if uniform:
        cap = int(alive.min())
        sizes = _block_sizes(cap, block)
        return _Steps(torch.full((len(sizes),), -1), torch.tensor(sizes), 1, True, num_rows)
    layers, sizes, density = [], [], []
    for row in range(num_rows):
        cap = int(alive[row])
        if cap == 0 and may_be_empty:
            continue
        ranked = rows[row].sort(descending=True, stable=True).values[:cap]
        row_sizes = _block_sizes(cap, block)
        means = _block_means(ranked, block).cummin(0).values
        layers.append(torch.full((len(row_sizes),), row))
        sizes.append(torch.tensor(row_sizes))
        density.append(means.masked_fill(torch.arange(len(row_sizes)) == 0, math.inf))  # mandatory first
    order = torch.cat(density).argsort(descending=True, stable=True)
    return _Steps(torch.cat(layers)[order], torch.cat(sizes)[order], len(layers), False, num_rows)


def _block_means(ranked: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each run of `block` entries, the shorter remainder last."""
    full = ranked.numel() // block * block
    means = ranked[:full].view(-1, block).mean(1)
    return torch.cat([means, ranked[full:].mean()[None]]) if full < ranked.numel() else means


def _block_sizes(cap: int, block: int) -> list[int]:
    """`cap` units in blocks of `block`, the remainder last; at least one unit."""
    if cap < 1:
        raise ValueError("every layer must keep at least one unit of every type")
    sizes = [block] * (cap // block) + ([cap % block] if cap % block else [])
    return sizes


def _attention_units(shape: ModelShape, kept: KeptSizes, attention_mode: str) -> tuple[int, ...]:
    """Attention units per layer of a shape: its KV groups, or its query heads per group."""
    if attention_mode == "kv_group":
        return kept.kv_heads
    return tuple(heads // shape.num_kv_heads for heads in kept.heads)


def _kept(problem: _Problem, attention_steps: int, neuron_steps: int, hidden: int) -> KeptSizes:
    shape, units = problem.shape, problem.attention.per_layer(attention_steps)
    heads_per_unit, _ = _attention_unit(shape, problem.attention_mode)
    kv = units if problem.attention_mode == "kv_group" else tuple(shape.num_kv_heads if u else 0 for u in units)
    return KeptSizes(hidden=hidden, heads=tuple(heads_per_unit * u for u in units), kv_heads=kv,
                     neurons=problem.neurons.per_layer(neuron_steps))


# ---- one split -------------------------------------------------------------------------------------------


def _solve(problem: _Problem, split, floor: KeptSizes | None = None) -> KeptSizes | None:
    """The lattice shape nearest the continuous one that spends the budget with exponents `split`, the MLP (the
    finest steps) taking what rounding leaves; None when no shape of that split fits."""
    attention = problem.attention
    fractions = _continuous_fractions(problem, split, floor)
    if fractions is None:
        return None
    x_hidden, x_attention, _ = fractions
    totals = attention.totals.double()
    wanted = x_attention * float(totals[-1])
    steps = int((totals - wanted).abs().argmin())  # nearest; the first on a tie keeps fewer
    lowest = attention.mandatory if floor is None else _steps_for(attention, _attention_units(
        problem.shape, floor, problem.attention_mode))
    for k in range(max(steps, lowest), lowest - 1, -1):  # fewer attention units until a fill exists
        fill = _fill(problem, k, x_hidden * problem.hidden_cap, floor)
        if fill is not None:
            return _kept(problem, k, fill[1], fill[0])
    return None


def _continuous_fractions(problem: _Problem, split, floor) -> tuple[float, float, float] | None:
    """Kept fractions (hidden, attention units, neurons) t**w with t bisected so the (real-valued) count meets the
    budget, each at least its minimum; None when the minimums alone exceed it."""
    attention, neurons, shape = problem.attention, problem.neurons, problem.shape
    heads_per_unit, _ = _attention_unit(shape, problem.attention_mode)
    caps = (problem.hidden_cap, float(attention.totals[-1]), float(neurons.totals[-1]))
    low = floor or _kept(problem, attention.mandatory, neurons.mandatory, _hidden_floor(problem))
    minimum = (low.hidden / caps[0], sum(_attention_units(shape, low, problem.attention_mode)) / caps[1],
               sum(low.neurons) / caps[2])

    def fractions(t: float) -> tuple[float, float, float]:
        return tuple(max(m, t**w) for m, w in zip(minimum, split, strict=True))

    def size(t: float) -> float:
        x_hidden, x_attention, x_neurons = fractions(t)
        units = x_attention * caps[1]
        kv = units if problem.attention_mode == "kv_group" else problem.attention_layers * shape.num_kv_heads
        return count_params(shape, hidden=x_hidden * caps[0], heads=heads_per_unit * units, kv_heads=kv,
                            neurons=x_neurons * caps[2], **_sublayers(problem))

    if size(0.0) > problem.budget:
        return None
    if size(1.0) <= problem.budget:
        return fractions(1.0)
    low_t, high_t = 0.0, 1.0
    for _ in range(60):
        middle = (low_t + high_t) / 2
        low_t, high_t = (middle, high_t) if size(middle) <= problem.budget else (low_t, middle)
    return fractions(low_t)


def _hidden_floor(problem: _Problem) -> int:
    """Fewest hidden channels any shape keeps (loadable with the fewest heads)."""
    uniform = problem.layout == "uniform"
    heads_per_unit, _ = _attention_unit(problem.shape, problem.attention_mode)
    return min(problem.hidden_cap, _hidden_minimum(problem.shape, heads_per_unit if uniform else 1,
                                                   problem.round_to, problem.min_hidden))


def _legal_hidden(problem: _Problem, attention_steps: int) -> torch.Tensor:
    """Hidden sizes loadable with these attention units, ascending: multiples of round_to (uniform: and of the
    kept query heads, as LlamaConfig requires) from min_hidden up, and the cap itself when it is loadable."""
    cap = problem.hidden_cap
    multiple = problem.round_to
    heads = 1
    if problem.layout == "uniform":
        heads = _kept(problem, attention_steps, problem.neurons.mandatory, cap).heads[0]
        multiple = math.lcm(multiple, heads)
    values = torch.arange(1, cap // multiple + 1) * multiple
    values = values[values >= problem.min_hidden]
    if cap % heads == 0 and (values.numel() == 0 or int(values[-1]) != cap):
        values = torch.cat([values, torch.tensor([cap])])
    return values.long()


def _fill(problem: _Problem, attention_steps: int, hidden_wanted: float, floor) -> tuple[int, int] | None:
    """(hidden, neuron steps) for these attention units: the hidden size nearest `hidden_wanted` among those whose
    largest fitting neuron count leaves less than one more neuron step unspent (or, where the MLP is full
    everywhere, the least unspent), ties to the larger; None when nothing fits."""
    shape, neurons = problem.shape, problem.neurons
    hidden = _legal_hidden(problem, attention_steps)
    lowest_neurons = neurons.mandatory if floor is None else _steps_for(neurons, floor.neurons)
    if floor is not None:
        hidden = hidden[hidden >= floor.hidden]
    if hidden.numel() == 0:
        return None
    kept = _kept(problem, attention_steps, 0, 0)
    sizes = dict(heads=sum(kept.heads), kv_heads=sum(kept.kv_heads), neurons=0, **_sublayers(problem))
    bias = count_params(shape, hidden=0, **sizes)
    per_channel = count_params(shape, hidden=1, **sizes) - bias
    room = problem.budget - bias - hidden * per_channel  # what 3·h·neurons may spend
    limit = torch.where(room >= 0, room // (3 * hidden), torch.full_like(room, -1))
    totals = neurons.totals
    steps = (torch.searchsorted(totals, limit, right=True) - 1).clamp_max(len(totals) - 1)
    feasible = steps >= lowest_neurons
    if not bool(feasible.any()):
        return None
    unspent = problem.budget - (hidden * (per_channel + 3 * totals[steps.clamp_min(0)]) + bias)
    tight = feasible & ((steps < len(totals) - 1) | (unspent == unspent[feasible].min()))
    distance = (hidden.double() - hidden_wanted).abs().masked_fill(~tight, math.inf)
    best = len(hidden) - 1 - int(distance.flip(0).argmin())  # ties: the larger hidden size
    return int(hidden[best]), int(steps[best])


def _sublayers(problem: _Problem) -> dict[str, int]:
    """The sublayer counts `count_params` takes: every layer's attention and MLP, less those cut."""
    return {"attention_layers": problem.attention_layers, "mlp_layers": problem.mlp_layers}


def _steps_for(axis: _Steps, per_layer: tuple[int, ...]) -> int:
    """Fewest steps of a uniform axis that keep at least `per_layer[0]` units per layer."""
    cum = torch.nn.functional.pad(axis.size.cumsum(0), (1, 0))
    return int(torch.searchsorted(cum, torch.tensor(max(per_layer))))


def _toward_target(problem: _Problem, target: KeptSizes) -> KeptSizes:
    """The shape on the way from the full model to `target` at this budget: `target` once it fits, else the split
    whose exponents end exactly at it (x = (target / cap)**s), never below it on any type."""
    shape = problem.shape
    if problem.layout != "uniform":
        raise ValueError("a target shape needs the uniform layout")
    if remaining_params(shape, target) <= problem.budget:
        return target
    caps = (problem.hidden_cap, float(problem.attention.totals[-1]), float(problem.neurons.totals[-1]))
    kept = (target.hidden, sum(_attention_units(shape, target, problem.attention_mode)), sum(target.neurons))
    split = tuple(-math.log(k / c) if k < c else 0.0 for k, c in zip(kept, caps, strict=True))
    solved = _solve(problem, split, floor=target)
    return target if solved is None else solved

