"""The daemon's prefix index stays true across failovers that change which process is rank 0.

Rank 0 mirrors its radix tree into the daemon's index (inserts, and every evicted leaf forgotten
before its KV slots are reused); a rebuilt scheduler restores its tree from that index and reads
the KV those slots hold. A process that became rank 0 because rank 0 died must take the mirror over:
it used to keep the choice it made when it was rank 1 (not mirroring), so its evictions were never
forgotten, the index kept mapping old prompts to slots that newer requests overwrote, and after the
next failover those prompts were answered from someone else's KV.

One server: tiny Qwen3-MoE, float32, ``--tp 3`` and a KV pool of 160 tokens (so requests evict each
other). Prompts A are cached; rank 0 is SIGKILLed (the process of rank 1 becomes rank 0, tp 2);
prompts B evict A's entries; ``add_rank`` (tp 3: every rank restores its tree from the index); A
and B again: every answer equal to HF's greedy tokens.
"""

import os
import signal

import pytest
import requests

from sgl_elastic.testing.clients import admin_status, generate, wait_serving
from sgl_elastic.testing.server import ServerProcess, children_of, stop_and_check_leaks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900), pytest.mark.slow]  # slow tier (docs/testing.md)

TOKEN = "prefix-index-admin-token"
MAX_NEW = 8
A = [[11 + i, 23, 5 + i, 90, 14, 7 * i + 3, 61, 2, 38, 44, 19, 8 + i, 77, 30, 12, 6] for i in range(4)]
B = [[101 + 3 * i, 57, 9 + i, 33, 140 + i, 21, 66, 4, 18 + i, 91, 50, 3, 27 + i, 85, 16, 72] for i in range(8)]


def _kill(url, rank):
    pid = next(r["pid"] for r in admin_status(url, TOKEN)["ranks"] if r["rank"] == rank)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_prefix_index_after_rank_0_moves(tiny_models, hf_tokens):
    want_a, want_b = hf_tokens("qwen3-moe", A, MAX_NEW), hf_tokens("qwen3-moe", B, MAX_NEW)
    srv = ServerProcess(tiny_models["qwen3-moe"], tp_size=3, extra_args=[
        "--dtype", "float32", "--elastic-admin-token", TOKEN, "--elastic-standby", "0",
        "--max-total-tokens", "160"])
    srv.start()
    pids = children_of(srv)
    try:
        url = srv.url
        assert [generate(url, p, MAX_NEW) for p in A] == want_a
        _kill(url, 0)
        wait_serving(url, TOKEN, lambda s: s["tp_size"] == 2, "the failover to tp 2", timeout=240)
        assert [generate(url, p, MAX_NEW) for p in B] == want_b  # A's entries are evicted
        r = requests.post(url + "/elastic/add_rank", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert r.status_code == 202, r.text
        wait_serving(url, TOKEN, lambda s: s["tp_size"] == 3 and not s["pending"], "the scale-up to tp 3",
                     timeout=240)
        got_a = [generate(url, p, MAX_NEW) for p in A]
        got_b = [generate(url, p, MAX_NEW) for p in B]
        assert got_a == want_a, f"prompts A after the index was restored: {got_a} != {want_a}"
        assert got_b == want_b
    finally:
        stop_and_check_leaks(srv, pids)
