"""Topology: where the devices are and how fast bytes move between them.

Devices are *slots*: slot s < old_tp is the device of old rank s; slots old_tp.. are added devices.
Bandwidths are in GB/s (1e9 bytes per second); a link bandwidth of 0 means unreachable (e.g. GPUs
on two nodes without a usable interconnect): the planner never plans a peer copy over it.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

__all__ = ["Topology"]


class Topology(msgspec.Struct, frozen=True, kw_only=True):
    """Link model of ``num_slots`` devices.

    Fields:
        node_of_slot: ``[num_slots]`` node id of each device.
        link_gbps: ``[num_slots][num_slots]`` peer-copy bandwidth src -> dst in GB/s; 0 = unreachable.
        host_gbps: ``[num_slots]`` host-reload bandwidth into each device (storage/page cache -> device), GB/s.
        storage_gbps: ``[num_nodes]`` read bandwidth shared by all devices of a node; 0 = no shared limit.
        node_copy_gbps: ``[num_nodes]`` copy bandwidth shared by every peer/keep copy landing on a node
            (CPU backend: the memory bandwidth the copy workers get); empty or 0 = no shared limit.
        alloc_gbps: ``[num_nodes]`` rate at which a node's devices get new memory for the destinations
            (CPU backend: the kernel allocating and zeroing shared-memory pages, on the cores and the
            memory bus the copies use); empty or 0 = free (GPU: carved from the daemon's pool).
    """

    node_of_slot: tuple[int, ...]
    link_gbps: tuple[tuple[float, ...], ...]
    host_gbps: tuple[float, ...]
    storage_gbps: tuple[float, ...] = ()
    node_copy_gbps: tuple[float, ...] = ()
    alloc_gbps: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.node_of_slot)
        if len(self.link_gbps) != n or any(len(row) != n for row in self.link_gbps):
            raise ValueError(f"link_gbps must be {n}x{n} for {n} slots")
        if len(self.host_gbps) != n or any(b <= 0 for b in self.host_gbps):
            raise ValueError(f"host_gbps needs one positive bandwidth per slot ({n}), got {self.host_gbps}")
        if self.storage_gbps and len(self.storage_gbps) < max(self.node_of_slot) + 1:
            raise ValueError(f"storage_gbps has {len(self.storage_gbps)} entries for {max(self.node_of_slot) + 1} nodes")

    @classmethod
    def single_node(cls, num_slots: int, *, read_gbps: float, copy_gbps: float, alloc_gbps: float = 0.0) -> "Topology":
        """One host whose devices are shared-memory shards (CPU backend): every copy goes through the
        node's memory at ``copy_gbps`` in all, every reload through ``read_gbps`` in all, and new
        memory comes at ``alloc_gbps`` (0: not modelled)."""
        links = tuple(tuple(0.0 if i == j else copy_gbps for j in range(num_slots)) for i in range(num_slots))
        return cls(node_of_slot=(0,) * num_slots, link_gbps=links, host_gbps=(read_gbps,) * num_slots,
                   storage_gbps=(read_gbps,), node_copy_gbps=(copy_gbps,),
                   alloc_gbps=(alloc_gbps,) if alloc_gbps > 0 else ())

    @property
    def num_slots(self) -> int:
        return len(self.node_of_slot)

    def reachable(self, src: int, dst: int) -> bool:
        return src == dst or self.link_gbps[src][dst] > 0

    def bandwidth(self, src: int, dst: int) -> float:
        """GB/s of a peer copy src -> dst (inf for src == dst, 0 when unreachable)."""
        return float("inf") if src == dst else float(self.link_gbps[src][dst])

    @property
    def num_nodes(self) -> int:
        return max(self.node_of_slot, default=-1) + 1

    def link_class(self, src: int, dst: int) -> str:
        """"self", "node" (same node: shared memory / NVLink), "network" (across nodes) or "none"."""
        if src == dst:
            return "self"
        if self.link_gbps[src][dst] <= 0:
            return "none"
        return "node" if self.node_of_slot[src] == self.node_of_slot[dst] else "network"

    def without_links(self, pairs) -> "Topology":
        """The same topology with the links ``(src, dst)`` of ``pairs`` gone (both directions): what the
        executor plans with after a copy over one of them failed."""
        cut = {(a, b) for a, b in pairs} | {(b, a) for a, b in pairs}
        links = tuple(tuple(0.0 if (i, j) in cut else bw for j, bw in enumerate(row)) for i, row in enumerate(self.link_gbps))
        return msgspec.structs.replace(self, link_gbps=links)

    def without_nodes(self, nodes) -> "Topology":
        """Every link to and from the slots of ``nodes`` gone (a dead or partitioned node)."""
        gone = set(nodes)
        slots = [s for s, n in enumerate(self.node_of_slot) if n in gone]
        return self.without_links([(a, b) for a in slots for b in range(self.num_slots) if a != b])

    def fully_connected(self) -> bool:
        return all(self.link_gbps[i][j] > 0 for i in range(self.num_slots) for j in range(self.num_slots) if i != j)

    # ---- constructors -----------------------------------------------------------------------------
    @classmethod
    def nodes(
        cls,
        node_of_slot: Sequence[int],
        *,
        intra_gbps: float,
        inter_gbps: float,
        host_gbps: float | Sequence[float],
        storage_gbps: float | Sequence[float] = 0.0,
        node_copy_gbps: float | Sequence[float] = 0.0,
        cut: Sequence[tuple[int, int]] = (),
    ) -> "Topology":
        """Devices on several nodes: ``intra_gbps`` between two devices of a node, ``inter_gbps`` across
        nodes (the network; 0: none), ``host_gbps`` the reload path into a device of each node (one
        figure or one per node: each node reads its own copy of the checkpoint), ``storage_gbps`` and
        ``node_copy_gbps`` shared per node (0: no shared limit). ``cut``: pairs of nodes that cannot
        reach each other (a partition)."""
        nodes = tuple(int(n) for n in node_of_slot)
        if not nodes or min(nodes) < 0:
            raise ValueError(f"node_of_slot must name a node >= 0 for every slot, got {node_of_slot}")
        num_nodes = max(nodes) + 1

        def per_node(value, what: str) -> tuple[float, ...]:
            vals = (float(value),) * num_nodes if isinstance(value, (int, float)) else tuple(map(float, value))
            if len(vals) != num_nodes:
                raise ValueError(f"{what}: one figure per node ({num_nodes}), got {len(vals)}")
            return vals

        host = per_node(host_gbps, "host_gbps")
        cut_pairs = {(a, b) for a, b in cut} | {(b, a) for a, b in cut}
        links = tuple(
            tuple(0.0 if i == j else intra_gbps if nodes[i] == nodes[j]
                  else 0.0 if (nodes[i], nodes[j]) in cut_pairs else inter_gbps for j in range(len(nodes)))
            for i in range(len(nodes)))
        storage = per_node(storage_gbps, "storage_gbps")
        copy = per_node(node_copy_gbps, "node_copy_gbps")
        return cls(node_of_slot=nodes, link_gbps=links, host_gbps=tuple(host[n] for n in nodes),
                   storage_gbps=storage if any(storage) else (), node_copy_gbps=copy if any(copy) else ())

    @classmethod
    def uniform(cls, num_slots: int, *, link_gbps: float = 100.0, host_gbps: float = 10.0) -> "Topology":
        """One node, every pair linked at ``link_gbps``."""
        links = tuple(tuple(0.0 if i == j else link_gbps for j in range(num_slots)) for i in range(num_slots))
        return cls(node_of_slot=(0,) * num_slots, link_gbps=links, host_gbps=(host_gbps,) * num_slots)

    @classmethod
    def islands(
        cls,
        island_of_slot: Sequence[int],
        *,
        intra_gbps: float,
        inter_gbps: float,
        host_gbps: float,
        node_of_slot: Sequence[int] | None = None,
        storage_gbps: Sequence[float] = (),
    ) -> "Topology":
        """Fast links inside an island, ``inter_gbps`` across (0 = islands cannot reach each other)."""
        n = len(island_of_slot)
        links = tuple(
            tuple(0.0 if i == j else (intra_gbps if island_of_slot[i] == island_of_slot[j] else inter_gbps) for j in range(n))
            for i in range(n)
        )
        nodes = tuple(node_of_slot) if node_of_slot is not None else (0,) * n
        return cls(node_of_slot=nodes, link_gbps=links, host_gbps=(host_gbps,) * n, storage_gbps=tuple(storage_gbps))

    @classmethod
    def two_island_8gpu(cls, num_slots: int = 8) -> "Topology":
        """The benchmark topology: 8 GPUs, islands of 4 (128 GB/s inside, 32 GB/s across), host 8 GB/s per GPU
        and 25 GB/s of storage read per node."""
        return cls.islands([s // 4 for s in range(num_slots)], intra_gbps=128.0, inter_gbps=32.0, host_gbps=8.0,
                           storage_gbps=(25.0,))
