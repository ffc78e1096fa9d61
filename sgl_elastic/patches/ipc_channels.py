"""Patch of SGLang's ``managers/scheduler_components/ipc_channels.py``: a rank 0 that stays rank 0
across a failover keeps its ZMQ channels, so the requests the tokenizer queued meanwhile are kept.

Pass-through unless a failover handed over the old channels.
"""

from __future__ import annotations

from sgl_elastic.rank import failover


def ipc_channels_create(original, cls, *args, **kwargs):
    """SchedulerIpcChannels.create: reuse the old scheduler's channels when it was and stays rank 0."""
    if kwargs.get("is_rank_zero"):
        ch = failover.take_channels()
        if ch is not None:
            return ch
    ch = original(cls, *args, **kwargs)
    if failover.enabled():
        failover.note_channels(ch)
    return ch
