"""The recovery state machine: plan -> migrate -> collect check-ins -> reconfigure -> collect readies -> commit.

``_recover`` runs one recovery (a rank failure, a scale-up's join, or an expert rebalance's regroup)
as named steps over one ``_Attempt``. Each step returns ``Step.NEXT`` or ``Step.RETRY``: a survivor
that did not check in, died or hung (``Stragglers``, from the bounded waits of ``_collect``)
abandons this recovery, and ``_without`` fences it and starts a new one from what the daemon holds
(``_Attempt.retry`` says from where). Any other error fails the recovery: the fallback restarts
every scheduler (``controller.fallback``).

- frozen: the survivors' collectives fail and their event loops stop; they tear down and say
  ``RankHello``. Requests keep arriving in rank 0's ZMQ socket (the HTTP server stays up, nothing
  fails);
- planning: ``planner.plan_migration`` over the survivors (the layout's width policy; experts by
  the measured loads with ``--elastic-eplb``);
- migrating: the daemon runs the plan (only the dead rank's bytes are read from the checkpoint); a
  regroup (no death) first waits until every rank stopped serving from the shards it moves;
- reconfiguring: each survivor gets ``Reconfigure`` (new rank, tp, layout, rendezvous port) and
  rebuilds its scheduler in place (``rank.failover``);
- resuming: every survivor said ``RankReady``; rank 0 re-broadcast the unfinished requests.

Nothing assumes rank 0 survives or that a recovery runs once: ranks are tracked by process, each
recovery has its epoch, and the planner starts from the layout the last one left.
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass, field

import msgspec

from sgl_elastic.controller import faults, wire
from sgl_elastic.controller.phases import Outcome, Phase, Recovery, log, transition
from sgl_elastic.controller.procs import free_port, set_omp_bind, sigkill

__all__ = ["Step", "Stragglers", "RecoverySteps"]

HELLO_TIMEOUT_S = 10.0  # default: survivors must check in within this (else: fenced, recovery goes on)
READY_TIMEOUT_S = 120.0  # rebuilt schedulers must be ready within this (else: fallback)
# extra check-in time after a death during the rebuild: the others' rebuild fails within ~1.7x their
# bounded rendezvous (wire.REBUILD_INIT_TIMEOUT_S), then they check in again
REBUILD_RETRY_S = 3 * wire.REBUILD_INIT_TIMEOUT_S
DAEMON_STARTS = 3  # a migration whose daemon is gone tries this many new ones (each may die while it starts)


class Stragglers(Exception):
    """Survivors that did not check in in time, died, or could not rebuild (pids): the end of a
    bounded wait (``_collect``) that did not hear from everyone."""

    def __init__(self, pids: list[int], why: str) -> None:
        super().__init__(why)
        self.pids = pids


class Step(enum.Enum):
    NEXT = "next"  # go on with the next step
    RETRY = "retry"  # abandon this recovery; another goes on without the stragglers (``_Attempt.retry``)


@dataclass
class _Restart:
    """Where the next recovery starts when this one is abandoned (``_without``)."""

    stragglers: Stragglers
    layout: object  # what the daemon holds now
    ranks: list  # rank processes in that layout's order
    hellos: dict[int, bytes]  # check-ins the next recovery may reuse
    checkin_s: float
    keep_joiner: bool = False  # abandoned before the migration: the joiner is not a rank yet; still add it


@dataclass
class _Attempt:
    """One recovery's inputs and what its steps found so far."""

    rec: Recovery
    epoch: int
    ranks: list  # rank processes before (old rank order)
    dead: list
    failed: list[int]
    survivors: list  # the processes that serve after (old ranks' order, then the joiner)
    joiner: object | None
    given: object | None  # a plan made by the caller (an expert rebalance)
    hellos: dict[int, bytes]
    checkin_s: float
    plan: object = None
    loads: object = None
    new_ranks: list = field(default_factory=list)
    readies: dict = field(default_factory=dict)
    daemon_dir: str = ""
    bind: str = ""
    retry: _Restart | None = None


class RecoverySteps:
    """Mixed into ``FailoverController``."""

    def _recover(self, dead: list, hellos: dict[int, bytes] | None = None, checkin_s: float | None = None,
                 joiner=None, plan=None, reason: str = "") -> None:
        """Recover from the death of ``dead`` (processes of the current ranks), or, with ``joiner``
        (a new rank process that said hello), grow by one rank, or, with neither, apply ``plan`` (an
        expert rebalance); with no death the ranks are asked to regroup. Without ``plan`` the
        planner places the experts by the measured loads (``--elastic-eplb``)."""
        a = self._begin(dead, hellos, checkin_s, joiner, plan, reason)
        try:
            for step in (self._step_plan, self._step_checkin_before_move, self._step_migrate, self._step_checkin,
                         self._step_orders, self._step_readies, self._step_commit):
                if step(a) is Step.RETRY:
                    break
        except Exception as e:
            self._fail_recovery(a, e)
            raise
        if a.retry is not None:
            r = a.retry
            self._without(a.rec, r.stragglers, r.layout, r.ranks, r.hellos, r.checkin_s,
                          joiner=a.joiner if r.keep_joiner else None)

    def _begin(self, dead, hellos, checkin_s, joiner, plan, reason) -> _Attempt:
        """A new epoch and its ``Recovery`` record; FROZEN (a regroup asks rank 0 to regroup the ranks)."""
        t_fault = time.monotonic()
        with self.lock:
            ranks = list(self.ranks)
            failed = sorted(ranks.index(p) for p in dead)
            self.departed |= {p.pid for p in dead}
            self.epoch += 1
            epoch = self.epoch
        hung = [p.pid for p in dead if p.pid in self.hung_fenced]
        why = f"rank(s) {failed} died (pids {[p.pid for p in dead]})" + (f"; hung (fenced): {hung}" if hung else "")
        own = {p.pid: self.error_fenced[p.pid] for p in dead if p.pid in self.error_fenced}
        if own:
            why += f"; fenced after an error of their own: {own}"
        if joiner is not None:
            why = f"scale-up: a new rank (pid {joiner.pid}) joins the {len(ranks)} serving"
        elif not dead:
            why = reason or "the ranks regroup"
        rec = Recovery(epoch=epoch, reason=why, failed_ranks=failed, tp_before=len(ranks), t_fault=t_fault)
        self.recoveries.append(rec)
        survivors = [p for i, p in enumerate(ranks) if i not in failed] + ([joiner] if joiner is not None else [])
        a = _Attempt(rec=rec, epoch=epoch, ranks=ranks, dead=dead, failed=failed, survivors=survivors,
                     joiner=joiner, given=plan, hellos=dict(hellos or {}), checkin_s=checkin_s or self.checkin_timeout_s)
        self._to(rec, Phase.FROZEN, rec.reason)
        if joiner is not None or not dead:  # rank 0 takes the request and broadcasts a Regroup marker to every rank
            with open(wire.regroup_path(self._addr), "w") as f:
                f.write(str(epoch))
        return a

    def _step_plan(self, a: _Attempt) -> Step:
        from sgl_elastic.planner.cmm import plan_migration
        from sgl_elastic.planner.experts import is_placed
        from sgl_elastic.planner.plan import ClusterChange

        if not a.survivors:
            raise RuntimeError("no rank survived")
        self._to(a.rec, Phase.PLANNING, f"{len(a.survivors)} survivors")
        a.loads = None if a.given is not None else self._eplb_loads()
        topo, first = None, None
        if self.hub is not None:  # several nodes: the links between them, none to a lost one
            from sgl_elastic.controller.nodes import topology

            slots = [getattr(p, "node", 0) for p in a.ranks] + ([getattr(a.joiner, "node", 0)] if a.joiner else [])
            topo = topology(slots, self.hub.dead_nodes(), self.node_link_gbps)
            first = [s for s, n in enumerate(slots) if n == 0]  # rank 0 (the intake) stays on node 0
        a.plan = a.given or plan_migration(
            self.layout, ClusterChange(failed=tuple(a.failed), added=1 if a.joiner is not None else 0), topo,
            expert_loads=a.loads, first_slots=first)
        if a.loads is not None and is_placed(a.plan.new_layout):
            log(f"experts placed by the loads of {a.loads.sum():.0f} routed tokens (capacity-weighted)")
        plan = a.plan
        self._to(a.rec, Phase.MIGRATING, f"plan: keep {plan.keep_bytes / 1e6:.1f} MB, peer"
                 f" {plan.peer_bytes / 1e6:.1f} MB, reload {plan.reload_bytes / 1e6:.1f} MB"
                 f" (lower bound {plan.lower_bound_reload_bytes / 1e6:.1f} MB)")
        alive = {p.pid for p in a.survivors}
        a.hellos = {pid: self._spare_hellos.pop(pid) for pid in list(self._spare_hellos) if pid in alive} | {
            pid: ident for pid, ident in a.hellos.items() if pid in alive}
        return Step.NEXT

    def _step_checkin_before_move(self, a: _Attempt) -> Step:
        """A regroup (no death): the ranks serve until they take the marker, from the very shards the
        migration moves in place, so it waits until every one has stopped and checked in. Several
        nodes, after a death too: rank 0 must have stopped mirroring its prefix index before the
        index is copied to the other nodes (``nodes.sync_kv``)."""
        if a.dead and self.hub is None:
            return Step.NEXT
        alive = {p.pid for p in a.survivors}
        try:
            self._collect(a.hellos, alive, a.epoch, a.checkin_s, "hello")
        except Stragglers as s:
            s = self._fence_hung_first(s, a.hellos, alive, a.epoch)
            if a.dead:  # the next recovery goes on without the stragglers and the dead
                s = Stragglers(sorted(set(s.pids) | {p.pid for p in a.dead}), str(s))
            a.retry = _Restart(s, self.layout, list(a.ranks), a.hellos, self.checkin_timeout_s, keep_joiner=True)
            return Step.RETRY
        return Step.NEXT

    def _step_migrate(self, a: _Attempt) -> Step:
        a.new_ranks = [None] * a.plan.new_layout.tp_size
        for old_rank, p in enumerate(a.ranks):
            if a.plan.old2new_rank[old_rank] >= 0:
                a.new_ranks[a.plan.old2new_rank[old_rank]] = p
        if a.joiner is not None:
            a.new_ranks[a.plan.new2slot.index(len(a.ranks))] = a.joiner
        if self.hub is not None and not self.is_local(a.new_ranks[0]):
            # the HTTP server, tokenizer and detokenizer are node 0's: its rank 0 must be here
            raise RuntimeError("no rank of node 0 survived: rank 0 (request intake, output streaming) cannot"
                               " move to another node")
        if self.hub is not None:
            a.daemon_dir = self._migrate_nodes(a.rec, a.plan, a.new_ranks, set(a.failed))
        else:
            a.daemon_dir = self._migrate(a.rec, a.plan)
        self._to(a.rec, Phase.RECONFIGURING, f"migrated in {a.rec.migration['seconds']:.3f} s")
        return Step.NEXT

    def _migrate_nodes(self, rec: Recovery, plan, new_ranks: list, failed: set[int]) -> str:
        """Several nodes: every live node's daemon builds its own new ranks (``nodes.migrate_across``).
        A daemon that is gone fails the recovery (the fallback: the server ends, as SGLang's does)."""
        from sgl_elastic.controller.nodes import agree_kv, migrate_across, summed, sync_kv

        t0 = time.monotonic()
        clients = {0: self.daemon.proc.client(timeout=60.0)}
        try:
            for k in self.hub.live_nodes()[1:]:
                clients[k] = c = self.hub.daemon_client(k, timeout=60.0)
                if c.stats().state == "empty":  # a node that came back: its daemon holds nothing yet
                    c.load_model(self.daemon.checkpoint, plan.old_layout, ranks=[])
                    c.wait_ready(120.0)
            node_of_new = [getattr(p, "node", 0) for p in new_ranks]
            synced = sync_kv(clients) if len(clients) > 1 else 0
            summaries = migrate_across(plan, clients, node_of_new, failed)
            kv_kept = agree_kv(summaries, clients)
        finally:
            for c in clients.values():
                c.close()
        rec.migration = {"seconds": round(time.monotonic() - t0, 4), **summed(summaries),
                         "lower_bound_reload_bytes": plan.lower_bound_reload_bytes,
                         "dead_nodes": len(self.hub.dead_nodes()), "kv_index_entries_synced": synced,
                         "kv_kept_all_nodes": int(kv_kept)}
        self.daemon.layout = plan.new_layout
        return ""

    def _step_checkin(self, a: _Attempt) -> Step:
        """Every survivor has left its group and said hello (after a failure they tear down meanwhile)."""
        pids = {p.pid for p in a.survivors}
        try:
            self._collect(a.hellos, pids, a.epoch, a.checkin_s, "hello")
        except Stragglers as s:
            s = self._fence_hung_first(s, a.hellos, pids, a.epoch)
            a.retry = _Restart(s, a.plan.new_layout, a.new_ranks, a.hellos, self.checkin_timeout_s)
            return Step.RETRY
        self._clear_regroup()  # every rank has left its group: a request left now would regroup later
        return Step.NEXT

    def _step_orders(self, a: _Attempt) -> Step:
        """``Reconfigure`` to every survivor (the new rank 0 takes over rank 0's intake if that moved)."""
        new_tp = a.plan.new_layout.tp_size
        port = free_port()
        a.bind = self._omp_bind(new_tp)
        layout_bytes = a.plan.new_layout.to_bytes()
        takeover = b""
        if a.new_ranks[0].pid != self.intake_pid:  # rank 0 died (or moves): the new rank 0 takes over
            takeover = self._takeover()
            log(f"rank 0's process is gone: rank 0 of epoch {a.epoch} (pid {a.new_ranks[0].pid}) takes over"
                f" its intake ({len(takeover)} bytes of request state)")
        # always the current run dir: a joiner started before the daemon was replaced knows the old one
        daemon_dir = a.daemon_dir or (self.daemon.proc.run_dir if self.daemon.proc is not None else "")
        for p in a.survivors:
            new_rank = a.new_ranks.index(p)
            self._sock.send_multipart([a.hellos[p.pid], wire.encode(wire.Reconfigure(
                epoch=a.epoch, rank=new_rank, tp_size=new_tp, layout=layout_bytes, dist_port=port,
                omp_bind=a.bind, takeover=takeover if new_rank == 0 else b"",
                daemon_dir=daemon_dir if self.is_local(p) else "",  # another node's: its own daemon
                gpu_slot=self._joiner_slot if p is a.joiner else -1))])
        return Step.NEXT

    def _step_readies(self, a: _Attempt) -> Step:
        """Every survivor rebuilt and said ``RankReady``."""
        failed_builds: dict[int, str] = {}
        try:
            self._collect(a.readies, {p.pid for p in a.survivors}, a.epoch, READY_TIMEOUT_S, "ready", failed_builds)
        except Stragglers as s:  # died or hung while rebuilding: the others' rebuild fails (their
            # rendezvous is bounded), they check in again, and a new recovery goes on without it
            self._hello_ids = {}
            a.retry = _Restart(s, a.plan.new_layout, a.new_ranks, {}, self.checkin_timeout_s + REBUILD_RETRY_S)
            return Step.RETRY
        if failed_builds and not self.daemon.alive():
            # case: the state daemon died after the migration, before the ranks attached. They ask
            # again (their rebuild is retried); a new recovery of the same layout starts a new daemon
            log(f"the state daemon died before the ranks attached ({len(failed_builds)} rebuild(s) failed);"
                " recovering again with a new daemon")
            self._hello_ids = {}
            a.retry = _Restart(Stragglers([], "the state daemon died during the rebuild"), a.plan.new_layout,
                               a.new_ranks, {}, self.checkin_timeout_s + REBUILD_RETRY_S)
            return Step.RETRY
        if failed_builds:
            raise RuntimeError(f"survivors could not rebuild: {failed_builds}")
        return Step.NEXT

    def _step_commit(self, a: _Attempt) -> Step:
        """The new layout is served: ranks, layout, request counts; RESUMING -> SERVING."""
        rec, plan, new_tp = a.rec, a.plan, a.plan.new_layout.tp_size
        with self.lock:
            self.ranks = a.new_ranks
            self.layout = plan.new_layout
            self.intake_pid = a.new_ranks[0].pid
            if a.joiner is not None:
                self._slot_of[a.joiner.pid] = self._joiner_slot
                self._joiners = [j for j in self._joiners if j is not a.joiner]
        self._on_new_layout(plan.new_layout)
        set_omp_bind(a.bind)
        readies = a.readies.values()
        rec.resumed_requests = sum(r.resumed for r in readies)
        rec.resubmitted_requests = sum(r.resubmitted for r in readies)
        lost = sorted({rid for r in readies for rid in r.unresumable})
        rec.failed_requests = len(lost)
        if lost:  # every accepted request completes or gets an explicit error
            from sgl_elastic.controller.supervisor import supervisor

            n = supervisor().fail_requests(lost, "sgl-elastic: a TP rank failed and this request could not be"
                                                 " resumed on the survivors; retry it", self.tokenizer)
            log(f"ERROR: {n} request(s) could not be resumed and ended with a 503: {lost}")
        rec.tp_after = new_tp
        rec.widths_after = list(plan.new_layout.family("attn").widths)
        self._to(rec, Phase.RESUMING, f"{new_tp} ranks rebuilt; {rec.resumed_requests} requests resumed")
        rec.recovery_s = round(time.monotonic() - rec.t_fault, 4)
        rec.end(Outcome.OK)
        if self._loads is not None and (a.given is not None or a.loads is not None):
            self._loads.mark()  # loads start again under the new placement
        self._eplb_t = time.monotonic()
        self._pending_tfs = rec
        self._to(rec, Phase.SERVING, f"epoch {a.epoch} at tp {new_tp}, widths {rec.widths_after},"
                 f" {rec.recovery_s:.3f} s after the fault")
        self.metrics.recovery("ok", rec.phases_s, rec.recovery_s, rec.resumed_requests)
        self.metrics.serving(new_tp, a.epoch)
        self._after_serving()
        return Step.NEXT

    def _fail_recovery(self, a: _Attempt, e: Exception) -> None:
        """An error ended the recovery: FAILED, the survivors retired, the fallback restart."""
        # failed inside the migration: what the daemon holds is in doubt (see _fallback)
        reload = a.plan.new_layout if a.plan is not None and self.phase is Phase.MIGRATING else None
        rec = a.rec
        rec.end(Outcome.FAILED, f"{type(e).__name__}: {e}")
        self.falling_back = True  # before the Retires: a retired rank's SIGQUIT must not end the server
        self._to(rec, Phase.FAILED, rec.outcome)
        self.metrics.recovery("failed", rec.phases_s, 0.0, 0)
        for pid in list(self._hello_ids):
            self._sock.send_multipart([self._hello_ids[pid], wire.encode(wire.Retire(epoch=a.epoch, reason=str(e)))])
        self._fallback(rec, reload)

    def _to(self, rec: Recovery | None, new: Phase, why: str) -> None:
        now = time.monotonic()
        with self.lock:
            old = self.phase
            self.phase = transition(self.phase, new, why)
            if rec is not None and old is not Phase.SERVING and rec is self._phase_rec:
                rec.phases_s[old.value] = round(now - self._phase_t0, 4)
            self._phase_rec = rec
            self._phase_t0 = now
        if faults.delay_s(new.value):  # tests only (controller.faults)
            time.sleep(faults.delay_s(new.value))

    def _clear_regroup(self) -> None:
        """Withdraw a regroup request that no rank took (each has left its group already)."""
        try:
            os.unlink(wire.regroup_path(self._addr))
        except FileNotFoundError:
            pass

    def _migrate(self, rec: Recovery, plan) -> str:
        """Run ``plan`` in the daemon. A daemon that is dead (before or during the migration) is
        replaced by a new one loading the new layout from the checkpoint: every byte is read again
        (its memory died with it); the ranks serve from their old mappings until they rebuild.
        Returns the run dir the rebuilt ranks attach to ("": unchanged)."""
        from sgl_elastic.daemon.client import DaemonError, DaemonUnavailable

        t0 = time.monotonic()
        if self.daemon.alive():
            try:
                with self.daemon.proc.client(timeout=60.0) as c:
                    summary = c.apply_migration(plan)
                rec.migration = {"seconds": round(time.monotonic() - t0, 4),
                                 **{k: v for k, v in msgspec.structs.asdict(summary).items() if k != "epoch"},
                                 "lower_bound_reload_bytes": plan.lower_bound_reload_bytes}
                self.daemon.layout = plan.new_layout
                return ""
            except (DaemonUnavailable, DaemonError, OSError) as e:
                if self.daemon.alive():
                    raise
                log(f"the state daemon died during the migration ({type(e).__name__}: {e})")
        log("ERROR: the state daemon is gone: starting a new one, which loads the new layout from the checkpoint"
             " (every byte again: its memory died with it)")
        self.daemon.layout = plan.new_layout
        for attempt in range(1, DAEMON_STARTS + 1):  # a new daemon can die while it starts, too
            try:
                self.daemon.ensure()
                break
            except (RuntimeError, TimeoutError, DaemonUnavailable, DaemonError, OSError) as e:
                if attempt == DAEMON_STARTS:
                    raise
                log(f"the new state daemon failed to start ({type(e).__name__}: {e}); starting another"
                     f" ({attempt + 1} of {DAEMON_STARTS})")
        with self.daemon.proc.client(timeout=30.0) as c:
            read = c.stats().checkpoint_bytes_read
        rec.migration = {"seconds": round(time.monotonic() - t0, 4), "daemon_restarted": 1.0,
                         "reload_bytes": read, "file_bytes_read": read}
        return self.daemon.proc.run_dir

    def _fence_hung_first(self, s: Stragglers, hellos: dict, pids: set[int], epoch: int) -> Stragglers:
        """Of the survivors that did not check in, some may only be blocked in a collective with a
        hung one. Fence the stopped ones first (SIGKILL: their peers' sockets reset), give the others
        a short grace to check in, and return who is still missing."""
        import psutil

        remote = self.hub.remote_pids() if self.hub is not None else set()

        def stopped(pid: int) -> bool:
            if pid in remote:  # another node's: its agent fences its hung ranks itself
                return False
            if self._hung([pid]):
                return True
            try:
                return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
            except psutil.Error:
                return False

        hung = [pid for pid in s.pids if stopped(pid)]
        if not hung or len(hung) == len(s.pids):
            return s
        sigkill(*hung)
        log(f"fenced stopped rank pid(s) {hung}; waiting for the others to check in")
        try:
            self._collect(hellos, pids - set(hung), epoch, max(2.0, self.checkin_timeout_s / 2), "hello")
            return Stragglers(hung, f"rank pid(s) {hung} were stopped (hung) and did not check in")
        except Stragglers as s2:
            return Stragglers(sorted(set(hung) | set(s2.pids)), f"{s}; then {s2}")

    def _without(self, rec: Recovery, s: Stragglers, layout, ranks: list, hellos: dict[int, bytes],
                 checkin_s: float | None = None, joiner=None) -> None:
        """Abandon ``rec``: fence the stragglers (SIGKILL) and recover again, from ``layout`` (what the
        daemon holds now), without them. The survivors that checked in keep waiting for orders."""
        sigkill(*s.pids)
        rec.end(Outcome.SUPERSEDED, f"{s}; fenced pids {s.pids} and recovering again without them")
        rec.phases_s[self.phase.value] = round(time.monotonic() - self._phase_t0, 4)
        log(rec.outcome)
        with self.lock:
            self.layout, self.ranks = layout, ranks
        self._on_new_layout(layout)
        with self.lock:
            self._joiners = [j for j in self._joiners if j.pid not in s.pids]
        if joiner is not None and (joiner.pid in s.pids or not joiner.is_alive()):
            joiner = None  # the new rank itself failed: the scale-up is over (the status says so)
        dead = [p for p in ranks if p.pid in s.pids]  # the next recovery moves RECONFIGURING -> FROZEN
        self._recover(dead, hellos, checkin_s, joiner=joiner)

    def _collect(self, into: dict, pids: set[int], epoch: int, timeout: float, kind: str,
                 failed: dict[int, str] | None = None) -> None:
        """Receive messages until every pid in ``pids`` sent ``kind`` for ``epoch`` (bounded).

        Raises ``Stragglers`` for ranks that die, go silent (hung) or miss the deadline. A
        ``RankFailed`` raises too, unless ``failed`` collects them: then, once everyone answered,
        a short settle tells a rebuild failed by a peer's death (the dead are raised) from a real one."""
        import zmq

        def check_dead() -> None:
            with self.lock:
                dead = [p for p in self.ranks + self._joiners if p.pid in pids and not p.is_alive()]
            if dead:
                raise Stragglers([p.pid for p in dead], f"rank pid(s) {[p.pid for p in dead]} died during the recovery")

        deadline = time.monotonic() + timeout
        settle = None
        while True:
            done = set(into) | set(failed or {})
            if pids <= done:
                if not failed:
                    check_dead()  # a rank that answered, then died (its message was queued)
                    return
                settle = settle or time.monotonic() + 0.5
                if time.monotonic() >= settle:
                    check_dead()
                    return
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(pids - done)
                raise Stragglers(missing, f"ranks with pids {missing} did not say {kind} within {timeout:.0f} s")
            if not self._sock.poll(int(min(left, 0.1 if settle else 0.5) * 1000), zmq.POLLIN):
                check_dead()
                hung = self._hung(sorted(pids - done))
                if hung:
                    raise Stragglers(hung, f"rank pid(s) {hung} silent for more than {self.hung_timeout_s:g} s (hung)")
                continue
            ident, msg = self._recv_control()
            if isinstance(msg, wire.RankHello):
                self._hello_ids[msg.pid] = ident
                if kind == "hello" and msg.pid in pids:
                    into[msg.pid] = ident
                    log(f"rank {msg.rank} (pid {msg.pid}) checked in: {msg.reason}")
                else:  # a new rank (or one this recovery does not wait for): kept for the one that will
                    self._spare_hellos[msg.pid] = ident
            elif isinstance(msg, wire.RankReady) and msg.epoch == epoch and kind == "ready":
                into[msg.pid] = msg
            elif isinstance(msg, wire.RankFailed) and msg.epoch == epoch:
                if failed is None:
                    raise Stragglers([msg.pid], f"rank {msg.rank} (pid {msg.pid}) failed to rebuild: {msg.reason}")
                failed[msg.pid] = msg.reason
                log(f"rank {msg.rank} (pid {msg.pid}) could not rebuild: {msg.reason}")
                check_dead()
