"""Pieces shared by the failover benchmarks (``failover_bench.py``, ``moe_failover.py``).

Scripts in ``bench/`` import this as ``from _common import ...`` (the script's folder is on
``sys.path`` when it is run as ``python bench/<script>.py``).
"""

from __future__ import annotations

import psutil
import requests

from sgl_elastic.testing.server import ServerProcess

TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FLAGS = ["--dtype", "float32", "--elastic-admin-token", TOKEN]
IN_TRANSIT_S = 0.05  # outputs arriving this soon after the kill left the scheduler before it


def rank_pid(srv: ServerProcess, rank: int, *, via_admin: bool) -> int:
    """Pid of TP rank ``rank``'s scheduler process: from ``/elastic/status`` on a server with the
    elastic controller (``via_admin``), else the child process titled ``sglang::scheduler_TP<rank>``."""
    if via_admin:
        s = requests.get(srv.url + "/elastic/status", headers=AUTH, timeout=30).json()
        return next(r["pid"] for r in s["ranks"] if r["rank"] == rank)
    return next(c.pid for c in psutil.Process(srv.proc.pid).children(recursive=True)
                if c.name().endswith(f"scheduler_TP{rank}"))
