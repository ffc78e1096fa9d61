"""State daemon as a real process: loading, zero-copy attach, KV index over the socket, migration,
signals, a dead daemon, a dead client. Every daemon/child is stopped by its pid; no /dev/shm leaks."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sgl_elastic.daemon import DaemonClient, DaemonError, DaemonProcess, DaemonUnavailable
from sgl_elastic.daemon import protocol as P
from sgl_elastic.memory.shm import segments_of_pid
from sgl_elastic.executor.safetensors_io import SafetensorsCheckpoint
from sgl_elastic.layout.geometry import rank_tensors, shard_region
from sgl_elastic.layout import ElasticLayout
from sgl_elastic.planner import ClusterChange, plan_migration
from sgl_elastic.testing.models import build_model


def daemon_segments() -> set[str]:
    """Every shared-memory file of any daemon instance on this host (``...-d<instance>-<kind>-r<rank>``)."""
    return {p for p in glob.glob("/dev/shm/sgle-*") if re.search(r"-d[0-9a-f]{8}-(weights|kv|params)", p)}


def _not_foreign(paths: set[str]) -> set[str]:
    """Drop the segments of daemons that are alive and not ours (another server or test run on this
    host); ours, and those of dead daemons, stay."""
    import psutil

    mine = {c.pid for c in psutil.Process().children(recursive=True)}
    out = set()
    for p in paths:
        m = re.match(r"/dev/shm/sgle-(\d+)-", p)
        pid = int(m.group(1)) if m else -1
        if pid in mine or not psutil.pid_exists(pid):
            out.add(p)
    return out


@pytest.fixture(scope="module", autouse=True)
def no_leaked_segments():
    before = daemon_segments()
    yield
    assert wait_gone(lambda: _not_foreign(daemon_segments() - before)) == set(), "daemon shared memory leaked"


@pytest.fixture(scope="module")
def ckpt():
    return str(build_model("qwen3-moe", "tiny"))


def layout_of(ckpt: str, tp: int, expert_parallel: bool = False) -> ElasticLayout:
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = SimpleNamespace(**json.load(f))
    return ElasticLayout.from_hf_config(cfg, tp, mlp_unit=64, vocab_unit=64, expert_parallel=expert_parallel)


def wait_gone(paths_fn, timeout=5.0):
    deadline = time.monotonic() + timeout
    while paths_fn() and time.monotonic() < deadline:
        time.sleep(0.05)
    return paths_fn()


def _stopped(d) -> None:
    d.stop()
    assert d.proc.poll() is not None
    assert segments_of_pid(d.pid) == [], "daemon left shared-memory segments"
    assert not os.path.exists(d.run_dir)


@pytest.fixture
def daemon():
    d = DaemonProcess.start()
    try:
        yield d
    finally:
        _stopped(d)


@pytest.fixture
def moving_daemon():
    """A daemon whose migrations move a survivor's kept bytes inside its file (``--in-place move``)."""
    d = DaemonProcess.start(in_place="move")
    try:
        yield d
    finally:
        _stopped(d)


@pytest.fixture
def loaded(daemon, ckpt):
    c = daemon.client()
    c.load_model(ckpt, layout_of(ckpt, 2))
    c.wait_ready(60)
    yield daemon, c
    c.close()


def expected_shard(ck: SafetensorsCheckpoint, layout, rank, t, shape):
    assert ck.entry(t.name).dtype == "F32"  # the tiny checkpoints are float32
    out = np.empty(shape, dtype=np.float32)
    ck.read_region(t.name, out, *shard_region(t, layout, rank))
    return torch.from_numpy(out)


def test_load_reads_each_byte_once_and_attach_is_zero_copy(loaded, ckpt):
    d, c = loaded
    s = c.stats()
    layout = layout_of(ckpt, 2)
    with SafetensorsCheckpoint(ckpt) as ck:
        payload = sum(e.nbytes for e in ck.entries.values())
        # 4 KV heads on 2 ranks, replicated norms read once: every payload byte read exactly once.
        assert s.checkpoint_bytes_read == payload
        for rank in (0, 1):
            with c.attach_weights(rank) as a:
                assert a.epoch == 0 and a.instance == s.instance and set(a.tensors) == {t.name for t, _ in rank_tensors(layout, rank)}
                for t, shape in rank_tensors(layout, rank):
                    assert torch.equal(a.tensors[t.name], expected_shard(ck, layout, rank, t, shape)), t.name
                # zero-copy: a write through one mapping is seen through another
                w = a.tensors["model.norm.weight"]
                with c.attach_weights(rank) as b:
                    w[0] = 123.0
                    assert b.tensors["model.norm.weight"][0].item() == 123.0
    assert {r.rank for r in s.ranks} == {0, 1} and s.state == "ready"


def test_tcp_client_without_token_gets_nothing(ckpt):
    with DaemonProcess.start(tcp=True) as d:
        good = d.client()
        assert good.endpoint.startswith("tcp://127.0.0.1:")
        good.load_model(ckpt, layout_of(ckpt, 2))
        good.wait_ready(60)
        for token in ("", "wrong", good._token[:-1]):
            bad = DaemonClient(good.endpoint, token, timeout=5, pid=d.pid)
            for call in (bad.stats, lambda: bad.export_weights(0), lambda: bad.export_kv(0),
                         lambda: bad.kv_match([1, 2]), bad.shutdown):
                with pytest.raises(DaemonError) as e:
                    call()
                assert e.value.code == "unauthorized"
            bad.close()
        assert good.stats().errors == {"unauthorized": 15}
        good.close()
    assert segments_of_pid(d.pid) == []


def test_kv_pool_and_prefix_index_survive_client_replacement(loaded):
    d, c = loaded
    c.alloc_kv(num_layers=2, head_dim=16, num_slots=64, dtype="float32", budget_slots=8, page_size=2)
    with c.attach_kv(1) as kv:
        assert kv.tensors["kv.0"].shape == (2, 64, 2, 16)  # [K/V, slots, this rank's 2 of 4 KV heads, head_dim]
        kv.tensors["kv.1"][0, 10:14] = 7.0
    r = c.kv_insert([5, 6, 7, 8, 9], [10, 11, 12, 13, 14], pin=True)
    assert r.num_new_tokens == 4 and r.pin_id
    c.close()
    # a replacement process: new client, finds the prefix and the KV bytes written by the first
    c2 = d.client()
    m = c2.kv_match([5, 6, 7, 8, 1])
    assert m.num_tokens == 4 and m.slots == [10, 11, 12, 13]
    dump = c2.kv_dump()
    assert dump.page_size == 2 and [(e.token_ids, e.slots) for e in dump.entries] == [([5, 6, 7, 8], [10, 11, 12, 13])]
    with c2.attach_kv(1) as kv:
        assert torch.all(kv.tensors["kv.1"][0, m.slots] == 7.0) and torch.all(kv.tensors["kv.1"][1] == 0)
    # budget 8: inserting 6 more evicts only unpinned KV; the pinned prefix stays
    c2.kv_insert([1, 2, 3, 4], [20, 21, 22, 23])
    with pytest.raises(DaemonError) as e:
        c2.kv_insert([30, 31, 32, 33, 34, 35], [30, 31, 32, 33, 34, 35])
    assert e.value.code == "budget"
    r = c2.kv_insert([30, 31], [30, 31])
    assert sorted(r.evicted_slots) == [22, 23]
    c2.kv_release(1)
    assert sorted(c2.evict_kv(100)) == [10, 11, 12, 13, 20, 21, 30, 31]
    assert c2.stats().kv.cached_slots == 0
    c2.close()


def test_dead_client_releases_pins(loaded, ckpt):
    d, c = loaded
    c.alloc_kv(num_layers=1, head_dim=16, num_slots=16, dtype="float32")
    child = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from sgl_elastic.daemon import DaemonClient
c = DaemonClient.from_run_dir({d.run_dir!r})
c.register(0)
a = c.attach_weights(0)
c.kv_insert([1, 2, 3], [0, 1, 2], pin=True)
print("ok", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ok"
        s = c.stats()
        assert s.kv.pinned_slots == 3 and child.pid in s.ranks[0].pids
    finally:
        child.kill()
        child.wait(10)
    deadline = time.monotonic() + 5
    while c.stats().kv.pinned_slots and time.monotonic() < deadline:
        time.sleep(0.05)
    s = c.stats()
    assert s.kv.pinned_slots == 0 and s.ranks[0].pids == [] and s.kv.cached_slots == 3


@pytest.mark.parametrize("change", [ClusterChange(failed=(1,)), ClusterChange(added=1)], ids=["2->1", "2->3"])
def test_migration_runs_through_executor(loaded, ckpt, change):
    d, c = loaded
    old = layout_of(ckpt, 2)
    c.alloc_kv(num_layers=2, head_dim=16, num_slots=64, dtype="float32")
    old_kv = {r: c.export_kv(r).segments[0].locator for r in range(2)}
    before = c.stats()
    old_segments = segments_of_pid(d.pid)
    plan = plan_migration(old, change)
    summary = c.apply_migration(plan, timeout=60)
    # the next pool of a rank that survives is its old pool's file, regrown (its pages are resident)
    c.alloc_kv(num_layers=2, head_dim=16, num_slots=64, dtype="float32")
    new_kv = {r: c.export_kv(r).segments[0].locator for r in range(plan.new_layout.tp_size)}
    for s_old, d_new in enumerate(plan.old2new_rank):
        if d_new >= 0 and change.failed:
            assert new_kv[d_new] == old_kv[s_old]
    assert old_kv[1] not in new_kv.values() or not change.failed
    old_segments = [p for p in old_segments if os.path.basename(p) not in new_kv.values()]
    s = c.stats()
    assert summary.epoch == s.epoch == 1 and s.state == "ready"
    assert summary.reload_bytes == plan.reload_bytes and summary.file_bytes_read == plan.reload_bytes
    assert s.checkpoint_bytes_read == before.checkpoint_bytes_read + plan.reload_bytes
    # the dead rank's shards are freed; a survivor's file is either freed or regrown in place as
    # its new rank's segment (2 -> 1: rank 0 gains rank 1's units, so it is)
    now = set(segments_of_pid(d.pid))
    weights_now = {ref.locator for r in range(plan.new_layout.tp_size) for ref in c.export_weights(r).segments}
    assert not (set(old_segments) & now) - {f"/dev/shm/{n}" for n in weights_now}, "old shards not freed"
    assert summary.in_place_ranks == sum(1 for n in weights_now if f"/dev/shm/{n}" in old_segments)
    if change.failed:
        assert summary.in_place_ranks == 1 and summary.alloc_bytes < plan.keep_bytes + plan.reload_bytes
    # every survivor's file is remapped, its kept bytes left in their pages (none copied); 2 -> 3: the
    # survivors gave units away, so pages went back to the kernel
    assert summary.remapped_ranks == summary.in_place_ranks == old.tp_size - len(change.failed)
    assert summary.remapped_bytes == plan.keep_bytes
    assert all(ref.runs for r in range(plan.new_layout.tp_size) for ref in c.export_weights(r).segments
               if f"/dev/shm/{ref.locator}" in old_segments)
    if change.added:
        assert summary.released_bytes > 0
    with SafetensorsCheckpoint(ckpt) as ck:
        for rank in range(plan.new_layout.tp_size):
            with c.attach_weights(rank) as a:
                assert a.epoch == 1
                for t, shape in rank_tensors(plan.new_layout, rank):
                    assert torch.equal(a.tensors[t.name], expected_shard(ck, plan.new_layout, rank, t, shape)), t.name
    with pytest.raises(DaemonError) as e:
        c.export_weights(plan.new_layout.tp_size)
    assert e.value.code == "not_found"


def _load_a_copy(daemon, ckpt, tmp_path):
    """A client of ``daemon`` holding a copy of ``ckpt`` (the test may spoil it) at tp 2:
    (client, the copy's path, the layout)."""
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    c = daemon.client()
    old = layout_of(str(copy), 2)
    c.load_model(str(copy), old)
    c.wait_ready(60)
    return c, copy, old


def _spoil(copy) -> None:
    for f in glob.glob(str(copy / "*.safetensors")):
        with open(f, "r+b") as fh:  # keep the header, lose the tensors
            n = int.from_bytes(fh.read(8), "little")
            fh.truncate(8 + n + 64)


def test_migration_failing_after_its_in_place_moves_drops_the_model(moving_daemon, ckpt, tmp_path):
    """The checkpoint loses its data after the load (truncated), so the migration's reloads fail
    while the survivor's kept bytes are being moved in place: the daemon may not claim the old
    shards are intact. It drops the model (state empty, a clear last_error), refuses exports,
    frees every segment, and a new LoadModel works again."""
    daemon = moving_daemon
    c, copy, old = _load_a_copy(daemon, ckpt, tmp_path)
    try:
        _spoil(copy)
        with pytest.raises(DaemonError, match="dropped"):
            c.apply_migration(plan_migration(old, ClusterChange(failed=(1,))), timeout=60)
        s = c.stats()
        assert s.state == "empty" and "partly moved in place" in s.last_error, s
        assert wait_gone(lambda: segments_of_pid(daemon.pid)) == [], "the dropped model's segments were not freed"
        with pytest.raises(DaemonError):
            c.export_weights(0)
        c.load_model(ckpt, layout_of(ckpt, 1))  # the intact checkpoint: serving can start again
        assert c.wait_ready(60).state == "ready"
    finally:
        c.close()


def test_remapped_migration_failing_midway_keeps_the_old_layout(daemon, ckpt, tmp_path):
    """The same spoiled checkpoint under the default remapped migration: the survivor's old view was
    never written (its kept bytes stay in their pages, the rest goes to new ones), so the daemon
    stays READY on the old layout with the survivor's shards intact, and says so."""
    c, copy, old = _load_a_copy(daemon, ckpt, tmp_path)
    try:
        _spoil(copy)
        with pytest.raises(DaemonError, match="survivors' shards are intact"):
            c.apply_migration(plan_migration(old, ClusterChange(failed=(1,))), timeout=60)
        s = c.stats()
        assert s.state == "ready" and s.epoch == 0, s
        with SafetensorsCheckpoint(ckpt) as ck, c.attach_weights(0) as a:
            for t, shape in rank_tensors(old, 0):
                assert torch.equal(a.tensors[t.name], expected_shard(ck, old, 0, t, shape)), t.name
    finally:
        c.close()


def test_failed_ranks_memory_is_freed_before_the_migration_starts(daemon, ckpt, tmp_path):
    """The dead rank's segments (weights, KV) are freed before the migration allocates anything (its
    memory is lost with the device; freed first, its pages are what the migration gets again). Seen
    through a migration that fails before it changes anything (the checkpoint is gone): rank 1's
    segments are gone already, rank 0's are intact and still served, and the daemon is READY."""
    c, copy, old = _load_a_copy(daemon, ckpt, tmp_path)
    try:
        c.alloc_kv(num_layers=2, head_dim=16, num_slots=64, dtype="float32")
        kept = {ref.locator for h in (c.export_weights(0), c.export_kv(0)) for ref in h.segments}
        lost = {ref.locator for h in (c.export_weights(1), c.export_kv(1)) for ref in h.segments}
        for f in glob.glob(str(copy / "*.safetensors")):
            os.unlink(f)
        with pytest.raises(DaemonError, match="survivors' shards are intact"):
            c.apply_migration(plan_migration(old, ClusterChange(failed=(1,))), timeout=60)
        s = c.stats()
        assert s.state == "ready" and s.epoch == 0, s
        names = {os.path.basename(p) for p in segments_of_pid(daemon.pid)}
        assert kept <= names and not lost & names, (kept, lost, names)
        with SafetensorsCheckpoint(ckpt) as ck, c.attach_weights(0) as a:
            for t, shape in rank_tensors(old, 0):
                assert torch.equal(a.tensors[t.name], expected_shard(ck, old, 0, t, shape)), t.name
        with pytest.raises(DaemonError) as e:
            c.export_weights(1)
        assert e.value.code == "not_found"
    finally:
        c.close()


def test_expert_parallel_migration_gives_the_dead_ranks_experts_their_dtype(daemon, ckpt):
    """Under expert parallelism a survivor receives experts that only the dead rank held (reloaded
    from the checkpoint): the new segments must describe them too (they once lacked their dtype, so
    exporting the new rank's handles failed with not_found and the in-place rebuild fell back)."""
    c = daemon.client()
    try:
        old = layout_of(ckpt, 3, expert_parallel=True)
        c.load_model(ckpt, old)
        c.wait_ready(60)
        plan = plan_migration(old, ClusterChange(failed=(1,)))
        lost = set(range(*old.family("experts").rank_dim_range(1)))
        c.apply_migration(plan, timeout=60)
        with SafetensorsCheckpoint(ckpt) as ck:
            for rank in range(plan.new_layout.tp_size):
                with c.attach_weights(rank) as a:
                    held = {t.expert for t, _ in rank_tensors(plan.new_layout, rank) if t.family == "experts"}
                    for t, shape in rank_tensors(plan.new_layout, rank):
                        assert torch.equal(a.tensors[t.name], expected_shard(ck, plan.new_layout, rank, t, shape)), t.name
                    lost -= held
        assert not lost, f"experts {sorted(lost)} of the dead rank went nowhere"
    finally:
        c.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_free_everything(ckpt, sig):
    d = DaemonProcess.start()
    try:
        c = d.client()
        c.load_model(ckpt, layout_of(ckpt, 2))
        c.wait_ready(60)
        c.alloc_kv(num_layers=1, head_dim=16, num_slots=8, dtype="float32")
        assert len(segments_of_pid(d.pid)) == 4
        d.proc.send_signal(sig)
        assert d.proc.wait(10) == 0
        assert segments_of_pid(d.pid) == [] and not os.listdir(d.run_dir)
        c.close()
    finally:
        d.stop()


def test_sigkill_daemon_client_keeps_its_tensors_and_fails_fast(ckpt):
    d = DaemonProcess.start()
    try:
        c = d.client(timeout=30)
        c.load_model(ckpt, layout_of(ckpt, 2))
        c.wait_ready(60)
        a = c.attach_weights(0)
        w = a.tensors["model.layers.0.self_attn.q_proj.weight"].clone()
        os.kill(d.pid, signal.SIGKILL)
        d.proc.wait(10)
        with pytest.raises(DaemonUnavailable, match="gone"):  # an error that says so, not a hang
            c.stats()
        # the resource tracker unlinks the segments; the mapping we hold stays valid
        assert wait_gone(lambda: segments_of_pid(d.pid)) == []
        assert torch.equal(a.tensors["model.layers.0.self_attn.q_proj.weight"], w)
        a.close()
        with pytest.raises(DaemonUnavailable):
            DaemonClient.from_run_dir(d.run_dir).stats()  # stale info file, dead pid
        c.close()
    finally:
        d.stop()
    assert segments_of_pid(d.pid) == []


def test_unreachable_endpoint_times_out_instead_of_hanging(tmp_path):
    c = DaemonClient(f"ipc://{tmp_path}/nothing.sock", "t", timeout=0.3)
    with pytest.raises(DaemonUnavailable, match="no reply"):  # the client's own timeout, not a hang
        c.stats()
    c.close()


def test_run_dir_and_token_are_private(daemon):
    info = json.load(open(os.path.join(daemon.run_dir, "daemon.json")))
    assert os.stat(daemon.run_dir).st_mode & 0o777 == 0o700
    assert os.stat(info["token_file"]).st_mode & 0o777 == 0o600
    token = open(info["token_file"]).read()
    with open(f"/proc/{daemon.pid}/cmdline", "rb") as f:
        assert token.encode() not in f.read()
    assert info["endpoint"] == f"ipc://{daemon.run_dir}/control.sock" and info["pid"] == daemon.pid


def test_cli_loads_at_start_and_rejects_bad_arguments(ckpt):
    with DaemonProcess.start(checkpoint=ckpt, layout=layout_of(ckpt, 1)) as d:
        c = d.client()
        s = c.wait_ready(60)
        assert s.epoch == 0 and [r.rank for r in s.ranks] == [0] and s.checkpoint == os.path.abspath(ckpt)
        with pytest.raises(DaemonError, match="one per daemon"):
            c.load_model(ckpt, layout_of(ckpt, 1))
        c.close()
    assert segments_of_pid(d.pid) == []
    bad = subprocess.run([sys.executable, "-m", "sgl_elastic.daemon", "--checkpoint", ckpt],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "both checkpoint and layout" in bad.stderr


def test_replicated_kv_heads_and_column_blocks_read_once(ckpt):
    """tp=8 over 4 KV heads: KV rows replicated on two ranks each, o_proj/down_proj in column
    blocks: still every payload byte read exactly once, and every shard right."""
    layout = ElasticLayout.from_hf_config(SimpleNamespace(**json.load(open(os.path.join(ckpt, "config.json")))), 8,
                                          mlp_unit=32, vocab_unit=64)
    assert layout.family("attn").replicated
    with DaemonProcess.start(checkpoint=ckpt, layout=layout) as d:
        c = d.client()
        s = c.wait_ready(60)
        with SafetensorsCheckpoint(ckpt) as ck:
            assert s.checkpoint_bytes_read == sum(e.nbytes for e in ck.entries.values())
            for rank in (0, 1, 7):
                with c.attach_weights(rank) as a:
                    for t, shape in rank_tensors(layout, rank):
                        assert torch.equal(a.tensors[t.name], expected_shard(ck, layout, rank, t, shape)), t.name
        c.close()
    assert segments_of_pid(d.pid) == []


def test_restarted_worker_gets_the_same_kv_memory_and_prefixes(loaded):
    from sgl_elastic.daemon.worker import WorkerAttachment, sglang_kv_rows

    d, c = loaded
    geometry = dict(num_layers=2, head_dim=16, size=30, page_size=4, dtype="float32")
    assert sglang_kv_rows(30, 4) == (34, 36)
    w1 = WorkerAttachment.connect(d.run_dir, rank=1)
    weights = w1.attach_weights()
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (32, 128)  # 2 of 4 KV heads x 16
    k, v = w1.kv_buffers(**geometry)
    assert len(k) == 2 and k[0].shape == (34, 2, 16) and v[1].shape == (34, 2, 16)
    k[1][8:12] = 3.0
    c.kv_insert([7, 7, 7, 7], [8, 9, 10, 11])
    w1.close()
    # the "restarted" worker: same geometry -> same memory, the prefix still there
    w2 = WorkerAttachment.connect(d.run_dir, rank=1)
    k2, _ = w2.kv_buffers(**geometry)
    hit = c.kv_match([7, 7, 7, 7, 1])
    assert hit.slots == [8, 9, 10, 11] and torch.all(k2[1][hit.slots] == 3.0)
    with pytest.raises(DaemonError, match="another geometry"):
        w2.kv_buffers(**{**geometry, "size": 60})
    w2.close()


def test_published_params_survive_worker_replacement(loaded):
    """PublishParams -> fill -> CommitParams; a replacement process maps the same memory (no copy)."""
    d, c = loaded
    assert c.attach_params(0) is None  # nothing published yet: not_found -> None
    with pytest.raises(DaemonError, match="PublishParams first"):
        c.commit_params(0)
    seg = c.publish_params(0, [("model.layers.0.qkv_proj.weight", "float32", (64, 32)), ("lm_head.weight", "float32", (4,))])
    with pytest.raises(DaemonError, match="no committed parameters"):
        c._req(P.ExportParams, rank=0)
    seg.tensors["model.layers.0.qkv_proj.weight"].fill_(1.5)
    seg.tensors["lm_head.weight"].copy_(torch.arange(4.0))
    c.commit_params(0)
    with pytest.raises(DaemonError, match="already published"):
        c.publish_params(0, [("x", "float32", (1,))])
    with DaemonClient.from_run_dir(d.run_dir) as other:  # "the restarted worker"
        got = other.attach_params(0)
        assert got is not None
        assert torch.all(got.tensors["model.layers.0.qkv_proj.weight"] == 1.5)
        assert got.tensors["lm_head.weight"].tolist() == [0.0, 1.0, 2.0, 3.0]
        got.tensors["lm_head.weight"][0] = 9.0  # same memory as the publisher's mapping
        assert seg.tensors["lm_head.weight"][0].item() == 9.0
        got.close()
    with pytest.raises(DaemonError, match="unique"):
        c.publish_params(1, [("a", "float32", (1,)), ("a", "float32", (1,))])
    seg.close()


def test_kv_forget_drops_prefixes_using_freed_slots(loaded):
    d, c = loaded
    c.alloc_kv(num_layers=2, head_dim=16, num_slots=64, dtype="float32")
    c.kv_insert([1, 2, 3, 4], [5, 6, 7, 8])
    c.kv_insert([1, 2, 9], [5, 6, 10])
    c.kv_insert([20, 21], [30, 31])
    assert c.kv_forget([6]) == 4  # slot 6 and everything after it: 6, 7, 8, 10
    assert c.kv_match([1, 2, 3, 4]).slots == [5]
    assert c.kv_match([20, 21]).num_tokens == 2
    assert c.kv_forget([6, 40]) == 0  # not held: nothing to drop
    assert c.kv_clear() == 3
    assert c.kv_dump().entries == []


def _kv_code(layer: int, half: int, slots: int, head: int, head_dim: int) -> np.ndarray:
    """What the test writes for KV head ``head`` (global) of every slot: exact in float32."""
    s = np.arange(slots, dtype=np.float32)[:, None]
    d = np.arange(head_dim, dtype=np.float32)[None, :]
    return layer * 1e6 + half * 5e5 + s * 100 + head * 20 + d


@pytest.mark.parametrize("failed,backup", [((1,), True), ((0,), True), ((1,), False)],
                         ids=["kill1-backup", "kill0-backup", "kill1-no-backup"])
def test_kv_pools_and_index_follow_a_failure_through_the_backups(daemon, ckpt, failed, backup):
    """At tp 3 every rank writes its KV heads into its pool and its backup (as the patched SGLang
    does); a rank dies; the migration carries the pools over to tp 2: every new rank's pool holds
    exactly the KV of its new heads at the indexed slots (its own, the other survivors', the dead
    rank's from its backup), and the prefix index is kept. Without backups nothing is carried over."""
    layers, head_dim, slots = 2, 16, 64
    c = daemon.client()
    try:
        old = layout_of(ckpt, 3)
        c.load_model(ckpt, old)
        c.wait_ready(60)
        c.alloc_kv(num_layers=layers, head_dim=head_dim, num_slots=slots, dtype="float32", backup=backup)
        attn = old.family("attn")
        for r in range(3):
            for bk in (False, True) if backup else (False,):
                with c.attach_kv(r, backup=bk) as a:
                    a0, b0 = attn.rank_kv_head_range(r)
                    for layer in range(layers):
                        t = a.tensors[f"kv.{layer}"]
                        for h in range(a0, b0):
                            for half in (0, 1):
                                t[half, :, h - a0] = torch.from_numpy(_kv_code(layer, half, slots, h, head_dim))
        if not backup:
            with pytest.raises(DaemonError) as e:
                c.export_kv(0, backup=True)
            assert e.value.code == "not_found"
        c.kv_insert(list(range(100, 110)), list(range(10)))
        plan = plan_migration(old, ClusterChange(failed=failed))
        summary = c.apply_migration(plan, timeout=60)
        if not backup:
            assert summary.kv_kept_slots == 0 and c.stats().kv.cached_slots == 0
            return
        assert summary.kv_kept_slots == 10
        # the rebuilt ranks ask for the same geometry: the carried pools and the index are theirs
        detail = c.alloc_kv(num_layers=layers, head_dim=head_dim, num_slots=slots, dtype="float32", backup=True)
        assert "already held" in detail
        assert c.kv_match(list(range(100, 110))).num_tokens == 10
        new_attn = plan.new_layout.family("attn")
        for d in range(plan.new_layout.tp_size):
            with c.attach_kv(d) as a:
                a0, b0 = new_attn.rank_kv_head_range(d)
                assert a.tensors["kv.0"].shape[2] == b0 - a0
                for layer in range(layers):
                    t = a.tensors[f"kv.{layer}"]
                    for h in range(a0, b0):
                        for half in (0, 1):
                            np.testing.assert_array_equal(t[half, :10, h - a0].numpy(),  # the indexed slots
                                                          _kv_code(layer, half, slots, h, head_dim)[:10],
                                                          err_msg=f"rank {d} layer {layer} head {h} half {half}")
            with c.attach_kv(d, backup=True):  # a new backup for the next failure
                pass
    finally:
        c.close()
