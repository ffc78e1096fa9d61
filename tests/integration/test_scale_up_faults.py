"""Faults during a scale-up, and what the probes say during a recovery.

One server: tiny Qwen3-MoE, float32, ``--tp 3 --elastic-hung-timeout 3 --elastic-standby 0``,
``SGLE_TEST_DELAYS=migrating=3`` (the controller stays 3 s in each recovery's migrating phase, so
the tests can act inside it). Requests run throughout (streams and plain /generate, checked against
HF's greedy tokens) and a /health probe every 0.2 s must always get 200. In order:
1. probes: rank 2 is SIGKILLed; while the recovery runs, ``/health`` (liveness) answers 200
   ``{"status": "recovering"}`` and ``/ready`` (readiness) 503; once serving at tp 2, ``/ready`` 200;
2. an accepted scale-up is carried out after a failure that arrives while the new rank process
   starts: ``add_rank`` (202, ``pending`` in the status), rank 1 SIGKILLed at once (2 -> 1), then the
   scale-up goes on (1 -> 2) and ``add_rank_last`` says done;
3. a rank stopped (SIGSTOP, left stopped) while a scale-up migrates: it is fenced and the same
   scale-up goes on without it (2 + 1 - 1 = 2 ranks), instead of leaving the server stuck in
   ``migrating`` (it raised IllegalPhaseTransition before).
(The request audit's test is in ``test_failover.py``, on a default-tier server.)
"""

import os
import signal

import pytest
import requests

from sgl_elastic.testing.clients import BackgroundLoad, admin_status, generate, wait_for, wait_serving

from tests.integration.conftest import AUTH, PROMPTS, TOKEN

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900), pytest.mark.slow]  # slow tier (docs/testing.md)

FAMILY = "qwen3-moe"
MAX_NEW, LONG = 12, 40


@pytest.fixture(scope="module")
def server(serve):
    env = dict(os.environ, SGLE_TEST_DELAYS="migrating=3.0")
    with serve(FAMILY, 3, "--elastic-hung-timeout", "3", "--elastic-standby", "0", env=env) as srv:
        yield srv


def _wait(url, pred, what, timeout=240):
    try:
        return wait_serving(url, TOKEN, pred, what, timeout=timeout)
    except AssertionError as e:
        pytest.fail(str(e))


def _pid(url, rank):
    return next(r["pid"] for r in admin_status(url, TOKEN)["ranks"] if r["rank"] == rank)


def _until(pred, what, timeout=120):
    try:
        return wait_for(pred, what, timeout, interval=0.05)
    except AssertionError as e:
        pytest.fail(str(e))


def test_probes_during_a_recovery(server, want, want_long):
    url = server.url
    assert requests.get(url + "/ready", timeout=30).status_code == 200
    load = BackgroundLoad(url, PROMPTS, MAX_NEW, LONG)
    try:
        load.wait_started()
        os.kill(_pid(url, 2), signal.SIGKILL)
        _until(lambda: admin_status(url, TOKEN)["state"] == "migrating", "the recovery in its migrating phase")
        h, r = requests.get(url + "/health", timeout=30), requests.get(url + "/ready", timeout=30)
        assert h.status_code == 200 and h.json()["status"] == "recovering", (h.status_code, h.text)
        assert r.status_code == 503 and r.json()["status"] == "recovering", (r.status_code, r.text)
        _wait(url, lambda s: s["tp_size"] == 2, "serving at tp 2")
    finally:
        load.finish(want, want_long)
    assert requests.get(url + "/ready", timeout=30).status_code == 200


def test_scale_up_waits_for_a_failure_during_its_start(server, want, want_long):
    url = server.url
    n = len(admin_status(url, TOKEN)["recoveries"])
    load = BackgroundLoad(url, PROMPTS, MAX_NEW, LONG)
    try:
        r = requests.post(url + "/elastic/add_rank", headers=AUTH, timeout=30)
        assert r.status_code == 202, r.text
        assert "add_rank" in admin_status(url, TOKEN)["pending"]
        os.kill(_pid(url, 1), signal.SIGKILL)  # the new process is still importing SGLang
        st = _wait(url, lambda s: s["tp_size"] == 2 and not s["pending"] and s["add_rank_last"], "the scale-up")
    finally:
        load.finish(want, want_long)
    recs = st["recoveries"][n:]
    assert [r["failed_ranks"] for r in recs] == [[1], []] and all(r["outcome"] == "ok" for r in recs), recs
    assert st["add_rank_last"]["decision"] == "done", st["add_rank_last"]
    assert [generate(url, p, MAX_NEW) for p in PROMPTS] == want


def test_rank_stopped_while_a_scale_up_migrates(server, want, want_long):
    url = server.url
    n = len(admin_status(url, TOKEN)["recoveries"])
    stopped = _pid(url, 0)
    load = BackgroundLoad(url, PROMPTS, MAX_NEW, LONG)
    try:
        r = requests.post(url + "/elastic/add_rank", headers=AUTH, timeout=30)
        assert r.status_code == 202, r.text
        _until(lambda: (lambda s: s["state"] == "migrating" and len(s["recoveries"]) > n)(admin_status(url, TOKEN)),
               "the scale-up in its migrating phase", timeout=240)
        os.kill(stopped, signal.SIGSTOP)  # left stopped: only the controller's fence ends it
        st = _wait(url, lambda s: not s["pending"] and s["add_rank_last"].get("tp_after") == 2
                   and s["add_rank_last"].get("decision") == "done", "the scale-up without the stopped rank")
    finally:
        load.finish(want, want_long)
        try:
            os.kill(stopped, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert st["tp_size"] == 2 and stopped not in [r["pid"] for r in st["ranks"]], st
    last = st["recoveries"][-1]
    assert last["outcome"] == "ok" and last["tp_after"] == 2, st["recoveries"][n:]
    assert [generate(url, p, MAX_NEW) for p in PROMPTS] == want
