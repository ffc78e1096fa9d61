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
import time

import pytest
import requests

from sgl_elastic.testing.reference import hf_greedy
from sgl_elastic.testing.server import ServerProcess

from tests.integration.test_failover import MAX_NEW, PROMPTS, TOKEN, HealthProbe, _generate, _status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600), pytest.mark.slow]  # slow tier (docs/testing.md)


LONG = 4 * MAX_NEW  # tokens per request: still decoding when the ranks fail (one thread per rank decodes fast)


@pytest.fixture(scope="module")
def want(tiny_models):
    return hf_greedy(str(tiny_models["qwen3-moe"]), PROMPTS, LONG)


def test_hung_survivor_is_fenced(tiny_models, want):
    with ServerProcess(tiny_models["qwen3-moe"], tp_size=3, extra_args=[
            "--dtype", "float32", "--elastic-admin-token", TOKEN, "--elastic-checkin-timeout", "3"]) as srv:
        url = srv.url
        assert _generate(url, PROMPTS[0], LONG) == want[0]
        pids = {r["rank"]: r["pid"] for r in _status(url)["ranks"]}
        probe = HealthProbe(url)
        probe.start()
        results, errors = {}, []

        def run(i):
            try:
                results[i] = _generate(url, PROMPTS[i], LONG)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{i}: {e}")

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        time.sleep(0.5)
        os.kill(pids[2], signal.SIGSTOP)
        os.kill(pids[1], signal.SIGKILL)
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads)
        bad = probe.finish()
        assert not errors, errors
        assert [results[i] for i in range(len(PROMPTS))] == want
        assert not bad, bad
        deadline = time.monotonic() + 60  # the requests ended after the recovery; its status may lag
        while (s := _status(url))["state"] != "serving" or s["tp_size"] != 1:
            assert time.monotonic() < deadline, s
            time.sleep(0.2)
        assert len(s["recoveries"]) >= 2, s
        first, second = s["recoveries"][-2:]
        assert first["outcome"].startswith("superseded") and str(pids[2]) in first["outcome"]
        assert second["outcome"] == "ok" and second["tp_after"] == 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pids[2]}"):
            with open(f"/proc/{pids[2]}/stat") as f:
                if f.read().split()[2] == "Z":
                    break
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{pids[2]}") or open(f"/proc/{pids[2]}/stat").read().split()[2] == "Z"
        assert requests.get(url + "/health", timeout=30).status_code == 200
        acc = _status(url)["requests"]  # nothing lost; every request counted once
        assert acc["lost"] == 0 and acc["accepted"] == acc["finished"] + acc["errored"] + acc["in_flight"], acc
