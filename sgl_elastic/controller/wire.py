"""Messages between the server's failover controller and its scheduler processes (one ZMQ pair).

The controller binds a ROUTER on an ``ipc://`` path inside its private 0700 run dir; each
scheduler process that survives a peer's death connects a DEALER and says ``RankHello``; the
controller answers ``Reconfigure`` (the rank's new place) or ``Retire`` (leave: the process exits
and the controller falls back); the rank answers ``RankReady`` once its new scheduler serves, or
``RankFailed``. Every message names the recovery ``epoch`` it belongs to: a message of another
epoch is dropped by both sides.

Pure: imports msgspec only (the scheduler side imports it inside SGLang processes).
"""

from __future__ import annotations

import msgspec

__all__ = ["ENV_RUN_DIR", "run_dir", "RankHello", "Reconfigure", "Retire", "RankReady", "RankFailed", "encode", "decode", "ENV_CONTROL",
           "ENV_EXPERT_LOADS", "ENV_KV_BACKUP",
           "ENV_HEARTBEAT", "heartbeat_path", "regroup_path", "audit_paths", "peer_failure"]

ENV_CONTROL = "SGLE_CONTROL"  # the controller's endpoint, inherited by scheduler processes
# A node >= 1's run dir (its agent's): where its ranks keep their heartbeat files, their
# controller being on another node (``controller.nodes``). Unset: beside the ipc control socket.
ENV_RUN_DIR = "SGLE_RUN_DIR"
ENV_HEARTBEAT = "SGLE_HEARTBEAT_S"  # heartbeat period in seconds ("" or absent: no heartbeat)
ENV_KV_BACKUP = "SGLE_KV_BACKUP"  # "1": every rank mirrors its KV into a backup pool (--elastic-kv-backup)
# Expert parallelism with --elastic-eplb: the file EP rank 0 writes its expert load counts to (moe.loads).
ENV_EXPERT_LOADS = "SGLE_EXPERT_LOADS"
# A rebuilding rank's bound on its new group's rendezvous and init collectives (seconds): a peer that
# died before joining makes the rebuild fail within about 1.7x this (torch's TCPStore connect retry).
REBUILD_INIT_TIMEOUT_S = 5.0


def run_dir(control_addr: str) -> str:
    """The directory of the files beside the control socket: its ipc path's, or on a node whose
    controller is on another node (a ``tcp://`` endpoint), the node's own (``ENV_RUN_DIR``)."""
    import os

    if control_addr.startswith("ipc://"):
        return os.path.dirname(control_addr.removeprefix("ipc://"))
    return os.environ.get(ENV_RUN_DIR) or ""


def regroup_path(control_addr: str) -> str:
    """The file the controller creates to ask the serving ranks to regroup (rank 0 takes it)."""
    import os

    return os.path.join(run_dir(control_addr), "regroup")


def audit_paths(control_addr: str) -> tuple[str, str]:
    """(request, reply): the controller writes the request file (a sequence number) to ask rank 0
    which requests it holds; rank 0 answers in the reply file (JSON {"seq": n, "rids": [...]})."""
    import os

    d = run_dir(control_addr)
    return os.path.join(d, "audit-request"), os.path.join(d, "audit-reply")


# How a rank's collective fails when a peer dies or leaves (gloo on CPU; NCCL and its watchdog on GPU):
# a hello with such a reason is a peer's failure, anything else the rank's own error.
_PEER_FAILURE = ("connection reset by peer", "connection closed by peer", "broken pipe", "read error",
                 "write error", "connection refused", "timed out", "timeout", "ncclremoteerror",
                 "remote process exited", "socket closed", "regroup")


def peer_failure(reason: str) -> bool:
    """True when a rank's hello ``reason`` says its collective failed because of a peer (see above)."""
    low = (reason or "").lower()
    return any(k in low for k in _PEER_FAILURE)


def heartbeat_path(control_addr: str, pid: int) -> str:
    """The file a scheduler process touches every heartbeat period (next to the control socket, in
    the controller's 0700 run dir); its mtime is the process's last sign of life."""
    import os

    return os.path.join(run_dir(control_addr), f"heartbeat-{pid}")


class RankHello(msgspec.Struct, tag="hello", frozen=True, kw_only=True):
    """A scheduler process whose collective failed: it is alive, torn down, and waits for orders."""

    epoch: int  # the epoch this process served in
    rank: int  # its TP rank in that epoch
    pid: int
    reason: str  # the error that stopped its event loop (one line)


class Reconfigure(msgspec.Struct, tag="reconfigure", frozen=True, kw_only=True):
    """Become rank ``rank`` of ``tp_size`` in epoch ``epoch`` under ``layout`` (ElasticLayout bytes)."""

    epoch: int
    rank: int
    tp_size: int
    layout: bytes
    dist_port: int  # fresh torch.distributed rendezvous port (the old store died with its group)
    omp_bind: str  # SGLANG_CPU_OMP_THREADS_BIND for the new tp size ("" on GPU)
    # Only to the new rank 0 when the process that served rank 0 is gone: pickled
    # {rid: (output ids the tokenizer manager received, tokenized input or None)} of every request
    # it still waits for (what to re-submit, and where each stream stands). Empty otherwise.
    takeover: bytes = b""
    daemon_dir: str = ""  # the daemon's run dir to attach to (it changes when the old one died and was replaced)
    gpu_slot: int = -1  # a new rank only: its device slot (GPU base_gpu_id + slot * gpu_id_step); -1: keep


class Retire(msgspec.Struct, tag="retire", frozen=True, kw_only=True):
    epoch: int
    reason: str


class RankReady(msgspec.Struct, tag="ready", frozen=True, kw_only=True):
    epoch: int
    rank: int
    pid: int
    resumed: int  # requests this rank put back in its queue (rank 0: re-broadcast to the others)
    phases_s: dict[str, float]  # teardown, wait, rebuild, ... as measured in the process
    unresumable: list[str] = []  # rids it could neither resume nor re-submit: the controller fails them (503)
    resubmitted: int = 0  # new rank 0 after rank 0 died: inputs re-submitted (queued in, or half-broadcast by, the dead one)


class RankFailed(msgspec.Struct, tag="failed", frozen=True, kw_only=True):
    epoch: int
    rank: int
    pid: int
    reason: str


Message = RankHello | Reconfigure | Retire | RankReady | RankFailed
_decoder = msgspec.msgpack.Decoder(Message)
_encoder = msgspec.msgpack.Encoder()


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Message:
    """Raises msgspec.DecodeError / ValidationError for anything that is not one of the messages."""
    return _decoder.decode(data)
