"""Layout geometry, the one home: which granules of a family a rank holds, and where each tensor's
shard lies in the full tensor, for a layout and a rank.

A *granule range* is ``[start, end)`` in granules of a sub-dim (q heads, KV heads, or the family's
dim: columns / experts / vocab rows). A *region* is ``(row0, row1, col0, col1)`` of the full tensor viewed as 2-D (1-D tensors are one
row): dim-0 sharding cuts rows, dim-1 sharding cuts columns, "experts"/"full" tensors are whole.
"""

from __future__ import annotations

from sgl_elastic.layout.elastic import ElasticLayout
from sgl_elastic.layout.family import FamilyLayout
from sgl_elastic.layout.tensors import TensorSpec

__all__ = ["family_granule_range", "shard_granule_range", "rows_cols", "shard_region", "shard_shape", "rank_tensors",
           "stored_transposed"]

Region = tuple[int, int, int, int]


def family_granule_range(fam: FamilyLayout, subdim: str, rank: int) -> tuple[int, int]:
    """Granules ``[start, end)`` of ``subdim`` ("q", "kv", or the family's dim) that ``rank`` holds in ``fam``."""
    if subdim == "q":
        return fam.rank_q_head_range(rank)
    if subdim == "kv":
        return fam.rank_kv_head_range(rank)
    return fam.rank_dim_range(rank)


def shard_granule_range(layout: ElasticLayout, family: str, subdim: str, rank: int) -> tuple[int, int]:
    """Global granules ``[start, end)`` of ``subdim`` that ``rank`` holds in ``layout``."""
    if family == "full":
        return (0, 1)
    return family_granule_range(layout.family(family), subdim, rank)


def rows_cols(t: TensorSpec) -> tuple[int, int]:
    """``t`` viewed as 2-D: (rows, cols); a 1-D tensor is one row."""
    if len(t.shape) == 1:
        return 1, t.shape[0]
    return t.shape[0], t.shape[1]


def shard_region(t: TensorSpec, layout: ElasticLayout, rank: int) -> Region | None:
    """The region of ``t`` held by ``rank`` (None when the rank holds none of it: another rank's expert)."""
    rows, cols = rows_cols(t)
    if t.dim < 0:
        if t.family == "experts" and not layout.family("experts").holds(rank, t.layer, t.expert):
            return None
        return (0, rows, 0, cols)
    a, b = shard_granule_range(layout, t.family, t.subdim, rank)
    a, b = a * t.granule_elems, b * t.granule_elems
    return (a, b, 0, cols) if t.dim == 0 else (0, rows, a, b)


def stored_transposed(t: TensorSpec) -> bool:
    """Whether the CPU daemon stores ``t``'s shards transposed (column-major: the shard ``[rows, w]``
    as ``[w, rows]`` row-major): the column-sharded 2-D tensors (``o_proj``, ``down_proj``), so that
    a rank's column block is contiguous like a row block is, and a survivor that keeps columns keeps
    their pages (the row stride of a row-major shard changes with its width)."""
    return t.dim == 1 and len(t.shape) == 2


def shard_shape(t: TensorSpec, layout: ElasticLayout, rank: int) -> tuple[int, ...] | None:
    reg = shard_region(t, layout, rank)
    if reg is None:
        return None
    if len(t.shape) == 1:
        return t.shape
    return (reg[1] - reg[0], reg[3] - reg[2])


def rank_tensors(layout: ElasticLayout, rank: int) -> list[tuple[TensorSpec, tuple[int, ...]]]:
    """Every tensor ``rank`` holds in ``layout`` with its shard shape (checkpoint order; redundant
    experts: each layer's expert tensors in the rank's slot order, group by group)."""
    out = []
    for t in layout.tensors():
        shape = shard_shape(t, layout, rank)
        if shape is not None:
            out.append((t, shape))
    if "experts" in layout.families and layout.family("experts").held:
        out = _slot_ordered(out, layout.family("experts"), rank)
    return out


def _slot_ordered(items: list, fam: FamilyLayout, rank: int) -> list:
    """Reorder every run of one layer's expert tensors by (group, slot of the expert, checkpoint order):
    the checkpoint order is group by group (gate and up of every expert, then every down), experts
    ascending in each, so a group starts where the expert id falls."""
    out, i = [], 0
    while i < len(items):
        t = items[i][0]
        if t.family != "experts":
            out.append(items[i])
            i += 1
            continue
        j = i
        while j < len(items) and items[j][0].family == "experts" and items[j][0].layer == t.layer:
            j += 1
        slot = {e: k for k, e in enumerate(fam.rank_experts(rank, t.layer))}
        keys, group, prev = [], 0, -1
        for k in range(i, j):
            e = items[k][0].expert
            if e < prev:
                group += 1
            prev = e
            keys.append((group, slot[e], k))
        out.extend(items[k] for _, _, k in sorted(keys))
        i = j
    return out
