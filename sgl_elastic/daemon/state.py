"""Lifecycle of the state daemon: an Enum and the one function that moves between states.

    STARTING -> EMPTY -> LOADING -> READY <-> MIGRATING
                  ^         |
                  +---------+   (a failed load frees what it allocated)
    any state but STOPPED -> STOPPING -> STOPPED

EMPTY and READY serve every request that needs no held model / the model; LOADING and MIGRATING
run in a worker thread while the control socket keeps answering (stats, KV index), refusing
exports with a STATE error that says to wait for READY.
"""

from __future__ import annotations

import enum
import logging

__all__ = ["DaemonState", "transition", "IllegalTransition"]

logger = logging.getLogger("sgl_elastic.daemon")


class DaemonState(enum.Enum):
    STARTING = "starting"
    EMPTY = "empty"  # control plane up, no model held
    LOADING = "loading"
    READY = "ready"  # model held: weights exportable
    MIGRATING = "migrating"
    STOPPING = "stopping"
    STOPPED = "stopped"


_LEGAL: dict[DaemonState, frozenset[DaemonState]] = {
    DaemonState.STARTING: frozenset({DaemonState.EMPTY, DaemonState.STOPPING}),
    DaemonState.EMPTY: frozenset({DaemonState.LOADING, DaemonState.STOPPING}),
    DaemonState.LOADING: frozenset({DaemonState.READY, DaemonState.EMPTY, DaemonState.STOPPING}),
    DaemonState.READY: frozenset({DaemonState.MIGRATING, DaemonState.STOPPING}),
    # EMPTY: an in-place migration failed after it had started moving bytes (the model is dropped)
    DaemonState.MIGRATING: frozenset({DaemonState.READY, DaemonState.EMPTY, DaemonState.STOPPING}),
    DaemonState.STOPPING: frozenset({DaemonState.STOPPED}),
    DaemonState.STOPPED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


def transition(current: DaemonState, target: DaemonState, reason: str = "") -> DaemonState:
    """Return ``target`` if ``current -> target`` is legal (logged), else raise ``IllegalTransition``."""
    if target not in _LEGAL[current]:
        allowed = ", ".join(s.name for s in _LEGAL[current]) or "none"
        raise IllegalTransition(
            f"daemon cannot go {current.name} -> {target.name}{f' ({reason})' if reason else ''};"
            f" from {current.name} it may go to: {allowed}"
        )
    logger.info("daemon state %s -> %s%s", current.name, target.name, f": {reason}" if reason else "")
    return target
