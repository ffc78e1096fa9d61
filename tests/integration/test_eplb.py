"""Load-driven expert placement on a live server (Mixtral tiny, tp 3, expert parallelism, float32).

One server started with ``--elastic-eplb-interval 2``, in order:
1. requests run over periodic rebalances that move experts (no failure: the ranks regroup): every
   request, the long streams included, ends with HF's greedy tokens; /health never fails;
   /elastic/status shows the placed experts and recoveries with no failed rank that read nothing
   from the checkpoint (peer copies only);
2. ``POST /elastic/rebalance`` refuses a missing token (401) and then is accepted (202);
3. a rank dies mid-stream: the survivors take its experts (placed by the loads again), every
   request completes with HF's tokens, and the lost rank's experts are the only expert bytes reloaded.
After the server stops: none of its processes and none of its daemon's /dev/shm segments remain.
"""

import os
import signal
import time

import pytest
import requests

from sgl_elastic.testing.clients import BackgroundLoad, admin_status, generate, wait_serving
from sgl_elastic.testing.server import ServerProcess, children_of, stop_and_check_leaks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600), pytest.mark.slow]  # slow tier (docs/testing.md)

TOKEN = "eplb-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS = [[1, 5, 9, 33, 70, 100], [200, 3, 4], [42, 17], [7, 8, 9, 10]]
MAX_NEW, LONG = 24, 64


@pytest.fixture(scope="module")
def want(hf_tokens):
    return hf_tokens("mixtral", PROMPTS, MAX_NEW)


@pytest.fixture(scope="module")
def want_long(hf_tokens):
    return hf_tokens("mixtral", PROMPTS[:2], LONG)


@pytest.fixture(scope="module")
def server(tiny_models):
    srv = ServerProcess(tiny_models["mixtral"], tp_size=3, extra_args=[
        "--dtype", "float32", "--elastic-admin-token", TOKEN, "--ep-size", "3", "--elastic-eplb-interval", "2"])
    srv.start()
    pids = children_of(srv)
    yield srv
    assert stop_and_check_leaks(srv, pids) is not None


def _generate(url, ids, n=MAX_NEW, stream=False):
    return generate(url, ids, n, stream=stream)


def _status(url):
    return admin_status(url, TOKEN)


def _wait(url, pred, what, timeout=90):
    try:
        return wait_serving(url, TOKEN, pred, what, timeout)
    except AssertionError as e:
        pytest.fail(str(e))


def _Load(url):
    return BackgroundLoad(url, PROMPTS, MAX_NEW, LONG)


def test_periodic_rebalance_moves_experts_by_peer_copies(server, want, want_long):
    """The first periodic check after SGLang's warm-up request already finds loads to place; the
    requests run over further checks (a move happens while they do when their loads differ enough)."""
    url = server.url
    load = _Load(url)
    try:
        time.sleep(6.0)  # at least two periodic checks under load
        st = _wait(url, lambda s: s["eplb"]["placed"], "a periodic rebalance placed the experts")
    finally:
        load.finish(want, want_long)
    assert st["eplb"]["enabled"] and st["eplb"]["interval_s"] == 2.0 and st["tp_size"] == 3
    moves = [r for r in st["recoveries"] if not r["failed_ranks"]]
    assert moves and all(r["outcome"] == "ok" and r["reason"].startswith("expert rebalance") for r in moves)
    for r in moves:  # every expert a rank gains comes from the rank that held it: nothing read from disk
        assert r["migration"]["reload_bytes"] == 0 < r["migration"]["peer_bytes"] and r["tp_after"] == 3
    last = st["eplb"]["last"]
    assert last["imbalance_after"] <= last["imbalance_before"]
    assert [_generate(url, p) for p in PROMPTS] == want  # served from the placed experts


def test_rebalance_endpoint_needs_the_token(server):
    url = server.url
    assert requests.post(url + "/elastic/rebalance", timeout=30).status_code == 401
    assert requests.post(url + "/elastic/rebalance", headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    _generate(url, PROMPTS[0])  # some loads since the last placement
    n = len(_status(url)["recoveries"])
    r = requests.post(url + "/elastic/rebalance", headers=AUTH, timeout=30)
    assert r.status_code in (202, 409), r.text  # 409: a periodic one runs right now
    st = _wait(url, lambda s: s["eplb"]["last"].get("decision") in ("moved", "skipped"), "a rebalance decision")
    assert len(st["recoveries"]) >= n and st["tp_size"] == 3


def test_failure_of_a_placed_layout_reloads_only_what_died(server, want, want_long):
    url = server.url
    st = _status(url)
    assert st["eplb"]["placed"]
    n = len(st["recoveries"])
    victim = next(r["pid"] for r in st["ranks"] if r["rank"] == 1)
    load = _Load(url)
    try:
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        st = _wait(url, lambda s: s["tp_size"] == 2 and len(s["recoveries"]) > n, "the recovery at tp 2")
        time.sleep(1.0)  # requests resumed and new ones served at tp 2
    finally:
        load.finish(want, want_long)
    rec = next(r for r in st["recoveries"][n:] if r["failed_ranks"])
    assert rec["outcome"] == "ok" and rec["failed_ranks"] == [1] and rec["tp_after"] == 2
    m = rec["migration"]
    # the dead rank's shards, and nothing else, read again: no survivor held them
    assert m["reload_bytes"] == m["file_bytes_read"] == m["lower_bound_reload_bytes"] > 0
    assert [_generate(url, p) for p in PROMPTS] == want
