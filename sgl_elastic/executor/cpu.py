"""CPU executor: runs a MigrationPlan on shared-memory shards (one ``ShmArena`` per rank).

Step 1 allocates every destination arena (pages pre-faulted) before any copy. Step 2 runs the host
reloads (``preadv`` of the needed byte ranges straight into the destination) on reload workers and
the keep/peer copies (numpy copies between shared-memory arenas, GIL released) on copy workers,
concurrently, each queue longest-first. Step 3 runs the stage-1 fan-out copies, which read data the
reloads just wrote. The old arenas may live in other processes (attached by handle).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import numpy as np

from sgl_elastic.executor.ops import full_region, shard_view, split_queues
from sgl_elastic.executor.report import ExecReport
from sgl_elastic.executor.safetensors_io import SafetensorsCheckpoint
from sgl_elastic.layout.geometry import rank_tensors
from sgl_elastic.executor.shm import ShardSpec, ShmArena
from sgl_elastic.planner.cost import predict_time
from sgl_elastic.planner.plan import KEEP, CopyOp, MigrationPlan
from sgl_elastic.planner.topology import Topology

__all__ = ["CpuExecutor", "allocate_rank_arenas", "load_rank_from_checkpoint"]


_PREFAULT_CHUNK = 256 << 20


def _prefault_range(arena: ShmArena, start: int, end: int) -> None:
    """Allocate and map the pages of ``[start, end)`` of ``arena`` (a worker thread: both calls
    release the GIL). ``posix_fallocate`` gives tmpfs its pages without a fault each; the strided
    write then maps them."""
    fd = getattr(arena._shm, "_fd", -1)  # type: ignore[attr-defined]
    if fd >= 0 and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, start, end - start)
        except OSError:
            pass
    np.frombuffer(arena._shm.buf, dtype=np.uint8)[start:end:4096] = 0  # type: ignore[attr-defined]


def _prefault(arenas: list[ShmArena]) -> None:
    """Fault every page of ``arenas`` in now, in parallel chunks over the cores, so the copies
    measure copying, not page allocation (one thread faulting 2 GB of tmpfs took 1-4 s here)."""
    chunks = [(a, off, min(off + _PREFAULT_CHUNK, a.nbytes)) for a in arenas for off in range(0, a.nbytes, _PREFAULT_CHUNK)]
    workers = max(1, min(len(chunks), os.cpu_count() or 1))
    lock, errors = threading.Lock(), []

    def work() -> None:
        try:
            while True:
                with lock:
                    if not chunks:
                        return
                    a, start, end = chunks.pop()
                _prefault_range(a, start, end)
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=work, name=f"sgle-prefault-{k}", daemon=True) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def allocate_rank_arenas(plan_layout, label: str, prefault: bool = True) -> dict[int, ShmArena]:
    """One arena per rank of ``plan_layout`` with every shard it holds (shapes from the layout)."""
    out = {}
    try:
        for r in range(plan_layout.tp_size):
            specs = [ShardSpec(t.name, shape, t.dtype_bytes) for t, shape in rank_tensors(plan_layout, r)]
            out[r] = ShmArena.create(f"{label}-r{r}", specs)
        if prefault:
            _prefault(list(out.values()))
    except BaseException:
        for a in out.values():
            a.close()
        raise
    return out


def load_rank_from_checkpoint(layout, rank: int, ckpt: SafetensorsCheckpoint, arena: ShmArena) -> int:
    """Fill ``arena`` with ``rank``'s shards of ``layout`` read from ``ckpt``; returns bytes read."""
    from sgl_elastic.layout.geometry import shard_region

    n = 0
    for t, _ in rank_tensors(layout, rank):
        reg = shard_region(t, layout, rank)
        assert reg is not None
        n += ckpt.read_region(t.name, arena.array(t.name), *reg)
    return n


class CpuExecutor:
    """Run plans on shared-memory shards.

    Args:
        checkpoint: the model's safetensors checkpoint (host reload source).
        topology: bandwidths for the cost model (``Topology.single_node`` with measured figures).
        reload_workers / copy_workers: threads per queue (the model assumes the measured bandwidths
            are what these workers get in all).
    """

    def __init__(self, checkpoint: SafetensorsCheckpoint, topology: Topology, *, reload_workers: int = 1,
                 copy_workers: int = 1) -> None:
        self.checkpoint = checkpoint
        self.topology = topology
        self.reload_workers = reload_workers
        self.copy_workers = copy_workers
        self.copy_gbps = topology.node_copy_gbps[0] if topology.node_copy_gbps else 0.0

    def run(self, plan: MigrationPlan, old: dict[int, ShmArena], label: str = "mig") -> tuple[dict[int, ShmArena], ExecReport]:
        """Execute ``plan``: ``old`` maps old rank -> its arena (survivors only). Returns new rank ->
        arena (caller closes them) and the report."""
        missing = [s for s in range(plan.old_layout.tp_size) if s not in plan.change.failed and s not in old]
        if missing:
            raise ValueError(f"no arena for surviving old ranks {missing}; pass one per survivor")
        t0 = time.perf_counter()
        # Step 1: every destination buffer, once, before any copy.
        new = allocate_rank_arenas(plan.new_layout, label)
        t_alloc = time.perf_counter()
        reloads, copies, fanout = split_queues(plan)
        shapes = {t.name: t.shape for t in plan.old_layout.tensors()}
        read0 = self.checkpoint.bytes_read
        try:
            # Step 2: reloads and copies concurrently (reload workers first: the slowest resource).
            def do_reload(op: CopyOp) -> None:
                dst = shard_view(new[op.dst_rank].array(op.tensor), op, op.dst_offset)
                self.checkpoint.read_region(op.tensor, dst, *full_region(shapes[op.tensor], op))

            def do_copy(op: CopyOp) -> None:
                src_arena = new[op.src_rank] if op.stage == 1 else old[op.src_rank]
                src = shard_view(src_arena.array(op.tensor), op, op.src_offset)
                dst = shard_view(new[op.dst_rank].array(op.tensor), op, op.dst_offset)
                np.copyto(dst, src)

            spans: dict[str, float] = {}
            threads = _start(reloads, do_reload, self.reload_workers, "reload", spans) + \
                _start(copies, do_copy, self.copy_workers, "copy", spans)
            _join(threads)
            # Step 3: fan-out copies read what the reloads wrote.
            t_fan = time.perf_counter()
            _join(_start(fanout, do_copy, self.copy_workers, "fanout", spans))
            t_end = time.perf_counter()
        except BaseException:
            for a in new.values():
                a.close()
            raise
        keep_gbps = self.copy_gbps
        report = ExecReport(
            backend="cpu-shm", achieved_s=t_end - t0, alloc_s=t_alloc - t0, reload_s=spans.get("reload", 0.0),
            copy_s=spans.get("copy", 0.0), fanout_s=t_end - t_fan,
            keep_bytes=sum(op.nbytes for op in copies if op.kind == KEEP),
            peer_bytes=sum(op.nbytes for op in copies if op.kind != KEEP) + sum(op.nbytes for op in fanout),
            reload_bytes=sum(op.nbytes for op in reloads), file_bytes_read=self.checkpoint.bytes_read - read0,
            num_ops=len(reloads) + len(copies) + len(fanout),
            predicted=predict_time(plan, self.topology, keep_gbps=keep_gbps),
        )
        return new, report


def _start(queue: list[CopyOp], fn: Callable[[CopyOp], None], workers: int, name: str,
           spans: dict[str, float]) -> list[threading.Thread]:
    """Start ``workers`` threads draining ``queue`` in order; record the queue's wall span."""
    if not queue:
        return []
    lock = threading.Lock()
    state = {"next": 0, "t0": time.perf_counter(), "left": workers}
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            while True:
                with lock:
                    i = state["next"]
                    state["next"] += 1
                if i >= len(queue) or errors:
                    break
                fn(queue[i])
        except BaseException as e:  # re-raised by _join
            errors.append(e)
        finally:
            with lock:
                state["left"] -= 1
                if state["left"] == 0:
                    spans[name] = time.perf_counter() - state["t0"]

    threads = [threading.Thread(target=worker, name=f"sgle-{name}-{k}", daemon=True) for k in range(workers)]
    for t in threads:
        t.errors = errors  # type: ignore[attr-defined]
        t.start()
    return threads


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join()
    for t in threads:
        if t.errors:  # type: ignore[attr-defined]
            raise t.errors[0]  # type: ignore[attr-defined]
