"""Placed experts in a migration: which rank holds which expert of each MoE layer, and the moves.

Used by ``cmm.plan_migration`` / ``cmm.build_plan`` when the old layout's experts are placed
(``FamilyLayout.placement``) or the caller passes expert loads (a rebalance). Granules are single
experts of single layers, so the contiguous-range machinery of the other families does not apply:

- *Choice* (``choose_placement``). A rebalance (``rebalance=True``, loads given):
  ``moe.rebalance_experts`` over the new ranks' widths (slots, one replica per expert) and
  capacities gives each new rank a group of experts per layer; which rank takes which group is then
  an assignment (Hungarian, per layer) among ranks of equal width and capacity that maximises the
  experts a device already holds. A swap search from the current placement competes with it: per
  layer the placement moving the fewest experts within ``REBALANCE_TOL`` (2 %) of the better max
  load / capacity wins, so a periodic rebalance moves a few experts of the layers that drifted.
  Otherwise (a failure): every device keeps what it held, up to its new width, and the orphans (a
  dead rank's experts, and a shrunk rank's extra ones) fill the free slots: with loads, heaviest
  first, each to the rank whose load / capacity it raises least; without, in expert order. Keeping is what a failure wants: only lost experts move (host reloads, no peer
  copy), and a survivor that gains experts keeps every one at the same or a higher offset of its
  shard, so the executor can regrow its file in place.
- *Moves* (``expert_ops``): per layer and expert, keep when the device holds it, else a peer copy
  from the holder with the fastest link (then the least loaded), else a host reload; consecutive
  experts with the same source and destination merge into one op.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sgl_elastic.layout import ElasticLayout, FamilyLayout
from sgl_elastic.planner.plan import HOST, KEEP, PEER, RELOAD, FamilyOp
from sgl_elastic.planner.topology import Topology

__all__ = ["choose_placement", "default_capacity", "expert_ops", "expert_imbalance", "moe_layers", "is_placed"]


def moe_layers(layout: ElasticLayout) -> tuple[int, ...]:
    if layout.model is None:
        raise ValueError("placing experts needs a layout with a model shape")
    return layout.model.moe_layers


def is_placed(layout: ElasticLayout) -> bool:
    return "experts" in layout.families and bool(layout.family("experts").placement)


def default_capacity(layout: ElasticLayout) -> tuple[float, ...]:
    """Each rank's relative capacity for experts from its attention share (``moe.expert_budget``; memory
    is not the limit: every rank holds its width of experts)."""
    from sgl_elastic.moe import expert_budget

    return expert_budget(layout, [1 << 50] * layout.tp_size, 1).capacity


def _holders(fam: FamilyLayout, layer: int, survivors: Sequence[int]) -> dict[int, int]:
    """expert -> surviving slot (= old rank) that holds it in ``layer``."""
    live = set(survivors)
    out = {}
    for e in range(fam.num_units):
        r = fam.expert_owner(layer, e)
        if r in live:
            out[e] = r
    return out


def choose_placement(old: ElasticLayout, new_fam: FamilyLayout, order: Sequence[int], survivors: Sequence[int],
                     loads=None, capacity: Sequence[float] | None = None, rebalance: bool = False) -> FamilyLayout:
    """``new_fam`` (its widths chosen) with a placement for new ranks on slots ``order``.

    ``loads``: ``[num_layers, num_experts]`` tokens routed per expert (rows of dense layers ignored),
    or None; ``capacity``: ``[new tp]`` relative capacity of each new rank (None: all equal);
    ``rebalance``: place every expert by the loads, else keep and fill (module docstring).
    """
    old_fam = old.family("experts")
    layers = moe_layers(old)
    n, E = new_fam.num_ranks, new_fam.num_units
    widths = new_fam.widths
    cap = [1.0] * n if capacity is None else [float(c) for c in capacity]
    if len(cap) != n:
        raise ValueError(f"{len(cap)} expert capacities for {n} new ranks")
    rows: list[tuple[int, ...]] = []
    groups_all = w = None
    if rebalance and loads is None:
        raise ValueError("a rebalance needs expert loads")
    if loads is not None:
        w = np.asarray(loads, dtype=np.float64)
        if w.ndim != 2 or w.shape[1] != E or w.shape[0] != old.model.num_layers:
            raise ValueError(f"expert loads of shape {tuple(w.shape)}; need [{old.model.num_layers} layers, {E} experts]")
        if (w < 0).any() or not np.isfinite(w).all():
            raise ValueError("expert loads must be finite and >= 0")
    if rebalance:
        import torch

        from sgl_elastic.moe import rebalance_experts

        phy2log, _, _ = rebalance_experts(torch.from_numpy(w[list(layers)]), list(widths), cap)
        offs = np.concatenate([[0], np.cumsum(widths)])
        groups_all = [[tuple(int(x) for x in phy2log[i, offs[r]:offs[r + 1]]) for r in range(n)]
                      for i in range(len(layers))]
    moe_rows = {}
    for i, layer in enumerate(layers):
        held = _holders(old_fam, layer, survivors)
        own = [{e for e, s in held.items() if s == order[r]} for r in range(n)]
        if groups_all is not None:
            owner = _fewest_moves(_assign_groups(groups_all[i], own, widths, cap), own, widths, w[layer], cap)
        else:
            owner = _keep_then_fill(own, widths, E, None if w is None else w[layer], cap)
        moe_rows[layer] = tuple(owner)
    filler = moe_rows[layers[0]] if layers else tuple(r for r in range(n) for _ in range(widths[r]))
    for layer in range(old.model.num_layers):
        rows.append(moe_rows.get(layer, filler))
    return new_fam.placed(rows)


def _keep_then_fill(own: list[set[int]], widths: Sequence[int], E: int, w=None,
                    cap: Sequence[float] = ()) -> list[int]:
    """Each rank keeps its experts (the heaviest when it shrinks); the orphans fill the free slots."""
    owner = [-1] * E
    free = [0] * len(own)
    load = [0.0] * len(own)
    for r, mine in enumerate(own):
        kept = sorted(mine, key=lambda e: (-w[e], e) if w is not None else e)[: widths[r]]
        for e in kept:
            owner[e] = r
            load[r] += w[e] if w is not None else 0.0
        free[r] = widths[r] - len(kept)
    orphans = [e for e in range(E) if owner[e] < 0]
    if w is None:
        slots = [r for r in range(len(own)) for _ in range(free[r])]
        for e, r in zip(orphans, slots):
            owner[e] = r
        return owner
    for e in sorted(orphans, key=lambda e: (-w[e], e)):  # heaviest first, to the least raised load / capacity
        r = min((r for r in range(len(own)) if free[r] > 0), key=lambda r: ((load[r] + w[e]) / max(cap[r], 1e-9), r))
        owner[e] = r
        load[r] += w[e]
        free[r] -= 1
    return owner


REBALANCE_TOL = 0.02  # a rebalance may end this much above the full one's max load / capacity to move less


def _max_ratio(owner, w, cap) -> float:
    per = np.bincount(np.asarray(owner), weights=w, minlength=len(cap))
    return float((per / np.maximum(np.asarray(cap, dtype=np.float64), 1e-12)).max())


def _swap_search(owner: list[int], w, cap: Sequence[float], target: float, max_swaps: int) -> list[int]:
    """Pairwise expert swaps from ``owner`` (counts per rank unchanged) while the busiest rank's
    load / capacity is above ``target``: each swap exchanges one expert of the busiest rank for a
    lighter one of another rank, the pair whose larger new ratio is lowest (so no rank ends above
    the old maximum, and the maximum, or the number of ranks at it, falls)."""
    own = np.asarray(owner).copy()
    c = np.maximum(np.asarray(cap, dtype=np.float64), 1e-12)
    n = len(c)
    for _ in range(max_swaps):
        per = np.bincount(own, weights=w, minlength=n)
        f = per / c
        top = int(f.argmax())
        if f[top] <= target:
            break
        a_idx = np.flatnonzero(own == top)
        b_idx = np.flatnonzero(own != top)
        if not len(a_idx) or not len(b_idx):
            break
        d = w[a_idx][:, None] - w[b_idx][None, :]  # load leaving the busiest rank for each (a, b)
        other = own[b_idx]
        new_top = (per[top] - d) / c[top]
        new_other = (per[other][None, :] + d) / c[other][None, :]
        worst = np.maximum(new_top, new_other)
        worst[d <= 0] = np.inf
        k = int(worst.argmin())
        if not worst.flat[k] < f[top] - 1e-12:
            break
        ia, ib = divmod(k, len(b_idx))
        ea, eb = a_idx[ia], b_idx[ib]
        own[ea], own[eb] = own[eb], top
    return [int(x) for x in own]


def _fewest_moves(full: list[int], own: list[set[int]], widths: Sequence[int], w, cap: Sequence[float]) -> list[int]:
    """Of the full rebalance (``full``) and a swap search from what the ranks hold now, the placement
    that moves the fewest experts among those within ``REBALANCE_TOL`` of the better max load /
    capacity: a layer already near balance moves a few experts (or none), not a whole new group."""
    w = np.asarray(w, dtype=np.float64)
    target = _max_ratio(full, w, cap)
    start = _keep_then_fill(own, widths, len(full), w, cap)
    local = _swap_search(start, w, cap, target * (1 + REBALANCE_TOL), max_swaps=len(full))
    cands = [(full, target), (local, _max_ratio(local, w, cap))]
    best = min(m for _, m in cands)

    def moved(owner) -> int:
        return sum(e not in own[r] for e, r in enumerate(owner))

    ok = [o for o, m in cands if m <= best * (1 + REBALANCE_TOL) + 1e-12]
    return min(ok, key=moved)


def _assign_groups(groups: list[tuple[int, ...]], own: list[set[int]], widths: Sequence[int],
                   cap: Sequence[float]) -> list[int]:
    """Owner of every expert when new rank r may take group g of a rank with the same width and
    capacity (the balance is unchanged), choosing the assignment that keeps the most experts."""
    from scipy.optimize import linear_sum_assignment

    n = len(groups)
    big = 10 * (sum(len(g) for g in groups) + 1)
    cost = np.full((n, n), float(big))
    for r in range(n):
        for g in range(n):
            if widths[r] == widths[g] and abs(cap[r] - cap[g]) <= 1e-9:
                cost[r, g] = -len(own[r] & set(groups[g]))
    rr, gg = linear_sum_assignment(cost)
    owner = [-1] * sum(len(g) for g in groups)
    for r, g in zip(rr, gg):
        for e in groups[g]:
            owner[e] = int(r)
    return owner


def expert_ops(old: ElasticLayout, new: ElasticLayout, order: Sequence[int], survivors: Sequence[int],
               topo: Topology, w_layer: int, peer_out: dict[int, int], allow_keep: bool = True,
               allow_peer: bool = True) -> tuple[list[FamilyOp], int]:
    """Per-layer expert ops turning ``old`` into ``new`` (new rank r on slot ``order[r]``), and the
    reload lower bound (bytes of experts no survivor holds). ``w_layer``: bytes of one expert of one layer."""
    old_fam, new_fam = old.family("experts"), new.family("experts")
    ops: list[FamilyOp] = []
    lower = 0
    for layer in moe_layers(old):
        held = _holders(old_fam, layer, survivors)
        lower += w_layer * (old_fam.num_units - len(held))
        last: list | None = None  # [kind, src_slot, src_rank, dst_rank, start, end]
        pieces: list[list] = []
        for e in range(new_fam.num_units):
            r = new_fam.expert_owner(layer, e)
            slot = order[r]
            src = held.get(e)
            if not allow_keep or src is None or (src != slot and (not allow_peer or not topo.reachable(src, slot))):
                piece = [RELOAD, HOST, -1, r]
            elif src == slot:
                piece = [KEEP, slot, slot, r]
            else:
                piece = [PEER, src, src, r]
                peer_out[src] = peer_out.get(src, 0) + w_layer
            if last is not None and last[:4] == piece and last[5] == e:
                last[5] = e + 1
            else:
                last = piece + [e, e + 1]
                pieces.append(last)
        for kind, src, src_rank, dst, a, b in pieces:
            ops.append(FamilyOp("experts", "e", kind, src, src_rank, dst, a, b, (b - a) * w_layer, 0, layer))
    return ops, lower


def expert_imbalance(layout: ElasticLayout, loads, capacity: Sequence[float] | None = None) -> float:
    """How much slower the busiest rank's experts are than a perfect split: over the MoE layers, the mean
    of ``max_r(load_r / capacity_r) / (total load / total capacity)`` (1.0: perfect; 0.0 without loads).
    ``loads``: ``[num_layers, num_experts]``; ``capacity``: ``[tp]`` (None: all equal)."""
    fam = layout.family("experts")
    w = np.asarray(loads, dtype=np.float64)
    cap = np.ones(fam.num_ranks) if capacity is None else np.asarray(capacity, dtype=np.float64)
    out = []
    for layer in moe_layers(layout):
        total = w[layer].sum()
        if total <= 0:
            continue
        owner = np.array([fam.expert_owner(layer, e) for e in range(fam.num_units)])
        per_rank = np.bincount(owner, weights=w[layer], minlength=fam.num_ranks)
        out.append(float((per_rank / cap).max() / (total / cap.sum())))
    return float(np.mean(out)) if out else 0.0
