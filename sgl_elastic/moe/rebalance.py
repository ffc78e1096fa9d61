"""Capacity-weighted expert rebalancer: load statistics -> physical expert placement (pure, CPU torch).

Vocabulary (DeepSeek EPLB's): a *logical* expert is an expert of the model; a *physical* expert is
a slot on a rank holding a copy (replica) of one logical expert. Physical ids run rank by rank:
rank 0's ``slots_per_rank[0]`` slots first. A rank is *live* when it has slots and a capacity > 0;
the slots of the other ranks are *dead*: they hold nothing (``phy2log == -1``) and appear in no
``log2phy`` row.

Objective, per layer: minimise ``max over live ranks r of load[r] / capacity[r]``, where
``load[r]`` is the sum, over the slots of r, of ``weight[expert] / logcnt[expert]`` (an expert's
load split evenly over its replicas). Every live slot is filled, every logical expert keeps >= 1
live replica.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["rebalance_experts", "rank_load_ratio"]

_EPS = 1e-12  # relative: a swap must lower the worst of its two ranks by more than this


def rebalance_experts(
    weight: torch.Tensor,
    slots_per_rank: Sequence[int] | torch.Tensor,
    capacity: Sequence[float] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place replicas of the logical experts on the slots of the live ranks, weighted by capacity.

    Args:
        weight: ``[num_layers, num_logical]`` load statistics (tokens routed per expert), >= 0.
        slots_per_rank: ``[num_ranks]`` physical expert slots of each rank (0 for a dead rank); the
            live ranks' slots must number >= num_logical. ``num_physical = sum(slots_per_rank)``.
        capacity: ``[num_ranks]`` relative capacity of each rank (default all 1.0; 0 for a dead rank).

    Returns (DeepSeek EPLB's shapes, int64, CPU):
        phy2log: ``[num_layers, num_physical]`` logical expert of each slot, -1 on dead slots.
        log2phy: ``[num_layers, num_logical, max_replicas]`` physical ids of each expert's replicas,
            ascending, -1 padded; ``max_replicas = logcnt.max()``.
        logcnt: ``[num_layers, num_logical]`` live replicas of each expert, >= 1 (sums to the live slots).

    Algorithm, per layer: (1) replica counts by the greedy "next replica to the largest
    weight / replicas" rule (DeepSeek's); (2) two packings of the replicas onto the live slots,
    heaviest first: DeepSeek's (to the least loaded rank with a free slot, capacity ignored) and a
    capacity-aware one (to the rank with the lowest (load + replica) / capacity), each improved by
    swaps between the worst rank and another; the better one is kept; (3) a local search that
    swaps replicas or hands a slot of a replicated expert to another expert, while that lowers the
    largest load / capacity. Every step keeps or lowers the objective of DeepSeek's packing, so
    with equal slots the result is never worse than DeepSeek's EPLB. Each rank's slots hold their
    experts in ascending logical id.
    """
    w, slots, cap = _validate(weight, slots_per_rank, capacity)
    num_layers, num_logical = w.shape
    live = [r for r in range(len(slots)) if slots[r] > 0 and cap[r] > 0]
    offsets = np.concatenate([[0], np.cumsum(slots)]).astype(np.int64)
    num_physical = int(offsets[-1])
    live_slots = [int(slots[r]) for r in live]
    live_cap = [float(cap[r]) for r in live]

    # Step 1: replica counts, all layers at once (float32 ties resolved to the lowest expert id,
    # as DeepSeek's EPLB does, so that its packing can be reproduced exactly).
    w32 = w.to(torch.float32)
    logcnt = torch.ones(num_layers, num_logical, dtype=torch.int64)
    rows = torch.arange(num_layers)
    for _ in range(sum(live_slots) - num_logical):
        logcnt[rows, torch.argmax(w32 / logcnt, dim=-1)] += 1

    phy2log = torch.full((num_layers, num_physical), -1, dtype=torch.int64)
    w64 = w.to(torch.float64).numpy()
    for layer in range(num_layers):
        cnt = logcnt[layer].numpy()
        experts = np.repeat(np.arange(num_logical), cnt)  # one entry per replica
        share64 = w64[layer][experts] / cnt[experts]
        share32 = (w32[layer].numpy()[experts] / cnt[experts].astype(np.float32)).astype(np.float64)
        order = np.argsort(-share32, kind="stable")
        # Step 2: both packings, each refined by swaps (replica counts kept); keep the better one.
        best = None
        for aware in (False, True):
            held = _held(_pack(order, share32, share64, live_slots, live_cap, aware), experts, num_logical)
            _refine(held, w64[layer], live_cap, recount=False)
            score = _worst(held, w64[layer], live_cap)
            if best is None or score < best[0]:
                best = (score, held)
        # Step 3: local search that may also move a replica to another expert (counts change).
        held = best[1]
        _refine(held, w64[layer], live_cap, recount=True)
        logcnt[layer] = torch.from_numpy(held.sum(0))
        for i, r in enumerate(live):
            phy2log[layer, offsets[r]: offsets[r + 1]] = torch.from_numpy(np.repeat(np.arange(num_logical), held[i]))

    return phy2log, _log2phy(phy2log, logcnt), logcnt


def rank_load_ratio(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    slots_per_rank: Sequence[int] | torch.Tensor,
    capacity: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """``[num_layers, num_ranks]`` float64 load / capacity of every rank of a placement (0 if dead).

    Replicas are counted on live slots only (a rank with slots and capacity > 0); a dead slot may
    hold anything (SGLang's ``elasticity_aware`` fills them with expert 0). An expert with no live
    replica is a ValueError. ``phy2log``: ``[num_layers, sum(slots_per_rank)]``.
    """
    w, slots, cap = _validate(weight, slots_per_rank, capacity, need_fit=False)
    num_layers, num_logical = w.shape
    offsets = np.concatenate([[0], np.cumsum(slots)]).astype(np.int64)
    if tuple(phy2log.shape) != (num_layers, int(offsets[-1])):
        raise ValueError(f"{tuple(phy2log.shape)=} but weight gives {num_layers} layers and slots sum to {offsets[-1]}")
    p2l = phy2log.to(torch.int64).cpu().numpy()
    rank_of_slot = np.repeat(np.arange(len(slots)), slots)
    alive = (slots > 0)[rank_of_slot] & (cap > 0)[rank_of_slot]
    w64 = w.to(torch.float64).numpy()
    out = np.zeros((num_layers, len(slots)))
    for layer in range(num_layers):
        ids = p2l[layer][alive]
        if ids.size and (ids.min() < 0 or ids.max() >= num_logical):
            raise ValueError(f"layer {layer}: a live slot holds an id outside [0, {num_logical})")
        cnt = np.bincount(ids, minlength=num_logical)
        if (cnt == 0).any():
            raise ValueError(f"layer {layer}: experts {np.flatnonzero(cnt == 0)[:8].tolist()} have no live replica")
        load = np.bincount(rank_of_slot[alive], weights=w64[layer][ids] / cnt[ids], minlength=len(slots))
        out[layer] = np.divide(load, cap, out=np.zeros_like(load), where=cap > 0)
    return torch.from_numpy(out)


# ---- helpers ------------------------------------------------------------------------------------
def _validate(weight, slots_per_rank, capacity, need_fit: bool = True):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a [num_layers, num_logical] tensor, got {getattr(weight, 'shape', type(weight))}")
    num_layers, num_logical = weight.shape
    if num_layers < 1 or num_logical < 1:
        raise ValueError(f"{weight.shape=}: needs >= 1 layer and >= 1 logical expert")
    w = weight.detach().cpu().to(torch.float64)
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("weight must be finite and >= 0 (tokens routed per expert)")
    slots = np.asarray(torch.as_tensor(slots_per_rank).cpu().tolist() if isinstance(slots_per_rank, torch.Tensor)
                       else list(slots_per_rank))
    if slots.ndim != 1 or slots.size < 1 or not all(float(s).is_integer() for s in slots.tolist()):
        raise ValueError(f"slots_per_rank must be a non-empty sequence of ints, got {slots.tolist()}")
    slots = slots.astype(np.int64)
    if (slots < 0).any():
        raise ValueError(f"slots_per_rank {slots.tolist()} has a negative count")
    if capacity is None:
        cap = np.ones(len(slots))
    else:
        cap = np.asarray(capacity.cpu().tolist() if isinstance(capacity, torch.Tensor) else list(capacity), dtype=float)
        if cap.shape != slots.shape:
            raise ValueError(f"capacity has {cap.size} entries but slots_per_rank has {slots.size}: one per rank")
        if not np.isfinite(cap).all() or (cap < 0).any():
            raise ValueError(f"capacity {cap.tolist()} must be finite and >= 0 (0 for a dead rank)")
    if need_fit:
        live = (slots > 0) & (cap > 0)
        if not live.any():
            raise ValueError(f"all ranks are dead (slots {slots.tolist()}, capacity {cap.tolist()}): nothing to place on")
        if slots[live].sum() < num_logical:
            raise ValueError(
                f"the live ranks have {int(slots[live].sum())} slots ({'+'.join(map(str, slots[live].tolist()))})"
                f" but there are {num_logical} logical experts: each needs one"
            )
    return w, slots, cap


def _pack(order, share32, share64, slots, cap, aware: bool) -> list[list[int]]:
    """Replicas (indices, heaviest first) -> the replica indices of each live rank.

    ``aware=False``: DeepSeek's packing (least loaded rank with a free slot, sums of float32 shares,
    ties to the lowest rank). ``aware=True``: lowest (load + share) / capacity, ties to the lower
    load / capacity, then the lowest rank.
    """
    num_ranks = len(slots)
    load = [0.0] * num_ranks
    items: list[list[int]] = [[] for _ in range(num_ranks)]
    for i in order:
        free = [r for r in range(num_ranks) if len(items[r]) < slots[r]]
        if aware:
            s = share64[i]
            r = min(free, key=lambda q: ((load[q] + s) / cap[q], load[q] / cap[q]))
            load[r] += s
        else:
            r = min(free, key=load.__getitem__)
            load[r] += share32[i]
        items[r].append(int(i))
    return items


def _held(items: list[list[int]], experts: np.ndarray, num_logical: int) -> np.ndarray:
    """Replica indices per rank -> ``[num_ranks, num_logical]`` replicas of each expert on each rank."""
    held = np.zeros((len(items), num_logical), dtype=np.int64)
    for r, it in enumerate(items):
        np.add.at(held[r], experts[np.asarray(it, dtype=np.int64)], 1)
    return held


def _worst(held: np.ndarray, w: np.ndarray, cap: Sequence[float]) -> float:
    return float(np.max(held @ (w / held.sum(0)) / np.asarray(cap, dtype=float)))


def _refine(held: np.ndarray, w: np.ndarray, cap: Sequence[float], recount: bool, max_moves: int | None = None) -> None:
    """Local search on ``held`` (``[num_ranks, num_logical]`` replica counts per rank), in place.

    Moves, the first that helps is taken: (a) swap two replicas between the worst rank and another
    when the worse of the two ends lower than the worst was; (b) with ``recount``, give one slot
    of an expert with >= 2 replicas to another expert when that lowers the largest load / capacity.
    Each move strictly lowers the sorted vector of load / capacity, so this ends; ``max_moves``
    (default 4 x slots) bounds the work. Slot counts per rank never change; every expert keeps >= 1.
    """
    num_ranks, num_logical = held.shape
    capv = np.asarray(cap, dtype=float)
    cnt = held.sum(0)
    for _ in range(max_moves if max_moves is not None else 4 * int(cnt.sum())):
        share = w / cnt
        load = held @ share
        ratio = load / capv
        r = int(np.argmax(ratio))
        worst = ratio[r]
        limit = worst * (1 - _EPS) - _EPS * 1e-3
        # (a) swap expert a on r with expert b on q.
        on_r = np.flatnonzero(held[r])
        best = (limit, -1, -1, -1)
        for q in range(num_ranks):
            on_q = np.flatnonzero(held[q])
            if q == r or on_q.size == 0:
                continue
            delta = share[on_r][:, None] - share[on_q][None, :]  # load moved r -> q
            new = np.maximum((load[r] - delta) / capv[r], (load[q] + delta) / capv[q])
            i, j = np.unravel_index(int(np.argmin(new)), new.shape)
            if new[i, j] < best[0]:
                best = (float(new[i, j]), q, int(on_r[i]), int(on_q[j]))
        _, q, a, b = best
        if q >= 0:
            held[r, a] -= 1
            held[r, b] += 1
            held[q, b] -= 1
            held[q, a] += 1
            continue
        if not recount:
            break
        # (b) one slot on rank x changes from expert a (>= 2 replicas) to expert b.
        src = np.flatnonzero(cnt >= 2)
        if src.size == 0:
            break
        dec = w[src] / (cnt[src] - 1)  # share of a after the move
        inc = w / (cnt + 1)  # share of b after the move
        # base[i, b, k]: load of rank k with a = src[i] and b recounted, the slot not yet moved
        base = (load[None, None, :] + (held[:, src].T * (dec - share[src])[:, None])[:, None, :]
                + (held.T * (inc - share)[:, None])[None, :, :])
        base /= capv
        top = np.sort(base, axis=-1)
        top1 = top[..., -1]
        top2 = top[..., -2] if num_ranks > 1 else np.full_like(top1, -np.inf)
        arg = np.argmax(base, axis=-1)
        bestb = (limit, -1, -1, -1)
        for x in range(num_ranks):
            rest = np.where(arg == x, top2, top1)
            moved = base[..., x] + (inc[None, :] - dec[:, None]) / capv[x]
            new = np.maximum(rest, moved)
            new[held[x, src] == 0, :] = np.inf  # x must hold a
            new[np.arange(src.size), src] = np.inf  # b != a
            i, j = np.unravel_index(int(np.argmin(new)), new.shape)
            if new[i, j] < bestb[0]:
                bestb = (float(new[i, j]), x, int(src[i]), int(j))
        _, x, a, b = bestb
        if x < 0:
            break
        held[x, a] -= 1
        held[x, b] += 1
        cnt[a] -= 1
        cnt[b] += 1


def _log2phy(phy2log: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    num_layers, num_logical = logcnt.shape
    max_replicas = int(logcnt.max())
    log2phy = torch.full((num_layers, num_logical, max_replicas), -1, dtype=torch.int64)
    for layer in range(num_layers):
        p2l = phy2log[layer]
        phys = torch.nonzero(p2l >= 0).flatten()
        experts = p2l[phys]
        order = torch.argsort(experts * phy2log.shape[1] + phys)  # by expert, then physical id
        experts, phys = experts[order], phys[order]
        first = torch.cumsum(logcnt[layer], 0) - logcnt[layer]
        log2phy[layer, experts, torch.arange(experts.numel()) - first[experts]] = phys
    return log2phy

