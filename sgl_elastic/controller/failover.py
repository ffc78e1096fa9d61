"""In-place failover (main process): a TP rank dies, the surviving scheduler processes go on at tp-1.

Recovery phases (one Enum, one ``transition()`` that rejects illegal moves and logs each with the
time spent in the phase it leaves)::

    SERVING -> FROZEN -> PLANNING -> MIGRATING -> RECONFIGURING -> RESUMING -> SERVING
                 any phase but SERVING -> FAILED (fallback: restart every scheduler from the daemon,
                 at the layout it holds) -> SERVING

- detect: a thread waits on the scheduler processes' sentinels (``multiprocessing.connection.wait``):
  a SIGKILL is seen within milliseconds, not at SGLang's 1 s watchdog poll. A hung rank (alive but
  not running: SIGSTOP, a frozen process) is found by its heartbeat: a thread in every scheduler
  process touches a file every ``hung_timeout_s / 5`` s (``patches.reconfigure.start_heartbeat``);
  one that is ``hung_timeout_s`` old gets the rank fenced (SIGKILL), then recovered from like a
  dead one. The rule, slow vs hung: only silence counts. A slow rank (long forwards, starved of
  CPU, waiting on a slow peer) keeps beating, because the thread does not wait on the event loop,
  and is never fenced; its peers wait for it. (Not covered: a process whose threads run while its
  device is stuck in a kernel; on GPU that needs a progress check, not written.);
- frozen: the survivors' collectives fail and their event loops stop; they tear down and say
  ``RankHello``. Requests keep arriving in rank 0's ZMQ socket (the HTTP server stays up, /health
  waits, nothing fails);
- planning: ``planner.plan_migration`` over the survivors (the layout's width policy);
- migrating: the daemon runs the plan (only the dead rank's bytes are read from the checkpoint);
- reconfiguring: each survivor gets ``Reconfigure`` (new rank, tp, layout, rendezvous port) and
  rebuilds its scheduler in place (``patches.reconfigure``);
- resuming: every survivor said ``RankReady``; rank 0 re-broadcast the unfinished requests.

Nothing assumes rank 0 survives or that a recovery runs once: ranks are tracked by process, each
recovery has its epoch, and the planner starts from the layout the last one left.
"""

from __future__ import annotations

import enum
import logging
import multiprocessing.connection
import os
import sys
import tempfile
import threading
import time

import msgspec

from sgl_elastic.controller import wire
from sgl_elastic.controller.accounting import RequestAccounts
from sgl_elastic.controller.metrics import FailoverMetrics
from sgl_elastic.controller.procs import free_port, shm_inodes_of, sigkill

__all__ = ["Phase", "IllegalPhaseTransition", "transition", "Recovery", "FailoverController", "controller"]

logger = logging.getLogger("sgl_elastic.controller.failover")

HELLO_TIMEOUT_S = 10.0  # default: survivors must check in within this (else: fenced, recovery goes on)
HUNG_TIMEOUT_S = 5.0  # default: a rank whose heartbeat is this old is fenced (its process does not run)
SHM_NOTE_S = 5.0  # while serving: how often the /dev/shm files each rank maps are noted (to reap a dead one's)
SERVING_POLL_S = 0.2  # while serving: how often the control socket is checked for a rank that left on its own
SELF_REPORT_SETTLE_S = 0.5  # after such a hello: how long its peers' hellos (or a death) are waited for
READY_TIMEOUT_S = 120.0  # rebuilt schedulers must be ready within this (else: fallback)
# extra check-in time after a death during the rebuild: the others' rebuild fails within ~1.7x their
# bounded rendezvous (wire.REBUILD_INIT_TIMEOUT_S), then they check in again
REBUILD_RETRY_S = 3 * wire.REBUILD_INIT_TIMEOUT_S
JOIN_TIMEOUT_S = 180.0  # a new rank process must import SGLang and check in within this
DAEMON_STARTS = 3  # a migration whose daemon is gone tries this many new ones (each may die while it starts)


def _is_placed(layout) -> bool:
    from sgl_elastic.planner.experts import is_placed

    return is_placed(layout)


def _log(msg: str) -> None:
    print(f"[sgl-elastic failover] {msg}", file=sys.stderr, flush=True)


class Phase(enum.Enum):
    SERVING = "serving"
    FROZEN = "frozen"
    PLANNING = "planning"
    MIGRATING = "migrating"
    RECONFIGURING = "reconfiguring"
    RESUMING = "resuming"
    FAILED = "failed"


_ORDER = (Phase.SERVING, Phase.FROZEN, Phase.PLANNING, Phase.MIGRATING, Phase.RECONFIGURING, Phase.RESUMING,
          Phase.SERVING)
_LEGAL: dict[Phase, frozenset[Phase]] = {a: frozenset({b}) for a, b in zip(_ORDER, _ORDER[1:])}
for _p in (Phase.FROZEN, Phase.PLANNING, Phase.MIGRATING, Phase.RECONFIGURING, Phase.RESUMING):
    _LEGAL[_p] = _LEGAL[_p] | {Phase.FAILED}
# a survivor that does not check in (hung) or dies during a recovery: that recovery is abandoned
# and a new one starts from the layout the daemon holds, without it
_LEGAL[Phase.RECONFIGURING] = _LEGAL[Phase.RECONFIGURING] | {Phase.FROZEN}
# a regroup (scale-up, rebalance) collects the ranks' check-ins while migrating, before any byte
# moved: one that does not check in abandons it the same way
_LEGAL[Phase.MIGRATING] = _LEGAL[Phase.MIGRATING] | {Phase.FROZEN}
_LEGAL[Phase.FAILED] = frozenset({Phase.SERVING})  # after the fallback restart


class IllegalPhaseTransition(RuntimeError):
    pass


class _Retry(Exception):
    """Abandon this recovery and start another (see ``FailoverController._without``)."""


class _Stragglers(Exception):
    """Survivors that did not check in in time, died, or could not rebuild (pids)."""

    def __init__(self, pids: list[int], why: str) -> None:
        super().__init__(why)
        self.pids = pids


def transition(current: Phase, new: Phase, why: str) -> Phase:
    if new not in _LEGAL.get(current, frozenset()):
        raise IllegalPhaseTransition(f"recovery phase {current.value} -> {new.value} is not allowed ({why})")
    logger.info("recovery: %s -> %s (%s)", current.value, new.value, why)
    _log(f"{current.value} -> {new.value}: {why}")
    return new


class Recovery(msgspec.Struct, kw_only=True):
    """One recovery, as ``/elastic/status`` shows it. Times in seconds."""

    epoch: int
    reason: str
    failed_ranks: list[int]
    tp_before: int
    tp_after: int = 0
    widths_after: list[int] = []
    phases_s: dict[str, float] = {}
    recovery_s: float = 0.0  # fault seen -> every survivor serving again
    tfs_s: float | None = None  # fault seen -> first token returned after it (set by the tokenizer hook)
    resumed_requests: int = 0
    resubmitted_requests: int = 0  # rank 0 died: inputs it held that the new rank 0 submitted again
    failed_requests: int = 0  # could be neither resumed nor re-submitted: ended with a 503
    migration: dict[str, float] = {}
    outcome: str = "running"  # running | ok | failed: <why> (then "; fallback restart at tp N done" or "... failed")
    fallback: str = ""  # after a failed one: "" (none) | running | ok | failed: <why> (the restart of every scheduler)
    t_fault: float = 0.0  # monotonic; internal


FAILED_MSG = ("sgl-elastic: a recovery failed and its fallback restart failed too; the server cannot serve"
              " until it is restarted (see /elastic/status)")


def _sigquit_self() -> None:
    """SIGQUIT to this (the main) process: SGLang's tear-down, as when a scheduler dies."""
    import signal

    os.kill(os.getpid(), signal.SIGQUIT)

class FailoverController:
    """Owns the rank processes' lifecycle after start: detection, recovery, status."""

    def __init__(self) -> None:
        self.enabled = False
        self.phase = Phase.SERVING
        self.epoch = 0
        self.lock = threading.RLock()
        self.layout = None  # ElasticLayout served now
        self.daemon = None  # controller.daemon.ServerDaemon
        self.ranks: list = []  # multiprocessing.Process per current TP rank
        self.recoveries: list[Recovery] = []
        self.departed: set[int] = set()  # pids of ranks that died (or were retired)
        self._dir: str | None = None
        self._sock = None
        self._wake_r, self._wake_w = None, None
        self._thread: threading.Thread | None = None
        self._phase_t0 = time.monotonic()
        self._phase_rec: Recovery | None = None
        self._pending_tfs: Recovery | None = None
        self._hello_ids: dict[int, bytes] = {}
        self.checkin_timeout_s = HELLO_TIMEOUT_S
        self.metrics = FailoverMetrics()
        self.dispatched: dict[str, object] = {}  # rid -> tokenized input, as sent to rank 0 (main process)
        self.accounts = RequestAccounts()  # every accepted request ends once; the audit finds lost ones
        self.end_server = _sigquit_self  # state failed: SGLang's tear-down (a test replaces it)
        self._audit_thread: threading.Thread | None = None
        self._sweep_at = 64
        self.tokenizer = None  # SGLang's TokenizerManager (main process), set by its dispatch hook
        self.intake_pid = 0  # the process serving rank 0 (request intake, output streaming)
        self.hung_timeout_s = HUNG_TIMEOUT_S
        self.hung_fenced: list[int] = []  # pids fenced because their heartbeat stopped
        self.error_fenced: dict[int, str] = {}  # pids fenced because their event loop stopped on their own error
        self._shm_of: dict[int, set[int]] = {}  # rank pid -> inodes of the /dev/shm files it maps (SGLang's)
        self._shm_noted_at = 0.0
        self._delays: dict[str, float] = {}
        self._faults: frozenset[str] = frozenset()  # tests only (wire.ENV_TEST_FAIL)
        self._spare_hellos: dict[int, bytes] = {}  # hellos of processes no recovery waited for yet (a new rank)
        self._spawn = None  # spawn(slot, standby) -> started Process of a new rank (the launcher's)
        self.standby_target = 0  # warm standby processes to keep (--elastic-standby)
        self.standby: list = []  # warm standby processes (imported, waiting for orders)
        self._joiners: list = []  # new rank processes not serving yet
        self._slot_of: dict[int, int] = {}  # pid -> device slot (GPU index offset) of every rank process
        self._grow_requested = False
        self.falling_back = False  # the fallback restart runs (a retired rank's SIGQUIT is part of it)
        self.eplb = False  # expert parallelism: place experts by measured loads (--elastic-eplb)
        self.eplb_interval_s = 0.0  # and rebalance this often while serving (0: only at recoveries)
        self._loads = None  # moe.loads.LoadReader of rank 0's counts
        self._eplb_t = time.monotonic()  # last periodic rebalance check (or the last recovery)
        self._rebalance_requested = False
        self._rebalance_algorithm = "ours"  # of the requested rebalance (controller.placers)
        self.eplb_last: dict = {}  # the last rebalance decision, for /elastic/status
        self.add_rank_last: dict = {}  # the last scale-up's end (decision, why, tp_after), for /elastic/status

    # ---- set-up (launcher, before SGLang spawns the schedulers) ----------------------------------------
    def arm(self, layout, daemon, *, on_new_layout=None, omp_bind=None, checkin_timeout_s: float = HELLO_TIMEOUT_S,
            hung_timeout_s: float = HUNG_TIMEOUT_S, spawn=None, standby: int = 0, eplb: bool = True,
            eplb_interval_s: float = 0.0, kv_backup: bool = False) -> str:
        """Bind the control socket; returns its endpoint (exported to the schedulers as SGLE_CONTROL).

        ``on_new_layout(layout)``: called after each recovery (the launcher points the patches of
        this process at it); ``omp_bind(tp) -> str``: SGLANG_CPU_OMP_THREADS_BIND for a tp size
        ("" on GPU); ``hung_timeout_s``: fence a rank silent this long (0: no heartbeat);
        ``spawn(slot, standby) -> Process``: start a new rank process on device slot ``slot``
        (``patches.join``), for ``add_rank``; ``standby``: how many warm standbys to keep; ``eplb``:
        with expert parallelism, rank 0 counts expert loads and every recovery places the experts by
        them; ``eplb_interval_s``: also rebalance this often while serving (0: off); ``kv_backup``:
        every rank mirrors its KV into a backup pool, so a failover keeps the KV (no re-prefill).
        """
        import zmq

        self.layout, self.daemon = layout, daemon
        self.checkin_timeout_s = checkin_timeout_s
        self.hung_timeout_s = hung_timeout_s
        self._spawn, self.standby_target = spawn, standby
        self._delays = wire.parse_delays(os.environ.get(wire.ENV_TEST_DELAYS))
        self._faults = wire.test_faults(os.environ.get(wire.ENV_TEST_FAIL))
        self._on_new_layout = on_new_layout or (lambda layout: None)
        self._omp_bind = omp_bind or (lambda tp: "")
        self._dir = tempfile.mkdtemp(prefix="sgle-ctl-")
        os.chmod(self._dir, 0o700)
        addr = self._addr
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(addr)
        os.environ[wire.ENV_CONTROL] = addr
        os.environ[wire.ENV_HEARTBEAT] = str(hung_timeout_s / 5) if hung_timeout_s > 0 else ""
        os.environ[wire.ENV_KV_BACKUP] = "1" if kv_backup else ""
        self.eplb = bool(eplb and layout.expert_parallel and "experts" in layout.families)
        self.eplb_interval_s = eplb_interval_s if self.eplb else 0.0
        if self.eplb:
            from sgl_elastic.moe.loads import LoadReader, loads_path

            os.environ[wire.ENV_EXPERT_LOADS] = loads_path(addr)
            self._loads = LoadReader(loads_path(addr))
        self.enabled = True
        return addr

    def watch(self, procs: list) -> None:
        """The scheduler processes, in TP rank order (from the engine hook); starts the detector."""
        with self.lock:
            self.ranks = list(procs)
            self.intake_pid = self.ranks[0].pid if self.ranks else 0
            self._slot_of = {p.pid: i for i, p in enumerate(self.ranks)}
        self.metrics.serving(len(self.ranks), self.epoch)
        if self._thread is None:
            self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
            self._thread = threading.Thread(target=self._run, name="sgle-failover", daemon=True)
            self._thread.start()
            self._audit_thread = threading.Thread(target=self._audit_loop, name="sgle-request-audit", daemon=True)
            self._audit_thread.start()

    @property
    def _addr(self) -> str:
        """The control socket's endpoint (in the private run dir; heartbeat and regroup files beside it)."""
        return f"ipc://{self._dir}/control.sock"

    @property
    def armed(self) -> bool:
        """``arm()`` ran (the server was started with in-place failover), closed or not."""
        return self._sock is not None

    def close(self) -> None:
        import shutil

        self.enabled = False
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"stop")
            except OSError:
                pass
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

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

    # ---- status -------------------------------------------------------------------------------------
    def status(self) -> dict:
        with self.lock:
            widths = list(self.layout.family("attn").widths) if self.layout is not None else []
            return {
                "state": self.phase.value, "epoch": self.epoch, "tp_size": len(self.ranks),
                "ranks": [{"rank": r, "pid": p.pid, "alive": p.is_alive()} for r, p in enumerate(self.ranks)],
                "widths": widths,
                "standby": [p.pid for p in self.standby if p.is_alive()],
                "pending": [k for k, on in (("add_rank", self._grow_requested),
                                            ("rebalance", self._rebalance_requested)) if on],
                "add_rank_last": self.add_rank_last,
                "eplb": {"enabled": self.eplb, "interval_s": self.eplb_interval_s,
                         "placed": bool(self.layout is not None and _is_placed(self.layout)),
                         "redundant": (self.layout.family("experts").redundant
                                       if self.layout is not None and "experts" in self.layout.families else 0),
                         "imbalance_now": self._imbalance_now(), "last": self.eplb_last},
                "recoveries": [msgspec.structs.asdict(r) | {"t_fault": None} for r in self.recoveries],
                "requests": self.requests(),
            }

    def requests(self) -> dict:
        """Request accounting (``controller.accounting``), with the recoveries' totals."""
        with self.lock:
            recs = list(self.recoveries)
        return self.accounts.snapshot() | {
            "resumed": sum(r.resumed_requests for r in recs),
            "resubmitted": sum(r.resubmitted_requests for r in recs),
            "failed_at_recovery": sum(r.failed_requests for r in recs)}

    def _audit_loop(self) -> None:
        """The request audit's own thread (it waits for rank 0's answer; detection must not)."""
        from sgl_elastic.controller.supervisor import supervisor

        def fail(rids, msg):
            n = supervisor().fail_requests(rids, msg, self.tokenizer)
            _log(f"ERROR: {len(rids)} request(s) accepted but held by no rank (lost): {rids}; {n} ended with a 503")

        while self.enabled:
            time.sleep(0.5)
            try:
                self.metrics.requests(self.accounts.snapshot())
                if self.phase is Phase.SERVING and self._dir and self.accounts.due():
                    self.accounts.audit(self.tokenizer, self._addr, fail)
            except Exception as e:  # noqa: BLE001 - housekeeping: logged, the server serves on
                _log(f"request audit: {type(e).__name__}: {e}")

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
        _log(f"{n} request(s) in flight ended with a 503: the server cannot serve")
        self.end_server()

    def health(self) -> str:
        """For the probes (``controller.admin``): "serving", "recovering" (a recovery, or its fallback
        restart, runs: requests are held) or "failed" (a recovery gave up and its fallback failed)."""
        if not self.armed or not self.enabled:
            return "serving"
        phase = self.phase
        if phase is Phase.SERVING:
            return "serving"
        rec = self.recoveries[-1] if self.recoveries else None
        if phase is Phase.FAILED and rec is not None and rec.fallback.startswith("failed"):
            return "failed"
        return "recovering"

    def failure_reason(self) -> str:
        return self.recoveries[-1].outcome if self.recoveries else ""

    def recovery_count(self) -> int:
        return len(self.recoveries)

    def check_injectable(self, rank: int) -> tuple[str | None, int, int]:
        """(error, http status, pid) for an injected failure of ``rank``; error None: go ahead."""
        with self.lock:
            n = len(self.ranks)
            if not self.enabled:
                return "in-place failover is off (--no-elastic-failover, or tp 1)", 409, 0
            if self.phase is not Phase.SERVING:
                return f"a recovery is in progress (phase {self.phase.value}); try again when serving", 409, 0
            if not 0 <= rank < n:
                return f"rank {rank} does not exist: the server has ranks 0..{n - 1}", 400, 0
            if n == 1:
                return "rank 0 is the last rank: killing it would leave nothing to serve", 409, 0
            return None, 200, self.ranks[rank].pid

    def record_dispatch(self, tokenizer, obj) -> None:
        """The tokenizer manager sent ``obj`` to rank 0: keep generate inputs until they finish
        (what a new rank 0 re-submits if the old one died with them queued or half-broadcast)."""
        self.tokenizer = tokenizer
        for o in getattr(obj, "batch", None) or [obj]:
            rid = getattr(o, "rid", None)
            if isinstance(rid, str) and hasattr(o, "input_ids"):
                self.dispatched[rid] = o
                self.accounts.accept(rid)

    def _takeover(self) -> bytes:
        """What the new rank 0 needs when the process serving rank 0 died: every request the
        tokenizer manager still waits for, with the output ids it received (read once the pipes
        from the dead rank drained: two equal snapshots 50 ms apart, at most 1 s) and its input."""
        import pickle

        def snap():
            tm = self.tokenizer
            for _ in range(5):
                try:
                    items = list(tm.rid_to_state.items()) if tm is not None else []
                    return {rid: tuple(st.output_ids) for rid, st in items
                            if not st.finished and getattr(st, "dispatched", True)}
                except RuntimeError:  # resized while copied (another thread): again
                    time.sleep(0.005)
            raise RuntimeError("could not read the tokenizer manager's request states")

        view, deadline = snap(), time.monotonic() + 1.0
        while time.monotonic() < deadline:
            time.sleep(0.05)
            again = snap()
            if again == view:
                break
            view = again
        return pickle.dumps({rid: (list(ids), self.dispatched.get(rid)) for rid, ids in view.items()})

    def forget_finished(self, live_rids) -> None:
        """Drop the record of every request the tokenizer manager no longer tracks (amortized: a
        sweep only once the record doubled since the last one)."""
        if len(self.dispatched) > self._sweep_at:
            for rid in [r for r in self.dispatched if r not in live_rids]:
                self.dispatched.pop(rid, None)
            self._sweep_at = max(64, 2 * len(self.dispatched))

    def first_token_after_fault(self) -> None:
        """Called by the tokenizer hook for every output batch: records TFS of the last recovery."""
        rec = self._pending_tfs
        if rec is not None and rec.tfs_s is None:
            rec.tfs_s = time.monotonic() - rec.t_fault
            self._pending_tfs = None

    # ---- detection ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while self.enabled:
            with self.lock:
                live = [p for p in self.ranks if p.pid not in self.departed]
            sentinels = {p.sentinel: p for p in live}
            poll = min(SERVING_POLL_S, self.hung_timeout_s / 5) if self.hung_timeout_s > 0 else SERVING_POLL_S
            ready = multiprocessing.connection.wait(list(sentinels) + [self._wake_r], timeout=poll)
            if self._wake_r in ready:
                try:
                    msg = self._wake_r.recv()
                except EOFError:
                    return
                if msg == b"stop":
                    return
                if msg == b"rebalance" and self.enabled:
                    try:
                        self._rebalance(forced=True, algorithm=self._rebalance_algorithm)
                    except Exception as e:  # noqa: BLE001 - logged; the server serves at its placement
                        _log(f"ERROR: expert rebalance failed: {type(e).__name__}: {e}")
                        self._unstick(e)
                    finally:
                        self._rebalance_requested = False
                    continue
                if msg == b"grow" and self.enabled:
                    try:
                        self._grow()
                    except Exception as e:  # noqa: BLE001 - logged; the server serves at its width
                        _log(f"ERROR: scale-up failed: {type(e).__name__}: {e}")
                        self.add_rank_last = {"decision": "failed", "why": f"{type(e).__name__}: {e}",
                                              "tp_after": len(self.ranks)}
                        self._unstick(e)
                    finally:
                        self._grow_requested = False
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
                        _log(f"ERROR: expert rebalance failed: {type(e).__name__}: {e}")
                        self._unstick(e)
                try:
                    self._check_self_reported(live)
                except Exception as e:  # noqa: BLE001 - logged; the fallback already ran or is impossible
                    _log(f"ERROR: recovery failed: {type(e).__name__}: {e}")
                continue
            if dead and self.enabled:
                from sgl_elastic.controller.drain import stopping

                time.sleep(0.05)  # Ctrl-C reaches the ranks and the main process together
                if stopping():
                    _log("the server is shutting down (SIGTERM or Ctrl-C): the ranks' exits are not failures")
                    self.enabled = False
                    return
                time.sleep(0.1)  # a shutdown kills every rank at once: tell it from a failure
                if not self.enabled or not any(p.is_alive() for p in live if p not in dead):
                    _log("every rank is gone (server shutting down, or a total failure): no recovery")
                    self.enabled = False
                    return
                try:
                    self._recover(dead)
                except Exception as e:  # noqa: BLE001 - logged; the fallback already ran or is impossible
                    _log(f"ERROR: recovery failed: {type(e).__name__}: {e}")
                    self._unstick(e)

    # ---- scale-up ---------------------------------------------------------------------------------------
    def request_add_rank(self) -> tuple[str | None, int]:
        """``POST /elastic/add_rank``: (error, http status); None: accepted, the scale-up runs in the
        controller's thread (a recovery in /elastic/status)."""
        from sgl_elastic.planner.cmm import plan_migration
        from sgl_elastic.planner.plan import ClusterChange

        with self.lock:
            if not self.enabled or self._wake_w is None:
                return "in-place failover is off (--no-elastic-failover, or tp 1 at start): no scale-up", 409
            if self._spawn is None:
                return "scale-up needs the launcher's record of how ranks start (not available)", 409
            if self.phase is not Phase.SERVING or self._grow_requested:
                return f"a recovery or scale-up is in progress (phase {self.phase.value}); try again when serving", 409
            try:
                plan_migration(self.layout, ClusterChange(added=1))
            except ValueError as e:
                return f"cannot add a rank to the {len(self.ranks)} serving: {e}", 409
            self._grow_requested = True
        self._wake_w.send(b"grow")
        return None, 202

    # ---- expert rebalance -------------------------------------------------------------------------------
    def request_rebalance(self, algorithm: str = "ours") -> tuple[str | None, int]:
        """``POST /elastic/rebalance``: (error, http status); None: accepted, it runs in the controller's
        thread (a recovery in /elastic/status when experts move, else ``eplb.last`` says why not).
        ``algorithm``: ``controller.placers`` (another than ours is applied whenever it moves experts)."""
        from sgl_elastic.controller import placers

        if algorithm not in placers.ALGORITHMS:
            return f"unknown placement algorithm {algorithm!r}; choose one of {', '.join(placers.ALGORITHMS)}", 400
        with self.lock:
            if not self.enabled or self._wake_w is None:
                return "in-place failover is off (--no-elastic-failover, or tp 1 at start): no rebalance", 409
            if not self.eplb:
                return "expert rebalancing needs expert parallelism (--ep-size == --tp) and --elastic-eplb", 409
            if self.phase is not Phase.SERVING or self._rebalance_requested or self._grow_requested:
                return f"a recovery or scale-up is in progress (phase {self.phase.value}); try again when serving", 409
            why = placers.fits(algorithm, self.layout) if self.layout is not None else None
            if why:
                return why, 409
            self._rebalance_requested = True
            self._rebalance_algorithm = algorithm
        self._wake_w.send(b"rebalance")
        return None, 202

    def _eplb_loads(self):
        """Rank 0's expert loads since the last placement, or None (off, or nothing routed yet)."""
        if not self.eplb or self._loads is None:
            return None
        loads = self._loads.loads()
        return loads if loads is not None and loads.sum() > 0 else None

    def _imbalance_now(self) -> float | None:
        """The served placement's imbalance under the loads since the last placement (None: no loads)."""
        loads = self._eplb_loads()
        if loads is None or self.layout is None:
            return None
        from sgl_elastic.planner.experts import default_capacity, expert_imbalance

        return round(expert_imbalance(self.layout, loads, default_capacity(self.layout)), 4)

    def _rebalance(self, forced: bool, algorithm: str = "ours") -> None:
        """Place the experts by the loads measured since the last placement, and move them (a recovery
        with no failure: the ranks regroup) when that lowers the imbalance by >= 5 % (``forced``: at all;
        another ``algorithm`` than ours: whenever it moves experts, to measure it)."""
        from sgl_elastic.controller.placers import placer
        from sgl_elastic.planner.cmm import plan_migration
        from sgl_elastic.planner.experts import default_capacity, expert_imbalance
        from sgl_elastic.planner.plan import ClusterChange

        t0 = time.monotonic()
        loads = self._eplb_loads()
        if loads is None:
            self.eplb_last = {"decision": "skipped", "why": "no expert loads measured since the last placement"}
            _log(f"expert rebalance: {self.eplb_last['why']}")
            return
        plan = plan_migration(self.layout, ClusterChange(), expert_loads=loads, rebalance_experts=True,
                              expert_placer=placer(algorithm))
        cap = default_capacity(self.layout)
        before, after = expert_imbalance(self.layout, loads, cap), expert_imbalance(plan.new_layout, loads, cap)
        moved = plan.peer_bytes + plan.reload_bytes
        self.eplb_last = {"imbalance_before": round(before, 4), "imbalance_after": round(after, 4),
                          "tokens": float(loads.sum()), "moved_bytes": moved,
                          "plan_s": round(time.monotonic() - t0, 4), "algorithm": algorithm}
        if moved == 0 or (algorithm == "ours" and (after >= before or (not forced and after > 0.95 * before))):
            self.eplb_last |= {"decision": "skipped", "why": "the placement is already as good (within 5 %)"
                               if moved else "the experts are already placed so"}
            _log(f"expert rebalance skipped: imbalance {before:.3f} -> {after:.3f}, {moved / 1e6:.1f} MB to move")
            return
        self.eplb_last["decision"] = "moving"
        self._recover([], plan=plan, reason=f"expert rebalance: imbalance {before:.3f} -> {after:.3f} over"
                                         f" {loads.sum():.0f} routed tokens, moving {moved / 1e6:.1f} MB")
        self.eplb_last["decision"] = "moved" if self.recoveries[-1].outcome == "ok" else "failed"

    def _free_slot(self) -> int:
        with self.lock:
            used = {self._slot_of.get(p.pid, -1) for p in self.ranks if p.is_alive()}
        return next(i for i in range(len(used) + 1) if i not in used)

    def _keep_standby(self, live: list) -> None:
        """Keep ``standby_target`` warm standbys, spawned once every rank serves (its heartbeat is up)."""
        self.standby = [p for p in self.standby if p.is_alive()]
        if self._spawn is None or len(self.standby) >= self.standby_target:
            return
        if self.hung_timeout_s > 0 and not all(os.path.exists(wire.heartbeat_path(self._addr, p.pid)) for p in live):
            return
        p = self._spawn(-1, True)
        self.standby.append(p)
        _log(f"warm standby started (pid {p.pid}): a scale-up will not pay the import")

    def _grow(self) -> None:
        """Start (or take the standby's) new rank process, wait for its hello, then recover with it."""
        t0 = time.monotonic()
        self.standby = [p for p in self.standby if p.is_alive()]
        slot = self._free_slot()
        joiner = self.standby.pop(0) if self.standby else self._spawn(slot, False)
        self._joiner_slot = slot
        self._joiners.append(joiner)
        _log(f"scale-up: new rank process pid {joiner.pid} (slot {slot}); waiting for it to check in")
        got: dict[int, bytes] = {}
        try:
            while joiner.pid not in got:
                if joiner.pid in self._spare_hellos:
                    got[joiner.pid] = self._spare_hellos.pop(joiner.pid)
                    break
                if time.monotonic() - t0 > JOIN_TIMEOUT_S:
                    raise RuntimeError(f"the new rank (pid {joiner.pid}) did not check in within {JOIN_TIMEOUT_S:.0f} s")
                if not joiner.is_alive():
                    raise RuntimeError(f"the new rank process (pid {joiner.pid}) exited ({joiner.exitcode}) before joining")
                with self.lock:
                    dead = [p for p in self.ranks if p.pid not in self.departed and not p.is_alive()]
                if dead:  # the accepted scale-up waits for that recovery, then goes on
                    _log("a rank died while the new one was starting: recovering from that first; the scale-up"
                         " goes on after it")
                    self._recover(dead)
                    continue
                try:
                    self._collect(got, {joiner.pid}, -1, 0.5, "hello")
                except _Stragglers:
                    pass
        except Exception:
            self._joiners.remove(joiner)
            if joiner.is_alive():
                sigkill(joiner.pid)
            raise
        _log(f"scale-up: the new rank checked in {time.monotonic() - t0:.2f} s after the request")
        self._recover([], got, joiner=joiner)
        rec = self.recoveries[-1]
        self.add_rank_last = {"decision": "done" if rec.outcome == "ok" else "failed", "why": rec.outcome,
                              "tp_after": len(self.ranks)}

    def _unstick(self, e: Exception) -> None:
        """After an error escaped a recovery: a recovery left half-way (neither serving nor failed)
        would hold every request forever, so it fails now and falls back to restarting every scheduler
        (the requests in flight get an error; later ones are served)."""
        if self.phase in (Phase.SERVING, Phase.FAILED) or not self.enabled:
            return
        rec = self.recoveries[-1] if self.recoveries else None
        if rec is None:
            return
        rec.outcome = f"failed: {type(e).__name__}: {e}"
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
            _log(f"ERROR: the fallback after a stuck recovery failed: {type(e2).__name__}: {e2}")

    def _fence_silent(self, live: list) -> None:
        """SIGKILL every rank whose heartbeat is older than the hung timeout (the sentinel then fires)."""

        for pid in self._hung(p.pid for p in live):
            _log(f"rank pid {pid} silent for {self.silent_s(pid):.1f} s (> --elastic-hung-timeout"
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
        settle = time.monotonic() + SELF_REPORT_SETTLE_S
        while True:
            if any(not p.is_alive() for p in live):
                return  # a death: the next turn recovers from it with these hellos
            if pids <= got.keys() or time.monotonic() >= settle:
                break
            time.sleep(0.05)
            got |= self._drain_hellos()
        mine = {pid: m.reason for pid, m in got.items() if pid in pids and not wire.peer_failure(m.reason)}
        _log(f"rank(s) {sorted(self.ranks.index(p) for p in live if p.pid in got)} left their group with no rank"
             f" dead; their own errors: {mine or 'none'}")
        if mine and len(mine) < len(live):
            for pid, reason in mine.items():
                _log(f"fencing rank pid {pid} (SIGKILL): its event loop stopped on its own error ({reason})")
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
        rec.outcome = "failed: no rank to blame; requests in flight end with an error"
        self._to(rec, Phase.FAILED, rec.outcome)
        self.metrics.recovery("failed", rec.phases_s, 0.0, 0)
        self._fallback(rec)

    def _after_serving(self) -> None:
        """Serving again after a recovery: reap what the dead left, note what the rebuilt ranks map."""
        try:
            self._reap_shm()
            with self.lock:
                live = [p for p in self.ranks if p.pid not in self.departed]
            self._note_shm(live)
        except Exception as e:  # noqa: BLE001 - housekeeping: never fails a recovery
            _log(f"shared-memory housekeeping failed: {type(e).__name__}: {e}")

    def _note_shm(self, live: list) -> None:
        for p in live:
            self._shm_of[p.pid] = shm_inodes_of([p.pid])
        self._shm_noted_at = time.monotonic()

    def _reap_shm(self) -> None:
        """Unlink the /dev/shm files SGLang's schedulers left that no live process of this server maps:
        any file a rank that died had mapped (a SIGKILLed process cleans nothing), and a survivor's
        own message queues (``sgl_shm_*``) of the scheduler it replaced."""
        import psutil

        def gone(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        dead = [pid for pid in self._shm_of if gone(pid)]
        of_dead = set().union(*(self._shm_of.pop(pid) for pid in dead))
        # SGLang names a scheduler's message queues after its pid: a rank that died before its files
        # were noted (one that died while it rebuilt) is found by name
        named = tuple(f"sgl_shm_mq_{pid}_" for pid in sorted(self.departed) if gone(pid))
        of_live = set().union(*self._shm_of.values())
        keep = shm_inodes_of([os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))])
        removed = []
        for e in os.scandir("/dev/shm"):
            try:
                ino = e.inode()
                if ino in keep or e.name.startswith("sgle-"):  # in use, or the daemon's
                    continue
                if ino in of_dead or (ino in of_live and e.name.startswith("sgl_shm_")) or \
                        (named and e.name.startswith(named)):
                    os.unlink(e.path)
                    removed.append(e.name)
            except OSError:
                continue
        if removed:
            _log(f"removed {len(removed)} /dev/shm file(s) the replaced schedulers left"
                 f" (dead ranks {dead}): {sorted(removed)[:4]}")

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

    def _clear_regroup(self) -> None:
        """Withdraw a regroup request that no rank took (each has left its group already)."""
        try:
            os.unlink(wire.regroup_path(self._addr))
        except FileNotFoundError:
            pass

    def _recv_control(self) -> tuple[bytes, object]:
        """One message of the control socket (a message is waiting): (sender, decoded; None if malformed)."""
        ident, data = self._sock.recv_multipart()
        try:
            return ident, wire.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            _log(f"dropped a malformed control message: {e}")
            return ident, None

    def _to(self, rec: Recovery | None, new: Phase, why: str) -> None:
        now = time.monotonic()
        with self.lock:
            old = self.phase
            self.phase = transition(self.phase, new, why)
            if rec is not None and old is not Phase.SERVING and rec is self._phase_rec:
                rec.phases_s[old.value] = round(now - self._phase_t0, 4)
            self._phase_rec = rec
            self._phase_t0 = now
        if new.value in self._delays:  # tests only (wire.ENV_TEST_DELAYS)
            time.sleep(self._delays[new.value])

    # ---- recovery -------------------------------------------------------------------------------------
    def _recover(self, dead: list, hellos: dict[int, bytes] | None = None, checkin_s: float | None = None,
                 joiner=None, plan=None, reason: str = "") -> None:
        """Recover from the death of ``dead`` (processes of the current ranks), or, with ``joiner``
        (a new rank process that said hello), grow by one rank, or, with neither, apply ``plan`` (an
        expert rebalance); with no death the ranks are asked to regroup. Without ``plan`` the
        planner places the experts by the measured loads (``--elastic-eplb``)."""
        from sgl_elastic.planner.cmm import plan_migration
        from sgl_elastic.planner.plan import ClusterChange

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
        rec = Recovery(epoch=epoch, reason=why,
                       failed_ranks=failed, tp_before=len(ranks), t_fault=t_fault)
        self.recoveries.append(rec)
        survivors = [p for i, p in enumerate(ranks) if i not in failed] + ([joiner] if joiner is not None else [])
        given, plan = plan, None
        before_move = False  # a straggler found before the migration (a regroup's check-in)
        self._to(rec, Phase.FROZEN, rec.reason)
        if joiner is not None or not dead:  # rank 0 takes the request and broadcasts a Regroup marker to every rank
            with open(wire.regroup_path(self._addr), "w") as f:
                f.write(str(epoch))
        try:
            if not survivors:
                raise RuntimeError("no rank survived")
            # planning
            self._to(rec, Phase.PLANNING, f"{len(survivors)} survivors")
            loads = None if given is not None else self._eplb_loads()
            plan = given or plan_migration(self.layout, ClusterChange(failed=tuple(failed), added=1 if joiner is not None else 0),
                                           expert_loads=loads)
            if loads is not None and _is_placed(plan.new_layout):
                _log(f"experts placed by the loads of {loads.sum():.0f} routed tokens (capacity-weighted)")
            # migrating (after a failure the survivors tear down meanwhile and check in)
            self._to(rec, Phase.MIGRATING, f"plan: keep {plan.keep_bytes / 1e6:.1f} MB, peer"
                     f" {plan.peer_bytes / 1e6:.1f} MB, reload {plan.reload_bytes / 1e6:.1f} MB"
                     f" (lower bound {plan.lower_bound_reload_bytes / 1e6:.1f} MB)")
            alive = {p.pid for p in survivors}
            hellos = {pid: self._spare_hellos.pop(pid) for pid in list(self._spare_hellos) if pid in alive} | {
                pid: ident for pid, ident in (hellos or {}).items() if pid in alive}
            if not dead:  # a regroup: the ranks serve until they take the marker, from the very shards the
                # migration moves in place: it waits until every one has stopped and checked in
                try:
                    self._collect(hellos, alive, epoch, checkin_s or self.checkin_timeout_s, "hello")
                except _Stragglers as s:
                    s = self._fence_hung_first(s, hellos, alive, epoch)
                    straggle = (s, self.layout, list(ranks), hellos, self.checkin_timeout_s)
                    before_move = True
                    raise _Retry() from None
            daemon_dir = self._migrate(rec, plan)
            # reconfiguring
            self._to(rec, Phase.RECONFIGURING, f"migrated in {rec.migration['seconds']:.3f} s")
            new_tp = plan.new_layout.tp_size
            new_ranks: list = [None] * new_tp
            for old_rank, p in enumerate(ranks):
                if plan.old2new_rank[old_rank] >= 0:
                    new_ranks[plan.old2new_rank[old_rank]] = p
            if joiner is not None:
                new_ranks[plan.new2slot.index(len(ranks))] = joiner
            try:
                self._collect(hellos, {p.pid for p in survivors}, epoch, checkin_s or self.checkin_timeout_s, "hello")
            except _Stragglers as s:
                s = self._fence_hung_first(s, hellos, {p.pid for p in survivors}, epoch)
                straggle = (s, plan.new_layout, new_ranks, hellos, self.checkin_timeout_s)
                raise _Retry() from None
            self._clear_regroup()  # every rank has left its group: a request left now would regroup later
            port = free_port()
            bind = self._omp_bind(new_tp)
            layout_bytes = plan.new_layout.to_bytes()
            takeover = b""
            if new_ranks[0].pid != self.intake_pid:  # rank 0 died (or moves): the new rank 0 takes over
                takeover = self._takeover()
                _log(f"rank 0's process is gone: rank 0 of epoch {epoch} (pid {new_ranks[0].pid}) takes over"
                     f" its intake ({len(takeover)} bytes of request state)")
            for p in survivors:
                new_rank = new_ranks.index(p)
                self._sock.send_multipart([hellos[p.pid], wire.encode(wire.Reconfigure(
                    epoch=epoch, rank=new_rank, tp_size=new_tp, layout=layout_bytes, dist_port=port,
                    omp_bind=bind, takeover=takeover if new_rank == 0 else b"",
                    # always the current one: a joiner started before the daemon was replaced knows the old
                    daemon_dir=daemon_dir or (self.daemon.proc.run_dir if self.daemon.proc is not None else ""),
                    gpu_slot=self._joiner_slot if p is joiner else -1))])
            readies: dict[int, wire.RankReady] = {}
            failed_builds: dict[int, str] = {}
            try:
                self._collect(readies, {p.pid for p in survivors}, epoch, READY_TIMEOUT_S, "ready", failed_builds)
            except _Stragglers as s:  # died or hung while rebuilding: the others' rebuild fails (their
                # rendezvous is bounded), they check in again, and a new recovery goes on without it
                self._hello_ids = {}
                straggle = (s, plan.new_layout, new_ranks, {}, self.checkin_timeout_s + REBUILD_RETRY_S)
                raise _Retry() from None
            if failed_builds and not self.daemon.alive():
                # case: the state daemon died after the migration, before the ranks attached. They ask
                # again (their rebuild is retried); a new recovery of the same layout starts a new daemon
                _log(f"the state daemon died before the ranks attached ({len(failed_builds)} rebuild(s) failed);"
                     " recovering again with a new daemon")
                self._hello_ids = {}
                straggle = (_Stragglers([], "the state daemon died during the rebuild"), plan.new_layout, new_ranks,
                            {}, self.checkin_timeout_s + REBUILD_RETRY_S)
                raise _Retry()
            if failed_builds:
                raise RuntimeError(f"survivors could not rebuild: {failed_builds}")
            with self.lock:
                self.ranks = new_ranks
                self.layout = plan.new_layout
                self.intake_pid = new_ranks[0].pid
                if joiner is not None:
                    self._slot_of[joiner.pid] = self._joiner_slot
                    self._joiners = [j for j in self._joiners if j is not joiner]
            self._on_new_layout(plan.new_layout)
            if bind:
                os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = bind
            rec.resumed_requests = sum(r.resumed for r in readies.values())
            rec.resubmitted_requests = sum(r.resubmitted for r in readies.values())
            lost = sorted({rid for r in readies.values() for rid in r.unresumable})
            rec.failed_requests = len(lost)
            if lost:  # every accepted request completes or gets an explicit error
                from sgl_elastic.controller.supervisor import supervisor

                n = supervisor().fail_requests(lost, "sgl-elastic: a TP rank failed and this request could not be"
                                                     " resumed on the survivors; retry it", self.tokenizer)
                _log(f"ERROR: {n} request(s) could not be resumed and ended with a 503: {lost}")
            rec.tp_after = new_tp
            rec.widths_after = list(plan.new_layout.family("attn").widths)
            self._to(rec, Phase.RESUMING, f"{new_tp} ranks rebuilt; {rec.resumed_requests} requests resumed")
            rec.recovery_s = round(time.monotonic() - t_fault, 4)
            rec.outcome = "ok"
            if self._loads is not None and (given is not None or loads is not None):
                self._loads.mark()  # loads start again under the new placement
            self._eplb_t = time.monotonic()
            self._pending_tfs = rec
            self._to(rec, Phase.SERVING, f"epoch {epoch} at tp {new_tp}, widths {rec.widths_after},"
                     f" {rec.recovery_s:.3f} s after the fault")
            self.metrics.recovery("ok", rec.phases_s, rec.recovery_s, rec.resumed_requests)
            self.metrics.serving(new_tp, epoch)
            self._after_serving()
        except _Retry:
            # before the migration the joiner is not a rank yet: the next recovery still adds it
            pending_joiner = joiner if before_move else None
            return self._without(rec, *straggle, joiner=pending_joiner)
        except Exception as e:
            # failed inside the migration: what the daemon holds is in doubt (see _fallback)
            reload = plan.new_layout if plan is not None and self.phase is Phase.MIGRATING else None
            rec.outcome = f"failed: {type(e).__name__}: {e}"
            self.falling_back = True  # before the Retires: a retired rank's SIGQUIT must not end the server
            self._to(rec, Phase.FAILED, rec.outcome)
            self.metrics.recovery("failed", rec.phases_s, 0.0, 0)
            for pid in list(self._hello_ids):
                self._sock.send_multipart([self._hello_ids[pid], wire.encode(wire.Retire(epoch=epoch, reason=str(e)))])
            self._fallback(rec, reload)
            raise

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
                rec.migration = {"seconds": round(time.monotonic() - t0, 4), "keep_bytes": summary.keep_bytes,
                                 "peer_bytes": summary.peer_bytes, "reload_bytes": summary.reload_bytes,
                                 "file_bytes_read": summary.file_bytes_read, "achieved_s": summary.achieved_s,
                                 "alloc_s": summary.alloc_s, "reload_s": summary.reload_s, "copy_s": summary.copy_s, "move_s": summary.move_s,
                                 "predicted_s": summary.predicted_s, "in_place_ranks": summary.in_place_ranks,
                                 "alloc_bytes": summary.alloc_bytes, "kv_kept_slots": summary.kv_kept_slots,
                                 "kv_s": summary.kv_s,
                                 "lower_bound_reload_bytes": plan.lower_bound_reload_bytes}
                self.daemon.layout = plan.new_layout
                return ""
            except (DaemonUnavailable, DaemonError, OSError) as e:
                if self.daemon.alive():
                    raise
                _log(f"the state daemon died during the migration ({type(e).__name__}: {e})")
        _log("ERROR: the state daemon is gone: starting a new one, which loads the new layout from the checkpoint"
             " (every byte again: its memory died with it)")
        self.daemon.layout = plan.new_layout
        for attempt in range(1, DAEMON_STARTS + 1):  # a new daemon can die while it starts, too
            try:
                self.daemon.ensure()
                break
            except (RuntimeError, TimeoutError, DaemonUnavailable, DaemonError, OSError) as e:
                if attempt == DAEMON_STARTS:
                    raise
                _log(f"the new state daemon failed to start ({type(e).__name__}: {e}); starting another"
                     f" ({attempt + 1} of {DAEMON_STARTS})")
        with self.daemon.proc.client(timeout=30.0) as c:
            read = c.stats().checkpoint_bytes_read
        rec.migration = {"seconds": round(time.monotonic() - t0, 4), "daemon_restarted": 1.0,
                         "reload_bytes": read, "file_bytes_read": read}
        return self.daemon.proc.run_dir

    def _fence_hung_first(self, s: _Stragglers, hellos: dict, pids: set[int], epoch: int) -> _Stragglers:
        """Of the survivors that did not check in, some may only be blocked in a collective with a
        hung one. Fence the stopped ones first (SIGKILL: their peers' sockets reset), give the others
        a short grace to check in, and return who is still missing."""
        import psutil

        def stopped(pid: int) -> bool:
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
        _log(f"fenced stopped rank pid(s) {hung}; waiting for the others to check in")
        try:
            self._collect(hellos, pids - set(hung), epoch, max(2.0, self.checkin_timeout_s / 2), "hello")
            return _Stragglers(hung, f"rank pid(s) {hung} were stopped (hung) and did not check in")
        except _Stragglers as s2:
            return _Stragglers(sorted(set(hung) | set(s2.pids)), f"{s}; then {s2}")

    def _without(self, rec: Recovery, s: _Stragglers, layout, ranks: list, hellos: dict[int, bytes],
                 checkin_s: float | None = None, joiner=None) -> None:
        """Abandon ``rec``: fence the stragglers (SIGKILL) and recover again, from ``layout`` (what the
        daemon holds now), without them. The survivors that checked in keep waiting for orders."""
        sigkill(*s.pids)
        rec.outcome = f"superseded: {s}; fenced pids {s.pids} and recovering again without them"
        rec.phases_s[self.phase.value] = round(time.monotonic() - self._phase_t0, 4)
        _log(rec.outcome)
        with self.lock:
            self.layout, self.ranks = layout, ranks
        self._on_new_layout(layout)
        with self.lock:
            self._joiners = [j for j in self._joiners if j.pid not in s.pids]
        if joiner is not None and (joiner.pid in s.pids or not joiner.is_alive()):
            joiner = None  # the new rank itself failed: the scale-up is over (the status says so)
        dead = [p for p in ranks if p.pid in s.pids]  # the next recovery moves RECONFIGURING -> FROZEN
        self._recover(dead, hellos, checkin_s, joiner=joiner)

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
            _log("the server is shutting down: no fallback restart")
            self.enabled = False
            rec.fallback = "skipped: shutting down"
            return
        t0 = time.monotonic()
        self.falling_back = True
        rec.fallback = "running"
        try:
            if "fallback" in self._faults:
                raise RuntimeError(f"{wire.ENV_TEST_FAIL}=fallback: injected failure of the fallback restart (tests only)")
            if reload is not None:
                _log("the recovery failed inside the migration: replacing the state daemon with one that loads the"
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
            if bind:
                os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = bind
            _log(f"falling back to restarting every scheduler from the daemon, at tp {tp}")
            why, again = f"in-place failover {rec.outcome}", ""
            try:
                procs = supervisor().restart(why, procs=old, tp_size=tp)
            except Exception as e:  # noqa: BLE001 - once more, below
                if reload is not None:  # the daemon is new already
                    raise
                # what the schedulers could not start from may be the daemon's memory (a migration
                # that left it wrong): once more, from a new daemon that reads the checkpoint again
                again = f"{type(e).__name__}: {e}"
                _log(f"ERROR: the fallback restart failed ({again}); once more, with a new state daemon that loads"
                     f" tp {tp} from the checkpoint")
                self.daemon.stop()
                self.daemon.ensure()
                procs = supervisor().restart(f"{why}; again with a new daemon", procs=old, tp_size=tp)
        except Exception as e:  # noqa: BLE001 - reported in /elastic/status; the server stays FAILED
            rec.fallback = f"failed: {type(e).__name__}: {e}"
            rec.outcome += f"; fallback restart failed: {type(e).__name__}: {e}"
            _log(f"ERROR: the fallback restart failed ({type(e).__name__}: {e}); the server cannot serve until it"
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
            rec.outcome += f"; fallback restart at tp {tp} done"
            rec.tp_after = tp
            rec.widths_after = list(layout.family("attn").widths)
            rec.recovery_s = round(time.monotonic() - rec.t_fault, 4)
            self._pending_tfs = rec
            self._to(rec, Phase.SERVING, f"fallback restart at tp {tp} done in {time.monotonic() - t0:.2f} s;"
                     f" epoch {self.epoch}, widths {rec.widths_after}")
            self._after_serving()
        finally:
            self.falling_back = False

    def _collect(self, into: dict, pids: set[int], epoch: int, timeout: float, kind: str,
                 failed: dict[int, str] | None = None) -> None:
        """Receive messages until every pid in ``pids`` sent ``kind`` for ``epoch`` (bounded).

        Raises ``_Stragglers`` for ranks that die, go silent (hung) or miss the deadline. A
        ``RankFailed`` raises too, unless ``failed`` collects them: then, once everyone answered,
        a short settle tells a rebuild failed by a peer's death (the dead are raised) from a real one."""
        import zmq

        def check_dead() -> None:
            with self.lock:
                dead = [p for p in self.ranks + self._joiners if p.pid in pids and not p.is_alive()]
            if dead:
                raise _Stragglers([p.pid for p in dead], f"rank pid(s) {[p.pid for p in dead]} died during the recovery")

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
                raise _Stragglers(missing, f"ranks with pids {missing} did not say {kind} within {timeout:.0f} s")
            if not self._sock.poll(int(min(left, 0.1 if settle else 0.5) * 1000), zmq.POLLIN):
                check_dead()
                hung = self._hung(sorted(pids - done))
                if hung:
                    raise _Stragglers(hung, f"rank pid(s) {hung} silent for more than {self.hung_timeout_s:g} s (hung)")
                continue
            ident, msg = self._recv_control()
            if isinstance(msg, wire.RankHello):
                self._hello_ids[msg.pid] = ident
                if kind == "hello" and msg.pid in pids:
                    into[msg.pid] = ident
                    _log(f"rank {msg.rank} (pid {msg.pid}) checked in: {msg.reason}")
                else:  # a new rank (or one this recovery does not wait for): kept for the one that will
                    self._spare_hellos[msg.pid] = ident
            elif isinstance(msg, wire.RankReady) and msg.epoch == epoch and kind == "ready":
                into[msg.pid] = msg
            elif isinstance(msg, wire.RankFailed) and msg.epoch == epoch:
                if failed is None:
                    raise _Stragglers([msg.pid], f"rank {msg.rank} (pid {msg.pid}) failed to rebuild: {msg.reason}")
                failed[msg.pid] = msg.reason
                _log(f"rank {msg.rank} (pid {msg.pid}) could not rebuild: {msg.reason}")
                check_dead()


_controller = FailoverController()


def controller() -> FailoverController:
    return _controller
