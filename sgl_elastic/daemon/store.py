"""What the daemon holds: per rank its weight segment and KV pool, the layout, the prefix index.

No sockets here (``server.py`` is the control plane); thread-safety is the caller's (the server
holds one lock around every call that reads or swaps segments).

KV pool of rank r: per layer one tensor ``kv.<layer>`` of ``[2, num_slots, kv_heads[r], head_dim]``:
K is ``[0]``, V is ``[1]``, the layout SGLang 0.5.23's ``MHATokenToKVPool._create_buffers_normal``
allocates for the NHD layout (K and V as halves of one allocation per layer; with ``num_slots =
ceil_align(size + page_size, page_size)`` its ``k_buffer[l]`` is ``kv.<l>[0, :size + page_size]``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

from sgl_elastic.daemon.kv_index import PrefixIndex
from sgl_elastic.daemon.kv_migrate import backup_holder, migrate_kv
from sgl_elastic.layout.dtypes import ITEMSIZE as DTYPE_ITEMSIZE
from sgl_elastic.memory import DeviceMemory, Segment, TensorAlloc
from sgl_elastic.daemon.protocol import Handles, KvIndexStats, RankStats, PROTOCOL_VERSION
from sgl_elastic.daemon.weights import load_ranks, weight_allocs
from sgl_elastic.executor.report import ExecReport
from sgl_elastic.executor.safetensors_io import SafetensorsCheckpoint
from sgl_elastic.layout import ElasticLayout
from sgl_elastic.planner.plan import MigrationPlan

__all__ = ["ModelStore", "KvSpec", "kv_allocs", "ModelDropped"]

logger = logging.getLogger("sgl_elastic.daemon")


class ModelDropped(RuntimeError):
    """A migration failed after it had changed the held shards in place: the model was dropped
    (every segment freed, no layout held); LoadModel again."""


class KvSpec:
    """KV pool geometry: ``kv_heads[r]`` heads of ``head_dim`` per slot per layer on rank r."""

    __slots__ = ("num_layers", "head_dim", "num_slots", "dtype", "kv_heads")

    def __init__(self, num_layers: int, head_dim: int, num_slots: int, dtype: str, kv_heads: dict[int, int]) -> None:
        if dtype not in DTYPE_ITEMSIZE:
            raise ValueError(f"KV dtype {dtype!r} not supported; use one of {sorted(DTYPE_ITEMSIZE)}")
        self.num_layers, self.head_dim, self.num_slots, self.dtype, self.kv_heads = (
            num_layers, head_dim, num_slots, dtype, kv_heads)

    def key(self) -> tuple:
        return (self.num_layers, self.head_dim, self.num_slots, self.dtype, tuple(sorted(self.kv_heads.items())))

    def rank_bytes(self, rank: int) -> int:
        return 2 * self.num_layers * self.num_slots * self.kv_heads[rank] * self.head_dim * DTYPE_ITEMSIZE[self.dtype]


def kv_allocs(spec: KvSpec, rank: int) -> list[TensorAlloc]:
    shape = (2, spec.num_slots, spec.kv_heads[rank], spec.head_dim)
    return [TensorAlloc(f"kv.{layer}", spec.dtype, shape) for layer in range(spec.num_layers)]


class ModelStore:
    """Segments of the ranks this daemon holds. ``epoch`` advances with every applied plan."""

    def __init__(self, memory: DeviceMemory, instance: str) -> None:
        self.memory = memory
        self.instance = instance
        self.layout: ElasticLayout | None = None
        self.checkpoint = ""
        self.epoch = 0
        self.weights: dict[int, Segment] = {}
        self.kv: dict[int, Segment] = {}
        self.kv_spare: dict[int, Segment] = {}  # new rank -> its survivor's old KV pool, regrown by alloc_kv
        # rank -> the backup of its KV pool (same shape, written by the rank beside its pool), held on the
        # device of kv_migrate.backup_holder(rank): it outlives the rank, so a failure keeps the KV
        self.kv_backup: dict[int, Segment] = {}
        self.kv_unbacked: set[int] = set()  # indexed slots written before the backups existed (no copy)
        self.kv_carried = False  # the pools and index were carried over by the last migration, not yet asked for
        self.last_kv: tuple[int, float] = (0, 0.0)  # (indexed slots carried over, seconds) of the last migration
        self.params: dict[int, Segment] = {}  # rank -> SGLang's loaded parameters (PublishParams)
        self.params_ready: set[int] = set()  # ranks whose params segment is committed
        self.kv_spec: KvSpec | None = None
        self.index: PrefixIndex | None = None
        self.bytes_read = 0
        self.load_s = 0.0
        self.bandwidths: tuple[float, float, float] | None = None  # measured (reload, copy, new memory) GB/s, for the cost model
        self.pids: dict[int, set[int]] = {}  # rank -> registered worker pids

    # ---- weights ---------------------------------------------------------------------------------
    def load(self, checkpoint: str, layout: ElasticLayout, ranks: list[int] | None,
             cancel: threading.Event | None = None, swap_lock=None) -> None:
        """Fill the weight segments of ``ranks`` from ``checkpoint`` (reads each needed range once).

        Builds everything first and installs at the end (under ``swap_lock``): a failure frees what
        it allocated.
        """
        ranks = sorted(set(range(layout.tp_size) if ranks is None else ranks))
        bad = [r for r in ranks if not 0 <= r < layout.tp_size]
        if bad:
            raise ValueError(f"ranks {bad} outside the layout's tp_size={layout.tp_size}")
        t0 = time.perf_counter()
        with SafetensorsCheckpoint(checkpoint) as ckpt:  # load_ranks frees its segments on failure
            self.memory.check_fits({r: sum(a.nbytes for a in weight_allocs(layout, r, ckpt)) for r in ranks},
                                   "the weight shards")
            built = load_ranks(self.memory, layout, ranks, ckpt, cancel)
            read = ckpt.bytes_read
            if self.bandwidths is None:
                try:
                    self.bandwidths = self.memory.measure_bandwidths(ckpt)
                except Exception as e:  # noqa: BLE001 - only the report's modelled time depends on it
                    logger.warning("could not measure this host's bandwidths (%s: %s); the cost model uses"
                                   " built-in figures", type(e).__name__, e)
                if self.bandwidths is not None:
                    logger.info("bandwidths while both run: reload %.2f GB/s, copy %.2f GB/s; new memory"
                                " %.2f GB/s (cost model)", *self.bandwidths)
        with swap_lock or contextlib.nullcontext():
            self.weights, self.layout, self.checkpoint = built, layout, os.path.abspath(checkpoint)
            self.bytes_read += read
            self.load_s = time.perf_counter() - t0

    def migrate(self, plan: MigrationPlan, swap_lock=None, freed: list | None = None, *,
                ranks: list[int] | None = None, remote: dict | None = None, endpoint=None,
                release: bool = True) -> ExecReport:
        """Apply ``plan`` through the executor; returns its report.

        The failed ranks' segments are never read (their memory is lost with the device): the plan
        copies from survivors and reloads the rest from the checkpoint. New segments are built off
        the lock and swapped in under ``swap_lock``. The failed ranks' segments are freed first; on
        failure nothing else changed, except when the CPU executor had started moving a survivor's
        bytes in place (``executor.cpu``): then the model is dropped (``ModelDropped``). The KV pools
        and the prefix index follow the new layout when every KV head has a live source
        (``_carry_kv``), else they are dropped (the requests are prefilled again). ``freed``: the old
        segments are appended there for the caller to close (after it has answered: unmapping
        gigabytes takes ~0.1 s) instead of closed here.

        Several nodes: ``ranks`` are the new ranks this daemon builds, ``remote`` the old ranks peer
        daemons hold (``RemoteArena``, read through ``endpoint``); the KV pools of this daemon's new ranks
        are carried over from this daemon's own pools and backups (the index is node 0's copy), and ``release=False`` leaves the old views' pages
        for the peers that may still read them (``release_unused`` once they are done).
        """
        from sgl_elastic.daemon.migrate import check_plan, run_plan
        from sgl_elastic.executor.cpu import InPlaceFailed

        if self.layout is None:
            raise ValueError("no model held; LoadModel first")
        check_plan(plan, self.layout, set(self.weights), set(remote) if ranks is not None else None)
        failed = set(plan.change.failed)
        # Step 0: the failed ranks' memory is lost with their devices and nothing reads it: free it
        # first, so that the pages this migration allocates are the ones just freed (on this VM pages
        # that were in use moments ago cost 0.46 s per 700 MB to allocate again, pages not touched
        # for a while 0.6-2.1 s: bench/page_reuse.py)
        with swap_lock or contextlib.nullcontext():
            lost = [table.pop(r) for table in (self.weights, self.kv, self.params) for r in sorted(failed)
                    if r in table]
            # the backups held on a failed device (those of the ranks before them) go with it
            lost += [self.kv_backup.pop(r) for r in sorted(self.kv_backup)
                     if backup_holder(r, self.layout.tp_size) in failed]
            self.params_ready -= failed
        for seg in lost:
            seg.close()
        survivors = {r: s for r, s in self.weights.items() if r not in failed}
        # Step 1: build the new shards (survivors untouched).
        try:
            with SafetensorsCheckpoint(self.checkpoint) as ckpt:
                nodes = {} if ranks is None else dict(ranks=ranks, remote=remote or {}, endpoint=endpoint,
                                                      release=release)
                new, report = run_plan(self.memory, plan, survivors, ckpt,
                                       label=f"d{self.instance}-weights-e{self.epoch + 1}", bandwidths=self.bandwidths,
                                       **nodes)
        except InPlaceFailed as e:
            if not e.corrupted:
                raise
            with swap_lock or contextlib.nullcontext():
                dropped = [*self.weights.values(), *self.kv.values(), *self.params.values(), *self.kv_spare.values(),
                           *self.kv_backup.values()]
                self.kv_spare, self.kv_backup, self.kv_carried, self.kv_unbacked = {}, {}, False, set()
                self.weights, self.kv, self.kv_spec, self.index = {}, {}, None, None
                self.params, self.params_ready, self.layout, self.pids = {}, set(), None, {}
            for seg in dropped:
                seg.close()
            raise ModelDropped(f"{e}; the shards of old ranks {e.ranks} had been partly moved in place, so the"
                               " model was dropped (no layout held): LoadModel again") from e
        # Step 2: swap in the new layout; the KV pools and the prefix index are carried over when every KV
        # head has a live source (kv_migrate), else dropped (the requests are re-prefilled).
        carried = self._carry_kv(plan, swap_lock, ranks)
        with swap_lock or contextlib.nullcontext():
            old, self.weights = self.weights, new
            if carried is not None:
                old_kv = {s: seg for s, seg in self.kv.items() if s not in carried[2]}
                self.kv, self.kv_spec = carried[0], carried[1]
                self.kv_carried = True
            else:
                old_kv, self.kv, self.kv_spec, self.index = self.kv, {}, None, None
            old_backups, self.kv_backup = self.kv_backup, {}  # new ones come with the next AllocKv
            # KV dropped: a survivor's old pool is regrown as its new rank's by the next AllocKv (its
            # pages are resident: only the extension needs new ones); its contents are stale, never
            # read (SGLang writes a slot before it reads it, and the prefix index starts empty)
            old_spare, self.kv_spare = self.kv_spare, {}
            for s, seg in list(old_kv.items()):
                if carried is None and plan.old2new_rank[s] >= 0 and (ranks is None or plan.old2new_rank[s] in ranks):
                    self.kv_spare[plan.old2new_rank[s]] = old_kv.pop(s)
            old_params, self.params, self.params_ready = self.params, {}, set()
            self.layout = plan.new_layout
            self.epoch += 1
            self.bytes_read += report.file_bytes_read
            self.pids = {}
        # Step 3: free the old shards and KV (other processes' mappings stay valid until unmapped).
        olds = [*old.values(), *old_kv.values(), *old_params.values(), *old_spare.values(), *old_backups.values()]
        if freed is not None:
            freed.extend(olds)
        else:
            for seg in olds:
                seg.close()
        return report

    def _carry_kv(self, plan: MigrationPlan, swap_lock=None, ranks=None) -> tuple[dict, KvSpec, set[int]] | None:
        """(new pools, their spec, old ranks whose pools became new ones) when the KV pools and the
        prefix index can follow ``plan`` (``kv_migrate``: every KV head of the new layout has a live
        source), else None (the caller drops them). After a failure, the indexed slots written before
        the backups existed are forgotten first (the dead rank's heads of them are nowhere).
        Several nodes (``ranks``: this daemon's new ranks): only those, from this daemon's pools and
        backups; the controller keeps the nodes' choices the same (``controller.nodes.sync_kv``)."""
        self.last_kv = (0, 0.0)
        spec = self.kv_spec
        if not self.kv or spec is None or self.index is None:
            return None
        t0 = time.perf_counter()
        with swap_lock or contextlib.nullcontext():
            if plan.change.failed and self.kv_unbacked:
                self.index.forget(sorted(self.kv_unbacked & self.index.held_slots()))
            self.kv_unbacked = set()
        old_attn, new_attn = plan.old_layout.family("attn"), plan.new_layout.family("attn")
        new_spec = KvSpec(spec.num_layers, spec.head_dim, spec.num_slots, spec.dtype,
                          {d: new_attn.rank_kv_heads(d) for d in range(plan.new_layout.tp_size)})
        try:
            got = migrate_kv(self.memory, spec, new_spec, old_attn, new_attn, plan.old2new_rank, dict(self.kv),
                             dict(self.kv_backup), kv_allocs, self.index.held_slots(),
                             only=None if ranks is None else set(ranks))
        except Exception as e:  # noqa: BLE001 - the KV is dropped, as when it cannot be carried
            logger.warning("KV pools not carried over (%s: %s); the requests will be prefilled again",
                           type(e).__name__, e)
            return None
        if got is None:
            logger.info("KV pools not carried over: a KV head has no live source (no backup)")
            return None
        for seg in got[0].values():
            seg.reserve_async()  # the rest of each pool's pages in the background, as alloc_kv does
        self.last_kv = (self.index.cached_slots, time.perf_counter() - t0)
        logger.info("KV pools carried over: %d indexed slots kept, %.3f s", *self.last_kv)
        return got[0], new_spec, got[1]

    # ---- published parameters (SGLang's own tensors after loading) --------------------------------
    def publish_params(self, rank: int, specs: list[TensorAlloc]) -> Handles:
        """A fresh (uncommitted) parameter segment for ``rank``; the worker fills it and commits."""
        if self.layout is None or rank not in self.weights:
            raise KeyError(f"rank {rank} has no weights in this daemon; it holds ranks {sorted(self.weights)}")
        if rank in self.params_ready:
            raise ValueError(f"rank {rank}'s parameters are already published (epoch {self.epoch}); attach them"
                             " with ExportParams instead")
        if not specs:
            raise ValueError("PublishParams with no tensors")
        old = self.params.pop(rank, None)
        if old is not None:
            old.close()
        self.memory.check_fits({rank: sum(s.nbytes for s in specs)}, "the published parameters")
        self.params[rank] = self.memory.allocate(rank, "params", specs)
        return self.handles("params", rank)

    def commit_params(self, rank: int) -> None:
        if rank not in self.params:
            raise KeyError(f"rank {rank} has no parameter segment to commit; send PublishParams first")
        self.params_ready.add(rank)


    # ---- KV ------------------------------------------------------------------------------------
    def alloc_kv(self, spec: KvSpec, budget_slots: int, page_size: int, backup: bool = False) -> bool:
        """One KV pool per held rank (or per rank of ``spec.kv_heads`` when no model is held).

        Idempotent: asking again for the same geometry (a restarted worker) keeps the pools and the
        index and returns False; a different geometry is refused, except for pools a migration carried
        over that nobody asked for yet (they are dropped and allocated anew). True when allocated now.
        ``backup``: every rank also gets a backup pool (``kv_backup``; at tp >= 2).
        """
        if self.kv:
            assert self.kv_spec is not None and self.index is not None
            same = (self.kv_spec.key() == spec.key() and self.index.page_size == page_size
                    and self.index.budget_slots == (budget_slots or spec.num_slots))
            if same:
                self.kv_carried = False
                self._ensure_backups(backup)
                return False
            if self.kv_carried:
                logger.info("the KV pools carried over have another geometry than asked for: allocated anew")
                self.drop_kv()
        if self.kv:
            raise ValueError(
                f"a KV pool of another geometry is allocated (layers={self.kv_spec.num_layers},"
                f" head_dim={self.kv_spec.head_dim}, slots={self.kv_spec.num_slots}, dtype={self.kv_spec.dtype},"
                f" heads={self.kv_spec.kv_heads}, page_size={self.index.page_size}); it lives until the layout"
                " changes or the daemon stops: ask for the same geometry to attach it")
        ranks = sorted(self.weights) if self.weights else sorted(spec.kv_heads)
        missing = [r for r in ranks if r not in spec.kv_heads]
        if missing:
            raise ValueError(f"kv_heads gives no head count for ranks {missing}")
        self.memory.check_fits({r: spec.rank_bytes(r) for r in ranks}, "the KV pools")
        index = PrefixIndex(spec.num_slots, budget_slots or None, page_size)
        built: dict[int, Segment] = {}
        spare, self.kv_spare = self.kv_spare, {}
        try:
            for r in ranks:
                old = spare.pop(r, None)
                seg = self.memory.regrow(old, r, kv_allocs(spec, r)) if old is not None else None
                if seg is None and old is not None:
                    old.close()
                built[r] = seg or self.memory.allocate(r, "kv", kv_allocs(spec, r))
        except BaseException:
            for s in [*built.values(), *spare.values()]:
                s.close()
            raise
        for s in spare.values():
            s.close()
        self.kv, self.kv_spec, self.index = built, spec, index
        self.kv_carried, self.kv_unbacked = False, set()
        for seg in built.values():
            seg.reserve_async()
        self._ensure_backups(backup)
        return True

    def _ensure_backups(self, backup: bool) -> None:
        """With ``backup`` and >= 2 pools: a backup pool for every pool that has none. Sparse: its pages
        come as the rank writes KV (a backup costs memory for the tokens written, not the whole pool).
        The slots the index holds now were written without a copy there."""
        if not backup or len(self.kv) < 2 or self.kv_spec is None or self.index is None:
            return
        todo = [r for r in sorted(self.kv) if r not in self.kv_backup]
        if not todo:
            return
        self.memory.check_fits({r: self.kv_spec.rank_bytes(r) for r in todo}, "the KV backups")
        for r in todo:
            self.kv_backup[r] = self.memory.allocate(r, "kvbak", kv_allocs(self.kv_spec, r))
        self.kv_unbacked |= self.index.held_slots()

    def drop_kv(self) -> None:
        for seg in [*self.kv.values(), *self.kv_backup.values()]:
            seg.close()
        self.kv, self.kv_spec, self.index, self.kv_backup = {}, None, None, {}
        self.kv_carried, self.kv_unbacked = False, set()

    # ---- export / stats -------------------------------------------------------------------------
    def handles(self, kind: str, rank: int) -> Handles:
        table = {"weights": self.weights, "kv": self.kv, "kvbak": self.kv_backup, "params": self.params}[kind]
        seg = table.get(rank)
        if seg is None:
            what = {"weights": "weights", "kv": "a KV pool (AllocKv first)",
                    "kvbak": "a KV backup (AllocKv with backup, at tp >= 2)",
                    "params": "published parameters (PublishParams first)"}[kind]
            raise KeyError(f"rank {rank} has no {what} in this daemon; it holds ranks {sorted(table)}")
        return Handles(version=PROTOCOL_VERSION, instance=self.instance, rank=rank, kind=kind, epoch=self.epoch,
                       segments=seg.refs(), tensors=seg.handles())

    def rank_stats(self) -> list[RankStats]:
        ranks = sorted(set(self.weights) | set(self.kv) | set(self.pids))
        return [RankStats(rank=r, weight_bytes=self.weights[r].nbytes if r in self.weights else 0,
                          kv_bytes=self.kv[r].nbytes if r in self.kv else 0, pids=sorted(self.pids.get(r, ())))
                for r in ranks]

    def kv_stats(self) -> KvIndexStats:
        ix = self.index
        if ix is None:
            return KvIndexStats()
        return KvIndexStats(num_slots=ix.num_slots, budget_slots=ix.budget_slots, page_size=ix.page_size,
                            cached_slots=ix.cached_slots, pinned_slots=ix.pinned_slots, num_nodes=ix.num_nodes,
                            num_pins=ix.num_pins, hit_tokens=ix.hit_tokens, lookup_tokens=ix.lookup_tokens,
                            evicted_slots=ix.evicted_total)

    def close(self) -> None:
        """Free every segment (unlink on CPU)."""
        self.drop_kv()
        for seg in self.kv_spare.values():
            seg.close()
        self.kv_spare = {}
        for seg in [*self.weights.values(), *self.params.values()]:
            seg.close()
        self.weights, self.params, self.params_ready = {}, {}, set()
