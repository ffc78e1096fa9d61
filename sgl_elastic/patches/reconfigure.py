"""In-place failover inside a surviving scheduler process (one TP rank); its hooks are in
``patches/scheduler.py``, ``patches/request_receiver.py`` and ``patches/ipc_channels.py``.

When a peer rank dies, this process's collective fails (gloo: "Connection reset" within
milliseconds) and SGLang's event loop raises. Instead of letting the exception end the process
(SGLang then SIGQUITs the server), :func:`run_event_loop` keeps the process and its imports:

1. Step 1 (teardown): the old scheduler's unfinished requests are taken out of its queues (each
   keeps the output ids it generated), its watchdogs are disarmed, its process groups destroyed;
2. Step 2 (wait): it tells the controller ``RankHello`` and waits (bounded) for ``Reconfigure``:
   its new rank, tp size, elastic layout and a fresh rendezvous port. The controller has the
   daemon migrate the weights to that layout meanwhile;
3. Step 3 (rebuild): a fresh SGLang ``Scheduler`` is built in this process under the new layout
   through SGLang's own init path (re-``publish`` is last-wins, the parallel-init flag was reset
   by ``destroy_model_parallel``): new process group of the survivors, parameters bound from the
   daemon, a new KV pool. Rank 0 keeps its ZMQ channels (the tokenizer's PUSH socket queued new
   requests in them meanwhile: nothing is lost);
4. Step 4 (resume): the new rank 0 re-broadcasts every unfinished request as a ``ResumeReq``
   (its tokenized input and the output ids generated so far); every rank re-creates it and puts
   it in its waiting queue as SGLang's retraction does: prompt + output ids are re-prefilled,
   ``max_new_tokens``, stop conditions and streaming offsets are unchanged, so the client sees a
   pause, not an error and not a repeated token.

If the controller does not answer in time or the rebuild fails, the original exception goes on
(SGLang's path: the process ends, the controller falls back to a restart from the daemon).
Pass-through when failover is off (no ``SGLE_CONTROL`` at plugin load).
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time

from sgl_elastic.controller import faults, reqtrace, wire

__all__ = ["ResumeReq", "set_control_addr", "enabled", "failover", "log", "stash", "take_injected",
           "take_channels", "resume", "start_heartbeat", "drop_resubmitted", "note_channels",
           "join", "Regroup", "RegroupRequested", "maybe_regroup", "maybe_audit"]

_control_addr: str | None = None  # read once at plugin load
_heartbeat_s = 0.0  # heartbeat period (0: none), read once at plugin load
_heartbeat: "threading.Thread | None" = None
_epoch = 0  # the recovery epoch this process serves in
_inject: list = []  # rank 0: requests to hand to the next broadcast (ResumeReqs, then stashed inputs)
_stash: list | None = None  # rank 0: inputs being broadcast right now (re-sent if the broadcast fails)
_reuse_channels = None  # rank 0 -> rank 0: the old scheduler's ZMQ channels, for the new one
_built_channels: list = []  # channels made by a rebuild that then failed (closed before the next attempt)
_resubmitted: set[str] = set()  # new rank 0 after rank 0 died: rids re-submitted (a copy from the socket is dropped)

HELLO_TIMEOUT_S = 60.0  # how long a torn-down rank waits for its orders before giving up
# Req attributes carried over to the re-created request (everything a client or the detokenizer saw).
_CARRY = ("send_token_offset", "send_decode_id_offset", "send_output_token_logprobs_offset", "decoded_text",
          "surr_offset", "read_offset", "surr_and_decode_ids", "output_token_logprobs_val",
          "output_token_logprobs_idx", "output_top_logprobs_val", "output_top_logprobs_idx",
          "output_token_ids_logprobs_val", "output_token_ids_logprobs_idx", "cached_tokens", "retraction_count",
          "cur_decode_ids_len")


def set_control_addr(addr: str | None, heartbeat_s: float = 0.0) -> None:
    global _control_addr, _heartbeat_s
    _control_addr = addr or None
    _heartbeat_s = heartbeat_s


def start_heartbeat() -> None:
    """Touch this process's heartbeat file every period from a thread of its own (once per process).

    The thread does not depend on the event loop: a rank that is slow (long forwards, starved of
    CPU, blocked in a collective on a slow peer) keeps beating; only a process that does not run at
    all (stopped, frozen) goes silent, and the controller fences it after ``--elastic-hung-timeout``."""
    global _heartbeat
    if _heartbeat is not None or not _control_addr or _heartbeat_s <= 0:
        return
    path = wire.heartbeat_path(_control_addr, os.getpid())

    def beat() -> None:
        while True:
            try:
                with open(path, "a"):
                    os.utime(path, None)
            except OSError:  # the controller's dir is gone: the server is shutting down
                return
            time.sleep(_heartbeat_s)

    _heartbeat = threading.Thread(target=beat, name="sgle-heartbeat", daemon=True)
    _heartbeat.start()


def enabled() -> bool:
    return _control_addr is not None


def log(msg: str) -> None:
    print(f"[sgl-elastic failover pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


class ResumeReq:
    """An unfinished request carried into a new epoch (picklable: it rides SGLang's broadcast).

    ``delivered``: set when rank 0 died, the output ids the tokenizer manager received; the
    re-created request's stream offsets are aligned to them (see :func:`_align`)."""

    __slots__ = ("tokenized", "output_ids", "carry", "delivered")

    def __init__(self, tokenized, output_ids: list[int], carry: dict, delivered: list[int] | None = None) -> None:
        self.tokenized, self.output_ids, self.carry, self.delivered = tokenized, output_ids, carry, delivered


# ---- what the hooks (patches/scheduler.py, request_receiver.py, ipc_channels.py) call ----------------
def stash(reqs: list | None) -> None:
    global _stash
    _stash = reqs


def epoch() -> int:
    """The recovery epoch this process serves in."""
    return _epoch


def take_injected() -> list:
    global _inject
    out, _inject = _inject, []
    return out


def drop_resubmitted(reqs: list) -> list:
    """Rank 0's pull from the tokenizer: drop the copy of a request that was already re-submitted
    after rank 0 died (it sat in the tokenizer's socket queue and is delivered to the new rank 0)."""
    if not _resubmitted or not reqs:
        return reqs
    out = []
    for r in reqs:
        batch = getattr(r, "batch", None)
        if isinstance(batch, list):
            keep = [b for b in batch if getattr(b, "rid", None) not in _resubmitted]
            if len(keep) != len(batch):
                log(f"dropped {len(batch) - len(keep)} re-submitted request(s) delivered again by the socket")
                if not keep:
                    continue
                r.batch = keep
        elif getattr(r, "rid", None) in _resubmitted and hasattr(r, "input_ids"):
            log(f"dropped request {r.rid}: already re-submitted, delivered again by the socket")
            continue
        out.append(r)
    return out


def note_channels(ch) -> None:
    """A scheduler made new channels (kept until the next one: a rebuild that fails closes them)."""
    _built_channels[:] = [ch]


class Regroup:
    """Marker rank 0 broadcasts with a step's requests: every rank leaves its group at that step
    (the controller asked for it: a scale-up), tears down and checks in like a failure's survivor."""

    __slots__ = ("epoch",)

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def __getstate__(self):
        return self.epoch

    def __setstate__(self, s):
        self.epoch = s


class RegroupRequested(RuntimeError):
    pass


_regroup_seen_t = 0.0


def maybe_regroup(reqs: list) -> list:
    """Rank 0's pull: if the controller left its regroup request (a file in its run dir; checked at
    most every 50 ms), take it and append a ``Regroup`` marker to this step's broadcast."""
    global _regroup_seen_t
    now = time.monotonic()
    if not _control_addr or now - _regroup_seen_t < 0.05:
        return reqs
    _regroup_seen_t = now
    try:
        os.unlink(wire.regroup_path(_control_addr))
    except FileNotFoundError:
        return reqs
    log("the controller asks the ranks to regroup (a rank joins): broadcasting it with this step")
    return list(reqs) + [Regroup(_epoch)]


_audit_seen_t = 0.0


def _held_rids(sched) -> list[str]:
    """Every request ``sched`` holds: queued, running, in the batch being run, chunked, waiting for
    its grammar, or about to be re-broadcast (a failover's resumed requests not pulled yet)."""
    rids = {r.rid for r in _unfinished(sched)}
    gm = getattr(sched, "grammar_manager", None)
    for q in (getattr(sched, "grammar_queue", None), getattr(gm, "grammar_queue", None)):
        for r in q or []:
            rids.add(getattr(r, "rid", None))
    for r in _inject:
        t = getattr(r, "tokenized", r)
        rids.add(getattr(t, "rid", None))
    rids.discard(None)
    return sorted(rids)


def maybe_audit(sched) -> None:
    """Rank 0, once per loop (a stat at most every 100 ms): if the controller asks which requests
    this rank holds (its audit file), answer with their rids. See ``controller.accounting``."""
    global _audit_seen_t
    now = time.monotonic()
    if not _control_addr or now - _audit_seen_t < 0.1:
        return
    _audit_seen_t = now
    import json

    req, reply = wire.audit_paths(_control_addr)
    try:
        with open(req) as f:
            seq = int(f.read().strip() or 0)
        os.unlink(req)
    except (FileNotFoundError, ValueError):
        return
    tmp = f"{reply}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        held = _held_rids(sched)
        json.dump({"seq": seq, "epoch": _epoch, "rids": held}, f)
    os.replace(tmp, reply)
    reqtrace.note("held", held, seq=seq, epoch=_epoch)


def take_channels():
    global _reuse_channels
    ch, _reuse_channels = _reuse_channels, None
    return ch


def resume(sched, r: ResumeReq) -> None:
    """Re-create a resumed request in ``sched``'s waiting queue with the output it had (retraction semantics)."""
    sched.handle_generate_request(r.tokenized)
    req = next((q for q in reversed(sched.waiting_queue) if q.rid == r.tokenized.rid), None)
    reqtrace.note("resume", [r.tokenized.rid], queued=req is not None, output=len(r.output_ids), epoch=_epoch)
    if req is None:
        log(f"resumed request {r.tokenized.rid} was not queued by SGLang (rejected); it ends with SGLang's error")
        return
    req.output_ids.extend(r.output_ids)
    for k, v in r.carry.items():
        setattr(req, k, v)
    if r.delivered is not None:
        _align(req, r.delivered)
    req.is_retracted = True


def _align(req, delivered: list[int]) -> None:
    """Rank 0 died: make ``req``'s stream state match what the tokenizer manager received.

    The dead rank 0 may have been one step ahead of the survivors (it streamed a token they never
    processed) or behind (it died before streaming a step they processed). The client's view wins:
    output ids it saw are kept (a divergent continuation of the survivors is dropped), and every
    offset is set so the next output starts right after the last token delivered: no token twice,
    none missing. Runs the same on every rank (deterministic)."""
    d = len(delivered)
    if list(req.output_ids[:d]) != list(delivered):
        req.output_ids[:] = list(delivered)
    if req.send_token_offset == d and len(req.output_ids) >= d and d > 0:
        return
    req.send_token_offset = d
    req.surr_offset = req.read_offset = None  # incremental detokenization recomputed from scratch
    req.send_decode_id_offset = 0
    if d:
        ids, _ = req.init_incremental_detokenize()
        req.send_decode_id_offset = len(ids) - (len(req.output_ids) - d)
    if getattr(req, "return_logprob", False):
        n = len(getattr(req, "output_token_logprobs_val", None) or [])
        if n < d:
            log(f"request {req.rid}: logprobs of {d - n} delivered token(s) were lost with rank 0")
        req.send_output_token_logprobs_offset = min(n, d)


# ---- the failover -----------------------------------------------------------------------------------
def _requests_of(sched, keep) -> list:
    """Every request ``sched`` holds for which ``keep(req)``, once each, in a deterministic order:
    running, the last batch, the batch being run (a new prefill batch's requests are in no queue
    then), the overlap loop's queued results, the chunked request, then waiting."""
    groups = [getattr(sched.running_batch, "reqs", None) or []]
    for name in ("last_batch", "cur_batch_for_debug"):
        b = getattr(sched, name, None)
        if b is not None:
            groups.append(list(getattr(b, "reqs", None) or []))
    for batch, _result in list(getattr(sched, "result_queue", None) or []):
        groups.append(list(getattr(batch, "reqs", None) or []))
    if getattr(sched, "chunked_req", None) is not None:
        groups.append([sched.chunked_req])
    groups.append(list(sched.waiting_queue))
    seen, out = set(), []
    for g in groups:
        for req in g:
            if req.rid not in seen and keep(req):
                seen.add(req.rid)
                out.append(req)
    return out


def _unfinished(sched) -> list:
    """The old scheduler's unfinished requests in a deterministic order (running first, then waiting)."""
    return _requests_of(sched, lambda r: not r.finished())


def _flush_finished(sched) -> None:
    """Rank 0: send the final output of the requests the old scheduler finished but never streamed
    (its loop stopped between a request's finish and the batch's output: a collective, or an error,
    in between). They are not resumed (finished), so without this their clients would wait forever."""
    done = _requests_of(sched, lambda r: r.finished() and not getattr(r, "finished_output", True))
    if not done:
        return
    reqtrace.note("flush", [r.rid for r in done])
    try:
        sched.output_streamer.stream_output(done, any(getattr(r, "return_logprob", False) for r in done))
        log(f"sent the final output of {len(done)} request(s) finished but not streamed before the failure:"
            f" {[r.rid for r in done]}")
    except Exception as e:  # noqa: BLE001 - the request audit ends them with an error instead
        log(f"ERROR: could not send the final output of finished requests {[r.rid for r in done]}:"
            f" {type(e).__name__}: {e}")


_unresumable: list[str] = []  # rids of this failover that can be neither resumed nor re-submitted


def _resume_record(req) -> ResumeReq | None:
    tok = getattr(req, "_sgle_tokenized", None)
    if tok is None:
        log(f"ERROR: request {req.rid} has no recorded input and cannot be resumed; it ends with an error")
        _unresumable.append(req.rid)
        return None
    carry = {k: getattr(req, k) for k in _CARRY if hasattr(req, k)}
    for k in ("output_token_logprobs_val", "output_token_logprobs_idx", "output_top_logprobs_val",
              "output_top_logprobs_idx", "output_token_ids_logprobs_val", "output_token_ids_logprobs_idx",
              "surr_and_decode_ids"):
        if isinstance(carry.get(k), list):
            carry[k] = list(carry[k])
    return ResumeReq(tok, list(req.output_ids), carry)


def _disarm(sched) -> None:
    """Stop the old scheduler's threads from acting on it (its watchdog would SIGQUIT the server)."""
    sched.cur_batch_for_debug = None
    for name in ("watchdog", "soft_watchdog"):
        w = getattr(sched, name, None)
        if w is not None and hasattr(w, "is_active"):
            w.is_active = lambda: False
    sched.gracefully_exit = True


def _teardown_groups() -> None:
    import torch.distributed as dist
    from sglang.srt.distributed import parallel_state as ps

    # Abort first: a peer blocked in a collective with this process must see its sockets close now,
    # not when the last Python reference to the old groups goes away (it may wait forever otherwise).
    if dist.is_initialized():
        for pg in list(dist.distributed_c10d._world.pg_map.keys()):
            try:
                pg.abort()
            except Exception as e:  # noqa: BLE001 - backends without abort: destroy below
                log(f"abort of a process group: {type(e).__name__}: {e} (ignored)")
    _shutdown_tcp()
    for fn in (ps.destroy_model_parallel, ps.destroy_distributed_environment):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a broken group may refuse a clean destroy
            log(f"{fn.__name__}: {type(e).__name__}: {e} (ignored)")
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001
            log(f"destroy_process_group: {e} (ignored)")


def _release_device_cache() -> None:
    """GPU: hand the old scheduler's cached blocks (activations, CUDA graph pools) back to the driver,
    so the new scheduler, which sizes its memory from what is free and captures its own graphs,
    finds them. After ``_teardown_groups``: its aborted NCCL communicators no longer hold kernels.
    Not run on a GPU yet (no accelerator was available); a no-op on CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _shutdown_tcp() -> None:
    """Shut down every TCP socket of this process (the old epoch's gloo pairs and store).

    A peer blocked in a collective with this process (a ring step, a broadcast from this rank)
    gets EOF at once and fails over too; otherwise it would wait until the old group's last
    Python reference dies, or gloo's timeout. ZMQ channels and the daemon use ipc sockets, and the
    HTTP server lives in the main process: nothing else of SGLang's speaks TCP here.
    """
    import socket

    import psutil

    n = 0
    for c in psutil.Process().net_connections(kind="tcp"):
        if c.fd < 0 or not c.raddr:
            continue
        try:
            s = socket.socket(fileno=os.dup(c.fd))
        except OSError:
            continue
        try:
            s.shutdown(socket.SHUT_RDWR)
            n += 1
        except OSError:
            pass
        finally:
            s.close()
    log(f"shut down {n} TCP connections of the old process groups")


def _close_channels(ch) -> None:
    for name in ("recv_from_tokenizer", "recv_from_rpc", "send_metrics_from_scheduler"):
        s = getattr(ch, name, None)
        if s is not None and hasattr(s, "close"):
            s.close(linger=0)
    for name in ("send_to_tokenizer", "send_to_detokenizer"):
        w = getattr(ch, name, None)
        s = getattr(w, "socket", None) if w is not None else None
        if s is not None and hasattr(s, "close"):
            s.close(linger=0)


def _ask_controller(old_rank: int, reason: str, wait_s: float = HELLO_TIMEOUT_S):
    import zmq

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(_control_addr)
    try:
        sock.send(wire.encode(wire.RankHello(epoch=_epoch, rank=old_rank, pid=os.getpid(), reason=reason)))
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000)):
                raise TimeoutError(f"no orders from the failover controller within {wait_s:.0f} s")
            msg = wire.decode(sock.recv())
            if msg.epoch <= _epoch:
                continue  # an older epoch's message
            if isinstance(msg, wire.Retire):
                raise RuntimeError(f"retired by the controller: {msg.reason}")
            if isinstance(msg, wire.Reconfigure):
                return msg, sock
    except BaseException:
        sock.close(0)
        raise


def _forget_metrics() -> None:
    """Unregister the old scheduler's Prometheus collectors (``--enable-metrics``): the new one
    registers the same names in this process's registry."""
    if "prometheus_client" not in sys.modules:  # never imported: nothing registered (and no 40 ms import now)
        return
    from prometheus_client import REGISTRY

    for c in list(getattr(REGISTRY, "_collector_to_names", {})):
        try:
            REGISTRY.unregister(c)
        except KeyError:
            pass


def _new_server_args(old, tp_size: int, **overrides):
    """A fresh, unresolved ServerArgs equal to ``old`` but for tp_size (and ep_size with it)."""
    from sgl_elastic.controller.supervisor import server_args_at

    return server_args_at(old, tp_size, **overrides)


def _take_over(records: list, takeover: bytes) -> tuple[list, int, int]:
    """New rank 0 after rank 0 died: align the survivors' requests with what the tokenizer manager
    received, and re-submit the ones no survivor holds (queued in, or half-broadcast by, the dead
    rank 0). Returns (requests to inject, resubmitted, dropped)."""
    import pickle

    global _resubmitted
    live: dict = pickle.loads(takeover)
    out, dropped = [], 0
    for r in records:
        if r.tokenized.rid not in live:
            dropped += 1  # finished (or aborted) as far as the client is concerned
            continue
        r.delivered = list(live[r.tokenized.rid][0])
        out.append(r)
    held = {r.tokenized.rid for r in out}
    resub = 0
    for rid, (delivered, tokenized) in live.items():
        if rid in held:
            continue
        if tokenized is None:
            log(f"ERROR: request {rid} was lost with rank 0 and has no recorded input; it ends with an error")
            _unresumable.append(rid)
            continue
        out.append(ResumeReq(tokenized, list(delivered), {}, list(delivered)) if delivered else tokenized)
        resub += 1
    _resubmitted = {rid for rid in live if rid not in held}
    reqtrace.note("takeover", sorted(_resubmitted), kept=sorted(held), dropped=dropped)
    return out, resub, dropped


REBUILDS = 3  # attempts at rebuilding (a peer that dies during the rebuild makes it fail: ask again)
REBUILD_INIT_TIMEOUT_S = wire.REBUILD_INIT_TIMEOUT_S  # bound on the new group's rendezvous and init (then restored)


_UNSET = object()
_user_dist_timeout = _UNSET  # the user's --dist-timeout (seconds; None: torch's default), read at the first rebuild


def _restore_timeouts() -> None:
    """The built groups get the user's ``--dist-timeout`` back (the rebuild ran with a short one)."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _set_pg_timeout

    if not dist.is_initialized():
        return
    secs = None if _user_dist_timeout is _UNSET else _user_dist_timeout
    timeout = timedelta(seconds=secs) if secs else timedelta(minutes=30)  # torch's default when none was given
    for pg in list(dist.distributed_c10d._world.pg_map.keys()):
        try:
            _set_pg_timeout(timeout, pg)
        except Exception as e:  # noqa: BLE001 - a backend without settable timeouts keeps the bounded one
            log(f"cannot restore a process group's timeout: {type(e).__name__}: {e}")


def failover(old, reason: str):
    """Tear ``old`` down, then (up to ``REBUILDS`` times) get orders and build the new scheduler."""
    global _stash
    import copy

    from sglang.srt.runtime_context import get_device, get_parallel

    t0 = time.perf_counter()
    old_rank = get_parallel().tp_rank
    gpu_id = get_device().gpu_id
    # Step 1: teardown (requests kept in this process's memory).
    _unresumable.clear()
    if old_rank == 0:
        _flush_finished(old)
    reqs = _unfinished(old)
    records = [r for r in (_resume_record(q) for q in reqs) if r is not None]
    pending = list(_stash or [])
    _stash = None
    if reqtrace.on():
        reqtrace.note("failover", [r.tokenized.rid for r in records], rank=old_rank, epoch=_epoch,
                      pending=reqtrace.rids_of(pending), reason=reason[:80])
    _disarm(old)
    channels = getattr(old, "ipc_channels", None)
    _built_channels.clear()  # the old scheduler's own channels are ``channels``
    server_args, port_args = old.server_args, copy.copy(getattr(old, "_sgle_port_args", None))
    _teardown_groups()
    del old, reqs
    gc.collect()
    _release_device_cache()
    return _build(old_rank, gpu_id, reason, records, pending, channels, server_args, port_args, t0)


def join(server_args, port_args, gpu_id: int, reason: str, wait_s: float, t0: float):
    """A new rank process (``patches.join``): get orders, build the scheduler (no requests to resume)."""
    return _build(-1, gpu_id, reason, [], [], None, server_args, port_args, t0, wait_s)


def _build(old_rank, gpu_id, reason, records, pending, channels, server_args, port_args, t0,
           wait_s: float = HELLO_TIMEOUT_S):
    for attempt in range(1, REBUILDS + 1):
        try:
            return _rebuild(old_rank, gpu_id, reason, records, pending, channels, server_args, port_args, t0, wait_s)
        except _RebuildFailed as e:
            if attempt == REBUILDS:
                raise e.__cause__ from None
            reason = f"rebuild {attempt} failed: {e}"
            log(f"{reason}; tearing down and asking the controller again")
            _close_channels(_built_channels.pop() if _built_channels else None)
            _teardown_groups()
            channels = None if old_rank != 0 else channels
            t0 = time.perf_counter()


class _RebuildFailed(Exception):
    pass


def _await_listening(host: str, port: int, timeout_s: float = 1.0) -> None:
    """Wait (bounded; then go on regardless) until rank 0's rendezvous store listens on ``port``.

    torch's TCPStore client that finds no listener backs off with growing delays: a rank that
    reached the rendezvous 20-100 ms before rank 0 lost 0.4-0.8 s here (measured), half the
    rebuild. A plain connect every 5 ms costs nothing and lets torch's first attempt succeed. The
    bound is short: a dead rank 0 (a second failure) must not delay the rebuild's failure much.
    """
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.005)




def _rebuild(old_rank, gpu_id, reason, records, pending, channels, server_args, port_args, t0, wait_s):
    global _epoch, _inject, _reuse_channels, _user_dist_timeout
    import copy

    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context

    from sgl_elastic.layout import ElasticLayout
    from sgl_elastic.patches import daemon_link, state

    t_down = time.perf_counter()
    # Step 2: orders.
    order, sock = _ask_controller(old_rank, reason, wait_s)
    t_order = time.perf_counter()
    records = list(records)
    port_args = copy.copy(port_args)
    try:
        # Step 3: rebuild.
        layout = ElasticLayout.from_bytes(order.layout)
        state.set_layout(layout)
        state.set_map_epoch(order.epoch)  # the new model's expert maps carry this epoch
        os.environ[state.ENV_VAR] = state.encode(layout)
        if order.omp_bind:
            os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = order.omp_bind
        if order.daemon_dir:  # the daemon to attach to (a replacement when the old one died)
            daemon_link.set_run_dir(order.daemon_dir)
        daemon_link.reset_attachment()
        if channels is not None and order.rank == 0 and old_rank == 0:
            _reuse_channels = channels
        elif channels is not None:
            _close_channels(channels)
        _forget_metrics()
        # The new group's rendezvous must not wait for a peer that died before joining (torch's
        # default: 30 min): bounded here, and _restore_timeouts gives the built groups the usual one.
        if _user_dist_timeout is _UNSET:  # this process's first rebuild: its args are still the user's
            _user_dist_timeout = getattr(server_args, "dist_timeout", None)
        new_args = _new_server_args(server_args, order.tp_size, dist_timeout=int(REBUILD_INIT_TIMEOUT_S))
        port_args.nccl_port = order.dist_port
        if getattr(server_args, "device", None) == "cpu":
            gpu_id = order.rank  # on CPU the "gpu id" is the index into SGLANG_CPU_OMP_THREADS_BIND
        elif order.gpu_slot >= 0:  # a new rank: the device the controller gave it
            gpu_id = server_args.base_gpu_id + order.gpu_slot * server_args.gpu_id_step
        reset_context()  # SGLang's "runtime lifecycle reset": flags, resources (EPLB metadata), overrides
        publish(new_args, role="scheduler", ranks=SpawnRanks(world_rank=order.rank, dp_rank=None, gpu_id=gpu_id))
        try:
            import setproctitle

            setproctitle.setproctitle(f"sglang::scheduler_TP{order.rank}")
        except ImportError:
            pass
        if faults.delay_s("rebuild"):  # tests only (controller.faults)
            time.sleep(faults.delay_s("rebuild"))
        if faults.injected("rebuild") and order.epoch == 1:
            raise RuntimeError(f"{faults.ENV_TEST_FAIL}=rebuild: injected failure of this rank's rebuild (tests only)")
        if order.rank != 0 and order.tp_size > 1 and not getattr(new_args, "dist_init_addr", None):
            _await_listening(getattr(new_args, "host", None) or "127.0.0.1", order.dist_port)
        sched = Scheduler(new_args, port_args)
        _restore_timeouts()
        _reuse_channels = None
        t_built = time.perf_counter()
        # Step 4: resume (rank 0 is authoritative: the others re-create what it broadcasts).
        _epoch = order.epoch
        took = ""
        resub = 0
        if order.rank == 0 and order.takeover:
            records, resub, dropped = _take_over(records, order.takeover)
            took = f"; took over rank 0's intake: {resub} requests re-submitted, {dropped} finished ones dropped"
        if order.rank == 0:
            _inject = list(records) + pending
        log(f"epoch {order.epoch}: rank {old_rank} -> {order.rank} of {order.tp_size}; teardown {t_down - t0:.3f} s,"
            f" waited {t_order - t_down:.3f} s, rebuilt {t_built - t_order:.3f} s;"
            f" {len(records) if order.rank == 0 else 0} requests resumed, {len(pending)} inputs re-sent{took}")
        sock.send(wire.encode(wire.RankReady(
            epoch=order.epoch, rank=order.rank, pid=os.getpid(),
            resumed=len(records) if order.rank == 0 else 0,
            unresumable=list(_unresumable) if order.rank == 0 else [], resubmitted=resub,
            phases_s={"teardown": t_down - t0, "wait": t_order - t_down, "rebuild": t_built - t_order})))
        return sched
    except Exception as e:
        _reuse_channels = None
        try:
            sock.send(wire.encode(wire.RankFailed(epoch=order.epoch, rank=order.rank, pid=os.getpid(),
                                                  reason=f"{type(e).__name__}: {e}"[:500])))
        except Exception:  # noqa: BLE001
            pass
        raise _RebuildFailed(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]) from e
    finally:
        sock.close(linger=500)
