"""The ``/dev/shm`` files of one server's process tree, noted while it runs and removed when it stops.

SGLang 0.5.23 leaves files behind when its processes are killed (scheduler message queues
``sgl_shm_mq_<pid>_*``, the load report ``sglang_loads_*.shm``, multiprocessing semaphores), and
a failover replaces schedulers, so each one left another set. The launcher notes, twice a
second (and once more at exit), the files that its own process and every descendant map or hold open, and at exit (once
they are gone) unlinks the noted files that no live process maps any more. Files of other
processes are never touched: a file is removed only under the name and inode it was noted with.
The state daemon's segments (``sgle-``) are the daemon's to free and are skipped.
"""

from __future__ import annotations

import os
import threading
import time

from sgl_elastic.controller.procs import shm_inodes_of

__all__ = ["ShmLedger"]

_SKIP = ("sgle-",)
SWEEP_WAIT_S = 10.0  # at most this long for the tree's exiting processes to unmap the noted files


class ShmLedger:
    """``ledger = ShmLedger(os.getpid()).start()`` ... ``ledger.sweep()`` at exit."""

    def __init__(self, root_pid: int, interval_s: float = 0.5) -> None:
        self.root_pid, self.interval_s = root_pid, interval_s
        self.files: dict[str, int] = {}  # name -> inode it was noted with
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _tree(self) -> list[int]:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
            return [self.root_pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.Error:
            return []

    def note(self) -> None:
        """Note the files the tree maps or holds open now."""
        inodes = shm_inodes_of(self._tree())
        if not inodes:
            return
        with self._lock:
            for e in os.scandir("/dev/shm"):
                try:
                    if not e.name.startswith(_SKIP) and e.inode() in inodes:
                        self.files[e.name] = e.inode()
                except OSError:
                    continue

    def start(self) -> "ShmLedger":
        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    self.note()
                except Exception:  # noqa: BLE001 - housekeeping: never stops the server
                    pass

        self.note()
        self._thread = threading.Thread(target=loop, name="sgle-shm-ledger", daemon=True)
        self._thread.start()
        return self

    def sweep(self) -> list[str]:
        """Stop noting; unlink every noted file that is still there under its noted inode and that no
        process of the tree other than the root (which is exiting) maps. Returns the names removed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:  # a last look: files made since the last periodic note, by processes still exiting
            self.note()
        except Exception:  # noqa: BLE001 - housekeeping
            pass
        # a scheduler still exiting maps its queues a moment longer: wait for the noted files to be
        # let go (bounded), else a file in use now would be skipped and left once its process ends
        deadline = time.monotonic() + SWEEP_WAIT_S
        while True:
            in_use = shm_inodes_of([p for p in self._tree() if p != self.root_pid])
            with self._lock:
                busy = in_use & set(self.files.values())
            if not busy or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        removed = []
        with self._lock:
            for name, ino in sorted(self.files.items()):
                path = os.path.join("/dev/shm", name)
                try:
                    if os.stat(path).st_ino == ino and ino not in in_use:
                        os.unlink(path)
                        removed.append(name)
                except OSError:
                    continue
        return removed
