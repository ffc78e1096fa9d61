"""CPU implementation of the daemon's device memory: POSIX shared-memory segments.

Daemon side, a segment is the executor's ``ShmArena`` (so ``CpuExecutor`` runs migration plans on
it directly), named ``sgle-<daemon pid>-<random>-d<instance>-<kind>-r<rank>``: unique per daemon
instance, never a fixed name. The daemon unlinks its segments when it exits (also on SIGTERM /
SIGINT); if it is SIGKILLed, Python's resource tracker (a process of its own) unlinks them, and
``reap_segments(pid)`` removes any left by a dead daemon pid.

Client side, ``ShmMapping`` maps ``/dev/shm/<name>`` read-write with a plain ``mmap`` (no
``SharedMemory`` object: that would register the name with the client's resource tracker, which
would unlink the daemon's segment when the client exits), or, for a segment remapped by a
migration (``SegmentRef.runs``), run by run into one address range (``executor.shm.map_runs``).
A mapping stays valid after the daemon unlinks the name or dies: the pages live until the last
mapping goes.
"""

from __future__ import annotations

import glob
import mmap
import os
import re

from sgl_elastic.executor.safetensors_io import MADV_POPULATE_READ
from sgl_elastic.executor.shm import ShardSpec, ShmArena, fallocate_range
from sgl_elastic.memory.base import DeviceMemory, Segment, TensorAlloc, segment_dtypes
from sgl_elastic.memory.handles import SegmentRef, TensorHandle

__all__ = ["ShmMemory", "ShmSegment", "ShmMapping", "reap_segments", "segments_of_pid", "SHM_DIR"]

SHM_DIR = "/dev/shm"
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")


class ShmSegment(Segment):
    """One ``ShmArena`` plus the torch dtype of each tensor (the arena knows only item sizes)."""

    def __init__(self, rank: int, kind: str, arena: ShmArena, dtypes: dict[str, str], resident: int = 0) -> None:
        self.rank, self.kind, self.arena, self.dtypes = rank, kind, arena, dtypes
        self.nbytes = arena.nbytes
        self.resident = resident  # the first bytes already have their pages (a regrown file)

    def refs(self) -> list[SegmentRef]:
        h = self.arena.handle
        return [SegmentRef(backend="shm", locator=h.shm_name, size=h.size, runs=h.runs)]

    def handles(self) -> list[TensorHandle]:
        return [TensorHandle(s.name, 0, s.offset, self.dtypes[s.name], tuple(s.shape), s.transposed)
                for s in self.arena.handle.shards]

    def load_region(self, ckpt, name: str, region: tuple[int, int, int, int]) -> int:
        return ckpt.read_region(name, self.arena.array(name), *region)

    def write(self, name: str, src) -> None:
        from sgl_elastic.executor.safetensors_io import copy_bits

        dst = self.arena.array(name)
        copy_bits(dst, src.reshape(dst.shape))

    def zero(self) -> None:
        for name in self.arena.shards:
            self.arena.array(name)[...] = 0

    def reserve_async(self) -> None:
        """``posix_fallocate`` the segment in a background thread, 64 MiB at a time, on a duplicate of
        its descriptor (closing the segment meanwhile cannot redirect it to another file). Used for KV
        pools: SGLang's own pool is zeroed at start, so its pages exist before the first token; a sparse
        one would instead take every page fault (on a VM that backs memory lazily, a slow one) in the
        first decode steps after a recovery."""
        import threading

        fd = self.arena.fd
        if fd < 0 or self.arena.runs or not hasattr(os, "posix_fallocate"):
            return
        own, start, size = os.dup(fd), self.resident, self.nbytes

        def work() -> None:
            try:
                fallocate_range(own, start, size)
            finally:
                os.close(own)

        threading.Thread(target=work, name="sgle-reserve", daemon=True).start()

    def close(self) -> None:
        self.arena.close()


class ShmMemory(DeviceMemory):
    backend = "shm"
    shared_pool = True

    def __init__(self, instance: str, in_place: str = "remap") -> None:
        self.instance, self.in_place = instance, in_place

    def free_bytes(self, rank: int) -> int:
        """Free bytes of the /dev/shm filesystem (shared by every rank of the node)."""
        st = os.statvfs(SHM_DIR)
        return st.f_bavail * st.f_frsize

    def allocate(self, rank: int, kind: str, specs: list[TensorAlloc]) -> ShmSegment:
        arena = ShmArena.create(f"d{self.instance}-{kind}-r{rank}",
                                [ShardSpec(s.name, s.shape, s.itemsize, transposed=s.transposed, alone=s.alone) for s in specs])
        return ShmSegment(rank, kind, arena, {s.name: s.dtype for s in specs})

    def regrow(self, seg: Segment, rank: int, specs: list[TensorAlloc]) -> ShmSegment | None:
        """The same file, extended to fit ``specs`` (never shrunk: a smaller table gets None)."""
        shards = [ShardSpec(s.name, s.shape, s.itemsize, transposed=s.transposed, alone=s.alone) for s in specs]
        _, size = ShmArena.place(shards)
        if not isinstance(seg, ShmSegment) or not seg.arena.owner or seg.arena.runs or size < seg.arena.nbytes:
            return None
        resident = seg.arena.nbytes
        grown = seg.arena.regrow(shards)
        seg.arena.close()  # the old object's mapping; the file is the grown arena's now
        return ShmSegment(rank, seg.kind, grown, {s.name: s.dtype for s in specs}, resident=resident)

    def wrap(self, rank: int, kind: str, arena: ShmArena, dtypes: dict[str, str]) -> ShmSegment:
        """Adopt an arena the executor allocated (migration destinations)."""
        return ShmSegment(rank, kind, arena, dtypes)

    def measure_bandwidths(self, ckpt) -> tuple[float, float, float]:
        """A reload worker and a copy worker side by side for ~0.1-0.3 s over up to 128 MiB (at most
        the checkpoint's size) of fresh shared memory each (``executor.bandwidth.
        measure_concurrent_gbps``): on a host with few cores they share the CPU and the memory
        bandwidth, as the migration's reloads and moves do; then the rate of new pages after freeing
        as many (``measure_alloc_gbps``), as a migration gets them."""
        from sgl_elastic.executor.bandwidth import measure_alloc_gbps, measure_concurrent_gbps

        mib = 1 << 20
        size = sum(e.nbytes for e in ckpt.entries.values())  # a small model gets a small probe
        probe = max(4, min(128, size // mib)) * mib
        read, copy = measure_concurrent_gbps(ckpt, nbytes=probe, chunk_bytes=mib)
        return read, copy, measure_alloc_gbps(probe)

    def run_plan(self, plan, old: dict[int, Segment], ckpt, topo, label: str, **nodes):
        """``executor.CpuExecutor`` runs the plan on the shared-memory arenas directly, remapping (or,
        ``in_place="move"``, regrowing) a survivor's own file where it can (only the lost share gets
        new pages) and allocating the other destinations before any copy. ``nodes``: ``ranks``,
        ``remote``, ``endpoint`` of a multi-node migration (``CpuExecutor.run``)."""
        from sgl_elastic.executor.cpu import CpuExecutor

        dtypes = segment_dtypes(old.values(), ckpt)
        remap = self.in_place == "remap"
        new_arenas, report = CpuExecutor(ckpt, topo, in_place=self.in_place != "off", remap=remap,
                                         reload_workers=reload_workers(remap)).run(
            plan, {r: s.arena for r, s in old.items()}, label=label, **nodes)
        return {r: self.wrap(r, "weights", a, dtypes) for r, a in new_arenas.items()}, report


def reload_workers(remap: bool) -> int:
    """Reload threads for a migration: with remapped segments no core moves kept bytes, so the
    reloads get every core this process may run on (up to 4; bench model 3 -> 2 on 2 cores: 0.46 s
    instead of 0.71 s, ``bench/migration_bench.py``); with the moves, one (the movers need the rest)."""
    if not remap:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


class ShmMapping:
    """Client-side read-write mapping of one shared-memory segment; ``flat`` is a uint8 torch tensor."""

    def __init__(self, ref: SegmentRef, populate: bool = False) -> None:
        """``populate``: map every page now (``MADV_POPULATE_READ``, one call) instead of one page
        fault per 4 KiB at first use. Only for segments the daemon filled (weights, parameters): on a
        sparse one (a KV pool, whose pages come as tokens are written) it would allocate every page."""
        import torch

        if not _SAFE_NAME.fullmatch(ref.locator):
            raise ValueError(f"shared-memory name {ref.locator!r} is not a plain segment name")
        path = os.path.join(SHM_DIR, ref.locator)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} does not exist: the daemon freed this segment (layout changed or daemon stopped);"
                " export the handles again"
            ) from None
        self._mmap = self._view = None
        try:
            size = os.fstat(fd).st_size
            need = max((f + n for _, f, n in ref.runs), default=ref.size)
            if size < need:
                raise ValueError(f"{path} holds {size} bytes but the handle says {need}")
            if ref.runs:
                from sgl_elastic.executor.shm import map_runs

                self._view = map_runs(fd, ref.size, ref.runs, populate=populate)
            else:
                self._mmap = mmap.mmap(fd, ref.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        if self._view is not None:
            self.flat = torch.frombuffer(self._view, dtype=torch.uint8)
            return
        flag = MADV_POPULATE_READ
        if populate and flag is not None:
            try:
                self._mmap.madvise(flag)
            except OSError:
                pass  # older kernel: pages fault in at first use instead
        self.flat = torch.frombuffer(self._mmap, dtype=torch.uint8)

    def close(self) -> None:
        self.flat = None
        self._view = None  # a run mapping goes with the last tensor over it
        if self._mmap is None:
            return
        try:
            self._mmap.close()
        except BufferError:
            pass  # views still alive: the mapping goes when they do


def segments_of_pid(pid: int) -> list[str]:
    """Shared-memory files created by process ``pid`` through ``ShmArena`` (``sgle-<pid>-*``)."""
    return sorted(glob.glob(os.path.join(SHM_DIR, f"sgle-{int(pid)}-*")))


def reap_segments(pid: int) -> list[str]:
    """Unlink the segments of ``pid`` if that process is gone; returns what was removed."""
    try:
        os.kill(pid, 0)
        return []  # alive: its segments are its own business
    except ProcessLookupError:
        pass
    except PermissionError:
        return []
    removed = []
    for path in segments_of_pid(pid):
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def reap_dead() -> list[str]:
    """Unlink every ``sgle-<pid>-*`` segment whose creating process is gone (a daemon SIGKILLed
    together with its resource tracker, e.g. by SGLang's ``kill_process_tree``, leaves them)."""
    pids = set()
    for path in glob.glob(os.path.join(SHM_DIR, "sgle-*-*")):
        head = os.path.basename(path).split("-")[1]
        if head.isdigit():
            pids.add(int(head))
    return [p for pid in sorted(pids) for p in reap_segments(pid)]
