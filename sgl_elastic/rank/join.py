"""A scheduler process that joins the serving group (scale-up, ``POST /elastic/add_rank``).

Spawned by the failover controller (main process) with the server's launch arguments. It imports
SGLang and the project's patches, says ``RankHello`` to the controller and waits for its orders; a
warm standby (``--elastic-standby``) is such a process spawned ahead of time, so a scale-up does not
pay the import. Given ``Reconfigure``, it builds its scheduler exactly as a survivor rebuilds
(``rank.failover.failover``'s second half: new group with the others, parameters bound to the daemon's
shards, a new KV pool) and serves; from then on it is a rank like any other (it fails over in place
too). It dies with the server (parent-death signal).
"""

from __future__ import annotations

import faulthandler
import os
import time

STANDBY_WAIT_S = 7 * 24 * 3600.0  # a standby waits for orders as long as the server lives (parent-death signal)


def run_joiner(server_args, port_args, gpu_id: int, standby: bool) -> None:
    from sglang.srt.plugins import load_plugins
    from sglang.srt.utils import kill_itself_when_parent_died

    kill_itself_when_parent_died()
    faulthandler.enable()
    try:
        import setproctitle

        setproctitle.setproctitle("sglang::scheduler_standby" if standby else "sglang::scheduler_joiner")
    except ImportError:
        pass
    load_plugins()  # the project's patches, as in every scheduler process
    from sgl_elastic.rank import failover, signals

    if not failover.enabled():
        raise SystemExit("sgl-elastic joiner: no failover controller endpoint in the environment")
    signals.start_heartbeat()
    reason = "standby, ready to join" if standby else "joining (scale-up)"
    failover.log(f"new rank process up ({reason}); asking the controller for orders")
    sched = failover.join(server_args, port_args, gpu_id, reason, STANDBY_WAIT_S if standby else 120.0, time.perf_counter())
    from sglang.srt.runtime_context import get_parallel

    failover.log(f"joined as rank {get_parallel().tp_rank} of {get_parallel().tp_size} (pid {os.getpid()})")
    sched.run_event_loop()
