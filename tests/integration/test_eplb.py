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

import json
import os
import signal

import pytest
import requests

from sgl_elastic.testing.clients import BackgroundLoad, admin_status, generate, wait_serving, wait_state

from tests.integration.conftest import AUTH, MAX_NEW, PROMPTS, TOKEN

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600), pytest.mark.slow]  # slow tier (docs/testing.md)

FAMILY = "mixtral"
LONG = 64


@pytest.fixture(scope="module")
def server(serve):
    with serve(FAMILY, 3, "--ep-size", "3", "--elastic-eplb-interval", "2") as srv:
        yield srv


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


def _moves(st):
    return [r for r in st["recoveries"] if not r["failed_ranks"]]


def test_periodic_rebalance_moves_experts_by_peer_copies(server, want, want_long):
    """The first periodic check after SGLang's warm-up request already finds loads to place; the
    requests run over further checks (a move happens while they do when their loads differ enough)."""
    url = server.url
    load = _Load(url)
    try:
        load.wait_started()
        # at least two periodic checks under load: one that moved experts, and one after that move
        # (each check leaves a new ``eplb.last``)
        seen_after_move = set()

        def two_checks(st):
            if _moves(st) and st["eplb"]["placed"] and st["state"] == "serving":
                seen_after_move.add(json.dumps(st["eplb"]["last"], sort_keys=True))
            return len(seen_after_move) >= 2

        st = wait_state(url, TOKEN, two_checks, "a periodic rebalance moved the experts, and a check after it",
                        timeout=120, interval=0.2)
    finally:
        load.finish(want, want_long)
    assert st["eplb"]["enabled"] and st["eplb"]["interval_s"] == 2.0 and st["tp_size"] == 3
    moves = _moves(st)
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
    before = _status(url)
    n = len(before["recoveries"])
    r = requests.post(url + "/elastic/rebalance", headers=AUTH, timeout=30)
    assert r.status_code in (202, 409), r.text  # 409: a periodic one runs right now
    # a decision after the request (the periodic checks, every 2 s, also decide: any new one will do)
    st = _wait(url, lambda s: s["eplb"]["last"] != before["eplb"]["last"]
               and s["eplb"]["last"].get("decision") in ("moved", "skipped"), "a rebalance decision")
    assert st["tp_size"] == 3, st
    new = st["recoveries"][n:]
    assert all(r["outcome"] == "ok" and not r["failed_ranks"] for r in new), new  # a move is a regroup
    if st["eplb"]["last"]["decision"] == "moved":
        assert new, st["recoveries"]  # experts moved: in a recovery with no failure


def test_failure_of_a_placed_layout_reloads_only_what_died(server, want, want_long):
    url = server.url
    st = _status(url)
    assert st["eplb"]["placed"]
    n = len(st["recoveries"])
    victim = next(r["pid"] for r in st["ranks"] if r["rank"] == 1)
    load = _Load(url)
    try:
        load.wait_started()
        os.kill(victim, signal.SIGKILL)
        st = _wait(url, lambda s: s["tp_size"] == 2 and len(s["recoveries"]) > n, "the recovery at tp 2")
        load.wait_served(load.mark(), long=1, plain=len(PROMPTS))  # requests resumed and new ones served at tp 2
    finally:
        load.finish(want, want_long)
    rec = next(r for r in st["recoveries"][n:] if r["failed_ranks"])
    assert rec["outcome"] == "ok" and rec["failed_ranks"] == [1] and rec["tp_after"] == 2
    m = rec["migration"]
    # the dead rank's shards, and nothing else, read again: no survivor held them
    assert m["reload_bytes"] == m["file_bytes_read"] == m["lower_bound_reload_bytes"] > 0
    assert [_generate(url, p) for p in PROMPTS] == want
