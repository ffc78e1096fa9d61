"""Unit tests of the migration executor: safetensors byte ranges, CPU shared-memory execution
(across processes), cleanup; the CUDA path runs only where CUDA is available."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_elastic.executor.cpu import _runs
from sgl_elastic.executor import CpuExecutor, SafetensorsCheckpoint, ShardSpec, ShmArena, load_rank_from_checkpoint
from sgl_elastic.executor.cpu import allocate_rank_arenas
from sgl_elastic.executor.owner import ShardOwner
from sgl_elastic.layout.geometry import shard_region
from sgl_elastic.layout import ElasticLayout
from sgl_elastic.planner import ClusterChange, Topology, plan_migration

pytestmark = pytest.mark.unit


def toy_config(kind: str = "qwen3_moe", nkv: int = 4):
    return SimpleNamespace(model_type=kind, num_hidden_layers=2, hidden_size=24, num_attention_heads=8,
                           num_key_value_heads=nkv, head_dim=4, intermediate_size=40, moe_intermediate_size=20,
                           num_experts=6 if kind == "qwen3_moe" else None, vocab_size=50, dtype="float32",
                           tie_word_embeddings=False)


def write_checkpoint(tmp: Path, layout: ElasticLayout, num_files: int = 2) -> dict[str, np.ndarray]:
    """Random float32 checkpoint with the layout's tensor names, split over ``num_files`` files."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    full = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in layout.tensors()}
    names = list(full)
    for i in range(num_files):
        part = {n: full[n] for n in names[i::num_files]}
        save_file(part, str(tmp / f"model-{i:05d}-of-{num_files:05d}.safetensors"))
    return full


def expected_shard(full: dict, layout: ElasticLayout, rank: int, t) -> np.ndarray | None:
    reg = shard_region(t, layout, rank)
    if reg is None:
        return None
    a = full[t.name]
    if a.ndim == 1:
        return a
    return a[reg[0]:reg[1], reg[2]:reg[3]]


def test_safetensors_reader_reads_only_the_region(tmp_path):
    from safetensors.numpy import save_file

    x = np.arange(6 * 10, dtype=np.float32).reshape(6, 10)
    y = np.arange(7, dtype=np.float32)
    save_file({"x": x, "y": y}, str(tmp_path / "m.safetensors"))
    with SafetensorsCheckpoint(tmp_path) as ck:
        assert ck.entry("x").shape == (6, 10) and ck.entry("y").itemsize == 4
        out = np.empty((2, 10), np.float32)
        assert ck.read_region("x", out, 3, 5) == out.nbytes
        np.testing.assert_array_equal(out, x[3:5])
        big = np.zeros((6, 8), np.float32)
        view = big[:, 2:5]  # strided destination: one run per row
        ck.read_region("x", view, 0, 6, 4, 7)
        np.testing.assert_array_equal(big[:, 2:5], x[:, 4:7])
        assert ck.bytes_read == out.nbytes + view.nbytes
        with pytest.raises(ValueError, match="outside shape"):
            ck.read_region("x", out, 5, 7)
        with pytest.raises(KeyError, match="not in the checkpoint"):
            ck.entry("z")


def test_arena_names_are_unique_and_cleaned_up():
    a = ShmArena.create("t", [ShardSpec("w", (4, 4), 4)])
    b = ShmArena.create("t", [ShardSpec("w", (4, 4), 4)])
    assert a.handle.shm_name != b.handle.shm_name
    c = ShmArena.attach(a.handle)
    a.array("w")[:] = 7
    assert int(c.array("w")[0, 0]) == 7
    c.close()
    names = [a.handle.shm_name, b.handle.shm_name]
    a.close()
    b.close()
    for n in names:
        assert not os.path.exists(f"/dev/shm/{n}")


def test_bandwidth_probes_measure_and_leave_nothing(tmp_path):
    """The daemon's cost-model figures (``ShmMemory.measure_bandwidths``) come from these probes."""
    from sgl_elastic.executor.bandwidth import (measure_alloc_gbps, measure_concurrent_gbps, measure_copy_gbps,
                                                measure_read_gbps)
    from sgl_elastic.memory.shm import ShmMemory

    write_checkpoint(tmp_path, ElasticLayout.from_hf_config(toy_config(), 2))
    before = {e.name for e in os.scandir("/dev/shm") if e.name.startswith(f"sgle-{os.getpid()}-")}
    with SafetensorsCheckpoint(tmp_path) as ck:
        read, copy = measure_concurrent_gbps(ck, nbytes=4 << 20, chunk_bytes=1 << 20)
        assert read > 0 and copy > 0
        assert measure_read_gbps(ck, max_bytes=4 << 20) > 0 and measure_copy_gbps(4 << 20, 1 << 20) > 0
        assert measure_alloc_gbps(4 << 20) > 0
        got = ShmMemory("bwtest").measure_bandwidths(ck)
        assert len(got) == 3 and all(x > 0 for x in got), got
    after = {e.name for e in os.scandir("/dev/shm") if e.name.startswith(f"sgle-{os.getpid()}-")}
    assert after == before, f"probe arenas left in /dev/shm: {after - before}"


def migrate_and_check(tmp: Path, old: ElasticLayout, failed: tuple, added: int, in_place: bool, loads=None):
    """Load ``old`` from a random checkpoint, migrate (``loads``: rebalance the experts), check every
    new shard bitwise against the checkpoint's region; returns (plan, report)."""
    full = write_checkpoint(tmp, old)
    plan = plan_migration(old, ClusterChange(failed=failed, added=added), expert_loads=loads,
                          rebalance_experts=loads is not None and not failed)
    with SafetensorsCheckpoint(tmp) as ck:
        arenas = allocate_rank_arenas(old, "old")
        try:
            for r, a in arenas.items():
                load_rank_from_checkpoint(old, r, ck, a)
            survivors = {r: a for r, a in arenas.items() if r not in failed}
            names = {r: a.handle.shm_name for r, a in survivors.items()}
            topo = Topology.single_node(old.tp_size + added, read_gbps=1.0, copy_gbps=4.0)
            ck.bytes_read = 0
            new, report = CpuExecutor(ck, topo, in_place=in_place).run(plan, survivors)
            try:
                if not in_place:
                    assert report.in_place_ranks == 0
                for d, a in new.items():  # a regrown arena is its survivor's file, and only it unlinks it
                    reused = [s for s, n in names.items() if n == a.handle.shm_name]
                    if reused:
                        assert in_place and plan.old2new_rank[reused[0]] == d
                        assert a.owner and not survivors[reused[0]].owner
                assert sum(1 for a in new.values() if a.handle.shm_name in names.values()) == report.in_place_ranks
                if added == 2:
                    assert any(op.stage == 1 for op in plan.ops)
                assert report.file_bytes_read == plan.reload_bytes == report.reload_bytes
                assert report.peer_bytes == plan.peer_bytes and report.keep_bytes == plan.keep_bytes
                for r in range(plan.new_layout.tp_size):
                    for t in plan.new_layout.tensors():
                        want = expected_shard(full, plan.new_layout, r, t)
                        if want is None:
                            continue
                        got = new[r].array(t.name).view(np.float32)
                        np.testing.assert_array_equal(got, want, err_msg=f"new rank {r} {t.name}")
            finally:
                for a in new.values():
                    a.close()
        finally:
            for a in arenas.values():
                a.close()
        left = [n for n in names.values() if os.path.exists(f"/dev/shm/{n}")]
        assert not left, f"arenas not unlinked: {left}"
    return plan, report


@pytest.mark.parametrize("in_place", [False, True], ids=["new-arenas", "in-place"])
@pytest.mark.parametrize("kind,nkv,tp,failed,added,ep,grown", [
    ("qwen3_moe", 4, 4, (1,), 0, False, 3),
    ("qwen3_moe", 4, 3, (0,), 0, False, 2),  # rank 0 lost: every survivor shifts down a rank
    ("qwen3", 8, 5, (1, 3), 0, False, 3),
    ("qwen3_moe", 2, 4, (2, 3), 1, False, None),   # replicated KV heads, a lost head
    ("qwen3_moe", 2, 4, (2, 3), 2, False, None),   # ... needed by two new replicas: reloaded once, fanned out
    ("qwen3", 4, 3, (), 1, False, None),       # scale-up
    ("qwen3_moe", 4, 3, (0,), 0, True, 2),     # expert parallel
])
def test_cpu_executor_rebuilds_new_shards(tmp_path, kind, nkv, tp, failed, added, ep, grown, in_place):
    """Every new shard equals the checkpoint's region, whether the destinations are new arenas or
    the survivors' own files regrown in place (``grown``: how many new ranks are, None: not checked)."""
    old = ElasticLayout.from_hf_config(toy_config(kind, nkv), tp, mlp_unit=8, vocab_unit=8, expert_parallel=ep)
    _, report = migrate_and_check(tmp_path, old, failed, added, in_place)
    if in_place and grown is not None:
        assert report.in_place_ranks == grown


@pytest.mark.parametrize("in_place", [False, True], ids=["new-arenas", "in-place"])
def test_expert_rebalance_then_failure_moves_only_experts(tmp_path, in_place):
    """A rebalance (skewed loads, no failure) moves experts between ranks by peer copies only, and a
    failure of the placed layout reloads exactly the lost rank's experts; every shard stays the
    checkpoint's bytes."""
    old = ElasticLayout.from_hf_config(toy_config(), 3, mlp_unit=8, vocab_unit=8, expert_parallel=True)
    loads = np.ones((2, 6))
    loads[0, :2] = 50.0  # layer 0: experts 0 and 1 (both on rank 0) hot
    loads[1, 4:] = 30.0  # layer 1: experts 4 and 5 (both on rank 2) hot
    (tmp_path / "a").mkdir()
    plan, report = migrate_and_check(tmp_path / "a", old, (), 0, in_place, loads)
    placed = plan.new_layout.family("experts")
    assert placed.held and placed.redundant == 0 and placed.widths == (2, 2, 2)
    assert placed.expert_owner(0, 0) != placed.expert_owner(0, 1) and placed.expert_owner(1, 4) != placed.expert_owner(1, 5)
    assert plan.reload_bytes == 0 < plan.peer_bytes and report.peer_bytes == plan.peer_bytes
    assert report.in_place_ranks == (3 if in_place else 0)  # kept experts keep their slots: every arena regrows in place
    assert all(op.layer >= 0 for op in plan.ops if op.family == "experts")
    assert {op.family for op in plan.ops if op.kind != "keep"} == {"experts"}
    (tmp_path / "b").mkdir()
    plan2, _ = migrate_and_check(tmp_path / "b", plan.new_layout, (1,), 0, in_place)
    lost = sum(t.nbytes for t in old.tensors() if t.family == "experts" and placed.expert_owner(t.layer, t.expert) == 1)
    assert plan2.reload_bytes == plan2.lower_bound_reload_bytes
    assert sum(op.nbytes for op in plan2.ops if op.family == "experts" and op.kind == "reload") == lost
    assert plan2.new_layout.family("experts").held  # survivors kept their experts where they were
    # a failure with loads: survivors keep their experts, the lost ones are placed by load (reloads only),
    # and every survivor's file is regrown in place
    (tmp_path / "c").mkdir()
    plan3, report3 = migrate_and_check(tmp_path / "c", old, (1,), 0, in_place, loads)
    fam3 = plan3.new_layout.family("experts")
    for layer in (0, 1):
        assert set(fam3.rank_experts(0, layer)) >= {0, 1} and set(fam3.rank_experts(1, layer)) >= {4, 5}
    assert not [op for op in plan3.ops if op.family == "experts" and op.kind == "peer"]
    if in_place:
        assert report3.in_place_ranks == 2


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_in_place_migration_of_any_layout_gives_the_checkpoints_bytes(data):
    """Property: whatever the model shape, rank count and failures, the in-place migration leaves
    exactly the checkpoint's regions (the moves never overwrite a byte before it moved)."""
    import tempfile

    kind = data.draw(st.sampled_from(["qwen3", "qwen3_moe"]))
    nkv = data.draw(st.sampled_from([1, 2, 4, 8]))
    tp = data.draw(st.integers(2, 6))
    ep = kind == "qwen3_moe" and tp <= 6 and data.draw(st.booleans())
    cfg = toy_config(kind, nkv)
    cfg.hidden_size = data.draw(st.sampled_from([16, 24, 40]))
    cfg.num_attention_heads = 8
    failed = tuple(sorted(data.draw(st.sets(st.integers(0, tp - 1), min_size=1, max_size=tp - 1))))
    old = ElasticLayout.from_hf_config(cfg, tp, mlp_unit=4, vocab_unit=8, expert_parallel=ep)
    with tempfile.TemporaryDirectory() as tmp:
        migrate_and_check(Path(tmp), old, failed, 0, True)


@pytest.mark.parametrize("when", ["prefault", "reload"])
def test_in_place_failure_gives_the_files_back(tmp_path, when):
    """A failure before the moves leaves each survivor's file as it was (its size, its bytes, owned by
    the old arena); one after them says the old arenas are corrupted. Either way nothing leaks."""
    from sgl_elastic.executor import cpu as cpu_mod
    from sgl_elastic.executor.cpu import InPlaceFailed

    old = ElasticLayout.from_hf_config(toy_config(), 3, mlp_unit=8, vocab_unit=8)
    full = write_checkpoint(tmp_path, old)
    plan = plan_migration(old, ClusterChange(failed=(1,)))
    mine = lambda: {n for n in os.listdir("/dev/shm") if n.startswith(f"sgle-{os.getpid()}-")}  # noqa: E731
    before = mine()
    with SafetensorsCheckpoint(tmp_path) as ck:
        arenas = allocate_rank_arenas(old, "old")
        try:
            for r, a in arenas.items():
                load_rank_from_checkpoint(old, r, ck, a)
            survivors = {r: arenas[r] for r in (0, 2)}
            sizes = {r: os.path.getsize(f"/dev/shm/{a.handle.shm_name}") for r, a in survivors.items()}

            def boom(*args, **kwargs):
                raise OSError(28, f"injected failure at {when}")

            patch = pytest.MonkeyPatch()
            if when == "prefault":
                patch.setattr(cpu_mod, "_prefault", boom)
            else:
                patch.setattr(ck, "read_region", boom)
            try:
                with pytest.raises(InPlaceFailed, match="injected failure") as info:
                    CpuExecutor(ck, Topology.single_node(3, read_gbps=1, copy_gbps=1), in_place=True).run(plan, survivors)
            finally:
                patch.undo()
            assert info.value.corrupted == (when == "reload") and info.value.ranks == [0, 2]
            for r, a in survivors.items():
                assert a.owner
                assert os.path.getsize(f"/dev/shm/{a.handle.shm_name}") == sizes[r]
                if when == "prefault":  # nothing moved: the old shards are intact
                    for t in old.tensors():
                        want = expected_shard(full, old, r, t)
                        if want is not None:
                            np.testing.assert_array_equal(a.array(t.name).view(np.float32), want)
        finally:
            for a in arenas.values():
                a.close()
    assert mine() <= before


def test_gate_lets_a_write_run_only_above_every_source_not_yet_moved():
    """The in-place gate: a write into a regrown rank starting below the highest unmoved source
    waits until the mover lowers the level past it; other ranks' writes never wait; a failure of
    any worker releases the waiting ones (they stop, they do not run)."""
    import threading

    from sgl_elastic.executor.cpu import _Gate

    runs = [(1000, 1500, 100, 100, 100, 1), (200, 300, 50, 50, 50, 1)]  # sources [1000,1100), [200,250)
    gate = _Gate({0: runs})
    assert gate.level == {0: 1100}
    where = lambda op: op  # noqa: E731 - ops are (rank, first byte)
    queue = [(0, 250), (0, 1200), (1, 0)]
    assert gate.take(queue, where) == (0, 1200) and gate.take(queue, where) == (1, 0)
    got = []
    t = threading.Thread(target=lambda: got.append(gate.take(queue, where)))
    t.start()
    t.join(0.3)
    assert t.is_alive() and not got  # (0, 250) waits: the source at [200, 250) has not moved
    gate.lower(0, 250)  # the first move is done
    t.join(5)
    assert got == [(0, 250)] and not queue
    gate2, q2 = _Gate({0: runs}), [(0, 10)]
    t = threading.Thread(target=lambda: got.append(gate2.take(q2, where)))
    t.start()
    gate2.fail(RuntimeError("mover failed"))
    t.join(5)
    assert not t.is_alive() and got[-1] is None and q2 == [(0, 10)]


def test_cpu_executor_across_processes(tmp_path):
    """Old shards live in another process (shared memory); the executor attaches and migrates."""
    old = ElasticLayout.from_hf_config(toy_config(), 3, mlp_unit=8, vocab_unit=8)
    full = write_checkpoint(tmp_path, old, num_files=1)
    plan = plan_migration(old, ClusterChange(failed=(1,)))
    with ShardOwner(old, str(tmp_path), ranks=[0, 2], label="xproc") as owner, SafetensorsCheckpoint(tmp_path) as ck:
        new, report = CpuExecutor(ck, Topology.single_node(3, read_gbps=1.0, copy_gbps=4.0)).run(plan, owner.arenas)
        try:
            for r in range(2):
                for t in plan.new_layout.tensors():
                    want = expected_shard(full, plan.new_layout, r, t)
                    if want is not None:
                        np.testing.assert_array_equal(new[r].array(t.name).view(np.float32), want)
            assert report.achieved_s > 0 and report.predicted.predicted_s > 0
        finally:
            for a in new.values():
                a.close()


def test_missing_survivor_arena_is_an_error(tmp_path):
    old = ElasticLayout.from_hf_config(toy_config(), 2, mlp_unit=8, vocab_unit=8)
    write_checkpoint(tmp_path, old, num_files=1)
    plan = plan_migration(old, ClusterChange(added=1))
    with SafetensorsCheckpoint(tmp_path) as ck:
        with pytest.raises(ValueError, match="no arena for surviving old ranks"):
            CpuExecutor(ck, Topology.single_node(3, read_gbps=1, copy_gbps=1)).run(plan, {})


def _cuda():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs CUDA")
def test_cuda_executor_rebuilds_new_shards(tmp_path):
    import torch

    from sgl_elastic.executor.cuda import CudaExecutor

    old = ElasticLayout.from_hf_config(toy_config(), 4, mlp_unit=8, vocab_unit=8)
    full = write_checkpoint(tmp_path, old)
    plan = plan_migration(old, ClusterChange(failed=(1,)))
    n = torch.cuda.device_count()
    with SafetensorsCheckpoint(tmp_path) as ck:
        ex = CudaExecutor(ck, Topology.uniform(4), staging_bytes=256)  # tiny staging: exercises chunking
        olds = {}
        for r in (0, 2, 3):
            dev = f"cuda:{r % n}"
            olds[r] = {t.name: torch.from_numpy(np.ascontiguousarray(expected_shard(full, old, r, t))).view(torch.int32).to(dev)
                       for t in old.tensors() if expected_shard(full, old, r, t) is not None}
        new, report = ex.run(plan, olds)
        assert report.file_bytes_read == plan.reload_bytes
        for r in range(3):
            for t in plan.new_layout.tensors():
                want = expected_shard(full, plan.new_layout, r, t)
                if want is not None:
                    got = new[r][t.name].cpu().view(torch.float32).numpy()
                    np.testing.assert_array_equal(got, want)


def page_config(kind: str = "qwen3_moe", nkv: int = 4):
    """``toy_config`` with 1024-wide rows (4 KiB of float32): every shard of every layout is whole
    pages, so the arenas are page-aligned and a migration remaps instead of moving."""
    cfg = toy_config(kind, nkv)
    cfg.hidden_size = 1024
    return cfg


def _kept_file_bytes(plan, arenas: dict, ranks) -> dict:
    """(old rank, tensor, first unit) -> (file ranges of that kept block in ``arenas``) for every
    KEEP op of the plan, read from the arenas' own run tables (a column block of a transposed shard
    is a block of its storage's rows)."""
    from sgl_elastic.executor.cpu import _runs

    out = {}
    for op in plan.tensor_ops():
        if op.kind != "keep" or op.src_rank not in ranks:
            continue
        a = arenas[op.src_rank]
        sh = a.shards[op.tensor]
        f0, run, _, n = _runs(op, sh, op.src_offset)
        assert n == 1, f"{op.tensor}: a kept block of {n} runs"
        out[(op.src_rank, op.tensor, op.start)] = a.file_ranges(sh.offset + f0, run)
    return out


@pytest.mark.parametrize("kind,nkv,tp,failed,added,ep", [
    ("qwen3_moe", 4, 3, (1,), 0, False),   # 3 -> 2, a middle rank
    ("qwen3_moe", 4, 3, (0,), 0, False),   # rank 0 lost: every survivor's units shift in the view
    ("qwen3", 8, 4, (1, 2), 0, False),     # two at once
    ("qwen3_moe", 4, 3, (2,), 0, True),    # expert parallel: whole experts keep their pages
    ("qwen3", 4, 2, (), 1, False),         # scale-up: the survivors shrink, keeping their pages
])
def test_remapped_migration_keeps_kept_bytes_in_their_file_pages(tmp_path, kind, nkv, tp, failed, added, ep):
    """Issue 27: on page-aligned arenas no kept byte is copied: a survivor's kept rows, columns (the
    column-sharded tensors are stored transposed) and whole tensors are, in the new view, the same
    file pages (same file offsets, checked through each arena's run table and by reading the file
    itself), nothing of the old view is written, and the pages only the old view used are punched
    out."""
    old = ElasticLayout.from_hf_config(page_config(kind, nkv), tp, mlp_unit=8, vocab_unit=8, expert_parallel=ep)
    full = write_checkpoint(tmp_path, old)
    plan = plan_migration(old, ClusterChange(failed=failed, added=added))
    with SafetensorsCheckpoint(tmp_path) as ck:
        arenas = allocate_rank_arenas(old, "old")
        try:
            for r, a in arenas.items():
                load_rank_from_checkpoint(old, r, ck, a)
            assert all(a.page_aligned for a in arenas.values())
            survivors = {r: a for r, a in arenas.items() if r not in failed}
            before = _kept_file_bytes(plan, survivors, survivors)
            assert before
            new, report = CpuExecutor(ck, Topology.single_node(tp + added, read_gbps=1, copy_gbps=4),
                                      in_place=True).run(plan, survivors)
            try:
                assert report.remapped_ranks == len(survivors) == report.in_place_ranks
                assert report.remapped_bytes == report.keep_bytes > 0 and report.copied_keep_bytes == 0
                assert any(op.kind == "keep" and op.dim == 1 for op in plan.tensor_ops())  # columns kept too
                for (s, name, start), ranges in before.items():
                    d = plan.old2new_rank[s]
                    a = new[d]
                    assert a.handle.shm_name == survivors[s].handle.shm_name  # the survivor's own file
                    op = next(o for o in plan.tensor_ops() if o.kind == "keep" and o.src_rank == s
                              and o.tensor == name and o.start == start)
                    sh = a.shards[name]
                    g0, run, _, _ = _runs(op, sh, op.dst_offset)
                    assert a.file_ranges(sh.offset + g0, run) == ranges, f"{name} rows from {start} moved in the file"
                    # the file itself holds the checkpoint's bytes at those offsets
                    want = expected_shard(full, plan.new_layout, d, next(t for t in old.tensors() if t.name == name))
                    if op.dim < 0:
                        blk = want
                    elif op.dim == 0:
                        blk = want[op.dst_offset:op.dst_offset + op.length]
                    else:  # stored transposed: the block's columns, column after column
                        blk = np.ascontiguousarray(want[:, op.dst_offset:op.dst_offset + op.length].T)
                    fd = os.open(f"/dev/shm/{a.handle.shm_name}", os.O_RDONLY)
                    try:
                        got = b"".join(os.pread(fd, n, f) for f, n in ranges)
                    finally:
                        os.close(fd)
                    assert got == blk.tobytes(), f"{name}: the kept pages no longer hold the checkpoint's rows"
                for r in range(plan.new_layout.tp_size):  # and the whole new view is right
                    for t in plan.new_layout.tensors():
                        want = expected_shard(full, plan.new_layout, r, t)
                        if want is not None:
                            np.testing.assert_array_equal(new[r].array(t.name).view(np.float32), want,
                                                          err_msg=f"new rank {r} {t.name}")
                # the old views' pages no survivor keeps went back: each file holds about its view
                for s in survivors:
                    a = new[plan.old2new_rank[s]]
                    held = os.stat(f"/dev/shm/{a.handle.shm_name}").st_blocks * 512
                    assert held <= a.nbytes + 64 * 1024, (held, a.nbytes)
                if added:  # the survivors shrank: what they gave away went back to the kernel
                    assert report.released_bytes > 0
                # another process's view of a remapped arena reads the same bytes (ArenaHandle runs)
                d0 = plan.old2new_rank[min(survivors)]
                other = ShmArena.attach(new[d0].handle)
                try:
                    for name in list(new[d0].shards)[:8]:
                        np.testing.assert_array_equal(other.array(name), new[d0].array(name))
                finally:
                    other.close()
            finally:
                for a in new.values():
                    a.close()
        finally:
            for a in arenas.values():
                a.close()


def test_remapped_failure_leaves_the_old_view_intact(tmp_path):
    """A failure in the middle of a remapped migration (a reload fails) leaves every survivor's old
    view with its bytes, its file its old size, and the old arena its owner: nothing was moved."""
    from sgl_elastic.executor.cpu import InPlaceFailed

    old = ElasticLayout.from_hf_config(page_config(), 3, mlp_unit=8, vocab_unit=8)
    full = write_checkpoint(tmp_path, old)
    plan = plan_migration(old, ClusterChange(failed=(1,)))
    with SafetensorsCheckpoint(tmp_path) as ck:
        arenas = allocate_rank_arenas(old, "old")
        try:
            for r, a in arenas.items():
                load_rank_from_checkpoint(old, r, ck, a)
            survivors = {r: arenas[r] for r in (0, 2)}
            sizes = {r: os.path.getsize(f"/dev/shm/{a.handle.shm_name}") for r, a in survivors.items()}

            def boom(*args, **kwargs):
                raise OSError(28, "injected failure")

            patch = pytest.MonkeyPatch()
            patch.setattr(ck, "read_region", boom)
            try:
                with pytest.raises(InPlaceFailed, match="injected failure") as info:
                    CpuExecutor(ck, Topology.single_node(3, read_gbps=1, copy_gbps=1), in_place=True).run(plan, survivors)
            finally:
                patch.undo()
            assert not info.value.corrupted
            for r, a in survivors.items():
                assert a.owner and os.path.getsize(f"/dev/shm/{a.handle.shm_name}") == sizes[r]
                for t in old.tensors():
                    want = expected_shard(full, old, r, t)
                    if want is not None:
                        np.testing.assert_array_equal(a.array(t.name).view(np.float32), want)
        finally:
            for a in arenas.values():
                a.close()


@pytest.mark.parametrize("size", ["tiny", "bench"])
@pytest.mark.parametrize("family", ["qwen3-moe", "mixtral", "qwen3"])
def test_test_and_bench_models_get_page_aligned_remappable_arenas(family, size):
    """The claim of docs/failover.md: for the test and bench models, in float32 and bfloat16, at every
    tp the CPU daemon serves (1..4, with and without expert parallelism), every rank's arena is placed
    page-aligned, so its failovers remap instead of moving bytes."""
    from sgl_elastic.executor.cpu import _specs
    from sgl_elastic.executor.shm import PAGE
    from sgl_elastic.testing.models import hf_config, model_spec

    for dtype in ("float32", "bfloat16"):
        cfg = hf_config(model_spec(family, size))
        cfg.dtype = dtype
        for tp in (1, 2, 3, 4):
            for ep in ((False, True) if family != "qwen3" else (False,)):
                layout = ElasticLayout.from_hf_config(cfg, tp, expert_parallel=ep)
                for r in range(tp):
                    placed, _ = ShmArena.place(_specs(layout, r))
                    assert all(s.offset % PAGE == 0 for s in placed), (family, size, dtype, tp, ep, r)
