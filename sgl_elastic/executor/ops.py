"""Shared pieces of the executors: op queues (longest first) and numpy views of op regions."""

from __future__ import annotations

import numpy as np

from sgl_elastic.planner.plan import KEEP, PEER, RELOAD, CopyOp, MigrationPlan

__all__ = ["split_queues", "shard_view", "full_region"]


def split_queues(plan: MigrationPlan) -> tuple[list[CopyOp], list[CopyOp], list[CopyOp]]:
    """(reloads, stage-0 keep/peer copies, stage-1 fan-out copies), each longest first.

    Longest-first (LPT) on every queue keeps the tail short; the reload queue is the slowest
    resource and is started first.
    """
    reloads, copies, fanout = [], [], []
    for op in plan.tensor_ops():
        if op.kind == RELOAD:
            reloads.append(op)
        elif op.stage == 1:
            fanout.append(op)
        elif op.kind in (KEEP, PEER):
            copies.append(op)
    key = lambda o: (-o.nbytes, o.tensor, o.dst_rank, o.start)  # noqa: E731
    return sorted(reloads, key=key), sorted(copies, key=key), sorted(fanout, key=key)


def shard_view(arr: np.ndarray, op: CopyOp, offset: int):
    """The part of a shard array ``arr`` that ``op`` covers, starting at element ``offset`` along its dim."""
    if op.dim < 0:
        return arr
    if op.dim == 0:
        return arr[offset:offset + op.length]
    return arr[:, offset:offset + op.length]


def full_region(shape: tuple[int, ...], op: CopyOp) -> tuple[int, int, int, int]:
    """Region ``(row0, row1, col0, col1)`` of the full tensor that a RELOAD op reads."""
    rows, cols = (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])
    if op.dim < 0:
        return (0, rows, 0, cols)
    if op.dim == 0:
        return (op.start, op.start + op.length, 0, cols)
    return (0, rows, op.start, op.start + op.length)
