"""Two state daemons, one per node, migrate one layout together: each builds its own node's new
ranks, reading what the other node's survivors hold over Mooncake's transfer engine (TCP) and
the rest from its own checkpoint. Node 1's daemon runs in its own IPC and mount namespaces with a
private ``/dev/shm`` (when this machine allows it): no byte can pass through shared memory.

Checked: every new rank's tensors equal the checkpoint's (node 0's by attaching them; node 1's by
attaching them when it shares this /dev/shm), the bytes read from the peer match
the plan's cross-node copies, and a peer that dies before the migration is survived: its bytes are
reloaded instead (``LinkFailed`` -> reload), the result still exact.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sgl_elastic.daemon.launch import DaemonProcess
from sgl_elastic.executor.remote import transfer_unavailable
from sgl_elastic.executor.safetensors_io import SafetensorsCheckpoint
from sgl_elastic.layout import ElasticLayout
from sgl_elastic.layout.geometry import rank_tensors, shard_region
from sgl_elastic.planner import PEER, ClusterChange, Topology, plan_migration
from sgl_elastic.testing.models import build_model
from sgl_elastic.testing.nodes import isolation_prefix

pytestmark = pytest.mark.skipif(transfer_unavailable() is not None, reason=str(transfer_unavailable()))

NODE_OF_SLOT = [0, 0, 1, 1]


@pytest.fixture(scope="module")
def ckpt():
    return str(build_model("qwen3-moe", "tiny"))


def layout_of(ckpt: str, tp: int) -> ElasticLayout:
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = SimpleNamespace(**json.load(f))
    return ElasticLayout.from_hf_config(cfg, tp, mlp_unit=64, vocab_unit=64)


@pytest.fixture
def nodes(ckpt):
    layout = layout_of(ckpt, 4)
    a = DaemonProcess.start(tcp=True, checkpoint=ckpt, layout=layout, ranks=[0, 1], node_host="127.0.0.1")
    b = DaemonProcess.start(tcp=True, checkpoint=ckpt, layout=layout, ranks=[2, 3], node_host="127.0.0.2",
                            wrap=isolation_prefix(), timeout=60)
    ca, cb = a.client(), b.client()
    try:
        ca.wait_ready(120)
        cb.wait_ready(120)
        yield layout, (a, ca), (b, cb)
    finally:
        for c in (ca, cb):
            c.close()
        for d in (a, b):
            d.stop()


def expected(ck, layout, rank, t, shape):
    out = np.empty(shape, dtype=np.float32)
    ck.read_region(t.name, out, *shard_region(t, layout, rank))
    return torch.from_numpy(out)


def _plan(layout, failed):
    topo = Topology.nodes(NODE_OF_SLOT, intra_gbps=5.0, inter_gbps=5.0, host_gbps=1.0)
    plan = plan_migration(layout, ClusterChange(failed=failed), topo, source_choice="peer")
    mine = {k: [r for r in range(plan.new_layout.tp_size) if NODE_OF_SLOT[plan.new2slot[r]] == k] for k in (0, 1)}
    cross = {k: sum(op.nbytes for op in plan.ops if op.kind == PEER and op.stage == 0
                    and NODE_OF_SLOT[op.src_slot] != k and op.dst_rank in mine[k]) for k in (0, 1)}
    return plan, mine, cross


def test_two_daemons_migrate_together_over_the_transfer_engine(nodes, ckpt):
    layout, (a, ca), (b, cb) = nodes
    plan, mine, cross = _plan(layout, (3,))
    assert cross[0] > 0, "the plan copies nothing across nodes: the test would prove nothing"
    ra, rb = ca.export_remote(), cb.export_remote()
    assert ra.addr.startswith("127.0.0.1:") and rb.addr.startswith("127.0.0.2:")
    from sgl_elastic.daemon.protocol import decode_remote

    remote_a, remote_b = decode_remote(ra.arenas), decode_remote(rb.arenas)
    assert set(remote_a) == {0, 1} and set(remote_b) == {2, 3}
    # each names the other node's survivors (rank 3 is dead: node 1 offers only rank 2)
    ea = ca.start_migration(plan, ranks=mine[0], remote={2: remote_b[2]}, hold_old=True)
    eb = cb.start_migration(plan, ranks=mine[1], remote=remote_a, hold_old=True)
    sa, sb = ca.wait_ready(120, epoch=ea + 1), cb.wait_ready(120, epoch=eb + 1)
    ma, mb = sa.last_migration, sb.last_migration
    assert ma.remote_bytes == cross[0] and mb.remote_bytes == cross[1] and ma.rerouted_bytes == 0
    node_reload = {k: sum(op.nbytes for op in plan.ops if op.kind == "reload" and op.dst_rank in mine[k]) for k in (0, 1)}
    assert ma.file_bytes_read == node_reload[0] and mb.file_bytes_read == node_reload[1]
    ca.release_old()
    cb.release_old()
    assert {r.rank for r in ca.stats().ranks if r.weight_bytes} == set(mine[0])
    assert {r.rank for r in cb.stats().ranks if r.weight_bytes} == set(mine[1])
    with SafetensorsCheckpoint(ckpt) as ck:
        for rank in mine[0]:
            with ca.attach_weights(rank) as w:
                for t, shape in rank_tensors(plan.new_layout, rank):
                    assert torch.equal(w.tensors[t.name], expected(ck, plan.new_layout, rank, t, shape)), t.name
    if not isolation_prefix():  # node 1's shared memory is this namespace's: check its ranks too
        with SafetensorsCheckpoint(ckpt) as ck:
            for rank in mine[1]:
                with cb.attach_weights(rank) as w:
                    for t, shape in rank_tensors(plan.new_layout, rank):
                        assert torch.equal(w.tensors[t.name], expected(ck, plan.new_layout, rank, t, shape))
    else:
        with pytest.raises(Exception):  # its segments are not in this /dev/shm
            cb.attach_weights(mine[1][0])


def test_a_peer_that_is_gone_is_survived_by_reloading_its_share(nodes, ckpt):
    layout, (a, ca), (b, cb) = nodes
    plan, mine, cross = _plan(layout, (3,))
    remote_b = __import__("sgl_elastic.daemon.protocol", fromlist=["x"]).decode_remote(cb.export_remote().arenas)
    ca.export_remote()
    b.proc.kill()  # node 1 is gone (its daemon with it) before node 0 reads from it
    b.proc.wait(10)
    epoch = ca.start_migration(plan, ranks=mine[0], remote={2: remote_b[2]}, hold_old=True)
    m = ca.wait_ready(180, epoch=epoch + 1).last_migration
    assert m.remote_bytes == 0 and m.rerouted_bytes == cross[0] > 0
    ca.release_old()
    with SafetensorsCheckpoint(ckpt) as ck:
        for rank in mine[0]:
            with ca.attach_weights(rank) as w:
                for t, shape in rank_tensors(plan.new_layout, rank):
                    assert torch.equal(w.tensors[t.name], expected(ck, plan.new_layout, rank, t, shape)), t.name
