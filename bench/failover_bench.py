"""A rank dies under load: in-place failover vs restart-all-from-daemon vs restart-and-reload, in one run.

For a ``sgl_elastic.testing.models`` checkpoint (``--family``, ``--size``, default the bench-size
Qwen3-MoE) at ``--tp`` (default 3), each mode ``--repeats`` times on a fresh server:

1. start the server, warm it up, start a steady client load: ``--clients`` threads sending
   streaming ``/generate`` requests back to back (random prompts of ``--prompt-len`` tokens,
   ``--max-new`` tokens each; a failed request is counted and retried after 0.2 s, as a user would);
2. after ``--warm-s`` seconds, SIGKILL rank 1's process (a device loss);
3. TFS = from the kill to the first streamed token of a request that succeeds, received by a client
   more than 50 ms after the kill (earlier chunks were produced before the fault and were in the
   pipes; a request that ends in an error does not count), on the client's clock;
4. ``--after-s`` seconds later the load stops; requests that failed are counted.

Modes:
- ``elastic``: ``launch_server`` with its defaults (state daemon + in-place failover on the survivors);
- ``restart``: ``--no-elastic-failover`` (every scheduler restarted from the daemon: today's fallback);
- ``reload``: restart-and-reload, what users do today: our launcher with ``--no-elastic-daemon``
  (vanilla SGLang's sharding and failure path: the server tears itself down), then a new server on
  the survivors (tp-1) loading the checkpoint from disk (page cache warm); the clients keep retrying
  against it.

Also measured: the elastic recovery's phases and migration (``/elastic/status``); the daemon's
shared memory at rest before, at rest after, and at its peak during the failover (sampled every
20 ms); decode throughput at tp-1 after the elastic failover against the fresh vanilla tp-1 server of
the ``reload`` mode (same ``--clients`` concurrent non-streaming requests of ``--max-new`` tokens).

Medians over repeats; ``reload / elastic`` is the TFS ratio. One summary table on stdout, JSON in
``--json``. Seeded (``--seed``). Usage:
``python bench/failover_bench.py [--size bench|tiny] [--tp 3] [--repeats 3] [--modes elastic,restart,reload]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import requests
from _common import AUTH, FLAGS, IN_TRANSIT_S, rank_pid

from sgl_elastic.testing.models import build_model
from sgl_elastic.testing.server import ServerProcess


class Load:
    """``clients`` threads streaming requests back to back against ``self.url`` (which may change)."""

    def __init__(self, url: str, clients: int, prompt_len: int, max_new: int, seed: int) -> None:
        self.url, self.stop_ev = url, threading.Event()
        self.tokens: list[float] = []  # arrival time of every streamed chunk of a request that succeeded
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()
        rng = random.Random(seed)
        self.prompts = [[rng.randrange(3, 1000) for _ in range(prompt_len)] for _ in range(64)]
        self.max_new = max_new
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def _one(self, ids) -> None:
        r = requests.post(self.url + "/generate", stream=True, timeout=600, json={
            "input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": self.max_new, "temperature": 0, "ignore_eos": True}})
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}")
        arrivals = []
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk or chunk.get("meta_info", {}).get("finish_reason", {}) and \
                    chunk["meta_info"]["finish_reason"].get("type") == "abort":
                raise RuntimeError(f"aborted: {str(chunk)[:200]}")
            arrivals.append(time.perf_counter())
        with self.lock:  # only a request that succeeded counts as a success
            self.tokens.extend(arrivals)

    def _run(self, i: int) -> None:
        k = i
        while not self.stop_ev.is_set():
            try:
                self._one(self.prompts[k % len(self.prompts)])
                with self.lock:
                    self.ok += 1
            except Exception as e:  # noqa: BLE001 - counted; the "user" retries
                with self.lock:
                    self.failed += 1
                    if len(self.errors) < 5:
                        self.errors.append(f"{type(e).__name__}: {str(e)[:160]}")
                self.stop_ev.wait(0.2)
            k += len(self.threads)

    def first_token_after(self, t: float) -> float | None:
        """Seconds from ``t`` to the first token of a successful request that arrived more than
        ``IN_TRANSIT_S`` after ``t`` (earlier ones were produced before the fault, in the pipes)."""
        with self.lock:
            later = [x for x in self.tokens if x > t + IN_TRANSIT_S]
        return min(later) - t if later else None

    def finish(self) -> None:
        self.stop_ev.set()
        for t in self.threads:
            t.join(600)


def _daemon_shm_bytes(log_path: Path) -> int:
    pids = {int(p) for p in re.findall(r"daemon pid (\d+) started", log_path.read_text(errors="replace"))}
    total = 0
    for e in os.scandir("/dev/shm"):
        if any(e.name.startswith(f"sgle-{p}-") for p in pids):
            try:
                total += e.stat().st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class ShmPeak(threading.Thread):
    def __init__(self, log_path: Path) -> None:
        super().__init__(daemon=True)
        self.log_path, self.peak, self.stop_ev = log_path, 0, threading.Event()

    def run(self) -> None:
        while not self.stop_ev.is_set():
            self.peak = max(self.peak, _daemon_shm_bytes(self.log_path))
            self.stop_ev.wait(0.02)


def _decode_tput(url: str, clients: int, max_new: int, seed: int) -> float:
    rng = random.Random(seed)
    ids = [[rng.randrange(3, 1000) for _ in range(32)] for _ in range(clients)]
    out = [0] * clients

    def one(i: int) -> None:
        r = requests.post(url + "/generate", timeout=600, json={"input_ids": ids[i], "sampling_params": {
            "max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}})
        r.raise_for_status()
        out[i] = len(r.json()["output_ids"])

    one(0)  # warm
    t0 = time.perf_counter()
    ts = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(600)
    return sum(out) / (time.perf_counter() - t0)


def run_once(mode: str, model: str, args, rep: int) -> dict:
    extra = list(FLAGS) + {"elastic": [], "restart": ["--no-elastic-failover"], "reload": ["--no-elastic-daemon"]}[mode]
    srv = ServerProcess(model, tp_size=args.tp, extra_args=extra, start_timeout_s=1800)
    srv.start()
    second: ServerProcess | None = None
    res: dict = {"mode": mode, "repeat": rep, "start_s": srv.start_s}
    try:
        _decode_tput(srv.url, 1, 4, args.seed)  # warm-up
        shm_rest_before = _daemon_shm_bytes(srv.log_path)
        load = Load(srv.url, args.clients, args.prompt_len, args.max_new, args.seed + rep).start()
        time.sleep(args.warm_s)
        peak = ShmPeak(srv.log_path)
        peak.start()
        pid = rank_pid(srv, 1, via_admin=mode == "elastic")
        t_kill = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        if mode == "reload":
            # Step: vanilla SGLang tears the server down; the user relaunches it on the survivors.
            deadline = time.monotonic() + 120
            while srv.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            res["teardown_s"] = time.perf_counter() - t_kill
            srv.stop()
            second = ServerProcess(model, tp_size=args.tp - 1, extra_args=extra, start_timeout_s=1800)
            second.start()
            load.url = second.url
        deadline = time.monotonic() + 1800
        while load.first_token_after(t_kill) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        res["tfs_s"] = load.first_token_after(t_kill)
        time.sleep(args.after_s)
        load.finish()
        peak.stop_ev.set()
        peak.join(5)
        res.update(requests_ok=load.ok, requests_failed=load.failed, errors=load.errors)  # failed: attempts
        live = second or srv
        if mode == "elastic":
            s = requests.get(srv.url + "/elastic/status", headers=AUTH, timeout=30).json()
            rec = s["recoveries"][-1]
            res.update(recovery_s=rec["recovery_s"], phases_s=rec["phases_s"], migration=rec["migration"],
                       outcome=rec["outcome"], widths_after=s["widths"])
            res.update(shm_rest_before=shm_rest_before, shm_peak=peak.peak, shm_rest_after=_daemon_shm_bytes(srv.log_path))
            res["decode_tok_s_after"] = _decode_tput(srv.url, args.clients, args.tput_tokens, args.seed)
        elif mode == "reload":
            res["decode_tok_s_after"] = _decode_tput(live.url, args.clients, args.tput_tokens, args.seed)
        return res
    finally:
        if second is not None:
            second.stop()
        srv.stop()


def _med(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="qwen3-moe")
    ap.add_argument("--size", default="bench", choices=("tiny", "bench"))
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="elastic,restart,reload")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--tput-tokens", type=int, default=32)
    ap.add_argument("--warm-s", type=float, default=8.0)
    ap.add_argument("--after-s", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="results/failover_bench.json")
    args = ap.parse_args(argv)
    if args.tp < 2:
        ap.error("--tp must be >= 2 (a rank is killed)")
    model = str(build_model(args.family, args.size))
    rows: list[dict] = []
    for rep in range(args.repeats):
        for mode in args.modes.split(","):
            print(f"[bench] {mode} repeat {rep + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
            try:
                rows.append(run_once(mode, model, args, rep))
            except Exception as e:  # noqa: BLE001 - kept in the results, the run goes on
                rows.append({"mode": mode, "repeat": rep, "error": f"{type(e).__name__}: {e}"})
            print(f"[bench]   {json.dumps(rows[-1])[:400]}", file=sys.stderr, flush=True)
    summary = {}
    for mode in args.modes.split(","):
        rs = [r for r in rows if r["mode"] == mode and "error" not in r]
        summary[mode] = {k: _med(rs, k) for k in ("tfs_s", "recovery_s", "decode_tok_s_after", "start_s",
                                                  "shm_rest_before", "shm_peak", "shm_rest_after")}
        summary[mode]["requests_failed"] = sum(r.get("requests_failed", 0) for r in rs)
        summary[mode]["requests_ok"] = sum(r.get("requests_ok", 0) for r in rs)
        summary[mode]["runs"] = len(rs)
    e, rl = summary.get("elastic", {}), summary.get("reload", {})
    if e.get("tfs_s") and rl.get("tfs_s"):
        summary["tfs_ratio_reload_over_elastic"] = rl["tfs_s"] / e["tfs_s"]
    if e.get("decode_tok_s_after") and rl.get("decode_tok_s_after"):
        summary["decode_after_elastic_over_vanilla"] = e["decode_tok_s_after"] / rl["decode_tok_s_after"]
    out = {"args": vars(args), "model": model, "runs": rows, "summary": summary}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"\n{args.family}/{args.size}, tp {args.tp} -> {args.tp - 1}, {args.clients} streaming clients,"
          f" medians of {args.repeats} (JSON: {args.json})")
    print(f"{'mode':<9} {'TFS s':>8} {'recovery s':>11} {'failed':>7} {'ok':>5} {'decode tok/s after':>19}")
    for mode in args.modes.split(","):
        m = summary[mode]
        f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        print(f"{mode:<9} {f(m['tfs_s']):>8} {f(m['recovery_s']):>11} {m['requests_failed']:>7} {m['requests_ok']:>5}"
              f" {f(m['decode_tok_s_after'], 1):>19}")
    for k in ("tfs_ratio_reload_over_elastic", "decode_after_elastic_over_vanilla"):
        if k in summary:
            print(f"{k}: {summary[k]:.2f}")
    if e.get("shm_rest_before") is not None:
        print(f"daemon shm: rest {e['shm_rest_before'] / 1e6:.0f} MB before, peak {e['shm_peak'] / 1e6:.0f} MB during,"
              f" rest {e['shm_rest_after'] / 1e6:.0f} MB after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
