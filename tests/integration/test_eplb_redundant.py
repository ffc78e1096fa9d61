"""Redundant experts on a live server (Mixtral tiny, tp 3, expert parallelism, 6 redundant slots, float32).

One server with ``--elastic-redundant-experts 6``: 14 expert slots (5, 5, 4): blocks of 3, 3 and 2
experts, each rank's other slots holding copies of the experts after its block (experts 0, 1, 3, 4,
6, 7 start with two copies). In order:
1. every routed token goes to one copy of its expert: greedy tokens equal HF's (a token sent to
   both copies, or to the wrong slot, would change them);
2. rank 1 (experts 3 to 7) dies mid-stream: every request completes with HF's tokens, and the
   recovery reads from the checkpoint exactly the lower bound, which counts only expert 5 (the others
   live on in copies), less than the same failure without redundant slots;
3. a rebalance at tp 2 (``POST /elastic/rebalance``) places the copies by the loads, by peer
   copies only, in place (a kept expert keeps its slot), and the tokens stay HF's; then the same
   with SGLang's DeepSeek EPLB (``{"algorithm": "deepseek"}``).
After the server stops: none of its processes and none of its daemon's /dev/shm segments remain.
"""

import os
import signal

import pytest
import requests

from sgl_elastic.testing.clients import BackgroundLoad, admin_status, generate, wait_serving

from tests.integration.conftest import AUTH, MAX_NEW, PROMPTS, TOKEN

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600), pytest.mark.slow]  # slow tier (docs/testing.md)

FAMILY = "mixtral"
LONG = 64


@pytest.fixture(scope="module")
def server(serve):
    with serve(FAMILY, 3, "--ep-size", "3", "--elastic-redundant-experts", "6") as srv:
        yield srv


def _wait(url, pred, what):
    try:
        return wait_serving(url, TOKEN, pred, what)
    except AssertionError as e:
        pytest.fail(str(e))


def _lower_bounds(model_path):
    """The planner's reload lower bound for rank 1's failure from the start layout, with and without
    the redundant slots."""
    from transformers import AutoConfig

    from sgl_elastic.layout import ElasticLayout
    from sgl_elastic.planner import ClusterChange, plan_migration

    cfg = AutoConfig.from_pretrained(model_path)
    out = {}
    for red in (6, 0):
        lay = ElasticLayout.from_hf_config(cfg, 3, expert_parallel=True, redundant_experts=red)
        out[red] = plan_migration(lay, ClusterChange(failed=(1,))).lower_bound_reload_bytes
    return out


def test_copies_serve_hf_tokens(server, want):
    st = admin_status(server.url, TOKEN)
    assert st["eplb"]["redundant"] == 6 and st["eplb"]["placed"] and st["tp_size"] == 3
    assert [generate(server.url, p, MAX_NEW) for p in PROMPTS] == want


def test_failure_reloads_only_experts_without_a_surviving_copy(server, want, want_long, tiny_models):
    url = server.url
    st = admin_status(url, TOKEN)
    n = len(st["recoveries"])
    victim = next(r["pid"] for r in st["ranks"] if r["rank"] == 1)
    load = BackgroundLoad(url, PROMPTS, MAX_NEW, LONG)
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
    bounds = _lower_bounds(str(tiny_models["mixtral"]))
    assert m["reload_bytes"] == m["file_bytes_read"] == m["lower_bound_reload_bytes"] == bounds[6] < bounds[0]
    assert st["eplb"]["redundant"] == 6
    assert [generate(url, p, MAX_NEW) for p in PROMPTS] == want


def test_rebalance_places_copies_by_peer_copies(server, want):
    url = server.url
    for p in PROMPTS:  # loads since the last placement
        generate(url, p, MAX_NEW)
    n = len(admin_status(url, TOKEN)["recoveries"])
    r = requests.post(url + "/elastic/rebalance", headers=AUTH, timeout=30)
    assert r.status_code == 202, r.text
    st = _wait(url, lambda s: s["eplb"]["last"].get("decision") in ("moved", "skipped", "failed"), "a rebalance decision")
    last = st["eplb"]["last"]  # the survivors kept what they held: the loads now place the copies better
    assert last["decision"] == "moved" and last["imbalance_after"] < last["imbalance_before"], last
    (rec,) = st["recoveries"][n:]
    assert rec["outcome"] == "ok" and not rec["failed_ranks"] and rec["tp_after"] == 2
    assert rec["migration"]["reload_bytes"] == 0 < rec["migration"]["peer_bytes"]
    # every kept expert keeps its slot, so both ranks' arenas are rewritten in place (no new shard)
    assert rec["migration"]["in_place_ranks"] == 2
    assert [generate(url, p, MAX_NEW) for p in PROMPTS] == want


def test_rebalance_with_a_baseline_algorithm(server, want):
    """``{"algorithm": "deepseek"}`` applies SGLang's DeepSeek EPLB (7 + 7 slots: equal, as it needs);
    a bad body or algorithm gets 400 and changes nothing."""
    url, auth = server.url, AUTH
    n = len(admin_status(url, TOKEN)["recoveries"])
    for body, code in (("not json", 400), ('{"algorithm": "magic"}', 400), ('{"algorithm": 3}', 400)):
        r = requests.post(url + "/elastic/rebalance", headers=auth, data=body, timeout=30)
        assert r.status_code == code and "algorithm" in r.json()["error"], r.text
    assert len(admin_status(url, TOKEN)["recoveries"]) == n
    for p in PROMPTS:
        generate(url, p, MAX_NEW)
    r = requests.post(url + "/elastic/rebalance", headers=auth, json={"algorithm": "deepseek"}, timeout=30)
    assert r.status_code == 202, r.text
    st = _wait(url, lambda s: s["eplb"]["last"].get("algorithm") == "deepseek"
               and s["eplb"]["last"].get("decision") in ("moved", "skipped", "failed"), "the deepseek rebalance")
    assert st["eplb"]["last"]["decision"] in ("moved", "skipped"), st["eplb"]["last"]
    new = st["recoveries"][n:]
    assert bool(new) == (st["eplb"]["last"]["decision"] == "moved"), (st["eplb"]["last"], new)  # a move is a recovery
    assert all(rec["outcome"] == "ok" and rec["migration"]["reload_bytes"] == 0 for rec in new), new
    assert [generate(url, p, MAX_NEW) for p in PROMPTS] == want
