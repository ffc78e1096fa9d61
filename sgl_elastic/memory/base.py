"""The interface of device memory: where a rank's tensors live and how another process maps them.

One interface (this module), one implementation per device (``shm``, ``cuda``), one factory
(the package's ``__init__``: ``make_memory``, ``attach_handles``):
- ``DeviceMemory.allocate(rank, kind, specs) -> Segment`` (daemon side): one allocation holding
  every tensor of a rank's weights or KV pool, tensors at aligned byte offsets.
- ``Segment.refs()`` -> ``SegmentRef`` list + ``Segment.handles()`` -> ``TensorHandle`` list: what a
  client needs, as plain data (``handles``; sent as ``daemon.protocol.Handles``).
- ``attach_handles(handles) -> AttachedTensors`` (client side): maps every segment once and views
  each tensor zero-copy (a torch tensor over the daemon's memory).
- ``DeviceMemory.run_plan(plan, old, ckpt, topo, label)``: a ``MigrationPlan`` applied to a
  daemon's weight segments, through the executor of the device.

Implementations: ``shm.ShmMemory`` (CPU: POSIX shared memory, names unique per daemon instance) and
``cuda.CudaMemory`` (GPU: ``torch.cuda`` allocations exported as CUDA IPC handles keyed by GPU
UUID), imported lazily so the CPU path never touches ``torch.cuda``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable

from sgl_elastic.layout.dtypes import ITEMSIZE as DTYPE_ITEMSIZE
from sgl_elastic.memory.handles import SegmentRef, TensorHandle

__all__ = ["TensorAlloc", "Segment", "DeviceMemory", "AttachedTensors", "place", "segment_dtypes", "ALIGN"]

ALIGN = 64


class TensorAlloc:
    """A tensor to place in a segment: ``name``, torch ``dtype`` name, ``shape`` (elements);
    ``transposed``: a 2-D tensor the device may store column-major (the CPU backend does; others
    ignore it and say so in the tensor's handle); ``alone``: never cut nor fused (``ShardSpec``)."""

    __slots__ = ("name", "dtype", "shape", "transposed", "alone")

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], transposed: bool = False,
                 alone: bool = False) -> None:
        if dtype not in DTYPE_ITEMSIZE:
            raise ValueError(f"{name}: dtype {dtype!r} not supported; use one of {sorted(DTYPE_ITEMSIZE)}")
        self.name, self.dtype, self.shape = name, dtype, tuple(int(s) for s in shape)
        if transposed and len(self.shape) != 2:
            raise ValueError(f"{name}: only a 2-D tensor can be stored transposed, not shape {self.shape}")
        self.transposed, self.alone = transposed, alone

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

    def reserve_async(self) -> None:
        """Give the segment all its pages now, in the background (a sparse one fills as it is first
        written). Default: nothing to do (device allocations are resident)."""

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

    @abc.abstractmethod
    def run_plan(self, plan, old: dict[int, Segment], ckpt, topo, label: str) -> tuple[dict[int, Segment], object]:
        """Execute ``MigrationPlan`` ``plan`` on this device; ``old`` maps surviving old rank -> its
        weight segment. Returns new rank -> segment (the caller frees ``old``) and the ``ExecReport``."""

    shared_pool: bool = False  # True: every rank allocates from one pool (CPU: /dev/shm)

    def measure_bandwidths(self, ckpt) -> tuple[float, float, float] | None:
        """(reload GB/s, copy GB/s, new-memory GB/s) this device gets from ``ckpt`` and between its own
        buffers while both run, and for new memory (0: free), measured now (what the executor's cost
        model needs); None: the built-in figures."""
        return None

    def regrow(self, seg: Segment, rank: int, specs: list[TensorAlloc]) -> Segment | None:
        """``seg``'s memory as ``rank``'s, under a new tensor table (``specs``, contents undefined), extended if
        needed, or None when this device cannot (then the caller frees ``seg`` and allocates).
        The returned segment owns the memory; ``seg`` must not be used again. Default: None."""
        return None

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


def segment_dtypes(segments: Iterable[Segment], ckpt=None) -> dict[str, str]:
    """Tensor name -> torch dtype name over ``segments``, and over every tensor of checkpoint
    ``ckpt`` when given: a migration's new segments also hold tensors no survivor held (a dead
    rank's experts, under expert parallelism)."""
    from sgl_elastic.layout.dtypes import SAFETENSORS_TO_TORCH

    out = {} if ckpt is None else {name: SAFETENSORS_TO_TORCH[e.dtype] for name, e in ckpt.entries.items()}
    out.update({h.name: h.dtype for seg in segments for h in seg.handles()})
    return out


class AttachedTensors:
    """Tensors mapped from daemon memory: ``tensors[name]`` (torch, zero-copy). ``close()`` unmaps
    (drop your own references to the tensors first: a mapping with live views stays until they go)."""

    def __init__(self, handles, tensors: dict, mappings: list) -> None:
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
