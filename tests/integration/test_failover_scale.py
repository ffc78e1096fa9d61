"""Failures in a row down to one rank, then scale-up back (``POST /elastic/add_rank``), on one server.

Tiny Qwen3-MoE, float32, ``--tp 3 --elastic-standby 1`` (one warm standby process, imported and
waiting). With requests in flight at every step (native /generate batches, streaming /generate,
the ``openai`` client streaming, an SGLang frontend program):
1. rank 0 is killed (3 -> 2: a survivor takes over the intake), then rank 1 (2 -> 1: tp 1, no
   collective);
2. ``add_rank`` (1 -> 2) uses the standby; a second ``add_rank`` while it runs gets 409; then
   ``add_rank`` again (2 -> 3) with a fresh or refilled standby; widths end balanced;
3. the admin API refuses add_rank without the token (401);
every request completes with HF's greedy tokens, each stream once; /health never fails.

The endurance run (``slow``): 10 recoveries in a row, kills and add_ranks alternating (3 <-> 2);
the ranks' RSS and the daemon's shared memory at rest must not grow from cycle to cycle.
"""

import os
import re
import signal

import psutil
import pytest
import requests

from sgl_elastic.testing.clients import (HealthProbe, RequestSet, admin_status, frontend_program, generate,
                                         openai_stream, wait_for, wait_tp)

from tests.integration.conftest import AUTH, MAX_NEW, PROMPTS, TOKEN

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900), pytest.mark.slow]  # slow tier (docs/testing.md)

FAMILY = "qwen3-moe"


@pytest.fixture(scope="module")
def server(serve):
    with serve(FAMILY, 3, "--elastic-standby", "1") as srv:
        yield srv


def _status(url):
    return admin_status(url, TOKEN)


def _add_rank(url):
    return requests.post(url + "/elastic/add_rank", headers=AUTH, timeout=30)


def _standby(url, timeout=180):
    return wait_for(lambda: _status(url)["standby"], "a warm standby", timeout, interval=0.5,
                    last=lambda: _status(url))[0]


def _clients(url, refs=None):
    return RequestSet(url, PROMPTS, MAX_NEW, refs)


def test_down_to_one_then_scale_up(server, want):
    url = server.url
    refs = {"openai": openai_stream(url, "hello world", MAX_NEW), "sgl": frontend_program(url, MAX_NEW)}
    probe = HealthProbe(url)
    probe.start()
    for victim, tp in ((0, 3), (1, 2)):  # failures in a row, rank 0 first
        pid = next(r["pid"] for r in _status(url)["ranks"] if r["rank"] == victim)
        load = _clients(url, refs)
        load.wait_started()
        os.kill(pid, signal.SIGKILL)
        load.check(want)
        s = wait_tp(url, TOKEN, tp - 1)
        assert s["recoveries"][-1]["failed_ranks"] == [victim]

    assert requests.post(url + "/elastic/add_rank", timeout=30).status_code == 401
    standby = _standby(url)
    for tp in (1, 2):  # scale-up with requests in flight
        load = _clients(url, refs if tp == 1 else None)
        load.wait_started()
        r = _add_rank(url)
        assert r.status_code == 202, r.text
        again = _add_rank(url)
        assert again.status_code == 409 and "in progress" in again.json()["error"], again.text
        s = wait_tp(url, TOKEN, tp + 1, timeout=240)
        load.check(want)
        rec = s["recoveries"][-1]
        assert rec["outcome"] == "ok" and rec["tp_after"] == tp + 1 and rec["failed_ranks"] == []
        assert {"frozen", "planning", "migrating", "reconfiguring", "resuming"} <= set(rec["phases_s"])
        if tp == 1:
            assert str(standby) in rec["reason"] and standby in [x["pid"] for x in s["ranks"]]
        assert max(s["widths"]) - min(s["widths"]) <= 1, s["widths"]
        assert [generate(url, p, MAX_NEW) for p in PROMPTS] == want
    assert not probe.finish()


def _footprint(url, daemon_pid):
    """(mean rank RSS, the daemon's shared memory): pages the daemon's files hold, not their sizes
    (a remapped segment's file grows by the units a survivor gains and gives back what it lost as
    holes)."""
    ranks = [psutil.Process(r["pid"]) for r in _status(url)["ranks"]]
    rss = sum(p.memory_info().rss for p in ranks) / len(ranks)
    shm = sum(e.stat().st_blocks * 512 for e in os.scandir("/dev/shm") if e.name.startswith(f"sgle-{daemon_pid}-"))
    return rss, shm


@pytest.mark.slow
def test_endurance_kills_and_add_ranks(server, want):
    url = server.url
    log = server.log_path.read_text(errors="replace")
    daemon_pid = int(re.findall(r"daemon pid (\d+) started", log)[-1])
    if _status(url)["tp_size"] != 3:
        assert _add_rank(url).status_code == 202
        wait_tp(url, TOKEN, 3, timeout=240)
    marks = {2: [], 3: []}
    for i in range(10):
        tp = _status(url)["tp_size"]
        load = _clients(url)
        load.wait_started()
        if tp == 3:
            pid = next(r["pid"] for r in _status(url)["ranks"] if r["rank"] == i % 3)
            os.kill(pid, signal.SIGKILL)
            s = wait_tp(url, TOKEN, 2)
        else:
            assert _add_rank(url).status_code == 202
            s = wait_tp(url, TOKEN, 3, timeout=240)
        load.check(want)
        assert s["recoveries"][-1]["outcome"] == "ok"
        rss, shm = _footprint(url, daemon_pid)
        marks[s["tp_size"]].append((rss, shm))
        print(f"recovery {i + 1}: tp {tp} -> {s['tp_size']}, mean rank RSS {rss / 2**20:.0f} MiB,"
              f" daemon shm {shm / 2**20:.1f} MiB, recovery {s['recoveries'][-1]['recovery_s']:.2f} s")
    for tp, m in marks.items():  # at rest at the same width: no growth from cycle to cycle
        assert max(x[1] for x in m) <= m[0][1] * 1.05 + (1 << 20), (tp, m)
        assert max(x[0] for x in m[1:]) <= m[0][0] * 1.25 + (64 << 20), (tp, m)
