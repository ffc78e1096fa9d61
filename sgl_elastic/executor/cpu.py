"""CPU executor: runs a MigrationPlan on shared-memory shards (one ``ShmArena`` per rank).

Step 1 allocates every destination arena (pages pre-faulted) before any copy. Step 2 runs the host
reloads (``preadv`` of the needed byte ranges straight into the destination) on reload workers and
the keep/peer copies (numpy copies between shared-memory arenas, GIL released) on copy workers,
concurrently, each queue longest-first. Step 3 runs the stage-1 fan-out copies, which read data the
reloads just wrote. The old arenas may live in other processes (attached by handle).

In place (``in_place=True``, the daemon's default): a new rank whose kept bytes all come from one
surviving old rank whose arena this process created, and all move towards higher offsets (a rank
that gains units after a failure: every tensor at least as wide, so every offset at least as far),
is not allocated anew. Its arena's file is extended to the new size, and only the extension gets
new pages: the lost rank's share instead of the whole model (on this VM page allocation, not
copying, is what a migration costs), reserved by ``posix_fallocate`` in the background beside the
moves (it never writes data). Its kept bytes are moved inside the file in decreasing address
order (a move never overwrites a source not yet moved; a contiguous block whose source and
destination overlap is one ``memmove``, a strided one goes through a small staging buffer) by a
mover thread per regrown rank (up to the cores: 0.59 s instead of 0.69 s for the bench model's
3 -> 2, medians of 7 interleaved runs), while the reloads and peer copies write the rest: each
waits until the moves have passed the first byte it writes (``_Gate``; the moves go top-down, so
the ops high in the file start first). Peer copies out of such an arena are staged before the
moves. The cost: the old layout is gone once the moves start, so a failure after that leaves the arena neither old nor new
(``InPlaceFailed``, ``corrupted`` set); before it, the file is given back as it was.

Remapped (preferred over the moves where the arenas are page-aligned, ``ShmArena.place``): the kept
bytes do not move at all. The new arena is the same file under a new view (``ShmArena.remap``):
every kept run that is whole pages (a block of rows, a whole tensor or expert) is mapped at its
new offset from the pages it already lies in; everything else of the view (the units gained, and
the kept columns of a column-sharded tensor, whose row stride changes) gets new pages at the end of
the file and is written there by the reloads and copies (those kept columns by a copy out of the
old view). The old view is never written, so a failure at any point leaves it intact (the file is
truncated back); after the last copy the pages only the old view used are punched out.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable

import numpy as np

from sgl_elastic.executor.ops import full_region, shard_view, split_queues
from sgl_elastic.executor.report import ExecReport
from sgl_elastic.executor.safetensors_io import SafetensorsCheckpoint, copy_bits
from sgl_elastic.layout.geometry import rank_tensors, stored_transposed
from sgl_elastic.executor.shm import PAGE, ShardSpec, ShmArena, fallocate_range
from sgl_elastic.planner.cost import predict_time
from sgl_elastic.planner.plan import KEEP, RELOAD, CopyOp, MigrationPlan
from sgl_elastic.planner.topology import Topology

__all__ = ["CpuExecutor", "allocate_rank_arenas", "load_rank_from_checkpoint", "InPlaceFailed"]


_PREFAULT_CHUNK = 256 << 20
# A remapped arena is one mmap per run in every process that maps it (the kernel's default limit is
# 65530 per process): past this many, the next migration gives the rank a new arena (one run) instead.
MAX_RUNS = 4096
_STAGE_BYTES = 32 << 20


class InPlaceFailed(RuntimeError):
    """An in-place migration failed; ``corrupted``: it had started moving bytes, so the old arenas
    of ``ranks`` (old ranks) hold neither layout (the caller must reload them)."""

    def __init__(self, msg: str, corrupted: bool, ranks: list[int]) -> None:
        super().__init__(msg)
        self.corrupted, self.ranks = corrupted, ranks


def _prefault_range(arena: ShmArena, start: int, end: int) -> None:
    """Allocate and map the pages of ``[start, end)`` of ``arena`` (a worker thread: both calls
    release the GIL). ``posix_fallocate`` gives tmpfs its pages without a fault each; the strided
    write then maps them."""
    fallocate_range(getattr(arena._shm, "_fd", -1), start, end, chunk=max(1, end - start))  # type: ignore[attr-defined]
    np.frombuffer(arena._shm.buf, dtype=np.uint8)[start:end:4096] = 0  # type: ignore[attr-defined]


def _reserve(ranges: list[tuple[ShmArena, int, int]]) -> threading.Thread:
    """A started thread giving the byte ``ranges`` their pages (``posix_fallocate``, 64 MiB at a
    time): unlike ``_prefault`` it writes nothing, so it may run while the moves and reloads write
    there (a page they touch first is simply allocated by their fault instead)."""
    def work() -> None:
        for a, start, end in ranges:
            fallocate_range(a.fd, start, end)

    t = threading.Thread(target=work, name="sgle-reserve-ext", daemon=True)
    t.start()
    return t


def _prefault(arenas: list[ShmArena]) -> None:
    """Fault every page of ``arenas`` in now, in parallel chunks over the cores, so the copies
    measure copying, not page allocation (one thread faulting 2 GB of tmpfs took 1-4 s here)."""
    chunks = [(a, off, min(off + _PREFAULT_CHUNK, a.nbytes)) for a in arenas for off in range(0, a.nbytes, _PREFAULT_CHUNK)]
    if not chunks:
        return
    workers = max(1, min(len(chunks), os.cpu_count() or 1))
    lock, errors = threading.Lock(), []

    def work() -> None:
        try:
            while True:
                with lock:
                    if not chunks:
                        return
                    a, start, end = chunks.pop()
                _prefault_range(a, start, end)
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=work, name=f"sgle-prefault-{k}", daemon=True) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _specs(layout, rank: int) -> list[ShardSpec]:
    """``rank``'s shards of ``layout`` as arena specs (column-sharded tensors stored transposed,
    ``layout.geometry.stored_transposed``, as the daemon stores them)."""
    return [ShardSpec(t.name, shape, t.dtype_bytes, transposed=stored_transposed(t), alone=t.family == "full")
            for t, shape in rank_tensors(layout, rank)]


def _runs(op: CopyOp, sh: ShardSpec, offset: int) -> tuple[int, int, int, int]:
    """``op.byte_runs`` in the arena's storage of shard ``sh``: a column block of a transposed shard
    is a block of its storage's rows (one run); a whole tensor is one run whatever its storage."""
    if op.dim < 0:
        return (0, sh.nbytes, sh.nbytes, 1)
    if sh.transposed and op.dim == 1:
        col = sh.shape[0] * sh.itemsize
        return (offset * col, op.length * col, op.length * col, 1)
    if sh.transposed:
        raise ValueError(f"{op.tensor}: a transposed shard is cut along dim 1 only, not {op.dim}")
    return op.byte_runs(sh.shape, offset, sh.itemsize)


def allocate_rank_arenas(plan_layout, label: str, prefault: bool = True) -> dict[int, ShmArena]:
    """One arena per rank of ``plan_layout`` with every shard it holds (shapes from the layout)."""
    out = {}
    try:
        for r in range(plan_layout.tp_size):
            specs = _specs(plan_layout, r)
            out[r] = ShmArena.create(f"{label}-r{r}", specs)
        if prefault:
            _prefault(list(out.values()))
    except BaseException:
        for a in out.values():
            a.close()
        raise
    return out


def load_rank_from_checkpoint(layout, rank: int, ckpt: SafetensorsCheckpoint, arena: ShmArena) -> int:
    """Fill ``arena`` with ``rank``'s shards of ``layout`` read from ``ckpt``; returns bytes read."""
    from sgl_elastic.layout.geometry import shard_region

    n = 0
    for t, _ in rank_tensors(layout, rank):
        reg = shard_region(t, layout, rank)
        assert reg is not None
        n += ckpt.read_region(t.name, arena.array(t.name), *reg)
    return n


class CpuExecutor:
    """Run plans on shared-memory shards.

    Args:
        checkpoint: the model's safetensors checkpoint (host reload source).
        topology: bandwidths for the cost model (``Topology.single_node`` with measured figures).
        reload_workers / copy_workers: threads per queue (the model assumes the measured bandwidths
            are what these workers get in all).
        in_place: remap or regrow the survivors' own arenas where the plan allows it (module
            docstring); False: every destination is a new arena and the old ones are only read.
        remap: with ``in_place``, remap page-aligned arenas (kept bytes stay in their pages);
            False: always regrow and move.
    """

    def __init__(self, checkpoint: SafetensorsCheckpoint, topology: Topology, *, reload_workers: int = 1,
                 copy_workers: int = 1, in_place: bool = False, remap: bool = True) -> None:
        self.checkpoint = checkpoint
        self.remap = remap
        self.topology = topology
        self.reload_workers = reload_workers
        self.copy_workers = copy_workers
        self.in_place = in_place
        self.copy_gbps = topology.node_copy_gbps[0] if topology.node_copy_gbps else 0.0

    def run(self, plan: MigrationPlan, old: dict[int, ShmArena], label: str = "mig", *,
            ranks: list[int] | None = None, remote: dict | None = None,
            endpoint=None, release: bool = True) -> tuple[dict[int, ShmArena], ExecReport]:
        """Execute ``plan``: ``old`` maps old rank -> its arena (survivors only). Returns new rank ->
        arena (caller closes them; an arena regrown in place is the old one's file, and the old
        arena object no longer unlinks it) and the report.

        Several nodes (``executor.remote``): ``ranks`` are the new ranks this node builds (default:
        all); ``remote`` maps the old ranks another node's daemon holds to their ``RemoteArena``,
        read through ``endpoint`` (this node's ``TransferEndpoint``). A copy whose read fails
        (``LinkFailed``) is reloaded from the checkpoint instead, as is a fan-out whose source is a
        new rank of another node (its reload there may not have happened yet). With ``ranks`` no
        survivor's bytes are moved in place (another node may read its old view meanwhile: only
        remaps, which never write it). ``release=False``: the pages only the old views use are not
        punched out here (a peer may still read them); the caller calls ``release_unused`` later."""
        remote = dict(remote or {})
        mine = set(range(plan.new_layout.tp_size) if ranks is None else ranks)
        missing = [s for s in range(plan.old_layout.tp_size)
                   if s not in plan.change.failed and s not in old and s not in remote and ranks is None]
        if missing:
            raise ValueError(f"no arena for surviving old ranks {missing}; pass one per survivor")
        if remote and endpoint is None:
            raise ValueError("remote arenas need a TransferEndpoint to read them")
        t0 = time.perf_counter()
        reloads, copies, fanout = split_queues(plan)
        reloads = [op for op in reloads if op.dst_rank in mine]
        copies = [op for op in copies if op.dst_rank in mine]
        fanout = [op for op in fanout if op.dst_rank in mine]
        if ranks is not None:
            # a fan-out from a new rank of another node: reload here instead
            reloads += [as_reload(op) for op in fanout if op.src_rank not in mine]
            fanout = [op for op in fanout if op.src_rank in mine]
            unheld = sorted({op.src_rank for op in copies if op.src_rank not in old and op.src_rank not in remote})
            if unheld:
                raise ValueError(f"old ranks {unheld} are sources of this node's copies but neither held here"
                                 " nor given as remote arenas")
        if endpoint is not None:
            endpoint.reset_pace()
        remote_ops = [op for op in copies if op.src_rank in remote]
        remote_shards = {r: {x.name: x for x in a.handle.shards} for r, a in remote.items()}
        copies = [op for op in copies if op.src_rank not in remote]
        remaps = in_place_remaps(plan, old, copies) if self.in_place and self.remap else {}
        moves = {d: m for d, m in in_place_moves(plan, old, copies).items() if d not in remaps} \
            if self.in_place and ranks is None else {}
        remapped = {i for _, _, ids in remaps.values() for i in ids}  # KEEP ops the remaps do
        new: dict[int, ShmArena] = {}
        grown: dict[int, int] = {}  # new rank -> old rank whose file it regrew or remapped
        alloc: dict[int, int] = {}  # new rank -> bytes of new memory
        moved, reserving = False, None
        try:
            # Step 1: every destination buffer, once, before any copy (in place: only the extension).
            ranges = []
            for d in sorted(mine):
                specs = _specs(plan.new_layout, d)
                if d in remaps:
                    src, keep, _ = remaps[d]
                    new[d], fresh = old[src].remap(specs, keep)
                    grown[d] = src
                    ranges += [(new[d], f, f + n) for f, n in fresh]
                    alloc[d] = sum(n for _, n in fresh)
                elif d in moves:
                    src = moves[d][0]
                    before = old[src].nbytes
                    new[d] = old[src].regrow(specs)
                    grown[d] = src
                    ranges.append((new[d], before, new[d].nbytes))
                    alloc[d] = new[d].nbytes - before
                else:
                    new[d] = ShmArena.create(f"{label}-r{d}", specs)
                    alloc[d] = new[d].nbytes
            _prefault([a for d, a in new.items() if d not in grown])
            reserving = _reserve(ranges)  # the extensions' pages, beside the moves (never writes data)
            t_alloc = time.perf_counter()
            # Step 2a (in place): stage what peers read out of a regrown arena (before any move).
            staged: dict[int, np.ndarray] = {}
            in_place_src = {grown[d] for d in moves}  # a remapped arena's old view is never written
            for op in copies:
                if op.kind != KEEP and op.src_rank in in_place_src:
                    staged[id(op)] = np.array(shard_view(old[op.src_rank].array(op.tensor), op, op.src_offset))
            moved = bool(moves)
            gate = _Gate({d: moves[d][1] for d in moves})
            read0 = self.checkpoint.bytes_read

            # Step 2: reloads and copies concurrently (reload workers first: the slowest resource).
            def do_reload(op: CopyOp) -> None:
                dst = shard_view(new[op.dst_rank].array(op.tensor), op, op.dst_offset)
                self.checkpoint.read_region(op.tensor, dst, *full_region(shapes[op.tensor], op))

            def do_copy(op: CopyOp) -> None:
                src = staged.get(id(op))
                if src is None:
                    src_arena = new[op.src_rank] if op.stage == 1 else old[op.src_rank]
                    src = shard_view(src_arena.array(op.tensor), op, op.src_offset)
                dst = shard_view(new[op.dst_rank].array(op.tensor), op, op.dst_offset)
                copy_bits(dst, src)

            broken: list[CopyOp] = []  # remote reads that failed: reloaded after the others
            registered: list[int] = []
            if remote_ops:
                for d in sorted(mine):
                    endpoint.register(new[d].address, new[d].nbytes)
                    registered.append(new[d].address)

            def do_remote(op: CopyOp) -> None:
                from sgl_elastic.executor.remote import LinkFailed

                src = remote[op.src_rank]
                sh_src = remote_shards[op.src_rank][op.tensor]
                sh_dst = new[op.dst_rank].shards[op.tensor]
                f0, run, s_stride, n = _runs(op, sh_src, op.src_offset)
                g0, run2, d_stride, n2 = _runs(op, sh_dst, op.dst_offset)
                if (run, n) != (run2, n2):
                    raise ValueError(f"{op.tensor}: source runs {run}x{n} and destination runs {run2}x{n2} differ")
                base = new[op.dst_rank].address + sh_dst.offset
                try:
                    endpoint.read(src.addr, [base + g0 + k * d_stride for k in range(n)],
                                  [src.base + sh_src.offset + f0 + k * s_stride for k in range(n)], [run] * n)
                except LinkFailed:
                    broken.append(op)

            def do_moves(d: int) -> None:  # a regrown rank's kept bytes, the gate lowered as they go
                buf = np.frombuffer(new[d]._shm.buf, dtype=np.uint8)  # type: ignore[attr-defined]
                stage = np.empty(_STAGE_BYTES, dtype=np.uint8)  # one per mover thread
                try:
                    runs = moves[d][1]
                    for k, run in enumerate(runs):
                        _move(buf, *run, stage)
                        gate.lower(d, _src_end(runs[k + 1]) if k + 1 < len(runs) else 0)
                finally:
                    del buf

            def first_byte(op: CopyOp) -> tuple[int, int]:  # (rank, first byte the op writes)
                if op.dst_rank not in moves:
                    return op.dst_rank, 0
                sh = new[op.dst_rank].shards[op.tensor]
                return op.dst_rank, sh.offset + _runs(op, sh, op.dst_offset)[0]

            shapes = {t.name: t.shape for t in plan.old_layout.tensors()}
            left = [op for op in copies if not (op.kind == KEEP and (op.dst_rank in moves or id(op) in remapped))]
            spans: dict[str, float] = {}
            # Reloads and copies run beside the moves: an op into a regrown rank waits at the gate until
            # no source not yet moved lies at or above the first byte it writes.
            threads = _start(sorted(moves), do_moves, min(len(grown), os.cpu_count() or 1), "move", spans, gate=gate) + \
                _start(reloads, do_reload, self.reload_workers, "reload", spans, gate=gate, where=first_byte) + \
                _start(left, do_copy, self.copy_workers, "copy", spans, gate=gate, where=first_byte) + \
                _start(remote_ops, do_remote, self.copy_workers, "remote", spans, gate=gate, where=first_byte)
            _join(threads)
            if broken:  # the link is gone: those bytes from this node's checkpoint
                _join(_start([as_reload(op) for op in broken], do_reload, self.reload_workers, "reroute", spans))
            reserving.join()
            # Step 3: fan-out copies read what the reloads wrote.
            t_fan = time.perf_counter()
            _join(_start(fanout, do_copy, self.copy_workers, "fanout", spans))
            released = sum(new[d].release_unused() for d in remaps) if release else 0
            for ptr in registered:
                endpoint.unregister(ptr)
            t_end = time.perf_counter()
        except BaseException as e:
            if reserving is not None:
                reserving.join()
            for d, a in new.items():
                if d in grown:
                    a.give_back(old[grown[d]])
                else:
                    a.close()
            if grown:
                raise InPlaceFailed(f"in-place migration failed ({type(e).__name__}: {e})", moved,
                                    sorted(grown.values())) from e
            raise
        keep_gbps = self.copy_gbps
        in_view: dict[int, int] = {}
        for op in copies:
            if id(op) in remapped:
                in_view[op.dst_rank] = in_view.get(op.dst_rank, 0) + op.nbytes
        report = ExecReport(
            backend="cpu-shm", achieved_s=t_end - t0, alloc_s=t_alloc - t0, reload_s=spans.get("reload", 0.0),
            copy_s=spans.get("copy", 0.0), move_s=spans.get("move", 0.0), fanout_s=t_end - t_fan,
            keep_bytes=sum(op.nbytes for op in copies if op.kind == KEEP),
            peer_bytes=sum(op.nbytes for op in copies if op.kind != KEEP) + sum(op.nbytes for op in fanout)
            + sum(op.nbytes for op in remote_ops),
            reload_bytes=sum(op.nbytes for op in reloads), file_bytes_read=self.checkpoint.bytes_read - read0,
            num_ops=len(reloads) + len(copies) + len(fanout) + len(remote_ops),
            remote_bytes=sum(op.nbytes for op in remote_ops) - sum(op.nbytes for op in broken),
            rerouted_bytes=sum(op.nbytes for op in broken), remote_s=spans.get("remote", 0.0),
            predicted=predict_time(plan, self.topology, keep_gbps=keep_gbps, alloc_bytes=alloc, kept_in_place=in_view),
            in_place_ranks=len(grown), alloc_bytes=sum(alloc.values()),
            remapped_bytes=sum(in_view.values()), remapped_ranks=len(remaps), released_bytes=released,
        )
        return new, report


Move = tuple[int, int, int, int, int, int]  # (src byte, dst byte, run bytes, src stride, dst stride, runs)


def as_reload(op: CopyOp) -> CopyOp:
    """The same bytes of ``op``'s destination, read from the checkpoint instead."""
    return CopyOp(op.tensor, op.dim, RELOAD, -1, -1, op.dst_rank, op.start, op.length, op.start, op.dst_offset,
                  op.nbytes, 0)


def _keeps_by_rank(copies: list[CopyOp]) -> dict[int, list[CopyOp]]:
    """New rank -> its KEEP ops."""
    keeps: dict[int, list[CopyOp]] = {}
    for op in copies:
        if op.kind == KEEP:
            keeps.setdefault(op.dst_rank, []).append(op)
    return keeps


def _keep_source(plan: MigrationPlan, old: dict[int, ShmArena], d: int, ops: list[CopyOp]) -> int | None:
    """The one surviving old rank all of new rank ``d``'s kept bytes come from, when its arena is
    this process's own and becomes ``d`` (a survivor keeps its file); else None."""
    srcs = {op.src_rank for op in ops}
    if len(srcs) != 1:
        return None
    s = srcs.pop()
    arena = old.get(s)
    if arena is None or not arena.owner or plan.old2new_rank[s] != d:
        return None
    return s


def in_place_remaps(plan: MigrationPlan, old: dict[int, ShmArena], copies: list[CopyOp]
                    ) -> dict[int, tuple[int, list[tuple[int, int, int]], set[int]]]:
    """New rank -> (old rank whose file it remaps, keep ranges ``(new view offset, old view offset,
    bytes)``, ids of the KEEP ops they do) for every new rank whose kept bytes can stay in their
    pages (module docstring). A kept run that is not whole pages at both ends, or strided (a
    column block), is left to a copy."""
    out = {}
    for d, ops in _keeps_by_rank(copies).items():
        s = _keep_source(plan, old, d, ops)
        if s is None or not old[s].page_aligned or len(old[s].runs) > MAX_RUNS:
            continue  # too fragmented after many changes: a new arena (one run) instead
        arena = old[s]
        placed_t, _ = ShmArena.place(_specs(plan.new_layout, d))
        if any(sp.offset % PAGE for sp in placed_t):
            continue
        placed = {sp.name: sp for sp in placed_t}
        keep, ids = [], set()
        for op in ops:
            a, b = arena.shards[op.tensor], placed[op.tensor]
            if a.transposed != b.transposed:
                continue
            f0, run, _, n = _runs(op, a, op.src_offset)
            g0, _, _, n2 = _runs(op, b, op.dst_offset)
            src, dst = a.offset + f0, b.offset + g0
            if n != 1 or n2 != 1 or src % PAGE or dst % PAGE:
                continue
            if run % PAGE:  # only a tensor's last bytes: the rest of its last page is padding in both views
                if src + run != a.offset + a.nbytes or dst + run != b.offset + b.nbytes:
                    continue
                run = -(-run // PAGE) * PAGE
            keep.append((dst, src, run))
            ids.add(id(op))
        if keep:
            out[d] = (s, keep, ids)
    return out


def in_place_moves(plan: MigrationPlan, old: dict[int, ShmArena], copies: list[CopyOp]) -> dict[int, tuple[int, list[Move]]]:
    """New rank -> (old rank whose arena it regrows, its kept bytes as moves in execution order), for
    every new rank that may be migrated in place (module docstring); the others are absent."""
    out = {}
    for d, ops in _keeps_by_rank(copies).items():
        s = _keep_source(plan, old, d, ops)
        if s is None or old[s].runs:  # a remapped arena is not regrown
            continue
        arena = old[s]
        new_shards, new_size = ShmArena.place(_specs(plan.new_layout, d))
        if new_size < arena.nbytes:
            continue
        placed = {sp.name: sp for sp in new_shards}
        runs, ok, dim1 = [], True, set()
        for op in ops:
            a, b = arena.shards[op.tensor], placed[op.tensor]
            if op.dim == 1 and not a.transposed:
                if op.tensor in dim1:  # two column blocks of one tensor interleave: no safe order
                    ok = False
                    break
                dim1.add(op.tensor)
            if a.transposed != b.transposed:
                ok = False
                break
            f0, run, ss, n = _runs(op, a, op.src_offset)
            g0, run2, sd, n2 = _runs(op, b, op.dst_offset)
            src, dst = a.offset + f0, b.offset + g0
            if run != run2 or n != n2 or dst < src or dst + (n - 1) * sd < src + (n - 1) * ss:
                ok = False
                break
            if n > 1 and ss < run:
                ok = False
                break
            runs.append((src, dst, run, ss, sd, n))
        if ok:
            out[d] = (s, sorted(runs, key=lambda m: -m[0]))
    return out


def _move(buf: np.ndarray, src: int, dst: int, run: int, ss: int, sd: int, n: int, stage: np.ndarray) -> None:
    """Move ``n`` runs of ``run`` bytes (strides ``ss`` -> ``sd``) inside ``buf`` towards higher
    addresses, last run first, so that no byte is overwritten before it is moved."""
    if src == dst and (ss == sd or n == 1):
        return
    if n == 1 or run > stage.size:
        for k in range(n - 1, -1, -1):
            _move_contiguous(buf, src + k * ss, dst + k * sd, run)
        return
    from numpy.lib.stride_tricks import as_strided

    def rows(base: int, stride: int, k0: int, k1: int) -> np.ndarray:
        return as_strided(buf[base + k0 * stride:], shape=(k1 - k0, run), strides=(stride, 1))

    per_stage = max(1, stage.size // run)
    k1 = n
    while k1 > 0:
        # the largest block [k0, k1) whose destination starts past the end of its source
        top = src + (k1 - 1) * ss + run
        k0 = max(0, -(-(top - dst) // sd)) if sd > 0 else k1
        if k0 < k1:
            np.copyto(rows(dst, sd, k0, k1), rows(src, ss, k0, k1))
        else:  # overlapping: through the staging buffer
            k0 = max(0, k1 - per_stage)
            tmp = stage[:(k1 - k0) * run].reshape(k1 - k0, run)
            np.copyto(tmp, rows(src, ss, k0, k1))
            np.copyto(rows(dst, sd, k0, k1), tmp)
        k1 = k0


def _move_contiguous(buf: np.ndarray, src: int, dst: int, run: int) -> None:
    """``buf[dst:dst+run] = buf[src:src+run]``, overlapping or not: libc's ``memmove`` (one pass,
    backwards when the ranges overlap; the GIL is released by ctypes). Bounds checked here, not by numpy."""
    if dst == src:
        return
    if not (0 <= src and 0 <= dst and max(src, dst) + run <= buf.size):
        raise IndexError(f"move [{src}, +{run}) -> {dst} outside a buffer of {buf.size} bytes")
    base = buf.ctypes.data
    ctypes.memmove(base + dst, base + src, run)


class _Gate:
    """Where the in-place moves are: ``level[rank]`` is the end of the highest source not yet moved
    in that rank's file (0: all moved). A write starting at or above it overwrites only bytes that
    are no longer anyone's source (the moves run in decreasing address order). ``errors`` is shared
    by every worker: one failure stops them all, waiting ones included."""

    def __init__(self, runs: dict[int, list]) -> None:
        self.cv = threading.Condition()
        self.level = {d: _src_end(r[0]) if r else 0 for d, r in runs.items()}
        self.errors: list[BaseException] = []

    def lower(self, rank: int, level: int) -> None:
        with self.cv:
            self.level[rank] = level
            self.cv.notify_all()

    def fail(self, e: BaseException) -> None:
        with self.cv:
            self.errors.append(e)
            self.cv.notify_all()

    def take(self, queue: list, where) -> object | None:
        """Pop the first op of ``queue`` free to run now (waiting for the moves if none is); None
        when the queue is empty or a worker failed."""
        with self.cv:
            while queue and not self.errors:
                for i, op in enumerate(queue):
                    if where is None:
                        return queue.pop(i)
                    rank, first = where(op)
                    if first >= self.level.get(rank, 0):
                        return queue.pop(i)
                self.cv.wait(1.0)  # the mover lowers the level (or fails) and notifies
            return None


def _src_end(run) -> int:
    src, _, length, ss, _, n = run
    return src + (n - 1) * ss + length


def _start(queue: list, fn: Callable, workers: int, name: str, spans: dict[str, float], gate: _Gate | None = None,
           where=None) -> list[threading.Thread]:
    """Start ``workers`` threads draining ``queue`` in order (with ``gate``: an op when ``where(op)``
    says the moves let it run); record the queue's wall span."""
    if not queue:
        return []
    gate = gate or _Gate({})
    queue = list(queue)
    lock = threading.Lock()
    state = {"t0": time.perf_counter(), "left": workers}
    errors = gate.errors

    def worker() -> None:
        try:
            while True:
                op = gate.take(queue, where)
                if op is None:
                    break
                fn(op)
        except BaseException as e:  # re-raised by _join
            gate.fail(e)
        finally:
            with lock:
                state["left"] -= 1
                if state["left"] == 0:
                    spans[name] = time.perf_counter() - state["t0"]

    threads = [threading.Thread(target=worker, name=f"sgle-{name}-{k}", daemon=True) for k in range(workers)]
    for t in threads:
        t.errors = errors  # type: ignore[attr-defined]
        t.start()
    return threads


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join()
    for t in threads:
        if t.errors:  # type: ignore[attr-defined]
            raise t.errors[0]  # type: ignore[attr-defined]
