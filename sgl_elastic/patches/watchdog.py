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

    if controller().armed:  # in-place failover: the controller's detector handles deaths (and fallback);
        return False        # once it is closed, the server is shutting down: nothing to restart
    sched = [i for i, n in enumerate(self._names) if n.startswith("scheduler_")]
    if sv.state is SupervisorState.RESTARTING:
        return False
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
