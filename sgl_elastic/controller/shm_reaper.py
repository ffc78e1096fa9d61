"""Shared-memory housekeeping after a recovery: the /dev/shm files SGLang's replaced schedulers left.

A SIGKILLed process cleans nothing: while serving, the controller notes which /dev/shm files each
rank maps (every ``detection.SHM_NOTE_S``), and once serving again after a recovery it unlinks those
of the dead ranks and the message queues (``sgl_shm_*``) of the schedulers the survivors replaced.
The daemon's segments (``sgle-*``) are never touched here.
"""

from __future__ import annotations

import os
import time

from sgl_elastic.controller.phases import log
from sgl_elastic.controller.procs import shm_inodes_of


class ShmHousekeeping:
    """Mixed into ``FailoverController``."""

    def _after_serving(self) -> None:
        """Serving again after a recovery: reap what the dead left, note what the rebuilt ranks map."""
        try:
            self._reap_shm()
            with self.lock:
                live = [p for p in self.ranks if p.pid not in self.departed]
            self._note_shm(live)
        except Exception as e:  # noqa: BLE001 - housekeeping: never fails a recovery
            log(f"shared-memory housekeeping failed: {type(e).__name__}: {e}")

    def _note_shm(self, live: list) -> None:
        for p in live:
            if self.is_local(p):  # another node's pids mean nothing here
                self._shm_of[p.pid] = shm_inodes_of([p.pid])
        self._shm_noted_at = time.monotonic()

    def _reap_shm(self) -> None:
        """Unlink the /dev/shm files SGLang's schedulers left that no live process of this server maps:
        any file a rank that died had mapped (a SIGKILLed process cleans nothing), and a survivor's
        own message queues (``sgl_shm_*``) of the scheduler it replaced."""
        import psutil

        def gone(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        dead = [pid for pid in self._shm_of if gone(pid)]
        of_dead = set().union(*(self._shm_of.pop(pid) for pid in dead))
        # SGLang names a scheduler's message queues after its pid: a rank that died before its files
        # were noted (one that died while it rebuilt) is found by name
        remote = self.hub.remote_pids() if self.hub is not None else set()
        named = tuple(f"sgl_shm_mq_{pid}_" for pid in sorted(self.departed - remote) if gone(pid))
        of_live = set().union(*self._shm_of.values())
        keep = shm_inodes_of([os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))])
        removed = []
        for e in os.scandir("/dev/shm"):
            try:
                ino = e.inode()
                if ino in keep or e.name.startswith("sgle-"):  # in use, or the daemon's
                    continue
                if ino in of_dead or (ino in of_live and e.name.startswith("sgl_shm_")) or \
                        (named and e.name.startswith(named)):
                    os.unlink(e.path)
                    removed.append(e.name)
            except OSError:
                continue
        if removed:
            log(f"removed {len(removed)} /dev/shm file(s) the replaced schedulers left"
                 f" (dead ranks {dead}): {sorted(removed)[:4]}")
