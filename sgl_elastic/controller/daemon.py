"""The state daemon of one ``launch_server --elastic-daemon`` (main process): start, load, hand over, stop.

- start: a daemon in a private run dir, loading the checkpoint under the server's layout (each
  byte read once, progress on stderr); ``SGLE_DAEMON_DIR`` tells the scheduler processes where
  it is (the token stays in the run dir's 0600 file);
- the supervisor calls ``ensure()`` before restarting schedulers: a dead daemon is replaced by a
  new instance, which reads the checkpoint again (its memory died with it);
- stop: Shutdown (segments freed), then SIGTERM / SIGKILL, then a sweep.
"""

from __future__ import annotations

import os
import sys
import time

from sgl_elastic.daemon.client import DaemonError, DaemonUnavailable
from sgl_elastic.daemon.launch import ENV_DIR, DaemonProcess

__all__ = ["ServerDaemon", "node_ranks"]


def node_ranks(server_args) -> list[int]:
    """The TP ranks this node runs under SGLang's multi-node launch (``--nnodes``, ``--node-rank``;
    pipeline parallelism 1): ``tp_size // nnodes`` consecutive ranks from ``node_rank`` times that,
    as ``engine._calculate_rank_ranges`` gives them."""
    tp = int(server_args.tp_size)
    nnodes = int(getattr(server_args, "nnodes", 1) or 1)
    node = int(getattr(server_args, "node_rank", 0) or 0)
    if nnodes <= 1:
        return list(range(tp))
    if tp % nnodes:
        raise ValueError(f"--tp {tp} over --nnodes {nnodes}: SGLang runs tp/nnodes ranks per node; give a multiple")
    per = tp // nnodes
    return list(range(node * per, (node + 1) * per))


def _log(msg: str) -> None:
    print(f"[sgl-elastic daemon-manager] {msg}", file=sys.stderr, flush=True)


class ServerDaemon:
    def __init__(self, checkpoint: str, layout, backend: str, in_place: str = "remap",
                 ranks: list[int] | None = None, node_host: str | None = None, link_gbps: float = 0.0,
                 tcp: bool = False) -> None:
        self.checkpoint, self.layout, self.backend, self.in_place = checkpoint, layout, backend, in_place
        self.ranks = ranks  # the TP ranks of this node (None: every rank: one node)
        # several nodes: this node's address (the transfer endpoint; with tcp, the control socket too:
        # node 0's controller drives it over the network) and the cap on reads from other nodes
        self.node_host, self.link_gbps, self.tcp = node_host, link_gbps, tcp
        self.proc: DaemonProcess | None = None

    @classmethod
    def start_for(cls, layout, server_args, install_hooks=None, in_place: str = "remap", *,
                  node_host: str | None = None, link_gbps: float = 0.0, tcp: bool = False) -> "ServerDaemon":
        """Start a daemon holding ``layout`` (``patches.daemon_layout``) of ``server_args``' model,
        call ``install_hooks()`` (the patches' installer), and arm the supervisor with it.

        With ``--nnodes N`` the daemon holds this node's TP ranks only (``node_ranks``), and the
        supervisor's restart stays off: it would restart this node's schedulers alone, which cannot
        rejoin the other nodes' process group."""
        from sgl_elastic.controller.supervisor import supervisor

        on_cuda = getattr(server_args, "device", "cpu") not in ("cpu", None)
        ranks = node_ranks(server_args)
        d = cls(os.path.abspath(server_args.model_path), layout, "cuda" if on_cuda else "shm", in_place,
                ranks=ranks if int(getattr(server_args, "nnodes", 1) or 1) > 1 else None,
                node_host=node_host, link_gbps=link_gbps, tcp=tcp)
        d.start()
        if install_hooks is not None:
            install_hooks()  # the daemon hooks (already installed at tp >= 2 by activate)
        if d.ranks is None:
            supervisor().enable(ensure_daemon=d.ensure, on_teardown=d.stop)
        return d

    def start(self, load: bool = True) -> None:
        """Start the daemon and (``load``) load this node's ranks; without, it holds nothing (a node
        that joins a serving server: node 0's controller loads it with the layout of the day)."""
        t0 = time.perf_counter()
        self.proc = DaemonProcess.start(backend=self.backend, exit_with_parent=True, in_place=self.in_place,
                                        tcp=self.tcp, node_host=self.node_host, link_gbps=self.link_gbps)
        if not load:
            os.environ[ENV_DIR] = self.proc.run_dir
            _log(f"daemon pid {self.proc.pid} started in {self.proc.run_dir}, empty (it holds ranks once they join)")
            return
        which = f"{self.layout.tp_size} rank(s)" if self.ranks is None else \
            f"this node's rank(s) {self.ranks} of {self.layout.tp_size}"
        _log(f"daemon pid {self.proc.pid} started in {self.proc.run_dir}; loading {self.checkpoint} for {which}")
        with self.proc.client() as c:
            try:
                c.load_model(self.checkpoint, self.layout, ranks=self.ranks)
                s = self._wait(c)
            except (DaemonError, DaemonUnavailable) as e:
                self.stop()
                raise RuntimeError(f"the daemon could not load {self.checkpoint}: {e}") from e
        os.environ[ENV_DIR] = self.proc.run_dir
        _log(f"daemon instance {s.instance} holds the model: {s.checkpoint_bytes_read / 1e6:.1f} MB read from the"
             f" checkpoint in {time.perf_counter() - t0:.2f} s")

    def _wait(self, c):
        """wait_ready with a progress line every 5 s (loads of large models take a while)."""
        deadline = time.monotonic() + 3600
        while True:
            try:
                return c.wait_ready(timeout=5.0)
            except DaemonUnavailable:
                if not c.daemon_alive() or time.monotonic() > deadline:
                    raise
                _log(f"loading... {c.stats().checkpoint_bytes_read / 1e6:.1f} MB read so far")

    def alive(self) -> bool:
        if self.proc is None or self.proc.proc.poll() is not None:
            return False
        try:
            with self.proc.client(timeout=2.0) as c:
                return c.stats().state == "ready"
        except (DaemonUnavailable, DaemonError, OSError):
            return False

    def ensure(self) -> None:
        """Called by the supervisor before restarting schedulers: replace a dead daemon."""
        if self.alive():
            return
        _log("ERROR: the state daemon is gone; starting a new instance, which reads the checkpoint again")
        if self.proc is not None:
            self.proc.stop(timeout=2.0)
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
