"""Start and stop ``python -m sgl_elastic.launch_server`` as a child process (tests, demo, bench).

The server binds 127.0.0.1 on a free port, runs in its own process group, and is stopped by its
own pid: SIGINT first (SGLang's clean shutdown), then SIGKILL of the whole group if it lingers.

SGLang 0.5.23 leaves shared-memory files behind even after a clean shutdown (its scheduler
message queue ``sgl_shm_mq_<pid>_*``, load reports, multiprocessing semaphores). ``stop`` notes the
``/dev/shm`` files the server's own processes have mapped or open, and removes those still there
once the processes are gone; files of other processes are never touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

from sgl_elastic.controller.procs import free_port, remove_leftover_shm, shm_inodes_of


class ServerStartError(RuntimeError):
    pass


class _PortTaken(Exception):
    """The server could not bind its HTTP port (another process took it after we chose it)."""


class ServerProcess:
    """``with ServerProcess(model_path, tp_size=2) as srv: requests.post(srv.url + "/generate")``.

    ``extra_args`` are passed to the launcher verbatim. The server's output goes to ``log_path``
    (a temporary file unless given); its last lines are shown if the start fails.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        tp_size: int = 1,
        extra_args: list[str] | tuple[str, ...] = (),
        *,
        module: str = "sgl_elastic.launch_server",
        start_timeout_s: float = 240.0,
        log_path: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
    ):
        self.model_path = str(model_path)
        self.tp_size = tp_size
        self.extra_args = list(extra_args)
        self.module = module
        self.start_timeout_s = start_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="sgl-elastic-server-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.start_s: float | None = None  # seconds from spawn to /health answering 200
        self.forced_kill = False
        self.removed_shm: list[str] = []  # SGLang's leftovers that stop() removed
        self.seen_pids: set[int] = set()  # the server's processes noted so far (``note_children``)

    @property
    def command(self) -> list[str]:
        return [
            sys.executable, "-m", self.module,
            "--model-path", self.model_path,
            "--tp-size", str(self.tp_size),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            *self.extra_args,
        ]

    def start(self) -> "ServerProcess":
        """Spawn the server and wait until /health answers 200. If its HTTP port was taken between
        choosing it and binding it (SGLang picks its own internal ports meanwhile), the server is
        stopped and started again on another free port (twice at most)."""
        for attempt in range(3):
            try:
                return self._start_once()
            except _PortTaken:
                self.stop()
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
        raise ServerStartError(f"the HTTP port was taken three times in a row:\n{self.log_tail()}")

    def _start_once(self) -> "ServerProcess":
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # own process group: stopped as a whole, by our pid
            )
        deadline = t0 + self.start_timeout_s
        polls = 0
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"server exited with {self.proc.returncode} during start:\n{self.log_tail()}"
                )
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    self.start_s = time.perf_counter() - t0
                    return self
            except requests.RequestException:
                pass
            polls += 1
            if polls % 4 == 0 and f"error while attempting to bind on address ('127.0.0.1', {self.port})" in \
                    self.log_path.read_text(errors="replace"):
                raise _PortTaken(self.port)
            time.sleep(0.5)
        self.stop()
        raise ServerStartError(
            f"server not healthy after {self.start_timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def log_tail(self, num_lines: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-num_lines:])

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGINT the server, wait for its group to exit, SIGKILL what is left. Returns the exit code.

        ``self.forced_kill`` tells whether anything of the group had to be SIGKILLed.
        """
        proc = self.proc
        if proc is None:
            return None
        shm_inodes = shm_inodes_of([proc.pid, *self.group_members()])
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGINT)
                proc.wait(timeout=timeout_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        deadline = time.perf_counter() + 10.0
        while self.group_members() and time.perf_counter() < deadline:
            time.sleep(0.2)
        leftovers = self.group_members()
        self.forced_kill = proc.poll() is None or bool(leftovers)
        for p in [proc.pid, *leftovers]:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.perf_counter() + 10.0
        while self.group_members() and time.perf_counter() < deadline:
            time.sleep(0.2)
        self.removed_shm = remove_leftover_shm(shm_inodes)
        return proc.returncode

    def group_members(self) -> list[int]:
        """Pids of the live (non-zombie) processes of the server's process group, leader excluded."""
        if self.proc is None:
            return []
        return [p for p in group_pids(self.proc.pid) if p != self.proc.pid]

    def note_children(self) -> set[int]:
        """Add every descendant of the server's main process now to ``seen_pids`` (relaunched or added
        ranks are new processes: note them while they run, to check after ``stop`` that none is left).
        A server that has ended adds nothing."""
        if self.proc is not None:
            try:
                self.seen_pids |= set(children_of(self))
            except psutil.Error:
                pass
        return self.seen_pids

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def group_pids(pgid: int) -> list[int]:
    """Pids of the live (non-zombie) processes of process group ``pgid``, its leader included."""
    members = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.info["pid"]) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(p.info["pid"])
        except (ProcessLookupError, psutil.Error):
            pass
    return members


def children_of(srv: ServerProcess) -> list[int]:
    """Pids of every descendant of the server's main process now (to check after ``stop``)."""
    return [c.pid for c in psutil.Process(srv.proc.pid).children(recursive=True)]


def alive(pids) -> list[int]:
    """Those of ``pids`` that still run (neither gone nor a zombie)."""
    out = []
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def process_gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether ``pid`` has exited (gone, or a zombie) within ``timeout`` s (polled every 0.05 s)."""
    deadline = time.monotonic() + timeout
    while alive([pid]):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop_and_check_leaks(srv: ServerProcess, pids: list[int], *, sglang_files: bool = False) -> int | None:
    """Tests: ``srv.stop()``, then assert that none of ``pids`` (the server's processes, noted while
    it ran) is still alive, that no state daemon it started (``daemon pid N started`` in its log)
    left a segment in ``/dev/shm``, and with ``sglang_files`` that none of SGLang's own files
    (``sgl_shm_<kind>_<creator pid>_*``) of those processes stayed. Returns the exit code."""
    import re

    code = srv.stop()
    log = srv.log_path.read_text(errors="replace")
    left = alive(pids)
    assert not left, f"server processes left running: {left}"
    dpids = {int(p) for p in re.findall(r"daemon pid (\d+) started", log)}
    left = [e.name for e in os.scandir("/dev/shm") if any(e.name.startswith(f"sgle-{p}-") for p in dpids)]
    assert not left, f"daemon segments left in /dev/shm: {left}"
    if sglang_files:
        stale = [e.name for e in os.scandir("/dev/shm") if e.name.startswith("sgl_shm_")
                 and any(f"_{p}_" in e.name for p in pids)]
        assert not stale, f"SGLang files of this server left in /dev/shm: {stale}"
    return code
