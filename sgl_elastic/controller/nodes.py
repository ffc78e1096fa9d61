"""Failover across nodes (``--nnodes N``): node 0's controller sees every node's ranks and daemon.

- Each node >= 1 runs a ``NodeAgent`` in its launcher process (the one SGLang's multi-node launch
  starts there). It says ``NodeHello`` to node 0's ``NodeHub`` over TCP: its TP ranks' pids and
  its state daemon's endpoint. Then, every ``BEAT_S``, ``NodeBeat``; a rank process that dies
  (its sentinel, within milliseconds) or goes silent (its heartbeat file, on the node's own disk:
  fenced by SIGKILL first) is reported as ``RankDied``. The hub's ``Fence`` is a SIGKILL the agent
  sends on its node (a pid means nothing on another node).
- The hub (node 0, a thread of the controller) turns each remote rank into a ``RemoteRank``: a
  process-like proxy (``pid``, ``sentinel``, ``is_alive``) the detector waits on like a local one.
  A node whose beats stop for ``NODE_TIMEOUT_S`` (its processes SIGKILLed together, its host or
  network gone) is lost whole: every rank of it dies at once, and its daemon is no source.
- The remote ranks connect to the controller's rank socket over TCP (``control_endpoints``), and
  keep their heartbeat files in the agent's run dir (``wire.ENV_RUN_DIR``).

Security: the ports are on the nodes' network, as SGLang's own ZMQ ports and torch's rendezvous
are; the agent passes its daemon's token over it. Run multi-node servers on a trusted network.
Malformed messages are dropped and logged.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time

import msgspec

from sgl_elastic.controller import wire
from sgl_elastic.controller.phases import log

__all__ = ["set_agent", "agent", "NodeHello", "NodeBeat", "RankDied", "Fence", "NodeBye", "RemoteRank", "NodeHub", "NodeAgent",
           "control_endpoints", "BEAT_S", "NODE_TIMEOUT_S"]

BEAT_S = 0.2  # an agent's beat period
NODE_TIMEOUT_S = 1.5  # a node silent this long is lost whole
NODE_PORT_OFFSET = 32  # default control port: --dist-init-addr's port + this (SGLang uses +1 .. +6 + dp)


_agent: "NodeAgent | None" = None  # this launcher's agent (a node >= 1), for the engine hook


def set_agent(agent: "NodeAgent | None") -> None:
    global _agent
    _agent = agent


def agent() -> "NodeAgent | None":
    return _agent


class NodeHello(msgspec.Struct, tag="node_hello", frozen=True, kw_only=True):
    node: int
    host: str
    ranks: list[tuple[int, int]]  # (TP rank, pid) of this node's scheduler processes
    daemon: str = ""  # its state daemon's endpoint (tcp://host:port), "" if none
    daemon_token: str = ""


class NodeBeat(msgspec.Struct, tag="node_beat", frozen=True, kw_only=True):
    node: int


class RankDied(msgspec.Struct, tag="rank_died", frozen=True, kw_only=True):
    node: int
    pid: int
    how: str  # "exit <code>" or "hung (fenced)"


class Fence(msgspec.Struct, tag="fence", frozen=True, kw_only=True):
    pids: list[int]


class NodeBye(msgspec.Struct, tag="node_bye", frozen=True, kw_only=True):
    node: int
    reason: str


NodeMessage = NodeHello | NodeBeat | RankDied | Fence | NodeBye
_decoder = msgspec.msgpack.Decoder(NodeMessage)
_encoder = msgspec.msgpack.Encoder()


def control_endpoints(server_args, port: int | None = None) -> tuple[str, str]:
    """(rank socket, node socket) of node 0's controller: TCP on ``--dist-init-addr``'s host, at
    ``port`` and ``port + 1`` (default: the rendezvous port + ``NODE_PORT_OFFSET``)."""
    host, _, dist_port = str(server_args.dist_init_addr).rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    port = port or int(dist_port) + NODE_PORT_OFFSET
    return f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}"


class RemoteRank:
    """A rank process on another node, as the controller sees it (what it needs of a ``Process``)."""

    def __init__(self, pid: int, node: int, tp_rank: int, hub: "NodeHub") -> None:
        self.pid, self.node, self.tp_rank, self._hub = pid, node, tp_rank, hub
        self._r, self._w = os.pipe()  # readable once dead: the detector waits on it like a sentinel
        self._alive = True
        self.how = ""
        self.name = f"node{node}-rank-pid{pid}"

    @property
    def sentinel(self) -> int:
        return self._r

    @property
    def exitcode(self):
        return None if self._alive else -9

    def is_alive(self) -> bool:
        return self._alive

    def mark_dead(self, how: str) -> None:
        if self._alive:
            self._alive, self.how = False, how
            os.write(self._w, b"x")

    def kill(self) -> None:
        self._hub.fence(self.node, [self.pid])

    def __repr__(self) -> str:
        return f"<RemoteRank node {self.node} pid {self.pid} {'alive' if self._alive else 'dead: ' + self.how}>"


class _Node:
    def __init__(self, hello: NodeHello, ident: bytes) -> None:
        self.hello, self.ident = hello, ident
        self.beat = time.monotonic()
        self.alive = True
        self.ranks: dict[int, RemoteRank] = {}


class NodeHub:
    """Node 0's end (a thread of the controller): binds ``endpoint``, keeps the nodes' ranks."""

    def __init__(self, endpoint: str, nnodes: int, on_ranks=None, timeout_s: float = NODE_TIMEOUT_S) -> None:
        import zmq

        self.endpoint, self.nnodes, self.timeout_s = endpoint, nnodes, timeout_s
        self.on_ranks = on_ranks or (lambda node, ranks: None)  # (node, [(tp_rank, RemoteRank)]) on a hello
        self.nodes: dict[int, _Node] = {}
        self.lock = threading.RLock()
        self._out: queue.Queue = queue.Queue()
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="sgle-node-hub", daemon=True)
        self._thread.start()
        self._lifelines = _Lifelines(lifeline_endpoint(endpoint), self._line_cut)

    # ---- what the controller asks -------------------------------------------------------------
    def node_of(self, pid: int) -> int:
        """The node of a rank process (0: a local one)."""
        with self.lock:
            for k, n in self.nodes.items():
                if pid in n.ranks:
                    return k
        return 0

    def remote_pids(self) -> set[int]:
        with self.lock:
            return {pid for n in self.nodes.values() for pid in n.ranks}

    def live_nodes(self) -> list[int]:
        with self.lock:
            return [0] + sorted(k for k, n in self.nodes.items() if n.alive)

    def dead_nodes(self) -> list[int]:
        with self.lock:
            return sorted(k for k, n in self.nodes.items() if not n.alive)

    def complete(self) -> bool:
        """Every node >= 1 said hello."""
        with self.lock:
            return len(self.nodes) >= self.nnodes - 1

    def daemon_client(self, node: int, timeout: float = 30.0):
        from sgl_elastic.daemon.client import DaemonClient

        with self.lock:
            n = self.nodes[node]
            if not n.alive:
                raise RuntimeError(f"node {node} is lost: its daemon is gone")
            return DaemonClient(n.hello.daemon, n.hello.daemon_token, timeout=timeout)

    def fence(self, node: int, pids: list[int]) -> None:
        """SIGKILL ``pids`` on ``node`` (through its agent; a lost node's are gone already)."""
        with self.lock:
            n = self.nodes.get(node)
            if n is None or not n.alive:
                return
        self._out.put((n.ident, _encoder.encode(Fence(pids=list(pids)))))

    def close(self) -> None:
        self._stop = True
        self._lifelines.close()
        self._thread.join(timeout=2.0)

    def _line_cut(self, node: int) -> None:
        """A node's lifeline (a TCP connection its agent holds) closed: its launcher is gone."""
        with self.lock:
            n = self.nodes.get(node)
        if n is not None and n.alive and not self._stop:
            log(f"node {node}'s lifeline closed (its launcher is gone): lost whole")
            self._lose(n, "gone (its lifeline closed)")

    # ---- the thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        import zmq

        try:
            while not self._stop:
                while not self._out.empty():
                    self._sock.send_multipart(list(self._out.get_nowait()))
                if self._sock.poll(50, zmq.POLLIN):
                    ident, data = self._sock.recv_multipart()
                    try:
                        self._on(ident, _decoder.decode(data))
                    except (msgspec.DecodeError, msgspec.ValidationError) as e:
                        log(f"node hub: dropped a malformed message: {e}")
                self._check_beats()
        finally:
            self._sock.close(0)

    def _on(self, ident: bytes, msg) -> None:
        if isinstance(msg, NodeHello):
            with self.lock:
                old = self.nodes.get(msg.node)
                if old is not None and old.alive:
                    log(f"node hub: node {msg.node} said hello again; its earlier ranks are gone")
                    self._lose(old, "it said hello again (restarted)")
                n = _Node(msg, ident)
                n.ranks = {pid: RemoteRank(pid, msg.node, r, self) for r, pid in msg.ranks}
                self.nodes[msg.node] = n
            log(f"node {msg.node} ({msg.host}) joined: ranks {[r for r, _ in msg.ranks]} (pids"
                f" {[p for _, p in msg.ranks]}), daemon {msg.daemon or 'none'}")
            self.on_ranks(msg.node, [(r, n.ranks[pid]) for r, pid in msg.ranks])
            return
        with self.lock:
            n = self.nodes.get(getattr(msg, "node", -1))
        if n is None or n.ident != ident:
            log(f"node hub: a {type(msg).__name__} from a node that did not say hello: dropped")
            return
        n.beat = time.monotonic()
        if isinstance(msg, RankDied):
            r = n.ranks.get(msg.pid)
            if r is not None:
                log(f"node {msg.node}: rank pid {msg.pid} died ({msg.how})")
                r.mark_dead(msg.how)
        elif isinstance(msg, NodeBye):
            log(f"node {msg.node} left: {msg.reason}")
            self._lose(n, f"it left: {msg.reason}")

    def _check_beats(self) -> None:
        now = time.monotonic()
        with self.lock:
            late = [n for n in self.nodes.values() if n.alive and now - n.beat > self.timeout_s]
        for n in late:
            log(f"node {n.hello.node} silent for {now - n.beat:.1f} s (> {self.timeout_s:g} s): lost whole")
            self._lose(n, "silent (lost)")

    def _lose(self, n: _Node, why: str) -> None:
        with self.lock:
            if not n.alive:
                return
            n.alive = False
        # a node taken for lost must be lost: a silent one that is alive after all gets its ranks killed
        self._out.put((n.ident, _encoder.encode(Fence(pids=list(n.ranks)))))
        for r in n.ranks.values():
            r.mark_dead(f"node {n.hello.node} {why}")


class NodeAgent:
    """A node >= 1's end (a thread of its launcher process): reports its ranks to node 0's hub."""

    def __init__(self, node: int, host: str, hub_endpoint: str, hung_timeout_s: float) -> None:
        self.node, self.host, self.hub_endpoint, self.hung_timeout_s = node, host, hub_endpoint, hung_timeout_s
        self.run_dir = tempfile.mkdtemp(prefix=f"sgle-node{node}-")  # the ranks' heartbeat files
        os.chmod(self.run_dir, 0o700)
        self.procs: list = []
        self._ranks: list[tuple[int, int]] = []
        self.daemon, self.daemon_token = "", ""
        self._thread: threading.Thread | None = None
        self._stop = False
        self._bye = "shutting down"

    def environ(self, heartbeat_s: float) -> dict[str, str]:
        """What this node's scheduler processes inherit: the controller's rank socket comes from the caller."""
        return {wire.ENV_RUN_DIR: self.run_dir, wire.ENV_HEARTBEAT: str(heartbeat_s) if heartbeat_s > 0 else ""}

    def set_daemon(self, endpoint: str, token: str) -> None:
        self.daemon, self.daemon_token = endpoint, token

    def watch(self, procs: list, tp_ranks: list[int]) -> None:
        """This node's scheduler processes (in TP order, ranks ``tp_ranks``): say hello, start the thread."""
        self.procs = list(procs)
        self._ranks = [(r, p.pid) for r, p in zip(tp_ranks, procs)]
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="sgle-node-agent", daemon=True)
            self._thread.start()

    def close(self, reason: str = "shutting down") -> None:
        self._stop = True
        self._bye = reason
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def _silent_s(self, pid: int) -> float:
        if self.hung_timeout_s <= 0:
            return 0.0
        try:
            return max(0.0, time.time() - os.stat(os.path.join(self.run_dir, f"heartbeat-{pid}")).st_mtime)
        except OSError:
            return 0.0

    def _loop(self) -> None:
        import multiprocessing.connection
        import signal

        import zmq

        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 500)
        sock.connect(self.hub_endpoint)
        send = lambda m: sock.send(_encoder.encode(m))  # noqa: E731
        send(NodeHello(node=self.node, host=self.host, ranks=self._ranks, daemon=self.daemon,
                       daemon_token=self.daemon_token))
        line = _hold_lifeline(lifeline_endpoint(self.hub_endpoint), self.node)
        reported: set[int] = set()
        fenced: set[int] = set()
        try:
            while not self._stop:
                live = [p for p in self.procs if p.pid not in reported]
                ready = multiprocessing.connection.wait([p.sentinel for p in live], timeout=BEAT_S) if live else []
                if not live:
                    time.sleep(BEAT_S)
                for p in live:
                    if p.sentinel in ready or not p.is_alive():
                        reported.add(p.pid)
                        how = "hung (fenced)" if p.pid in fenced else f"exit {p.exitcode}"
                        send(RankDied(node=self.node, pid=p.pid, how=how))
                    elif self._silent_s(p.pid) > self.hung_timeout_s > 0 and p.pid not in fenced:
                        log(f"node {self.node}: rank pid {p.pid} silent for {self._silent_s(p.pid):.1f} s: hung;"
                            " fencing it (SIGKILL)")
                        fenced.add(p.pid)
                        os.kill(p.pid, signal.SIGKILL)
                while sock.poll(0, zmq.POLLIN):
                    try:
                        msg = _decoder.decode(sock.recv())
                    except (msgspec.DecodeError, msgspec.ValidationError) as e:
                        log(f"node agent: dropped a malformed message: {e}")
                        continue
                    if isinstance(msg, Fence):
                        mine = {p.pid for p in self.procs}
                        for pid in msg.pids:
                            if pid in mine:  # only this node's ranks, never another process
                                fenced.add(pid)
                                try:
                                    os.kill(pid, signal.SIGKILL)
                                except ProcessLookupError:
                                    pass
                send(NodeBeat(node=self.node))
            send(NodeBye(node=self.node, reason=self._bye))
        finally:
            sock.close()
            if line is not None:
                line.close()


# ---- lifelines: a node's launcher that dies is known at once -------------------------------------
def lifeline_endpoint(node_endpoint: str) -> tuple[str, int]:
    """(host, port) of the hub's lifeline listener: the port after the node socket's."""
    host, _, port = node_endpoint.removeprefix("tcp://").rpartition(":")
    return host.strip("[]"), int(port) + 1


def _hold_lifeline(addr: tuple[str, int], node: int):
    """The agent's end: a TCP connection that says its node number and stays open while the
    launcher lives (the kernel closes it when the process dies, however it dies)."""
    import socket

    for _ in range(50):  # node 0 may still be starting
        try:
            s = socket.create_connection(addr, timeout=2.0)
            s.sendall(node.to_bytes(4, "big"))
            return s
        except OSError:
            time.sleep(0.2)
    log(f"node agent: no lifeline to {addr[0]}:{addr[1]}: node 0 learns of this node's loss by its silence")
    return None


class _Lifelines:
    """The hub's end: accepts lifelines, calls ``cut(node)`` when one closes (EOF or reset)."""

    def __init__(self, addr: tuple[str, int], cut) -> None:
        import socket

        self.cut = cut
        self._srv = socket.create_server(addr)
        self._srv.settimeout(0.2)
        self._stop = False
        threading.Thread(target=self._accept, name="sgle-node-lifelines", daemon=True).start()

    def close(self) -> None:
        self._stop = True
        self._srv.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._hold, args=(conn,), name="sgle-node-lifeline", daemon=True).start()

    def _hold(self, conn) -> None:
        with conn:
            conn.settimeout(5.0)
            try:
                head = conn.recv(4)
            except OSError:
                return
            if len(head) != 4:
                return
            node = int.from_bytes(head, "big")
            conn.settimeout(None)
            try:
                while conn.recv(64):  # nothing is sent on it; a read returns only when it closes
                    pass
            except OSError:
                pass
            if not self._stop:
                self.cut(node)


# ---- a migration over several nodes' daemons ---------------------------------------------------
INTRA_GBPS = 10.0  # modelled copy between two devices of a node (shared memory / NVLink class)
HOST_GBPS = 2.0  # modelled reload into a device from its node's checkpoint copy
INTER_GBPS = 1.25  # modelled network between nodes (10 Gbit/s) unless --elastic-link-gbps says


def topology(node_of_slot: list[int], dead_nodes: list[int], inter_gbps: float = 0.0):
    """The planner's view of the nodes (``planner.Topology.nodes``); a lost node is no source."""
    from sgl_elastic.planner import Topology

    topo = Topology.nodes(node_of_slot, intra_gbps=INTRA_GBPS, inter_gbps=inter_gbps or INTER_GBPS,
                          host_gbps=HOST_GBPS)
    return topo.without_nodes(dead_nodes) if dead_nodes else topo


def migrate_across(plan, clients: dict, node_of_new: list[int], failed: set[int], timeout_s: float = 600.0) -> dict:
    """Run ``plan`` on every live node's daemon at once (``clients``: node -> DaemonClient): each
    builds its own node's new ranks, reading the bytes the other nodes' survivors hold over the
    transfer engine (a peer that fails mid-read: reloaded from its own checkpoint), and the old
    views are freed only once every node is done. Returns node -> MigrationSummary."""
    from sgl_elastic.daemon.protocol import decode_remote

    exports = {k: decode_remote(c.export_remote().arenas) for k, c in clients.items()}
    started = {}
    for k, c in clients.items():
        mine = [r for r, n in enumerate(node_of_new) if n == k]
        remote = {old: arena for j, ex in exports.items() if j != k for old, arena in ex.items() if old not in failed}
        started[k] = c.start_migration(plan, ranks=mine, remote=remote, hold_old=True)
    out = {}
    try:
        for k, c in clients.items():
            s = c.wait_ready(timeout_s, epoch=started[k] + 1)
            if s.last_migration is None or s.epoch < started[k] + 1:
                raise RuntimeError(f"node {k}'s daemon did not migrate: {s.last_error}")
            out[k] = s.last_migration
    finally:
        for c in clients.values():
            try:
                c.release_old()
            except Exception as e:  # noqa: BLE001 - a node lost meanwhile: its views went with it
                log(f"release of the old views on {c.endpoint}: {type(e).__name__}: {e}")
    return out


def sync_kv(clients: dict) -> int:
    """Before a migration over several nodes: node 0's prefix index (the one rank 0 mirrors) copied
    into the other nodes' daemons, so that each carries the KV of the same slots and their ranks
    restore the same prefixes (their schedulers must decide alike). Returns the entries copied; on
    an error every index is cleared (the requests are prefilled again, on every node)."""
    try:
        entries = clients[0].kv_dump().entries
        for k, c in clients.items():
            if k == 0:
                continue
            c.kv_clear()
            for e in entries:
                c.kv_insert(e.token_ids, e.slots, namespace=e.namespace)
        return len(entries)
    except Exception as e:  # noqa: BLE001 - the KV is dropped everywhere instead
        log(f"the prefix index could not be copied to every node ({type(e).__name__}: {e}): the KV is not carried")
        clear_kv(clients)
        return 0


def clear_kv(clients: dict) -> None:
    for c in clients.values():
        try:
            c.kv_clear()
        except Exception:  # noqa: BLE001 - a daemon without an index has nothing to clear
            pass


def agree_kv(summaries: dict, clients: dict) -> bool:
    """After the migration: the KV is kept only if every node's daemon carried it (the same slots);
    else every index is cleared, so no rank resumes from KV another node's ranks lack."""
    kept = {k: s.kv_kept_slots for k, s in summaries.items()}
    if len(set(kept.values())) <= 1:
        return True
    log(f"the KV was carried on some nodes only (indexed slots kept per node: {kept}): dropped on all"
        " (the requests in flight are prefilled again)")
    clear_kv(clients)
    return False


def summed(summaries: dict) -> dict:
    """One record of several nodes' MigrationSummary: bytes summed, seconds the slowest node's."""
    rec: dict = {}
    for s in summaries.values():
        for k, v in msgspec.structs.asdict(s).items():
            if k == "epoch" or not isinstance(v, (int, float)):
                continue
            rec[k] = max(rec.get(k, 0), v) if k.endswith("_s") or k == "kv_kept_slots" else rec.get(k, 0) + v
    rec["nodes"] = len(summaries)
    return rec
