"""Scheduler restart inside a running server (main process; ``--elastic-daemon`` only).

SGLang 0.5.23 has no respawn: when one scheduler (TP rank) dies, its watchdog and the surviving
ranks' SIGQUIT tear the whole server down. With the state daemon holding the weights, KV and
prefix index, the cheaper cure is to restart the schedulers and keep the HTTP server, tokenizer
and detokenizer up:

1. a scheduler is seen dead (SGLang's ``SubprocessWatchdog``, or a SIGQUIT from a surviving rank);
2. every old scheduler is killed (their collectives are broken; rank processes are disposable,
   the state is in the daemon) and the shared-memory files they mapped are removed;
3. requests in flight get an explicit error (HTTP 503, "retry"): their partial KV is gone;
4. the schedulers are started again through SGLang's own ``_launch_scheduler_processes`` with the
   same arguments (a fresh distributed-init port); they attach weights, KV and prefix index from
   the daemon (``rank.daemon_link``) and read nothing from the checkpoint;
5. if the daemon itself is gone, a new one is started first, which reads the checkpoint again.

Without in-place failover every rank restarts at the launch's tp size. With it, the restart is the
controller's fallback when an in-place recovery fails (``restart(..., procs=, tp_size=)``): every
current rank process is killed and the schedulers start at the tp size of the layout the daemon
holds now (``server_args_at``; this process's parallel widths are overridden for the launch only).

State (one Enum, one ``transition()`` that rejects illegal moves and logs each one)::

    DISABLED -> WATCHING <-> RESTARTING -> FAILED
                                 ^            |
                                 +------------+   (a later restart attempt)

DISABLED: no ``--elastic-daemon`` (every hook passes through); WATCHING: schedulers recorded or
about to be; RESTARTING: a restart is under way (SIGQUITs of surviving ranks are expected);
FAILED: a restart failed and SGLang's own tear-down goes ahead.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import signal
import threading
import time

from sgl_elastic.controller.procs import free_port, remove_leftover_shm, shm_inodes_of

__all__ = ["Supervisor", "SupervisorState", "IllegalTransition", "transition", "supervisor", "server_args_at"]

logger = logging.getLogger("sgl_elastic.controller")


class SupervisorState(enum.Enum):
    DISABLED = "disabled"
    WATCHING = "watching"
    RESTARTING = "restarting"
    FAILED = "failed"


_LEGAL: dict[SupervisorState, frozenset[SupervisorState]] = {
    SupervisorState.DISABLED: frozenset({SupervisorState.WATCHING}),
    SupervisorState.WATCHING: frozenset({SupervisorState.RESTARTING}),
    SupervisorState.RESTARTING: frozenset({SupervisorState.WATCHING, SupervisorState.FAILED}),
    SupervisorState.FAILED: frozenset({SupervisorState.RESTARTING}),
}


class IllegalTransition(RuntimeError):
    pass


def transition(current: SupervisorState, target: SupervisorState, reason: str = "") -> SupervisorState:
    """Return ``target`` if ``current -> target`` is legal (logged), else raise ``IllegalTransition``."""
    if target not in _LEGAL[current]:
        allowed = ", ".join(s.name for s in _LEGAL[current]) or "none"
        raise IllegalTransition(
            f"supervisor cannot go {current.name} -> {target.name}{f' ({reason})' if reason else ''};"
            f" from {current.name} it may go to: {allowed}"
        )
    logger.info("supervisor state %s -> %s%s", current.name, target.name, f": {reason}" if reason else "")
    return target


ENV_EP = "SGLE_EXPERT_PARALLEL"  # "1": launched with --ep-size == --tp > 1 (inherited by every rank process)


def server_args_at(old, tp_size: int, **overrides):
    """A fresh, unresolved ServerArgs equal to ``old`` but at ``tp_size`` (resolved records are
    read-only). Experts sharded by rank (``ep_size == tp_size > 1``) stay so: ep_size follows, also
    from tp 1 (ep_size 1 there), when the server was launched with expert parallelism (``ENV_EP``)."""
    from sglang.srt.server_args import ServerArgs, record_fields

    kw = {f.name: getattr(old, f.name) for f in record_fields(ServerArgs) if hasattr(old, f.name)}
    launched_ep = os.environ.get(ENV_EP) == "1"
    if kw.get("ep_size") == kw.get("tp_size") and (int(kw.get("tp_size") or 1) > 1 or launched_ep):
        kw["ep_size"] = tp_size
    kw["tp_size"] = tp_size
    kw.update(overrides)
    return ServerArgs(**kw)


# widths this (the launching) process reads while SGLang starts the schedulers
_LAUNCH_WIDTHS = ("tp_size", "ep_size", "attn_tp_size", "moe_ep_size", "moe_tp_size", "launch_world_size",
                  "max_world_size")


def _launching(server_args):
    """A context in which this process's parallel widths are those of ``server_args`` (resolved
    here, like the launcher's): what SGLang's ``_launch_scheduler_processes`` sizes the launch by.
    The published config of this process (the tokenizer's) is not replaced."""
    from sglang.srt.runtime_context import create_context, get_parallel

    want = create_context(server_args, role="tokenizer").parallel
    par = get_parallel()
    diff = {n: getattr(want, n) for n in _LAUNCH_WIDTHS if getattr(want, n) != getattr(par, n)}
    return par.override(**diff) if diff else contextlib.nullcontext()


def _log(msg: str) -> None:
    import sys

    print(f"[sgl-elastic supervisor pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


class Supervisor:
    def __init__(self) -> None:
        self.state = SupervisorState.DISABLED
        self.lock = threading.RLock()
        self.restarts = 0
        self.last: dict = {}
        self._launch = None  # (original, cls, server_args, port_args, func, kwargs)
        self.procs: list = []  # current scheduler processes
        self.init_result = None  # first SchedulerInitResult (its all_child_pids is kept current)
        self.tokenizer_manager = None
        self.ensure_daemon = None  # callable(): make sure a daemon holds the model (launcher)
        self.on_teardown = None  # callable(): SGLang is about to kill the whole process tree
        self._shm_inodes: set[int] = set()
        self.restart_done_at = float("-inf")  # monotonic time the last restart ended

    def sigquit_is_stale(self, grace_s: float = 30.0) -> bool:
        """A SIGQUIT handled within ``grace_s`` after a restart ended was sent by a rank the restart
        replaced: Python runs signal handlers in the main thread only, so one sent while the restart
        ran (possibly in that thread) is handled after it. A scheduler that fails also exits, so a
        real failure of a new one is still seen by the watchdog."""
        return time.monotonic() - self.restart_done_at < grace_s

    def _move(self, target: SupervisorState, reason: str = "") -> None:
        self.state = transition(self.state, target, reason)

    @property
    def enabled(self) -> bool:
        return self.state is not SupervisorState.DISABLED

    def enable(self, ensure_daemon, on_teardown) -> None:
        """Turn the restart path on (``--elastic-daemon``): ``ensure_daemon()`` before each restart,
        ``on_teardown()`` when SGLang is about to kill the whole process tree."""
        self.ensure_daemon, self.on_teardown = ensure_daemon, on_teardown
        if self.state is SupervisorState.DISABLED:
            self._move(SupervisorState.WATCHING, "--elastic-daemon")

    # ---- what the engine hooks record ----------------------------------------------------------
    def record_launch(self, original, cls, server_args, port_args, func, kwargs, result, procs) -> None:
        self._launch = (original, cls, server_args, port_args, func, kwargs)
        self.procs = list(procs or [])
        if self.init_result is None:
            self.init_result = result

    def any_dead(self, wait_s: float = 0.0) -> bool:
        """Whether a scheduler process has ended; with ``wait_s``, wait up to that long for one to
        end (a peer's SIGQUIT can come before the kernel has reaped a SIGKILLed rank: its sockets
        close while its memory is still being torn down)."""
        deadline = time.monotonic() + wait_s
        while True:
            if any(not p.is_alive() for p in self.procs):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def note_shm(self) -> None:
        """Remember the /dev/shm files the schedulers map (to remove what a killed one leaves)."""
        pids = [p.pid for p in self.procs if p.is_alive()]
        self._shm_inodes |= shm_inodes_of(pids)

    def _remove_scheduler_shm(self, old: list) -> list[str]:
        """Unlink SGLang's /dev/shm files that only the killed schedulers used (SGLang leaks them):
        never the daemon's segments (``sgle-*``), never one a live process of this server maps."""
        import psutil

        old_pids = {p.pid for p in old}
        live = [c.pid for c in psutil.Process().children(recursive=True) if c.pid not in old_pids]
        keep = shm_inodes_of([os.getpid(), *live])
        keep |= {e.inode() for e in os.scandir("/dev/shm") if e.name.startswith("sgle-")}
        removed = remove_leftover_shm(self._shm_inodes - keep)
        self._shm_inodes.clear()
        return removed

    # ---- restart ---------------------------------------------------------------------------------
    def restart(self, reason: str, procs: list | None = None, tp_size: int | None = None) -> list:
        """Kill all schedulers, fail requests in flight, start them again; returns the new procs.

        ``procs``: the current rank processes as the failover controller knows them (after in-place
        recoveries they differ from the launch's: dead ranks gone, new ranks joined); killed with
        the recorded ones. ``tp_size``: start that many (the daemon's layout; None: as before).
        """
        import psutil

        with self.lock:
            if self._launch is None:
                raise RuntimeError("no scheduler launch recorded")
            self._move(SupervisorState.RESTARTING, reason)
            t0 = time.monotonic()
            try:
                old = list({p.pid: p for p in [*self.procs, *(procs or [])]}.values())
                _log(f"scheduler failure ({reason}); restarting all {len(old)} scheduler processes ("
                     f"{len([p for p in old if p.is_alive()])} alive), state from the daemon")
                self.procs = old
                self.note_shm()
                for p in old:  # step 2
                    try:
                        for c in psutil.Process(p.pid).children(recursive=True):
                            c.kill()
                    except psutil.Error:
                        pass
                    if p.is_alive():
                        os.kill(p.pid, signal.SIGKILL)
                for p in old:
                    p.join(timeout=10)
                removed = self._remove_scheduler_shm(old)
                failed = self.fail_in_flight()  # step 3
                if self.ensure_daemon is not None:  # step 5
                    self.ensure_daemon()
                original, cls, server_args, port_args, func, kwargs = self._launch
                launching = contextlib.nullcontext()
                if tp_size is not None:
                    if tp_size != int(server_args.tp_size):
                        server_args = server_args_at(server_args, tp_size)
                        server_args.resolve_once()  # here, as the launcher's: the schedulers get it resolved
                        self._launch = (original, cls, server_args, port_args, func, kwargs)
                    # this process's widths are the first launch's (SGLang sizes the launch by them)
                    launching = _launching(server_args)
                port_args.nccl_port = free_port()  # the old store died with rank 0
                t_launch = time.monotonic()
                with launching:
                    result, procs = original(cls, server_args, port_args, func, **kwargs)  # step 4
                self.procs = list(procs or [])
                result.wait_for_ready()
                t_ready = time.monotonic()
                if self.init_result is not None:
                    pids = self.init_result.all_child_pids
                    old_pids = {p.pid for p in old}
                    pids[:] = [q for q in pids if q not in old_pids] + [p.pid for p in self.procs]
                self.note_shm()
                self.restarts += 1
                self.last = {"reason": reason, "kill_to_launch_s": t_launch - t0,
                             "launch_to_ready_s": t_ready - t_launch, "total_s": t_ready - t0,
                             "failed_requests": failed, "shm_removed": removed}
                _log(f"restart {self.restarts} done in {t_ready - t0:.2f} s (schedulers ready"
                     f" {t_ready - t_launch:.2f} s after launch); {failed} requests in flight got an error;"
                     f" new scheduler pids {[p.pid for p in self.procs]}")
            except BaseException as e:
                self._move(SupervisorState.FAILED, f"{type(e).__name__}: {e}")
                raise
            self.restart_done_at = time.monotonic()
            self._move(SupervisorState.WATCHING, f"restart {self.restarts} done")
            return self.procs

    def fail_in_flight(self) -> int:
        """Finish every request the old schedulers held with an explicit 503 error (thread-safe)."""
        return self.fail_requests(None, "sgl-elastic: a TP rank failed and the schedulers restarted; this"
                                        " request was lost, retry it")

    def fail_requests(self, rids, msg: str, tokenizer_manager=None) -> int:
        """Finish the requests ``rids`` (None: all) with an explicit 503 error ``msg`` (thread-safe)."""
        tm = tokenizer_manager or self.tokenizer_manager
        if tm is None or getattr(tm, "event_loop", None) is None:
            return 0
        from sglang.srt.managers.io_struct import AbortReq

        done = threading.Event()
        count = [0]

        def fail_all() -> None:
            try:
                for rid in list(tm.rid_to_state) if rids is None else [r for r in rids if r in tm.rid_to_state]:
                    tm._handle_abort_req(AbortReq(rid=rid, abort_message=msg, finished_reason={
                        "type": "abort", "message": msg, "status_code": 503}))
                    count[0] += 1
            finally:
                done.set()

        tm.event_loop.call_soon_threadsafe(fail_all)
        done.wait(10)
        return count[0]


_supervisor = Supervisor()


def supervisor() -> Supervisor:
    return _supervisor
