"""Shared-memory shard arenas (CPU backend): one segment per rank holding all its shards.

A segment is created once (allocation before any copy), named uniquely per instance
(``sgle-<pid>-<random>-<label>``) so two servers on a host never collide, and can be attached from
another process by its ``ArenaHandle``. The creator unlinks it; attachers only close.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
import threading
from multiprocessing import resource_tracker, shared_memory

import msgspec
import numpy as np

from sgl_elastic.executor.safetensors_io import MADV_POPULATE_READ, RAW_DTYPE

__all__ = ["ShardSpec", "ArenaHandle", "ShmArena"]

_ALIGN = 64


class ShardSpec(msgspec.Struct, frozen=True):
    """One tensor in an arena: name, shape (elements), itemsize (bytes), byte offset in the segment."""

    name: str
    shape: tuple[int, ...]
    itemsize: int
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


class ArenaHandle(msgspec.Struct, frozen=True):
    """Everything another process needs to attach: segment name, size, shard table."""

    shm_name: str
    size: int
    shards: tuple[ShardSpec, ...]


_TRACKER_LOCK = threading.Lock()


def _attach_untracked(name: str) -> shared_memory.SharedMemory:
    """Attach without registering with the resource tracker: the creator owns the segment.

    Python < 3.13 registers attachments too, so the tracker would unlink the segment when the
    attacher exits (or, sharing the creator's tracker, complain when the creator unlinks it).
    """
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, create=False, track=False)  # type: ignore[call-arg]
    with _TRACKER_LOCK:
        register = resource_tracker.register
        resource_tracker.register = lambda *args, **kwargs: None  # type: ignore[assignment]
        try:
            return shared_memory.SharedMemory(name=name, create=False)
        finally:
            resource_tracker.register = register  # type: ignore[assignment]


class ShmArena:
    """Named shared-memory segment with a table of shard arrays (numpy views, raw dtype by width)."""

    def __init__(self, shm: shared_memory.SharedMemory, shards: tuple[ShardSpec, ...], owner: bool) -> None:
        self._shm = shm
        self.owner = owner
        self.shards = {s.name: s for s in shards}
        self.handle = ArenaHandle(shm.name, shm.size, shards)
        self._arrays: dict[str, np.ndarray] = {}

    @classmethod
    def create(cls, label: str, specs: list[ShardSpec] | tuple[ShardSpec, ...]) -> "ShmArena":
        """Allocate one segment for ``specs`` (offsets assigned here, 64-byte aligned)."""
        placed, off = [], 0
        for s in specs:
            placed.append(ShardSpec(s.name, tuple(s.shape), s.itemsize, off))
            off += -(-s.nbytes // _ALIGN) * _ALIGN
        name = f"sgle-{os.getpid()}-{secrets.token_hex(4)}-{label}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=max(off, 1))
        return cls(shm, tuple(placed), owner=True)

    @classmethod
    def attach(cls, handle: ArenaHandle, *, populate: bool = True) -> "ShmArena":
        """Map an arena created by another process (never unlinks it).

        ``populate``: fill this process's page tables now (MADV_POPULATE_READ), so the first copy out
        of the arena does not pay a page fault per 4 KiB (a long-lived attacher pays it once).
        """
        shm = _attach_untracked(handle.shm_name)
        flag = MADV_POPULATE_READ
        if populate and flag is not None:
            try:
                shm._mmap.madvise(flag)  # type: ignore[attr-defined]
            except OSError:
                pass
        return cls(shm, handle.shards, owner=False)

    def array(self, name: str) -> np.ndarray:
        arr = self._arrays.get(name)
        if arr is None:
            s = self.shards[name]
            arr = np.ndarray(s.shape, dtype=RAW_DTYPE[s.itemsize], buffer=self._shm.buf, offset=s.offset)
            self._arrays[name] = arr
        return arr

    def __contains__(self, name: str) -> bool:
        return name in self.shards

    @property
    def nbytes(self) -> int:
        return self._shm.size

    def close(self) -> None:
        """Drop the mapping (and unlink when this process created it)."""
        self._arrays.clear()
        try:
            self._shm.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with the process
        if self.owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass
            self.owner = False

    def __enter__(self) -> "ShmArena":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
