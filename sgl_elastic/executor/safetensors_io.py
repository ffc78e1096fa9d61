"""Byte-range reads from a safetensors checkpoint, with our own header parser (no whole-file reads).

Format: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` (offsets relative to the end of the
header), then the data, row-major. A region ``full[row0:row1, col0:col1]`` of a 2-D tensor is one
``preadv`` when it spans whole rows, straight into the destination buffer. A column block is one run
per row: long runs (>= ``STRIDED_PREAD_MIN`` bytes) are one ``preadv`` each; short runs (a 64-column
block of a ``down_proj`` is 256 bytes per row) would cost a syscall per row, so they are copied with
one strided numpy copy from a read-only ``mmap`` of the file, which touches only the pages that hold
the needed bytes (page-granular reads, as any read of a short run is).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import threading
from pathlib import Path

import msgspec
import numpy as np

from sgl_elastic.layout.dtypes import RAW_NUMPY, SAFETENSORS_ITEMSIZE

__all__ = ["SafetensorsCheckpoint", "TensorEntry", "DTYPE_ITEMSIZE"]

DTYPE_ITEMSIZE = SAFETENSORS_ITEMSIZE  # safetensors dtype code -> bytes per element
# numpy dtype of the same width: copies are bitwise, the element type never matters.
RAW_DTYPE = {size: getattr(np, name) for size, name in RAW_NUMPY.items()}
STRIDED_PREAD_MIN = 64 << 10
_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def copy_bits(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` bitwise (same shape and item size, any strides). A transposing copy (one
    side column-major, a transposed shard) goes through torch's blocked copy: numpy's element loop
    gets 0.7 GB/s here, torch 4-5."""
    if dst.strides[-1:] == src.strides[-1:] == (dst.itemsize,) or dst.ndim < 2:
        np.copyto(dst, src.view(dst.dtype) if src.dtype != dst.dtype else src)
        return
    import warnings

    import torch

    with warnings.catch_warnings():  # a read-only source (the page cache's mapping) is only read
        warnings.simplefilter("ignore", UserWarning)
        s = torch.from_numpy(src.view(_SIGNED[src.itemsize]))
    torch.from_numpy(dst.view(_SIGNED[dst.itemsize])).copy_(s)
# madvise(2) flag that fills page tables in one call (Linux >= 5.14). Python's mmap module names it
# only from 3.12 on: the kernel's number, so the calls also run on 3.11 (an older kernel answers
# EINVAL, which every caller ignores).
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)


class TensorEntry(msgspec.Struct, frozen=True):
    """Where a tensor lives: ``file``, absolute byte ``offset`` of its data, ``shape``, ``itemsize``."""

    file: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    itemsize: int


def parse_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """Tensor entries of one ``.safetensors`` file (reads only the header)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 * 1024 * 1024:
            raise ValueError(f"{path}: header of {n} bytes is implausible; is this a safetensors file?")
        header = json.loads(f.read(n))
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        dtype = meta["dtype"]
        if dtype not in DTYPE_ITEMSIZE:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        out[name] = TensorEntry(str(path), base + begin, end - begin, tuple(meta["shape"]), dtype, DTYPE_ITEMSIZE[dtype])
    return out


class SafetensorsCheckpoint:
    """Index of every tensor of a HF checkpoint directory (all ``*.safetensors`` files).

    ``read_region`` is thread-safe (``preadv`` on per-file descriptors kept open).
    ``bytes_read`` counts the payload bytes read, to check that only needed ranges are read.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {self.directory}; pass a HF checkpoint directory")
        self.entries: dict[str, TensorEntry] = {}
        for f in files:
            self.entries.update(parse_header(f))
        self._fds: dict[str, int] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.directory}") from None

    def _fd(self, file: str) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            return fd

    def _map(self, file: str, need: int = 0) -> mmap.mmap:
        """The page-cache mapping of ``file``; ``need``: its bytes a read will touch (a file cut
        shorter since it was opened raises OSError here instead of a SIGBUS at the access)."""
        fd = self._fd(file)
        if need and os.fstat(fd).st_size < need:
            raise OSError(f"short read: {file} holds {os.fstat(fd).st_size} bytes, {need} needed")
        with self._lock:
            m = self._maps.get(file)
            if m is None:
                m = self._maps[file] = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            return m

    @staticmethod
    def _populate(m: mmap.mmap, first: int, end: int) -> None:
        """Map the page-cache pages of file bytes ``[first, end)`` in one call, not one fault per 4 KiB."""
        if MADV_POPULATE_READ is None:
            return
        start = first - first % mmap.PAGESIZE
        try:
            m.madvise(MADV_POPULATE_READ, start, end - start)
        except OSError:
            pass  # an older kernel: the pages fault in at first use

    def close(self) -> None:
        with self._lock:
            for m in self._maps.values():
                try:
                    m.close()
                except BufferError:
                    pass
            self._maps.clear()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_region(self, name: str, out: np.ndarray, row0: int = 0, row1: int | None = None,
                    col0: int = 0, col1: int | None = None) -> int:
        """Read ``full[row0:row1, col0:col1]`` of tensor ``name`` into ``out`` (same shape; rows contiguous).

        1-D tensors are one row. Returns the bytes read. Raises if ``out`` has the wrong size.
        """
        e = self.entry(name)
        shape = e.shape if len(e.shape) >= 2 else (1, e.shape[0] if e.shape else 1)
        rows, cols = shape[0], int(np.prod(shape[1:]))
        row1 = rows if row1 is None else row1
        col1 = cols if col1 is None else col1
        if not (0 <= row0 <= row1 <= rows and 0 <= col0 <= col1 <= cols):
            raise ValueError(f"{name}: region [{row0}:{row1}, {col0}:{col1}] outside shape {e.shape}")
        n_rows, n_cols = row1 - row0, col1 - col0
        want = n_rows * n_cols * e.itemsize
        if out.nbytes != want:
            raise ValueError(f"{name}: out has {out.nbytes} bytes, region needs {want} ({n_rows}x{n_cols}x{e.itemsize})")
        fd = self._fd(e.file)
        row_bytes = cols * e.itemsize
        if n_rows == 0 or n_cols == 0:
            return 0
        out2 = out.reshape(n_rows, -1) if out.ndim != 2 else out
        if out2.ndim == 2 and n_cols > 1 and out2.strides[1] != out2.itemsize:
            # case 0: a column-major destination (a transposed shard): one transposing copy from
            # the file's page-cache mapping.
            m = self._map(e.file, e.offset + rows * row_bytes)
            if row_bytes <= 2 * mmap.PAGESIZE or 4 * n_cols * e.itemsize >= row_bytes:  # most pages are needed
                self._populate(m, e.offset + row0 * row_bytes, e.offset + row1 * row_bytes)
            src = np.ndarray((rows, cols), dtype=RAW_DTYPE[e.itemsize], buffer=m, offset=e.offset)
            copy_bits(out2.view(RAW_DTYPE[e.itemsize]), src[row0:row1, col0:col1])
            del src
        elif n_cols == cols and out.flags.c_contiguous:
            # case 1: whole rows: one contiguous byte range.
            got = os.preadv(fd, [memoryview(out).cast("B")], e.offset + row0 * row_bytes)
            if got != want:
                raise OSError(f"{name}: short read ({got} of {want} bytes) from {e.file}")
        elif n_cols * e.itemsize < STRIDED_PREAD_MIN and out2.dtype.itemsize == e.itemsize \
                and out2.strides[1] == e.itemsize:
            # case 2: short runs: one strided copy from the file's page-cache mapping.
            m = self._map(e.file, e.offset + rows * row_bytes)
            if row_bytes <= mmap.PAGESIZE:  # every page of the row span holds needed bytes
                self._populate(m, e.offset + row0 * row_bytes, e.offset + row1 * row_bytes)
            src = np.ndarray((rows, cols), dtype=RAW_DTYPE[e.itemsize], buffer=m, offset=e.offset)
            np.copyto(out2.view(RAW_DTYPE[e.itemsize]), src[row0:row1, col0:col1])  # bitwise
            del src
        else:
            # case 3: long runs: one preadv per row, straight into the destination row.
            run = n_cols * e.itemsize
            for i in range(n_rows):
                dst = out2[i]
                got = os.preadv(fd, [memoryview(dst).cast("B")], e.offset + (row0 + i) * row_bytes + col0 * e.itemsize)
                if got != run:
                    raise OSError(f"{name}: short read ({got} of {run} bytes) from {e.file}")
        with self._lock:
            self.bytes_read += want
        return want
