"""Expert parallelism down to one rank and back up, with and without redundant experts (float32).

The state a user reaches after a few failures: ``--tp 4 --ep-size 4`` (``--elastic-redundant-experts
4``: 12 slots, 3 per rank, a ring of copies), then rank 0, rank 2 and rank 1 are SIGKILLed in turn
while requests stream (4 -> 3 -> 2 -> 1), then ``POST /elastic/add_rank`` (1 -> 2). At every step
each greedy answer equals HF's on the same weights. At tp 1 the one rank left holds every expert in
the slot order the survivors kept (not SGLang's ascending order), so its expert map must follow
the layout: SGLang's own tp-1 layer read expert ``e``'s weights from slot ``e`` and every answer
changed. Mixtral with copies is in the default tier; the other three combinations are ``slow``.
"""

import os
import signal

import pytest
import requests

from sgl_elastic.testing.clients import BackgroundLoad, admin_status, generate, wait_serving

from tests.integration.conftest import AUTH, PROMPTS, TOKEN

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MAX_NEW, LONG = 16, 48

CASES = [
    pytest.param("mixtral", 4, id="mixtral-redundant"),
    pytest.param("qwen3-moe", 0, id="qwen3moe", marks=pytest.mark.slow),
    pytest.param("mixtral", 0, id="mixtral", marks=pytest.mark.slow),
    pytest.param("qwen3-moe", 4, id="qwen3moe-redundant", marks=pytest.mark.slow),
]


def _wait(url, pred, what):
    try:
        return wait_serving(url, TOKEN, pred, what, timeout=180)
    except AssertionError as e:
        pytest.fail(str(e))


@pytest.mark.parametrize("family,redundant", CASES)
def test_failures_down_to_one_rank_then_add_rank(serve, hf_tokens, family, redundant):
    want, want_long = hf_tokens(family, PROMPTS, MAX_NEW), hf_tokens(family, PROMPTS[:2], LONG)
    extra = ["--ep-size", "4", "--elastic-standby", "0"]
    if redundant:
        extra += ["--elastic-redundant-experts", str(redundant)]
    with serve(family, 4, *extra) as srv:
        url = srv.url
        st = admin_status(url, TOKEN)
        assert st["eplb"]["redundant"] == redundant and st["tp_size"] == 4
        assert [generate(url, p, MAX_NEW) for p in PROMPTS] == want, "tp 4 before any failure"
        for victim, tp in ((0, 4), (2, 3), (1, 2)):
            st = admin_status(url, TOKEN)
            n = len(st["recoveries"])
            pid = next(r["pid"] for r in st["ranks"] if r["rank"] == victim)
            load = BackgroundLoad(url, PROMPTS, MAX_NEW, LONG)
            try:
                load.wait_started()
                os.kill(pid, signal.SIGKILL)
                st = _wait(url, lambda s: s["tp_size"] == tp - 1 and len(s["recoveries"]) > n,
                           f"the recovery from rank {victim}'s failure at tp {tp - 1}")
            finally:
                load.finish(want, want_long)
            rec = st["recoveries"][n]
            assert rec["outcome"] == "ok" and rec["failed_ranks"] == [victim], rec
            got = [generate(url, p, MAX_NEW) for p in PROMPTS]
            assert got == want, f"tp {tp - 1} after rank {victim} died: answers differ from HF's"
        r = requests.post(url + "/elastic/add_rank", headers=AUTH, timeout=30)
        assert r.status_code == 202, r.text
        _wait(url, lambda s: s["tp_size"] == 2, "the scale-up to tp 2")
        assert [generate(url, p, MAX_NEW) for p in PROMPTS] == want, "tp 2 after add_rank"
