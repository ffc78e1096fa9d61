"""Patch of SGLang's ``managers/scheduler_components/request_receiver.py``: nothing pulled from the
tokenizer is lost in a failover, and the new rank 0's first broadcast carries the resumed requests.

Pass-through unless the failover controller's endpoint was set at plugin load.
"""

from __future__ import annotations

from sgl_elastic.controller import reqtrace
from sgl_elastic.patches import reconfigure as rc


def broadcast_reqs(original, self, recv_reqs, local_reqs=None):
    """SchedulerRequestReceiver._broadcast_reqs_across_ranks: remember what rank 0 is broadcasting
    (inputs pulled from the tokenizer's socket are lost if the broadcast fails)."""
    if rc.enabled() and recv_reqs:
        rc.stash(list(recv_reqs) + list(local_reqs or []))
    out = original(self, recv_reqs, local_reqs)  # on failure the stash stays: the failover re-sends it
    rc.stash(None)
    if out and reqtrace.on():
        reqtrace.note("recv", reqtrace.rids_of(out), epoch=rc.epoch())
    return out


def pull_raw_reqs(original, self):
    """SchedulerRequestReceiver._pull_raw_reqs: the first pull of a new epoch leads with what was resumed."""
    out = original(self)
    if out is not None:
        if out and reqtrace.on():
            reqtrace.note("pull", reqtrace.rids_of(out), epoch=rc.epoch())
        out = rc.maybe_regroup(rc.drop_resubmitted(out))
        lead = rc.take_injected()
        if lead and reqtrace.on():
            reqtrace.note("inject", reqtrace.rids_of(lead), epoch=rc.epoch())
        if lead:
            out = lead + list(out)
    return out
