"""In-place failover: a rank is SIGKILLed mid-stream and the same server goes on at tp-1.

One server per model family (tiny, float32, ``launch_server --tp 3`` with no extra flag: daemon
and failover are on by default), in order:
1. kill -9 of one rank's process (rank 0 for Qwen3-MoE and Qwen3: a survivor takes over the request
   intake and the output stream; rank 1 for Mixtral) while requests run (native /generate, streaming
   /generate, the official ``openai`` client streaming, an SGLang frontend program) and while more
   arrive right after the kill (they sit in the dead rank's socket): every request completes with
   the greedy tokens of the run before the failure (HF's for /generate), each streamed once, /health
   never fails, /elastic/status shows the new widths and the recovery's phases;
2. the admin API refuses a missing or wrong token (401) and bad bodies (400 / 409) and changes
   nothing; ``inject_failure`` of rank 1, again and again, takes the server down to tp 1 (no
   collective at all), answering with the same tokens at every step;
   Recoveries, phases, tp size and epoch are on SGLang's /metrics (``--enable-metrics``);
3. request accounting: a request lost inside the server (``SGLE_TEST_DROP``: the ranks drop
   requests whose rid has that prefix) is found by the request audit and ends with a 503 that says
   so, ``lost`` counts it, and the accounts add up (accepted = finished + errored + lost);
4. after the server stops: none of its processes and none of its daemon's /dev/shm segments remain.
The default tier runs the Qwen3-MoE server; the other cases are ``slow``.
"""

import os
import signal
import threading
import time

import psutil
import pytest
import requests

from sgl_elastic.controller import faults
from sgl_elastic.testing.clients import (HealthProbe, admin_status, frontend_program, generate, openai_stream,
                                         rank_pid, wait_next_epoch, wait_state, wait_tp)
from sgl_elastic.testing.server import process_gone

from tests.integration.conftest import AUTH, MAX_NEW, PROMPTS, TOKEN

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

LONG = 96  # streams long enough to be mid-decode when the rank dies
DROP = "sgle-test-drop-"  # every rank drops a request whose rid starts with this (a request lost inside)


@pytest.fixture(scope="module", params=[  # (family, tp, the rank killed mid-stream[, "ep": expert parallelism])
    ("qwen3-moe", 3, 0), pytest.param(("mixtral", 3, 1, "ep"), marks=pytest.mark.slow), pytest.param(("qwen3", 3, 0), marks=pytest.mark.slow),
    pytest.param(("qwen3-moe", 4, 1), marks=pytest.mark.slow), pytest.param(("mixtral", 4, 0), marks=pytest.mark.slow),
], ids=lambda p: f"{p[0]}-tp{p[1]}-kill{p[2]}" + "".join(f"-{x}" for x in p[3:]))
def case(request):
    return request.param


@pytest.fixture(scope="module")
def family(case):  # the conftest's want / want_long follow the case's family
    return case[0]


@pytest.fixture(scope="module")
def hold_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hold-dispatch")


@pytest.fixture(scope="module")
def server(serve, case, hold_dir):
    family, tp = case[:2]
    ep = ["--ep-size", str(tp)] if "ep" in case[3:] else []  # experts whole per rank (3, 3, 2 of 8)
    env = dict(os.environ, **{faults.ENV_TEST_RAISE: str(hold_dir), faults.ENV_TEST_DROP: DROP},
               **({faults.ENV_TEST_HOLD_DISPATCH: str(hold_dir)} if ep else {}))
    # also SGLang's own files: the controller reaps what killed and replaced schedulers left, stop()
    # what the last ones map
    with serve(family, tp, "--enable-metrics", *ep, env=env, sglang_files=True) as srv:
        yield srv


def _generate(url, ids, n=MAX_NEW):
    return generate(url, ids, n)


def _generate_stream(url, ids, n=MAX_NEW, started=None):
    """Streaming /generate; ``started`` (an Event) is set once 4 tokens have streamed."""
    return generate(url, ids, n, stream=True, started=started, started_at=4)


def _status(url):
    return admin_status(url, TOKEN)


def _rank_pid(url, rank):
    return rank_pid(url, TOKEN, rank)


def _frontend_program(url):
    return frontend_program(url, MAX_NEW)


def _openai_stream(url, prompt):
    return openai_stream(url, prompt, MAX_NEW)


def test_kill_rank_mid_stream(server, want, want_long, case):
    url, victim = server.url, case[2]
    assert _generate(url, PROMPTS[0]) == want[0]  # tp 3 before any failure
    text_before = _openai_stream(url, "hello world")
    sgl_before = _frontend_program(url)
    before = _status(url)
    tp = before["tp_size"]
    assert tp >= 3 and before["state"] == "serving" and len(before["widths"]) == tp

    probe = HealthProbe(url)
    probe.start()
    results, errors = {}, []

    def run(key, fn, *a):
        try:
            results[key] = fn(*a)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(f"{key}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i, _generate, url, p)) for i, p in enumerate(PROMPTS)]
    threads += [threading.Thread(target=run, args=(f"s{i}", _generate_stream, url, p)) for i, p in enumerate(PROMPTS)]
    decoding = threading.Event()
    threads += [threading.Thread(target=run, args=(f"long{i}", _generate_stream, url, p, LONG, decoding))
                for i, p in enumerate(PROMPTS[:2])]
    threads.append(threading.Thread(target=run, args=("openai", _openai_stream, url, "hello world")))
    threads.append(threading.Thread(target=run, args=("sgl", _frontend_program, url)))
    for t in threads:
        t.start()
    assert decoding.wait(120), f"no long stream started decoding within 120 s: {errors}"
    os.kill(_rank_pid(url, victim), signal.SIGKILL)
    late = [threading.Thread(target=run, args=(f"late{i}", _generate, url, p)) for i, p in enumerate(PROMPTS)]
    for t in late:  # sent while the rank's death is being handled
        t.start()
    for t in threads + late:
        t.join(300)
    assert not any(t.is_alive() for t in threads + late), "a request did not finish within 300 s"
    bad_health = probe.finish()

    assert not errors, errors
    assert [results[i] for i in range(len(PROMPTS))] == want
    assert [results[f"s{i}"] for i in range(len(PROMPTS))] == want
    assert [results[f"late{i}"] for i in range(len(PROMPTS))] == want
    assert [results[f"long{i}"] for i in range(2)] == want_long
    assert results["openai"] == text_before
    assert results["sgl"] == sgl_before
    assert not bad_health, f"/health failed during the failover: {bad_health} ({probe.count} probes)"
    after = _status(url)
    assert after["state"] == "serving" and after["tp_size"] == tp - 1 and after["epoch"] == before["epoch"] + 1
    assert len(after["widths"]) == tp - 1 and sum(after["widths"]) == sum(before["widths"])
    rec = after["recoveries"][-1]
    assert rec["outcome"] == "ok" and rec["failed_ranks"] == [victim] and rec["tp_after"] == tp - 1
    assert rec["resumed_requests"] >= 1, rec  # the long streams were mid-decode: they resumed
    assert {"frozen", "planning", "migrating", "reconfiguring", "resuming"} <= set(rec["phases_s"])
    assert rec["migration"]["reload_bytes"] > 0 and rec["migration"]["file_bytes_read"] > 0
    # every survivor gains units: its segment is regrown in place, only the lost share is new memory
    assert rec["migration"]["in_place_ranks"] == tp - 1, rec["migration"]
    m = rec["migration"]
    assert 0 < m["alloc_bytes"] < m["keep_bytes"] + m["peer_bytes"] + m["reload_bytes"], m  # < a whole copy
    # the KV pools and the prefix index followed (the dead rank's heads from its backup): the prompts
    # cached before the failure are not prefilled again
    assert m["kv_kept_slots"] > 0, m
    assert rec["tfs_s"] is not None and rec["tfs_s"] >= rec["recovery_s"]
    metrics = requests.get(url + "/metrics", timeout=30).text
    assert 'sgl_elastic_recoveries_total{outcome="ok"} 1.0' in metrics, metrics[-2000:]
    assert f"sgl_elastic_tp_size {tp - 1}.0" in metrics


def _in_flight(fn, url):
    """``fn(url, prompt)`` for every prompt, each in a started thread: (threads, results by index, errors)."""
    results, errors = {}, []

    def run(i, p):
        try:
            results[i] = fn(url, p)
        except Exception as e:  # noqa: BLE001 - reported by the caller's assertion
            errors.append(f"{i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    return threads, results, errors


def _next_epoch(url, epoch, timeout=60):
    return wait_next_epoch(url, TOKEN, epoch, timeout)


def test_failure_between_routing_and_dispatch(server, want, case, hold_dir):
    """Expert parallelism: rank 0 is held after routing a step's tokens and before dispatching them
    to its experts; rank 1, which holds other experts, is killed meanwhile. The step routed under the
    old expert map must never complete (its tokens for the dead rank's experts would be lost), and
    every request must come out as HF's greedy tokens, routed again under the new map."""
    if "ep" not in case[3:]:
        pytest.skip("expert parallelism only")
    url = server.url
    before = _status(url)
    assert before["tp_size"] >= 2, before
    (hold_dir / "arm").touch()
    threads, results, errors = _in_flight(_generate, url)
    try:
        deadline = time.monotonic() + 60
        while not (hold_dir / "held").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (hold_dir / "held").exists(), "rank 0 never reached a MoE dispatch"
        held_epoch = int((hold_dir / "held").read_text())
        assert held_epoch == before["epoch"]
        victim = _rank_pid(url, 1)
        os.kill(victim, signal.SIGKILL)
        # rank 1 is dead, and the controller has seen it, while rank 0 still holds the step routed
        # under its old map
        assert process_gone(victim, timeout=30), "rank 1 outlived its SIGKILL by 30 s"
        wait_state(url, TOKEN, lambda st: st["state"] != "serving" or st["epoch"] > before["epoch"],
                   "the controller saw rank 1's death (a recovery began)", timeout=30)
    finally:  # never leave rank 0 held for the next test, even when this one fails
        (hold_dir / "release").touch()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a request did not finish within 300 s"
    assert not errors, errors
    assert [results[i] for i in range(len(PROMPTS))] == want
    s = _next_epoch(url, before["epoch"])
    assert s["tp_size"] == before["tp_size"] - 1 and s["recoveries"][-1]["outcome"] == "ok", s
    log = server.log_path.read_text(errors="replace")
    tail = log[log.index(f"test hold of a layer-0 MoE dispatch (expert map epoch {held_epoch})"):]
    assert "event loop stopped" in tail.split("rebuilt")[0]  # the held step failed, rank 0 failed over
    assert "StaleExpertMap" not in log  # no layer ever met a map of another epoch


def test_rank_fails_on_its_own_error(server, want, case, hold_dir):
    """A device error that leaves its process alive (a CUDA error): rank 1's event loop raises while
    requests run. Its peers' collectives fail; the controller blames the rank whose error is its
    own, fences it and goes on without it; no request fails."""
    if case[0] != "qwen3":
        pytest.skip("one family is enough")
    url = server.url
    before = _status(url)
    assert before["tp_size"] >= 2, before
    probe = HealthProbe(url)
    probe.start()
    started = [threading.Event() for _ in PROMPTS]
    results, errors = {}, []

    def run(i, p):
        try:
            results[i] = generate(url, p, MAX_NEW, stream=True, started=started[i])
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(f"{i}: {type(e).__name__}: {e}")
        finally:
            started[i].set()

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for i, ev in enumerate(started):  # every stream is being decoded (its first chunk came)
        assert ev.wait(120), f"stream {i} produced no chunk within 120 s: {errors}"
    victim_pid = _rank_pid(url, 1)
    (hold_dir / "raise-1").touch()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a request did not finish within 300 s"
    bad_health = probe.finish()
    assert not errors, errors
    assert [results[i] for i in range(len(PROMPTS))] == want
    assert not bad_health, bad_health
    s = _next_epoch(url, before["epoch"])
    rec = s["recoveries"][-1]
    assert s["tp_size"] == before["tp_size"] - 1 and rec["outcome"] == "ok" and rec["failed_ranks"] == [1], s
    assert "fenced after an error of their own" in rec["reason"] and "injected error of TP rank 1" in rec["reason"]
    assert not psutil.pid_exists(victim_pid) or psutil.Process(victim_pid).status() == psutil.STATUS_ZOMBIE


def test_admin_api_then_down_to_one_rank(server, want):
    url = server.url
    before = _status(url)
    assert requests.get(url + "/elastic/status", timeout=30).status_code == 401
    assert requests.get(url + "/elastic/status", headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 401
    assert requests.post(url + "/elastic/inject_failure", json={"rank": 1}, timeout=30).status_code == 401
    for body, code in (({"rank": 7}, 400), ({"rank": "1"}, 400), ({}, 400), ([1], 400), ({"rank": -1}, 400)):
        r = requests.post(url + "/elastic/inject_failure", json=body, headers=AUTH, timeout=30)
        assert r.status_code == code, (body, r.status_code, r.text)
        assert "error" in r.json()
    r = requests.post(url + "/elastic/inject_failure", data=b"not json", headers=AUTH, timeout=30)
    assert r.status_code == 400
    assert _status(url) == before  # nothing changed

    while _status(url)["tp_size"] > 1:  # failures in a row, each planned from the layout the last one left
        tp = _status(url)["tp_size"]
        victim = tp % 2  # rank 0 and another rank in turn
        r = requests.post(url + "/elastic/inject_failure", json={"rank": victim}, headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text
        s = wait_tp(url, TOKEN, tp - 1, timeout=120)
        assert s["recoveries"][-1]["outcome"] == "ok", s
        assert [_generate(url, p) for p in PROMPTS] == want
    r = requests.post(url + "/elastic/inject_failure", json={"rank": 0}, headers=AUTH, timeout=30)
    assert r.status_code == 409 and "last rank" in r.json()["error"]
    # a token id outside the vocabulary is refused (at tp 1 on CPU it would kill the last rank)
    r = requests.post(url + "/generate", json={"input_ids": [1, 10 ** 6], "sampling_params": {"max_new_tokens": 2}},
                      timeout=60)
    assert r.status_code == 400 and "outside the vocabulary" in r.text, (r.status_code, r.text)
    assert _generate(url, PROMPTS[0]) == want[0] and _status(url)["tp_size"] == 1


def test_a_lost_request_is_found_and_ends_with_an_error(server, want):
    """A request lost inside the server (every rank drops it: ``SGLE_TEST_DROP``) is found by the
    request audit and ends with a 503 that says so, within seconds (it used to wait forever); the
    request accounts add up: accepted = finished + errored + lost."""
    url = server.url
    before = _status(url)["requests"]
    assert before["lost"] == 0 and before["accepted"] > 0, before
    t0 = time.monotonic()
    r = requests.post(url + "/generate", json={"rid": DROP + "1", "input_ids": PROMPTS[0],
                                               "sampling_params": {"max_new_tokens": 4}}, timeout=60)
    took = time.monotonic() - t0
    assert r.status_code == 503 and "lost" in r.text, (r.status_code, r.text)
    assert took < 30, f"the lost request took {took:.1f} s to get its error"
    assert [_generate(url, p) for p in PROMPTS] == want
    acc = _status(url)["requests"]
    assert acc["lost"] == 1 and acc["lost_rids"] == [DROP + "1"], acc
    assert acc["accepted"] == before["accepted"] + 1 + len(PROMPTS), (before, acc)
    assert acc["in_flight"] == 0 and acc["accepted"] == acc["finished"] + acc["errored"] + acc["lost"], acc
