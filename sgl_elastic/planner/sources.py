"""Per byte, a peer copy or a host reload: whichever the topology's model says finishes sooner.

The CMM layout search (``cmm``) decides what each new rank keeps; every other byte a survivor holds
could come by a peer copy from it *or* be read again from the destination node's own checkpoint.
A peer copy is not always cheaper: across nodes the network can be slower than a local reload, and
even on one node a destination that receives from every peer can be the bottleneck while its
reload path idles. This stage moves granules of the peer ops to reloads where that lowers the
modelled migration time (``cost.predict_time``), and no further.

Model: the resources of ``cost.predict_time``, each busy for (bytes / bandwidth) summed over what it
carries: per destination slot its host path and its ingress, per source slot its egress, per node
its storage read and its shared copy bandwidth. Stage-0 ops run concurrently, so the migration
takes as long as the busiest resource. Every stage-0 peer op of ``n`` granules may send its last
``k`` granules (0 <= k <= n) by a host reload instead. The choice of every ``k`` is an integer
program: minimise T subject to each resource's load <= T, with a tie-break that prefers the faster
route for bytes off the critical path (so a link that is not the bottleneck keeps its copies).
HiGHS (through scipy) solves it exactly in milliseconds for real plans; should it hit its time
limit, its best solution (or the LP relaxation rounded) is improved by a local search that moves
one granule, or swaps two, while that lowers the loads sorted from the busiest.

Short cut: when no peer resource is the busiest (the reloads of the lost bytes take longest), moving
bytes to reloads cannot help, and the plan is left as it is without solving anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from sgl_elastic.planner.plan import PEER, RELOAD, FamilyOp
from sgl_elastic.planner.topology import Topology

__all__ = ["SOURCE_CHOICES", "choose_sources", "resource_loads", "makespan"]

SOURCE_CHOICES = ("time", "peer")  # "peer": every byte a reachable survivor holds is copied (the old rule)
GB = 1e9


def _reload_resources(topo: Topology, dst: int) -> list[tuple[str, float]]:
    out = [(f"host->{dst}", topo.host_gbps[dst])]
    node = topo.node_of_slot[dst]
    if topo.storage_gbps and node < len(topo.storage_gbps) and topo.storage_gbps[node] > 0:
        out.append((f"storage[{node}]", topo.storage_gbps[node]))
    return out


def _peer_resources(topo: Topology, src: int, dst: int) -> list[tuple[str, float]]:
    bw = topo.bandwidth(src, dst)
    out = [(f"egress[{src}]", bw), (f"ingress[{dst}]", bw)]
    node = topo.node_of_slot[dst]
    if topo.node_copy_gbps and node < len(topo.node_copy_gbps) and topo.node_copy_gbps[node] > 0:
        out.append((f"copy[{node}]", topo.node_copy_gbps[node]))
    return out


def _op_resources(op: FamilyOp, new2slot: Sequence[int], topo: Topology) -> list[tuple[str, float]]:
    dst = new2slot[op.dst_rank]
    if op.kind == RELOAD:
        return _reload_resources(topo, dst)
    if op.kind == PEER:
        return _peer_resources(topo, op.src_slot, dst)
    return []  # KEEP: in place (GPU) or remapped (CPU); ``predict_time`` prices copied keeps itself


def resource_loads(ops: Sequence[FamilyOp], new2slot: Sequence[int], topo: Topology) -> dict[str, float]:
    """Seconds each resource is busy with the stage-0 ops (the model of ``cost.predict_time``)."""
    loads: dict[str, float] = {}
    for op in ops:
        if op.stage != 0:
            continue
        for name, bw in _op_resources(op, new2slot, topo):
            loads[name] = loads.get(name, 0.0) + op.nbytes / (bw * GB)
    return loads


def makespan(ops: Sequence[FamilyOp], new2slot: Sequence[int], topo: Topology) -> float:
    return max(resource_loads(ops, new2slot, topo).values(), default=0.0)


def _split(op: FamilyOp, reload_granules: int) -> list[FamilyOp]:
    """``op`` with its last ``reload_granules`` granules turned into a host reload."""
    n = op.end - op.start
    if reload_granules <= 0:
        return [op]
    per = op.nbytes // n
    if reload_granules >= n:
        return [FamilyOp(op.family, op.subdim, RELOAD, -1, -1, op.dst_rank, op.start, op.end, op.nbytes, 0, op.layer)]
    cut = op.end - reload_granules
    return [FamilyOp(op.family, op.subdim, PEER, op.src_slot, op.src_rank, op.dst_rank, op.start, cut,
                     (cut - op.start) * per, 0, op.layer),
            FamilyOp(op.family, op.subdim, RELOAD, -1, -1, op.dst_rank, cut, op.end, reload_granules * per, 0, op.layer)]


def choose_sources(ops: Sequence[FamilyOp], new2slot: Sequence[int], topo: Topology) -> list[FamilyOp]:
    """``ops`` with granules of stage-0 peer ops turned into host reloads where the model says that is
    faster (see the module docstring). Keeps, reloads and fan-outs are unchanged; so is every op when
    no peer resource is the bottleneck."""
    ops = list(ops)
    loads = resource_loads(ops, new2slot, topo)
    if not loads:
        return ops
    peers = [i for i, op in enumerate(ops) if op.kind == PEER and op.stage == 0 and op.end > op.start]
    top = max(loads.values())
    peer_names = {n for i in peers for n, _ in _op_resources(ops[i], new2slot, topo)}
    if not peers or not any(math.isclose(loads[n], top, rel_tol=1e-9) for n in peer_names):
        return ops
    counts, optimal = _solve(ops, peers, new2slot, topo)
    if not optimal:
        counts = _improve(ops, peers, counts, new2slot, topo)
    out: list[FamilyOp] = []
    for i, op in enumerate(ops):
        out.extend(_split(op, counts.get(i, 0)) if i in counts else [op])
    return out


def _solve(ops: list[FamilyOp], peers: list[int], new2slot: Sequence[int], topo: Topology,
           time_limit_s: float = 1.0) -> tuple[dict[int, int], bool]:
    """Granules of each peer op to reload, and whether that is proven optimal: the optimum of the
    integer program (HiGHS branch and bound, at most ``time_limit_s``), else the best solution it
    found or its LP relaxation rounded to the nearest granule."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    peer_set = set(peers)
    fixed: dict[str, float] = {}
    for i, op in enumerate(ops):
        if op.stage != 0 or i in peer_set:
            continue
        for name, bw in _op_resources(op, new2slot, topo):
            fixed[name] = fixed.get(name, 0.0) + op.nbytes / (bw * GB)
    # variables: k_0..k_{m-1} (granules of peer op j reloaded: its last ones), then T.
    # One row per resource: const + sum_j coef_j k_j - T <= 0.
    m = len(peers)
    index: dict[str, int] = {}
    coef: list[dict[int, float]] = []
    const: list[float] = []
    tiebreak = np.zeros(m)
    sizes = np.zeros(m)

    def row(name: str) -> int:
        if name not in index:
            index[name] = len(coef)
            coef.append({})
            const.append(fixed.get(name, 0.0))
        return index[name]

    for j, i in enumerate(peers):
        op = ops[i]
        n = op.end - op.start
        sizes[j] = n
        per = op.nbytes / n
        dst = new2slot[op.dst_rank]
        for name, bw in _peer_resources(topo, op.src_slot, dst):  # n - k granules copied
            t = per / (bw * GB)
            r = row(name)
            coef[r][j] = coef[r].get(j, 0.0) - t
            const[r] += n * t
            tiebreak[j] -= t
        for name, bw in _reload_resources(topo, dst):  # k granules reloaded
            t = per / (bw * GB)
            r = row(name)
            coef[r][j] = coef[r].get(j, 0.0) + t
            tiebreak[j] += t
    for name in fixed:
        row(name)
    tref = max(const)  # the makespan with every op copied (> 0: a peer resource is the busiest)
    a = np.zeros((len(coef), m + 1))  # in units of tref: sum_j (coef_j / tref) k_j - tau <= -const / tref
    for r, c in enumerate(coef):
        for j, v in c.items():
            a[r, j] = v / tref
        a[r, m] = -1.0
    ub = -np.asarray(const) / tref
    cost = np.zeros(m + 1)
    cost[m] = 1.0
    # among the optimal makespans, the least total busy time (weighted far below one granule's time)
    cost[:m] = 1e-7 * tiebreak / max(1e-300, float(np.abs(tiebreak * sizes).sum()))
    cons = LinearConstraint(a, -np.inf, ub)
    bounds = Bounds(np.zeros(m + 1), np.r_[sizes, np.inf])
    res = milp(cost, constraints=cons, bounds=bounds, integrality=np.r_[np.ones(m), [0]],
               options={"time_limit": time_limit_s, "mip_rel_gap": 1e-9})
    if res.x is not None and res.status in (0, 1):  # 0: optimal; 1: the time limit, with a solution
        return {i: int(round(float(res.x[j]))) for j, i in enumerate(peers)}, res.status == 0
    res = milp(cost, constraints=cons, bounds=bounds)  # the LP relaxation: always solves
    x = res.x if res.x is not None else np.zeros(m + 1)
    return {i: min(int(sizes[j]), max(0, int(math.floor(float(x[j]) + 0.5)))) for j, i in enumerate(peers)}, False


def _improve(ops: list[FamilyOp], peers: list[int], counts: dict[int, int], new2slot: Sequence[int],
             topo: Topology, swap_max: int = 48) -> dict[int, int]:
    """Local search from the rounded LP solution: move one granule between peer and reload, or (with at
    most ``swap_max`` peer ops) one granule of each of two ops in opposite directions, while that
    lowers the resources' loads sorted from the busiest (the makespan first, then the next busiest:
    ties at the top do not stall it). Loads are updated incrementally."""
    trial = [piece for i, op in enumerate(ops) for piece in (_split(op, counts[i]) if i in counts else [op])]
    loads = resource_loads(trial, new2slot, topo)
    delta: dict[int, list[tuple[str, float]]] = {}  # per granule moved peer -> reload: (resource, +seconds)
    for i in peers:
        op = ops[i]
        per = op.nbytes / (op.end - op.start)
        dst = new2slot[op.dst_rank]
        d = [(name, -per / (bw * GB)) for name, bw in _peer_resources(topo, op.src_slot, dst)]
        d += [(name, per / (bw * GB)) for name, bw in _reload_resources(topo, dst)]
        delta[i] = d
        for name, _ in d:
            loads.setdefault(name, 0.0)
    names = sorted(loads)

    def key(changes: list[tuple[int, int]]) -> tuple[float, ...]:
        changed = dict(loads)
        for i, sign in changes:
            for name, t in delta[i]:
                changed[name] += sign * t
        # rounded so that float noise cannot make a cycle of "improvements"
        return tuple(sorted((round(changed[n], 15) for n in names), reverse=True))

    def moves():
        singles = [(i, sign) for i in peers for sign in (1, -1) if 0 <= counts[i] + sign <= ops[i].end - ops[i].start]
        for m in singles:
            yield [m]
        if len(peers) <= swap_max:
            for a in singles:
                for b in singles:
                    if a[0] < b[0] and a[1] != b[1]:
                        yield [a, b]

    best = key([])
    for _ in range(4 * len(peers) + 16):
        step = None
        for m in moves():
            k = key(m)
            if k < best and (step is None or k < step[0]):
                step = (k, m)
        if step is None:
            break
        best = step[0]
        for i, sign in step[1]:
            counts[i] += sign
            for name, t in delta[i]:
                loads[name] += sign * t
    return counts
