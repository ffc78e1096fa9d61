"""Failover fallback after the layout changed: the in-place rebuild fails after the migration, every
scheduler restarts from the daemon at the new tp, and a later failure again recovers in place.

Tiny Qwen3 at tp 3, float32, ``SGLE_TEST_FAIL=rebuild`` (every survivor's rebuild in the server's
first recovery raises, so that recovery fails with "survivors could not rebuild" after the daemon
migrated the weights to tp 2). With streaming and plain /generate requests in flight, rank 1 is
SIGKILLed; then:
1. the server serves again at tp 2 (the daemon's layout): the recovery's outcome says it failed and
   that the fallback restart at tp 2 was done; every request sent got either HF's greedy tokens or
   an explicit error (HTTP 503, an error chunk or an abort), none hung; new requests get HF's tokens;
2. rank 1 of the relaunched schedulers is SIGKILLed with requests in flight: recovered in place
   (outcome ok, tp 1), every request completes with HF's tokens;
3. the only rank (tp 1) fails on its own error: nobody to blame, so every scheduler restarts
   (requests in flight: HF's tokens or an explicit error), and the server serves again;
4. after the server stops: none of its processes (the relaunched ones included) and none of its
   daemon's /dev/shm segments remain.
"""

import json
import os
import signal
import threading
import time

import psutil
import pytest
import requests

from sgl_elastic.controller import faults
from sgl_elastic.testing.clients import HealthProbe, RequestSet, admin_status, generate, wait_state, wait_tp

from tests.integration.conftest import MAX_NEW, PROMPTS, TOKEN

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400), pytest.mark.slow]  # slow tier (docs/testing.md)

FAMILY = "qwen3"
LONG = 48  # tokens of the requests in flight at the failure (the first MAX_NEW are the usual reference)
CLIENT_TIMEOUT_S = 120  # no request may hang: each gets an answer or an error within this


@pytest.fixture(scope="module")
def want_all_long(hf_tokens):
    """HF's greedy tokens of every prompt, LONG tokens each (the requests in flight at the failures)."""
    return hf_tokens(FAMILY, PROMPTS, LONG)


def _status(url):
    return admin_status(url, TOKEN)


@pytest.fixture
def server(serve, tmp_path):
    """The relaunched schedulers are new processes: the test notes them (``srv.note_children()``), the
    factory checks that none of the processes seen is left."""
    env = dict(os.environ, SGLE_TEST_FAIL="rebuild", **{faults.ENV_TEST_RAISE: str(tmp_path)})
    with serve(FAMILY, 3, env=env) as srv:
        srv.raise_dir = tmp_path  # SGLE_TEST_RAISE: a rank raises when raise-<rank> appears here
        yield srv


def _attempt(url, ids, stream, started: threading.Event):
    """One /generate of LONG tokens: ("ok", output ids) or ("error", what the server said). Bounded."""
    body = {"input_ids": ids, "stream": stream, "sampling_params": {
        "max_new_tokens": LONG, "temperature": 0, "ignore_eos": True}}
    r = requests.post(url + "/generate", json=body, timeout=CLIENT_TIMEOUT_S, stream=stream)
    if r.status_code != 200:
        started.set()
        return "error", f"HTTP {r.status_code}: {r.text[:200]}"
    if not stream:
        started.set()
        out = r.json()
        reason = (out.get("meta_info") or {}).get("finish_reason") or {}
        if reason.get("type") == "abort":
            return "error", f"abort: {reason}"
        return "ok", out["output_ids"]
    out, last = [], {}
    for line in r.iter_lines():
        if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        if "error" in chunk:
            return "error", f"error chunk: {chunk['error']}"
        started.set()
        ids_now = chunk["output_ids"]
        assert ids_now[:len(out)] == out, f"stream went back: {out} then {ids_now}"
        out, last = ids_now, chunk
    reason = (last.get("meta_info") or {}).get("finish_reason") or {}
    if reason.get("type") == "abort":
        return "error", f"abort: {reason}"
    return "ok", out


def test_fallback_restart_at_new_tp_then_in_place(server, want, want_all_long):
    srv = server
    url = srv.url
    assert generate(url, PROMPTS[0], MAX_NEW) == want[0]
    before = _status(url)
    assert before["state"] == "serving" and before["tp_size"] == 3, before
    pids = {r["rank"]: r["pid"] for r in before["ranks"]}

    results, crashed = {}, []

    def run(key, ids, stream, started):
        try:
            results[key] = _attempt(url, ids, stream, started)
        except Exception as e:  # noqa: BLE001 - a hang (timeout) or a broken stream fails the test below
            crashed.append(f"{key}: {type(e).__name__}: {e}")

    jobs = [(f"s{i}", p, True) for i, p in enumerate(PROMPTS)] + [(i, p, False) for i, p in enumerate(PROMPTS[:2])]
    started = {k: threading.Event() for k, _, _ in jobs}
    threads = [threading.Thread(target=run, args=(k, p, s, started[k])) for k, p, s in jobs]
    for t in threads:
        t.start()
    for k, ev in started.items():  # the streams are being decoded (their first chunk came)
        if isinstance(k, str):
            assert ev.wait(60), f"stream {k} did not start"
    t_kill = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    late = [threading.Event() for _ in PROMPTS[:2]]  # sent while the recovery fails / the fallback runs
    wait_state(url, TOKEN, lambda st: st["state"] != "serving", "the controller saw rank 1's death", timeout=30)
    threads += [threading.Thread(target=run, args=(f"late{i}", p, False, late[i])) for i, p in enumerate(PROMPTS[:2])]
    for t in threads[-2:]:
        t.start()

    s = wait_tp(url, TOKEN, 2, timeout=150)
    fallback_s = time.monotonic() - t_kill
    srv.note_children()
    for t in threads:
        t.join(CLIENT_TIMEOUT_S + 10)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert not crashed, crashed
    idx = {k: PROMPTS.index(p) for k, p, _ in jobs} | {f"late{i}": i for i in range(2)}
    errors = {k: v for k, (kind, v) in results.items() if kind == "error"}
    for k, (kind, v) in results.items():
        if kind == "ok":
            assert v == want_all_long[idx[k]], (k, v, want_all_long[idx[k]])
        else:
            assert "503" in v or "abort" in v, (k, v)
    assert any(str(k).startswith("s") for k in errors), f"no stream in flight got an error: {results}"

    rec = s["recoveries"][-1]
    assert s["epoch"] == 1 and len(s["recoveries"]) == 1, s
    assert rec["outcome"].startswith("failed: RuntimeError: survivors could not rebuild"), rec
    assert rec["outcome"].endswith("; fallback restart at tp 2 done") and rec["fallback"] == "ok", rec
    assert rec["tp_after"] == 2 and len(rec["widths_after"]) == 2 and rec["failed_ranks"] == [1], rec
    assert {"frozen", "planning", "migrating", "reconfiguring", "failed"} <= set(rec["phases_s"]), rec
    assert len(s["widths"]) == 2 and sum(s["widths"]) == sum(before["widths"]), s
    new_pids = [r["pid"] for r in s["ranks"]]
    assert all(r["alive"] for r in s["ranks"]) and not set(new_pids) & set(pids.values()), (s, pids)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids.values()), "an old rank process survived the fallback restart"
    print(f"fallback: serving at tp 2 {fallback_s:.1f} s after the kill; errors: {sorted(map(str, errors))}")

    # every request works afterwards
    probe = HealthProbe(url)
    probe.start()
    assert [generate(url, p, MAX_NEW) for p in PROMPTS] == want
    assert [generate(url, p, MAX_NEW, stream=True) for p in PROMPTS] == want

    # a later failure at the new tp recovers in place (the relaunched ranks talk to the controller)
    load = RequestSet(url, PROMPTS, MAX_NEW)
    load.wait_started()
    os.kill(new_pids[1], signal.SIGKILL)
    load.check(want)
    s = wait_tp(url, TOKEN, 1, timeout=90)
    rec = s["recoveries"][-1]
    assert s["epoch"] == 2 and rec["outcome"] == "ok" and rec["fallback"] == "" and rec["tp_after"] == 1, s
    assert [generate(url, p, MAX_NEW) for p in PROMPTS] == want
    assert not probe.finish()
    srv.note_children()

    # 3. every rank fails on its own error (here the only one): there is no rank to blame and the
    # input may be what broke them, so the schedulers restart (the fallback) instead of resuming it;
    # each request in flight ends with HF's tokens or an explicit error, and the server serves again
    epoch = _status(url)["epoch"]
    results.clear()
    jobs = [(f"p{i}", p, i % 2 == 0) for i, p in enumerate(PROMPTS)]
    started = {k: threading.Event() for k, _, _ in jobs}
    threads = [threading.Thread(target=run, args=(k, p, st, started[k])) for k, p, st in jobs]
    for t in threads:
        t.start()
    for k, _, stream in jobs:  # the streams are being decoded (their first chunk came) when the rank raises
        if stream:
            assert started[k].wait(60), f"stream {k} did not start: {results.get(k)}, {crashed}"
    (srv.raise_dir / "raise-0").touch()
    s = wait_state(url, TOKEN, lambda st: st["epoch"] != epoch and st["state"] == "serving",
                   "serving again after the only rank's own error", timeout=120, interval=0.2)
    for t in threads:
        t.join(CLIENT_TIMEOUT_S + 10)
    assert not any(t.is_alive() for t in threads) and not crashed, crashed
    for i in range(len(PROMPTS)):
        kind, out = results[f"p{i}"]
        assert kind == "error" or out == want_all_long[i], (i, kind, out)
    rec = s["recoveries"][-1]
    assert rec["reason"].startswith("every rank's event loop stopped on its own error"), rec
    assert rec["fallback"] == "ok" and s["tp_size"] == 1, s
    assert [generate(url, p, MAX_NEW) for p in PROMPTS] == want
    srv.note_children()


@pytest.fixture
def failing_server(serve):
    env = dict(os.environ, SGLE_TEST_FAIL="rebuild,fallback")
    with serve(FAMILY, 3, env=env) as srv:
        yield srv


def test_a_failed_fallback_says_failed_and_ends_every_request(failing_server, want):
    """The recovery fails and so does its fallback restart (``SGLE_TEST_FAIL=rebuild,fallback``): the
    server cannot serve. The request in flight ends with a 503 (not a cut connection), the probes say
    so (``/health`` and ``/ready`` 503 ``{"status": "failed"}``, not "recovering": a load balancer
    takes it out) and a new request gets a 503 at once (it used to be sent to schedulers that were
    gone). Then the server ends by itself (SGLang's tear-down, ``FAILED_GRACE_S`` later), leaving no
    process and no /dev/shm file (the fixture checks)."""
    srv = failing_server
    url = srv.url
    assert generate(url, PROMPTS[0], MAX_NEW) == want[0]
    started, out = threading.Event(), {}
    t = threading.Thread(target=lambda: out.update(r=_attempt(url, PROMPTS[1], True, started)), daemon=True)
    t.start()
    assert started.wait(60), "the stream did not start"
    os.kill(next(r["pid"] for r in _status(url)["ranks"] if r["rank"] == 1), signal.SIGKILL)
    # a /health sent before the failure is seen waits on SGLang's one-token probe (up to its 20 s)
    wait_state(url, TOKEN, lambda st: st["state"] != "serving", "the controller saw rank 1's death", timeout=60)
    seen, refused = [], None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and srv.proc.poll() is None:
        try:
            h = requests.get(url + "/health", timeout=30)
        except requests.ConnectionError:
            break  # the tear-down began
        seen.append((h.status_code, h.json().get("status")))
        if h.status_code == 503 and refused is None:
            assert h.json()["status"] == "failed" and "fallback restart failed" in h.json()["detail"], h.text
            r = requests.get(url + "/ready", timeout=30)
            assert r.status_code == 503 and r.json()["status"] == "failed", r.text
            t0 = time.monotonic()
            r = requests.post(url + "/generate", json={"input_ids": PROMPTS[0],
                                                       "sampling_params": {"max_new_tokens": 4}}, timeout=60)
            refused = (r.status_code, r.text, time.monotonic() - t0)
        time.sleep(0.1)
    assert all(code == 200 and st in (None, "recovering", "recovered") or (code, st) == (503, "failed")
               for code, st in seen), seen
    assert refused is not None, f"/health never said failed before the server ended: {seen}"
    code, text, took = refused
    assert code == 503 and "cannot serve" in text and took < 10, refused
    t.join(CLIENT_TIMEOUT_S)
    assert not t.is_alive(), "the request in flight at the failure never ended"
    kind, what = out["r"]
    assert kind == "error" and "503" in what and "cannot serve" in what, out["r"]
    assert srv.proc.wait(timeout=60) != 0, "a server that cannot serve must end (SGLang's tear-down)"
