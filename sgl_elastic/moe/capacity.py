"""Each rank's expert budget (slots and relative capacity) from the elastic layout and free memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sgl_elastic.layout import ElasticLayout

__all__ = ["ExpertBudget", "expert_budget"]


@dataclass(frozen=True, slots=True)
class ExpertBudget:
    """Per rank, what ``rebalance_experts`` takes: ``slots`` ``[num_ranks]`` physical expert slots,
    ``capacity`` ``[num_ranks]`` relative capacity (the largest is 1.0; 0 for a dead rank)."""

    slots: tuple[int, ...]
    capacity: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.slots) != len(self.capacity):
            raise ValueError(f"{len(self.slots)} slot counts but {len(self.capacity)} capacities: one per rank")
        if any(s < 0 for s in self.slots) or any(not 0.0 <= c <= 1.0 for c in self.capacity):
            raise ValueError(f"slots {self.slots} must be >= 0 and capacities {self.capacity} in [0, 1]")


def expert_budget(
    layout: ElasticLayout,
    free_bytes: Sequence[int],
    expert_bytes: int,
    *,
    kv_bytes_per_head: int = 0,
    attn_fraction: float = 0.5,
    alive: Sequence[bool] | None = None,
    max_slots: int | None = None,
) -> ExpertBudget:
    """Slots and capacity of every rank of ``layout`` (ranks holding more attention or KV get less).

    Model:
      * Attention share: rank r serves ``q_r`` of the model's ``num_q_heads`` query heads
        (``layout.family("attn")``), so its attention time (compute and KV reads) per step is
        ``A_r = attn_fraction * n * q_r / num_q_heads`` in units of one step of an even split on
        the ``n`` live ranks, where attention takes ``attn_fraction`` of the step and experts the rest.
      * TP ranks step in lockstep: the step ends when the slowest rank does. Its length is set by
        the attention-heaviest rank taking an average expert share: ``T = max_r A_r + (1 - attn_fraction)``.
        The capacity of r is the time it has left for experts, ``T - A_r``, divided by the largest
        (so 1.0 for the ranks with the least attention; all 1.0 when attention is even).
      * Slots: ``(free_bytes[r] - kv_bytes_per_head * kv_heads_r) // expert_bytes`` (>= 0, at
        most ``max_slots``); a slot holds one expert in every MoE layer.
      * A rank with ``alive[r]`` False gets 0 slots and capacity 0.

    Args:
        layout: the layout the ranks run (``tp_size`` ranks; its "attn" family is read).
        free_bytes: ``[tp_size]`` bytes each rank can give to expert weights and its KV pool.
        expert_bytes: bytes of one expert over all MoE layers (one physical slot), > 0.
        kv_bytes_per_head: KV pool bytes a rank must keep per KV head it holds (0 when
            ``free_bytes`` is already net of the KV pool).
        attn_fraction: share of a step spent in attention at an even split, in [0, 1).
    """
    n = layout.tp_size
    alive = [True] * n if alive is None else list(alive)
    if len(free_bytes) != n or len(alive) != n:
        raise ValueError(f"free_bytes ({len(free_bytes)}) and alive ({len(alive)}) need one entry per rank ({n})")
    if expert_bytes <= 0 or kv_bytes_per_head < 0 or any(b < 0 for b in free_bytes):
        raise ValueError(f"{expert_bytes=} must be > 0, {kv_bytes_per_head=} and free_bytes {tuple(free_bytes)} >= 0")
    if not 0.0 <= attn_fraction < 1.0:
        raise ValueError(f"{attn_fraction=} must be in [0, 1): the share of a step spent in attention")
    if max_slots is not None and max_slots < 0:
        raise ValueError(f"{max_slots=} must be >= 0")
    num_live = sum(alive)
    if num_live == 0:
        raise ValueError("no rank is alive")
    attn = layout.family("attn")

    # Step 1: attention time of each live rank; the step length T; the time left for experts.
    attn_time = [attn_fraction * num_live * attn.rank_q_heads(r) / attn.num_q_heads if alive[r] else 0.0
                 for r in range(n)]
    step = max(t for t, a in zip(attn_time, alive) if a) + (1.0 - attn_fraction)
    left = [step - t if a else 0.0 for t, a in zip(attn_time, alive)]
    top = max(left)

    # Step 2: slots from the memory left once the rank's KV pool is set aside.
    slots = []
    for r in range(n):
        s = max(0, (int(free_bytes[r]) - kv_bytes_per_head * attn.rank_kv_heads(r)) // expert_bytes) if alive[r] else 0
        slots.append(s if max_slots is None else min(s, max_slots))
    return ExpertBudget(slots=tuple(slots), capacity=tuple(x / top for x in left))
