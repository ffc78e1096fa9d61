"""Typed commands from the admin API's threads to the controller's thread.

``POST /elastic/add_rank`` and ``POST /elastic/rebalance`` are accepted in the HTTP server's thread
and carried out in the controller's (the detector's) thread, which also owns every recovery: the
request is a command put on ``CommandQueue``; a byte on a pipe wakes the detector's
``multiprocessing.connection.wait`` (which watches the rank processes' sentinels too). A command
shows as pending in ``/elastic/status`` from ``put`` until ``done``.
"""

from __future__ import annotations

import collections
import multiprocessing
import threading
from dataclasses import dataclass

__all__ = ["AddRank", "JoinNode", "Rebalance", "Stop", "Command", "CommandQueue"]


@dataclass(frozen=True)
class AddRank:
    """Start a new rank process (or take a warm standby) and grow by one rank."""

    name = "add_rank"


@dataclass(frozen=True)
class Rebalance:
    """Place the experts by the loads measured since the last placement (``controller.placers``)."""

    algorithm: str = "ours"
    name = "rebalance"


@dataclass(frozen=True)
class JoinNode:
    """A node that came back (``--elastic-join``): add each of its new rank processes, one by one."""

    node: int
    name = "join_node"


@dataclass(frozen=True)
class Stop:
    """The controller closes: the detector's thread ends."""

    name = "stop"


Command = AddRank | JoinNode | Rebalance | Stop


class CommandQueue:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: collections.deque[Command] = collections.deque()
        self._running: list[Command] = []
        self._pipe = None

    @property
    def waitable(self):
        """The pipe end that becomes readable when a command is put (for ``connection.wait``)."""
        with self._lock:
            if self._pipe is None:
                self._pipe = multiprocessing.Pipe(duplex=False)
            return self._pipe[0]

    def put(self, cmd: Command) -> None:
        self.waitable  # noqa: B018 - creates the pipe
        with self._lock:
            self._queued.append(cmd)
        try:
            self._pipe[1].send_bytes(b"!")
        except OSError:  # closed: nobody waits any more
            pass

    def take(self) -> Command | None:
        """The next command (now running until ``done``), or None."""
        r = self.waitable
        try:
            if r.poll(0):  # one byte per command: the others still wake the next wait
                r.recv_bytes()
        except (EOFError, OSError):
            pass
        with self._lock:
            if not self._queued:
                return None
            cmd = self._queued.popleft()
            self._running.append(cmd)
            return cmd

    def done(self, cmd: Command) -> None:
        with self._lock:
            if cmd in self._running:
                self._running.remove(cmd)

    def pending(self) -> list[str]:
        """Names of the commands accepted and not yet done (queued or running), in order."""
        with self._lock:
            names = [c.name for c in (*self._running, *self._queued) if not isinstance(c, Stop)]
        return list(dict.fromkeys(names))

    def has(self, kind: type) -> bool:
        with self._lock:
            return any(isinstance(c, kind) for c in (*self._running, *self._queued))
