"""Several "nodes" of one server on this machine, with SGLang's own multi-node flags (tests, bench).

``with MultiNodeServer(model, tp_size=4, nnodes=2) as srv: requests.post(srv.url + "/generate")``
starts ``python -m sgl_elastic.launch_server --nnodes N --node-rank K --dist-init-addr
127.0.0.1:PORT`` once per node:

- node 0 serves HTTP on 127.0.0.1; node K >= 1 binds 127.0.0.(K+1) (SGLang's health stub there);
- node K >= 1 runs in its own IPC and mount namespaces (``unshare --ipc --mount``, root only) with
  a private tmpfs on ``/dev/shm``: it cannot map node 0's shared memory. ``isolated`` says whether
  that worked (else node-scoped names only); ``/tmp`` stays shared (the checkout may be there);
- every node is its own process group, stopped by its own pid: node 0 first (SIGINT: SGLang's
  shutdown reaches the other nodes' schedulers through rank 0's broadcast), then the others.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from sgl_elastic.controller.procs import free_port, remove_leftover_shm, shm_inodes_of
from sgl_elastic.testing.server import ServerStartError, group_pids

__all__ = ["MultiNodeServer", "Node", "can_isolate", "isolation_prefix", "node_host"]


def node_host(node_rank: int) -> str:
    """Loopback address of a node: 127.0.0.1 for node 0, 127.0.0.2 for node 1, ..."""
    return f"127.0.0.{node_rank + 1}"


def can_isolate() -> bool:
    """Whether this process may create IPC + mount namespaces (root and an ``unshare`` binary)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    try:
        r = subprocess.run(["unshare", "--ipc", "--mount", "--fork", "sh", "-c",
                            "mount -t tmpfs tmpfs /dev/shm && test -z \"$(ls -A /dev/shm)\""],
                           capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def isolation_prefix() -> list[str]:
    """Command prefix that runs a command as a node of its own: private IPC namespace and a private
    tmpfs on ``/dev/shm`` (``/tmp`` stays shared: a checkout and its venv may live there); the
    command is killed with the prefix. ``[]`` where namespaces are not available (``can_isolate``)."""
    if not can_isolate():
        return []
    return ["unshare", "--ipc", "--mount", "--propagation", "private", "--kill-child=SIGKILL",
            "sh", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "sh"]


def free_port_run(n: int = 3) -> int:
    """A free TCP port whose next ``n - 1`` ports are free too (on 127.0.0.1)."""
    import socket

    for _ in range(100):
        p = free_port()
        try:
            for k in range(1, n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + k))
            return p
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports found")


class Node:
    """One node's launcher process (``proc``: the process group leader; ``unshare`` for an isolated node)."""

    def __init__(self, node_rank: int, command: list[str], log_path: Path, isolated: bool) -> None:
        self.node_rank, self.command, self.log_path, self.isolated = node_rank, command, log_path, isolated
        self.proc: subprocess.Popen | None = None
        self.seen_pids: set[int] = set()

    def start(self, env: dict[str, str]) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def members(self) -> list[int]:
        """Live pids of this node's process group (its launcher included)."""
        return group_pids(self.proc.pid) if self.proc is not None else []

    def note(self) -> set[int]:
        self.seen_pids |= set(self.members())
        return self.seen_pids

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL every process of this node at once (a whole-node loss)."""
        for p in self.members():
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class MultiNodeServer:
    """A server over ``nnodes`` nodes of this machine (see the module docstring)."""

    def __init__(self, model_path: str | os.PathLike, tp_size: int, nnodes: int = 2, extra_args=(), *,
                 isolate: bool = True, start_timeout_s: float = 300.0, env: dict[str, str] | None = None):
        if tp_size % nnodes:
            raise ValueError(f"tp_size {tp_size} is not a multiple of nnodes {nnodes}")
        self.model_path, self.tp_size, self.nnodes = str(model_path), tp_size, nnodes
        self.extra_args = list(extra_args)
        self.isolated = isolate and can_isolate()
        self.start_timeout_s = start_timeout_s
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dist_port = free_port()
        self.node_port = free_port_run(3)  # node 0's failover control ports (this and the next two)
        self.nodes: list[Node] = []
        self.removed_shm: list[str] = []

    def _command(self, k: int, port: int) -> list[str]:
        cmd = [sys.executable, "-m", "sgl_elastic.launch_server", "--model-path", self.model_path,
               "--tp-size", str(self.tp_size), "--nnodes", str(self.nnodes), "--node-rank", str(k),
               "--dist-init-addr", f"127.0.0.1:{self.dist_port}", "--host", node_host(k), "--port", str(port),
               "--elastic-node-port", str(self.node_port), *self.extra_args]
        return cmd if k == 0 or not self.isolated else [*isolation_prefix(), *cmd]

    def start(self) -> "MultiNodeServer":
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the process group over loopback only
        for k in range(self.nnodes):
            port = self.port if k == 0 else free_port()
            fd, log = tempfile.mkstemp(prefix=f"sgl-elastic-node{k}-", suffix=".log")
            os.close(fd)
            node = Node(k, self._command(k, port), Path(log), self.isolated and k > 0)
            node.start(env)
            self.nodes.append(node)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.proc.poll() is not None:
                    msg = f"node {node.node_rank} exited with {node.proc.returncode} during start:\n{node.log_tail()}"
                    self.stop()
                    raise ServerStartError(msg)
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    self.note()
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        tails = "\n".join(f"--- node {n.node_rank}:\n{n.log_tail()}" for n in self.nodes)
        self.stop()
        raise ServerStartError(f"not healthy after {self.start_timeout_s:.0f} s:\n{tails}")

    def rejoin(self, k: int) -> Node:
        """Start node ``k`` again with ``--elastic-join`` (after its loss): its ranks join the serving
        ones. The old node's record stays (its pids are checked at ``stop`` too)."""
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        fd, log = tempfile.mkstemp(prefix=f"sgl-elastic-node{k}-join-", suffix=".log")
        os.close(fd)
        cmd = self._command(k, free_port())
        at = cmd.index("sgl_elastic.launch_server") + 1
        node = Node(k, [*cmd[:at], "--elastic-join", *cmd[at:]], Path(log), self.isolated and k > 0)
        node.start(env)
        self.nodes.append(node)
        return node

    def note(self) -> set[int]:
        """Every process of every node now (checked after ``stop``)."""
        return set().union(*(n.note() for n in self.nodes)) if self.nodes else set()

    def stop(self, timeout_s: float = 30.0) -> list[int | None]:
        """Node 0 by SIGINT, then the others (they end once rank 0 stops them), SIGKILL of what is left."""
        self.note()
        node0_shm = shm_inodes_of(self.nodes[0].members()) if self.nodes else set()
        for node in self.nodes[:1]:
            if node.proc.poll() is None:
                try:
                    os.kill(node.proc.pid, signal.SIGINT)
                    node.proc.wait(timeout=timeout_s)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
        deadline = time.monotonic() + 15.0
        while any(n.members() for n in self.nodes) and time.monotonic() < deadline:
            time.sleep(0.2)
        for node in self.nodes:
            node.kill()
        codes = []
        for node in self.nodes:
            try:
                codes.append(node.proc.wait(timeout=10))
            except subprocess.TimeoutExpired:
                codes.append(None)
        self.removed_shm = remove_leftover_shm(node0_shm)
        return codes

    def __enter__(self) -> "MultiNodeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
