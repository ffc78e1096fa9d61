"""Filling the held ranks' weight shards from the checkpoint, each byte of the file read once.

Per checkpoint tensor, over the ranks this daemon holds (``layout.geometry.shard_region`` gives
each rank's region ``full[row0:row1, col0:col1]``: rows for dim-0 sharding, columns for dim-1, the
whole tensor for unsharded ones):

- case 1: one holder, or disjoint row blocks (dim-0 sharding): each rank's rows are one contiguous
  byte range, read straight into its segment (``preadv``).
- case 2: several holders of column blocks (dim-1: ``o_proj``, ``down_proj``), of the same whole
  tensor (norms, router) or of overlapping rows (replicated KV heads): the union region is read
  once into a host buffer and each rank's part copied from it. Reading column blocks rank by rank
  would touch every page of the tensor once per rank (a 64-column block of a row is 256 bytes).

``bytes_read`` (payload bytes, ``SafetensorsCheckpoint.bytes_read``) is then the size of the union
of the held regions: the whole checkpoint once when the daemon holds every rank.
"""

from __future__ import annotations

import threading

import numpy as np

from sgl_elastic.layout.dtypes import SAFETENSORS_TO_TORCH
from sgl_elastic.memory import DeviceMemory, Segment, TensorAlloc
from sgl_elastic.executor.safetensors_io import RAW_DTYPE, SafetensorsCheckpoint
from sgl_elastic.layout.geometry import rank_tensors, shard_region, stored_transposed
from sgl_elastic.layout import ElasticLayout

__all__ = ["weight_allocs", "load_ranks", "LoadCancelled"]

Region = tuple[int, int, int, int]


class LoadCancelled(Exception):
    """The daemon is stopping; the partial segments were freed."""


def weight_allocs(layout: ElasticLayout, rank: int, ckpt: SafetensorsCheckpoint) -> list[TensorAlloc]:
    """``rank``'s shards (checkpoint order) with the checkpoint's dtypes; checks the item sizes agree
    with the layout (the executor sizes migration buffers from the layout)."""
    out = []
    for t, shape in rank_tensors(layout, rank):
        e = ckpt.entry(t.name)
        if e.itemsize != t.dtype_bytes:
            raise ValueError(
                f"{t.name}: the checkpoint stores {e.dtype} ({e.itemsize} bytes per element) but the layout"
                f" says {t.dtype_bytes}; build the layout from this checkpoint's config.json"
            )
        if tuple(e.shape) != tuple(t.shape):
            raise ValueError(f"{t.name}: checkpoint shape {e.shape} != layout shape {t.shape}; wrong layout for this model")
        out.append(TensorAlloc(t.name, SAFETENSORS_TO_TORCH[e.dtype], shape, transposed=stored_transposed(t),
                               alone=t.family == "full"))
    return out


def _disjoint_rows(regions: list[Region]) -> bool:
    spans = sorted((r[0], r[1]) for r in regions)
    full_cols = all(r[2] == regions[0][2] and r[3] == regions[0][3] for r in regions)
    return full_cols and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def load_ranks(memory: DeviceMemory, layout: ElasticLayout, ranks: list[int], ckpt: SafetensorsCheckpoint,
               cancel: threading.Event | None = None) -> dict[int, Segment]:
    """Allocate the weight segment of every rank in ``ranks`` and fill them (see module docstring)."""
    segs: dict[int, Segment] = {}
    try:
        # Step 1: every destination, before any read.
        for r in ranks:
            segs[r] = memory.allocate(r, "weights", weight_allocs(layout, r, ckpt))
        # Step 2: tensor by tensor over the holders.
        for t in layout.tensors():
            if cancel is not None and cancel.is_set():
                raise LoadCancelled("load cancelled: the daemon is stopping")
            held = {r: reg for r in ranks if (reg := shard_region(t, layout, r)) is not None}
            if not held:
                continue
            regions = list(held.values())
            # case 1: one contiguous range per rank, no byte wanted twice.
            if len(held) == 1 or _disjoint_rows(regions):
                for r, reg in held.items():
                    segs[r].load_region(ckpt, t.name, reg)
                continue
            # case 2: read the union once, hand out the parts.
            r0, r1 = min(g[0] for g in regions), max(g[1] for g in regions)
            c0, c1 = min(g[2] for g in regions), max(g[3] for g in regions)
            e = ckpt.entry(t.name)
            buf = np.empty((r1 - r0, c1 - c0), dtype=RAW_DTYPE[e.itemsize])
            ckpt.read_region(t.name, buf, r0, r1, c0, c1)
            for r, (a0, a1, b0, b1) in held.items():
                segs[r].write(t.name, buf[a0 - r0:a1 - r0, b0 - c0:b1 - c0])
    except BaseException:
        for s in segs.values():
            s.close()
        raise
    return segs
