"""ExecReport: what an executor run moved and how long it took, against the cost model."""

from __future__ import annotations

import msgspec

from sgl_elastic.planner.cost import CostEstimate

__all__ = ["ExecReport"]


class ExecReport(msgspec.Struct, frozen=True, kw_only=True):
    """Achieved vs predicted. Seconds are wall time; bytes are payload bytes.

    ``efficiency`` = predicted_s / achieved_s (1.0: the run is as fast as the model's lower bound).
    ``alloc_s``: destination allocation (once, before any copy); ``reload_s``/``copy_s``: wall time of
    the reload and copy workers (they overlap, and overlap the in-place moves, ``move_s``);
``fanout_s``: stage-1 copies after the reloads.
    """

    backend: str
    achieved_s: float
    alloc_s: float
    reload_s: float
    copy_s: float
    fanout_s: float
    keep_bytes: int
    peer_bytes: int
    reload_bytes: int
    file_bytes_read: int
    num_ops: int
    predicted: CostEstimate
    move_s: float = 0.0  # wall time of the in-place moves (beside the reloads and copies)
    in_place_ranks: int = 0  # new ranks whose arena is a survivor's, regrown (CPU executor)
    alloc_bytes: int = 0  # bytes of new memory the destinations took (0: not reported)
    remapped_bytes: int = 0  # kept bytes that stayed in their pages (a remapped view; none copied)
    remapped_ranks: int = 0  # new ranks whose arena is a survivor's file remapped (of in_place_ranks)
    released_bytes: int = 0  # pages of the old views punched out after the migration
    remote_bytes: int = 0  # bytes read from another node's daemon (executor.remote)
    rerouted_bytes: int = 0  # bytes whose read from another node failed, reloaded here instead
    remote_s: float = 0.0  # wall time of the remote reads

    @property
    def copied_keep_bytes(self) -> int:
        """Kept bytes that were copied or moved (not remapped)."""
        return self.keep_bytes - self.remapped_bytes

    @property
    def efficiency(self) -> float:
        return self.predicted.predicted_s / self.achieved_s if self.achieved_s > 0 else float("inf")
