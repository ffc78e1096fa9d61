"""Patch of SGLang's ``managers/scheduler_components/request_receiver.py``: nothing pulled from the
tokenizer is lost in a failover, and the new rank 0's first broadcast carries the resumed requests.

Pass-through unless the failover controller's endpoint was set at plugin load.
"""

from __future__ import annotations

from sgl_elastic.controller import reqtrace
from sgl_elastic.rank import failover, requests, signals


def broadcast_reqs(original, self, recv_reqs, local_reqs=None):
    """SchedulerRequestReceiver._broadcast_reqs_across_ranks: remember what rank 0 is broadcasting
    (inputs pulled from the tokenizer's socket are lost if the broadcast fails)."""
    if failover.enabled() and recv_reqs:
        failover.stash(list(recv_reqs) + list(local_reqs or []))
    out = original(self, recv_reqs, local_reqs)  # on failure the stash stays: the failover re-sends it
    failover.stash(None)
    if out and reqtrace.on():
        reqtrace.note("recv", reqtrace.rids_of(out), epoch=failover.epoch())
    return out


def pull_raw_reqs(original, self):
    """SchedulerRequestReceiver._pull_raw_reqs: the first pull of a new epoch leads with what was resumed."""
    out = original(self)
    if out is not None:
        if out and reqtrace.on():
            reqtrace.note("pull", reqtrace.rids_of(out), epoch=failover.epoch())
        out = signals.maybe_regroup(requests.drop_resubmitted(out))
        lead = failover.take_injected()
        if lead and reqtrace.on():
            reqtrace.note("inject", reqtrace.rids_of(lead), epoch=failover.epoch())
        if lead:
            out = lead + list(out)
    return out
