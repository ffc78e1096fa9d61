"""Patch of SGLang's ``utils/watchdog.py``: scheduler restart with the state daemon (main process).

Pass-through unless ``launch_server --elastic-daemon`` enabled the supervisor.
"""

from __future__ import annotations

from sgl_elastic.controller.supervisor import SupervisorState, _log, supervisor


def watchdog_check_processes(original, self):
    """SubprocessWatchdog._check_processes: a dead scheduler means restart, not tear-down."""
    sv = supervisor()
    if not sv.enabled or sv._launch is None:
        return original(self)
    from sgl_elastic.controller.failover import controller

    if controller().armed:  # in-place failover: the controller's detector handles the schedulers' deaths
        return _check_helpers(self)  # (and fallback); a helper's (the detokenizer) is SGLang's tear-down
    sched = [i for i, n in enumerate(self._names) if n.startswith("scheduler_")]
    if sv.state is SupervisorState.RESTARTING:
        return False
    if _check_helpers(self):
        return True
    if any(not self._processes[i].is_alive() for i in sched):
        dead = [self._processes[i].pid for i in sched if not self._processes[i].is_alive()]
        try:
            procs = sv.restart(f"scheduler pid(s) {dead} died")
        except Exception as e:  # noqa: BLE001 - cannot restart: SGLang's own tear-down
            _log(f"ERROR: restart failed: {type(e).__name__}: {e}; shutting the server down")
            return original(self)
        for i, p in zip(sched, procs):
            self._processes[i] = p
        return False
    return original(self)


def _check_helpers(self) -> bool:
    """SGLang's own check, on the processes that are not schedulers (no failover replaces them)."""
    import os
    import signal

    from sgl_elastic.controller.failover import controller

    for proc, name in zip(self._processes, self._names):
        if name.startswith("scheduler_") or proc.is_alive() or proc.exitcode == 0:
            continue
        from sgl_elastic.controller.drain import stopping

        if stopping() or (not controller().enabled and controller().armed):
            return False  # the server is shutting down (Ctrl-C ends the detokenizer too): not a failure
        _log(f"ERROR: {name} (pid {proc.pid}) exited with code {proc.exitcode}: no failover replaces it;"
             " SIGQUIT for SGLang's tear-down")
        os.kill(os.getpid(), signal.SIGQUIT)
        return True
    return False
