"""HTTP clients for tests and benchmarks of a running server: greedy generation (plain or
streamed), the admin status, and a background load (streams, plain requests and a /health probe)
whose every result is checked against reference tokens at the end.

Every call is bounded (``timeout`` on each request; thread joins bounded in ``finish``).
"""

from __future__ import annotations

import json
import threading
import time

import requests

__all__ = ["generate", "admin_status", "wait_serving", "BackgroundLoad"]


def generate(url: str, ids: list[int], max_new: int, *, stream: bool = False, timeout: float = 300) -> list[int]:
    """Greedy token ids of ``max_new`` new tokens for ``ids`` (``ignore_eos``); a stream must only grow."""
    body = {"input_ids": ids, "stream": stream,
            "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}}
    r = requests.post(url + "/generate", json=body, timeout=timeout, stream=stream)
    r.raise_for_status()
    if not stream:
        return r.json()["output_ids"]
    out: list[int] = []
    for line in r.iter_lines():
        if line.startswith(b"data:") and line.strip() != b"data: [DONE]":
            now = json.loads(line[5:])["output_ids"]
            if now[:len(out)] != out:
                raise AssertionError(f"stream went back: {out} then {now}")
            out = now
    return out


def admin_status(url: str, token: str) -> dict:
    r = requests.get(url + "/elastic/status", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    r.raise_for_status()
    return r.json()


def wait_serving(url: str, token: str, pred, what: str, timeout: float = 90) -> dict:
    """The status once the server serves and ``pred(status)`` holds; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = admin_status(url, token)
        if st["state"] == "serving" and pred(st):
            return st
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s; status: {admin_status(url, token)}")


class BackgroundLoad:
    """Requests in threads until ``finish``: long streams of the first two prompts, plain requests of
    every prompt, and a /health probe every 0.2 s. ``finish(want, want_long)`` stops them and asserts
    that no request failed, /health never did, and every result equals the reference tokens."""

    def __init__(self, url: str, prompts: list[list[int]], max_new: int, long_new: int):
        self.url, self.prompts, self.max_new, self.long_new = url, prompts, max_new, long_new
        self.results: list = []
        self.errors: list[str] = []
        self.bad_health: list = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._streams, daemon=True),
                        threading.Thread(target=self._plain, daemon=True),
                        threading.Thread(target=self._health, daemon=True)]
        for t in self.threads:
            t.start()

    def _run(self, key, *a, **kw):
        try:
            self.results.append((key, generate(self.url, *a, **kw)))
        except Exception as e:  # noqa: BLE001 - reported by finish's assertion
            self.errors.append(f"{key}: {type(e).__name__}: {e}")

    def _streams(self):
        while not self.stop.is_set():
            for i, p in enumerate(self.prompts[:2]):
                self._run(("long", i), p, self.long_new, stream=True)

    def _plain(self):
        while not self.stop.is_set():
            for i, p in enumerate(self.prompts):
                self._run(("plain", i), p, self.max_new)

    def _health(self):
        while not self.stop.is_set():
            try:
                code = requests.get(self.url + "/health", timeout=30).status_code
            except requests.RequestException as e:
                code = repr(e)
            if code != 200:
                self.bad_health.append(code)
            self.stop.wait(0.2)

    def finish(self, want, want_long) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(300)
        assert not any(t.is_alive() for t in self.threads), "a client thread did not finish"
        assert not self.errors, self.errors
        assert not self.bad_health, f"/health failed: {self.bad_health}"
        assert self.results
        for (kind, i), got in self.results:
            assert got == (want_long if kind == "long" else want)[i], f"{kind} request {i}: {got}"
