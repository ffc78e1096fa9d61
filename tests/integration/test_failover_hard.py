"""Failover, the hard cases: a hung rank, a slow rank, and a second failure inside each recovery phase.

Tiny Qwen3 at tp 3, float32, requests in flight (native /generate batches and streaming /generate)
during every failure; each case checks that every request completes with HF's greedy tokens, each
stream once, that /health never fails, and what /elastic/status says.

1. ``--elastic-hung-timeout 3``: rank 2 is throttled (stopped and continued every 0.2 s for 7 s:
   slow, never silent for long) and must not be fenced; then rank 1 is stopped (SIGSTOP: alive but
   silent) and must be fenced and recovered from like a dead rank, with no kill from the test.
2. A second failure in each phase of a recovery (``SGLE_TEST_DELAYS`` holds the controller in that
   phase for 2 s, or the survivors before their rebuild): rank 1 is killed, then, inside the phase,
   rank 0 or rank 2. The recovery in progress is abandoned (or, after it finished, a new one runs)
   and the server ends serving at tp 1. (Planning and migrating sit under the ``slow`` marker.)
3. The state daemon is killed while serving, then inside a recovery.
"""

import os
import signal
import time

import psutil
import pytest

from sgl_elastic.testing.clients import (HealthProbe, RequestSet, admin_status, generate, wait_state,
                                         wait_tp)
from sgl_elastic.testing.server import process_gone

from tests.integration.conftest import MAX_NEW, PROMPTS, TOKEN

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600), pytest.mark.slow]  # slow tier (docs/testing.md)

FAMILY = "qwen3"


def _load(url):
    return RequestSet(url, PROMPTS, MAX_NEW)


def _status(url):
    return admin_status(url, TOKEN)


def _serve(serve, *extra, env=None):
    return serve(FAMILY, 3, *extra, env=env)


def test_slow_rank_kept_hung_rank_fenced(serve, want):
    with _serve(serve, "--elastic-hung-timeout", "3") as srv:
        url = srv.url
        assert generate(url, PROMPTS[0], MAX_NEW) == want[0]
        pids = {r["rank"]: r["pid"] for r in _status(url)["ranks"]}
        probe = HealthProbe(url)
        probe.start()

        # slow: rank 2 runs 50 % of the time for 7 s (> the hung timeout), never silent for 0.2 s+
        load = _load(url)
        load.wait_started()
        t_end = time.monotonic() + 7.0
        while time.monotonic() < t_end:
            os.kill(pids[2], signal.SIGSTOP)
            time.sleep(0.2)
            os.kill(pids[2], signal.SIGCONT)
            time.sleep(0.2)
        load.check(want)
        s = _status(url)
        assert s["state"] == "serving" and s["tp_size"] == 3 and s["epoch"] == 0 and not s["recoveries"], s

        # hung: rank 1 stopped for good; the controller fences it on its heartbeat
        load = _load(url)
        load.wait_started()
        t_stop = time.monotonic()
        os.kill(pids[1], signal.SIGSTOP)
        assert process_gone(pids[1], timeout=30), "the stopped rank was not fenced within 30 s"
        fenced_after = time.monotonic() - t_stop
        load.check(want)
        s = wait_tp(url, TOKEN, 2)
        rec = s["recoveries"][-1]
        assert rec["outcome"] == "ok" and rec["failed_ranks"] == [1] and "hung" in rec["reason"], rec
        assert fenced_after < 3 + 5, f"fenced {fenced_after:.1f} s after the stop (timeout 3 s + a poll)"
        assert [generate(url, p, MAX_NEW) for p in PROMPTS] == want
        assert not probe.finish()


# (phase the second failure lands in, rank of the epoch-0 layout killed second); planning and
# migrating take the same path as frozen (the survivors wait for orders): under the slow marker
_slow = pytest.mark.slow  # the default tier keeps the slowest phase (the rebuild); the rest run under slow
PHASES = [pytest.param("frozen", 0, marks=_slow), pytest.param("planning", 2, marks=_slow),
          pytest.param("migrating", 0, marks=_slow), pytest.param("reconfiguring", 2, marks=_slow), ("rebuild", 0),
          pytest.param("resuming", 2, marks=_slow)]


@pytest.mark.parametrize("phase,second", PHASES, ids=["frozen", "planning", "migrating", "reconfiguring", "rebuild",
                                                       "resuming"])
def test_second_failure_during_recovery(serve, want, phase, second):
    env = dict(os.environ, SGLE_TEST_DELAYS=f"{phase}=2.0")
    with _serve(serve, env=env) as srv:
        url = srv.url
        assert generate(url, PROMPTS[0], MAX_NEW) == want[0]
        pids = {r["rank"]: r["pid"] for r in _status(url)["ranks"]}
        probe = HealthProbe(url)
        probe.start()
        load = _load(url)
        load.wait_started()
        os.kill(pids[1], signal.SIGKILL)
        in_phase = "reconfiguring" if phase == "rebuild" else phase
        wait_state(url, TOKEN, lambda st: st["state"] == in_phase, f"the recovery in its {in_phase} phase")
        if phase == "rebuild":
            # the survivors have their orders and wait before building: a survivor takes the title of
            # its new rank (rank 2 becomes rank 1) just before the test delay of its rebuild
            def retitled():
                try:
                    return "scheduler_TP1" in " ".join(psutil.Process(pids[2]).cmdline())
                except psutil.Error:
                    return False

            deadline = time.monotonic() + 30
            while not retitled():
                assert time.monotonic() < deadline, f"rank 2 got no rebuild order within 30 s: {_status(url)}"
                time.sleep(0.02)
        os.kill(pids[second], signal.SIGKILL)
        late = _load(url)  # sent during the second failure
        load.check(want)
        late.check(want)
        s = wait_tp(url, TOKEN, 1)
        assert all(r["outcome"] != "running" and not r["outcome"].startswith("failed") for r in s["recoveries"]), s
        assert s["recoveries"][-1]["outcome"] == "ok"
        assert s["ranks"][0]["pid"] == pids[2 if second == 0 else 0]
        assert not probe.finish()
        assert [generate(url, p, MAX_NEW) for p in PROMPTS] == want
        acc = _status(url)["requests"]  # nothing lost; every request counted once
        assert acc["lost"] == 0 and acc["accepted"] == acc["finished"] + acc["errored"] + acc["in_flight"], acc


def _daemon_pids(srv):
    import re

    return [int(p) for p in re.findall(r"daemon pid (\d+) started", srv.log_path.read_text(errors="replace"))]


def test_daemon_dies_then_during_a_recovery(serve, want):
    """The state daemon is SIGKILLed while serving (the ranks go on with the memory they map), then
    a rank dies (the recovery starts a new daemon, which reads the checkpoint again), then the new
    daemon is SIGKILLed inside the next recovery's migration (another new daemon; the recovery ends ok)."""
    env = dict(os.environ, SGLE_TEST_DELAYS="migrating=2.0")
    with _serve(serve, env=env) as srv:
        url = srv.url
        assert generate(url, PROMPTS[0], MAX_NEW) == want[0]
        probe = HealthProbe(url)
        probe.start()
        first = _daemon_pids(srv)[-1]
        load = _load(url)
        load.wait_started()
        os.kill(first, signal.SIGKILL)
        load.check(want)  # serving goes on without the daemon
        assert _status(url)["tp_size"] == 3

        load = _load(url)
        load.wait_started()
        os.kill(next(r["pid"] for r in _status(url)["ranks"] if r["rank"] == 1), signal.SIGKILL)
        load.check(want)
        s = wait_tp(url, TOKEN, 2)
        mig = s["recoveries"][-1]["migration"]
        assert mig.get("daemon_restarted") == 1 and mig["file_bytes_read"] > 0, mig
        second = _daemon_pids(srv)[-1]
        assert second != first

        load = _load(url)
        load.wait_started()
        os.kill(next(r["pid"] for r in _status(url)["ranks"] if r["rank"] == 0), signal.SIGKILL)
        wait_state(url, TOKEN, lambda st: st["state"] == "migrating", "the recovery in its migrating phase")
        os.kill(second, signal.SIGKILL)
        load.check(want)
        s = wait_tp(url, TOKEN, 1)
        assert s["recoveries"][-1]["outcome"] == "ok" and s["recoveries"][-1]["migration"].get("daemon_restarted") == 1
        assert _daemon_pids(srv)[-1] not in (first, second)
        assert [generate(url, p, MAX_NEW) for p in PROMPTS] == want
        assert not probe.finish()
