"""Seeded chaos runs against a real elastic server (``tests/integration/test_chaos.py``, ``bench/chaos.py``).

One run: start the server, take its own greedy answers to a fixed prompt set (the reference: the
same server before any fault), start a steady mix of clients, then send ``events`` random faults
from outside the server's process tree at random times (0.3-3 s apart, so many land while a
recovery runs). Clients: plain and streaming ``/generate``, the ``openai`` client's streaming
completions and chat, an SGLang frontend program. Events: SIGKILL of any rank (rank 0 included),
SIGSTOP of a rank (left stopped: the controller must fence it), SIGKILL of the state daemon, ``add_rank`` and, with expert
parallelism, ``rebalance``. Then the clients stop and the run is judged:

- every request ended with its full output, equal to the reference (``differ`` counts those that
  did not, ``failed`` those that ended with an error, each with its reason);
- no stream chunk went back or repeated a token (a stream checks that each chunk extends the last);
- no request is still waiting 120 s after the clients stopped, and the server's request audit found
  none that no rank held (``lost``: both together); the server's request accounts add up
  (accepted = finished + errored + lost, none in flight at the end);
- the server ends serving, with no request of the run pending, at the tp the events leave (ranks
  killed or stopped are gone; none of them serves);
- after Ctrl-C (SIGINT to its process group) no process of it and none of the ``/dev/shm`` files
  its processes mapped remain.

The faults never take the last rank: a kill or stop needs two live ranks not already hit.
``ChaosResult.seed`` reproduces a run: ``python bench/chaos.py --family F --seeds S --first S``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import threading
import time

import psutil
import requests

from sgl_elastic.controller import reqtrace
from sgl_elastic.controller.procs import shm_inodes_of
from sgl_elastic.testing.server import ServerProcess, alive as _alive

__all__ = ["ChaosConfig", "ChaosResult", "run_chaos"]

TOKEN = "chaos-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS = [[1, 5, 9, 33, 70, 100], [200, 3, 4], [42, 17], [7, 8, 9, 10], [11, 12, 13, 14, 15]]
TEXTS = ["hello world", "The capital of"]


@dataclasses.dataclass(slots=True)
class ChaosConfig:
    model_path: str
    seed: int
    events: int = 6
    tp: int = 4
    expert_parallel: bool = False  # --ep-size tp --elastic-redundant-experts 4 --elastic-eplb-interval 4
    max_new: int = 12
    kinds: tuple[str, ...] = ("kill", "kill0", "stop", "daemon", "add_rank", "rebalance")
    log_path: str | None = None
    trace_dir: str | None = None  # SGLE_TRACE_REQUESTS for the server (controller.reqtrace)


@dataclasses.dataclass(slots=True)
class ChaosResult:
    seed: int
    events: list[str]
    ok: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)
    differ: list[str] = dataclasses.field(default_factory=list)
    lost: int = 0
    recoveries: int = 0
    fallbacks: list[str] = dataclasses.field(default_factory=list)
    longest_pause_s: float = 0.0
    end_tp: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)  # end state, leaks
    accounting: dict = dataclasses.field(default_factory=dict)  # the server's request accounts at the end

    @property
    def passed(self) -> bool:
        return not (self.failed or self.differ or self.lost or self.problems)

    def row(self) -> dict:
        return {"seed": self.seed, "events": len(self.events), "ok": self.ok, "failed": len(self.failed),
                "differ": len(self.differ), "lost": self.lost, "recoveries": self.recoveries,
                "fallbacks": len(self.fallbacks), "longest_pause_s": round(self.longest_pause_s, 2),
                "end_tp": self.end_tp, "problems": len(self.problems)}

    def describe(self) -> str:
        return json.dumps({"row": self.row(), "events": self.events, "failed": self.failed[:5],
                           "differ": self.differ[:5], "fallbacks": self.fallbacks, "problems": self.problems},
                          indent=1)


def _status(url: str) -> dict:
    r = requests.get(url + "/elastic/status", headers=AUTH, timeout=30)
    r.raise_for_status()
    return r.json()


def _generate(url: str, ids: list[int], n: int, stream: bool) -> list[int]:
    body = {"input_ids": ids, "stream": stream,
            "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}}
    r = requests.post(url + "/generate", json=body, timeout=300, stream=stream)
    r.raise_for_status()
    if not stream:
        return r.json()["output_ids"]
    out: list[int] = []
    for line in r.iter_lines():
        if line.startswith(b"data:") and line.strip() != b"data: [DONE]":
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"stream error chunk: {chunk['error']}")
            now = chunk["output_ids"]
            if now[:len(out)] != out or len(now) < len(out):
                raise AssertionError(f"stream went back or repeated: {out} then {now}")
            out = now
            _check_reason((chunk.get("meta_info") or {}).get("finish_reason"))
    return out


def _check_reason(reason) -> None:
    """A request the server ended early says so in its finish reason: an explicit error, not a short answer."""
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind not in (None, "length", "stop"):
        raise RuntimeError(f"ended by the server: finish_reason {reason!r}")


def _openai(url: str, prompt: str, n: int) -> str:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=300, max_retries=0)
    chunks = client.completions.create(model="default", prompt=prompt, max_tokens=n, temperature=0, stream=True)
    text = []
    for c in chunks:
        if c.choices:
            text.append(c.choices[0].text)
            _check_reason(c.choices[0].finish_reason)
    return "".join(text)


def _openai_chat(url: str, prompt: str, n: int) -> str:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=300, max_retries=0)
    chunks = client.chat.completions.create(model="default", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=n, temperature=0, stream=True)
    text = []
    for c in chunks:
        if c.choices:
            text.append(c.choices[0].delta.content or "")
            _check_reason(c.choices[0].finish_reason)
    return "".join(text)


def _frontend(url: str, prompt: str, n: int) -> str:
    """An SGLang frontend program (``sgl.function`` on ``sgl.RuntimeEndpoint``)."""
    import sglang as sgl

    @sgl.function
    def answer(s, question):
        s += question
        s += sgl.gen("a", max_tokens=n, temperature=0)

    backend = sgl.RuntimeEndpoint(url)
    state = answer.run(question=prompt, backend=backend)
    err = state.error()
    if err is not None:
        raise RuntimeError(f"frontend program failed: {err}")
    _check_reason((state.get_meta_info("a") or {}).get("finish_reason"))
    return state["a"]


class _Clients:
    """Client threads, each looping over its kind of request until ``stop``; every answer is compared
    with the reference. The longest time between two completed requests is the longest pause."""

    def __init__(self, url: str, ref: dict, n: int) -> None:
        self.url, self.ref, self.n = url, ref, n
        self.ok, self.failed, self.differ = 0, [], []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.last_done = time.monotonic()
        self.longest_pause = 0.0
        jobs = [("plain", lambda i: _generate(url, PROMPTS[i % len(PROMPTS)], n, False), len(PROMPTS)),
                ("stream", lambda i: _generate(url, PROMPTS[i % len(PROMPTS)], n, True), len(PROMPTS)),
                ("openai", lambda i: _openai(url, TEXTS[i % len(TEXTS)], n), len(TEXTS)),
                ("chat", lambda i: _openai_chat(url, TEXTS[i % len(TEXTS)], n), len(TEXTS)),
                ("frontend", lambda i: _frontend(url, TEXTS[i % len(TEXTS)], n), len(TEXTS))]
        self.threads = [threading.Thread(target=self._loop, args=job, daemon=True) for job in jobs]
        for t in self.threads:
            t.start()

    def _loop(self, kind: str, fn, count: int) -> None:
        i = 0
        while not self.stop.is_set():
            key = (kind, i % count)
            try:
                got = fn(i)
            except Exception as e:  # noqa: BLE001 - counted, with its reason
                with self.lock:
                    self.failed.append(f"{kind} {i % count}: {type(e).__name__}: {str(e)[:200]}")
            else:
                with self.lock:
                    now = time.monotonic()
                    self.longest_pause = max(self.longest_pause, now - self.last_done)
                    self.last_done = now
                    if got == self.ref[key]:
                        self.ok += 1
                    else:
                        self.differ.append(f"{kind} {i % count}: got {got!r}, before the faults {self.ref[key]!r}")
            i += 1

    def finish(self, timeout_s: float = 120.0) -> int:
        """Stop; the number of requests still waiting after ``timeout_s`` (lost)."""
        self.stop.set()
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return sum(t.is_alive() for t in self.threads)


def _reference(url: str, n: int) -> dict:
    ref = {}
    for i, p in enumerate(PROMPTS):
        ref[("plain", i)] = _generate(url, p, n, False)
        ref[("stream", i)] = ref[("plain", i)]
    for i, t in enumerate(TEXTS):
        ref[("openai", i)] = _openai(url, t, n)
        ref[("chat", i)] = _openai_chat(url, t, n)
        ref[("frontend", i)] = _frontend(url, t, n)
    return ref


def _tree(pid: int) -> list[int]:
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return []


def _note_shm(pids, into: dict) -> None:
    inodes = shm_inodes_of(list(pids))
    for e in os.scandir("/dev/shm"):
        try:
            if e.inode() in inodes:
                into[e.name] = e.inode()
        except OSError:
            continue


def _daemon_pid(srv: ServerProcess) -> int | None:
    for c in _tree(srv.proc.pid)[1:]:
        try:
            if "sgl_elastic.daemon" in " ".join(psutil.Process(c).cmdline()):
                return c
        except psutil.Error:
            continue
    return None


def run_chaos(cfg: ChaosConfig, progress=None) -> ChaosResult:
    """One seeded run (module docstring). ``progress(msg)`` is told each event."""
    rng = random.Random(cfg.seed)
    extra = ["--dtype", "float32", "--elastic-admin-token", TOKEN, "--elastic-hung-timeout", "3",
             "--elastic-standby", "0"]
    kinds = list(cfg.kinds)
    if cfg.expert_parallel:
        extra += ["--ep-size", str(cfg.tp), "--elastic-redundant-experts", "4", "--elastic-eplb-interval", "4"]
    else:
        kinds = [k for k in kinds if k != "rebalance"]
    env = None
    if cfg.trace_dir:
        os.makedirs(cfg.trace_dir, exist_ok=True)
        env = {**os.environ, reqtrace.ENV: cfg.trace_dir}
    srv = ServerProcess(cfg.model_path, tp_size=cfg.tp, extra_args=extra, log_path=cfg.log_path, env=env)
    res = ChaosResult(seed=cfg.seed, events=[])
    srv.start()
    seen: set[int] = set()
    files: dict[str, int] = {}
    hit: set[int] = set()  # rank pids killed or stopped by this run
    try:
        url = srv.url
        ref = _reference(url, cfg.max_new)
        seen |= set(_tree(srv.proc.pid))
        _note_shm(seen, files)
        clients = _Clients(url, ref, cfg.max_new)
        time.sleep(1.0)
        try:
            for k in range(cfg.events):
                time.sleep(rng.uniform(0.3, 3.0))
                st = _status(url)
                live = [r for r in st["ranks"] if r["alive"] and r["pid"] not in hit]
                kind = rng.choice(kinds)
                what = kind
                if kind in ("kill", "kill0", "stop"):
                    if len(live) < 2:
                        kind = "add_rank"
                    else:
                        victim = live[0] if kind == "kill0" else rng.choice(live)
                        sig = signal.SIGSTOP if kind == "stop" else signal.SIGKILL
                        try:
                            os.kill(victim["pid"], sig)
                            hit.add(victim["pid"])
                            what = f"{'SIGSTOP' if kind == 'stop' else 'SIGKILL'} rank {victim['rank']} (pid {victim['pid']})"
                        except ProcessLookupError:
                            what = f"{kind}: rank {victim['rank']} already gone"
                if kind == "daemon":
                    pid = _daemon_pid(srv)
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)
                    what = f"SIGKILL state daemon (pid {pid})"
                if kind in ("add_rank", "rebalance"):
                    r = requests.post(url + f"/elastic/{kind}", headers=AUTH, timeout=30)
                    what = f"{kind}: {r.status_code}"
                what = f"t+{k} [{st['state']} tp {st['tp_size']}] {what}"
                res.events.append(what)
                if progress:
                    progress(what)
                seen |= set(_tree(srv.proc.pid))
                _note_shm(_alive(seen), files)
            # the end: serving with nothing pending (bounded), then the clients stop
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                st = _status(url)
                if st["state"] == "serving" and not st["pending"]:
                    break
                time.sleep(0.5)
            time.sleep(2.0)  # requests go on at the end state
            res.lost = clients.finish()
            res.ok, res.failed, res.differ = clients.ok, clients.failed, clients.differ
            res.longest_pause_s = clients.longest_pause
            st = _status(url)
            res.end_tp = st["tp_size"]
            res.recoveries = len(st["recoveries"])
            res.fallbacks = [r["outcome"] for r in st["recoveries"] if r["fallback"]]
            if st["state"] != "serving":
                res.problems.append(f"the server ends {st['state']}, not serving")
            ranks = [r["pid"] for r in st["ranks"]]
            if set(ranks) & hit:
                res.problems.append(f"ranks killed or stopped still serve: {sorted(set(ranks) & hit)}")
            if not all(r["alive"] for r in st["ranks"]):
                res.problems.append(f"dead ranks listed as serving: {st['ranks']}")
            if st["recoveries"] and st["recoveries"][-1]["outcome"] == "ok" and \
                    st["recoveries"][-1]["tp_after"] != st["tp_size"]:
                res.problems.append(f"tp {st['tp_size']} but the last recovery left {st['recoveries'][-1]['tp_after']}")
            if res.ok == 0:
                res.problems.append("no request completed")
            acc = st["requests"]
            res.accounting = acc
            res.lost += acc["lost"]  # clients still waiting at the end + those the server found and ended
            if acc["lost"]:
                res.problems.append(f"the server found {acc['lost']} lost request(s): {acc['lost_rids']}")
            if acc["in_flight"]:
                res.problems.append(f"{acc['in_flight']} request(s) still in flight after the clients stopped")
            if acc["accepted"] != acc["finished"] + acc["errored"] + acc["lost"] + acc["in_flight"]:
                res.problems.append(f"the request accounts do not add up: {acc}")
        except requests.ConnectionError as e:  # the server ended (state failed): the seed fails, the run goes on
            res.problems.append(f"the server stopped answering: {type(e).__name__}: {str(e)[:200]}")
            if not clients.stop.is_set():
                res.lost = clients.finish()
                res.ok, res.failed, res.differ = clients.ok, clients.failed, clients.differ
                res.longest_pause_s = clients.longest_pause
        # Ctrl-C, then nothing may remain
        for pid in hit:  # a stopped rank left stopped would only be SIGKILLed by the fence
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        seen |= set(_tree(srv.proc.pid))
        _note_shm(_alive(seen), files)
        try:
            os.killpg(srv.proc.pid, signal.SIGINT)
        except ProcessLookupError:  # it ended on its own (state failed)
            pass
        deadline = time.monotonic() + 60
        while (srv.proc.poll() is None or _alive(seen)) and time.monotonic() < deadline:
            time.sleep(0.25)
        if srv.proc.poll() is None or _alive(seen):
            res.problems.append(f"processes left 60 s after Ctrl-C: {_alive(seen)}")
        stale = sorted(n for n, ino in files.items()
                       if os.path.exists(f"/dev/shm/{n}") and os.stat(f"/dev/shm/{n}").st_ino == ino)
        if stale:
            res.problems.append(f"/dev/shm files left after the server stopped: {stale}")
        return res
    finally:
        srv.stop()
