"""HTTP clients for tests and benchmarks of a running server: greedy generation (plain or
streamed), the OpenAI client and an SGLang frontend program, the admin status and bounded waits on
it, a /health probe, a set of requests in flight (``RequestSet``), and a background load
(``BackgroundLoad``: streams, plain requests and a /health probe) whose every result is checked
against reference tokens at the end.

Every call is bounded (``timeout`` on each request; thread joins bounded; every wait raises
AssertionError with what it waited for and what it saw last). Waits poll a real condition (the
server's ``/elastic/status``, a stream's first chunk, ``/v1/loads``): no sleep stands in for "the
requests are in flight now".
"""

from __future__ import annotations

import json
import threading
import time

import requests

__all__ = ["generate", "openai_stream", "frontend_program", "admin_status", "wait_for", "wait_serving",
           "wait_tp", "wait_next_epoch", "wait_state", "wait_in_flight", "rank_pid", "running_requests",
           "HealthProbe", "RequestSet", "BackgroundLoad"]


def generate(url: str, ids: list[int], max_new: int, *, stream: bool = False, timeout: float = 300,
             started: threading.Event | None = None, started_at: int = 1) -> list[int]:
    """Greedy token ids of ``max_new`` new tokens for ``ids`` (``ignore_eos``); a stream must only grow
    (each chunk carries every token so far: none twice, none lost). ``started`` (streams) is set once
    ``started_at`` tokens have streamed: the request is being decoded."""
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
            if started is not None and len(out) >= started_at:
                started.set()
    return out


def openai_stream(url: str, prompt: str, max_new: int) -> str:
    """The text of a streamed completion through the official ``openai`` client (greedy)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=300)
    chunks = client.completions.create(model="default", prompt=prompt, max_tokens=max_new, temperature=0,
                                       stream=True)
    return "".join(c.choices[0].text for c in chunks if c.choices)


def frontend_program(url: str, max_new: int) -> str:
    """The answer of a one-``gen`` SGLang frontend program (greedy) through ``RuntimeEndpoint``."""
    import sglang as sgl

    @sgl.function
    def answer(s, question):
        s += question
        s += sgl.gen("a", max_tokens=max_new, temperature=0)

    backend = sgl.RuntimeEndpoint(url)
    try:
        return answer.run(question="The capital of", backend=backend)["a"]
    finally:
        backend.shutdown() if hasattr(backend, "shutdown") else None


def admin_status(url: str, token: str) -> dict:
    r = requests.get(url + "/elastic/status", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    r.raise_for_status()
    return r.json()


def wait_for(probe, what: str, timeout: float = 60, interval: float = 0.05, last=None):
    """``probe()``'s first truthy value, polled every ``interval`` s; AssertionError after ``timeout``
    s saying ``what`` was awaited (and ``last()``, when given: what it looked like at the end)."""
    deadline = time.monotonic() + timeout
    while True:
        v = probe()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout} s" + (f"; last seen: {last()}" if last else ""))
        time.sleep(interval)


def wait_serving(url: str, token: str, pred, what: str, timeout: float = 90) -> dict:
    """The status once the server serves and ``pred(status)`` holds; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = admin_status(url, token)
        if st["state"] == "serving" and pred(st):
            return st
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s; status: {admin_status(url, token)}")


def wait_tp(url: str, token: str, tp: int, timeout: float = 120) -> dict:
    """The status once the server serves at ``tp`` ranks."""
    return wait_serving(url, token, lambda s: s["tp_size"] == tp, f"serving at tp {tp}", timeout)


def wait_next_epoch(url: str, token: str, epoch: int, timeout: float = 60) -> dict:
    """The status once the server serves in an epoch after ``epoch``."""
    return wait_serving(url, token, lambda s: s["epoch"] != epoch, f"serving in an epoch after {epoch}", timeout)


def wait_state(url: str, token: str, pred, what: str, timeout: float = 60, interval: float = 0.02) -> dict:
    """The status once ``pred(status)`` holds, in any phase (e.g. a recovery's): polled every
    ``interval`` s, AssertionError after ``timeout`` s."""
    box = {}

    def probe():
        box["st"] = admin_status(url, token)
        return pred(box["st"])

    wait_for(probe, what, timeout, interval, last=lambda: box.get("st"))
    return box["st"]


def wait_in_flight(url: str, token: str, n: int, timeout: float = 60) -> dict:
    """The status once the server's request accounts hold at least ``n`` requests in flight
    (accepted, not ended): the requests sent are inside the server now."""
    return wait_state(url, token, lambda s: s["requests"]["in_flight"] >= n, f"{n} requests in flight", timeout)


def rank_pid(url: str, token: str, rank: int) -> int:
    return next(r["pid"] for r in admin_status(url, token)["ranks"] if r["rank"] == rank)


def running_requests(url: str) -> int:
    """Requests the schedulers run now, by SGLang's own ``/v1/loads`` (any server, failover or not)."""
    r = requests.get(url + "/v1/loads", timeout=30)
    r.raise_for_status()
    return sum(int(x.get("num_running_reqs", 0)) for x in r.json()["loads"])


class HealthProbe(threading.Thread):
    """Polls /health every 0.2 s until stopped; records every answer that is not 200."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.bad, self.count, self.stop_ev = url, [], 0, threading.Event()

    def run(self):
        while not self.stop_ev.is_set():
            try:
                code = requests.get(self.url + "/health", timeout=30).status_code
            except requests.RequestException as e:
                code = repr(e)
            self.count += 1
            if code != 200:
                self.bad.append(code)
            self.stop_ev.wait(0.2)

    def finish(self) -> list:
        """Stop probing; the answers that were not 200."""
        self.stop_ev.set()
        self.join(60)
        assert not self.is_alive(), "the /health probe did not stop within 60 s"
        return self.bad


class RequestSet:
    """Every prompt as a /generate and as a streaming /generate, each in a started thread; ``check``
    joins them and asserts the tokens. With ``refs`` ({"openai": text, "sgl": text}, answers before
    the failure) also the ``openai`` client streaming and an SGLang frontend program.
    ``wait_started`` returns once every stream has produced its first chunk (or ended)."""

    def __init__(self, url: str, prompts: list[list[int]], max_new: int, refs: dict | None = None):
        self.prompts = prompts
        self.results, self.errors, self.refs = {}, [], refs or {}
        self.started = {i: threading.Event() for i in range(len(prompts))}
        jobs = [(i, generate, p, max_new) for i, p in enumerate(prompts)]
        jobs += [(f"s{i}", generate, p, max_new) for i, p in enumerate(prompts)]
        if refs:
            jobs += [("openai", openai_stream, "hello world", max_new), ("sgl", frontend_program, max_new)]
        self.threads = [threading.Thread(target=self._run, args=(k, fn, url, *a), daemon=True) for k, fn, *a in jobs]
        for t in self.threads:
            t.start()

    def _run(self, key, fn, *a):
        stream = isinstance(key, str) and key.startswith("s") and key[1:].isdigit()
        ev = self.started[int(key[1:])] if stream else None
        try:
            self.results[key] = fn(*a, stream=True, started=ev) if stream else fn(*a)
        except Exception as e:  # noqa: BLE001 - reported by check()
            self.errors.append(f"{key}: {type(e).__name__}: {e}")
        finally:
            if ev is not None:
                ev.set()

    def wait_started(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for i, ev in self.started.items():
            assert ev.wait(max(0.0, deadline - time.monotonic())), \
                f"stream {i} produced no chunk within {timeout} s; errors: {self.errors}"

    def check(self, want) -> None:
        for t in self.threads:
            t.join(300)
        assert not any(t.is_alive() for t in self.threads), "a request did not finish within 300 s"
        assert not self.errors, self.errors
        assert [self.results[i] for i in range(len(self.prompts))] == want
        assert [self.results[f"s{i}"] for i in range(len(self.prompts))] == want
        for k, v in self.refs.items():
            assert self.results[k] == v, (k, self.results[k], v)


class BackgroundLoad:
    """Requests in threads until ``finish``: long streams of the first two prompts, plain requests of
    every prompt, and a /health probe every 0.2 s. ``finish(want, want_long)`` stops them and asserts
    that no request failed, /health never did, and every result equals the reference tokens.

    ``wait_started`` returns once a long stream has produced its first chunk (requests are being
    decoded); ``wait_served(mark, ...)`` once, after ``mark = load.mark()``, that many requests of
    each kind have completed (the server served them)."""

    def __init__(self, url: str, prompts: list[list[int]], max_new: int, long_new: int):
        self.url, self.prompts, self.max_new, self.long_new = url, prompts, max_new, long_new
        self.results: list = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.streaming = threading.Event()
        self.health = HealthProbe(url)
        self.threads = [threading.Thread(target=self._streams, daemon=True),
                        threading.Thread(target=self._plain, daemon=True)]
        self.health.start()
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
                self._run(("long", i), p, self.long_new, stream=True, started=self.streaming)

    def _plain(self):
        while not self.stop.is_set():
            for i, p in enumerate(self.prompts):
                self._run(("plain", i), p, self.max_new)

    def wait_started(self, timeout: float = 120) -> None:
        assert self.streaming.wait(timeout), f"no long stream produced a chunk within {timeout} s: {self.errors}"

    def mark(self) -> int:
        return len(self.results)

    def wait_served(self, mark: int, long: int = 1, plain: int = 1, timeout: float = 120) -> None:
        def done():
            kinds = [k for (k, _i), _ in self.results[mark:]]
            return kinds.count("long") >= long and kinds.count("plain") >= plain

        wait_for(done, f"{long} long and {plain} plain requests served after the mark", timeout, 0.05,
                 last=lambda: (self.results[mark:], self.errors))

    def finish(self, want, want_long) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(300)
        assert not any(t.is_alive() for t in self.threads), "a client thread did not finish"
        bad_health = self.health.finish()
        assert not self.errors, self.errors
        assert not bad_health, f"/health failed: {bad_health}"
        assert self.results
        for (kind, i), got in self.results:
            assert got == (want_long if kind == "long" else want)[i], f"{kind} request {i}: {got}"
