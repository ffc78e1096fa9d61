"""Width policies: how many units of a tensor family each rank holds.

All functions are pure and work in *units* (KV-head groups, MLP column blocks, experts, vocab row
blocks), never in elements or bytes. A widths tuple has one entry per rank, in rank order, and sums
to the family's unit count; offsets are derived from it (``unit_offsets``), never ``size // tp``.

Rounding rule everywhere: largest remainder (Hamilton), ties broken towards the lowest rank, so the
result is deterministic. Where the family has at least as many units as ranks, every rank gets at
least one unit (a rank with zero width would hold nothing of that family and break the layer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "equal_widths",
    "capacity_widths",
    "proportional_widths",
    "validate_widths",
    "UNIT_NOUNS",
]

# Human names of a family's unit, used in error messages ("... the model has 8 KV-head groups").
UNIT_NOUNS: dict[str, str] = {
    "attn": "KV-head groups",
    "mlp": "MLP column blocks",
    "moe": "MoE-intermediate column blocks",
    "experts": "experts",
    "vocab": "vocab row blocks",
}


def equal_widths(num_units: int, num_ranks: int) -> tuple[int, ...]:
    """As equal as possible: floor or ceil of ``num_units / num_ranks``, extra units to the lowest ranks.

    ``equal_widths(8, 3) == (3, 3, 2)``. Returns ``num_ranks`` ints summing to ``num_units``.
    """
    if num_ranks <= 0:
        raise ValueError(f"num_ranks={num_ranks} must be >= 1")
    if num_units < 0:
        raise ValueError(f"num_units={num_units} must be >= 0")
    base, extra = divmod(num_units, num_ranks)
    return tuple(base + 1 if r < extra else base for r in range(num_ranks))


def _largest_remainder(num_units: int, weights: Sequence[float], what: str) -> tuple[int, ...]:
    """Apportion ``num_units`` proportionally to ``weights`` (Hamilton), >= 1 unit per rank when possible."""
    num_ranks = len(weights)
    if num_ranks == 0:
        raise ValueError(f"{what}: need at least one rank")
    if any((not math.isfinite(w)) or w < 0 for w in weights):
        raise ValueError(f"{what} must be finite and >= 0, got {tuple(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"{what} sum to {total}; give every rank a positive weight")
    quotas = [num_units * w / total for w in weights]
    min_width = 1 if num_units >= num_ranks else 0
    widths = [max(min_width, math.floor(q)) for q in quotas]
    left = num_units - sum(widths)
    # Step 1: hand out the remaining units by largest remainder (ties -> lowest rank).
    if left > 0:
        order = sorted(range(num_ranks), key=lambda r: (-(quotas[r] - widths[r]), r))
        for i in range(left):
            widths[order[i % num_ranks]] += 1
    # Step 2: the >= 1 floor may have over-allocated; take units back from the most over-served
    # ranks (largest widths[r] - quota[r]) that stay at or above the floor (ties -> highest rank).
    while left < 0:
        candidates = [r for r in range(num_ranks) if widths[r] > min_width]
        r = max(candidates, key=lambda r: (widths[r] - quotas[r], r))
        widths[r] -= 1
        left += 1
    return tuple(widths)


def capacity_widths(num_units: int, capacities: Sequence[float]) -> tuple[int, ...]:
    """Widths proportional to ``capacities`` (one float per rank, e.g. free bytes or a weight).

    Largest-remainder rounding; every rank keeps >= 1 unit when ``num_units >= len(capacities)``.
    ``capacity_widths(8, [1, 1, 2]) == (2, 2, 4)``.
    """
    return _largest_remainder(num_units, [float(c) for c in capacities], "capacities")


def proportional_widths(num_units: int, reference_widths: Sequence[int]) -> tuple[int, ...]:
    """Widths for a family of ``num_units`` following the proportions of ``reference_widths``.

    Used to make MLP / MoE / vocab / expert widths follow the attention widths: with attention
    (3, 3, 2) and 768 MLP blocks the result is (288, 288, 192).
    """
    return _largest_remainder(num_units, [float(w) for w in reference_widths], "reference widths")


def validate_widths(widths: Sequence[int], num_units: int, family: str) -> tuple[int, ...]:
    """Check that ``widths`` is a valid split of ``num_units`` units of ``family``; return it as a tuple.

    Raises ValueError with the arithmetic, e.g.
    "attn: widths 3,3,3 sum to 9 units but the model has 8 KV-head groups".
    """
    noun = UNIT_NOUNS.get(family, "units")
    widths = tuple(widths)
    shown = ",".join(str(w) for w in widths)
    if not widths:
        raise ValueError(f"{family}: widths are empty; give one width per rank")
    if any(not isinstance(w, int) or isinstance(w, bool) for w in widths):
        raise ValueError(f"{family}: widths {widths!r} must be ints (units per rank)")
    if any(w < 0 for w in widths):
        raise ValueError(f"{family}: widths {shown} contain a negative width")
    if sum(widths) != num_units:
        raise ValueError(
            f"{family}: widths {shown} sum to {sum(widths)} units but the model has {num_units} {noun}"
            f" (e.g. use equal_widths({num_units}, {len(widths)}) = {equal_widths(num_units, len(widths))})"
        )
    zero = [r for r, w in enumerate(widths) if w == 0]
    if zero and num_units >= len(widths):
        raise ValueError(
            f"{family}: rank(s) {zero} have zero width in widths {shown}; with {num_units} {noun} on"
            f" {len(widths)} ranks every rank needs >= 1 unit (move a unit from a wider rank)"
        )
    return widths
