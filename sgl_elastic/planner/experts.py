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
- *Redundant experts* (``FamilyLayout.redundant``: slots beyond one per expert; ``_choose_held``).
  The new ranks get the same number of redundant slots (at most what fits: a rank holds an expert
  once), the slots split in proportion to the ranks' capacities when loads are given, else equally. A failure: every device keeps what it held, up to its slots, sole copies
  first; an expert no survivor holds takes a free slot, else the slot of a copy held twice; the free
  slots then take, one by one, the copy that lowers the max load / capacity most. A
  rebalance: ``moe.rebalance_experts`` over the slots gives each rank a group (replicas included;
  a second copy of an expert on one rank is exchanged for an expert of similar load per copy of a
  rank without one), assigned as above, then the same filling; a swap search from what the ranks
  hold competes with it, as for single experts (fewest moves within ``REBALANCE_TOL``).
  A lost expert that another survivor also holds is no reload at all.
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
    if "experts" not in layout.families:
        return False
    fam = layout.family("experts")
    return bool(fam.placement or fam.held)


def default_capacity(layout: ElasticLayout) -> tuple[float, ...]:
    """Each rank's relative capacity for experts from its attention share (``moe.expert_budget``; memory
    is not the limit: every rank holds its width of experts)."""
    from sgl_elastic.moe import expert_budget

    return expert_budget(layout, [1 << 50] * layout.tp_size, 1).capacity


def _all_holders(fam: FamilyLayout, layer: int, survivors: Sequence[int]) -> dict[int, list[int]]:
    """expert -> every surviving slot (= old rank) that holds it in ``layer`` (experts none holds: absent)."""
    live = set(survivors)
    out: dict[int, list[int]] = {}
    for e in range(fam.num_units):
        hs = [r for r in fam.expert_holders(layer, e) if r in live]
        if hs:
            out[e] = hs
    return out


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
                     loads=None, capacity: Sequence[float] | None = None, rebalance: bool = False,
                     placer=None) -> FamilyLayout:
    """``new_fam`` (its widths chosen) with a placement for new ranks on slots ``order``.

    ``loads``: ``[num_layers, num_experts]`` tokens routed per expert (rows of dense layers ignored),
    or None; ``capacity``: ``[new tp]`` relative capacity of each new rank (None: all equal);
    ``rebalance``: place every expert by the loads, else keep and fill (module docstring).
    ``placer``: a rebalance's placement algorithm instead of ``moe.rebalance_experts`` (a baseline to
    compare with, e.g. DeepSeek's EPLB): ``placer(weight [moe layers, E] float64 tensor, slots per
    rank, capacity) -> phy2log``, on equal slots per rank; its groups are applied as they are (only
    assigned to the ranks keeping the most experts), with no movement-aware alternative.
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
    if old_fam.redundant:
        return _choose_held(old, new_fam, order, survivors, w, cap, rebalance, placer)
    if rebalance:
        phy2log = _place(placer, w[list(layers)], widths, cap)
        offs = np.concatenate([[0], np.cumsum(widths)])
        groups_all = [[tuple(int(x) for x in phy2log[i, offs[r]:offs[r + 1]]) for r in range(n)]
                      for i in range(len(layers))]
    moe_rows = {}
    for i, layer in enumerate(layers):
        held = _holders(old_fam, layer, survivors)
        own = [{e for e, s in held.items() if s == order[r]} for r in range(n)]
        if groups_all is not None:
            owner = _assign_groups(groups_all[i], own, widths, cap)
            if placer is None:
                owner = _fewest_moves(owner, own, widths, w[layer], cap)
        else:
            owner = _keep_then_fill(own, widths, E, None if w is None else w[layer], cap)
        moe_rows[layer] = tuple(owner)
    filler = moe_rows[layers[0]] if layers else tuple(r for r in range(n) for _ in range(widths[r]))
    for layer in range(old.model.num_layers):
        rows.append(moe_rows.get(layer, filler))
    return new_fam.placed(rows)


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


def _choose_held(old: ElasticLayout, new_fam: FamilyLayout, order: Sequence[int], survivors: Sequence[int],
                 w, cap: Sequence[float], rebalance: bool, placer=None) -> FamilyLayout:
    """``choose_placement`` for redundant experts (module docstring)."""
    from sgl_elastic.layout.widths import equal_widths

    old_fam = old.family("experts")
    layers = moe_layers(old)
    n, E = new_fam.num_ranks, new_fam.num_units
    red = min(old_fam.redundant, n * E - E)
    slots = equal_widths(E + red, n) if placer is not None else _slots(E + red, E, cap if w is not None else None, n)
    groups_all = None
    if rebalance:
        phy2log = _place(placer, w[list(layers)], slots, cap)
        offs = np.concatenate([[0], np.cumsum(slots)])
        groups_all = [_spread_copies([[int(x) for x in phy2log[i, offs[r]:offs[r + 1]]] for r in range(n)],
                                     w[layer]) for i, layer in enumerate(layers)]
    rows: dict[int, tuple[tuple[int, ...], ...]] = {}
    live = set(survivors)
    for i, layer in enumerate(layers):
        hs = _all_holders(old_fam, layer, survivors)
        own = [{e for e, ss in hs.items() if order[r] in ss} for r in range(n)]
        wl = None if w is None else w[layer]
        if groups_all is None:
            rows[layer] = _fill_held(own, slots, E, wl, cap)
        else:
            full = _fill_held(_assign_held_groups(groups_all[i], own, slots, cap), slots, E, wl, cap)
            rows[layer] = full if placer is not None else _fewest_moves_held(full, own, slots, wl, cap)
        rows[layer] = tuple(_in_slot_order(rows[layer][r], old_fam.rank_experts(order[r], layer)
                                           if order[r] in live else ()) for r in range(n))
    filler = rows[layers[0]] if layers else _fill_held([set() for _ in range(n)], slots, E, None, cap)
    return new_fam.with_held(slots, [rows.get(layer, filler) for layer in range(old.model.num_layers)], red)


def _hold_matrix(sets, E: int) -> np.ndarray:
    """``[ranks, E]`` bool: whether rank r holds expert e."""
    hold = np.zeros((len(sets), E), dtype=bool)
    for r, k in enumerate(sets):
        hold[r, list(k)] = True
    return hold


def _held_ratio(sets, w, cap) -> float:
    """Max over ranks of load / capacity, an expert's load split evenly over its copies."""
    hold = _hold_matrix(sets, len(w))
    share = np.asarray(w, dtype=np.float64) / np.maximum(hold.sum(0), 1)
    return float(((hold @ share) / np.maximum(np.asarray(cap, dtype=np.float64), 1e-12)).max())


def _held_swap_search(sets, w, cap: Sequence[float], target: float, max_swaps: int) -> list[set[int]]:
    """``_swap_search`` for redundant experts: while the busiest rank's load / capacity is above
    ``target``, exchange one of its experts for a lighter one of a rank holding neither the other's
    (copy counts, so loads per copy, unchanged), the pair whose larger new ratio is lowest."""
    n = len(sets)
    hold = _hold_matrix(sets, len(w))
    share = np.asarray(w, dtype=np.float64) / np.maximum(hold.sum(0), 1)
    c = np.maximum(np.asarray(cap, dtype=np.float64), 1e-12)
    for _ in range(max_swaps):
        per = hold @ share
        f = per / c
        top = int(f.argmax())
        if f[top] <= target:
            break
        best = None
        for o in range(n):
            if o == top:
                continue
            a = np.flatnonzero(hold[top] & ~hold[o])
            b = np.flatnonzero(hold[o] & ~hold[top])
            if not len(a) or not len(b):
                continue
            d = share[a][:, None] - share[b][None, :]
            worst = np.maximum((per[top] - d) / c[top], (per[o] + d) / c[o])
            worst[d <= 0] = np.inf
            k = int(worst.argmin())
            if best is None or worst.flat[k] < best[0]:
                ia, ib = divmod(k, len(b))
                best = (float(worst.flat[k]), o, int(a[ia]), int(b[ib]))
        if best is None or not best[0] < f[top] - 1e-12:
            break
        _, o, ea, eb = best
        hold[top, ea], hold[o, ea], hold[o, eb], hold[top, eb] = False, True, False, True
    return [set(np.flatnonzero(hold[r]).tolist()) for r in range(n)]


def _fewest_moves_held(full, own: list[set[int]], slots: Sequence[int], w, cap: Sequence[float]):
    """``_fewest_moves`` for redundant experts: the full rebalance's sets, or a swap search from what
    the ranks hold, whichever moves fewer experts within ``REBALANCE_TOL`` of the better max ratio."""
    w = np.asarray(w, dtype=np.float64)
    target = _held_ratio(full, w, cap)
    start = _fill_held(own, slots, len(w), w, cap)
    local = tuple(tuple(k) for k in _held_swap_search(start, w, cap, target * (1 + REBALANCE_TOL),
                                                              max_swaps=len(w)))
    cands = [(full, target), (local, _held_ratio(local, w, cap))]
    best = min(m for _, m in cands)

    def moved(sets) -> int:
        return sum(len(set(k) - own[r]) for r, k in enumerate(sets))

    ok = [sets for sets, m in cands if m <= best * (1 + REBALANCE_TOL) + 1e-12]
    return min(ok, key=moved)


def _slots(total: int, E: int, cap: Sequence[float] | None, n: int) -> tuple[int, ...]:
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


def _assign_held_groups(groups: list[set[int]], own: list[set[int]], slots: Sequence[int],
                        cap: Sequence[float]) -> list[set[int]]:
    """Group g to new rank r among ranks of equal slots and capacity, keeping the most experts held."""
    from scipy.optimize import linear_sum_assignment

    n = len(groups)
    big = 10 * (sum(slots) + 1)
    cost = np.full((n, n), float(big))
    for r in range(n):
        for g in range(n):
            if slots[r] == slots[g] and abs(cap[r] - cap[g]) <= 1e-9:
                cost[r, g] = -len(own[r] & groups[g])
    rr, gg = linear_sum_assignment(cost)
    out = [set() for _ in range(n)]
    for r, g in zip(rr, gg):
        out[int(r)] = set(groups[g])
    return out


def _fill_held(own: list[set[int]], slots: Sequence[int], E: int, w=None,
               cap: Sequence[float] | None = None) -> tuple[tuple[int, ...], ...]:
    """Each rank's experts (``[n]`` tuples of ``slots[r]``, every expert at least once) from
    what it holds: keep up to its slots (sole copies, then the heaviest), place the experts none holds
    (a free slot, first on ranks that could not fill their free slots with copies of experts some rank
    held, else the slot of a copy held twice), then fill the free slots one by one with the copy (expert,
    rank) that leaves the lowest max load / capacity (then the lowest sum of squared load / capacity);
    experts some rank held already come first there (a peer copy, not a second host reload of a lost
    one). Load model:
    an expert's load split evenly over its copies (as the dispatch splits its tokens)."""
    n = len(slots)
    wv = np.ones(E) if w is None else np.asarray(w, dtype=np.float64)
    c = [max(float(x), 1e-9) for x in cap] if cap is not None else [1.0] * n
    had = set().union(*own)
    copies = np.zeros(E, dtype=np.int64)
    for o in own:
        for e in o:
            copies[e] += 1
    keep = [set(sorted(o, key=lambda e: (copies[e] > 1, -wv[e], e))[: slots[r]]) for r, o in enumerate(own)]
    copies[:] = 0
    for k in keep:
        for e in k:
            copies[e] += 1

    def loads() -> list[float]:
        return [sum(wv[e] / copies[e] for e in k) for k in keep]

    for e in sorted((e for e in range(E) if copies[e] == 0), key=lambda e: (-wv[e], e)):
        ld = loads()
        free = [r for r in range(n) if len(keep[r]) < slots[r]]
        # a rank with more free slots than experts it could copy from a peer takes the lost ones first
        short = [r for r in free if slots[r] - len(keep[r]) > len(had - keep[r])]
        if free:
            r = min(short or free, key=lambda r: ((ld[r] + wv[e]) / c[r], r))
        else:  # every slot taken and an expert homeless: some expert has two copies (pigeonhole)
            r, x = min(((r, x) for r in range(n) for x in keep[r] if copies[x] >= 2),
                       key=lambda rx: ((ld[rx[0]] - wv[rx[1]] / copies[rx[1]] + wv[e]) / c[rx[0]], -copies[rx[1]], rx))
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
        # a copy of e on r: e's holders each lose wv/k - wv/(k+1); r gains wv/(k+1)
        ld = np.array(loads())
        k = copies.astype(np.float64)
        share = wv / (k + 1)
        after = (ld[:, None] + hold * (share - wv / k)[None, :]) / cv[:, None]  # every rank but the new holder
        top = np.argsort(-after, axis=0, kind="stable")
        first = after[top[0], np.arange(E)]
        second = after[top[1], np.arange(E)] if n > 1 else np.full(E, -np.inf)
        others = np.where(np.arange(n)[:, None] == top[0][None, :], second[None, :], first[None, :])
        mine = (ld[:, None] + share[None, :]) / cv[:, None]
        worst = np.where(ok, np.maximum(mine, others), np.inf)
        # the lowest resulting max load / capacity; among equals, the lowest sum of squared ratios
        before = ld / cv
        squares = ((after ** 2 - before[:, None] ** 2) * hold).sum(0)[None, :] + mine ** 2 - before[:, None] ** 2
        tied = worst <= worst.min() * (1 + 1e-9) + 1e-12
        r, e = divmod(int(np.where(tied, squares, np.inf).argmin()), E)
        keep[r].add(e)
        hold[r, e] = True
        copies[e] += 1
    return tuple(tuple(sorted(k)) for k in keep)  # ascending here; _choose_held puts them in slot order


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
    if old_fam.held or new_fam.held:
        return _held_ops(old_fam, new_fam, moe_layers(old), order, survivors, topo, w_layer, peer_out,
                         allow_keep, allow_peer)
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


def _held_ops(old_fam: FamilyLayout, new_fam: FamilyLayout, layers, order: Sequence[int], survivors: Sequence[int],
              topo: Topology, w_layer: int, peer_out: dict[int, int], allow_keep: bool,
              allow_peer: bool) -> tuple[list[FamilyOp], int]:
    """``expert_ops`` when either side has redundant experts: per new rank, each expert it holds is
    kept (its device held it), copied from the surviving holder with the fastest link (then the
    one sending least), or reloaded; the lower bound counts experts no survivor holds."""
    ops: list[FamilyOp] = []
    lower = 0
    for layer in layers:
        hs = _all_holders(old_fam, layer, survivors)
        lower += w_layer * (old_fam.num_units - len(hs))
        for r in range(new_fam.num_ranks):
            slot = order[r]
            pieces: list[list] = []
            for e in new_fam.rank_experts(r, layer):
                srcs = hs.get(e, []) if allow_keep else []
                peers = [s for s in srcs if s != slot and topo.reachable(s, slot)] if allow_peer else []
                if slot in srcs:
                    piece = [KEEP, slot, slot, r]
                elif peers:
                    src = min(peers, key=lambda s: (-topo.bandwidth(s, slot), peer_out.get(s, 0), s))
                    piece = [PEER, src, src, r]
                    peer_out[src] = peer_out.get(src, 0) + w_layer
                else:
                    piece = [RELOAD, HOST, -1, r]
                if pieces and pieces[-1][:4] == piece and pieces[-1][5] == e:
                    pieces[-1][5] = e + 1
                else:
                    pieces.append(piece + [e, e + 1])
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
        per_rank = np.zeros(fam.num_ranks)
        for e in range(fam.num_units):
            hs = fam.expert_holders(layer, e)
            per_rank[list(hs)] += w[layer, e] / len(hs)
        out.append(float((per_rank / cap).max() / (total / cap.sum())))
    return float(np.mean(out)) if out else 0.0
