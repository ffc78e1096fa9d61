"""What the controller and a rank process tell each other through files in the controller's run dir.

- heartbeat: the rank touches its file every period from a thread of its own;
- regroup: the controller leaves a file; rank 0 takes it and broadcasts a :class:`Regroup` marker
  with that step's requests, so every rank leaves its group at the same step (a scale-up);
- audit: the controller asks which requests rank 0 holds; rank 0 answers from its event loop
  (see ``controller.accounting``).
"""

from __future__ import annotations

import json
import os
import threading
import time

from sgl_elastic.controller import reqtrace, wire
from sgl_elastic.rank.requests import held_rids
from sgl_elastic.rank.session import RANK, log

REGROUP_POLL_S = 0.05  # rank 0 looks for the regroup file at most this often
AUDIT_POLL_S = 0.1  # and for the audit file at most this often


def start_heartbeat() -> None:
    """Touch this process's heartbeat file every period from a thread of its own (once per process).

    The thread does not depend on the event loop: a rank that is slow (long forwards, starved of
    CPU, blocked in a collective on a slow peer) keeps beating; only a process that does not run at
    all (stopped, frozen) goes silent, and the controller fences it after ``--elastic-hung-timeout``."""
    if RANK.heartbeat is not None or not RANK.control_addr or RANK.heartbeat_s <= 0:
        return
    path, period = wire.heartbeat_path(RANK.control_addr, os.getpid()), RANK.heartbeat_s

    def beat() -> None:
        while True:
            try:
                with open(path, "a"):
                    os.utime(path, None)
            except OSError:  # the controller's dir is gone: the server is shutting down
                return
            time.sleep(period)

    RANK.heartbeat = threading.Thread(target=beat, name="sgle-heartbeat", daemon=True)
    RANK.heartbeat.start()


class Regroup:
    """Marker rank 0 broadcasts with a step's requests: every rank leaves its group at that step
    (the controller asked for it: a scale-up), tears down and checks in like a failure's survivor."""

    __slots__ = ("epoch",)

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def __getstate__(self):
        return self.epoch

    def __setstate__(self, s):
        self.epoch = s


class RegroupRequested(RuntimeError):
    pass


def maybe_regroup(reqs: list) -> list:
    """Rank 0's pull: if the controller left its regroup request (a file in its run dir; checked at
    most every ``REGROUP_POLL_S``), take it and append a ``Regroup`` marker to this step's broadcast."""
    now = time.monotonic()
    if not RANK.control_addr or now - RANK.regroup_seen_t < REGROUP_POLL_S:
        return reqs
    RANK.regroup_seen_t = now
    try:
        os.unlink(wire.regroup_path(RANK.control_addr))
    except FileNotFoundError:
        return reqs
    log("the controller asks the ranks to regroup (a rank joins): broadcasting it with this step")
    return list(reqs) + [Regroup(RANK.epoch)]


def maybe_audit(sched) -> None:
    """Rank 0, once per loop (a stat at most every ``AUDIT_POLL_S``): if the controller asks which
    requests this rank holds (its audit file), answer with their rids."""
    now = time.monotonic()
    if not RANK.control_addr or now - RANK.audit_seen_t < AUDIT_POLL_S:
        return
    RANK.audit_seen_t = now
    req, reply = wire.audit_paths(RANK.control_addr)
    try:
        with open(req) as f:
            seq = int(f.read().strip() or 0)
        os.unlink(req)
    except (FileNotFoundError, ValueError):
        return
    tmp = f"{reply}.{os.getpid()}.tmp"
    held = held_rids(sched)
    with open(tmp, "w") as f:
        json.dump({"seq": seq, "epoch": RANK.epoch, "rids": held}, f)
    os.replace(tmp, reply)
    reqtrace.note("held", held, seq=seq, epoch=RANK.epoch)
