"""Bytes between the state daemons of two nodes: Mooncake's transfer engine over TCP.

SGLang moves KV between nodes with Mooncake's transfer engine (``--disaggregation-transfer-backend
mooncake``); its CPU build (``mooncake-transfer-engine-non-cuda``) runs here over the ``tcp``
protocol (it needs ``libibverbs.so.1`` to load even when no RDMA device is used: ``scripts/setup.sh``
installs ``libibverbs1``). Each daemon that takes part in a multi-node migration opens one
``TransferEndpoint`` on its node's address, registers its weight views, and reads the byte runs it
needs out of a peer daemon's registered views (``transfer_sync_read``, one batch per copy op): the
peer's CPU does nothing but serve the reads, and no node maps another's shared memory.

``RemoteArena`` is what a daemon tells its peers about one of its ranks: the endpoint's address, the
view's base address in the daemon's address space, and the arena's shard table (``ArenaHandle``),
from which a reader computes the byte runs of a copy exactly as for a local arena.

A read that fails (the peer is gone, its endpoint stopped, the connection broke) raises
``LinkFailed``; the executor then reloads those bytes from its own node's checkpoint instead.
``rate_gbps`` caps an endpoint's read rate (benchmarks: a slower inter-node link).
"""

from __future__ import annotations

import ctypes.util
import threading
import time

import msgspec

from sgl_elastic.executor.shm import ArenaHandle

__all__ = ["LinkFailed", "RemoteArena", "TransferEndpoint", "transfer_unavailable"]


class LinkFailed(RuntimeError):
    """A read from a peer node's daemon failed (``addr``: its endpoint)."""

    def __init__(self, addr: str, why: str) -> None:
        super().__init__(f"read from {addr} failed: {why}")
        self.addr = addr


class RemoteArena(msgspec.Struct, frozen=True, kw_only=True):
    """One rank's weight view in a peer daemon: endpoint ``addr`` (host:port), ``base`` address of the
    view in that daemon's process, and its shard table ``handle`` (``ArenaHandle``; its segment name
    is the peer's, never opened here)."""

    addr: str
    base: int
    handle: ArenaHandle


def transfer_unavailable() -> str | None:
    """None when Mooncake's transfer engine loads here, else what is missing."""
    if ctypes.util.find_library("ibverbs") is None:
        return "libibverbs.so.1 is missing (apt-get install libibverbs1): Mooncake's engine needs it to load"
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except ImportError as e:
        return f"Mooncake's transfer engine is not installed or does not load ({e}); run scripts/setup.sh"
    return None


class TransferEndpoint:
    """This process's Mooncake engine on ``host`` (TCP, peer-to-peer handshake: no metadata server)."""

    def __init__(self, host: str, *, rate_gbps: float = 0.0) -> None:
        why = transfer_unavailable()
        if why is not None:
            raise RuntimeError(why)
        from mooncake.engine import TransferEngine

        self.host = host
        self.engine = TransferEngine()
        rc = self.engine.initialize(host, "P2PHANDSHAKE", "tcp", "")
        if rc != 0:
            raise RuntimeError(f"Mooncake transfer engine did not start on {host} (status {rc})")
        self.addr = f"{host}:{self.engine.get_rpc_port()}"
        self.rate_gbps = rate_gbps
        self._lock = threading.Lock()
        self._registered: dict[int, int] = {}
        self._sent = 0.0
        self._t0: float | None = None
        self.bytes_read = 0

    def register(self, ptr: int, size: int) -> None:
        """Make ``[ptr, ptr + size)`` readable by peers (and a valid local destination)."""
        with self._lock:
            if self._registered.get(ptr) == size or size <= 0:
                return
            # a range registered before that overlaps this one is a view those pages no longer hold
            # (a segment remapped or regrown in place, a freed one whose addresses came back): the
            # engine refuses overlapping registrations, so the stale one goes first
            for old, n in list(self._registered.items()):
                if old < ptr + size and ptr < old + n:
                    self.engine.unregister_memory(old)
                    del self._registered[old]
            rc = self.engine.register_memory(ptr, size)
            if rc != 0:
                raise RuntimeError(f"Mooncake could not register {size} bytes at {ptr:#x} (status {rc})")
            self._registered[ptr] = size

    def unregister(self, ptr: int) -> None:
        with self._lock:
            if self._registered.pop(ptr, None) is not None:
                self.engine.unregister_memory(ptr)

    def read(self, addr: str, local: list[int], remote: list[int], lengths: list[int]) -> None:
        """Read each ``remote[i]`` run of ``lengths[i]`` bytes of the peer ``addr`` into ``local[i]``."""
        if not lengths:
            return
        total = sum(lengths)
        try:
            if len(lengths) == 1:
                rc = self.engine.transfer_sync_read(addr, local[0], remote[0], lengths[0])
            else:
                rc = self.engine.batch_transfer_sync_read(addr, local, remote, lengths)
        except Exception as e:  # noqa: BLE001 - the engine's errors are the link's
            raise LinkFailed(addr, f"{type(e).__name__}: {e}") from e
        if rc != 0:
            raise LinkFailed(addr, f"status {rc}")
        self.bytes_read += total
        self._pace(total)

    def reset_pace(self) -> None:
        """Start a new pacing window (each migration its own)."""
        with self._lock:
            self._t0, self._sent = None, 0.0

    def _pace(self, nbytes: int) -> None:
        """With ``rate_gbps``: sleep so that the reads so far took at least bytes / rate."""
        if self.rate_gbps <= 0:
            return
        with self._lock:
            now = time.perf_counter()
            if self._t0 is None:
                self._t0 = now
            self._sent += nbytes
            due = self._t0 + self._sent / (self.rate_gbps * 1e9)
        if due > now:
            time.sleep(due - now)
