"""Process, shared-memory and port helpers of the controller (main process); tests use them too.

SGLang 0.5.23 leaves ``/dev/shm`` files behind (scheduler message queues, semaphores); the
controller notes the files its processes map and removes those a killed process left.
"""

from __future__ import annotations

import os
import socket

__all__ = ["shm_inodes_of", "remove_leftover_shm", "free_port", "dead_helpers", "sigkill", "set_omp_bind"]


def shm_inodes_of(pids: list[int]) -> set[int]:
    """Inodes of the ``/dev/shm`` files that processes ``pids`` have mapped or open (best effort).

    Inodes, not paths: glibc maps a POSIX semaphore under its temporary name (``sem.XXXXXX``)
    before linking it as ``sem.mp-...``, so ``/proc/<pid>/maps`` does not show the final name.
    """
    inodes: set[int] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].startswith("/dev/shm/"):
                        inodes.add(int(fields[4]))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/shm/"):
                        inodes.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
                except OSError:
                    continue
        except OSError:
            continue
    return inodes


def remove_leftover_shm(inodes: set[int]) -> list[str]:
    """Unlink the ``/dev/shm`` files whose inode is in ``inodes``; return their paths."""
    removed = []
    for entry in os.scandir("/dev/shm"):
        try:
            if entry.inode() in inodes:
                os.unlink(entry.path)
                removed.append(entry.path)
        except OSError:
            pass
    return sorted(removed)


_remote_fence = None  # pid -> bool: True when ``pid`` is a rank of another node, fenced there


def set_remote_fence(fence) -> None:
    """``fence(pid) -> bool``: how ``sigkill`` reaches the ranks of other nodes (``controller.nodes``):
    their pids mean nothing on this node, so they are never signalled here."""
    global _remote_fence
    _remote_fence = fence


def sigkill(*pids: int) -> None:
    """SIGKILL each of ``pids``; one already gone is not an error (it is what was wanted). A rank
    of another node is fenced by its node's agent (``set_remote_fence``)."""
    import signal

    for pid in pids:
        if _remote_fence is not None and _remote_fence(pid):
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HELPER_TITLES = ("sglang::detokenizer",)  # the main process's children no failover can replace


def dead_helpers(titles: tuple[str, ...] = HELPER_TITLES) -> list[str]:
    """The helper processes of this (main) process that are gone: each title in ``titles`` with no
    live child process whose command line starts with it (a zombie counts as gone)."""
    import psutil

    alive: set[str] = set()
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return []
    for c in children:
        try:
            if c.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(c.cmdline())
        except psutil.Error:
            continue
        alive.update(t for t in titles if cmd.startswith(t))
    return [t for t in titles if t not in alive]


def set_omp_bind(bind: str) -> None:
    """``SGLANG_CPU_OMP_THREADS_BIND`` of the schedulers SGLang spawns next ("" on GPU: unchanged)."""
    if bind:
        os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = bind
