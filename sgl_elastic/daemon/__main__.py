"""``python -m sgl_elastic.daemon``: run one state daemon (see ``server.py`` for the contract).

    python -m sgl_elastic.daemon [--run-dir DIR] [--tcp] [--backend shm|cuda]
                                 [--checkpoint DIR --layout-file FILE]

Prints nothing on stdout; the run dir's ``daemon.json`` appears when it serves. The token is in
``<run dir>/token`` (0600). Stop it with a Shutdown request, SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from sgl_elastic.daemon.server import Daemon, DaemonConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sgl_elastic.daemon", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", help="private directory (0700) for socket, token, daemon.json; default: a new temp dir")
    p.add_argument("--tcp", action="store_true", help="serve tcp://127.0.0.1:<free port> instead of ipc")
    p.add_argument("--backend", default="shm", choices=("shm", "cuda"))
    p.add_argument("--checkpoint", help="HF checkpoint directory to load at start (with --layout-file)")
    p.add_argument("--layout-file", help="ElasticLayout.to_bytes() of the layout to load")
    p.add_argument("--ranks", help="comma-separated ranks this node holds (default: all)")
    p.add_argument("--parent-pid", type=int, help="exit (freeing every segment) when this process is gone:"
                   " the server that started it")
    p.add_argument("--in-place", default="remap", choices=("remap", "move", "off"),
                   help="how a migration reuses a survivor's segment (CPU): remap its pages (default), move its"
                        " bytes inside it, or copy into a new one")
    p.add_argument("--node-host", default="127.0.0.1",
                   help="this node's address: where the transfer endpoint for peer daemons listens (multi-node)")
    p.add_argument("--link-gbps", type=float, default=0.0,
                   help="cap on reads from peer daemons in GB/s (benchmarks: a slower inter-node link; 0: none)")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    layout_bytes = None
    if a.layout_file:
        with open(a.layout_file, "rb") as f:
            layout_bytes = f.read()
    try:
        config = DaemonConfig(run_dir=a.run_dir, tcp=a.tcp, backend=a.backend, checkpoint=a.checkpoint,
                              layout_bytes=layout_bytes,
                              ranks=[int(r) for r in a.ranks.split(",")] if a.ranks else None,
                              in_place=a.in_place, node_host=a.node_host, link_gbps=a.link_gbps)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    daemon = Daemon(config)
    if a.parent_pid:
        _watch_parent(a.parent_pid)
    return daemon.run()


def _watch_parent(parent_pid: int) -> None:
    """SIGTERM this process (a clean stop) once ``parent_pid`` is gone (checked every 0.5 s: a child is
    re-parented when its parent dies). Not the parent-death signal: that follows the parent *thread*
    that started the child, and a server may start its daemon from a thread that ends."""
    import signal
    import threading

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        logging.getLogger("sgl_elastic.daemon").warning("the server (pid %d) is gone: stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="sgle-parent-watch", daemon=True).start()


if __name__ == "__main__":
    code = main()
    # Every segment is freed and the socket closed by now: exit without the interpreter's finalization
    # (atexit hooks of imported libraries), which must not keep a stopped daemon alive.
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)
