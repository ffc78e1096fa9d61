"""Starting and stopping a daemon process from Python (``launch_server``, tests, benchmarks).

``DaemonProcess.start()`` runs ``python -m sgl_elastic.daemon`` in a new private run directory,
waits for its ``daemon.json``, and hands out clients (the token is read from the 0600 file, never
passed on a command line). ``stop()`` asks it to shut down, escalates to SIGTERM then SIGKILL, and
sweeps any shared-memory segment a killed daemon left (``memory.shm.reap_segments``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from sgl_elastic.daemon.client import DaemonClient, DaemonUnavailable
from sgl_elastic.daemon.server import INFO_FILE
from sgl_elastic.memory.shm import reap_dead, reap_segments

__all__ = ["DaemonProcess", "ENV_DIR"]

# The environment variable that names a server's daemon run dir to its scheduler processes (set by
# the controller when it starts the daemon, read once per process at plugin load).
ENV_DIR = "SGLE_DAEMON_DIR"


class DaemonProcess:
    """A daemon child process. ``with DaemonProcess.start() as d: d.client().stats()``.

    Args of ``start``: ``tcp`` (serve on 127.0.0.1, free port), ``backend`` ("shm" | "cuda"),
    ``checkpoint``/``layout`` (load at start), ``log`` (file object for its stderr; default: inherit),
    ``in_place`` (how migrations reuse a survivor's segment: ``memory.IN_PLACE_MODES``),
    ``node_host`` / ``link_gbps`` (the transfer endpoint for peer daemons of other nodes), ``ranks``
    (with ``checkpoint``: the ranks to load), ``wrap`` (a command prefix, e.g. ``unshare ...``: a node
    of its own).
    """

    def __init__(self, proc: subprocess.Popen, run_dir: str, own_dir: bool) -> None:
        self.proc, self.run_dir, self._own_dir = proc, run_dir, own_dir

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, *, tcp: bool = False, backend: str = "shm", checkpoint: str | None = None, layout=None,
              run_dir: str | None = None, timeout: float = 30.0, log=None,
              exit_with_parent: bool = False, in_place: str = "remap", node_host: str | None = None,
              link_gbps: float = 0.0, ranks: list[int] | None = None, wrap: list[str] | None = None) -> "DaemonProcess":
        own = run_dir is None
        reap_dead()  # what crashed daemons of earlier runs left behind
        # The parent makes the private directory (0700), so it knows where to look before the child starts.
        run_dir = run_dir or tempfile.mkdtemp(prefix="sgle-daemon-")
        cmd = [sys.executable, "-m", "sgl_elastic.daemon", "--run-dir", run_dir, "--backend", backend,
               "--in-place", in_place]
        if tcp:
            cmd.append("--tcp")
        if exit_with_parent:  # a server's daemon: it must not outlive the server
            cmd += ["--parent-pid", str(os.getpid())]
        if node_host is not None:
            cmd += ["--node-host", node_host]
        if link_gbps > 0:
            cmd += ["--link-gbps", str(link_gbps)]
        if ranks is not None:
            cmd += ["--ranks", ",".join(map(str, ranks))]
        layout_file = None
        if checkpoint is not None:
            layout_file = os.path.join(run_dir, "layout.msgpack")
            with open(os.open(layout_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(layout.to_bytes())
            cmd += ["--checkpoint", str(checkpoint), "--layout-file", layout_file]
        proc = subprocess.Popen([*(wrap or []), *cmd], stdin=subprocess.DEVNULL, stderr=log, stdout=subprocess.DEVNULL)
        d = cls(proc, run_dir, own)
        deadline = time.monotonic() + timeout
        while not os.path.exists(os.path.join(run_dir, INFO_FILE)):
            if proc.poll() is not None:
                d._sweep()
                raise RuntimeError(f"daemon exited with status {proc.returncode} before serving; see its stderr")
            if time.monotonic() > deadline:
                d.stop()
                raise TimeoutError(f"daemon did not serve within {timeout:.0f}s")
            time.sleep(0.01)
        return d

    def client(self, timeout: float = 10.0) -> DaemonClient:
        return DaemonClient.from_run_dir(self.run_dir, timeout=timeout)

    def stop(self, timeout: float = 10.0) -> int:
        """Shutdown request, then SIGTERM, then SIGKILL; returns the exit status. Idempotent."""
        if self.proc.poll() is None:
            try:
                with self.client(timeout=2.0) as c:
                    c.shutdown()
            except (DaemonUnavailable, OSError, RuntimeError):
                pass
            for sig, wait in ((None, timeout), (signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                if sig is not None and self.proc.poll() is None:
                    self.proc.send_signal(sig)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._sweep()
        return self.proc.returncode

    def _sweep(self) -> None:
        # A SIGKILLed daemon's segments are unlinked by its resource tracker, asynchronously; this is
        # the backstop (only for this daemon's pid, only once it is gone).
        reap_segments(self.proc.pid)
        if self._own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> "DaemonProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
