"""What an inference worker (one TP rank's scheduler process) does with the daemon, in tensors only.

This is the API the SGLang patches call (no SGLang import here):

    w = WorkerAttachment.connect(run_dir, rank)       # register this pid for the rank
    weights = w.attach_weights()                       # name -> shard tensor (checkpoint names)
    k, v = w.kv_buffers(num_layers=L, head_dim=D, size=S, page_size=P, dtype="bfloat16")

``kv_buffers`` returns per-layer K and V views shaped exactly as SGLang 0.5.23's
``MHATokenToKVPool`` makes them for the NHD layout: ``[size + page_size, heads, head_dim]`` rows of
one ``[2, ceil_align(size + page_size, page_size), heads, head_dim]`` allocation per layer. A
restarted worker asking for the same geometry gets the same memory (and the prefix index with it).
"""

from __future__ import annotations

import os

from sgl_elastic.daemon.client import DaemonClient, DaemonError
from sgl_elastic.memory import AttachedTensors

__all__ = ["WorkerAttachment", "sglang_kv_rows"]


def sglang_kv_rows(size: int, page_size: int) -> tuple[int, int]:
    """(rows SGLang uses, rows to allocate) for a pool of ``size`` token slots: SGLang keeps one
    padding page (slot 0's page absorbs dummy writes) and pads the fused buffer to whole pages."""
    if size < 1 or page_size < 1:
        raise ValueError(f"size={size} and page_size={page_size} must be >= 1")
    rows = size + page_size
    return rows, -(-rows // page_size) * page_size


class WorkerAttachment:
    """One worker's view of the daemon: its rank's weights and KV pool, mapped zero-copy."""

    def __init__(self, client: DaemonClient, rank: int) -> None:
        self.client, self.rank = client, rank
        self.instance = ""
        self._mapped: list[AttachedTensors] = []

    @classmethod
    def connect(cls, run_dir: str, rank: int, *, timeout: float = 10.0) -> "WorkerAttachment":
        """Connect through the daemon's run dir (token from its 0600 file) and register this pid."""
        w = cls(DaemonClient.from_run_dir(run_dir, timeout=timeout), rank)
        w.instance = w.client.register(rank, os.getpid()).instance
        return w

    def attach_weights(self, *, populate: bool = True) -> dict:
        """``{checkpoint tensor name: shard}`` of this rank (torch, zero-copy)."""
        a = self.client.attach_weights(self.rank, populate=populate)
        self._check_instance(a)
        self._mapped.append(a)
        return a.tensors

    def kv_buffers(self, *, num_layers: int, head_dim: int, size: int, page_size: int, dtype: str,
                   budget_slots: int = 0, backup: bool = False) -> tuple[list, list]:
        """Per-layer (K, V) views over the daemon's KV pool of this rank (allocated on first call).

        KV heads per rank come from the daemon's layout. ``budget_slots``: most slots the prefix index
        may keep cached (0: all). ``backup``: ask for backup pools too (``kv_backup_buffers``).
        """
        rows, alloc_rows = sglang_kv_rows(size, page_size)
        self.client.alloc_kv(num_layers=num_layers, head_dim=head_dim, num_slots=alloc_rows, dtype=dtype,
                             budget_slots=budget_slots, page_size=page_size, backup=backup)
        return self._kv_views(num_layers, rows, backup=False)

    def kv_backup_buffers(self, *, num_layers: int, size: int, page_size: int) -> tuple[list, list] | None:
        """Per-layer (K, V) views over this rank's KV backup pool (after ``kv_buffers(backup=True)``),
        shaped as its pool's; None when the daemon holds none (tp 1)."""
        rows, _ = sglang_kv_rows(size, page_size)
        try:
            return self._kv_views(num_layers, rows, backup=True)
        except DaemonError as e:
            if e.code == "not_found":
                return None
            raise

    def _kv_views(self, num_layers: int, rows: int, *, backup: bool) -> tuple[list, list]:
        a = self.client.attach_kv(self.rank, backup=backup)  # not populated: pages come as tokens are written
        self._check_instance(a)
        self._mapped.append(a)
        kv = [a.tensors[f"kv.{layer}"] for layer in range(num_layers)]
        return [t[0, :rows] for t in kv], [t[1, :rows] for t in kv]

    def _check_instance(self, a: AttachedTensors) -> None:
        if self.instance and a.instance != self.instance:
            raise RuntimeError(
                f"daemon instance changed ({self.instance} -> {a.instance}): it was restarted, everything this"
                " worker mapped belongs to the old one; restart the worker against the new daemon"
            )

    def close(self) -> None:
        for a in self._mapped:
            a.close()
        self._mapped = []
        self.client.close()
