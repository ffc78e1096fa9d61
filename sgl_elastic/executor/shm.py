"""Shared-memory shard arenas (CPU backend): one segment per rank holding all its shards.

A segment is created once (allocation before any copy), named uniquely per instance
(``sgle-<pid>-<random>-<label>``) so two servers on a host never collide, and can be attached from
another process by its ``ArenaHandle``. The creator unlinks it; attachers only close.

Two address spaces: the *file* (``/dev/shm/<name>``, where the pages are) and the *view* (the
contiguous bytes the shard table's offsets index, what numpy and torch see). A new arena maps the
file as it is (view offset = file offset). An arena *remapped* after a layout change (``remap``)
is instead a list of ``runs`` ``(view offset, file offset, bytes)``, page-aligned, each mapped with
``mmap(MAP_FIXED)`` into one reserved address range (``map_runs``): the bytes a survivor keeps stay
in the file pages they were in (never copied, whatever their new offset in the view), the bytes it
gains get new pages at the end of the file, and the pages it no longer holds are given back to the
kernel (``release_unused``: ``fallocate(PUNCH_HOLE)``). Placement is page-aligned per tensor when
every 2-D shard is a whole number of pages (``place``), so that any layout of such a model can be
remapped.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import secrets
import sys
import threading
import weakref
from multiprocessing import resource_tracker, shared_memory

import msgspec
import numpy as np

from sgl_elastic.executor.safetensors_io import MADV_POPULATE_READ, RAW_DTYPE

__all__ = ["ShardSpec", "ArenaHandle", "ShmArena", "fallocate_range", "map_runs", "punch_holes", "PAGE"]


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
PAGE = mmap.PAGESIZE
Run = tuple[int, int, int]  # (view offset, file offset, bytes)

_MAP_FIXED, _MAP_NORESERVE = 0x10, 0x4000
_FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
_libc = None


def _c():
    """libc's mmap / munmap / madvise / fallocate with their argument types (loaded once)."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        _libc = lib
    return _libc


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


def map_runs(fd: int, size: int, runs: tuple[Run, ...] | list[Run], populate: bool = False):
    """A ``size``-byte buffer (ctypes array) whose byte ``v`` is file byte ``f + (v - view)`` of the
    run ``(view, f, n)`` covering it: one reserved address range, each run ``mmap``ed into it
    (``MAP_SHARED | MAP_FIXED``). The mapping goes when the buffer object does (numpy arrays and
    torch tensors over it keep it alive), never before. ``populate``: fault every page in now."""
    lib = _c()
    total = _pages(max(size, 1))
    failed = ctypes.c_void_p(-1).value
    prot_none = 0
    base = lib.mmap(None, total, prot_none, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
    if base in (None, failed):
        raise OSError(ctypes.get_errno(), f"cannot reserve {total} bytes of address space")
    try:
        for view, off, n in runs:
            if view % PAGE or off % PAGE or view + n > total or (n % PAGE and view + n != size):
                raise ValueError(f"run (view {view}, file {off}, {n} bytes) is not page-aligned inside {size} bytes")
            got = lib.mmap(base + view, _pages(n), mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED,
                           fd, off)
            if got != base + view:
                raise OSError(ctypes.get_errno(), f"mmap of file bytes [{off}, +{n}) at view {view} failed")
        if populate and MADV_POPULATE_READ is not None:
            lib.madvise(base, total, MADV_POPULATE_READ)  # an old kernel refuses: pages fault in at first use
    except BaseException:
        lib.munmap(base, total)
        raise
    buf = (ctypes.c_uint8 * max(size, 1)).from_address(base)
    weakref.finalize(buf, lib.munmap, base, total)
    return buf


def punch_holes(fd: int, ranges: list[tuple[int, int]]) -> int:
    """Give the pages of the file byte ``ranges`` ``(offset, bytes)`` back (the file keeps its size;
    reading there gives zeros); returns the bytes punched."""
    lib, done = _c(), 0
    for off, n in ranges:
        if n > 0 and lib.fallocate(fd, _FALLOC_PUNCH, off, n) == 0:
            done += n
    return done


def _coalesce(runs: list[Run]) -> list[Run]:
    out: list[Run] = []
    for v, f, n in runs:
        if out and out[-1][0] + out[-1][2] == v and out[-1][1] + out[-1][2] == f:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n)
        else:
            out.append((v, f, n))
    return out


class ShardSpec(msgspec.Struct, frozen=True):
    """One tensor in an arena: name, shape (elements), itemsize (bytes), byte offset in the segment;
    ``transposed``: a 2-D tensor stored column-major (``shape[::-1]`` row-major; ``ShmArena.array``
    still gives it in ``shape``, as a transposed view); ``alone``: a tensor never cut and never part
    of a fused parameter (a norm, a router), which page-aligned placement may pad."""

    name: str
    shape: tuple[int, ...]
    itemsize: int
    offset: int = 0
    transposed: bool = False
    alone: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


class ArenaHandle(msgspec.Struct, frozen=True):
    """Everything another process needs to attach: segment name, size (of the view), shard table,
    and the runs of a remapped arena (empty: the view is the file)."""

    shm_name: str
    size: int
    shards: tuple[ShardSpec, ...]
    runs: tuple[tuple[int, int, int], ...] = ()


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

    def __init__(self, shm: shared_memory.SharedMemory, shards: tuple[ShardSpec, ...], owner: bool,
                 runs: tuple[Run, ...] | list[Run] = (), size: int | None = None, file_size: int | None = None,
                 populate: bool = False) -> None:
        self._shm = shm
        self.owner = owner
        self.shards = {s.name: s for s in shards}
        self.runs: tuple[Run, ...] = tuple(tuple(r) for r in runs)  # type: ignore[misc]
        self.size = shm.size if size is None else size
        self.file_size = shm.size if file_size is None else file_size
        self._view = map_runs(self.fd, self.size, self.runs, populate) if self.runs else None
        self.handle = ArenaHandle(shm.name, self.size, shards, self.runs)
        self._arrays: dict[str, np.ndarray] = {}

    @property
    def fd(self) -> int:
        return getattr(self._shm, "_fd", -1)

    @property
    def buf(self):
        """The view's bytes (a buffer: the file's own mapping, or the runs' mapping)."""
        return self._view if self._view is not None else self._shm.buf

    @property
    def page_aligned(self) -> bool:
        return all(s.offset % PAGE == 0 for s in self.shards.values())

    def file_ranges(self, view: int, n: int) -> list[tuple[int, int]]:
        """``(file offset, bytes)`` pieces holding view bytes ``[view, view + n)``."""
        if not self.runs:
            return [(view, n)]
        out, end = [], view + n
        for v, f, m in self.runs:
            a, b = max(view, v), min(end, v + m)
            if a < b:
                out.append((f + a - v, b - a))
        if sum(x[1] for x in out) != n:
            raise ValueError(f"view bytes [{view}, {end}) are not all mapped in {self.handle.shm_name}")
        return out

    @classmethod
    def create(cls, label: str, specs: list[ShardSpec] | tuple[ShardSpec, ...]) -> "ShmArena":
        """Allocate one segment for ``specs`` (offsets assigned here, 64-byte aligned)."""
        placed, size = cls.place(specs)
        name = f"sgle-{os.getpid()}-{secrets.token_hex(4)}-{label}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        return cls(shm, placed, owner=True)

    @staticmethod
    def place(specs) -> tuple[tuple[ShardSpec, ...], int]:
        """Offsets of ``specs`` in one segment, in order, and the segment's size. Page-aligned (each
        tensor on its own pages) when every shard that is not ``alone`` is a whole number of pages:
        then a fused parameter's parts stay back to back and any later layout can be ``remap``ped.
        Else 64-byte aligned."""
        specs = list(specs)
        align = PAGE if all(s.nbytes % PAGE == 0 for s in specs if not s.alone) else _ALIGN
        placed, off = [], 0
        for s in specs:
            placed.append(ShardSpec(s.name, tuple(s.shape), s.itemsize, off, s.transposed, s.alone))
            off += -(-s.nbytes // align) * align
        return tuple(placed), max(off, 1)

    def regrow(self, specs) -> "ShmArena":
        """The same file under a new shard table: extended (``ftruncate``) to the new size, never
        shrunk, mapped anew. The returned arena owns the name; this one keeps its (old-size) mapping
        but no longer unlinks. Nothing is copied: the caller moves the bytes (``CpuExecutor``'s
        in-place migration). ``give_back`` undoes the ownership transfer."""
        if not self.owner:
            raise ValueError(f"{self.handle.shm_name}: only the creator of an arena may regrow it")
        if self.runs:
            raise ValueError(f"{self.handle.shm_name}: a remapped arena is not regrown; remap it")
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

    def remap(self, specs, keep: list[Run]) -> tuple["ShmArena", list[tuple[int, int]]]:
        """The same file under a new shard table (``specs``, placed page-aligned), whose view bytes
        ``[new, new + n)`` of each ``keep`` range ``(new, old, n)`` are the pages holding this arena's
        view bytes ``[old, old + n)``: nothing is copied, and those bytes keep their file offsets
        (and physical pages). Every other view byte gets a new page past the end of the file
        (returned as ``(file offset, bytes)``, for the caller to fill). Ownership passes as in
        ``regrow`` (``give_back`` undoes it); ``release_unused`` on the result frees the pages no run
        uses any more, once nothing reads the old layout."""
        if not self.owner:
            raise ValueError(f"{self.handle.shm_name}: only the creator of an arena may remap it")
        placed, size = self.place(specs)
        if any(s.offset % PAGE for s in placed):
            raise ValueError(f"{self.handle.shm_name}: the new shard table is not page-aligned; cannot remap")
        pieces: list[Run] = []
        for new, old, n in sorted(keep):
            if new % PAGE or old % PAGE or new + n > _pages(size):
                raise ValueError(f"keep range (new {new}, old {old}, {n} bytes) is not page-aligned in the view")
            for f, m in self.file_ranges(old, min(n, self.size - old)):
                pieces.append((new, f, m))
                new += m
        runs: list[Run] = []
        fresh: list[tuple[int, int]] = []
        at, cur = _pages(self.file_size), 0

        def gap(a: int, b: int) -> None:
            nonlocal at
            runs.append((a, at, b - a))
            fresh.append((at, b - a))
            at += _pages(b - a)

        for new, f, m in pieces:
            if new < cur:
                raise ValueError(f"keep ranges overlap at view byte {new}")
            if new > cur:
                gap(cur, new)
            runs.append((new, f, m))
            cur = new + _pages(m) if new + m < size else new + m
        if cur < size:
            gap(cur, size)
        if at > self.file_size:
            os.ftruncate(self.fd, at)
        shm = _attach_untracked(self.handle.shm_name)
        try:
            out = ShmArena(shm, placed, owner=True, runs=_coalesce(runs), size=size, file_size=max(at, self.file_size))
        except BaseException:
            shm.close()
            os.ftruncate(self.fd, self.file_size)
            raise
        self.owner = False
        return out, fresh

    def release_unused(self) -> int:
        """Punch out every file page no run of this arena maps (the old layout's, once nothing reads
        it); returns the bytes given back."""
        used = sorted((f, _pages(n)) for _, f, n in self.runs) if self.runs else [(0, _pages(self.size))]
        holes, cur = [], 0
        for f, n in used:
            if f > cur:
                holes.append((cur, f - cur))
            cur = max(cur, f + n)
        if cur < self.file_size:
            holes.append((cur, self.file_size - cur))
        return punch_holes(self.fd, holes)

    def give_back(self, old: "ShmArena") -> None:
        """Undo ``regrow`` / ``remap`` (``self`` is the new arena): ``old`` owns the name again, the
        file has its old size again, and this mapping is closed."""
        self.owner, old.owner = False, True
        fd = old.fd
        if fd >= 0:
            try:
                os.ftruncate(fd, old.file_size)
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
        if handle.runs:
            return cls(shm, handle.shards, owner=False, runs=handle.runs, size=handle.size, populate=populate)
        flag = MADV_POPULATE_READ
        if populate and flag is not None:
            try:
                shm._mmap.madvise(flag)  # type: ignore[attr-defined]
            except OSError:
                pass
        return cls(shm, handle.shards, owner=False)

    def array(self, name: str) -> np.ndarray:
        """Tensor ``name`` in its shape (a transposed view for a ``transposed`` one)."""
        arr = self._arrays.get(name)
        if arr is None:
            s = self.shards[name]
            if s.transposed:
                arr = np.ndarray(s.shape[::-1], dtype=RAW_DTYPE[s.itemsize], buffer=self.buf, offset=s.offset).T
            else:
                arr = np.ndarray(s.shape, dtype=RAW_DTYPE[s.itemsize], buffer=self.buf, offset=s.offset)
            self._arrays[name] = arr
        return arr

    def __contains__(self, name: str) -> bool:
        return name in self.shards

    @property
    def address(self) -> int:
        """Address of the view's first byte in this process (what a transfer engine registers)."""
        return int(np.frombuffer(self.buf, dtype=np.uint8, count=1).ctypes.data)

    @property
    def nbytes(self) -> int:
        """Bytes of the view (what the shard table indexes)."""
        return self.size

    def close(self) -> None:
        """Drop the mapping (and unlink when this process created it)."""
        self._arrays.clear()
        self._view = None  # its mapping goes with the last array over it
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
