"""Patches of SGLang's process management (main process): scheduler restart with the daemon.

Pass-through unless ``launch_server --elastic-daemon`` enabled the supervisor.
"""

from __future__ import annotations

from sgl_elastic.controller.supervisor import supervisor


def launch_scheduler_processes(original, cls, server_args, port_args, run_scheduler_process_func, **kwargs):
    """Engine._launch_scheduler_processes: record how the schedulers were started (to do it again)."""
    result, procs = original(cls, server_args, port_args, run_scheduler_process_func, **kwargs)
    sv = supervisor()
    if sv.enabled:
        sv.record_launch(original, cls, server_args, port_args, run_scheduler_process_func, kwargs, result, procs)
    from sgl_elastic.controller.failover import controller

    fc = controller()
    if fc.enabled:
        fc.watch(procs)
    from sgl_elastic.controller import nodes

    if nodes.agent() is not None:  # a node >= 1: its ranks are reported to node 0's controller
        from sgl_elastic.controller.daemon import node_ranks

        nodes.agent().watch(procs, node_ranks(server_args))
    return result, procs


def launch_subprocesses(original, cls, *args, **kwargs):
    """Engine._launch_subprocesses: keep the tokenizer manager (to fail requests in flight)."""
    out = original(cls, *args, **kwargs)
    sv = supervisor()
    if sv.enabled and out and out[0] is not None:
        sv.tokenizer_manager = out[0]
        sv.note_shm()
    return out
