"""The one object that owns a rank process's failover state (:data:`RANK`).

A scheduler process serves in one recovery epoch at a time; what survives from one epoch's
scheduler to the next (requests to re-broadcast, rank 0's ZMQ channels, the requests re-submitted
after rank 0 died) lives here, not in module globals, so a reader sees all of it in one place.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from typing import Any


def log(msg: str) -> None:
    print(f"[sgl-elastic failover pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class RankSession:
    control_addr: str | None = None  # the controller's socket (None: in-place failover is off); set at plugin load
    heartbeat_s: float = 0.0  # heartbeat period (0: none); set at plugin load
    heartbeat: threading.Thread | None = None
    epoch: int = 0  # the recovery epoch this process serves in
    # rank 0: requests for the next broadcast (ResumeReqs, then stashed inputs)
    inject: list = dataclasses.field(default_factory=list)
    stash: list | None = None  # rank 0: inputs being broadcast right now (re-sent if the broadcast fails)
    reuse_channels: Any = None  # rank 0 -> rank 0: the old scheduler's ZMQ channels, for the new one
    # channels made by a rebuild that then failed (closed before the next attempt)
    built_channels: list = dataclasses.field(default_factory=list)
    # new rank 0 after rank 0 died: rids re-submitted (a copy later delivered by the socket is dropped)
    resubmitted: set[str] = dataclasses.field(default_factory=set)
    unresumable: list[str] = dataclasses.field(default_factory=list)  # this failover's rids neither resumed nor re-submitted
    # the user's --dist-timeout (seconds; None: torch's default), read from the args at the first rebuild
    user_dist_timeout: int | None = None
    user_dist_timeout_read: bool = False
    regroup_seen_t: float = 0.0  # last look for the controller's regroup file (monotonic)
    audit_seen_t: float = 0.0  # last look for the controller's audit file (monotonic)


RANK = RankSession()
