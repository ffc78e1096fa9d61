"""KV pools carried over a layout change (CPU shared memory), so that resumed requests keep their
cached prefixes instead of prefilling prompt and output again.

A KV pool of rank r holds, per layer, ``kv.<l>`` of ``[2, num_slots, kv_heads[r], head_dim]`` for the
KV heads of r's attention range. After a failure a survivor gains heads whose KV was on the dead
rank; that KV comes from the dead rank's *backup*: a second pool of the same shape that the rank
itself writes beside its own (``patches/memory_pool.py``) and that is held on the next rank's
device (``backup_holder``), so it outlives the rank. Every head of the new layout needs a live
source (a survivor's pool, else a surviving backup); if one has none, nothing is carried over (the
caller drops the KV and the index, and the requests are re-prefilled as before).

Only the slots the prefix index holds are carried (the other slots are free: SGLang writes a slot
before it reads it). Step 1: the KV of every new rank's heads at those slots is gathered from the
sources (small: tokens x heads, not the pools). Step 2: a new rank whose survivor's pool file is
large enough takes it over, extended (``regrow``: its other bytes are garbage now, its pages
stay), the others get new pools. Step 3: the gathered KV is written at the same slots.

Slots keep their numbers, so the prefix index stays valid. Only shared memory (``ShmSegment``) is
handled; another backend returns None (KV dropped, as before).
"""

from __future__ import annotations

import numpy as np

__all__ = ["backup_holder", "migrate_kv"]


def backup_holder(rank: int, tp: int) -> int:
    """The rank whose device holds ``rank``'s KV backup: the next one (ring)."""
    return (rank + 1) % tp


def migrate_kv(memory, spec, new_spec, old_attn, new_attn, old2new_rank, pools: dict, backups: dict,
               allocs, slots, only=None) -> tuple[dict, set[int]] | None:
    """(new rank -> its KV pool under ``new_attn``, the old ranks whose pool files became new pools),
    with the KV of ``slots`` (the indexed ones) of every head taken from ``pools`` (surviving old rank
    -> pool) or else ``backups`` (old rank -> its surviving backup); None when a head has no live
    source or the memory is not shared memory. ``allocs(spec, rank)``: the pool's tensor table. The
    caller frees the old pools not taken over and every backup. On an error the new pools are freed
    (a taken-over file too: its bytes are no pool any more) and the error raised. ``only``: the new
    ranks to build (several nodes: this daemon's; their heads need a source here), None: all."""
    from sgl_elastic.memory.shm import ShmSegment

    if not all(isinstance(s, ShmSegment) for s in [*pools.values(), *backups.values()]):
        return None
    if (spec.num_layers, spec.num_slots, spec.dtype, spec.head_dim) != (
            new_spec.num_layers, new_spec.num_slots, new_spec.dtype, new_spec.head_dim):
        return None
    num_layers = spec.num_layers
    idx = np.asarray(sorted(slots), dtype=np.int64)
    # head -> (index in its source pool, the source); survivors' pools first, then backups
    source: dict[int, tuple[int, object]] = {}
    for table in (pools, backups):
        for o, seg in sorted(table.items()):
            a, b = old_attn.rank_kv_head_range(o)
            for h in range(a, b):
                source.setdefault(h, (h - a, seg))
    mine = list(range(new_attn.num_ranks)) if only is None else sorted(only)
    ranges = {d: new_attn.rank_kv_head_range(d) for d in mine}
    if any(h not in source for a, b in ranges.values() for h in range(a, b)):
        return None
    # Step 1: gather, per new rank and layer, [2, len(slots), heads, head_dim] (before any file changes)
    gathered: dict[int, list[np.ndarray]] = {}
    for d, (a, b) in ranges.items():
        per_layer = []
        for layer in range(num_layers):
            parts = [source[h][1].arena.array(f"kv.{layer}")[:, idx, source[h][0]] for h in range(a, b)]
            per_layer.append(np.stack(parts, axis=2))
        gathered[d] = per_layer
    # Step 2: a survivor's pool file for its new rank, else a new pool
    out: dict = {}
    taken: set[int] = set()
    try:
        for o, d in enumerate(old2new_rank):
            if d in ranges and o in pools:
                grown = memory.regrow(pools[o], d, allocs(new_spec, d))
                if grown is not None:
                    out[d] = grown
                    taken.add(o)
        for d in mine:
            if d not in out:
                out[d] = memory.allocate(d, "kv", allocs(new_spec, d))
            # Step 3: the gathered KV at the same slots
            for layer, g in enumerate(gathered[d]):
                out[d].arena.array(f"kv.{layer}")[:, idx] = g
    except BaseException:
        for seg in out.values():
            seg.close()
        raise
    return out, taken
