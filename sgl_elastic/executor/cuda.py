"""CUDA executor: runs a MigrationPlan on device tensors (written for GPUs; skipped without CUDA).

Same plan, same queues as the CPU executor, device edges only here:
- Step 1: every destination shard is ``torch.empty`` on its device before any copy.
- Step 2: keep/peer copies are issued on one copy stream per destination device
  (``dst.copy_(src, non_blocking=True)``; cross-device copies go peer-to-peer where the driver
  enables it), longest first. Concurrently, one reload thread per destination device reads the
  needed byte ranges of the safetensors files into *pinned* staging buffers (double-buffered, an
  event per buffer guards reuse) and issues the host-to-device copies on that device's H2D stream.
- Step 3: after the reloads, stage-1 fan-out copies (device to device) on the copy streams.
Importing this module needs torch but not CUDA; constructing a ``CudaExecutor`` needs CUDA.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from sgl_elastic.executor.ops import full_region, split_queues
from sgl_elastic.executor.report import ExecReport
from sgl_elastic.executor.safetensors_io import SafetensorsCheckpoint
from sgl_elastic.layout.dtypes import RAW_TORCH
from sgl_elastic.layout.geometry import rank_tensors
from sgl_elastic.planner.cost import predict_time
from sgl_elastic.planner.plan import KEEP, CopyOp, MigrationPlan
from sgl_elastic.planner.topology import Topology

__all__ = ["CudaExecutor", "cuda_available"]

def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _view(t, op: CopyOp, offset: int):
    if op.dim < 0:
        return t
    if op.dim == 0:
        return t.narrow(0, offset, op.length)
    return t.narrow(1, offset, op.length)


class _Staging:
    """``num`` pinned host buffers of ``nbytes`` each, reused round-robin after their event fires."""

    def __init__(self, torch, nbytes: int, num: int) -> None:
        self.bufs = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(num)]
        self.np = [b.numpy() for b in self.bufs]
        self.events = [None] * num
        self.i = 0

    def next(self):
        i = self.i
        self.i = (i + 1) % len(self.bufs)
        if self.events[i] is not None:
            self.events[i].synchronize()
        return i


class CudaExecutor:
    """Run plans on CUDA device tensors.

    Args:
        checkpoint: safetensors checkpoint (host reload source).
        topology: bandwidths for the cost model (slots -> GPUs).
        device_of_slot: ``{slot: "cuda:i"}``; default slot i -> cuda:i.
        staging_bytes: size of each pinned staging buffer; num_staging: buffers per device.
    """

    def __init__(self, checkpoint: SafetensorsCheckpoint, topology: Topology, *, device_of_slot: dict[int, str] | None = None,
                 staging_bytes: int = 64 << 20, num_staging: int = 2) -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("CudaExecutor needs CUDA; use CpuExecutor on a CPU-only host")
        self.torch = torch
        self.checkpoint = checkpoint
        self.topology = topology
        self.device_of_slot = device_of_slot or {s: f"cuda:{s % torch.cuda.device_count()}" for s in range(topology.num_slots)}
        self.staging_bytes = staging_bytes
        self.num_staging = num_staging

    def allocate(self, layout, new2slot: tuple[int, ...]) -> dict[int, dict[str, object]]:
        """Destination shards of every new rank on its device (``torch.empty``, raw dtype by width)."""
        torch = self.torch
        out: dict[int, dict[str, object]] = {}
        for r in range(layout.tp_size):
            dev = torch.device(self.device_of_slot[new2slot[r]])
            out[r] = {t.name: torch.empty(shape, dtype=getattr(torch, RAW_TORCH[t.dtype_bytes]), device=dev)
                      for t, shape in rank_tensors(layout, r)}
        return out

    def _stream_copies(self, plan: MigrationPlan, ops, src_shards, dst_shards, copy_streams) -> None:
        """Issue ``ops`` (keep / peer / fan-out copies) on each destination's copy stream; wait for all."""
        torch = self.torch
        for op in ops:
            dev = self.device_of_slot[plan.new2slot[op.dst_rank]]
            src = _view(src_shards[op.src_rank][op.tensor], op, op.src_offset)
            dst = _view(dst_shards[op.dst_rank][op.tensor], op, op.dst_offset)
            with torch.cuda.stream(copy_streams[dev]):
                dst.copy_(src, non_blocking=True)
        for s in copy_streams.values():
            s.synchronize()

    def run(self, plan: MigrationPlan, old: dict[int, dict[str, object]]) -> tuple[dict[int, dict[str, object]], ExecReport]:
        """``old``: old rank -> {tensor name: device tensor} (survivors). Returns new rank -> tensors."""
        torch = self.torch
        t0 = time.perf_counter()
        # Step 1: destinations, once.
        new = self.allocate(plan.new_layout, plan.new2slot)
        for d in range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)
        t_alloc = time.perf_counter()
        reloads, copies, fanout = split_queues(plan)
        shapes = {t.name: t.shape for t in plan.old_layout.tensors()}
        devices = sorted({self.device_of_slot[s] for s in plan.new2slot})
        copy_streams = {d: torch.cuda.Stream(device=d) for d in devices}
        h2d_streams = {d: torch.cuda.Stream(device=d) for d in devices}
        read0 = self.checkpoint.bytes_read
        spans: dict[str, float] = {}

        # Step 2a: reload threads, one per destination device (pinned double buffering).
        by_dev: dict[str, list[CopyOp]] = {d: [] for d in devices}
        for op in reloads:
            by_dev[self.device_of_slot[plan.new2slot[op.dst_rank]]].append(op)
        errors: list[BaseException] = []

        def reload_worker(dev: str, ops: list[CopyOp]) -> None:
            try:
                torch.cuda.set_device(torch.device(dev))
                staging = _Staging(torch, self.staging_bytes, self.num_staging)
                stream = h2d_streams[dev]
                for op in ops:
                    dst = _view(new[op.dst_rank][op.tensor], op, op.dst_offset)
                    row0, row1, col0, col1 = full_region(shapes[op.tensor], op)
                    ncols = col1 - col0
                    itemsize = dst.element_size()
                    rows_per_chunk = max(1, self.staging_bytes // max(1, ncols * itemsize))
                    d2 = dst if dst.dim() == 2 else dst.view(1, -1)
                    r = row0
                    while r < row1:
                        r_end = min(row1, r + rows_per_chunk)
                        i = staging.next()
                        n = (r_end - r) * ncols * itemsize
                        host = staging.np[i][:n].view(np.dtype(f"u{itemsize}") if itemsize > 1 else np.uint8)
                        self.checkpoint.read_region(op.tensor, host.reshape(r_end - r, ncols), r, r_end, col0, col1)
                        src = staging.bufs[i][:n].view(dst.dtype).view(r_end - r, ncols)
                        with torch.cuda.stream(stream):
                            d2[r - row0:r_end - row0].copy_(src, non_blocking=True)
                            ev = torch.cuda.Event()
                            ev.record(stream)
                        staging.events[i] = ev
                        r = r_end
                stream.synchronize()
            except BaseException as e:
                errors.append(e)

        t_start = time.perf_counter()
        threads = [threading.Thread(target=reload_worker, args=(d, ops), daemon=True) for d, ops in by_dev.items() if ops]
        for t in threads:
            t.start()
        # Step 2b: keep/peer copies on per-destination copy streams (issued from this thread).
        self._stream_copies(plan, copies, old, new, copy_streams)
        spans["copy"] = time.perf_counter() - t_start
        for t in threads:
            t.join()
        spans["reload"] = time.perf_counter() - t_start
        if errors:
            raise errors[0]
        # Step 3: fan-out from freshly reloaded new ranks.
        t_fan = time.perf_counter()
        self._stream_copies(plan, fanout, new, new, copy_streams)
        t_end = time.perf_counter()
        report = ExecReport(
            backend="cuda", achieved_s=t_end - t0, alloc_s=t_alloc - t0, reload_s=spans["reload"], copy_s=spans["copy"],
            fanout_s=t_end - t_fan, keep_bytes=sum(op.nbytes for op in copies if op.kind == KEEP),
            peer_bytes=sum(op.nbytes for op in copies if op.kind != KEEP) + sum(op.nbytes for op in fanout),
            reload_bytes=sum(op.nbytes for op in reloads), file_bytes_read=self.checkpoint.bytes_read - read0,
            num_ops=len(reloads) + len(copies) + len(fanout), predicted=predict_time(plan, self.topology),
        )
        return new, report
