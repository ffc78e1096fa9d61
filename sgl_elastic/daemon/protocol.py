"""Control-plane messages of the state daemon: a versioned, tagged union of msgspec Structs.

Wire format: one ZMQ frame of msgpack per message. Every message is a map with a ``type`` tag
(the class name), a ``version`` (``PROTOCOL_VERSION``) and, for requests, the instance ``token``.
Decoding is two-phase (``decode_request``): first the envelope (type, version, token), so a
client of another version or without the token gets a precise ``Error`` before any field of the
body is looked at; then the full typed body, whose constraints (``Meta``) reject out-of-range
values. A request that fails either phase is answered with ``Error``; the daemon keeps serving.

Units: ``*_bytes`` are bytes, ``*_slots`` are KV slots (one token's K and V in every layer of a
rank), ``rank`` is a TP rank of the current layout, ``epoch`` counts layout changes (0 at load).
"""

from __future__ import annotations

from typing import Annotated, Union

import msgspec
from msgspec import Meta

from sgl_elastic.memory.handles import SegmentRef, TensorHandle

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_MESSAGE_BYTES",
    "ErrorCode",
    "Request",
    "Reply",
    "Stats",
    "LoadModel",
    "RegisterRank",
    "ExportWeights",
    "AllocKv",
    "ExportKv",
    "KvMatch",
    "KvInsert",
    "KvDump",
    "KvRelease",
    "EvictKv",
    "ApplyMigration",
    "Shutdown",
    "ParamSpec",
    "PublishParams",
    "ExportParams",
    "CommitParams",
    "KvForget",
    "KvClear",
    "ExportRemote",
    "ReleaseOld",
    "RemoteReply",
    "encode_remote",
    "decode_remote",
    "Ok",
    "Error",
    "StatsReply",
    "RankStats",
    "KvIndexStats",
    "Registered",
    "SegmentRef",
    "TensorHandle",
    "Handles",
    "KvMatchReply",
    "KvInsertReply",
    "KvEntry",
    "KvDumpReply",
    "EvictReply",
    "MigrationSummary",
    "RequestDecodeError",
    "decode_request",
    "encode",
    "decode_reply",
]

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 << 20  # larger frames are dropped by ZMQ (ZMQ_MAXMSGSIZE): garbage cannot eat memory

NonNeg = Annotated[int, Meta(ge=0)]
Rank = Annotated[int, Meta(ge=0, le=4095)]
TokenId = Annotated[int, Meta(ge=0, lt=1 << 31)]
Slot = Annotated[int, Meta(ge=0, lt=1 << 40)]
Dims = Annotated[int, Meta(ge=1, le=1 << 20)]
Name = Annotated[str, Meta(max_length=4096)]


class ErrorCode:
    """Values of ``Error.code`` (strings, so a reader of a log needs no table)."""

    MALFORMED = "malformed"  # not msgpack, or not a map with type/version/token
    BAD_VERSION = "bad_version"
    UNAUTHORIZED = "unauthorized"
    UNKNOWN_TYPE = "unknown_type"
    INVALID = "invalid"  # fields of the wrong type or out of range
    STATE = "state"  # not allowed in the daemon's current state (e.g. export while loading)
    NOT_FOUND = "not_found"  # no such rank / pin / segment
    BUDGET = "budget"  # KV budget cannot be met without evicting pinned KV
    INTERNAL = "internal"


class _Msg(msgspec.Struct, tag=True, kw_only=True, forbid_unknown_fields=True):
    version: int


class _Req(_Msg):
    token: Annotated[str, Meta(max_length=256)]


# ---- requests --------------------------------------------------------------------------------
class Stats(_Req):
    """Query state, bytes held and read, KV index figures, attached clients."""


class LoadModel(_Req):
    """Fill the weight shards of ``ranks`` (default: every rank of ``layout``) from ``checkpoint``.

    ``layout``: ``ElasticLayout.to_bytes()``. Runs in the background (state LOADING, then READY);
    reads only the byte ranges each rank needs, once. Allowed when no model is held.
    """

    checkpoint: Name
    layout: bytes
    ranks: list[Rank] | None = None


class RegisterRank(_Req):
    """A worker process ``pid`` serves ``rank``; its pins are released when it dies."""

    rank: Rank
    pid: Annotated[int, Meta(ge=1)]


class ExportWeights(_Req):
    """Handles of ``rank``'s weight shards (map them with ``memory.attach_handles``)."""

    rank: Rank


class AllocKv(_Req):
    """Allocate a KV pool per held rank: per layer ``kv.<layer>`` of ``[2, num_slots, kv_heads, head_dim]``
    (K = ``[0]``, V = ``[1]``; SGLang's fused per-layer NHD buffer).

    ``kv_heads``: per rank (``[tp]``); empty: from the held layout's attention family.
    ``budget_slots``: cached (unpinned + pinned) slots the prefix index may hold; 0: ``num_slots``.
    ``page_size``: tokens per index entry (prefixes are cached in whole pages).
    ``backup``: at tp >= 2 every rank also gets a backup pool of the same shape that it writes beside
    its own and that outlives it (held on the next rank's device), so a migration after its failure
    keeps the KV (``ExportKv(backup=True)`` maps it).
    Idempotent for the same geometry (a restarted worker gets the existing pools and index).
    """

    num_layers: Dims
    head_dim: Dims
    num_slots: Annotated[int, Meta(ge=1, le=1 << 32)]
    dtype: Annotated[str, Meta(max_length=32)]
    kv_heads: list[Annotated[int, Meta(ge=1, le=1 << 16)]] = []
    budget_slots: NonNeg = 0
    page_size: Annotated[int, Meta(ge=1, le=4096)] = 1
    backup: bool = False


class ExportKv(_Req):
    """Handles of ``rank``'s KV pool (``backup``: of its backup pool)."""

    rank: Rank
    backup: bool = False


Namespace = Annotated[str, Meta(max_length=256)]


class KvMatch(_Req):
    """Longest cached prefix of ``token_ids`` (whole pages). ``pin``: hold it until ``KvRelease``.
    ``namespace``: prefixes of different namespaces never match (SGLang's ``extra_key``)."""

    token_ids: list[TokenId]
    pin: bool = False
    owner_pid: NonNeg = 0
    namespace: Namespace = ""


class KvInsert(_Req):
    """Cache ``slots[i]`` as the KV of ``token_ids[i]`` (a trailing partial page is not cached).

    Slots of pages already cached come back as ``duplicate_slots`` (the caller frees them).
    ``pin``: the inserted path is pinned (KV of a running request).
    """

    token_ids: list[TokenId]
    slots: list[Slot]
    pin: bool = False
    owner_pid: NonNeg = 0
    namespace: Namespace = ""


class KvDump(_Req):
    """Every cached prefix (to rebuild a replacement process's own prefix tree)."""


class KvRelease(_Req):
    pin_id: Annotated[int, Meta(ge=1)]


class EvictKv(_Req):
    """Evict at least ``num_slots`` cold (LRU, unpinned) slots; 0: evict down to the budget."""

    num_slots: NonNeg = 0


class ApplyMigration(_Req):
    """Run a ``MigrationPlan`` (``plan.to_bytes()``) on the held shards; the layout's epoch advances.

    Several nodes (one daemon each): ``ranks`` are the new ranks this daemon builds; ``remote`` the
    old ranks peer daemons hold, ``encode_remote({rank: RemoteArena})`` (from their ``ExportRemote``),
    read over the transfer engine; ``hold_old``: keep the old views (peers read them) until
    ``ReleaseOld``. Without ``ranks``: every rank, every survivor held here (one node).
    """

    plan: bytes
    ranks: list[Rank] | None = None
    remote: Annotated[bytes, Meta(max_length=16 << 20)] = b""
    hold_old: bool = False


class ExportRemote(_Req):
    """This daemon's weight views for peer daemons of other nodes: its transfer endpoint opens (on
    the node address it was started with) and registers them; reply ``RemoteReply``."""


class ReleaseOld(_Req):
    """Free the old views an ``ApplyMigration`` with ``hold_old`` kept (every peer has read them)."""


class Shutdown(_Req):
    """Answer Ok, then free everything and exit."""


class ParamSpec(msgspec.Struct, frozen=True, array_like=True):
    """One tensor of a rank's model state: SGLang parameter name, torch dtype name, shape."""

    name: Name
    dtype: Annotated[str, Meta(max_length=32)]
    shape: list[Annotated[int, Meta(ge=0, le=1 << 40)]]


class PublishParams(_Req):
    """Allocate ``rank``'s model-state segment (SGLang's own parameters after loading: fused qkv,
    gate_up, w13 ...); the worker copies its loaded parameters in and sends ``CommitParams``.
    Replaces an uncommitted segment of the same rank; refused when one is committed."""

    rank: Rank
    tensors: list[ParamSpec]


class ExportParams(_Req):
    """Handles of ``rank``'s committed model-state segment (``not_found`` when there is none):
    a replacement worker binds its parameters to them, with no checkpoint read and no copy."""

    rank: Rank


class CommitParams(_Req):
    """The worker finished copying into ``rank``'s model-state segment; it may now be exported."""

    rank: Rank


class KvForget(_Req):
    """The server freed these KV slots (its prefix cache evicted them): drop every cached prefix
    that uses one, with what follows it, before the slots can hold other tokens' KV."""

    slots: list[Slot]
    namespace: Namespace = ""


class KvClear(_Req):
    """Drop every cached prefix (the server flushed its prefix cache)."""


Request = Union[Stats, LoadModel, RegisterRank, ExportWeights, AllocKv, ExportKv, KvMatch, KvInsert, KvDump,
                KvRelease, EvictKv, ApplyMigration, Shutdown, PublishParams, ExportParams, CommitParams, KvForget,
                KvClear, ExportRemote, ReleaseOld]
REQUEST_TYPES: dict[str, type] = {t.__name__: t for t in Request.__args__}  # type: ignore[attr-defined]


# ---- replies ---------------------------------------------------------------------------------
class Ok(_Msg):
    detail: str = ""


class Error(_Msg):
    """``code``: one of ``ErrorCode``; ``reason``: what was wrong and how to fix it."""

    code: str
    reason: str


class Handles(_Msg):
    """``kind`` "weights" or "kv" of ``rank`` at layout ``epoch`` of daemon ``instance``; stale after
    an epoch change, and never valid for another instance (a restarted daemon has a new one)."""

    instance: str
    rank: int
    kind: str
    epoch: int
    segments: list[SegmentRef]
    tensors: list[TensorHandle]


class KvIndexStats(msgspec.Struct, kw_only=True):
    num_slots: int = 0
    budget_slots: int = 0
    page_size: int = 1
    cached_slots: int = 0
    pinned_slots: int = 0
    num_nodes: int = 0
    num_pins: int = 0
    hit_tokens: int = 0
    lookup_tokens: int = 0
    evicted_slots: int = 0


class RankStats(msgspec.Struct, kw_only=True):
    rank: int
    weight_bytes: int
    kv_bytes: int
    pids: list[int]


class MigrationSummary(msgspec.Struct, kw_only=True):
    """What the executor did: epoch after the change, payload bytes by kind, seconds."""

    epoch: int
    keep_bytes: int
    peer_bytes: int
    reload_bytes: int
    file_bytes_read: int
    achieved_s: float
    alloc_s: float = 0.0  # destination buffers (allocated and pre-faulted before any copy)
    reload_s: float = 0.0  # wall time of the host-reload workers
    copy_s: float = 0.0  # wall time of the keep / peer copy workers (overlapping the reloads)
    predicted_s: float = 0.0  # the executor's cost model for this plan (achieved / modelled in reports)
    move_s: float = 0.0  # in-place moves of the kept bytes (CPU; beside the reloads)
    in_place_ranks: int = 0  # new ranks whose segment is a survivor's, regrown or remapped in place (CPU)
    alloc_bytes: int = 0  # new memory the migration took (in place: only the extensions)
    remapped_bytes: int = 0  # kept bytes that stayed in their pages (CPU remap: none of them copied)
    remapped_ranks: int = 0  # of in_place_ranks, those remapped rather than regrown
    released_bytes: int = 0  # pages of the old layout given back after the migration
    remote_bytes: int = 0  # bytes read from peer daemons of other nodes (multi-node)
    rerouted_bytes: int = 0  # bytes whose read from a peer failed, reloaded from this node's checkpoint
    remote_s: float = 0.0  # wall time of those reads
    kv_kept_slots: int = 0  # indexed KV slots carried over to the new layout (0: KV dropped)
    kv_s: float = 0.0  # seconds carrying the KV pools over


class StatsReply(_Msg):
    """Daemon figures. ``checkpoint_bytes_read``: payload bytes ever read from the checkpoint
    (loads and migration reloads); ``rss_anon_bytes``: the daemon's private memory (its overhead:
    shard bytes are shared memory, not in it)."""

    state: str
    pid: int
    instance: str
    backend: str
    epoch: int
    uptime_s: float
    checkpoint: str
    checkpoint_bytes_read: int
    load_s: float
    last_error: str
    ranks: list[RankStats]
    kv: KvIndexStats
    requests: int
    errors: dict[str, int]
    rss_anon_bytes: int
    rss_shmem_bytes: int
    last_migration: MigrationSummary | None = None


class Registered(_Msg):
    """``layout``: ``ElasticLayout.to_bytes()`` of the held model (empty when none is held)."""

    instance: str
    rank: int
    epoch: int
    has_weights: bool
    has_kv: bool
    layout: bytes = b""


class KvMatchReply(_Msg):
    num_tokens: int
    slots: list[int]
    pin_id: int = 0


class KvInsertReply(_Msg):
    num_new_tokens: int
    duplicate_slots: list[int]
    evicted_slots: list[int]
    pin_id: int = 0


class KvEntry(msgspec.Struct, frozen=True, array_like=True):
    """A cached prefix ending at a leaf of the index: ``slots[i]`` holds the KV of ``token_ids[i]``."""

    namespace: str
    token_ids: list[int]
    slots: list[int]


class KvDumpReply(_Msg):
    page_size: int
    entries: list[KvEntry]


class EvictReply(_Msg):
    freed_slots: list[int]


class RemoteReply(_Msg):
    """``addr``: this daemon's transfer endpoint (host:port); ``arenas``: ``encode_remote`` of its
    ranks' ``RemoteArena`` (epoch ``epoch``)."""

    addr: str
    epoch: int
    arenas: bytes


def encode_remote(arenas: dict) -> bytes:
    """``{old rank: executor.remote.RemoteArena}`` as msgpack (``ApplyMigration.remote``)."""
    return msgspec.msgpack.encode(arenas)


def decode_remote(data: bytes) -> dict:
    from sgl_elastic.executor.remote import RemoteArena

    return msgspec.msgpack.decode(data, type=dict[int, RemoteArena]) if data else {}


Reply = Union[Ok, Error, StatsReply, Registered, Handles, KvMatchReply, KvInsertReply, KvDumpReply, EvictReply,
              RemoteReply]


# ---- coding ---------------------------------------------------------------------------------
class _Envelope(msgspec.Struct):
    """Phase 1 of decoding: only what decides whether to look further (unknown fields ignored)."""

    type: str
    version: int
    token: str = ""


_ENCODER = msgspec.msgpack.Encoder()
_ENVELOPE = msgspec.msgpack.Decoder(_Envelope)
_REQUEST = msgspec.msgpack.Decoder(Request)
_REPLY = msgspec.msgpack.Decoder(Reply)


class RequestDecodeError(Exception):
    """Raised by ``decode_request``; ``error`` is the ``Error`` reply to send back."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.error = Error(version=PROTOCOL_VERSION, code=code, reason=reason)


def encode(msg: msgspec.Struct) -> bytes:
    return _ENCODER.encode(msg)


def decode_request(data: bytes, token_ok) -> Request:
    """Decode and authenticate one request frame.

    ``token_ok(token) -> bool`` checks the instance token (constant-time). Order: envelope, token,
    version, type, body: a client without the token learns nothing but "unauthorized".
    """
    # Step 1: envelope.
    try:
        env = _ENVELOPE.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise RequestDecodeError(
            ErrorCode.MALFORMED,
            f"expected one msgpack map with 'type', 'version' and 'token' (sgl_elastic.daemon.protocol); {e}",
        ) from None
    # Step 2: token before anything else.
    if not token_ok(env.token):
        raise RequestDecodeError(
            ErrorCode.UNAUTHORIZED,
            "missing or wrong instance token; read it from the daemon's 0600 token file (DaemonClient.from_run_dir)",
        )
    # Step 3: version and type.
    if env.version != PROTOCOL_VERSION:
        raise RequestDecodeError(
            ErrorCode.BAD_VERSION,
            f"message version {env.version} but this daemon speaks version {PROTOCOL_VERSION};"
            " use the sgl_elastic of the same release as the daemon",
        )
    if env.type not in REQUEST_TYPES:
        raise RequestDecodeError(
            ErrorCode.UNKNOWN_TYPE, f"unknown request type {env.type[:64]!r}; known: {', '.join(REQUEST_TYPES)}"
        )
    # Step 4: the typed body.
    try:
        return _REQUEST.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise RequestDecodeError(ErrorCode.INVALID, f"{env.type}: {e}") from None


def decode_reply(data: bytes) -> Reply:
    return _REPLY.decode(data)
