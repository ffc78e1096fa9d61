"""MigrationPlan: what a recovery moves, as family-level ops expandable to per-tensor copy ops.

Coordinates (be careful, there are three):
- *granules* of a family's sub-dim (``sgl_elastic.layout.tensors``): query heads ("q"), KV heads
  ("kv"), intermediate columns ("i"), vocab rows ("v"), experts ("e"). ``FamilyOp`` ranges
  ``[start, end)`` are *global* granule indices (positions in the full, unsharded tensor).
- *elements* along a tensor's sharded ``dim``: granule * ``granule_elems``. ``CopyOp`` carries the
  global element range and the two local offsets (in the source shard and the destination shard).
- *bytes*: for ``dim == 0`` an element range is one contiguous byte run of
  ``length * slice_bytes`` at ``offset * slice_bytes`` (row-major); for ``dim == 1`` it is a column
  block: ``rows`` runs of ``length * itemsize`` bytes with the row stride of the buffer
  (``CopyOp.byte_runs``). "experts"/"full" ops move whole tensors.

Kinds: KEEP (the destination already holds it: no bytes move, it may shift inside the buffer),
PEER (device -> device copy), HOST (reload from the checkpoint's safetensors). ``stage`` 1 ops are
fan-out peer copies whose source is a *new* rank that receives the data by a stage-0 HOST op (a lost
replicated KV head needed by several new ranks is read from disk once).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import msgspec

from sgl_elastic.layout import ElasticLayout, TensorSpec
from sgl_elastic.layout.geometry import shard_granule_range

__all__ = ["HOST", "KEEP", "PEER", "RELOAD", "MovePiece", "FamilyOp", "CopyOp", "RankTotals", "MigrationPlan", "ClusterChange"]

HOST = -1  # source "slot" of a host reload
KEEP, PEER, RELOAD = "keep", "peer", "reload"


class ClusterChange(msgspec.Struct, frozen=True, kw_only=True):
    """What happened: ``failed`` old ranks (slots) and ``added`` new devices (slots old_tp, old_tp+1, ...).

    ``policy`` picks the new widths: "equal" (as equal as possible; the planner chooses which ranks
    get the extra unit) or "capacity" (proportional to ``capacities``, one float per slot, indexed
    by slot: old ranks first, then added devices). None: keep the old layout's policy.
    """

    failed: tuple[int, ...] = ()
    added: int = 0
    policy: str | None = None
    capacities: tuple[float, ...] = ()

    def normalized(self) -> "ClusterChange":
        """Same change with ``failed`` sorted and de-duplicated (plans depend on the set, not the order)."""
        return msgspec.structs.replace(self, failed=tuple(sorted(set(self.failed))))

    def label(self, old_tp: int) -> str:
        return f"{old_tp}->{old_tp - len(set(self.failed)) + self.added}"


@dataclass
class MovePiece:
    """A run of granules ``[start, end)`` one new rank gets from one source, while the planner builds
    its ops: consecutive pieces of the same kind, source and stage merge (``append_to``), and each
    piece becomes one ``FamilyOp`` (``op``). ``src_slot``: HOST for a reload; ``src_rank``: the source's
    old rank (a new rank for a stage-1 fan-out; -1 for HOST)."""

    kind: str
    src_slot: int
    src_rank: int
    start: int
    end: int
    stage: int = 0

    def append_to(self, pieces: list["MovePiece"]) -> None:
        """Add to ``pieces``, extending the last piece instead when this one continues it."""
        last = pieces[-1] if pieces else None
        if (last is not None and last.end == self.start and (last.kind, last.src_slot, last.stage)
                == (self.kind, self.src_slot, self.stage)):
            last.end = self.end
        else:
            pieces.append(self)

    def op(self, family: str, subdim: str, dst_rank: int, granule_bytes: int, layer: int = -1) -> "FamilyOp":
        src_rank = -1 if self.kind == RELOAD else self.src_rank
        return FamilyOp(family, subdim, self.kind, self.src_slot, src_rank, dst_rank, self.start, self.end,
                        (self.end - self.start) * granule_bytes, self.stage, layer)


class FamilyOp(msgspec.Struct, frozen=True, array_like=True):
    """One move of a granule range of one family sub-dim (applies to every tensor of that sub-dim).

    ``src_slot``: device holding the source (HOST for reload); ``src_rank``: its old rank
    (or new rank for stage-1 fan-out; -1 for HOST); ``dst_rank``: new rank; ``[start, end)``: global
    granules; ``nbytes``: bytes over all tensors of the sub-dim. ``layer`` >= 0: the op moves only
    that model layer's tensors (placed experts, ``planner.experts``); -1: every layer.
    """

    family: str
    subdim: str
    kind: str
    src_slot: int
    src_rank: int
    dst_rank: int
    start: int
    end: int
    nbytes: int
    stage: int = 0
    layer: int = -1


class CopyOp(msgspec.Struct, frozen=True):
    """One move of an element range of one tensor (see module docstring for coordinates).

    ``src_offset``: element offset along ``dim`` inside the source shard (for HOST: inside the full
    tensor, equal to ``start``); ``dst_offset``: inside the destination shard; ``length``: elements
    along ``dim``; -1 ``dim``: the whole tensor.
    """

    tensor: str
    dim: int
    kind: str
    src_slot: int
    src_rank: int
    dst_rank: int
    start: int
    length: int
    src_offset: int
    dst_offset: int
    nbytes: int
    stage: int = 0

    def byte_runs(self, shard_shape: tuple[int, ...], offset: int, itemsize: int) -> tuple[int, int, int, int]:
        """``(first_byte, run_bytes, stride_bytes, num_runs)`` of this op's elements in a row-major
        buffer of ``shard_shape`` starting at element ``offset`` along ``dim``."""
        if self.dim < 0:
            n = itemsize
            for s in shard_shape:
                n *= s
            return (0, n, n, 1)
        if self.dim == 0:
            row = itemsize
            for s in shard_shape[1:]:
                row *= s
            return (offset * row, self.length * row, self.length * row, 1)
        if self.dim == 1 and len(shard_shape) == 2:
            return (offset * itemsize, self.length * itemsize, shard_shape[1] * itemsize, shard_shape[0])
        raise ValueError(f"{self.tensor}: byte runs only for dim 0/1 of 2-D tensors, got {self.dim=} {shard_shape=}")


class RankTotals(msgspec.Struct, frozen=True, kw_only=True):
    """Bytes per new rank by kind; ``peer_out`` are bytes this rank's device sends as a peer source."""

    rank: int
    slot: int
    keep_bytes: int
    peer_in_bytes: int
    reload_bytes: int
    peer_out_bytes: int


class MigrationPlan(msgspec.Struct, frozen=True, kw_only=True):
    """Result of ``plan_migration``: the new layout and every move.

    ``new2slot[r]``: device of new rank r. ``old2new_rank[s]``: new rank of old rank s (-1: failed).
    Byte totals cover every weight tensor of the model (all layers, "full" tensors included).
    ``lower_bound_reload_bytes``: bytes no surviving rank holds (replicas count as holders): no plan
    can reload less.
    """

    old_layout: ElasticLayout
    new_layout: ElasticLayout
    change: ClusterChange
    new2slot: tuple[int, ...]
    old2new_rank: tuple[int, ...]
    ops: tuple[FamilyOp, ...]
    totals: tuple[RankTotals, ...]
    keep_bytes: int
    peer_bytes: int
    reload_bytes: int
    lower_bound_reload_bytes: int

    def tensor_ops(self, kinds: tuple[str, ...] = (KEEP, PEER, RELOAD)) -> Iterator[CopyOp]:
        """Expand family ops to per-tensor ``CopyOp``s (lazily: there are many)."""
        return expand_tensor_ops(self, kinds)

    def to_bytes(self) -> bytes:
        return msgspec.msgpack.encode(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> "MigrationPlan":
        return msgspec.msgpack.decode(data, type=cls)

    def summary(self) -> dict[str, int]:
        return {"keep_bytes": self.keep_bytes, "peer_bytes": self.peer_bytes, "reload_bytes": self.reload_bytes,
                "lower_bound_reload_bytes": self.lower_bound_reload_bytes, "num_family_ops": len(self.ops)}


def expand_tensor_ops(plan: MigrationPlan, kinds: tuple[str, ...]) -> Iterator[CopyOp]:
    """Per-tensor ops of ``plan`` in family-op order (one CopyOp per (family op, tensor))."""
    by_subdim: dict[tuple[str, str], list[TensorSpec]] = {}
    for t in plan.old_layout.tensors():
        by_subdim.setdefault((t.family, t.subdim), []).append(t)
    for op in plan.ops:
        if op.kind not in kinds:
            continue
        dst0 = shard_granule_range(plan.new_layout, op.family, op.subdim, op.dst_rank)[0]
        if op.src_slot == HOST:
            src0 = 0
        elif op.stage == 1:
            src0 = shard_granule_range(plan.new_layout, op.family, op.subdim, op.src_rank)[0]
        else:
            src0 = shard_granule_range(plan.old_layout, op.family, op.subdim, op.src_rank)[0]
        for t in by_subdim.get((op.family, op.subdim), ()):
            if t.dim < 0:
                if op.family == "experts" and not (op.start <= t.expert < op.end):
                    continue
                if op.layer >= 0 and t.layer != op.layer:
                    continue
                yield CopyOp(t.name, -1, op.kind, op.src_slot, op.src_rank, op.dst_rank, 0, 1, 0, 0, t.nbytes, op.stage)
                continue
            g = t.granule_elems
            yield CopyOp(t.name, t.dim, op.kind, op.src_slot, op.src_rank, op.dst_rank, op.start * g,
                         (op.end - op.start) * g, (op.start - src0) * g, (op.start - dst0) * g,
                         (op.end - op.start) * t.granule_bytes, op.stage)
