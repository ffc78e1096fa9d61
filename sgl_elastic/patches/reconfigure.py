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
import time

from sgl_elastic.controller import wire

__all__ = ["ResumeReq", "set_control_addr", "enabled", "failover", "log", "stash", "take_injected",
           "take_channels", "resume"]

_control_addr: str | None = None  # read once at plugin load
_epoch = 0  # the recovery epoch this process serves in
_inject: list = []  # rank 0: requests to hand to the next broadcast (ResumeReqs, then stashed inputs)
_stash: list | None = None  # rank 0: inputs being broadcast right now (re-sent if the broadcast fails)
_reuse_channels = None  # rank 0 -> rank 0: the old scheduler's ZMQ channels, for the new one

HELLO_TIMEOUT_S = 60.0  # how long a torn-down rank waits for its orders before giving up
# Req attributes carried over to the re-created request (everything a client or the detokenizer saw).
_CARRY = ("send_token_offset", "send_decode_id_offset", "send_output_token_logprobs_offset", "decoded_text",
          "surr_offset", "read_offset", "surr_and_decode_ids", "output_token_logprobs_val",
          "output_token_logprobs_idx", "output_top_logprobs_val", "output_top_logprobs_idx",
          "output_token_ids_logprobs_val", "output_token_ids_logprobs_idx", "cached_tokens", "retraction_count",
          "cur_decode_ids_len")


def set_control_addr(addr: str | None) -> None:
    global _control_addr
    _control_addr = addr or None


def enabled() -> bool:
    return _control_addr is not None


def log(msg: str) -> None:
    print(f"[sgl-elastic failover pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


class ResumeReq:
    """An unfinished request carried into a new epoch (picklable: it rides SGLang's broadcast)."""

    __slots__ = ("tokenized", "output_ids", "carry")

    def __init__(self, tokenized, output_ids: list[int], carry: dict) -> None:
        self.tokenized, self.output_ids, self.carry = tokenized, output_ids, carry

    def __getstate__(self):
        return (self.tokenized, self.output_ids, self.carry)

    def __setstate__(self, s):
        self.tokenized, self.output_ids, self.carry = s


# ---- what the hooks (patches/scheduler.py, request_receiver.py, ipc_channels.py) call ----------------
def stash(reqs: list | None) -> None:
    global _stash
    _stash = reqs


def take_injected() -> list:
    global _inject
    out, _inject = _inject, []
    return out


def take_channels():
    global _reuse_channels
    ch, _reuse_channels = _reuse_channels, None
    return ch


def resume(sched, r: ResumeReq) -> None:
    """Re-create a resumed request in ``sched``'s waiting queue with the output it had (retraction semantics)."""
    sched.handle_generate_request(r.tokenized)
    req = next((q for q in reversed(sched.waiting_queue) if q.rid == r.tokenized.rid), None)
    if req is None:
        log(f"resumed request {r.tokenized.rid} was not queued by SGLang (rejected); it ends with SGLang's error")
        return
    req.output_ids.extend(r.output_ids)
    for k, v in r.carry.items():
        setattr(req, k, v)
    req.is_retracted = True


# ---- the failover -----------------------------------------------------------------------------------
def _unfinished(sched) -> list:
    """The old scheduler's unfinished requests in a deterministic order (running first, then waiting)."""
    seen, out = set(), []
    groups = [getattr(sched.running_batch, "reqs", None) or []]
    last = getattr(sched, "last_batch", None)
    if last is not None:
        groups.append(list(getattr(last, "reqs", None) or []))
    cur = getattr(sched, "cur_batch_for_debug", None)  # the batch whose forward failed: a new prefill
    if cur is not None:                                  # batch's requests are in no queue at that point
        groups.append(list(getattr(cur, "reqs", None) or []))
    if getattr(sched, "chunked_req", None) is not None:
        groups.append([sched.chunked_req])
    groups.append(list(sched.waiting_queue))
    for g in groups:
        for req in g:
            if req.rid in seen or req.finished():
                continue
            seen.add(req.rid)
            out.append(req)
    return out


def _resume_record(req) -> ResumeReq | None:
    tok = getattr(req, "_sgle_tokenized", None)
    if tok is None:
        log(f"ERROR: request {req.rid} has no recorded input and cannot be resumed; its client will wait")
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


def _ask_controller(old_rank: int, reason: str):
    import zmq

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(_control_addr)
    try:
        sock.send(wire.encode(wire.RankHello(epoch=_epoch, rank=old_rank, pid=os.getpid(), reason=reason)))
        deadline = time.monotonic() + HELLO_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000)):
                raise TimeoutError(f"no orders from the failover controller within {HELLO_TIMEOUT_S:.0f} s")
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
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return
    for c in list(getattr(REGISTRY, "_collector_to_names", {})):
        try:
            REGISTRY.unregister(c)
        except KeyError:
            pass


def _new_server_args(old, tp_size: int):
    """A fresh, unresolved ServerArgs equal to ``old`` but for tp_size (resolved records are read-only)."""
    from sglang.srt.server_args import ServerArgs, record_fields

    kw = {f.name: getattr(old, f.name) for f in record_fields(ServerArgs) if hasattr(old, f.name)}
    kw["tp_size"] = tp_size
    return ServerArgs(**kw)


def failover(old, reason: str):
    global _epoch, _inject, _stash, _reuse_channels
    import copy

    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.runtime_context import SpawnRanks, get_device, get_parallel, publish, reset_context

    from sgl_elastic.layout import ElasticLayout
    from sgl_elastic.patches import daemon_link, state

    t0 = time.perf_counter()
    old_rank = get_parallel().tp_rank
    gpu_id = get_device().gpu_id
    # Step 1: teardown (requests kept in this process's memory).
    reqs = _unfinished(old)
    records = [r for r in (_resume_record(q) for q in reqs) if r is not None]
    pending = list(_stash or [])
    _stash = None
    _disarm(old)
    channels = getattr(old, "ipc_channels", None)
    server_args, port_args = old.server_args, copy.copy(getattr(old, "_sgle_port_args", None))
    _teardown_groups()
    t_down = time.perf_counter()
    # Step 2: orders.
    order, sock = _ask_controller(old_rank, reason)
    t_order = time.perf_counter()
    try:
        # Step 3: rebuild.
        layout = ElasticLayout.from_bytes(order.layout)
        state.set_layout(layout)
        os.environ[state.ENV_VAR] = state.encode(layout)
        if order.omp_bind:
            os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = order.omp_bind
        daemon_link.reset_attachment()
        if channels is not None and order.rank == 0 and old_rank == 0:
            _reuse_channels = channels
        elif channels is not None:
            _close_channels(channels)
        _forget_metrics()
        new_args = _new_server_args(server_args, order.tp_size)
        port_args.nccl_port = order.dist_port
        del old
        gc.collect()
        if getattr(server_args, "device", None) == "cpu":
            gpu_id = order.rank  # on CPU the "gpu id" is the index into SGLANG_CPU_OMP_THREADS_BIND
        reset_context()  # SGLang's "runtime lifecycle reset": flags, resources (EPLB metadata), overrides
        publish(new_args, role="scheduler", ranks=SpawnRanks(world_rank=order.rank, dp_rank=None, gpu_id=gpu_id))
        try:
            import setproctitle

            setproctitle.setproctitle(f"sglang::scheduler_TP{order.rank}")
        except ImportError:
            pass
        sched = Scheduler(new_args, port_args)
        _reuse_channels = None
        t_built = time.perf_counter()
        # Step 4: resume (rank 0 is authoritative: the others re-create what it broadcasts).
        _epoch = order.epoch
        if order.rank == 0:
            _inject = list(records) + pending
        log(f"epoch {order.epoch}: rank {old_rank} -> {order.rank} of {order.tp_size}; teardown {t_down - t0:.3f} s,"
            f" waited {t_order - t_down:.3f} s, rebuilt {t_built - t_order:.3f} s;"
            f" {len(records) if order.rank == 0 else 0} requests resumed, {len(pending)} inputs re-sent")
        sock.send(wire.encode(wire.RankReady(
            epoch=order.epoch, rank=order.rank, pid=os.getpid(),
            resumed=len(records) if order.rank == 0 else 0,
            phases_s={"teardown": t_down - t0, "wait": t_order - t_down, "rebuild": t_built - t_order})))
        return sched
    except BaseException as e:
        try:
            sock.send(wire.encode(wire.RankFailed(epoch=order.epoch, rank=order.rank, pid=os.getpid(),
                                                  reason=f"{type(e).__name__}: {e}"[:500])))
        except Exception:  # noqa: BLE001
            pass
        raise
    finally:
        sock.close(linger=500)
