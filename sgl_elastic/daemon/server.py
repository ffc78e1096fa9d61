"""The state daemon process: owns the ranks' memory (``store.ModelStore``) and serves the control socket.

Control plane: one ZMQ ROUTER socket, ``ipc://<run_dir>/control.sock`` (``run_dir`` private, 0700)
or ``tcp://127.0.0.1:<free port>``; one msgpack frame per request and reply
(``protocol``). Every request must carry the instance token: 32 random bytes (``secrets``) written
to ``<run_dir>/token`` (0600) and never put on a command line. ``<run_dir>/daemon.json`` (written
last, atomically: its presence means "serving") holds the endpoint, pid, instance id and backend.

Contract for clients (``client.DaemonClient``):
- Any bad request (malformed bytes, wrong token, version or type, bad fields, illegal in the
  current state) gets an ``Error`` reply with a reason that says the fix; the daemon keeps serving.
- A client without the token gets only "unauthorized": no handles, no figures.
- Load and migration run in a worker thread; meanwhile Stats and the KV index answer, exports get a
  STATE error ("wait for READY").
- If the daemon dies, requests raise ``DaemonUnavailable`` within the client's timeout (at once
  when the pid is known to be gone). On CPU, tensors a worker already mapped stay valid (shared
  memory lives until its last mapping), so a running server keeps serving with what it has; the
  prefix index and the ability to attach new processes are gone, and a later start reads the
  checkpoint again. On CUDA, IPC memory dies with the daemon: workers must stop (see ``memory/cuda.py``).
- The daemon frees its segments on Shutdown, SIGTERM and SIGINT; after SIGKILL the resource
  tracker unlinks them (and ``memory.shm.reap_segments(pid)`` sweeps anything left).
- A registered worker that dies loses its KV pins (its running requests are gone); its mappings
  are the kernel's business (nothing to leak).
- After ``ApplyMigration`` the epoch advances, old handles are stale (segments unlinked; existing
  mappings stay valid until unmapped), and the KV pools and prefix index are dropped: KV of the
  old layout is not migrated (re-prefill), and KvMatch answers 0 tokens until AllocKv again.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import tempfile
import threading
import time
import traceback
from collections.abc import Callable

import msgspec
import zmq

from sgl_elastic.daemon import protocol as P
from sgl_elastic.daemon.kv_index import BudgetExceeded
from sgl_elastic.memory import TensorAlloc, make_memory
from sgl_elastic.daemon.state import DaemonState, IllegalTransition, transition
from sgl_elastic.daemon.store import KvSpec, ModelDropped, ModelStore
from sgl_elastic.daemon.weights import LoadCancelled

__all__ = ["DaemonConfig", "Daemon", "INFO_FILE", "TOKEN_FILE", "SOCKET_FILE", "private_run_dir"]

logger = logging.getLogger("sgl_elastic.daemon")

INFO_FILE, TOKEN_FILE, SOCKET_FILE = "daemon.json", "token", "control.sock"
_PID_CHECK_S = 0.5
_IPC_PATH_MAX = 107  # sun_path


@dataclasses.dataclass(slots=True)
class DaemonConfig:
    """How to run one daemon instance.

    run_dir: private directory (0700) for the socket, token and info files; None: a fresh
        ``mkdtemp`` directory, removed at exit.
    tcp: serve ``tcp://<node_host>:<free port>`` instead of ipc (the token still applies).
    backend: "shm" (CPU shared memory) or "cuda" (CUDA IPC).
    checkpoint / layout_bytes / ranks: load these at start (else wait for a LoadModel request).
    in_place: how a migration turns a survivor's segment into its new rank's (``memory.IN_PLACE_MODES``).
    node_host: this node's address, where the transfer endpoint for peer daemons listens
        (``ExportRemote``; multi-node only). link_gbps: cap on its reads (benchmarks; 0: none).
    """

    run_dir: str | None = None
    tcp: bool = False
    backend: str = "shm"
    checkpoint: str | None = None
    layout_bytes: bytes | None = None
    ranks: list[int] | None = None
    in_place: str = "remap"
    node_host: str = "127.0.0.1"
    link_gbps: float = 0.0

    def __post_init__(self) -> None:
        from sgl_elastic.memory import IN_PLACE_MODES

        if self.backend not in ("shm", "cuda"):
            raise ValueError(f"backend={self.backend!r}; choose 'shm' (CPU) or 'cuda'")
        if self.in_place not in IN_PLACE_MODES:
            raise ValueError(f"in_place={self.in_place!r}; choose one of {', '.join(IN_PLACE_MODES)}")
        if (self.checkpoint is None) != (self.layout_bytes is None):
            raise ValueError("give both checkpoint and layout to load at start, or neither")


def private_run_dir(path: str | None) -> tuple[str, bool]:
    """(directory, created_by_us). An existing directory must be ours and not readable by others."""
    if path is None:
        return tempfile.mkdtemp(prefix="sgle-daemon-"), True
    if not os.path.exists(path):
        os.makedirs(path, mode=0o700)
        return path, True
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(
            f"run dir {path} must be a directory owned by uid {os.getuid()} with mode 0700"
            f" (it is {oct(st.st_mode & 0o777)}, uid {st.st_uid}); `chmod 700 {path}` or pass another"
        )
    return path, False


def _rss() -> tuple[int, int]:
    """(RssAnon, RssShmem) of this process in bytes (0, 0 where /proc is absent)."""
    anon = shmem = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("RssShmem:"):
                    shmem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return anon, shmem


def _lower_priority() -> None:
    """The calling thread at nice 19 (Linux: a thread is a task with its own priority); no-op elsewhere."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Daemon:
    """One daemon instance. ``run()`` serves until Shutdown / SIGTERM / SIGINT, then frees everything."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.instance = secrets.token_hex(4)
        self._token = secrets.token_urlsafe(32)
        self.state = DaemonState.STARTING
        self.store = ModelStore(make_memory(config.backend, self.instance, in_place=config.in_place), self.instance)
        self._lock = threading.Lock()  # guards store swaps and self.state
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._worker: threading.Thread | None = None
        self._started = time.monotonic()
        self.requests = 0
        self.errors: dict[str, int] = {}
        self.last_error = ""
        self.last_migration: P.MigrationSummary | None = None
        self.run_dir = ""
        self._own_dir = False
        self.endpoint = ""
        self._handlers: dict[type, Callable] = {
            P.Stats: self._stats, P.LoadModel: self._load_model, P.RegisterRank: self._register,
            P.ExportWeights: self._export_weights, P.AllocKv: self._alloc_kv, P.ExportKv: self._export_kv,
            P.KvMatch: self._kv_match, P.KvInsert: self._kv_insert, P.KvDump: self._kv_dump, P.KvRelease: self._kv_release,
            P.EvictKv: self._evict_kv, P.ApplyMigration: self._apply_migration, P.Shutdown: self._shutdown,
            P.PublishParams: self._publish_params, P.ExportParams: self._export_params,
            P.CommitParams: self._commit_params, P.KvForget: self._kv_forget, P.KvClear: self._kv_clear,
            P.ExportRemote: self._export_remote, P.ReleaseOld: self._release_old,
        }
        self._transfer = None  # executor.remote.TransferEndpoint, opened by the first ExportRemote
        self._held_old: list = []  # old views kept for peers (ApplyMigration.hold_old)
        self._held_new: list = []  # new arenas whose old-only pages wait for ReleaseOld

    # ---- lifecycle -------------------------------------------------------------------------------
    def _to(self, target: DaemonState, reason: str = "") -> None:
        with self._lock:
            self.state = transition(self.state, target, reason)

    def _bind(self) -> None:
        self.run_dir, self._own_dir = private_run_dir(self.config.run_dir)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
        if self.config.tcp:
            self._sock.bind(f"tcp://{self.config.node_host or '127.0.0.1'}:*")  # a node's own address
        else:
            path = os.path.join(self.run_dir, SOCKET_FILE)
            if len(path) > _IPC_PATH_MAX:
                raise ValueError(f"socket path {path} is {len(path)} chars, over the {_IPC_PATH_MAX} Unix limit; use a shorter run dir")
            self._sock.bind(f"ipc://{path}")
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        # Token: 0600, created exclusively; then the info file, atomically, last.
        token_path = os.path.join(self.run_dir, TOKEN_FILE)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._token)
        info = {"endpoint": self.endpoint, "pid": os.getpid(), "instance": self.instance,
                "backend": self.config.backend, "token_file": token_path, "protocol_version": P.PROTOCOL_VERSION}
        tmp = os.path.join(self.run_dir, INFO_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, os.path.join(self.run_dir, INFO_FILE))

    def run(self) -> int:
        prev = {s: signal.signal(s, lambda *_: self._stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._bind()
            self._to(DaemonState.EMPTY, f"serving {self.endpoint}")
            logger.info("daemon %s pid %d serving %s (run dir %s)", self.instance, os.getpid(), self.endpoint, self.run_dir)
            if self.config.checkpoint is not None:
                from sgl_elastic.layout import ElasticLayout

                self._start_load(self.config.checkpoint, ElasticLayout.from_bytes(self.config.layout_bytes),
                                 self.config.ranks)
            self._serve()
        finally:
            self._cleanup()
            for s, h in prev.items():
                signal.signal(s, h)
        return 0

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        next_check = time.monotonic() + _PID_CHECK_S
        while not self._stop.is_set():
            if poller.poll(100):
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                self._answer(frames)
            if time.monotonic() >= next_check:
                self._reap_dead_clients()
                next_check = time.monotonic() + _PID_CHECK_S

    def _answer(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return  # nothing to answer to (a ROUTER always prepends the peer identity)
        self.requests += 1
        reply = self.handle(frames[-1])
        if isinstance(reply, P.Error):
            self.errors[reply.code] = self.errors.get(reply.code, 0) + 1
        try:
            self._sock.send_multipart([*frames[:-1], P.encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # peer gone: nothing to do
            logger.debug("reply dropped: %s", e)

    def handle(self, data: bytes) -> P.Reply:
        """Decode, authenticate and run one request; never raises."""
        try:
            req = P.decode_request(data, self._token_ok)
        except P.RequestDecodeError as e:
            return e.error
        try:
            return self._handlers[type(req)](req)
        except _StateError as e:
            return _err(P.ErrorCode.STATE, str(e))
        except BudgetExceeded as e:
            return _err(P.ErrorCode.BUDGET, str(e))
        except KeyError as e:
            return _err(P.ErrorCode.NOT_FOUND, str(e.args[0]) if e.args else repr(e))
        except (ValueError, msgspec.DecodeError, msgspec.ValidationError) as e:
            return _err(P.ErrorCode.INVALID, f"{type(req).__name__}: {e}")
        except Exception as e:  # keep serving; the reason goes back and to the log
            logger.error("request %s failed:\n%s", type(req).__name__, traceback.format_exc())
            return _err(P.ErrorCode.INTERNAL, f"{type(req).__name__} failed: {type(e).__name__}: {e}")

    def _token_ok(self, token: str) -> bool:
        return hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self._token.encode())

    def _cleanup(self) -> None:
        with self._lock:
            if self.state is not DaemonState.STOPPING and self.state is not DaemonState.STOPPED:
                try:
                    self.state = transition(self.state, DaemonState.STOPPING, "stop requested")
                except IllegalTransition:
                    pass
        self._cancel.set()
        if self._worker is not None:
            self._worker.join()
        with self._lock:
            self.store.close()
        if hasattr(self, "_sock"):
            self._sock.close(0)
            self._ctx.term()
        if self.run_dir:
            for name in (INFO_FILE, TOKEN_FILE, SOCKET_FILE):
                try:
                    os.unlink(os.path.join(self.run_dir, name))
                except FileNotFoundError:
                    pass
            if self._own_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
        with self._lock:
            if self.state is DaemonState.STOPPING:
                self.state = transition(self.state, DaemonState.STOPPED, "segments freed")

    def _reap_dead_clients(self) -> None:
        with self._lock:
            owners = {p for ps in self.store.pids.values() for p in ps}
            if self.store.index is not None:
                owners |= self.store.index.pin_owners()
            for pid in owners:
                if _pid_alive(pid):
                    continue
                for ps in self.store.pids.values():
                    ps.discard(pid)
                n = self.store.index.release_owner(pid) if self.store.index is not None else 0
                logger.warning("worker pid %d is gone: unregistered, %d KV pins released", pid, n)

    # ---- state guards ------------------------------------------------------------------------------
    def _need(self, *states: DaemonState, what: str) -> None:
        if self.state not in states:
            hint = {DaemonState.LOADING: "the model is loading; poll Stats until state is 'ready'",
                    DaemonState.MIGRATING: "a migration is running; poll Stats until state is 'ready'",
                    DaemonState.EMPTY: "no model is held; send LoadModel first",
                    DaemonState.READY: "a model is held already (one per daemon); stop the daemon to load another",
                    DaemonState.STOPPING: "the daemon is stopping"}.get(self.state, "")
            raise _StateError(f"{what} needs state {'/'.join(s.value for s in states)} but the daemon is"
                              f" {self.state.value}{'; ' + hint if hint else ''}")

    # ---- handlers ------------------------------------------------------------------------------------
    def _stats(self, req: P.Stats) -> P.StatsReply:
        anon, shmem = _rss()
        with self._lock:
            return P.StatsReply(
                version=P.PROTOCOL_VERSION, state=self.state.value, pid=os.getpid(), instance=self.instance,
                backend=self.config.backend, epoch=self.store.epoch, uptime_s=time.monotonic() - self._started,
                checkpoint=self.store.checkpoint, checkpoint_bytes_read=self.store.bytes_read, load_s=self.store.load_s,
                last_error=self.last_error, ranks=self.store.rank_stats(), kv=self.store.kv_stats(),
                requests=self.requests, errors=dict(self.errors), rss_anon_bytes=anon, rss_shmem_bytes=shmem,
                last_migration=self.last_migration,
            )

    def _load_model(self, req: P.LoadModel) -> P.Ok:
        from sgl_elastic.layout import ElasticLayout

        self._need(DaemonState.EMPTY, what="LoadModel")
        layout = ElasticLayout.from_bytes(req.layout)
        if not os.path.isdir(req.checkpoint):
            raise ValueError(f"checkpoint {req.checkpoint!r} is not a directory; pass the HF checkpoint directory")
        self._start_load(req.checkpoint, layout, req.ranks)
        return P.Ok(version=P.PROTOCOL_VERSION, detail="loading; poll Stats until state is 'ready'")

    def _start_load(self, checkpoint: str, layout, ranks: list[int] | None) -> None:
        self._to(DaemonState.LOADING, f"{checkpoint} tp={layout.tp_size}")

        def work() -> None:
            try:
                self.store.load(checkpoint, layout, ranks, self._cancel)
                ok, reason = True, f"{self.store.bytes_read} bytes read in {self.store.load_s:.2f}s"
            except LoadCancelled as e:
                ok, reason = False, str(e)
            except Exception as e:
                logger.error("load failed:\n%s", traceback.format_exc())
                ok, reason = False, f"load failed: {type(e).__name__}: {e}"
                self.last_error = reason
            with self._lock:
                if self.state is DaemonState.LOADING:
                    self.state = transition(self.state, DaemonState.READY if ok else DaemonState.EMPTY, reason)

        self._worker = threading.Thread(target=work, name="sgle-daemon-load", daemon=True)
        self._worker.start()

    def _register(self, req: P.RegisterRank) -> P.Registered:
        self._need(DaemonState.READY, DaemonState.EMPTY, what="RegisterRank")
        with self._lock:
            held = set(self.store.weights) | set(self.store.kv)
            if req.rank not in held:
                raise KeyError(f"rank {req.rank} is not held by this daemon (it holds {sorted(held)})")
            self.store.pids.setdefault(req.rank, set()).add(req.pid)
            return P.Registered(version=P.PROTOCOL_VERSION, instance=self.instance, rank=req.rank, epoch=self.store.epoch,
                                has_weights=req.rank in self.store.weights, has_kv=req.rank in self.store.kv,
                                layout=self.store.layout.to_bytes() if self.store.layout is not None else b"")

    def _export_weights(self, req: P.ExportWeights) -> P.Handles:
        self._need(DaemonState.READY, what="ExportWeights")
        with self._lock:
            return self.store.handles("weights", req.rank)

    def _publish_params(self, req: P.PublishParams) -> P.Handles:
        self._need(DaemonState.READY, what="PublishParams")
        specs = [TensorAlloc(t.name, t.dtype, tuple(t.shape)) for t in req.tensors]
        if len({t.name for t in specs}) != len(specs):
            raise ValueError("PublishParams: tensor names must be unique")
        with self._lock:
            return self.store.publish_params(req.rank, specs)

    def _export_params(self, req: P.ExportParams) -> P.Handles:
        self._need(DaemonState.READY, what="ExportParams")
        with self._lock:
            if req.rank not in self.store.params_ready:
                raise KeyError(f"rank {req.rank} has no committed parameters (epoch {self.store.epoch}); load from"
                               " ExportWeights and PublishParams")
            return self.store.handles("params", req.rank)

    def _commit_params(self, req: P.CommitParams) -> P.Ok:
        self._need(DaemonState.READY, what="CommitParams")
        with self._lock:
            self.store.commit_params(req.rank)
        return P.Ok(version=P.PROTOCOL_VERSION, detail=f"rank {req.rank} parameters committed")

    def _kv_forget(self, req: P.KvForget) -> P.Ok:
        with self._lock:
            dropped = self._index().forget(req.slots, req.namespace)
            self.store.kv_unbacked -= set(dropped)
        return P.Ok(version=P.PROTOCOL_VERSION, detail=str(len(dropped)))

    def _kv_clear(self, req: P.KvClear) -> P.Ok:
        with self._lock:
            dropped = self._index().clear()
            self.store.kv_unbacked = set()
        return P.Ok(version=P.PROTOCOL_VERSION, detail=str(len(dropped)))

    def _alloc_kv(self, req: P.AllocKv) -> P.Ok:
        self._need(DaemonState.READY, DaemonState.EMPTY, what="AllocKv")
        with self._lock:
            if req.kv_heads:
                kv_heads = dict(enumerate(req.kv_heads))
            elif self.store.layout is not None:
                attn = self.store.layout.family("attn")
                kv_heads = {r: attn.rank_kv_heads(r) for r in range(self.store.layout.tp_size)}
            else:
                raise ValueError("kv_heads is empty and no model is held; give the KV heads of each rank")
            if req.budget_slots > req.num_slots:
                raise ValueError(f"budget_slots={req.budget_slots} exceeds num_slots={req.num_slots}")
            spec = KvSpec(req.num_layers, req.head_dim, req.num_slots, req.dtype, kv_heads)
            new = self.store.alloc_kv(spec, req.budget_slots, req.page_size, backup=req.backup)
            total = sum(s.nbytes for s in self.store.kv.values())
        verb = "allocated" if new else "already held (same geometry; index kept)"
        return P.Ok(version=P.PROTOCOL_VERSION, detail=f"KV pools {verb} for ranks {sorted(self.store.kv)}: {total} bytes")

    def _export_kv(self, req: P.ExportKv) -> P.Handles:
        self._need(DaemonState.READY, DaemonState.EMPTY, what="ExportKv")
        with self._lock:
            return self.store.handles("kvbak" if req.backup else "kv", req.rank)

    def _index(self):
        if self.store.index is None:
            raise KeyError("no KV pool / prefix index is allocated; send AllocKv first")
        return self.store.index

    def _kv_match(self, req: P.KvMatch) -> P.KvMatchReply:
        self._need(DaemonState.READY, DaemonState.EMPTY, what="KvMatch")
        with self._lock:
            m = self._index().match(req.token_ids, pin=req.pin, owner=req.owner_pid, namespace=req.namespace)
        return P.KvMatchReply(version=P.PROTOCOL_VERSION, num_tokens=m.num_tokens, slots=list(m.slots), pin_id=m.pin_id)

    def _kv_insert(self, req: P.KvInsert) -> P.KvInsertReply:
        self._need(DaemonState.READY, DaemonState.EMPTY, what="KvInsert")
        with self._lock:
            r = self._index().insert(req.token_ids, req.slots, pin=req.pin, owner=req.owner_pid,
                                     namespace=req.namespace)
        return P.KvInsertReply(version=P.PROTOCOL_VERSION, num_new_tokens=r.num_new_tokens,
                               duplicate_slots=list(r.duplicate_slots), evicted_slots=list(r.evicted_slots),
                               pin_id=r.pin_id)

    def _kv_dump(self, req: P.KvDump) -> P.KvDumpReply:
        with self._lock:
            ix = self._index()
            entries = [P.KvEntry(ns, list(toks), list(slots)) for ns, toks, slots in ix.dump()]
            return P.KvDumpReply(version=P.PROTOCOL_VERSION, page_size=ix.page_size, entries=entries)

    def _kv_release(self, req: P.KvRelease) -> P.Ok:
        with self._lock:
            self._index().release(req.pin_id)
        return P.Ok(version=P.PROTOCOL_VERSION)

    def _evict_kv(self, req: P.EvictKv) -> P.EvictReply:
        with self._lock:
            freed = self._index().evict(req.num_slots)
            self.store.kv_unbacked &= self.store.index.held_slots()
        return P.EvictReply(version=P.PROTOCOL_VERSION, freed_slots=freed)

    def _apply_migration(self, req: P.ApplyMigration) -> P.Ok:
        """Start the plan in the worker (state MIGRATING); poll Stats: ``last_migration`` and the
        epoch tell the outcome, ``last_error`` a failure (the survivors' shards are then intact)."""
        from sgl_elastic.daemon.migrate import check_plan
        from sgl_elastic.planner.plan import MigrationPlan

        self._need(DaemonState.READY, what="ApplyMigration")
        plan = MigrationPlan.from_bytes(req.plan)
        remote = P.decode_remote(req.remote)
        if req.ranks is not None:
            bad = sorted(r for r in req.ranks if r >= plan.new_layout.tp_size)
            if bad:
                raise ValueError(f"ranks {bad} are not new ranks of the plan (its tp is {plan.new_layout.tp_size})")
            if remote and self._transfer is None:
                raise ValueError("remote arenas given but this daemon has no transfer endpoint: send ExportRemote first")
        elif remote or req.hold_old:
            raise ValueError("remote / hold_old belong to a multi-node migration: give ranks too")
        if self._held_old:
            raise ValueError("the old views of the last migration are still held: send ReleaseOld first")
        check_plan(plan, self.store.layout, set(self.store.weights),
                   set(remote) if req.ranks is not None else None)
        self._to(DaemonState.MIGRATING, plan.change.label(plan.old_layout.tp_size))

        freed: list = []

        def work() -> None:
            reason, after = "migrated", DaemonState.READY
            try:
                nodes = {} if req.ranks is None else dict(ranks=list(req.ranks), remote=remote,
                                                          endpoint=self._transfer, release=not req.hold_old)
                rep = self.store.migrate(plan, self._lock, freed, **nodes)
                if req.hold_old:
                    self._held_new = [self.store.weights[r] for r in req.ranks if r in self.store.weights]
                same = {k: v for k, v in msgspec.structs.asdict(rep).items() if k in P.MigrationSummary.__struct_fields__}
                self.last_migration = P.MigrationSummary(
                    **same, epoch=self.store.epoch, predicted_s=rep.predicted.predicted_s,
                    kv_kept_slots=self.store.last_kv[0], kv_s=self.store.last_kv[1])
                logger.info("migration done: %d of %d ranks in place (%d remapped: %.1f MB kept where they lie,"
                            " %.1f MB copied), %.1f MB of new memory, %.3f s", rep.in_place_ranks,
                            plan.new_layout.tp_size, rep.remapped_ranks, rep.remapped_bytes / 1e6,
                            rep.copied_keep_bytes / 1e6, rep.alloc_bytes / 1e6, rep.achieved_s)
            except ModelDropped as e:
                logger.error("migration failed:\n%s", traceback.format_exc())
                reason = self.last_error = f"migration failed: {e}"
                after = DaemonState.EMPTY
            except Exception as e:
                logger.error("migration failed:\n%s", traceback.format_exc())
                reason = self.last_error = (f"migration failed: {type(e).__name__}: {e};"
                                            " the survivors' shards are intact (the failed ranks' were freed), the daemon is READY on"
                                            " the old layout")
            with self._lock:
                if self.state is DaemonState.MIGRATING:
                    self.state = transition(self.state, after, reason)
            # READY first: the old layout's memory is freed off the recovery's path, at the lowest CPU
            # priority (the kernel's page freeing, ~0.35 s on the bench model, runs in this thread: on a
            # small host it would otherwise take a core from the survivors' rebuild)
            if req.hold_old and after is DaemonState.READY:
                self._held_old = list(freed)  # the peers may still read them: ReleaseOld frees them
                return
            _lower_priority()
            t_free = time.perf_counter()
            self._close_old(freed)
            if freed:
                logger.info("freed the old layout's %d segments in %.3f s", len(freed), time.perf_counter() - t_free)

        self._worker = threading.Thread(target=work, name="sgle-daemon-migrate", daemon=True)
        self._worker.start()
        return P.Ok(version=P.PROTOCOL_VERSION, detail="migrating; poll Stats until state is 'ready'")

    def _export_remote(self, req: P.ExportRemote) -> P.RemoteReply:
        from sgl_elastic.executor.remote import RemoteArena, TransferEndpoint

        self._need(DaemonState.READY, what="ExportRemote")
        if self.config.backend != "shm":
            raise ValueError("ExportRemote: the transfer endpoint serves the CPU backend's segments only")
        if self._transfer is None:
            self._transfer = TransferEndpoint(self.config.node_host, rate_gbps=self.config.link_gbps)
            logger.info("transfer endpoint for peer daemons on %s (Mooncake, tcp)", self._transfer.addr)
        arenas = {}
        with self._lock:
            for r, seg in self.store.weights.items():
                arena = seg.arena
                self._transfer.register(arena.address, arena.nbytes)
                arenas[r] = RemoteArena(addr=self._transfer.addr, base=arena.address, handle=arena.handle)
            epoch = self.store.epoch
        return P.RemoteReply(version=P.PROTOCOL_VERSION, addr=self._transfer.addr, epoch=epoch,
                             arenas=P.encode_remote(arenas))

    def _release_old(self, req: P.ReleaseOld) -> P.Ok:
        self._need(DaemonState.READY, what="ReleaseOld")
        held, self._held_old = self._held_old, []
        new, self._held_new = self._held_new, []
        self._close_old(held)
        released = sum(seg.arena.release_unused() for seg in new)
        return P.Ok(version=P.PROTOCOL_VERSION, detail=f"freed {len(held)} old views; {released} bytes of pages given back")

    def _close_old(self, segs: list) -> None:
        """Free old weight views (no longer readable by peers: unregistered first)."""
        for seg in segs:
            if self._transfer is not None:
                self._transfer.unregister(seg.arena.address)
            seg.close()

    def _shutdown(self, req: P.Shutdown) -> P.Ok:
        self._stop.set()
        return P.Ok(version=P.PROTOCOL_VERSION, detail="stopping")


class _StateError(Exception):
    pass


def _err(code: str, reason: str) -> P.Error:
    return P.Error(version=P.PROTOCOL_VERSION, code=code, reason=reason)
