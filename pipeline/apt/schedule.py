"""Cubic schedule of the remaining parameter fraction over the pruning window (docs/design.md §4)."""

from __future__ import annotations


def remaining_fraction(step: int, *, start: int, end: int, final: float) -> float:
    """ρ_t = final + (1 - final)(1 - (t - start)/(end - start))³ inside [start, end]; 1 before, final after.

    This is the fraction of parameters kept (1 at the window's start), not the sparsity.
    """
    if not 0 <= start < end:
        raise ValueError(f"need 0 <= start < end, got start={start}, end={end}")
    if not 0 < final <= 1:
        raise ValueError(f"final remaining fraction must be in (0, 1], got {final}")
    if step <= start:
        return 1.0
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final + (1 - final) * (1 - progress) ** 3
