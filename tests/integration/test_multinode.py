"""SGLang's multi-node launch through ``sgl_elastic.launch_server``: tp 4 over two nodes of this
machine (2 + 2 ranks), ``--nnodes 2 --node-rank 0|1 --dist-init-addr 127.0.0.1:PORT``, with
in-place failover across the nodes.

Node 1 runs in its own IPC and mount namespaces (a private ``/dev/shm``) on 127.0.0.2; each node's
state daemon holds that node's ranks only, and the daemons move bytes between them over the
transfer engine (TCP). One server, under load (long streams, plain requests, a /health probe),
goes through: a rank on node 1 dies mid-stream (tp 3, both daemons migrate); rank 0 dies (tp 2,
node 0's other rank takes over the intake); node 1 dies whole (its process group SIGKILLed: tp 1
on node 0, node 1's share reloaded from node 0's checkpoint). Checked: every answer equals HF's
greedy tokens (float32), no request fails, /health never does, the isolation (namespaces, where
each daemon's segments live, which ranks it loaded), and that stopping node 0 leaves no process
and no daemon segment. The default tier runs Qwen3-MoE with expert parallelism; Mixtral runs
under ``slow``.
"""

from __future__ import annotations

import os
import re

import pytest
from transformers import AutoTokenizer

import signal

from sgl_elastic.testing.clients import BackgroundLoad, admin_status, generate, wait_tp
from sgl_elastic.testing.nodes import MultiNodeServer, can_isolate
from sgl_elastic.testing.server import alive

PROMPTS = ["hello world, the server", "explain why the expert"]
MAX_NEW = 12
LONG = 48
TOKEN = "multinode-test-token"


def _ipc_ns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/ipc")


def _mnt_ns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


def _nodes_of(st: dict) -> list[int]:
    return [r["node"] for r in st["ranks"]]


@pytest.mark.parametrize("family", ["qwen3-moe", pytest.param("mixtral", marks=pytest.mark.slow)])
@pytest.mark.timeout(1200)
def test_tp4_over_two_nodes_fails_over_across_nodes(family, tiny_models, hf_tokens):
    path = str(tiny_models[family])
    tok = AutoTokenizer.from_pretrained(path)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    want = [list(e) for e in hf_tokens(family, tuple(map(tuple, ids)), MAX_NEW)]
    want_long = [list(e) for e in hf_tokens(family, tuple(map(tuple, ids)), LONG)]
    srv = MultiNodeServer(path, 4, 2, ["--dtype", "float32", "--ep-size", "4", "--elastic-admin-token", TOKEN])
    with srv:
        assert [generate(srv.url, x, MAX_NEW, timeout=120) for x in ids] == want
        assert generate(srv.url, ids[0], MAX_NEW, stream=True, timeout=120) == want[0]

        logs = [n.log_path.read_text(errors="replace") for n in srv.nodes]
        for k, log in enumerate(logs):
            ranks = [2 * k, 2 * k + 1]
            assert f"for this node's rank(s) {ranks} of 4" in log, f"node {k}'s daemon did not load ranks {ranks}"
        dpid = [int(re.search(r"daemon pid (\d+) started", log).group(1)) for log in logs]
        # node 0's /dev/shm has node 0's daemon segments and none of node 1's
        names = os.listdir("/dev/shm")
        assert any(n.startswith(f"sgle-{dpid[0]}-") for n in names)
        assert not any(n.startswith(f"sgle-{dpid[1]}-") for n in names)
        if srv.isolated:
            assert _ipc_ns(dpid[1]) != _ipc_ns(dpid[0]) == _ipc_ns(os.getpid())
            assert _mnt_ns(dpid[1]) != _mnt_ns(dpid[0])
        st = admin_status(srv.url, TOKEN)
        assert _nodes_of(st) == [0, 0, 1, 1]
        pids = srv.note()

        load = BackgroundLoad(srv.url, ids, MAX_NEW, LONG)
        try:
            load.wait_started()
            # 1. a rank on node 1 dies mid-stream: both nodes' daemons build their new ranks
            os.kill(st["ranks"][3]["pid"], signal.SIGKILL)
            st = wait_tp(srv.url, TOKEN, 3)
            rec = st["recoveries"][-1]
            assert rec["failed_ranks"] == [3] and rec["outcome"] == "ok", rec
            assert rec["migration"]["nodes"] == 2 and rec["migration"]["dead_nodes"] == 0, rec["migration"]
            assert _nodes_of(st) == [0, 0, 1]
            mark = load.mark()
            load.wait_served(mark)
            # 2. rank 0 dies: node 0's other rank takes over the intake, node 1's rank stays
            os.kill(st["ranks"][0]["pid"], signal.SIGKILL)
            st = wait_tp(srv.url, TOKEN, 2)
            assert st["recoveries"][-1]["failed_ranks"] == [0] and _nodes_of(st) == [0, 1]
            mark = load.mark()
            load.wait_served(mark)
            # 3. node 1 dies whole (its launcher, scheduler and daemon together)
            srv.nodes[1].kill()
            st = wait_tp(srv.url, TOKEN, 1)
            rec = st["recoveries"][-1]
            assert rec["outcome"] == "ok" and rec["migration"]["dead_nodes"] == 1, rec
            assert rec["migration"]["remote_bytes"] == 0 and rec["migration"]["nodes"] == 1
            assert _nodes_of(st) == [0]
            mark = load.mark()
            load.wait_served(mark)
        finally:
            load.stop.set()
        load.finish(want, want_long)
        assert st["requests"]["failed_at_recovery"] == 0
        assert [generate(srv.url, x, MAX_NEW, timeout=120) for x in ids] == want
        pids |= srv.note()
    assert not alive(pids), f"processes left running: {alive(pids)}"
    names = os.listdir("/dev/shm")
    assert not [n for n in names if n.startswith(f"sgle-{dpid[0]}-")], "node 0's daemon left segments"


def test_namespaces_are_available_here():
    """The isolation the multi-node tests rely on (root, ``unshare``): say so when it is missing."""
    if os.geteuid() != 0:
        pytest.skip("not root: nodes share /dev/shm and are kept apart by node-scoped names only")
    assert can_isolate()
