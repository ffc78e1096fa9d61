"""Exhaustive reference solver for the planner's objective (tests and benchmarks; small cases only).

Independent of ``cmm``: it tries *every* permutation of the new devices (survivors need not keep
their order) and every admissible width / replica assignment per family, and scores each candidate
granule by granule with Python sets. Objective: lexicographic (reload bytes, peer bytes).
Cost: N! * C(N, extra) candidates: use N <= 5.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from sgl_elastic.layout import ElasticLayout, FamilyLayout, capacity_widths
from sgl_elastic.layout.geometry import family_granule_range
from sgl_elastic.layout.tensors import FAMILY_SUBDIMS
from sgl_elastic.planner.cmm import family_granule_bytes, new_slots
from sgl_elastic.planner.plan import ClusterChange
from sgl_elastic.planner.topology import Topology

__all__ = ["exact_min_makespan", "exact_min_cost"]


def _old_sets(fam: FamilyLayout, sd: str, rank: int) -> set[int]:
    a, b = family_granule_range(fam, sd, rank)
    return set(range(a, b))


def _splits(total: int, size: int) -> list[tuple[int, ...]]:
    base, extra = divmod(total, size)
    return [tuple(base + (j in pos) for j in range(size)) for pos in itertools.combinations(range(size), extra)]


def _candidates(fam: FamilyLayout, order: Sequence[int], policy: str, caps: Sequence[float]):
    """Yield ``{subdim: [need set of new rank r]}`` for every admissible split of ``fam`` over ``order``."""
    n = len(order)
    if fam.name == "attn" and fam.num_kv_heads < n:
        base, extra = divmod(n, fam.num_kv_heads)
        for heads in itertools.combinations(range(fam.num_kv_heads), extra):
            sizes = [base + (h in heads) for h in range(fam.num_kv_heads)]
            split_options = [_splits(fam.q_per_kv, size) for size in sizes]
            for splits in itertools.product(*split_options):
                q, kv = [], []
                for h, split in enumerate(splits):
                    start = h * fam.q_per_kv
                    for s in split:
                        q.append(set(range(start, start + s)))
                        kv.append({h})
                        start += s
                yield {"q": q, "kv": kv}
        return
    if policy == "capacity":
        options = [capacity_widths(fam.num_units, [caps[s] for s in order])]
    else:
        base, extra = divmod(fam.num_units, n)
        options = [tuple(base + (p in pos) for p in range(n)) for pos in itertools.combinations(range(n), extra)]
    for widths in options:
        out: dict[str, list[set[int]]] = {sd: [] for sd in FAMILY_SUBDIMS[fam.name]}
        off = 0
        for w in widths:
            a, b = off, off + w
            if fam.name == "attn":
                out["q"].append(set(range(a * fam.q_per_kv, b * fam.q_per_kv)))
                out["kv"].append(set(range(a, b)))
            else:
                sd = FAMILY_SUBDIMS[fam.name][0]
                out[sd].append(set(range(min(a * fam.unit_size, fam.dim_size), min(b * fam.unit_size, fam.dim_size))))
            off = b
        yield out


def _score(needs: dict[str, list[set[int]]], order: Sequence[int], hold: dict, reach: dict, every: dict,
           weights: dict, topo: Topology) -> tuple[int, int]:
    reload = peer = 0
    for sd, per_rank in needs.items():
        w = weights[sd]
        lost_dests: dict[int, list[int]] = {}
        for r, need in enumerate(per_rank):
            slot = order[r]
            own = hold[sd].get(slot, set())
            peer += w * len((need & reach[sd][slot]) - own)
            reload += w * len((need & every[sd]) - reach[sd][slot])
            for g in need - every[sd]:
                lost_dests.setdefault(g, []).append(r)
        for dests in lost_dests.values():
            sources: list[int] = []
            for d in dests:  # rank order: first reloads, others fan out from a reachable reloader
                if any(topo.reachable(order[s], order[d]) for s in sources):
                    peer += w
                else:
                    reload += w
                    sources.append(d)
    return (reload, peer)


def exact_min_cost(old: ElasticLayout, change: ClusterChange, topology: Topology | None = None) -> tuple[int, int]:
    """Minimal (reload bytes, peer bytes) over every device order and width assignment (sharded families)."""
    survivors, added = new_slots(old.tp_size, change)
    slots = survivors + added
    topo = topology or Topology.uniform(len(slots) + len(change.failed))
    policy = change.policy or old.policy
    weights_all = family_granule_bytes(old)
    per_family = []
    for name, fam in old.families.items():
        sds = FAMILY_SUBDIMS[name]
        hold = {sd: {s: _old_sets(fam, sd, s) for s in survivors} for sd in sds}
        every = {sd: set().union(*hold[sd].values()) for sd in sds}
        reach = {sd: {t: set().union(*(hold[sd][s] for s in survivors if topo.reachable(s, t))) for t in slots}
                 for sd in sds}
        per_family.append((fam, hold, reach, every, {sd: weights_all[(name, sd)] for sd in sds}))
    best = None
    for order in itertools.permutations(slots):
        total = (0, 0)
        for fam, hold, reach, every, w in per_family:
            fbest = min(_score(c, order, hold, reach, every, w, topo)
                        for c in _candidates(fam, order, policy, change.capacities))
            total = (total[0] + fbest[0], total[1] + fbest[1])
        if best is None or total < best:
            best = total
    assert best is not None
    return best


def exact_min_cost_for_widths(old: ElasticLayout, change: ClusterChange, new: ElasticLayout,
                              topology: Topology) -> tuple[int, int]:
    """Minimal (reload, peer) bytes over every assignment of the new devices to the positions (new
    ranks) of ``new``, whose per-position ranges are fixed: an assignment ILP (scipy ``milp``),
    lexicographic in two solves. Needs a topology where every survivor can reach every device (lost
    bytes then cost the same in every assignment: one reload each, fan-out by peer copy).
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    survivors, added = new_slots(old.tp_size, change)
    slots = survivors + added
    n = len(slots)
    if n != new.tp_size:
        raise ValueError(f"new layout has {new.tp_size} ranks for {n} devices")
    weights_all = family_granule_bytes(old)
    reload_m = np.zeros((n, n))
    peer_m = np.zeros((n, n))
    lost_reload = lost_peer = 0
    for name, fam in old.families.items():
        nfam = new.family(name)
        for sd in FAMILY_SUBDIMS[name]:
            w = weights_all[(name, sd)]
            hold = {s: _old_sets(fam, sd, s) for s in survivors}
            every = set().union(*hold.values())
            need = [_old_sets(nfam, sd, p) for p in range(n)]
            lost_count: dict[int, int] = {}
            for p in range(n):
                for g in need[p] - every:
                    lost_count[g] = lost_count.get(g, 0) + 1
            lost_reload += w * len(lost_count)
            lost_peer += w * sum(c - 1 for c in lost_count.values())
            for i, s in enumerate(slots):
                reach = set().union(*(hold[t] for t in survivors if topology.reachable(t, s)))
                own = hold.get(s, set())
                for p in range(n):
                    peer_m[i, p] += w * len((need[p] & reach) - own)
                    reload_m[i, p] += w * len((need[p] & every) - reach)
    # x[i, p] = device i at position p; rows and columns sum to 1.
    a_rows = np.zeros((2 * n, n * n))
    for i in range(n):
        a_rows[i, i * n:(i + 1) * n] = 1
        a_rows[n + i, i::n] = 1
    cons = [LinearConstraint(a_rows, 1, 1)]
    integrality = np.ones(n * n)
    bounds = Bounds(0, 1)
    r1 = milp(reload_m.ravel(), constraints=cons, integrality=integrality, bounds=bounds)
    min_reload = round(r1.fun)
    cons2 = cons + [LinearConstraint(reload_m.ravel()[None, :], -np.inf, min_reload + 0.5)]
    r2 = milp(peer_m.ravel(), constraints=cons2, integrality=integrality, bounds=bounds)
    return (min_reload + lost_reload, round(r2.fun) + lost_peer)


def exact_min_makespan(ops, new2slot, topology: Topology, max_candidates: int = 200_000) -> float:
    """Smallest makespan (``planner.sources.makespan``) over every way of sending each stage-0 peer op's
    granules partly by a reload (its last k granules, k = 0..n), by enumeration. Independent of the
    LP in ``planner.sources``; for tests (raises ValueError above ``max_candidates`` combinations)."""
    from sgl_elastic.planner.plan import PEER
    from sgl_elastic.planner.sources import _split, makespan

    ops = list(ops)
    peers = [i for i, op in enumerate(ops) if op.kind == PEER and op.stage == 0]
    total = 1
    for i in peers:
        total *= ops[i].end - ops[i].start + 1
    if total > max_candidates:
        raise ValueError(f"{total} combinations: too many to enumerate")
    best = float("inf")
    for counts in itertools.product(*(range(ops[i].end - ops[i].start + 1) for i in peers)):
        c = dict(zip(peers, counts))
        trial = [piece for i, op in enumerate(ops) for piece in (_split(op, c[i]) if i in c else [op])]
        best = min(best, makespan(trial, new2slot, topology))
    return best
