"""In-place failover (main process): a TP rank dies, the surviving scheduler processes go on at tp-1.

``FailoverController`` owns the rank processes' lifecycle after start and wires the jobs, one module
each (every one a mixin over the controller's state):

- ``detection``: the detector's thread (rank deaths by sentinel, hung ranks by heartbeat, ranks that
  left on their own error) and the admin commands it carries out (``commands``);
- ``recovery``: the recovery state machine as named steps (``phases``: its phases and record);
- ``takeover``: the requests a new rank 0 takes over when rank 0's process died;
- ``scaleup``: ``add_rank`` and warm standbys; ``rebalancing``: expert rebalancing;
- ``shm_reaper``: the /dev/shm files replaced schedulers left; ``fallback``: the restart of every
  scheduler when in-place recovery fails, and state failed.

Here: arming (the control socket, before SGLang spawns the schedulers), status, the probes' answer,
the request audit's thread, and injected failures' checks. Test-only hooks: ``faults``.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time

from sgl_elastic.controller import wire
from sgl_elastic.controller.accounting import RequestAccounts
from sgl_elastic.controller.commands import AddRank, CommandQueue, JoinNode, Rebalance, Stop
from sgl_elastic.controller.detection import Detection
from sgl_elastic.controller.fallback import FAILED_MSG, Fallback, sigquit_self
from sgl_elastic.controller.metrics import FailoverMetrics
from sgl_elastic.controller.procs import set_remote_fence
from sgl_elastic.controller.phases import IllegalPhaseTransition, Outcome, Phase, Recovery, log, transition
from sgl_elastic.controller.rebalancing import ExpertRebalance
from sgl_elastic.controller.recovery import HELLO_TIMEOUT_S, RecoverySteps
from sgl_elastic.controller.scaleup import ScaleUp
from sgl_elastic.controller.shm_reaper import ShmHousekeeping
from sgl_elastic.controller.takeover import RequestTakeover

__all__ = ["Phase", "IllegalPhaseTransition", "transition", "Outcome", "Recovery", "FAILED_MSG",
           "FailoverController", "controller"]

HUNG_TIMEOUT_S = 5.0  # default: a rank whose heartbeat is this old is fenced (its process does not run)


def is_placed(layout) -> bool:
    from sgl_elastic.planner.experts import is_placed as placed

    return placed(layout)


class FailoverController(Detection, RecoverySteps, RequestTakeover, ScaleUp, ExpertRebalance, ShmHousekeeping,
                         Fallback):
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
        self.commands = CommandQueue()  # add_rank / rebalance from the admin API, run in the detector's thread
        self._thread: threading.Thread | None = None
        self._phase_t0 = time.monotonic()
        self._phase_rec: Recovery | None = None
        self._pending_tfs: Recovery | None = None
        self._hello_ids: dict[int, bytes] = {}
        self.checkin_timeout_s = HELLO_TIMEOUT_S
        self.metrics = FailoverMetrics()
        self.dispatched: dict[str, object] = {}  # rid -> tokenized input, as sent to rank 0 (main process)
        self.accounts = RequestAccounts()  # every accepted request ends once; the audit finds lost ones
        self.end_server = sigquit_self  # state failed: SGLang's tear-down (a test replaces it)
        self._audit_thread: threading.Thread | None = None
        self._sweep_at = 64
        self.tokenizer = None  # SGLang's TokenizerManager (main process), set by its dispatch hook
        self.intake_pid = 0  # the process serving rank 0 (request intake, output streaming)
        self.hung_timeout_s = HUNG_TIMEOUT_S
        self.hung_fenced: list[int] = []  # pids fenced because their heartbeat stopped
        self.error_fenced: dict[int, str] = {}  # pids fenced because their event loop stopped on their own error
        self._shm_of: dict[int, set[int]] = {}  # rank pid -> inodes of the /dev/shm files it maps (SGLang's)
        self._shm_noted_at = 0.0
        self._spare_hellos: dict[int, bytes] = {}  # hellos of processes no recovery waited for yet (a new rank)
        self._spawn = None  # spawn(slot, standby) -> started Process of a new rank (the launcher's)
        self.standby_target = 0  # warm standby processes to keep (--elastic-standby)
        self.standby: list = []  # warm standby processes (imported, waiting for orders)
        self._joiners: list = []  # new rank processes not serving yet
        self._joiner_slot = -1  # device slot of the scale-up's new rank
        self._slot_of: dict[int, int] = {}  # pid -> device slot (GPU index offset) of every rank process
        self.falling_back = False  # the fallback restart runs (a retired rank's SIGQUIT is part of it)
        self.eplb = False  # expert parallelism: place experts by measured loads (--elastic-eplb)
        self.eplb_interval_s = 0.0  # and rebalance this often while serving (0: only at recoveries)
        self._loads = None  # moe.loads.LoadReader of rank 0's counts
        self._eplb_t = time.monotonic()  # last periodic rebalance check (or the last recovery)
        self.eplb_last: dict = {}  # the last rebalance decision, for /elastic/status
        self.add_rank_last: dict = {}  # the last scale-up's end (decision, why, tp_after), for /elastic/status
        self.node_link_gbps = 0.0  # the network between nodes, as the planner models it (0: nodes.INTER_GBPS)
        self.hub = None  # controller.nodes.NodeHub with --nnodes > 1: the other nodes' ranks and daemons
        self._first: dict[int, object] = {}  # TP rank -> process of the first launch, as the nodes report them
        self._node_joiners: dict[int, list] = {}  # node -> its new rank processes (--elastic-join), not serving yet

    def arm(self, layout, daemon, *, on_new_layout=None, omp_bind=None, checkin_timeout_s: float = HELLO_TIMEOUT_S,
            hung_timeout_s: float = HUNG_TIMEOUT_S, spawn=None, standby: int = 0, eplb: bool = True,
            eplb_interval_s: float = 0.0, kv_backup: bool = False, nodes: tuple[str, str, int] | None = None) -> str:
        """Bind the control socket; returns its endpoint (exported to the schedulers as SGLE_CONTROL).

        ``on_new_layout(layout)``: called after each recovery (the launcher points the patches of
        this process at it); ``omp_bind(tp) -> str``: SGLANG_CPU_OMP_THREADS_BIND for a tp size
        ("" on GPU); ``hung_timeout_s``: fence a rank silent this long (0: no heartbeat);
        ``spawn(slot, standby) -> Process``: start a new rank process on device slot ``slot``
        (``rank.join``), for ``add_rank``; ``standby``: how many warm standbys to keep; ``eplb``:
        with expert parallelism, rank 0 counts expert loads and every recovery places the experts by
        them; ``eplb_interval_s``: also rebalance this often while serving (0: off); ``kv_backup``:
        every rank mirrors its KV into a backup pool, so a failover keeps the KV (no re-prefill);
        ``nodes``: (rank endpoint, node endpoint, nnodes) with ``--nnodes > 1``: the other nodes' ranks
        connect to the first, their agents to the second (``controller.nodes``).
        """
        import zmq

        self.layout, self.daemon = layout, daemon
        self.checkin_timeout_s = checkin_timeout_s
        self.hung_timeout_s = hung_timeout_s
        self._spawn, self.standby_target = spawn, standby
        self._on_new_layout = on_new_layout or (lambda layout: None)
        self._omp_bind = omp_bind or (lambda tp: "")
        self._dir = tempfile.mkdtemp(prefix="sgle-ctl-")
        os.chmod(self._dir, 0o700)
        addr = self._addr
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(addr)
        if nodes is not None:
            from sgl_elastic.controller.nodes import NodeHub

            self._sock.bind(nodes[0])  # the other nodes' ranks
            self.hub = NodeHub(nodes[1], nodes[2], on_ranks=self._node_ranks)
            hub = self.hub

            def fence(pid: int) -> bool:
                node = hub.node_of(pid)
                if node:
                    hub.fence(node, [pid])
                return bool(node)

            set_remote_fence(fence)
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
        """The scheduler processes, in TP rank order (from the engine hook); starts the detector.
        With several nodes these are node 0's (ranks 0 ..); the others' come from the hub."""
        with self.lock:
            if self.hub is not None and self.epoch == 0:
                self._first.update(enumerate(procs))
                self.ranks = [self._first[r] for r in sorted(self._first)]
            else:
                self.ranks = list(procs)
            self.intake_pid = self.ranks[0].pid if self.ranks else 0
            self._slot_of = {p.pid: i for i, p in enumerate(self.ranks)}
        self.metrics.serving(len(self.ranks), self.epoch)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sgle-failover", daemon=True)
            self._thread.start()
            self._audit_thread = threading.Thread(target=self._audit_loop, name="sgle-request-audit", daemon=True)
            self._audit_thread.start()

    def _node_ranks(self, node: int, ranks: list) -> None:
        """A node's hello (the hub's thread): its ranks of the first launch join ``ranks``; the new
        rank processes of a node that came back (``--elastic-join``: TP rank -1) are added by scale-ups."""
        if ranks and all(r < 0 for r, _ in ranks):
            with self.lock:
                self._node_joiners[node] = [p for _, p in ranks]
            log(f"node {node} joins with {len(ranks)} new rank process(es): adding them one by one")
            self.commands.put(JoinNode(node=node))
            return
        with self.lock:
            if self.epoch != 0:
                log(f"node {node} said hello after a recovery: its ranks {[r for r, _ in ranks]} do not serve"
                    " (a node that comes back joins with --elastic-join)")
                for _, p in ranks:
                    self.hub.fence(node, [p.pid])
                return
            self._first.update(ranks)
            self.ranks = [self._first[r] for r in sorted(self._first)]
            self._slot_of = {p.pid: i for i, p in enumerate(self.ranks)}

    def all_joined(self) -> bool:
        """Every node's ranks are known (always, on one node)."""
        return self.hub is None or (self.hub.complete() and len(self.ranks) == self.layout.tp_size)

    def is_local(self, p) -> bool:
        """Whether rank process ``p`` runs on this node (its pid means something here)."""
        return getattr(p, "node", 0) == 0

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
        self.commands.put(Stop())
        if self.hub is not None:
            self.hub.close()
            set_remote_fence(None)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def status(self) -> dict:
        with self.lock:
            widths = list(self.layout.family("attn").widths) if self.layout is not None else []
            return {
                "state": self.phase.value, "epoch": self.epoch, "tp_size": len(self.ranks),
                "ranks": [{"rank": r, "pid": p.pid, "alive": p.is_alive(), "node": getattr(p, "node", 0)}
                          for r, p in enumerate(self.ranks)],
                "widths": widths,
                "standby": [p.pid for p in self.standby if p.is_alive()],
                "pending": self.commands.pending(),
                "add_rank_last": self.add_rank_last,
                "eplb": {"enabled": self.eplb, "interval_s": self.eplb_interval_s,
                         "placed": bool(self.layout is not None and is_placed(self.layout)),
                         "redundant": (self.layout.family("experts").redundant
                                       if self.layout is not None and "experts" in self.layout.families else 0),
                         "imbalance_now": self._imbalance_now(), "last": self.eplb_last},
                "recoveries": [r.to_status() for r in self.recoveries],
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
            log(f"ERROR: {len(rids)} request(s) accepted but held by no rank (lost): {rids}; {n} ended with a 503")

        while self.enabled:
            time.sleep(0.5)
            try:
                self.metrics.requests(self.accounts.snapshot())
                if self.phase is Phase.SERVING and self._dir and self.accounts.due():
                    self.accounts.audit(self.tokenizer, self._addr, fail)
            except Exception as e:  # noqa: BLE001 - housekeeping: logged, the server serves on
                log(f"request audit: {type(e).__name__}: {e}")

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

    def _carry_out(self, cmd) -> None:
        """One admin command, in the detector's thread (``commands``); its errors are logged and a
        recovery it left half-way falls back (``_unstick``): the server serves on."""
        if isinstance(cmd, Rebalance):
            try:
                self._rebalance(forced=True, algorithm=cmd.algorithm)
            except Exception as e:  # noqa: BLE001 - logged; the server serves at its placement
                log(f"ERROR: expert rebalance failed: {type(e).__name__}: {e}")
                self._unstick(e)
        elif isinstance(cmd, JoinNode):
            with self.lock:
                joiners = self._node_joiners.pop(cmd.node, [])
            for p in joiners:
                try:
                    self._grow(joiner=p)
                except Exception as e:  # noqa: BLE001 - logged; the server serves at its width
                    log(f"ERROR: node {cmd.node}'s rank pid {p.pid} could not join: {type(e).__name__}: {e}")
                    self.add_rank_last = {"decision": "failed", "why": f"{type(e).__name__}: {e}",
                                          "tp_after": len(self.ranks)}
                    self._unstick(e)
                    break
        elif isinstance(cmd, AddRank):
            try:
                self._grow()
            except Exception as e:  # noqa: BLE001 - logged; the server serves at its width
                log(f"ERROR: scale-up failed: {type(e).__name__}: {e}")
                self.add_rank_last = {"decision": "failed", "why": f"{type(e).__name__}: {e}",
                                      "tp_after": len(self.ranks)}
                self._unstick(e)


_controller = FailoverController()


def controller() -> FailoverController:
    return _controller
