"""Expert load statistics: tokens routed to each expert of each MoE layer, from rank 0 to the controller.

SGLang's own expert-distribution recorder runs on its expert-location metadata, which elastic
expert parallelism skips (its placement assumes equal experts per rank; ``patches.expert_location``).
So EP rank 0 counts the router's choices itself: the MoE hook (``patches.fused_moe.forward_impl``,
routing done, dispatch next) adds the bincount of the step's ``topk_ids`` to a ``[num_layers,
num_experts]`` counter on the device (every rank routes the same tokens: one counter suffices), and
at most every ``FLUSH_S`` copies it to ``<run dir>/expert_loads.npz`` (written to a temporary file
and renamed: a reader never sees half a file). The counts are cumulative per process, with the
writer's pid: ``LoadReader`` turns them into loads since its last ``mark`` (a new rank 0 after a
failure starts from zero, which the reader sees by the pid).
"""

from __future__ import annotations

import os
import time

import numpy as np

__all__ = ["FLUSH_S", "loads_path", "LoadCounter", "LoadReader"]

FLUSH_S = 0.2


def loads_path(control_addr: str) -> str:
    """The counter file, beside the controller's control socket (its private run dir)."""
    return os.path.join(os.path.dirname(control_addr.removeprefix("ipc://")), "expert_loads.npz")


class LoadCounter:
    """Rank 0's counter (one per process; layers count into their row)."""

    def __init__(self, path: str, num_layers: int, num_experts: int) -> None:
        self.path = path
        self.shape = (num_layers, num_experts)
        self._counts = None  # torch int64 on the routing device, made at the first count
        self._flushed_t = 0.0

    def add(self, layer: int, topk_ids) -> None:
        import torch

        if self._counts is None:
            self._counts = torch.zeros(self.shape, dtype=torch.int64, device=topk_ids.device)
        ids = topk_ids.reshape(-1)
        ids = ids[ids >= 0].to(torch.int64)
        self._counts[layer] += torch.bincount(ids, minlength=self.shape[1])[: self.shape[1]]
        now = time.monotonic()
        if now - self._flushed_t >= FLUSH_S:
            self._flushed_t = now
            self.flush()

    def flush(self) -> None:
        if self._counts is None:
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, counts=self._counts.cpu().numpy(), pid=np.int64(os.getpid()))
            os.replace(tmp, self.path)
        except OSError:  # the run dir is gone (server shutting down): statistics are best effort
            try:
                os.unlink(tmp)
            except OSError:
                pass


class LoadReader:
    """The controller's side: loads since the last ``mark`` (or since the writer started)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._base: tuple[int, np.ndarray] | None = None  # (pid, counts) at the last mark

    def _read(self) -> tuple[int, np.ndarray] | None:
        try:
            with np.load(self.path) as z:
                return int(z["pid"]), z["counts"].astype(np.float64)
        except (OSError, ValueError, KeyError):
            return None

    def loads(self) -> np.ndarray | None:
        """``[num_layers, num_experts]`` tokens routed since the last mark; None before any count."""
        got = self._read()
        if got is None:
            return None
        pid, counts = got
        if self._base is not None and self._base[0] == pid and self._base[1].shape == counts.shape:
            diff = counts - self._base[1]
            if (diff >= 0).all():
                return diff
        return counts

    def mark(self) -> None:
        """Loads start again from now (called after a placement was applied)."""
        self._base = self._read()

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass
