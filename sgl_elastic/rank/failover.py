"""In-place failover inside a surviving scheduler process (one TP rank); its hooks are in
``patches/scheduler.py``, ``patches/request_receiver.py`` and ``patches/ipc_channels.py``.

When a peer rank dies, this process's collective fails (gloo: "Connection reset" within
milliseconds) and SGLang's event loop raises. Instead of letting the exception end the process
(SGLang then SIGQUITs the server), ``patches.scheduler.run_event_loop`` keeps the process and its imports:

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

import copy
import dataclasses
import gc
import os
import sys
import time
from typing import Any

from sgl_elastic.controller import faults, reqtrace, wire
from sgl_elastic.rank.requests import ResumeReq, flush_finished, resume_record, take_over, unfinished
from sgl_elastic.rank.session import RANK, log

HELLO_TIMEOUT_S = 60.0  # how long a torn-down rank waits for its orders before giving up
REBUILDS = 3  # attempts at rebuilding (a peer that dies during the rebuild makes it fail: ask again)
REBUILD_INIT_TIMEOUT_S = wire.REBUILD_INIT_TIMEOUT_S  # bound on the new group's rendezvous and init (then restored)


def set_control_addr(addr: str | None, heartbeat_s: float = 0.0) -> None:
    """Plugin load: the controller's socket (None: in-place failover off) and the heartbeat period."""
    RANK.control_addr = addr or None
    RANK.heartbeat_s = heartbeat_s


def enabled() -> bool:
    return RANK.control_addr is not None


def epoch() -> int:
    """The recovery epoch this process serves in."""
    return RANK.epoch


def stash(reqs: list | None) -> None:
    """Rank 0: the inputs being broadcast right now (re-sent by the next epoch if the broadcast fails)."""
    RANK.stash = reqs


def take_injected() -> list:
    """Rank 0's pull: the requests queued for the new epoch's first broadcast (once)."""
    out, RANK.inject = RANK.inject, []
    return out


def take_channels():
    """The new rank 0's scheduler: the old one's ZMQ channels to keep (once), or None."""
    ch, RANK.reuse_channels = RANK.reuse_channels, None
    return ch


def note_channels(ch) -> None:
    """A scheduler made new channels (kept until the next one: a rebuild that fails closes them)."""
    RANK.built_channels[:] = [ch]


@dataclasses.dataclass
class RebuildInputs:
    """What a rebuild starts from: who this process was, and what it carries into the next epoch."""

    old_rank: int  # its rank in the old epoch; -1: a new rank process (scale-up)
    gpu_id: int
    reason: str  # why it checks in (sent to the controller in RankHello)
    records: list[ResumeReq]  # the old scheduler's unfinished requests
    pending: list  # rank 0: inputs that were being broadcast when the failure struck
    channels: Any  # the old scheduler's ZMQ channels (rank 0 keeps them if it stays rank 0)
    server_args: Any  # the user's ServerArgs (the old epoch's)
    port_args: Any
    t0: float  # perf_counter at the start of the teardown
    wait_s: float = HELLO_TIMEOUT_S  # bound on the wait for orders


# ---- step 1: teardown ---------------------------------------------------------------------------------
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
    sock.connect(RANK.control_addr)
    try:
        sock.send(wire.encode(wire.RankHello(epoch=RANK.epoch, rank=old_rank, pid=os.getpid(), reason=reason)))
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000)):
                raise TimeoutError(f"no orders from the failover controller within {wait_s:.0f} s")
            msg = wire.decode(sock.recv())
            if msg.epoch <= RANK.epoch:
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


def failover(old, reason: str):
    """Tear ``old`` down, then (up to ``REBUILDS`` times) get orders and build the new scheduler."""
    from sglang.srt.runtime_context import get_device, get_parallel

    t0 = time.perf_counter()
    old_rank = get_parallel().tp_rank
    gpu_id = get_device().gpu_id
    RANK.unresumable.clear()
    if old_rank == 0:
        flush_finished(old)
    reqs = unfinished(old)
    records = [r for r in (resume_record(q) for q in reqs) if r is not None]
    pending, RANK.stash = list(RANK.stash or []), None
    if reqtrace.on():
        reqtrace.note("failover", [r.tokenized.rid for r in records], rank=old_rank, epoch=RANK.epoch,
                      pending=reqtrace.rids_of(pending), reason=reason[:80])
    _disarm(old)
    RANK.built_channels.clear()  # the old scheduler's own channels are passed on below
    inputs = RebuildInputs(old_rank, gpu_id, reason, records, pending, getattr(old, "ipc_channels", None),
                           old.server_args, copy.copy(getattr(old, "_sgle_port_args", None)), t0)
    _teardown_groups()
    del old, reqs
    gc.collect()
    _release_device_cache()
    return _build(inputs)


def join(server_args, port_args, gpu_id: int, reason: str, wait_s: float, t0: float):
    """A new rank process (``rank.join``): get orders, build the scheduler (no requests to resume)."""
    return _build(RebuildInputs(-1, gpu_id, reason, [], [], None, server_args, port_args, t0, wait_s))


def _build(inputs: RebuildInputs):
    for attempt in range(1, REBUILDS + 1):
        try:
            return _rebuild(inputs)
        except _RebuildFailed as e:
            if attempt == REBUILDS:
                raise e.__cause__ from None
            reason = f"rebuild {attempt} failed: {e}"
            log(f"{reason}; tearing down and asking the controller again")
            _close_channels(RANK.built_channels.pop() if RANK.built_channels else None)
            _teardown_groups()
            inputs = dataclasses.replace(inputs, reason=reason, t0=time.perf_counter(),
                                         channels=inputs.channels if inputs.old_rank == 0 else None)


class _RebuildFailed(Exception):
    pass


# ---- steps 2-4: orders, rebuild, resume ---------------------------------------------------------------
def _rebuild(inputs: RebuildInputs):
    from sglang.srt.managers.scheduler import Scheduler

    t_down = time.perf_counter()
    order, sock = _ask_controller(inputs.old_rank, inputs.reason, inputs.wait_s)  # step 2: orders
    t_order = time.perf_counter()
    try:
        new_args, port_args = _apply_orders(order, inputs)  # step 3: rebuild
        sched = Scheduler(new_args, port_args)
        _restore_timeouts()
        RANK.reuse_channels = None
        t_built = time.perf_counter()
        _resume(order, inputs, sock, {"teardown": t_down - inputs.t0, "wait": t_order - t_down,
                                      "rebuild": t_built - t_order})  # step 4: resume
        return sched
    except Exception as e:
        RANK.reuse_channels = None
        try:
            sock.send(wire.encode(wire.RankFailed(epoch=order.epoch, rank=order.rank, pid=os.getpid(),
                                                  reason=f"{type(e).__name__}: {e}"[:500])))
        except Exception:  # noqa: BLE001
            pass
        raise _RebuildFailed(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]) from e
    finally:
        sock.close(linger=500)


def _apply_orders(order, inputs: RebuildInputs):
    """Make this process ready to construct the new epoch's Scheduler under ``order``: the layout,
    the daemon to attach to, rank 0's channels, SGLang's runtime context. Returns (server args, port args)."""
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context

    from sgl_elastic.layout import ElasticLayout
    from sgl_elastic.rank import daemon_link, state

    layout = ElasticLayout.from_bytes(order.layout)
    state.set_layout(layout)
    state.set_map_epoch(order.epoch)  # the new model's expert maps carry this epoch
    os.environ[state.ENV_VAR] = state.encode(layout)
    if order.omp_bind:
        os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = order.omp_bind
    if order.daemon_dir:  # the daemon to attach to (a replacement when the old one died)
        daemon_link.set_run_dir(order.daemon_dir)
    daemon_link.reset_attachment()
    if inputs.channels is not None and order.rank == 0 and inputs.old_rank == 0:
        RANK.reuse_channels = inputs.channels
    elif inputs.channels is not None:
        _close_channels(inputs.channels)
    _forget_metrics()
    # The new group's rendezvous must not wait for a peer that died before joining (torch's
    # default: 30 min): bounded here, and _restore_timeouts gives the built groups the user's.
    server_args = inputs.server_args
    if not RANK.user_dist_timeout_read:  # this process's first rebuild: its args are still the user's
        RANK.user_dist_timeout = getattr(server_args, "dist_timeout", None)
        RANK.user_dist_timeout_read = True
    over = {}
    if getattr(server_args, "dist_init_addr", None):
        # a rendezvous address given (several nodes: node 0's): the new group meets there, on the
        # fresh port, as one group whatever node each rank is on (SGLang's nnodes sizes the launch only)
        host = str(server_args.dist_init_addr).rpartition(":")[0]
        over = dict(dist_init_addr=f"{host}:{order.dist_port}", nnodes=1, node_rank=0)
    new_args = _new_server_args(server_args, order.tp_size, dist_timeout=int(REBUILD_INIT_TIMEOUT_S), **over)
    port_args = copy.copy(inputs.port_args)
    port_args.nccl_port = order.dist_port
    gpu_id = inputs.gpu_id
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
    if order.rank != 0 and order.tp_size > 1:
        host = str(new_args.dist_init_addr).rpartition(":")[0].strip("[]") if new_args.dist_init_addr else None
        _await_listening(host or getattr(new_args, "host", None) or "127.0.0.1", order.dist_port)
    return new_args, port_args


def _resume(order, inputs: RebuildInputs, sock, phases_s: dict[str, float]) -> None:
    """Enter the new epoch: rank 0 (authoritative: the others re-create what it broadcasts) queues
    the carried requests for its first broadcast; tell the controller this rank is ready."""
    RANK.epoch = order.epoch
    records, took, resub = list(inputs.records), "", 0
    if order.rank == 0 and order.takeover:
        records, resub, dropped = take_over(records, order.takeover)
        took = f"; took over rank 0's intake: {resub} requests re-submitted, {dropped} finished ones dropped"
    resumed = len(records) if order.rank == 0 else 0
    if order.rank == 0:
        RANK.inject = records + list(inputs.pending)
    log(f"epoch {order.epoch}: rank {inputs.old_rank} -> {order.rank} of {order.tp_size};"
        f" teardown {phases_s['teardown']:.3f} s, waited {phases_s['wait']:.3f} s, rebuilt {phases_s['rebuild']:.3f} s;"
        f" {resumed} requests resumed, {len(inputs.pending)} inputs re-sent{took}")
    sock.send(wire.encode(wire.RankReady(
        epoch=order.epoch, rank=order.rank, pid=os.getpid(), resumed=resumed,
        unresumable=list(RANK.unresumable) if order.rank == 0 else [], resubmitted=resub, phases_s=phases_s)))


def _new_server_args(old, tp_size: int, **overrides):
    """A fresh, unresolved ServerArgs equal to ``old`` but for tp_size (and ep_size with it)."""
    from sgl_elastic.controller.supervisor import server_args_at

    return server_args_at(old, tp_size, **overrides)


def _restore_timeouts() -> None:
    """The built groups get the user's ``--dist-timeout`` back (the rebuild ran with a short one)."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _set_pg_timeout

    if not dist.is_initialized():
        return
    secs = RANK.user_dist_timeout
    timeout = timedelta(seconds=secs) if secs else timedelta(minutes=30)  # torch's default when none was given
    for pg in list(dist.distributed_c10d._world.pg_map.keys()):
        try:
            _set_pg_timeout(timeout, pg)
        except Exception as e:  # noqa: BLE001 - a backend without settable timeouts keeps the bounded one
            log(f"cannot restore a process group's timeout: {type(e).__name__}: {e}")


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