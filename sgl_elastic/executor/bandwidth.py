"""Measure this machine's host-reload (file read) and peer-copy (shared-memory memcpy) bandwidths
and the rate of new shared memory, to feed the cost model of the CPU executor (``Topology.single_node``).

Every measurement writes into fresh, pre-faulted shared memory (never a small reused buffer that
stays in cache), as the executor does.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from sgl_elastic.executor.safetensors_io import SafetensorsCheckpoint
from sgl_elastic.executor.shm import ShardSpec, ShmArena

__all__ = ["measure_copy_gbps", "measure_read_gbps", "measure_concurrent_gbps", "measure_alloc_gbps"]


def _arena(label: str, nbytes: int) -> ShmArena:
    from sgl_elastic.executor.cpu import _prefault

    a = ShmArena.create(label, [ShardSpec("x", (nbytes,), 1)])
    try:
        _prefault([a])
    except BaseException:
        a.close()
        raise
    return a


def _pick(ckpt: SafetensorsCheckpoint, max_bytes: int) -> list:
    chosen, total = [], 0
    for name, e in sorted(ckpt.entries.items(), key=lambda kv: (-kv[1].nbytes, kv[0])):
        if total + e.nbytes > max_bytes:
            continue
        chosen.append((name, e))
        total += e.nbytes
    if not chosen:
        raise ValueError(f"every tensor of {ckpt.directory} is larger than {max_bytes} bytes; raise max_bytes")
    return chosen


def measure_copy_gbps(nbytes: int = 256 << 20, chunk_bytes: int = 8 << 20) -> float:
    """GB/s of numpy copies of ``chunk_bytes`` between two pre-faulted shared-memory arenas, walking
    ``nbytes`` of fresh memory (cache-cold, like the executor's copies)."""
    with _arena("bw-a", nbytes) as a, _arena("bw-b", nbytes) as b:
        src, dst = a.array("x"), b.array("x")
        src[::4096] = 1
        t = time.perf_counter()
        for off in range(0, nbytes - chunk_bytes + 1, chunk_bytes):
            np.copyto(dst[off:off + chunk_bytes], src[off:off + chunk_bytes])
        dt = time.perf_counter() - t
        del src, dst
    return (nbytes // chunk_bytes) * chunk_bytes / dt / 1e9


def measure_read_gbps(ckpt: SafetensorsCheckpoint, max_bytes: int = 256 << 20) -> float:
    """GB/s of reading whole tensors of ``ckpt`` (largest first, up to ``max_bytes``) with the executor's
    reader into fresh pre-faulted shared memory (the page cache is what a recovery sees on a host that
    loaded the model)."""
    chosen = _pick(ckpt, max_bytes)
    total = sum(e.nbytes for _, e in chosen)
    with _arena("bw-r", total) as a:
        buf = a.array("x")
        t = time.perf_counter()
        off = 0
        for name, e in chosen:
            ckpt.read_region(name, buf[off:off + e.nbytes])
            off += e.nbytes
        dt = time.perf_counter() - t
        del buf
    return total / dt / 1e9


def measure_concurrent_gbps(ckpt: SafetensorsCheckpoint, nbytes: int = 256 << 20,
                            chunk_bytes: int = 8 << 20) -> tuple[float, float]:
    """(read GB/s, copy GB/s) that a reload worker and a copy worker each get *while both run*, as in
    the executor: one thread copies ``nbytes`` between two arenas, which sets the window; another reads
    checkpoint tensors (up to ``nbytes`` of them, again from the first when it runs out) into fresh
    shared memory meanwhile (a read begun in the window counts whole, and extends it). Each rate is
    its bytes over the window.

    On a host with few (or busy) cores the two share CPU time and memory bandwidth, so these are the
    figures an overlapped cost model must use.
    """
    chosen = _pick(ckpt, nbytes)
    total = sum(e.nbytes for _, e in chosen)
    counts = {"read": 0, "copy": 0}
    stop = threading.Event()
    barrier = threading.Barrier(2)
    window = {}
    with _arena("bwc-r", total) as r, _arena("bwc-a", nbytes) as a, _arena("bwc-b", nbytes) as b:
        rbuf, src, dst = r.array("x"), a.array("x"), b.array("x")
        src[::4096] = 1

        def reader() -> None:
            barrier.wait()
            while True:  # at least one read, even if the copier is done before this thread runs
                off = 0
                for name, e in chosen:
                    counts["read"] += ckpt.read_region(name, rbuf[off:off + e.nbytes])
                    window["read_end"] = time.perf_counter()  # a read begun in the window counts whole
                    off += e.nbytes
                    if stop.is_set():
                        return

        def copier() -> None:
            barrier.wait()
            window["t0"] = time.perf_counter()
            for off in range(0, nbytes - chunk_bytes + 1, chunk_bytes):
                np.copyto(dst[off:off + chunk_bytes], src[off:off + chunk_bytes])
                counts["copy"] += chunk_bytes
            window["copy_end"] = time.perf_counter()
            stop.set()

        threads = [threading.Thread(target=reader), threading.Thread(target=copier)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        del rbuf, src, dst
    span = max(window["copy_end"], window.get("read_end", 0.0)) - window["t0"]
    return counts["read"] / span / 1e9, counts["copy"] / span / 1e9


def measure_alloc_gbps(nbytes: int = 128 << 20, rounds: int = 3) -> float:
    """GB/s at which new shared memory gets its pages, as a migration's destinations do: a segment
    of ``nbytes`` is filled and freed (a failed rank's memory, freed before the migration), then a
    new one of the same size is reserved (``posix_fallocate``) and touched page by page. The best
    of ``rounds`` (on a VM the first use of host memory is several times slower than reusing pages
    just freed, which is what a migration does). On a VM this is what a migration's new memory
    costs, far more than the copy into it."""
    from sgl_elastic.executor.cpu import _prefault

    best = float("inf")
    for _ in range(max(1, rounds)):
        with _arena("bwa-lost", nbytes):
            pass  # filled by _arena (pre-faulted), freed on exit
        a = ShmArena.create("bwa-new", [ShardSpec("x", (nbytes,), 1)])
        try:
            t = time.perf_counter()
            _prefault([a])
            best = min(best, time.perf_counter() - t)
        finally:
            a.close()
    return nbytes / best / 1e9
