"""Patches of SGLang's process management (main process): scheduler restart with the daemon.

Pass-through unless ``launch_server --elastic-daemon`` enabled the supervisor.
"""

from __future__ import annotations

from sgl_elastic.supervisor import _log, supervisor


def launch_scheduler_processes(original, cls, server_args, port_args, run_scheduler_process_func, **kwargs):
    """Engine._launch_scheduler_processes: record how the schedulers were started (to do it again)."""
    result, procs = original(cls, server_args, port_args, run_scheduler_process_func, **kwargs)
    sv = supervisor()
    if sv.enabled:
        sv.record_launch(original, cls, server_args, port_args, run_scheduler_process_func, kwargs, result, procs)
    return result, procs


def launch_subprocesses(original, cls, *args, **kwargs):
    """Engine._launch_subprocesses: keep the tokenizer manager (to fail requests in flight)."""
    out = original(cls, *args, **kwargs)
    sv = supervisor()
    if sv.enabled and out and out[0] is not None:
        sv.tokenizer_manager = out[0]
        sv.note_shm()
    return out


def watchdog_check_processes(original, self):
    """SubprocessWatchdog._check_processes: a dead scheduler means restart, not tear-down."""
    sv = supervisor()
    if not sv.enabled or sv._launch is None:
        return original(self)
    sched = [i for i, n in enumerate(self._names) if n.startswith("scheduler_")]
    if sv.restarting:
        return False
    if any(not self._processes[i].is_alive() for i in sched):
        dead = [self._processes[i].pid for i in sched if not self._processes[i].is_alive()]
        try:
            procs = sv.restart(f"scheduler pid(s) {dead} died")
        except Exception as e:  # noqa: BLE001 - cannot restart: SGLang's own tear-down
            _log(f"ERROR: restart failed: {type(e).__name__}: {e}; shutting the server down")
            sv.failed = True
            return original(self)
        for i, p in zip(sched, procs):
            self._processes[i] = p
        return False
    return original(self)


def running_phase_sigquit_handler(original, self, signum=None, frame=None):
    """SignalHandler.running_phase_sigquit_handler: a surviving rank's SIGQUIT after a peer died is
    part of the failure the supervisor handles; anything else tears down as before."""
    sv = supervisor()
    if sv.enabled and sv._launch is not None and not sv.failed and (sv.restarting or sv.any_dead()):
        _log("SIGQUIT from a scheduler after a rank failure: handled by the restart")
        return None
    if sv.enabled and sv.on_teardown is not None:  # SGLang kills the whole tree next: free the daemon first
        try:
            sv.on_teardown()
        except Exception as e:  # noqa: BLE001 - the tear-down must go on
            _log(f"stopping the daemon before the tear-down failed: {e}")
    return original(self, signum, frame)


__all__ = ["launch_scheduler_processes", "launch_subprocesses", "watchdog_check_processes",
           "running_phase_sigquit_handler"]
