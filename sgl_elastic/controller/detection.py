"""Detection (the controller's own thread): rank deaths, hung ranks, ranks that left on their own error.

- A thread waits on the scheduler processes' sentinels (``multiprocessing.connection.wait``): a
  SIGKILL is seen within milliseconds, not at SGLang's 1 s watchdog poll. The same wait wakes for
  the admin API's commands (``controller.commands``), which this thread carries out.
- A hung rank (alive but not running: SIGSTOP, a frozen process) is found by its heartbeat: a thread
  in every scheduler process touches a file every ``hung_timeout_s / 5`` s
  (``rank.signals.start_heartbeat``); one that is ``hung_timeout_s`` old gets the rank fenced
  (SIGKILL), then recovered from like a dead one. Only silence counts: a slow rank keeps beating
  (the thread does not wait on the event loop) and is never fenced. (Not covered: a process whose
  threads run while its device is stuck in a kernel; on GPU that needs a progress check.)
- A serving rank that says hello while no rank died left its group on its own error
  (``_check_self_reported``).
"""

from __future__ import annotations

import multiprocessing.connection
import os
import time

import msgspec

from sgl_elastic.controller import wire
from sgl_elastic.controller.commands import Stop
from sgl_elastic.controller.phases import Outcome, Phase, Recovery, log
from sgl_elastic.controller.procs import sigkill

SHM_NOTE_S = 5.0  # while serving: how often the /dev/shm files each rank maps are noted (to reap a dead one's)
SERVING_POLL_S = 0.2  # while serving: how often the control socket is checked for a rank that left on its own
SELF_REPORT_SETTLE_S = 0.5  # after such a hello: how long its peers' hellos (or a death) are waited for


class Detection:
    """Mixed into ``FailoverController``: the detector's loop and the checks it runs while serving."""

    def silent_s(self, pid: int) -> float:
        """Seconds since ``pid``'s last heartbeat (0.0: no heartbeat yet, or heartbeats off)."""
        if self.hung_timeout_s <= 0 or self._dir is None:
            return 0.0
        try:
            return max(0.0, time.time() - os.stat(wire.heartbeat_path(self._addr, pid)).st_mtime)
        except OSError:
            return 0.0

    def _hung(self, pids) -> list[int]:
        return [pid for pid in pids if self.hung_timeout_s > 0 and self.silent_s(pid) > self.hung_timeout_s]

    def _run(self) -> None:
        while self.enabled:
            with self.lock:
                live = [p for p in self.ranks if p.pid not in self.departed]
            sentinels = {p.sentinel: p for p in live}
            poll = min(SERVING_POLL_S, self.hung_timeout_s / 5) if self.hung_timeout_s > 0 else SERVING_POLL_S
            wake = self.commands.waitable
            ready = multiprocessing.connection.wait(list(sentinels) + [wake], timeout=poll)
            if wake in ready:
                cmd = self.commands.take()
                if isinstance(cmd, Stop):
                    return
                if cmd is not None:
                    try:
                        if self.enabled:
                            self._carry_out(cmd)
                    finally:
                        self.commands.done(cmd)
                    continue
            dead = [sentinels[s] for s in ready if s in sentinels]
            if not dead and self.enabled and self.phase is Phase.SERVING:
                self._fence_silent(live)
                self._keep_standby(live)
                if time.monotonic() - self._shm_noted_at > SHM_NOTE_S:
                    self._note_shm(live)
                if self.eplb_interval_s and time.monotonic() - self._eplb_t >= self.eplb_interval_s:
                    self._eplb_t = time.monotonic()
                    try:
                        self._rebalance(forced=False)
                    except Exception as e:  # noqa: BLE001 - logged; the server serves at its placement
                        log(f"ERROR: expert rebalance failed: {type(e).__name__}: {e}")
                        self._unstick(e)
                try:
                    self._check_self_reported(live)
                except Exception as e:  # noqa: BLE001 - logged; the fallback already ran or is impossible
                    log(f"ERROR: recovery failed: {type(e).__name__}: {e}")
                continue
            if dead and self.enabled:
                from sgl_elastic.controller.drain import stopping

                time.sleep(0.05)  # Ctrl-C reaches the ranks and the main process together
                if stopping():
                    log("the server is shutting down (SIGTERM or Ctrl-C): the ranks' exits are not failures")
                    self.enabled = False
                    return
                time.sleep(0.1)  # a shutdown kills every rank at once: tell it from a failure
                if not self.enabled or not any(p.is_alive() for p in live if p not in dead):
                    log("every rank is gone (server shutting down, or a total failure): no recovery")
                    self.enabled = False
                    return
                # Ranks that died together (a node's devices, a kill of several) are recovered in one
                # step: the sentinels that fired since the first one join it. Otherwise the second
                # death surfaces only at the check-in, and the first recovery's migration is wasted.
                dead += [p for p in live if p not in dead and not p.is_alive()]
                if not self.all_joined():
                    log("a rank died before every node had joined: no recovery (the server cannot start)")
                    self.enabled = False
                    return
                try:
                    self._recover(dead)
                except Exception as e:  # noqa: BLE001 - logged; the fallback already ran or is impossible
                    log(f"ERROR: recovery failed: {type(e).__name__}: {e}")
                    self._unstick(e)

    def _fence_silent(self, live: list) -> None:
        """SIGKILL every rank whose heartbeat is older than the hung timeout (the sentinel then fires)."""

        for pid in self._hung(p.pid for p in live):
            log(f"rank pid {pid} silent for {self.silent_s(pid):.1f} s (> --elastic-hung-timeout"
                 f" {self.hung_timeout_s:g} s): hung; fencing it (SIGKILL)")
            self.hung_fenced.append(pid)
            sigkill(pid)

    def _check_self_reported(self, live: list) -> None:
        """A serving rank that says hello while no rank died left its group on its own error (an
        exception in its forward, a CUDA error: a device that fails without its process dying).

        Its peers follow within moments (it shut its sockets; their collectives fail). After a short
        settle: if a rank died meanwhile, the death path recovers (the hellos are kept for it). The
        ranks whose error is their own (not a peer's failure) are fenced (SIGKILL) like a hung one,
        and the next turn of the loop recovers from their deaths on the others. If every rank failed
        on its own (the same input broke them all: resuming it would break the survivors too), or
        none can be blamed, every scheduler is restarted from the daemon (the fallback: requests in
        flight end with a 503)."""

        got = self._drain_hellos()
        pids = {p.pid for p in live}
        if not got.keys() & pids:
            return
        # several nodes: a node lost whole is known only when its beats stop (its ranks' peers fail first)
        settle = time.monotonic() + (SELF_REPORT_SETTLE_S if self.hub is None else self.hub.timeout_s + 1.0)
        while True:
            if any(not p.is_alive() for p in live):
                return  # a death: the next turn recovers from it with these hellos
            if pids <= got.keys() or time.monotonic() >= settle:
                break
            time.sleep(0.05)
            got |= self._drain_hellos()
        mine = {pid: m.reason for pid, m in got.items() if pid in pids and not wire.peer_failure(m.reason)}
        log(f"rank(s) {sorted(self.ranks.index(p) for p in live if p.pid in got)} left their group with no rank"
             f" dead; their own errors: {mine or 'none'}")
        if mine and len(mine) < len(live):
            for pid, reason in mine.items():
                log(f"fencing rank pid {pid} (SIGKILL): its event loop stopped on its own error ({reason})")
                self.error_fenced[pid] = reason
                sigkill(pid)
            return
        with self.lock:
            self.epoch += 1
            rec = Recovery(epoch=self.epoch, failed_ranks=[], tp_before=len(self.ranks), t_fault=time.monotonic(),
                           reason=("every rank's event loop stopped on its own error" if mine else
                                   "ranks left their group with no rank dead and no error of their own")
                           + f": {dict(list(mine.items())[:2])}")
        self.recoveries.append(rec)
        self._to(rec, Phase.FROZEN, rec.reason)
        rec.end(Outcome.FAILED, "no rank to blame; requests in flight end with an error")
        self._to(rec, Phase.FAILED, rec.outcome)
        self.metrics.recovery("failed", rec.phases_s, 0.0, 0)
        self._fallback(rec)

    def _drain_hellos(self) -> dict:
        """Hellos waiting on the control socket (pid -> RankHello), kept for the next recovery."""
        import zmq

        got = {}
        while self._sock.poll(0, zmq.POLLIN):
            ident, msg = self._recv_control()
            if isinstance(msg, wire.RankHello):
                self._hello_ids[msg.pid] = ident
                self._spare_hellos[msg.pid] = ident
                got[msg.pid] = msg
        return got

    def _recv_control(self) -> tuple[bytes, object]:
        """One message of the control socket (a message is waiting): (sender, decoded; None if malformed)."""
        ident, data = self._sock.recv_multipart()
        try:
            return ident, wire.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log(f"dropped a malformed control message: {e}")
            return ident, None
