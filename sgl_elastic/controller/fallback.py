"""The fallback when in-place recovery fails: restart every scheduler from the daemon; state failed.

``_fallback`` restarts every scheduler at the layout the daemon holds (requests in flight end with a
503); ``_unstick`` fails a recovery an error left half-way (neither serving nor failed) and falls
back; when the fallback fails too, ``_fail_all`` ends every request with a 503 and the server.
"""

from __future__ import annotations

import os
import time

from sgl_elastic.controller import faults, wire
from sgl_elastic.controller.phases import Outcome, Phase, Recovery, log
from sgl_elastic.controller.procs import set_omp_bind

FAILED_MSG = ("sgl-elastic: a recovery failed and its fallback restart failed too; the server cannot serve"
              " until it is restarted (see /elastic/status)")


def sigquit_self() -> None:
    """SIGQUIT to this (the main) process: SGLang's tear-down, as when a scheduler dies."""
    import signal

    os.kill(os.getpid(), signal.SIGQUIT)


class Fallback:
    """Mixed into ``FailoverController``."""

    def _fail_all(self, msg: str) -> None:
        """The server cannot serve any more: every request it holds ends now with a 503 (new ones
        are refused at dispatch, ``patches.tokenizer_manager``) and is counted errored; then SGLang's
        tear-down ends the server (SIGQUIT to itself, as a dead scheduler would send; the handler
        gives the 503s and the probes' "failed" a short grace first)."""
        from sgl_elastic.controller.accounting import live_rids
        from sgl_elastic.controller.supervisor import supervisor

        n = supervisor().fail_requests(None, msg, self.tokenizer)
        live = live_rids(self.tokenizer) if self.tokenizer is not None else set()
        self.accounts.ended_elsewhere(live or set(), msg)
        log(f"{n} request(s) in flight ended with a 503: the server cannot serve")
        self.end_server()

    def _unstick(self, e: Exception) -> None:
        """After an error escaped a recovery: a recovery left half-way (neither serving nor failed)
        would hold every request forever, so it fails now and falls back to restarting every scheduler
        (the requests in flight get an error; later ones are served)."""
        if self.phase in (Phase.SERVING, Phase.FAILED) or not self.enabled:
            return
        rec = self.recoveries[-1] if self.recoveries else None
        if rec is None:
            return
        rec.end(Outcome.FAILED, f"{type(e).__name__}: {e}")
        self.falling_back = True
        self._to(rec, Phase.FAILED, rec.outcome)
        self.metrics.recovery("failed", rec.phases_s, 0.0, 0)
        for pid in list(self._hello_ids):
            try:
                self._sock.send_multipart([self._hello_ids[pid], wire.encode(wire.Retire(epoch=self.epoch,
                                                                                         reason=str(e)))])
            except Exception:  # noqa: BLE001 - a rank gone: nothing to tell
                pass
        try:
            self._fallback(rec)
        except Exception as e2:  # noqa: BLE001 - reported in the status; the server stays FAILED
            log(f"ERROR: the fallback after a stuck recovery failed: {type(e2).__name__}: {e2}")

    def _fallback(self, rec: Recovery, reload=None) -> None:
        """The in-place path failed: restart every scheduler from the daemon, at the layout it holds now.

        That is the layout the ranks served before this recovery (it failed before the migration),
        or the new one with fewer (or, for a scale-up, more) ranks (it failed after). Every current
        rank process is killed (``self.ranks``, which after earlier recoveries differ from the
        supervisor's launch record, and a scale-up's new process), requests in flight end with a
        503 (``Supervisor.restart``), and SGLang starts ``layout.tp_size`` schedulers with that
        layout; they attach to the daemon as the first launch's did. The HTTP server, tokenizer
        manager and detokenizer stay up: the new rank 0 binds rank 0's sockets again. The new
        processes are watched like the first launch's (a later failure recovers in place).

        ``reload`` (the plan's new layout): the recovery failed inside the migration, so what the
        daemon holds is in doubt (a failed ApplyMigration keeps the old shards, but one that timed
        out may still be running). The simplest correct thing: the path ``_migrate`` takes for a
        dead daemon. The daemon is replaced by one that loads the survivors' layout from the
        checkpoint (every byte read again). The same is tried once when the restart from the
        daemon as it is fails (the schedulers could not start from its memory).
        """
        from sgl_elastic.controller.drain import stopping
        from sgl_elastic.controller.supervisor import supervisor

        if stopping():  # the server is shutting down: a restart would only race its tear-down
            log("the server is shutting down: no fallback restart")
            self.enabled = False
            rec.fallback = "skipped: shutting down"
            return
        t0 = time.monotonic()
        self.falling_back = True
        rec.fallback = "running"
        try:
            if self.hub is not None:
                for p in self.ranks:  # their processes wait for orders that will not come
                    if not self.is_local(p):
                        p.kill()
                raise RuntimeError("no fallback restart over several nodes: SGLang cannot restart the"
                                   " schedulers of one node into the others' process group")
            if faults.injected("fallback"):
                raise RuntimeError(f"{faults.ENV_TEST_FAIL}=fallback: injected failure of the fallback restart (tests only)")
            if reload is not None:
                log("the recovery failed inside the migration: replacing the state daemon with one that loads the"
                     f" survivors' layout (tp {reload.tp_size}) from the checkpoint")
                self.daemon.stop()
                self.daemon.layout = reload
                self.daemon.ensure()
            layout = self.daemon.layout
            tp = layout.tp_size
            with self.lock:
                old = [*self.ranks, *self._joiners]
            self._on_new_layout(layout)  # SGLE_LAYOUT of the processes SGLang spawns next
            bind = self._omp_bind(tp)
            set_omp_bind(bind)
            log(f"falling back to restarting every scheduler from the daemon, at tp {tp}")
            why, again = f"in-place failover {rec.outcome}", ""
            try:
                procs = supervisor().restart(why, procs=old, tp_size=tp)
            except Exception as e:  # noqa: BLE001 - once more, below
                if reload is not None:  # the daemon is new already
                    raise
                # what the schedulers could not start from may be the daemon's memory (a migration
                # that left it wrong): once more, from a new daemon that reads the checkpoint again
                again = f"{type(e).__name__}: {e}"
                log(f"ERROR: the fallback restart failed ({again}); once more, with a new state daemon that loads"
                     f" tp {tp} from the checkpoint")
                self.daemon.stop()
                self.daemon.ensure()
                procs = supervisor().restart(f"{why}; again with a new daemon", procs=old, tp_size=tp)
        except Exception as e:  # noqa: BLE001 - reported in /elastic/status; the server stays FAILED
            rec.fallback = f"failed: {type(e).__name__}: {e}"
            rec.note(f"fallback restart failed: {type(e).__name__}: {e}")
            log(f"ERROR: the fallback restart failed ({type(e).__name__}: {e}); the server cannot serve until it"
                 " is restarted (see /elastic/status)")
            self.falling_back = False
            self._fail_all(FAILED_MSG)
            return
        try:  # still falling back until SERVING: a SIGQUIT of a process the restart killed is part of it
            with self.lock:
                self.layout = layout
                self.departed = set()
                self._joiners = []
                self._hello_ids = {}
            self.watch(procs)  # as the engine hook does for the first launch's schedulers
            rec.fallback = "ok" + (f" (with a new daemon; the first restart failed: {again})" if again else "")
            rec.note(f"fallback restart at tp {tp} done")
            rec.tp_after = tp
            rec.widths_after = list(layout.family("attn").widths)
            rec.recovery_s = round(time.monotonic() - rec.t_fault, 4)
            self._pending_tfs = rec
            self._to(rec, Phase.SERVING, f"fallback restart at tp {tp} done in {time.monotonic() - t0:.2f} s;"
                     f" epoch {self.epoch}, widths {rec.widths_after}")
            self._after_serving()
        finally:
            self.falling_back = False
