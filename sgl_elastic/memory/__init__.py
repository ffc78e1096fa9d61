"""Device memory of the state daemon: one interface (``base``), one implementation per device,
and this module, the one factory.

- ``make_memory(backend, instance)``: the daemon's allocator, ``shm.ShmMemory`` (CPU: POSIX shared
  memory, names unique per daemon instance) or ``cuda.CudaMemory`` (GPU: ``torch.cuda``
  allocations exported as CUDA IPC handles keyed by GPU UUID);
- ``attach_handles(handles)``: a client maps what the daemon exported (``daemon.protocol.Handles``).

The implementations are imported here only, on demand, so the CPU path never touches ``torch.cuda``;
everything else (the daemon's store, weights, migration) uses the interface only.
"""

from __future__ import annotations

import math

from sgl_elastic.layout.dtypes import ITEMSIZE as DTYPE_ITEMSIZE
from sgl_elastic.memory.base import AttachedTensors, DeviceMemory, Segment, TensorAlloc
from sgl_elastic.memory.handles import SegmentRef, TensorHandle

# How a migration turns a survivor's segment into its new rank's (CPU): "remap" (its kept bytes stay
# in their pages, the view is remapped; the default), "move" (the file is regrown and the kept bytes
# moved inside it), "off" (every new rank gets a new segment; the kept bytes are copied).
IN_PLACE_MODES = ("remap", "move", "off")

__all__ = ["IN_PLACE_MODES", "TensorAlloc", "Segment", "DeviceMemory", "AttachedTensors", "SegmentRef", "TensorHandle",
           "make_memory", "attach_handles"]


def make_memory(backend: str, instance: str, device_of_rank: dict[int, str] | None = None,
                in_place: str = "remap") -> DeviceMemory:
    """``backend`` "shm" (CPU) or "cuda"; the CUDA module is imported only here, on demand.
    ``in_place`` (shm): how a survivor's own segment becomes its new rank's (``IN_PLACE_MODES``)."""
    if in_place not in IN_PLACE_MODES:
        raise ValueError(f"in_place={in_place!r}; choose one of {', '.join(IN_PLACE_MODES)}")
    if backend == "shm":
        from sgl_elastic.memory.shm import ShmMemory

        return ShmMemory(instance, in_place=in_place)
    if backend == "cuda":
        from sgl_elastic.memory.cuda import CudaMemory

        return CudaMemory(instance, device_of_rank)
    raise ValueError(f"backend={backend!r}; choose 'shm' (CPU shared memory) or 'cuda' (CUDA IPC)")




def attach_handles(handles, *, populate: bool = False) -> AttachedTensors:
    """Map every segment of ``handles`` once and view each tensor in it (zero-copy).

    ``populate`` (CPU): fault the whole mapping in now, in one call per segment, rather than page by
    page at first use (a serving process wants this; a process that reads a few tensors does not).
    """
    import torch

    mappings, flats = [], []
    try:
        for ref in handles.segments:
            if ref.backend == "shm":
                from sgl_elastic.memory.shm import ShmMapping

                m = ShmMapping(ref, populate=populate)
            elif ref.backend == "cuda":
                from sgl_elastic.memory.cuda import CudaMapping

                m = CudaMapping(ref)
            else:
                raise ValueError(f"segment backend {ref.backend!r} unknown to this client; upgrade sgl_elastic")
            mappings.append(m)
            flats.append(m.flat)
        tensors = {}
        for h in handles.tensors:
            flat = flats[h.segment]
            n = math.prod(h.shape) * DTYPE_ITEMSIZE[h.dtype]
            if h.offset < 0 or h.offset + n > flat.numel():
                raise ValueError(f"{h.name}: bytes [{h.offset}, {h.offset + n}) outside its segment of {flat.numel()}")
            t = flat[h.offset:h.offset + n].view(getattr(torch, h.dtype))
            tensors[h.name] = t.view(tuple(h.shape[::-1])).t() if h.transposed else t.view(h.shape)
    except BaseException:
        for m in mappings:
            m.close()
        raise
    return AttachedTensors(handles, tensors, mappings)
