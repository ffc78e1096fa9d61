"""DaemonClient: typed requests to the state daemon, with a timeout on every call; never hangs.

    client = DaemonClient.from_run_dir(run_dir)        # endpoint + token from the 0600 token file
    client.wait_ready(timeout=120)
    with client.attach_weights(rank=0) as shards:      # torch tensors over the daemon's memory
        w = shards.tensors["model.embed_tokens.weight"]

Errors: ``DaemonUnavailable`` when the daemon does not answer within the timeout or its pid is
gone (checked every 50 ms while waiting, so a dead daemon is reported in about that time);
``DaemonError`` (``.code``, ``.reason``) when it answers with an ``Error``.
"""

from __future__ import annotations

import json
import os
import time

import zmq

from sgl_elastic.daemon import protocol as P
from sgl_elastic.memory import AttachedTensors, attach_handles

__all__ = ["DaemonClient", "DaemonUnavailable", "DaemonError"]

_POLL_MS = 50


class DaemonUnavailable(RuntimeError):
    """The daemon did not answer (dead, stopped, or stuck). Weights already mapped stay usable on
    CPU; anything new needs a daemon restart, which reads the checkpoint again."""


class DaemonError(RuntimeError):
    """The daemon answered with ``Error``."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"daemon error [{code}]: {reason}")
        self.code, self.reason = code, reason


class DaemonClient:
    """One connection to one daemon instance (one request at a time: use one client per thread).

    Args:
        endpoint: ``ipc://...`` or ``tcp://127.0.0.1:port`` (from ``daemon.json``).
        token: the instance token (from its 0600 token file; never pass it on a command line).
        timeout: default seconds per request.
        pid: the daemon's pid, when on this host: a dead pid fails a request at once.
    """

    def __init__(self, endpoint: str, token: str, *, timeout: float = 10.0, pid: int | None = None) -> None:
        self.endpoint, self._token, self.timeout, self.pid = endpoint, token, timeout, pid
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None

    @classmethod
    def from_run_dir(cls, run_dir: str, *, timeout: float = 10.0) -> "DaemonClient":
        """Read ``daemon.json`` and the token file of a daemon's run directory."""
        from sgl_elastic.daemon.server import INFO_FILE

        path = os.path.join(run_dir, INFO_FILE)
        try:
            with open(path) as f:
                info = json.load(f)
            with open(info["token_file"]) as f:
                token = f.read().strip()
        except FileNotFoundError as e:
            raise DaemonUnavailable(f"{e.filename} not found: no daemon is serving from {run_dir}") from None
        return cls(info["endpoint"], token, timeout=timeout, pid=info.get("pid"))

    # ---- transport -----------------------------------------------------------------------------------
    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            s = self._ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.REQ_RELAXED, 1)
            s.setsockopt(zmq.REQ_CORRELATE, 1)
            s.connect(self.endpoint)
            self._sock = s
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> "DaemonClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def daemon_alive(self) -> bool:
        if self.pid is None:
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # a killed daemon stays a zombie until its parent (the server) reaps it: dead all the same
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
        except OSError:
            return True

    def send_raw(self, data: bytes, timeout: float | None = None) -> P.Reply:
        """Send one frame as is and decode the reply (tests use it to send garbage)."""
        timeout = self.timeout if timeout is None else timeout
        if not self.daemon_alive():
            raise DaemonUnavailable(f"daemon pid {self.pid} is gone ({self.endpoint}); restart it (reads the checkpoint again)")
        sock = self._socket()
        try:
            sock.send(data, zmq.NOBLOCK)
        except zmq.ZMQError as e:
            self._reset()
            raise DaemonUnavailable(f"cannot send to the daemon at {self.endpoint}: {e}") from None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._reset()  # a REQ socket waiting for a lost reply is unusable: start afresh
                raise DaemonUnavailable(f"no reply from the daemon at {self.endpoint} within {timeout:.1f}s")
            if sock.poll(min(_POLL_MS, max(1, int(left * 1000))), zmq.POLLIN):
                return P.decode_reply(sock.recv())
            if not self.daemon_alive():
                self._reset()
                raise DaemonUnavailable(f"daemon pid {self.pid} died while serving this request ({self.endpoint})")

    def request(self, msg, timeout: float | None = None):
        reply = self.send_raw(P.encode(msg), timeout)
        if isinstance(reply, P.Error):
            raise DaemonError(reply.code, reply.reason)
        return reply

    def _req(self, cls, timeout: float | None = None, **fields):
        return self.request(cls(version=P.PROTOCOL_VERSION, token=self._token, **fields), timeout)

    # ---- typed calls ---------------------------------------------------------------------------------
    def stats(self, timeout: float | None = None) -> P.StatsReply:
        return self._req(P.Stats, timeout)

    def load_model(self, checkpoint: str, layout, ranks: list[int] | None = None) -> None:
        """Start loading (returns at once); ``wait_ready`` waits for it."""
        self._req(P.LoadModel, checkpoint=str(checkpoint), layout=layout.to_bytes(), ranks=ranks)

    def wait_ready(self, timeout: float = 300.0, *, epoch: int | None = None) -> P.StatsReply:
        """Poll Stats until state is READY (and ``epoch`` reached, if given).

        LoadModel / ApplyMigration change the state before they reply, so: EMPTY here means no load
        is running (it failed: DaemonError with ``last_error``); READY below ``epoch`` means the
        migration ended without advancing (failed). DaemonUnavailable when the daemon goes away or
        the time runs out.
        """
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if s.state == "ready" and (epoch is None or s.epoch >= epoch):
                return s
            if s.state == "empty":
                raise DaemonError(P.ErrorCode.STATE, s.last_error or "no model is held or loading; send LoadModel")
            if s.state == "ready":
                raise DaemonError(P.ErrorCode.INTERNAL, s.last_error or f"epoch {s.epoch} did not reach {epoch}")
            if time.monotonic() > deadline:
                raise DaemonUnavailable(f"daemon not ready within {timeout:.0f}s (state {s.state})")
            time.sleep(0.02)

    def register(self, rank: int, pid: int | None = None) -> P.Registered:
        return self._req(P.RegisterRank, rank=rank, pid=pid or os.getpid())

    def export_weights(self, rank: int) -> P.Handles:
        return self._req(P.ExportWeights, rank=rank)

    def attach_weights(self, rank: int, *, populate: bool = False) -> AttachedTensors:
        """Map ``rank``'s weight shards zero-copy: ``.tensors[name]`` (torch); ``populate``: fault
        the pages in now (see ``memory.attach_handles``)."""
        return attach_handles(self.export_weights(rank), populate=populate)

    def alloc_kv(self, *, num_layers: int, head_dim: int, num_slots: int, dtype: str,
                 kv_heads: list[int] | None = None, budget_slots: int = 0, page_size: int = 1,
                 backup: bool = False) -> str:
        return self._req(P.AllocKv, num_layers=num_layers, head_dim=head_dim, num_slots=num_slots, dtype=dtype,
                         kv_heads=list(kv_heads or []), budget_slots=budget_slots, page_size=page_size,
                         backup=backup).detail

    def export_kv(self, rank: int, *, backup: bool = False) -> P.Handles:
        return self._req(P.ExportKv, rank=rank, backup=backup)

    def attach_kv(self, rank: int, *, populate: bool = False, backup: bool = False) -> AttachedTensors:
        """Map ``rank``'s KV pool (``backup``: its backup pool): ``.tensors["kv.<layer>"]``,
        ``[2, num_slots, kv_heads, head_dim]`` (K = [0], V = [1])."""
        return attach_handles(self.export_kv(rank, backup=backup), populate=populate)

    def kv_match(self, token_ids: list[int], *, pin: bool = False, namespace: str = "") -> P.KvMatchReply:
        """Longest cached prefix; ``pin``: held for this process until ``kv_release`` or its death."""
        return self._req(P.KvMatch, token_ids=list(token_ids), pin=pin, owner_pid=os.getpid() if pin else 0,
                         namespace=namespace)

    def kv_insert(self, token_ids: list[int], slots: list[int], *, pin: bool = False,
                  namespace: str = "") -> P.KvInsertReply:
        return self._req(P.KvInsert, token_ids=list(token_ids), slots=list(slots), pin=pin,
                         owner_pid=os.getpid() if pin else 0, namespace=namespace)

    def kv_dump(self) -> P.KvDumpReply:
        """Every cached prefix (namespace, token ids, slots) ending at a leaf of the index."""
        return self._req(P.KvDump, timeout=max(self.timeout, 30.0))

    def kv_forget(self, slots: list[int], *, namespace: str = "") -> int:
        """Drop cached prefixes using any of ``slots`` (the server freed them); returns slots dropped."""
        return int(self._req(P.KvForget, slots=list(slots), namespace=namespace).detail)

    def kv_clear(self) -> int:
        return int(self._req(P.KvClear).detail)

    def publish_params(self, rank: int, tensors: list[tuple[str, str, tuple[int, ...]]]) -> AttachedTensors:
        """Allocate ``rank``'s parameter segment for ``(name, dtype, shape)`` tensors and map it
        (fill it, then ``commit_params``)."""
        specs = [P.ParamSpec(n, d, list(s)) for n, d, s in tensors]
        return attach_handles(self._req(P.PublishParams, rank=rank, tensors=specs))

    def commit_params(self, rank: int) -> None:
        self._req(P.CommitParams, rank=rank)

    def attach_params(self, rank: int, *, populate: bool = False) -> AttachedTensors | None:
        """Map ``rank``'s committed parameters, or None when none are published."""
        try:
            h = self._req(P.ExportParams, rank=rank)
        except DaemonError as e:
            if e.code == P.ErrorCode.NOT_FOUND:
                return None
            raise
        return attach_handles(h, populate=populate)

    def kv_release(self, pin_id: int) -> None:
        self._req(P.KvRelease, pin_id=pin_id)

    def evict_kv(self, num_slots: int = 0) -> list[int]:
        return self._req(P.EvictKv, num_slots=num_slots).freed_slots

    def apply_migration(self, plan, timeout: float = 600.0, **nodes) -> P.MigrationSummary:
        """Run ``plan`` in the daemon and wait for it; returns what the executor moved. ``nodes``:
        ``ranks``, ``remote`` (``{old rank: RemoteArena}``), ``hold_old`` (``start_migration``)."""
        epoch = self.start_migration(plan, **nodes)
        s = self.wait_ready(timeout, epoch=epoch + 1)
        assert s.last_migration is not None
        return s.last_migration

    def start_migration(self, plan, *, ranks: list[int] | None = None, remote: dict | None = None,
                        hold_old: bool = False) -> int:
        """Start ``plan`` (returns at once, with the epoch before it): ``wait_ready(epoch=that + 1)``.
        Several nodes: ``ranks`` this daemon builds, the peers' ``remote`` arenas, ``hold_old``."""
        epoch = self.stats().epoch
        self._req(P.ApplyMigration, plan=plan.to_bytes(), ranks=ranks,
                  remote=P.encode_remote(remote) if remote else b"", hold_old=hold_old)
        return epoch

    def export_remote(self) -> P.RemoteReply:
        """This daemon's weight views for peer daemons (its transfer endpoint opens)."""
        return self._req(P.ExportRemote)

    def release_old(self) -> None:
        self._req(P.ReleaseOld)

    def shutdown(self, timeout: float | None = None) -> None:
        self._req(P.Shutdown, timeout)
