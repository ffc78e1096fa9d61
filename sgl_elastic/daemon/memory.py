"""The device edge of the daemon: where a rank's tensors live and how another process maps them.

One interface, one implementation per device:
- ``DeviceMemory.allocate(rank, kind, specs) -> Segment`` (daemon side): one allocation holding
  every tensor of a rank's weights or KV pool, tensors at aligned byte offsets.
- ``Segment.refs()`` -> ``SegmentRef`` list + ``Segment.handles()`` -> ``TensorHandle`` list: what a
  client needs, as plain data (``protocol.Handles``).
- ``attach_handles(handles) -> AttachedTensors`` (client side): maps every segment once and views
  each tensor zero-copy (a torch tensor over the daemon's memory).

Implementations: ``shm.ShmMemory`` (CPU: POSIX shared memory, names unique per daemon instance) and
``cuda.CudaMemory`` (GPU: ``torch.cuda`` allocations exported as CUDA IPC handles keyed by GPU
UUID), imported lazily so the CPU path never touches ``torch.cuda``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable

from sgl_elastic.daemon.protocol import Handles, SegmentRef, TensorHandle

__all__ = ["TensorAlloc", "Segment", "DeviceMemory", "AttachedTensors", "attach_handles", "make_memory",
           "DTYPE_ITEMSIZE", "SAFETENSORS_TO_TORCH"]

ALIGN = 64

DTYPE_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
                  "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}
SAFETENSORS_TO_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                        "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class TensorAlloc:
    """A tensor to place in a segment: ``name``, torch ``dtype`` name, ``shape`` (elements)."""

    __slots__ = ("name", "dtype", "shape")

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        if dtype not in DTYPE_ITEMSIZE:
            raise ValueError(f"{name}: dtype {dtype!r} not supported; use one of {sorted(DTYPE_ITEMSIZE)}")
        self.name, self.dtype, self.shape = name, dtype, tuple(int(s) for s in shape)

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


def place(specs: Iterable[TensorAlloc]) -> tuple[list[TensorHandle], int]:
    """Byte offsets (``ALIGN``-aligned) of ``specs`` in one segment; returns (handles, total bytes)."""
    out, off = [], 0
    for s in specs:
        out.append(TensorHandle(s.name, 0, off, s.dtype, s.shape))
        off += -(-s.nbytes // ALIGN) * ALIGN
    return out, max(off, 1)


class Segment(abc.ABC):
    """Daemon-side memory of one rank's weights or KV. ``nbytes``: bytes allocated."""

    rank: int
    kind: str
    nbytes: int

    @abc.abstractmethod
    def refs(self) -> list[SegmentRef]: ...

    @abc.abstractmethod
    def handles(self) -> list[TensorHandle]: ...

    @abc.abstractmethod
    def load_region(self, ckpt, name: str, region: tuple[int, int, int, int]) -> int:
        """Read ``full[row0:row1, col0:col1]`` of checkpoint tensor ``name`` into tensor ``name``; bytes read."""

    @abc.abstractmethod
    def write(self, name: str, src) -> None:
        """Copy host array ``src`` (numpy, raw integer dtype of the tensor's item size, the tensor's
        number of elements, any strides) into tensor ``name``, bitwise."""

    @abc.abstractmethod
    def zero(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Free the memory (unlink / release); mappings other processes still hold stay valid on CPU."""


class DeviceMemory(abc.ABC):
    """Allocator of segments for one daemon instance (``instance``: random id in every name)."""

    backend: str

    @abc.abstractmethod
    def allocate(self, rank: int, kind: str, specs: list[TensorAlloc]) -> Segment: ...

    @abc.abstractmethod
    def free_bytes(self, rank: int) -> int:
        """Bytes that can still be allocated for ``rank`` (checked before allocating, so a bad
        request fails with a clear error instead of exhausting the machine)."""

    shared_pool: bool = False  # True: every rank allocates from one pool (CPU: /dev/shm)

    def check_fits(self, sizes: dict[int, int], what: str) -> None:
        """Raise ValueError when ``sizes`` (rank -> bytes) do not fit in the free memory."""
        if self.shared_pool:
            need, free = sum(sizes.values()), self.free_bytes(0)
            if need > free:
                raise ValueError(f"{what} need {need} bytes for ranks {sorted(sizes)} but {self.backend} has only"
                                 f" {free} free; lower the size or free memory")
            return
        for rank, n in sizes.items():
            free = self.free_bytes(rank)
            if n > free:
                raise ValueError(f"{what} need {n} bytes on rank {rank} but only {free} are free there"
                                 f" ({self.backend}); lower the size or free memory")


def make_memory(backend: str, instance: str, device_of_rank: dict[int, str] | None = None) -> DeviceMemory:
    """``backend`` "shm" (CPU) or "cuda"; the CUDA module is imported only here, on demand."""
    if backend == "shm":
        from sgl_elastic.daemon.shm import ShmMemory

        return ShmMemory(instance)
    if backend == "cuda":
        from sgl_elastic.daemon.cuda import CudaMemory

        return CudaMemory(instance, device_of_rank)
    raise ValueError(f"backend={backend!r}; choose 'shm' (CPU shared memory) or 'cuda' (CUDA IPC)")


class AttachedTensors:
    """Tensors mapped from daemon memory: ``tensors[name]`` (torch, zero-copy). ``close()`` unmaps
    (drop your own references to the tensors first: a mapping with live views stays until they go)."""

    def __init__(self, handles: Handles, tensors: dict, mappings: list) -> None:
        self.instance, self.rank, self.kind, self.epoch = handles.instance, handles.rank, handles.kind, handles.epoch
        self.tensors = tensors
        self._mappings = mappings

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def close(self) -> None:
        self.tensors = {}
        for m in self._mappings:
            m.close()
        self._mappings = []

    def __enter__(self) -> "AttachedTensors":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def attach_handles(handles: Handles, *, populate: bool = False) -> AttachedTensors:
    """Map every segment of ``handles`` once and view each tensor in it (zero-copy).

    ``populate`` (CPU): fault the whole mapping in now, in one call per segment, rather than page by
    page at first use (a serving process wants this; a process that reads a few tensors does not).
    """
    import torch

    mappings, flats = [], []
    try:
        for ref in handles.segments:
            if ref.backend == "shm":
                from sgl_elastic.daemon.shm import ShmMapping

                m = ShmMapping(ref, populate=populate)
            elif ref.backend == "cuda":
                from sgl_elastic.daemon.cuda import CudaMapping

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
            tensors[h.name] = flat[h.offset:h.offset + n].view(getattr(torch, h.dtype)).view(h.shape)
    except BaseException:
        for m in mappings:
            m.close()
        raise
    return AttachedTensors(handles, tensors, mappings)
