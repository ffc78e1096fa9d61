"""Cost model: predicted wall time of a MigrationPlan from the topology's bandwidths.

Model (every resource works at its bandwidth, all resources concurrently, as the executor runs them):
- host reload into slot s: ``reload_bytes[s] / host_gbps[s]``; a node's slots also share its storage
  read bandwidth ``storage_gbps[node]`` (when given);
- peer copies: a device sends its copies one after the other and receives them one after the other,
  so a slot's egress time is ``sum(bytes / link_gbps[src][dst])`` over what it sends, likewise ingress;
- keep ops cost ``bytes / keep_gbps`` on the device (0 = free: a GPU keeps its shard in place);
- ``node_copy_gbps`` (CPU backend): every peer and keep copy landing on a node shares that bandwidth;
- stage-1 fan-out copies start after the reloads they depend on: they add to the reload time.
predicted = max(reload phase, peer phase, keep phase) + fan-out phase. This is also the lower bound the
executor compares its achieved time with.
"""

from __future__ import annotations

import msgspec

from sgl_elastic.planner.plan import KEEP, PEER, RELOAD, MigrationPlan
from sgl_elastic.planner.topology import Topology

__all__ = ["CostEstimate", "predict_time"]

GB = 1e9


class CostEstimate(msgspec.Struct, frozen=True, kw_only=True):
    """Predicted seconds: ``predicted_s`` (overlapped), its phases, and ``serial_s`` = reload + peer
    (what a non-pipelined executor would take). ``bottleneck`` names the slowest resource."""

    predicted_s: float
    reload_s: float
    peer_s: float
    keep_s: float
    fanout_s: float
    serial_s: float
    bottleneck: str
    alloc_s: float = 0.0


def predict_time(plan: MigrationPlan, topology: Topology, *, keep_gbps: float = 0.0,
                 alloc_bytes: dict[int, int] | None = None, kept_in_place: dict[int, int] | None = None) -> CostEstimate:
    """Predict the wall time of ``plan`` on ``topology`` (bandwidths in GB/s, result in seconds).

    ``alloc_bytes``: new rank -> bytes of new memory its destination takes (what the executor
    allocates: all of it, or only the extension of a file regrown in place). With the topology's
    ``alloc_gbps`` they add ``alloc_s``. The model adds it to the copies' time instead of overlapping
    it: allocating pages means zeroing them, on the cores and through the memory bus the copies use.
    ``kept_in_place``: new rank -> kept bytes that cost nothing (remapped where they lie, CPU)."""
    free = dict(kept_in_place or {})
    slots = plan.new2slot
    reload_in: dict[int, int] = {}
    keep_at: dict[int, int] = {}
    egress: dict[int, float] = {}
    ingress: dict[int, float] = {}
    fan_egress: dict[int, float] = {}
    fan_ingress: dict[int, float] = {}
    for op in plan.ops:
        dst = slots[op.dst_rank]
        if op.kind == RELOAD:
            reload_in[dst] = reload_in.get(dst, 0) + op.nbytes
        elif op.kind == KEEP:
            keep_at[dst] = keep_at.get(dst, 0) + op.nbytes
        elif op.kind == PEER:
            t = op.nbytes / (topology.bandwidth(op.src_slot, dst) * GB)
            e, i = (fan_egress, fan_ingress) if op.stage else (egress, ingress)
            e[op.src_slot] = e.get(op.src_slot, 0.0) + t
            i[dst] = i.get(dst, 0.0) + t
    # Step 1: reload phase, per slot and per node's storage.
    phases: dict[str, float] = {"none": 0.0}
    for s, b in reload_in.items():
        phases[f"host->{s}"] = b / (topology.host_gbps[s] * GB)
    if topology.storage_gbps:
        per_node: dict[int, int] = {}
        for s, b in reload_in.items():
            per_node[topology.node_of_slot[s]] = per_node.get(topology.node_of_slot[s], 0) + b
        for node, b in per_node.items():
            if topology.storage_gbps[node] > 0:
                phases[f"storage[{node}]"] = b / (topology.storage_gbps[node] * GB)
    reload_s = max(v for k, v in phases.items() if k.startswith(("host", "storage", "none")))
    # Step 2: peer phase (egress and ingress serialised per device).
    peer = {f"egress[{s}]": t for s, t in egress.items()} | {f"ingress[{s}]": t for s, t in ingress.items()}
    peer_s = max(peer.values(), default=0.0)
    phases |= peer
    for d, b in free.items():
        keep_at[slots[d]] = max(0, keep_at.get(slots[d], 0) - b)
    keep_s = max((b / (keep_gbps * GB) for b in keep_at.values()), default=0.0) if keep_gbps > 0 else 0.0
    if topology.node_copy_gbps:
        per_node: dict[int, float] = {}
        for op in plan.ops:
            if op.stage == 0 and (op.kind == PEER or (op.kind == KEEP and keep_gbps > 0)):
                node = topology.node_of_slot[slots[op.dst_rank]]
                per_node[node] = per_node.get(node, 0.0) + op.nbytes
        for d, b in free.items():
            node = topology.node_of_slot[slots[d]]
            per_node[node] = max(0.0, per_node.get(node, 0.0) - b)
        for node, b in per_node.items():
            if topology.node_copy_gbps[node] > 0:
                t = b / (topology.node_copy_gbps[node] * GB)
                phases[f"copy[{node}]"] = t
                peer_s = max(peer_s, t)
    fan = list(fan_egress.values()) + list(fan_ingress.values())
    fanout_s = max(fan, default=0.0)
    if topology.node_copy_gbps and fan:
        fan_bytes = sum(op.nbytes for op in plan.ops if op.stage == 1)
        fanout_s = max(fanout_s, fan_bytes / (max(topology.node_copy_gbps) * GB))
    alloc_s = 0.0
    if alloc_bytes and topology.alloc_gbps:
        per_node = {}
        for d, b in alloc_bytes.items():
            node = topology.node_of_slot[slots[d]]
            per_node[node] = per_node.get(node, 0) + b
        alloc_s = max((b / (topology.alloc_gbps[n] * GB) for n, b in per_node.items()
                       if n < len(topology.alloc_gbps) and topology.alloc_gbps[n] > 0), default=0.0)
        phases["alloc"] = alloc_s
    bottleneck = max(phases, key=phases.get)  # type: ignore[arg-type]
    predicted = max(reload_s, peer_s, keep_s) + fanout_s + alloc_s
    return CostEstimate(predicted_s=predicted, reload_s=reload_s, peer_s=peer_s, keep_s=keep_s, fanout_s=fanout_s,
                        serial_s=reload_s + peer_s + fanout_s + alloc_s, bottleneck=bottleneck, alloc_s=alloc_s)
