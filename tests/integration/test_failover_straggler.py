"""A survivor that cannot be reconfigured in time is fenced, and the recovery goes on without it.

Tiny Qwen3-MoE at tp 3 with ``--elastic-checkin-timeout 3``: rank 2 is stopped (SIGSTOP: alive
but silent) and rank 1 killed (SIGKILL) while requests run. Rank 2 never checks in: after 3 s the
controller fences it (SIGKILL), abandons that recovery and plans again from the layout the daemon
already holds; rank 0 goes on alone at tp 1. Every request completes with HF's greedy tokens,
/health never fails, and /elastic/status shows the superseded recovery and the one that worked.
"""

import os
import signal
import threading

import pytest
import requests

from sgl_elastic.testing.clients import HealthProbe, admin_status, generate, wait_in_flight, wait_tp
from sgl_elastic.testing.server import process_gone

from tests.integration.conftest import PROMPTS, TOKEN

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600), pytest.mark.slow]  # slow tier (docs/testing.md)

FAMILY = "qwen3-moe"
MAX_NEW = 4 * 24  # tokens per request: still decoding when the ranks fail (one thread per rank decodes fast)


def _status(url):
    return admin_status(url, TOKEN)


def test_hung_survivor_is_fenced(serve, want):
    with serve(FAMILY, 3, "--elastic-checkin-timeout", "3") as srv:
        url = srv.url
        assert generate(url, PROMPTS[0], MAX_NEW) == want[0]
        pids = {r["rank"]: r["pid"] for r in _status(url)["ranks"]}
        probe = HealthProbe(url)
        probe.start()
        results, errors = {}, []

        def run(i):
            try:
                results[i] = generate(url, PROMPTS[i], MAX_NEW)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{i}: {e}")

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        wait_in_flight(url, TOKEN, len(PROMPTS))  # every request is inside the server
        os.kill(pids[2], signal.SIGSTOP)
        os.kill(pids[1], signal.SIGKILL)
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads), "a request did not finish within 300 s"
        bad = probe.finish()
        assert not errors, errors
        assert [results[i] for i in range(len(PROMPTS))] == want
        assert not bad, bad
        s = wait_tp(url, TOKEN, 1, timeout=60)  # the requests ended after the recovery; its status may lag
        assert len(s["recoveries"]) >= 2, s
        first, second = s["recoveries"][-2:]
        assert first["outcome"].startswith("superseded") and str(pids[2]) in first["outcome"]
        assert second["outcome"] == "ok" and second["tp_after"] == 1
        assert process_gone(pids[2], timeout=10), "the stopped survivor was not fenced (still alive)"
        assert requests.get(url + "/health", timeout=30).status_code == 200
        acc = _status(url)["requests"]  # nothing lost; every request counted once
        assert acc["lost"] == 0 and acc["accepted"] == acc["finished"] + acc["errored"] + acc["in_flight"], acc
