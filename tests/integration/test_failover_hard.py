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
import threading
import time

import pytest
import requests

from sgl_elastic.testing.reference import hf_greedy
from sgl_elastic.testing.server import ServerProcess

from tests.integration.test_failover import (MAX_NEW, PROMPTS, TOKEN, HealthProbe, _generate,
                                             _generate_stream, _status)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600), pytest.mark.slow]  # slow tier (docs/testing.md)

FAMILY = "qwen3"


@pytest.fixture(scope="module")
def want(tiny_models):
    return hf_greedy(str(tiny_models[FAMILY]), PROMPTS, MAX_NEW)


class Load:
    """Every prompt as a /generate and as a streaming /generate, in threads; ``check`` joins them.
    With ``refs`` ({"openai": text, "sgl": text}, answers before the failure) also the ``openai``
    client streaming and an SGLang frontend program."""

    def __init__(self, url, refs=None):
        from tests.integration.test_failover import _frontend_program, _openai_stream

        self.results, self.errors, self.refs = {}, [], refs or {}
        jobs = [(i, _generate, p) for i, p in enumerate(PROMPTS)]
        jobs += [(f"s{i}", _generate_stream, p) for i, p in enumerate(PROMPTS)]
        if refs:
            jobs += [("openai", _openai_stream, "hello world"), ("sgl", _frontend_program)]
        self.threads = [threading.Thread(target=self._run, args=(k, fn, url, *a)) for k, fn, *a in jobs]
        for t in self.threads:
            t.start()

    def _run(self, key, fn, *a):
        try:
            self.results[key] = fn(*a)
        except Exception as e:  # noqa: BLE001 - reported by check()
            self.errors.append(f"{key}: {type(e).__name__}: {e}")

    def check(self, want):
        for t in self.threads:
            t.join(300)
        assert not any(t.is_alive() for t in self.threads), "a request did not finish within 300 s"
        assert not self.errors, self.errors
        assert [self.results[i] for i in range(len(PROMPTS))] == want
        assert [self.results[f"s{i}"] for i in range(len(PROMPTS))] == want
        for k, v in self.refs.items():
            assert self.results[k] == v, (k, self.results[k], v)


def _wait_serving(url, tp, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = _status(url)
        if s["state"] == "serving" and s["tp_size"] == tp:
            return s
        time.sleep(0.2)
    raise AssertionError(f"not serving at tp {tp} within {timeout} s: {_status(url)}")


def _gone(pid, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_slow_rank_kept_hung_rank_fenced(tiny_models, want):
    with ServerProcess(tiny_models[FAMILY], tp_size=3, extra_args=[
            "--dtype", "float32", "--elastic-admin-token", TOKEN, "--elastic-hung-timeout", "3"]) as srv:
        url = srv.url
        assert _generate(url, PROMPTS[0]) == want[0]
        pids = {r["rank"]: r["pid"] for r in _status(url)["ranks"]}
        probe = HealthProbe(url)
        probe.start()

        # slow: rank 2 runs 50 % of the time for 7 s (> the hung timeout), never silent for 0.2 s+
        load = Load(url)
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
        load = Load(url)
        time.sleep(1.0)
        t_stop = time.monotonic()
        os.kill(pids[1], signal.SIGSTOP)
        assert _gone(pids[1], timeout=30), "the stopped rank was not fenced within 30 s"
        fenced_after = time.monotonic() - t_stop
        load.check(want)
        s = _wait_serving(url, 2)
        rec = s["recoveries"][-1]
        assert rec["outcome"] == "ok" and rec["failed_ranks"] == [1] and "hung" in rec["reason"], rec
        assert fenced_after < 3 + 5, f"fenced {fenced_after:.1f} s after the stop (timeout 3 s + a poll)"
        assert [_generate(url, p) for p in PROMPTS] == want
        assert not probe.finish()


# (phase the second failure lands in, rank of the epoch-0 layout killed second); planning and
# migrating take the same path as frozen (the survivors wait for orders): under the slow marker
_slow = pytest.mark.slow  # the default tier keeps the slowest phase (the rebuild); the rest run under slow
PHASES = [pytest.param("frozen", 0, marks=_slow), pytest.param("planning", 2, marks=_slow),
          pytest.param("migrating", 0, marks=_slow), pytest.param("reconfiguring", 2, marks=_slow), ("rebuild", 0),
          pytest.param("resuming", 2, marks=_slow)]


@pytest.mark.parametrize("phase,second", PHASES, ids=["frozen", "planning", "migrating", "reconfiguring", "rebuild",
                                                       "resuming"])
def test_second_failure_during_recovery(tiny_models, want, phase, second):
    env = dict(os.environ, SGLE_TEST_DELAYS=f"{phase}=2.0")
    with ServerProcess(tiny_models[FAMILY], tp_size=3, env=env, extra_args=[
            "--dtype", "float32", "--elastic-admin-token", TOKEN]) as srv:
        url = srv.url
        assert _generate(url, PROMPTS[0]) == want[0]
        pids = {r["rank"]: r["pid"] for r in _status(url)["ranks"]}
        probe = HealthProbe(url)
        probe.start()
        load = Load(url)
        time.sleep(1.0)
        os.kill(pids[1], signal.SIGKILL)
        in_phase = "reconfiguring" if phase == "rebuild" else phase
        deadline = time.monotonic() + 60
        while _status(url)["state"] != in_phase:
            assert time.monotonic() < deadline, f"the recovery never reached {in_phase}: {_status(url)}"
            time.sleep(0.02)
        if phase == "rebuild":
            time.sleep(0.5)  # the survivors have their orders and wait before building
        os.kill(pids[second], signal.SIGKILL)
        late = Load(url)  # sent during the second failure
        load.check(want)
        late.check(want)
        s = _wait_serving(url, 1)
        assert all(r["outcome"] != "running" and not r["outcome"].startswith("failed") for r in s["recoveries"]), s
        assert s["recoveries"][-1]["outcome"] == "ok"
        assert s["ranks"][0]["pid"] == pids[2 if second == 0 else 0]
        assert not probe.finish()
        assert [_generate(url, p) for p in PROMPTS] == want
        acc = _status(url)["requests"]  # nothing lost; every request counted once
        assert acc["lost"] == 0 and acc["accepted"] == acc["finished"] + acc["errored"] + acc["in_flight"], acc


def _daemon_pids(srv):
    import re

    return [int(p) for p in re.findall(r"daemon pid (\d+) started", srv.log_path.read_text(errors="replace"))]


def test_daemon_dies_then_during_a_recovery(tiny_models, want):
    """The state daemon is SIGKILLed while serving (the ranks go on with the memory they map), then
    a rank dies (the recovery starts a new daemon, which reads the checkpoint again), then the new
    daemon is SIGKILLed inside the next recovery's migration (another new daemon; the recovery ends ok)."""
    env = dict(os.environ, SGLE_TEST_DELAYS="migrating=2.0")
    with ServerProcess(tiny_models[FAMILY], tp_size=3, env=env, extra_args=[
            "--dtype", "float32", "--elastic-admin-token", TOKEN]) as srv:
        url = srv.url
        assert _generate(url, PROMPTS[0]) == want[0]
        probe = HealthProbe(url)
        probe.start()
        first = _daemon_pids(srv)[-1]
        load = Load(url)
        time.sleep(0.5)
        os.kill(first, signal.SIGKILL)
        load.check(want)  # serving goes on without the daemon
        assert _status(url)["tp_size"] == 3

        load = Load(url)
        time.sleep(0.5)
        os.kill(next(r["pid"] for r in _status(url)["ranks"] if r["rank"] == 1), signal.SIGKILL)
        load.check(want)
        s = _wait_serving(url, 2)
        mig = s["recoveries"][-1]["migration"]
        assert mig.get("daemon_restarted") == 1 and mig["file_bytes_read"] > 0, mig
        second = _daemon_pids(srv)[-1]
        assert second != first

        load = Load(url)
        time.sleep(0.5)
        os.kill(next(r["pid"] for r in _status(url)["ranks"] if r["rank"] == 0), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while _status(url)["state"] != "migrating":
            assert time.monotonic() < deadline, _status(url)
            time.sleep(0.02)
        os.kill(second, signal.SIGKILL)
        load.check(want)
        s = _wait_serving(url, 1)
        assert s["recoveries"][-1]["outcome"] == "ok" and s["recoveries"][-1]["migration"].get("daemon_restarted") == 1
        assert _daemon_pids(srv)[-1] not in (first, second)
        assert [_generate(url, p) for p in PROMPTS] == want
        assert not probe.finish()
