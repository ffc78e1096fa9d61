"""KV pools carried over a layout change (CPU shared memory), so that resumed requests keep their
cached prefixes instead of prefilling prompt and output again.

A KV pool of rank r holds, per layer, ``kv.<l>`` of ``[2, num_slots, kv_heads[r], head_dim]`` for the
KV heads of r's attention range. After a failure a survivor gains heads whose KV was on the dead
rank; that KV comes from the dead rank's *backup*: a second pool of the same shape that the rank
itself writes beside its own (``patches/memory_pool.py``) and that is held on the next rank's
device (``backup_holder``), so it outlives the rank. Every head of the new layout needs a live
source (a survivor's pool, else a surviving backup); if one has none, nothing is carried over (the
caller drops the KV and the index, and the requests are re-prefilled as before).

Step 1: stage the heads that a new rank copies out of a pool another rank regrows in place.
Step 2: a new rank whose old range lies inside its new one regrows its own pool file in place: the
kept heads move inside it, top down (``executor.cpu._move``: no byte is overwritten before it
moved), and only the gained heads' share gets new pages. Step 3: the other new ranks get new pools;
every head not kept in place is copied from its source.

Slots keep their numbers, so the prefix index stays valid. Only shared memory (``ShmSegment``) is
handled; another backend returns None (KV dropped, as before).
"""

from __future__ import annotations

import numpy as np

__all__ = ["backup_holder", "migrate_kv"]

_STAGE_BYTES = 8 << 20


def backup_holder(rank: int, tp: int) -> int:
    """The rank whose device holds ``rank``'s KV backup: the next one (ring)."""
    return (rank + 1) % tp


def _views(seg, num_layers: int) -> list[np.ndarray]:
    return [seg.arena.array(f"kv.{layer}") for layer in range(num_layers)]


def migrate_kv(memory, spec, new_spec, old_attn, new_attn, old2new_rank, pools: dict, backups: dict,
               allocs) -> tuple[dict, set[int]] | None:
    """(new rank -> its KV pool under ``new_attn``, the old ranks whose pools were regrown in place),
    built from ``pools`` (surviving old rank -> pool) and ``backups`` (old rank -> its surviving
    backup); None when a head has no live source or the memory is not shared memory.
    ``allocs(spec, rank)``: the pool's tensor table. Pools regrown in place are consumed (their file
    is the new pool's); the caller frees the others. On an error every new pool is freed (a regrown
    one included: its bytes were being moved) and the error raised."""
    from sgl_elastic.memory.shm import ShmSegment

    if not all(isinstance(s, ShmSegment) for s in [*pools.values(), *backups.values()]):
        return None
    if spec.num_layers != new_spec.num_layers or spec.num_slots != new_spec.num_slots or spec.dtype != new_spec.dtype \
            or spec.head_dim != new_spec.head_dim:
        return None
    num_layers = spec.num_layers
    # head -> (old rank, index in its pool, segment); survivors' pools first, then backups
    source: dict[int, tuple[int, int, object]] = {}
    for table in (pools, backups):
        for o, seg in sorted(table.items()):
            a, b = old_attn.rank_kv_head_range(o)
            for h in range(a, b):
                source.setdefault(h, (o, h - a, seg))
    new_tp = new_attn.num_ranks
    ranges = {d: new_attn.rank_kv_head_range(d) for d in range(new_tp)}
    if any(h not in source for d in range(new_tp) for h in range(*ranges[d])):
        return None
    # Step 1: which new ranks regrow their survivor's pool in place (its old range inside the new one)
    in_place: dict[int, int] = {}
    for o, d in enumerate(old2new_rank):
        if d < 0 or o not in pools:
            continue
        a, b = old_attn.rank_kv_head_range(o)
        na, nb = ranges[d]
        if na <= a and b <= nb:
            in_place[d] = o
    regrown = {pools[o] for o in in_place.values()}
    staged: dict[tuple[int, int], list[np.ndarray]] = {}  # (new rank, head) -> per-layer copy
    for d in range(new_tp):
        kept = old_attn.rank_kv_head_range(in_place[d]) if d in in_place else (0, 0)
        for h in range(*ranges[d]):
            o, i, seg = source[h]
            if kept[0] <= h < kept[1] or seg not in regrown:
                continue
            staged[(d, h)] = [np.array(v[:, :, i]) for v in _views(seg, num_layers)]
    out: dict = {}
    try:
        # Step 2: in place
        for d, o in sorted(in_place.items()):
            seg = pools[o]
            a, b = old_attn.rank_kv_head_range(o)
            old_off = {name: sh.offset for name, sh in seg.arena.shards.items()}
            grown = memory.regrow(seg, d, allocs(new_spec, d))
            if grown is None:
                raise RuntimeError(f"KV pool of old rank {o} could not be regrown")
            out[d] = grown
            _move_heads(grown, old_off, spec, b - a, ranges[d][1] - ranges[d][0], a - ranges[d][0])
        # Step 3: new pools, then every head not kept in place
        for d in range(new_tp):
            if d not in out:
                out[d] = memory.allocate(d, "kv", allocs(new_spec, d))
            dst = _views(out[d], num_layers)
            kept = old_attn.rank_kv_head_range(in_place[d]) if d in in_place else (0, 0)
            for h in range(*ranges[d]):
                if kept[0] <= h < kept[1]:
                    continue
                j = h - ranges[d][0]
                if (d, h) in staged:
                    for v, s in zip(dst, staged.pop((d, h))):
                        np.copyto(v[:, :, j], s)
                else:
                    o, i, seg = source[h]
                    for v, s in zip(dst, _views(seg, num_layers)):
                        np.copyto(v[:, :, j], s[:, :, i])
    except BaseException:
        for seg in out.values():
            seg.close()
        raise
    return out, set(in_place.values())


def _move_heads(seg, old_off: dict[str, int], spec, old_heads: int, new_heads: int, shift: int) -> None:
    """Inside ``seg`` (regrown: its shard table is the new one, ``old_off`` the old offsets), move the
    kept heads of every layer's K and V from rows of ``old_heads`` heads to rows of ``new_heads``,
    ``shift`` heads further in; highest addresses first."""
    from sgl_elastic.executor.cpu import _move

    isz = seg.arena.shards["kv.0"].itemsize
    head = spec.head_dim * isz
    row_s, row_d, run = old_heads * head, new_heads * head, old_heads * head
    buf = np.frombuffer(seg.arena._shm.buf, dtype=np.uint8)  # type: ignore[attr-defined]
    stage = np.empty(_STAGE_BYTES, dtype=np.uint8)
    try:
        for layer in reversed(range(spec.num_layers)):
            name = f"kv.{layer}"
            for half in (1, 0):  # V lies above K
                src = old_off[name] + half * spec.num_slots * row_s
                dst = seg.arena.shards[name].offset + half * spec.num_slots * row_d + shift * head
                _move(buf, src, dst, run, row_s, row_d, spec.num_slots, stage)
    finally:
        del buf
