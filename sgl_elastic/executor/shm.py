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

__all__ = ["ShardSpec", "ArenaHandle", "ShmArena", "fallocate_range"]


def fallocate_range(fd: int, start: int, end: int, chunk: int = 64 << 20) -> None:
    """Give bytes ``[start, end)`` of the file ``fd`` their pages (``posix_fallocate``, ``chunk`` at a
    time; never writes data). No room (or no ``posix_fallocate``): stops quietly, and the pages
    come at first write instead."""
    if fd < 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        for off in range(start, end, chunk):
            os.posix_fallocate(fd, off, min(chunk, end - off))
    except OSError:
        pass

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
        placed, size = cls.place(specs)
        name = f"sgle-{os.getpid()}-{secrets.token_hex(4)}-{label}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        return cls(shm, placed, owner=True)

    @staticmethod
    def place(specs) -> tuple[tuple[ShardSpec, ...], int]:
        """Offsets of ``specs`` in one segment (64-byte aligned, in order) and the segment's size."""
        placed, off = [], 0
        for s in specs:
            placed.append(ShardSpec(s.name, tuple(s.shape), s.itemsize, off))
            off += -(-s.nbytes // _ALIGN) * _ALIGN
        return tuple(placed), max(off, 1)

    def regrow(self, specs) -> "ShmArena":
        """The same file under a new shard table: extended (``ftruncate``) to the new size, never
        shrunk, mapped anew. The returned arena owns the name; this one keeps its (old-size) mapping
        but no longer unlinks. Nothing is copied: the caller moves the bytes (``CpuExecutor``'s
        in-place migration). ``give_back`` undoes the ownership transfer."""
        if not self.owner:
            raise ValueError(f"{self.handle.shm_name}: only the creator of an arena may regrow it")
        placed, size = self.place(specs)
        fd = getattr(self._shm, "_fd", -1)
        if fd < 0:
            raise ValueError(f"{self.handle.shm_name}: no file descriptor to extend")
        if size > self.nbytes:
            os.ftruncate(fd, size)
        shm = _attach_untracked(self.handle.shm_name)
        grown = ShmArena(shm, placed, owner=True)
        self.owner = False
        return grown

    def give_back(self, old: "ShmArena") -> None:
        """Undo ``regrow`` (``self`` is the grown arena): ``old`` owns the name again, the file has
        its old size again, and this mapping is closed."""
        self.owner, old.owner = False, True
        fd = getattr(old._shm, "_fd", -1)
        if fd >= 0:
            try:
                os.ftruncate(fd, old.nbytes)
            except OSError:
                pass
        self.close()

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
