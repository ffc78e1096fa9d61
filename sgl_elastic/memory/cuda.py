"""CUDA implementation of the daemon's device memory: per-GPU allocations handed out as CUDA IPC handles.

Written for GPUs, tested only where one is lent (``@pytest.mark.gpu``); imported lazily by
``memory.make_memory("cuda")`` and ``memory.attach_handles`` so CPU hosts never load it.

Daemon side: one flat ``uint8`` ``torch.empty`` per (rank, kind) on the rank's GPU; tensors are
byte ranges of it (same handle layout as the CPU backend). After a migration the CUDA executor
returns one tensor per shard; those are adopted as one segment each (``wrap_tensors``).

Export: ``torch.multiprocessing.reductions.reduce_tensor`` gives the storage's CUDA IPC fields;
the device index is replaced by the GPU UUID (as SGLang's ``utils/patch_torch.py`` does), so a
client whose ``CUDA_VISIBLE_DEVICES`` numbers the GPUs differently maps the right one. The fields
travel as msgpack (no pickle). Client side, ``rebuild_cuda_tensor`` opens the IPC handle.

Contract (differs from CPU): CUDA IPC memory belongs to the exporting process. If the daemon dies,
clients' mappings dangle: the server must stop using them (SGLang's ``IpcModelLoader`` kills the
engine in that case) and a restart reads the checkpoint again.
"""

from __future__ import annotations

import msgspec

from sgl_elastic.layout.dtypes import RAW_TORCH
from sgl_elastic.memory.base import DeviceMemory, Segment, TensorAlloc, place, segment_dtypes
from sgl_elastic.memory.handles import SegmentRef, TensorHandle

__all__ = ["CudaMemory", "CudaSegment", "CudaMapping", "gpu_uuid", "device_of_uuid"]


class _IpcFields(msgspec.Struct, array_like=True):
    """The storage part of ``reduce_tensor``'s CUDA args (device replaced by ``SegmentRef.device_uuid``)."""

    tensor_offset: int
    handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


def gpu_uuid(device_index: int) -> str:
    import torch

    return str(torch.cuda.get_device_properties(device_index).uuid)


def device_of_uuid(uuid: str) -> int:
    import torch

    for d in range(torch.cuda.device_count()):
        if gpu_uuid(d) == uuid:
            return d
    raise RuntimeError(
        f"GPU {uuid} is not visible to this process ({torch.cuda.device_count()} visible);"
        " check CUDA_VISIBLE_DEVICES of the client and the daemon"
    )


def _export(flat) -> SegmentRef:
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(flat)
    # args: (cls, size, stride, tensor_offset, storage_cls, dtype, device, handle, storage_size_bytes,
    #        storage_offset_bytes, requires_grad, ref_counter_handle, ref_counter_offset, event_handle,
    #        event_sync_required)
    fields = _IpcFields(int(args[3]), bytes(args[7]), int(args[8]), int(args[9]), bytes(args[11]), int(args[12]),
                        bytes(args[13] or b""), bool(args[14]))
    return SegmentRef(backend="cuda", locator=f"cuda-ipc-{flat.device.index}", size=flat.numel(),
                      device_uuid=gpu_uuid(flat.device.index), ipc=msgspec.msgpack.encode(fields))


class CudaSegment(Segment):
    """Flat device buffers (one, or one per tensor after a migration) with the tensor table."""

    def __init__(self, rank: int, kind: str, flats: list, handles: list[TensorHandle]) -> None:
        self.rank, self.kind, self.flats, self._handles = rank, kind, flats, handles
        self._by_name = {h.name: h for h in handles}
        self.nbytes = sum(f.numel() for f in flats)
        self._refs: list[SegmentRef] | None = None

    def refs(self) -> list[SegmentRef]:
        if self._refs is None:  # export once: every client maps the same handles
            self._refs = [_export(f) for f in self.flats]
        return self._refs

    def handles(self) -> list[TensorHandle]:
        return list(self._handles)

    def view(self, name: str):
        import math

        import torch

        h = self._by_name[name]
        n = math.prod(h.shape) * torch.empty((), dtype=getattr(torch, h.dtype)).element_size()
        return self.flats[h.segment][h.offset:h.offset + n].view(getattr(torch, h.dtype)).view(h.shape)

    def views(self, raw: bool = False) -> dict:
        """name -> device tensor; ``raw``: as the integer dtype of the same width (what the CUDA
        executor allocates, so its copies are bitwise)."""
        import torch

        out = {h.name: self.view(h.name) for h in self._handles}
        if raw:
            ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
            out = {n: t.view(ints[t.element_size()]) for n, t in out.items()}
        return out

    def load_region(self, ckpt, name: str, region: tuple[int, int, int, int]) -> int:
        """Read into pinned host memory, then copy to the device (synchronously)."""
        import torch

        dst = self.view(name)
        host = torch.empty(dst.shape, dtype=dst.dtype, pin_memory=True)
        raw = host.view(getattr(torch, RAW_TORCH[host.element_size()])).numpy()
        n = ckpt.read_region(name, raw, *region)
        dst.copy_(host)
        return n

    def write(self, name: str, src) -> None:
        import numpy as np
        import torch

        dst = self._raw_view(name)
        host = torch.from_numpy(np.ascontiguousarray(src)).reshape(dst.shape)
        dst.copy_(host.view(dst.dtype))

    def _raw_view(self, name: str):
        import torch

        t = self.view(name)
        return t.view(getattr(torch, RAW_TORCH[t.element_size()]))

    def zero(self) -> None:
        for f in self.flats:
            f.zero_()

    def close(self) -> None:
        self.flats = []
        self._refs = None


class CudaMemory(DeviceMemory):
    backend = "cuda"

    def __init__(self, instance: str, device_of_rank: dict[int, str] | None = None) -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("backend 'cuda' needs a CUDA device; use backend 'shm' on a CPU-only host")
        self.instance = instance
        self.device_of_rank = device_of_rank or {}

    def device(self, rank: int):
        import torch

        return torch.device(self.device_of_rank.get(rank, f"cuda:{rank % torch.cuda.device_count()}"))

    def free_bytes(self, rank: int) -> int:
        import torch

        return torch.cuda.mem_get_info(self.device(rank))[0]

    def allocate(self, rank: int, kind: str, specs: list[TensorAlloc]) -> CudaSegment:
        import torch

        handles, size = place(specs)
        flat = torch.empty(size, dtype=torch.uint8, device=self.device(rank))
        if kind == "kv":
            flat.zero_()
        return CudaSegment(rank, kind, [flat], handles)

    def wrap_tensors(self, rank: int, kind: str, tensors: dict, dtypes: dict[str, str]) -> CudaSegment:
        """Adopt per-tensor device tensors (CUDA executor output, raw integer dtypes of the right
        width) as one segment each; ``dtypes[name]`` is the real torch dtype name."""
        import torch

        flats, handles = [], []
        for i, (name, t) in enumerate(tensors.items()):
            flats.append(t.contiguous().view(-1).view(torch.uint8))
            handles.append(TensorHandle(name, i, 0, dtypes[name], tuple(t.shape)))
        return CudaSegment(rank, kind, flats, handles)

    def run_plan(self, plan, old: dict[int, Segment], ckpt, topo, label: str):
        """``executor.cuda.CudaExecutor`` on raw device views of the old segments."""
        from sgl_elastic.executor.cuda import CudaExecutor

        dtypes = segment_dtypes(old.values(), ckpt)
        new_tensors, report = CudaExecutor(ckpt, topo).run(plan, {r: s.views(raw=True) for r, s in old.items()})
        return {r: self.wrap_tensors(r, "weights", t, dtypes) for r, t in new_tensors.items()}, report


class CudaMapping:
    """Client side: opens one exported storage; ``flat`` is a uint8 device tensor over it."""

    def __init__(self, ref: SegmentRef) -> None:
        import torch
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        f = msgspec.msgpack.decode(ref.ipc, type=_IpcFields)
        dev = device_of_uuid(ref.device_uuid)
        self.flat = rebuild_cuda_tensor(
            torch.Tensor, (ref.size,), (1,), f.tensor_offset, torch.storage.TypedStorage, torch.uint8, dev,
            f.handle, f.storage_size_bytes, f.storage_offset_bytes, False, f.ref_counter_handle,
            f.ref_counter_offset, f.event_handle or None, f.event_sync_required,
        )

    def close(self) -> None:
        self.flat = None
