"""A shard-owner process for the CPU backend (tests and benchmarks; the daemon plays this role in
production): it loads ranks' shards from the checkpoint into shared-memory arenas, hands their
handles to the parent, keeps them alive until told to stop, then unlinks them."""

from __future__ import annotations

import multiprocessing as mp

import msgspec

from sgl_elastic.executor.cpu import allocate_rank_arenas, load_rank_from_checkpoint
from sgl_elastic.executor.safetensors_io import SafetensorsCheckpoint
from sgl_elastic.executor.shm import ArenaHandle, ShmArena
from sgl_elastic.layout import ElasticLayout

__all__ = ["ShardOwner"]


def _owner_main(conn, layout_bytes: bytes, ckpt_dir: str, ranks: list[int], label: str) -> None:
    layout = ElasticLayout.from_bytes(layout_bytes)
    arenas = {}
    try:
        with SafetensorsCheckpoint(ckpt_dir) as ckpt:
            all_arenas = allocate_rank_arenas(layout, label)
            for r, a in all_arenas.items():
                if r in ranks:
                    load_rank_from_checkpoint(layout, r, ckpt, a)
                    arenas[r] = a
                else:
                    a.close()
        conn.send_bytes(msgspec.msgpack.encode({r: a.handle for r, a in arenas.items()}))
        conn.recv_bytes()  # wait for "stop"
    finally:
        for a in arenas.values():
            a.close()
        conn.close()


class ShardOwner:
    """Context manager: ``with ShardOwner(layout, ckpt_dir, ranks) as owner: owner.arenas[r]``
    (arenas attached in this process; they live in the owner process)."""

    def __init__(self, layout: ElasticLayout, ckpt_dir: str, ranks: list[int], label: str = "owner") -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_owner_main, args=(child, layout.to_bytes(), str(ckpt_dir), list(ranks), label),
                                 daemon=True)
        self.arenas: dict[int, ShmArena] = {}

    def __enter__(self) -> "ShardOwner":
        self._proc.start()
        if not self._conn.poll(120):
            self._proc.kill()
            raise TimeoutError("shard owner did not report its arenas within 120 s")
        handles = msgspec.msgpack.decode(self._conn.recv_bytes(), type=dict[int, ArenaHandle])
        self.arenas = {r: ShmArena.attach(h) for r, h in handles.items()}
        return self

    def __exit__(self, *exc) -> None:
        for a in self.arenas.values():
            a.close()
        try:
            self._conn.send_bytes(b"stop")
        except (BrokenPipeError, OSError):
            pass
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
