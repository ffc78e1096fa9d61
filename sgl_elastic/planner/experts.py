"""Placed experts in a migration: which rank holds which expert of each MoE layer, and the moves.

Used by ``cmm.plan_migration`` / ``cmm.build_plan`` when the old layout's experts are placed
(``FamilyLayout.held``) or the caller passes expert loads (a rebalance). Granules are single experts
of single layers, so the contiguous-range machinery of the other families does not apply. One path
serves single and redundant experts: without ``--elastic-redundant-experts`` every expert simply has
one copy (``redundant`` 0), and a placement is always each rank's experts per layer in slot order.

- *Slots.* With no redundant slots a new rank's slot count is its width, as the planner chose it.
  With some, the new ranks keep the same number of redundant slots (at most what fits: a rank holds
  an expert once), split in proportion to the ranks' capacities when loads are given, else equally.
- *A failure* (``rebalance=False``): every device keeps what it held, up to its slots (sole copies
  first, then the heaviest); an expert no survivor holds takes a free slot (the one whose rank's
  load / capacity it raises least), else the slot of a copy held twice; free slots left then take,
  one by one, the copy that lowers the max load / capacity most, copies of experts some survivor
  holds first (peer copies, not second host reloads). Only lost experts are reloaded, and a lost
  expert another survivor also holds is no reload at all.
- *A rebalance* (loads given): ``moe.rebalance_experts`` over the slots and capacities gives each
  rank a group per layer (a second copy of an expert on one rank is exchanged for an expert of
  similar load per copy on a rank without one); which rank takes which group is an assignment
  (Hungarian, per layer) among ranks of equal slots and capacity that keeps the most experts where
  they are. A swap search from what the ranks hold competes with it: per layer the placement moving
  the fewest experts within ``REBALANCE_TOL`` (2 %) of the better max load / capacity wins, so a
  periodic rebalance moves a few experts of the layers that drifted.
- *Slot order* (``_in_slot_order``): an expert a device keeps stays in its slot and a newcomer takes
  the slot of one that left, so the executor rewrites only the slots that change, in place.
- *Moves* (``expert_ops``): per new rank and expert, keep when the device holds it, else a peer copy
  from the surviving holder with the fastest link (then the one sending least), else a host reload;
  consecutive experts with the same source merge into one op.

Load model everywhere: an expert's load splits evenly over its copies (as the dispatch splits its
tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sgl_elastic.layout import ElasticLayout, FamilyLayout
from sgl_elastic.planner.plan import HOST, KEEP, PEER, RELOAD, FamilyOp, MovePiece
from sgl_elastic.planner.topology import Topology

__all__ = ["choose_placement", "default_capacity", "expert_ops", "expert_imbalance", "moe_layers", "is_placed"]

REBALANCE_TOL = 0.02  # a rebalance may end this much above the full one's max load / capacity to move less


def moe_layers(layout: ElasticLayout) -> tuple[int, ...]:
    if layout.model is None:
        raise ValueError("placing experts needs a layout with a model shape")
    return layout.model.moe_layers


def is_placed(layout: ElasticLayout) -> bool:
    return "experts" in layout.families and bool(layout.family("experts").held)


def default_capacity(layout: ElasticLayout) -> tuple[float, ...]:
    """Each rank's relative capacity for experts from its attention share (``moe.expert_budget``; memory
    is not the limit: every rank holds its width of experts)."""
    from sgl_elastic.moe import expert_budget

    return expert_budget(layout, [1 << 50] * layout.tp_size, 1).capacity


def _holders(fam: FamilyLayout, layer: int, survivors: Sequence[int]) -> dict[int, list[int]]:
    """expert -> every surviving slot (= old rank) that holds it in ``layer`` (experts none holds: absent)."""
    live = set(survivors)
    expert2slots: dict[int, list[int]] = {}
    for e in range(fam.num_units):
        slots = [r for r in fam.expert_holders(layer, e) if r in live]
        if slots:
            expert2slots[e] = slots
    return expert2slots


def choose_placement(old: ElasticLayout, new_fam: FamilyLayout, order: Sequence[int], survivors: Sequence[int],
                     loads=None, capacity: Sequence[float] | None = None, rebalance: bool = False,
                     placer=None) -> FamilyLayout:
    """``new_fam`` (its widths chosen) with the experts each new rank holds (slots ``order``).

    ``loads``: ``[num_layers, num_experts]`` tokens routed per expert (rows of dense layers ignored),
    or None; ``capacity``: ``[new tp]`` relative capacity of each new rank (None: all equal);
    ``rebalance``: place every expert by the loads, else keep and fill (module docstring).
    ``placer``: a rebalance's placement algorithm instead of ``moe.rebalance_experts`` (a baseline to
    compare with, e.g. DeepSeek's EPLB): ``placer(weight [moe layers, E] float64 tensor, slots per
    rank, capacity) -> phy2log``, on equal slots per rank; its groups are applied as they are (only
    assigned to the ranks keeping the most experts), with no movement-aware alternative.
    """
    from sgl_elastic.layout.widths import equal_widths

    old_fam = old.family("experts")
    layers = moe_layers(old)
    n, E = new_fam.num_ranks, new_fam.num_units
    cap = [1.0] * n if capacity is None else [float(c) for c in capacity]
    if len(cap) != n:
        raise ValueError(f"{len(cap)} expert capacities for {n} new ranks")
    if rebalance and loads is None:
        raise ValueError("a rebalance needs expert loads")
    w = None
    if loads is not None:
        w = np.asarray(loads, dtype=np.float64)
        if w.ndim != 2 or w.shape[1] != E or w.shape[0] != old.model.num_layers:
            raise ValueError(f"expert loads of shape {tuple(w.shape)}; need [{old.model.num_layers} layers, {E} experts]")
        if (w < 0).any() or not np.isfinite(w).all():
            raise ValueError("expert loads must be finite and >= 0")
    redundant = min(old_fam.redundant, n * E - E)
    if not redundant:
        slots = tuple(new_fam.widths)
    elif placer is not None:
        slots = equal_widths(E + redundant, n)
    else:
        slots = _slot_counts(E + redundant, E, cap if w is not None else None, n)
    groups = None
    if rebalance:
        phy2log = _place(placer, w[list(layers)], slots, cap)
        offs = np.concatenate([[0], np.cumsum(slots)])
        groups = [_spread_copies([[int(x) for x in phy2log[i, offs[r]:offs[r + 1]]] for r in range(n)], w[layer])
                  for i, layer in enumerate(layers)]
    live = set(survivors)
    rows: dict[int, tuple[tuple[int, ...], ...]] = {}
    for i, layer in enumerate(layers):
        expert2slots = _holders(old_fam, layer, survivors)
        held = [{e for e, ss in expert2slots.items() if order[r] in ss} for r in range(n)]
        layer_loads = None if w is None else w[layer]
        if groups is None:
            sets = _keep_then_fill(held, slots, E, layer_loads, cap)
        else:
            sets = _keep_then_fill(_assign_groups(groups[i], held, slots, cap), slots, E, layer_loads, cap)
            if placer is None:
                sets = _fewest_moves(sets, held, slots, layer_loads, cap)
        rows[layer] = tuple(_in_slot_order(sets[r], old_fam.rank_experts(order[r], layer) if order[r] in live else ())
                            for r in range(n))
    filler = rows[layers[0]] if layers else _keep_then_fill([set() for _ in range(n)], slots, E, None, cap)
    return new_fam.with_held(slots, [rows.get(layer, filler) for layer in range(old.model.num_layers)], redundant)


def _place(placer, w, slots: Sequence[int], cap: Sequence[float]):
    """phy2log ``[layers, sum(slots)]`` of ``placer`` (None: ``moe.rebalance_experts``) for loads ``w``."""
    import torch

    weight = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64))
    if placer is None:
        from sgl_elastic.moe import rebalance_experts

        return rebalance_experts(weight, list(slots), cap)[0]
    if len(set(slots)) != 1:
        raise ValueError(f"this placement algorithm needs equal expert slots per rank, got {tuple(slots)}: with"
                         f" --elastic-redundant-experts, choose experts + redundant divisible by the ranks")
    phy2log = torch.as_tensor(placer(weight, list(slots), list(cap)))
    if tuple(phy2log.shape) != (w.shape[0], sum(slots)) or bool((phy2log < 0).any()) or bool((phy2log >= w.shape[1]).any()):
        raise ValueError(f"the placement algorithm returned phy2log of shape {tuple(phy2log.shape)}, want"
                         f" [{w.shape[0]}, {sum(slots)}] of experts 0..{w.shape[1] - 1}")
    return phy2log


def _slot_counts(total: int, E: int, cap: Sequence[float] | None, n: int) -> tuple[int, ...]:
    """``total`` expert slots over ``n`` ranks: in proportion to ``cap`` (equal when None), at most ``E``
    each (a rank holds an expert once); the excess goes to the ranks with the most capacity per slot."""
    from sgl_elastic.layout.widths import capacity_widths, equal_widths

    if cap is None or max(cap) - min(cap) <= 1e-9:
        return equal_widths(total, n)
    out = list(capacity_widths(total, [max(float(c), 1e-9) for c in cap]))
    extra = sum(max(0, x - E) for x in out)
    out = [min(x, E) for x in out]
    for _ in range(extra):
        r = max((r for r in range(n) if out[r] < E), key=lambda r: (cap[r] / (out[r] + 1), -r))
        out[r] += 1
    return tuple(out)


def _spread_copies(groups: list[list[int]], w) -> list[set[int]]:
    """The rebalancer's groups (replicas per rank, an expert possibly twice on one rank) as sets with
    every copy on its own rank: a rank's second copy of e is exchanged for an expert x of another rank
    that holds no e, where x's load per copy is nearest e's (copy counts, so loads per copy, unchanged)."""
    w = np.asarray(w, dtype=np.float64)
    cnt = np.zeros(len(w))
    for g in groups:
        for e in g:
            cnt[e] += 1
    share = w / np.maximum(cnt, 1)
    out = [list(g) for g in groups]
    for r, g in enumerate(out):
        for e in sorted({e for e in g if g.count(e) > 1}):
            while g.count(e) > 1:
                cands = [(abs(share[x] - share[e]), r2, x) for r2, g2 in enumerate(out) if r2 != r and e not in g2
                         for x in set(g2) if x not in g]
                if not cands:
                    break  # every rank holds e already: the slot stays for the filling
                _, r2, x = min(cands)
                g.remove(e)
                g.append(x)
                out[r2].remove(x)
                out[r2].append(e)
    return [set(g) for g in out]


def _in_slot_order(experts, before: Sequence[int]) -> tuple[int, ...]:
    """``experts`` in slot order: each one the device held keeps its slot, a newcomer takes the slot
    of one that left (in slot order), the rest come after (ascending); when the rank shrank, the
    slots left empty close up. A rebalance that swaps experts thus rewrites only their slots."""
    new = set(experts)
    slots: list[int | None] = [e if e in new else None for e in before]
    kept = {e for e in slots if e is not None}
    comers = iter(sorted(new - kept))
    for k, e in enumerate(slots):
        if e is None:
            slots[k] = next(comers, None)
    return tuple([e for e in slots if e is not None] + list(comers))


def _assign_groups(groups: list[set[int]], held: list[set[int]], slots: Sequence[int],
                   cap: Sequence[float]) -> list[set[int]]:
    """Group g to new rank r among ranks of equal slots and capacity (the balance is unchanged),
    choosing the assignment that keeps the most experts where they are held."""
    from scipy.optimize import linear_sum_assignment

    n = len(groups)
    big = 10 * (sum(slots) + 1)
    cost = np.full((n, n), float(big))
    for r in range(n):
        for g in range(n):
            if slots[r] == slots[g] and abs(cap[r] - cap[g]) <= 1e-9:
                cost[r, g] = -len(held[r] & groups[g])
    rr, gg = linear_sum_assignment(cost)
    out = [set() for _ in range(n)]
    for r, g in zip(rr, gg):
        out[int(r)] = set(groups[g])
    return out


def _keep_then_fill(held: list[set[int]], slots: Sequence[int], E: int, loads=None,
                    cap: Sequence[float] | None = None) -> tuple[tuple[int, ...], ...]:
    """Each rank's experts (``[n]`` ascending tuples of ``slots[r]``, every expert at least once) from
    what it holds: keep up to its slots (sole copies, then the heaviest), place the experts none holds
    (heaviest first, each in a free slot of the rank whose load / capacity it raises least; with copies
    to come, first on ranks that could not fill their free slots with copies of experts some rank held;
    with no free slot, the slot of a copy held twice), then fill the free slots one by one with the
    copy (expert, rank) that leaves the lowest max load / capacity (then the lowest sum of squared load
    / capacity); experts some rank held already come first there (a peer copy, not a second host
    reload of a lost one)."""
    n = len(slots)
    load = np.ones(E) if loads is None else np.asarray(loads, dtype=np.float64)
    c = [max(float(x), 1e-9) for x in cap] if cap is not None else [1.0] * n
    had = set().union(*held)
    copies = np.zeros(E, dtype=np.int64)
    for got in held:
        for e in got:
            copies[e] += 1
    keep = [set(sorted(got, key=lambda e: (copies[e] > 1, -load[e], e))[: slots[r]]) for r, got in enumerate(held)]
    copies[:] = 0
    for k in keep:
        for e in k:
            copies[e] += 1

    def rank_loads() -> list[float]:
        return [sum(load[e] / copies[e] for e in k) for k in keep]

    will_copy = sum(slots) > E
    for e in sorted((e for e in range(E) if copies[e] == 0), key=lambda e: (-load[e], e)):
        now = rank_loads()
        free = [r for r in range(n) if len(keep[r]) < slots[r]]
        # a rank with more free slots than experts it could copy from a peer takes the lost ones first
        short = [r for r in free if slots[r] - len(keep[r]) > len(had - keep[r])] if will_copy else []
        if free:
            r = min(short or free, key=lambda r: ((now[r] + load[e]) / c[r], r))
        else:  # every slot taken and an expert homeless: some expert has two copies (pigeonhole)
            r, x = min(((r, x) for r in range(n) for x in keep[r] if copies[x] >= 2),
                       key=lambda rx: ((now[rx[0]] - load[rx[1]] / copies[rx[1]] + load[e]) / c[rx[0]],
                                       -copies[rx[1]], rx))
            keep[r].discard(x)
            copies[x] -= 1
        keep[r].add(e)
        copies[e] += 1
    hold = _hold_matrix(keep, E)
    cv = np.asarray(c, dtype=np.float64)
    was = np.zeros(E, dtype=bool)
    was[list(had)] = True
    while True:
        free = np.array([len(keep[r]) < slots[r] for r in range(n)])
        if not free.any():
            break
        ok = free[:, None] & ~hold
        if not ok.any():
            raise ValueError(f"expert slots {tuple(slots)} exceed {E} experts on a rank")
        if (ok & was).any():
            ok &= was[None, :]
        # a copy of e on r: e's holders each lose load/k - load/(k+1); r gains load/(k+1)
        now = np.array(rank_loads())
        k = copies.astype(np.float64)
        share = load / (k + 1)
        after = (now[:, None] + hold * (share - load / k)[None, :]) / cv[:, None]  # every rank but the new holder
        top = np.argsort(-after, axis=0, kind="stable")
        first = after[top[0], np.arange(E)]
        second = after[top[1], np.arange(E)] if n > 1 else np.full(E, -np.inf)
        others = np.where(np.arange(n)[:, None] == top[0][None, :], second[None, :], first[None, :])
        mine = (now[:, None] + share[None, :]) / cv[:, None]
        worst = np.where(ok, np.maximum(mine, others), np.inf)
        # the lowest resulting max load / capacity; among equals, the lowest sum of squared ratios
        before = now / cv
        squares = ((after ** 2 - before[:, None] ** 2) * hold).sum(0)[None, :] + mine ** 2 - before[:, None] ** 2
        tied = worst <= worst.min() * (1 + 1e-9) + 1e-12
        r, e = divmod(int(np.where(tied, squares, np.inf).argmin()), E)
        keep[r].add(e)
        hold[r, e] = True
        copies[e] += 1
    return tuple(tuple(sorted(k)) for k in keep)  # ascending here; choose_placement puts them in slot order


def _hold_matrix(sets, E: int) -> np.ndarray:
    """``[ranks, E]`` bool: whether rank r holds expert e."""
    hold = np.zeros((len(sets), E), dtype=bool)
    for r, k in enumerate(sets):
        hold[r, list(k)] = True
    return hold


def _max_ratio(sets, loads, cap) -> float:
    """Max over ranks of load / capacity, an expert's load split evenly over its copies."""
    hold = _hold_matrix(sets, len(loads))
    share = np.asarray(loads, dtype=np.float64) / np.maximum(hold.sum(0), 1)
    return float(((hold @ share) / np.maximum(np.asarray(cap, dtype=np.float64), 1e-12)).max())


def _swap_search(sets, loads, cap: Sequence[float], target: float, max_swaps: int) -> list[set[int]]:
    """Pairwise swaps from ``sets`` (experts per rank; counts per rank and copy counts unchanged, so
    loads per copy too) while the busiest rank's load / capacity is above ``target``: each swap
    exchanges one expert of the busiest rank for a lighter one of a rank holding neither the other's,
    the pair whose larger new ratio is lowest (so no rank ends above the old maximum, and the
    maximum, or the number of ranks at it, falls)."""
    n = len(sets)
    hold = _hold_matrix(sets, len(loads))
    share = np.asarray(loads, dtype=np.float64) / np.maximum(hold.sum(0), 1)
    c = np.maximum(np.asarray(cap, dtype=np.float64), 1e-12)
    for _ in range(max_swaps):
        rank_load = hold @ share
        ratio = rank_load / c
        top = int(ratio.argmax())
        if ratio[top] <= target:
            break
        best = None
        for o in range(n):
            if o == top:
                continue
            give = np.flatnonzero(hold[top] & ~hold[o])
            take = np.flatnonzero(hold[o] & ~hold[top])
            if not len(give) or not len(take):
                continue
            d = share[give][:, None] - share[take][None, :]  # load leaving the busiest rank per pair
            worst = np.maximum((rank_load[top] - d) / c[top], (rank_load[o] + d) / c[o])
            worst[d <= 0] = np.inf
            k = int(worst.argmin())
            if best is None or worst.flat[k] < best[0]:
                i, j = divmod(k, len(take))
                best = (float(worst.flat[k]), o, int(give[i]), int(take[j]))
        if best is None or not best[0] < ratio[top] - 1e-12:
            break
        _, o, ea, eb = best
        hold[top, ea], hold[o, ea], hold[o, eb], hold[top, eb] = False, True, False, True
    return [set(np.flatnonzero(hold[r]).tolist()) for r in range(n)]


def _fewest_moves(full, held: list[set[int]], slots: Sequence[int], loads, cap: Sequence[float]):
    """Of the full rebalance's sets (``full``) and a swap search from what the ranks hold now, the one
    that moves the fewest experts among those within ``REBALANCE_TOL`` of the better max load /
    capacity: a layer already near balance moves a few experts (or none), not a whole new group."""
    loads = np.asarray(loads, dtype=np.float64)
    target = _max_ratio(full, loads, cap)
    start = _keep_then_fill(held, slots, len(loads), loads, cap)
    local = tuple(tuple(sorted(k)) for k in _swap_search(start, loads, cap, target * (1 + REBALANCE_TOL),
                                                          max_swaps=len(loads)))
    cands = [(full, target), (local, _max_ratio(local, loads, cap))]
    best = min(m for _, m in cands)

    def moved(sets) -> int:
        return sum(len(set(k) - held[r]) for r, k in enumerate(sets))

    ok = [sets for sets, m in cands if m <= best * (1 + REBALANCE_TOL) + 1e-12]
    return min(ok, key=moved)


def expert_ops(old: ElasticLayout, new: ElasticLayout, order: Sequence[int], survivors: Sequence[int],
               topo: Topology, w_layer: int, peer_out: dict[int, int], allow_keep: bool = True,
               allow_peer: bool = True) -> tuple[list[FamilyOp], int]:
    """Per-layer expert ops turning ``old`` into ``new`` (new rank r on slot ``order[r]``), and the
    reload lower bound (bytes of experts no survivor holds). ``w_layer``: bytes of one expert of one
    layer. Per new rank, each expert it holds is kept (its device held it), copied from the surviving
    holder with the fastest link (then the one sending least), or reloaded."""
    old_fam, new_fam = old.family("experts"), new.family("experts")
    ops: list[FamilyOp] = []
    lower = 0
    for layer in moe_layers(old):
        expert2slots = _holders(old_fam, layer, survivors)
        lower += w_layer * (old_fam.num_units - len(expert2slots))
        for r in range(new_fam.num_ranks):
            slot = order[r]
            pieces: list[MovePiece] = []
            for e in new_fam.rank_experts(r, layer):
                srcs = expert2slots.get(e, []) if allow_keep else []
                peers = [s for s in srcs if s != slot and topo.reachable(s, slot)] if allow_peer else []
                if slot in srcs:
                    piece = MovePiece(KEEP, slot, slot, e, e + 1)
                elif peers:
                    src = min(peers, key=lambda s: (-topo.bandwidth(s, slot), peer_out.get(s, 0), s))
                    piece = MovePiece(PEER, src, src, e, e + 1)
                    peer_out[src] = peer_out.get(src, 0) + w_layer
                else:
                    piece = MovePiece(RELOAD, HOST, -1, e, e + 1)
                piece.append_to(pieces)
            ops.extend(piece.op("experts", "e", r, w_layer, layer) for piece in pieces)
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
        per_rank = np.zeros(fam.num_ranks)
        for e in range(fam.num_units):
            hs = fam.expert_holders(layer, e)
            per_rank[list(hs)] += w[layer, e] / len(hs)
        out.append(float((per_rank / cap).max() / (total / cap.sum())))
    return float(np.mean(out)) if out else 0.0
