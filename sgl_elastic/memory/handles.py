"""Where a tensor of daemon memory lives, as plain data: what a client needs to map it (wire types
of ``daemon.protocol``'s ``Handles`` reply)."""

from __future__ import annotations

import msgspec

__all__ = ["SegmentRef", "TensorHandle"]


class SegmentRef(msgspec.Struct, frozen=True, kw_only=True):
    """One memory segment a client maps.

    backend "shm": ``locator`` is the POSIX shared-memory name (``/dev/shm/<locator>``).
    backend "cuda": ``ipc`` holds the CUDA IPC fields of the storage (msgpack), ``device_uuid`` the
    GPU (clients map it to their own device index, as SGLang's ``patch_torch`` does).
    ``size``: bytes. ``runs`` (shm): ``(view offset, file offset, bytes)`` of a segment remapped by a
    migration, mapped run by run into one address range; empty: the file is the view.
    """

    backend: str
    locator: str
    size: int
    device_uuid: str = ""
    ipc: bytes = b""
    runs: tuple[tuple[int, int, int], ...] = ()


class TensorHandle(msgspec.Struct, frozen=True, array_like=True):
    """A tensor inside segment ``segment`` (index into ``Handles.segments``) at byte ``offset``;
    ``dtype`` is a torch dtype name ("bfloat16"); ``shape`` in elements: row-major and contiguous,
    or, ``transposed``, a 2-D tensor stored column-major (``shape[::-1]`` row-major: the client's
    tensor is that storage's ``.t()``)."""

    name: str
    segment: int
    offset: int
    dtype: str
    shape: tuple[int, ...]
    transposed: bool = False
