"""A rank dies under load: in-place failover vs restart-all-from-daemon vs restart-and-reload, in one run.

For a ``sgl_elastic.testing.models`` checkpoint (``--family``, ``--size``, default the bench-size
Qwen3-MoE) at ``--tp`` (default 3), each mode ``--repeats`` times on a fresh server:

1. start the server, warm it up, start a steady client load: ``--clients`` threads sending
   streaming ``/generate`` requests back to back (random prompts of ``--prompt-len`` tokens,
   ``--max-new`` tokens each; a failed request is counted and retried after 0.2 s, as a user would);
2. after ``--warm-s`` seconds, SIGKILL rank ``--kill-rank``'s process (default 1; a device loss;
   rank 0 too: a survivor takes over the intake and the requests lost with it are re-submitted);
3. TFS = from the kill to the first streamed token of a request that succeeds, received by a client
   more than 50 ms after the kill (earlier chunks were produced before the fault and were in the
   pipes; a request that ends in an error does not count), on the client's clock;
   Also "all clients": from the kill until every client had such a token (the last interrupted
   stream going again);
4. ``--after-s`` seconds later the load stops; requests that failed are counted.

Modes:
- ``elastic``: ``launch_server`` with its defaults (state daemon + in-place failover on the survivors);
- ``restart``: ``--no-elastic-failover`` (every scheduler restarted from the daemon: today's fallback);
- ``reload``: restart-and-reload, what users do today: our launcher with ``--no-elastic-daemon``
  (vanilla SGLang's sharding and failure path: the server tears itself down), then a new server on
  the survivors (tp-1) loading the checkpoint from disk (page cache warm); the clients keep retrying
  against it.

``--add-rank fresh|standby``: after the kills, ``POST /elastic/add_rank`` under the same load
(a fresh process, or the warm standby of ``--elastic-standby 1``): time from the request to serving
at tp+1, and the pause (the scale-up's regroup to the first token after it).

``--steps N`` (default 1): in ``elastic`` mode, N failures in a row on the same server (``--tp 4
--steps 3``: 4 -> 3 -> 2 -> 1), the client load running throughout; each step waits until
``/elastic/status`` serves at the new tp, then ``--warm-s`` seconds of steady load, then the next
kill. The ``reload`` baseline of step k (tp t -> t-1) is its own fresh vanilla server at t, killed,
then a vanilla server at t-1; one per step, in the same run. ``restart`` runs the first step only
(it restarts at the same tp). Per step: TFS, recovery_s and phases (``/elastic/status``), failed
requests (attempts from that step's kill to the next one, or to the end).

Also measured: the elastic recovery's phases and migration (``/elastic/status``); the daemon's
shared memory at rest before, at rest after, and at its peak during the failover (sampled every
20 ms); decode throughput at tp-N after the elastic failovers against the fresh vanilla tp-N server of
the ``reload`` mode's last step (same ``--clients`` concurrent non-streaming requests of ``--max-new`` tokens).

Medians over repeats; ``reload / elastic`` is the TFS ratio. A summary table (first step) and a
per-step table on stdout, JSON in ``--json`` (each run's top-level fields are its first step's, as
with ``--steps 1``; ``steps`` lists every step; ``summary.steps`` the per-step medians). Seeded (``--seed``). Usage:
``python bench/failover_bench.py [--size bench|tiny] [--tp 3] [--repeats 3] [--modes elastic,restart,reload]
[--kill-rank 1] [--steps 1]``; ``--nodes 2 --tp 4``: across two nodes (``bench/_nodes_failover.py``).
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

    def __init__(self, url: str, clients: int, prompt_len: int, max_new: int, seed: int, max_id: int = 1000) -> None:
        self.url, self.stop_ev = url, threading.Event()
        self.tokens: list[float] = []  # arrival time of every streamed chunk of a request that succeeded
        self.client_tokens: list[list[float]] = [[] for _ in range(clients)]  # the same, per client
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()
        rng = random.Random(seed)
        self.prompts = [[rng.randrange(3, max_id) for _ in range(prompt_len)] for _ in range(64)]
        self.max_new = max_new
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def _one(self, ids, i: int) -> None:
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
            self.client_tokens[i].extend(arrivals)

    def _run(self, i: int) -> None:
        k = i
        while not self.stop_ev.is_set():
            try:
                self._one(self.prompts[k % len(self.prompts)], i)
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

    def every_client_after(self, t: float) -> float | None:
        """Seconds from ``t`` until every client had a token after it (``first_token_after`` per
        client, the largest): when the last interrupted stream was going again. None if one had none."""
        with self.lock:
            firsts = [min((x for x in ts if x > t + IN_TRANSIT_S), default=None) for ts in self.client_tokens]
        return None if any(f is None for f in firsts) else max(firsts) - t

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


def _decode_tput(url: str, clients: int, max_new: int, seed: int, max_id: int = 1000) -> float:
    rng = random.Random(seed)
    ids = [[rng.randrange(3, max_id) for _ in range(32)] for _ in range(clients)]
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


def _status(srv: ServerProcess) -> dict:
    return requests.get(srv.url + "/elastic/status", headers=AUTH, timeout=30).json()


def _wait_recovered(srv: ServerProcess, tp_after: int, num_recoveries_before: int, timeout_s: float) -> dict:
    """Poll ``/elastic/status`` until the server serves at ``tp_after`` after a new recovery; returns
    that recovery. Raises if the recovery ended FAILED or did not end within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    s: dict = {}
    while time.monotonic() < deadline:
        try:
            s = _status(srv)
        except requests.RequestException:
            time.sleep(0.1)
            continue
        recs = s["recoveries"][num_recoveries_before:]
        if s["state"] == "serving" and s["tp_size"] == tp_after and any(r["outcome"] == "ok" for r in recs):
            return next(r for r in reversed(recs) if r["outcome"] == "ok")
        if s["state"] == "failed" or (s["state"] == "serving" and recs and recs[-1]["outcome"].startswith("failed")):
            raise RuntimeError(f"recovery to tp {tp_after} failed: state {s['state']},"
                               f" outcome {recs[-1]['outcome'] if recs else '-'}")
        time.sleep(0.1)
    raise RuntimeError(f"not serving at tp {tp_after} {timeout_s:.0f} s after the kill: state {s.get('state')},"
                       f" tp_size {s.get('tp_size')}")


def _wait_tfs(load: Load, t_kill: float, srv: ServerProcess, timeout_s: float = 1800) -> float | None:
    """TFS of the kill at ``t_kill`` (``Load.first_token_after``); None if ``srv`` exits first or
    ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while load.first_token_after(t_kill) is None and time.monotonic() < deadline and srv.proc.poll() is None:
        time.sleep(0.05)
    return load.first_token_after(t_kill)


def _no_tfs_why(srv: ServerProcess) -> str:
    rc = srv.proc.poll()
    return (f"no token of a successful request after the kill: the server exited ({rc})" if rc is not None
            else "no token of a successful request after the kill within the timeout") + f"; log {srv.log_path}"


def run_elastic(model: str, args, rep: int, mode: str = "elastic") -> dict:
    """``--steps`` failures in a row on one elastic server at ``--tp``, under one client load
    (``mode`` "elastic-move": the survivors' kept bytes moved inside their segments, the layout before
    the remapped one, ``--elastic-in-place move``).

    Returns the first step's fields at the top level (as with one step) and ``steps``: one dict per
    step (tp_before, tp_after, killed_rank, tfs_s, recovery_s, phases_s, requests_failed, ...)."""
    extra = list(FLAGS) + (["--elastic-standby", "1"] if args.add_rank == "standby" else [])
    if mode == "elastic-move":
        extra += ["--elastic-in-place", "move"]
    srv = ServerProcess(model, tp_size=args.tp, extra_args=extra, start_timeout_s=1800)
    srv.start()
    res: dict = {"mode": mode, "repeat": rep, "start_s": srv.start_s, "server_log": str(srv.log_path)}
    load: Load | None = None
    peak: ShmPeak | None = None
    try:
        _decode_tput(srv.url, 1, 4, args.seed, args.max_token_id)  # warm-up
        shm_rest_before = _daemon_shm_bytes(srv.log_path)
        load = Load(srv.url, args.clients, args.prompt_len, args.max_new, args.seed + rep,
                    args.max_token_id).start()
        time.sleep(args.warm_s)
        peak = ShmPeak(srv.log_path)
        peak.start()
        steps: list[dict] = []
        for i in range(args.steps):
            tp_before = args.tp - i
            step: dict = {"step": i + 1, "tp_before": tp_before, "tp_after": tp_before - 1,
                          "killed_rank": args.kill_rank, "tfs_s": None}
            steps.append(step)
            failed_before = load.failed
            try:
                # Step 1: SIGKILL the rank (its pid from /elastic/status: ranks are renumbered after a recovery).
                num_recoveries_before = len(_status(srv)["recoveries"])
                step["killed_pid"] = pid = rank_pid(srv, args.kill_rank, via_admin=True)
                t_kill = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                # Step 2: first token of a successful request after the kill; serving at tp-1 again.
                step["tfs_s"] = _wait_tfs(load, t_kill, srv)
                if step["tfs_s"] is None:
                    raise RuntimeError(_no_tfs_why(srv))
                rec = _wait_recovered(srv, tp_before - 1, num_recoveries_before, 600)
            except (RuntimeError, requests.RequestException) as e:
                step["error"] = f"{type(e).__name__}: {e}"
                step["requests_failed"] = load.failed - failed_before
                break
            step.update(recovery_s=rec["recovery_s"], phases_s=rec["phases_s"], migration=rec["migration"],
                        outcome=rec["outcome"], widths_after=rec["widths_after"], server_tfs_s=rec.get("tfs_s"),
                        resumed_requests=rec.get("resumed_requests"))
            # Step 3: steady load at the new tp before the next kill (or --after-s after the last one).
            time.sleep(args.warm_s if i + 1 < args.steps else args.after_s)
            step["every_client_s"] = load.every_client_after(t_kill)
            step["requests_failed"] = load.failed - failed_before  # attempts, kill -> next kill (or end)
            step["shm_rest_after"] = _daemon_shm_bytes(srv.log_path)
        add_ok = args.add_rank and all("error" not in st for st in steps)
        if add_ok:  # decode throughput at tp - steps first (the reload baseline's tp), then the scale-up
            load.finish()
            carried = (load.ok, load.failed, list(load.errors))
            res["decode_tp"] = args.tp - args.steps
            res["decode_tok_s_after"] = _decode_tput(srv.url, args.clients, args.tput_tokens, args.seed,
                                                     args.max_token_id)
            load = Load(srv.url, args.clients, args.prompt_len, args.max_new, args.seed + rep + 1000,
                        args.max_token_id).start()
            time.sleep(args.warm_s)
            res["add_rank"] = _add_rank_step(srv, load, args)
        load.finish()
        peak.stop_ev.set()
        peak.join(5)
        first = steps[0]
        ok0, failed0, errors0 = carried if add_ok else (0, 0, [])  # the kills' load, before the scale-up's
        res.update(tfs_s=first["tfs_s"], every_client_s=first.get("every_client_s"), requests_ok=ok0 + load.ok,
                   requests_failed=failed0 + load.failed, errors=errors0 + load.errors)
        res["killed_rank"] = args.kill_rank
        res["steps"] = steps
        if "error" in first:
            res["error"] = first["error"]
            return res
        res.update(recovery_s=first["recovery_s"], phases_s=first["phases_s"], migration=first["migration"],
                   outcome=first["outcome"],
                   widths_after=_status(srv)["widths"] if args.steps == 1 else first["widths_after"])
        res.update(shm_rest_before=shm_rest_before, shm_peak=peak.peak, shm_rest_after=_daemon_shm_bytes(srv.log_path))
        if all("error" not in st for st in steps) and not add_ok:
            res["decode_tp"] = args.tp - args.steps
            res["decode_tok_s_after"] = _decode_tput(srv.url, args.clients, args.tput_tokens, args.seed, args.max_token_id)
        return res
    finally:
        if load is not None:
            load.finish()
        if peak is not None:
            peak.stop_ev.set()
        srv.stop()


def _add_rank_step(srv: ServerProcess, load: Load, args) -> dict:
    """``POST /elastic/add_rank`` under the load: ``ready_s`` = request -> serving at tp+1 (a fresh
    process imports SGLang first; a standby does not); ``pause_s`` = the scale-up's own TFS (regroup
    -> first token after it, server clock); ``recovery_s`` and phases from /elastic/status."""
    s = _status(srv)
    tp, n_before = s["tp_size"], len(s["recoveries"])
    out: dict = {"tp_before": tp, "tp_after": tp + 1, "standby": args.add_rank == "standby"}
    if args.add_rank == "standby":
        deadline = time.monotonic() + 300
        while not _status(srv)["standby"] and time.monotonic() < deadline:
            time.sleep(0.5)
        out["standby_ready"] = bool(_status(srv)["standby"])
    failed_before = load.failed
    t0 = time.perf_counter()
    r = requests.post(srv.url + "/elastic/add_rank", headers=AUTH, timeout=30)
    if r.status_code != 202:
        out["error"] = f"add_rank: {r.status_code} {r.text[:200]}"
        return out
    try:
        rec = _wait_recovered(srv, tp + 1, n_before, 600)
    except RuntimeError as e:
        out["error"] = str(e)
        return out
    out["ready_s"] = time.perf_counter() - t0
    time.sleep(args.after_s)
    rec = _status(srv)["recoveries"][-1]
    out.update(pause_s=rec.get("tfs_s"), recovery_s=rec["recovery_s"], phases_s=rec["phases_s"],
               migration=rec["migration"], outcome=rec["outcome"], widths_after=rec["widths_after"],
               requests_failed=load.failed - failed_before)
    return out


def run_once(mode: str, model: str, args, rep: int, tp: int | None = None, *, measure_tput: bool = True) -> dict:
    """One ``restart`` or ``reload`` run at ``tp`` (default ``--tp``): rank ``--kill-rank`` SIGKILLed
    under load; for ``reload``, a vanilla server at tp-1 started after the teardown."""
    tp = args.tp if tp is None else tp
    extra = list(FLAGS) + {"restart": ["--no-elastic-failover"], "reload": ["--no-elastic-daemon"]}[mode]
    srv = ServerProcess(model, tp_size=tp, extra_args=extra, start_timeout_s=1800)
    srv.start()
    second: ServerProcess | None = None
    res: dict = {"mode": mode, "repeat": rep, "start_s": srv.start_s, "tp_before": tp,
                 "tp_after": tp - 1 if mode == "reload" else tp, "killed_rank": args.kill_rank,
                 "server_log": str(srv.log_path)}
    load: Load | None = None
    try:
        _decode_tput(srv.url, 1, 4, args.seed, args.max_token_id)  # warm-up
        load = Load(srv.url, args.clients, args.prompt_len, args.max_new, args.seed + rep,
                    args.max_token_id).start()
        time.sleep(args.warm_s)
        pid = rank_pid(srv, args.kill_rank, via_admin=False)
        t_kill = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        if mode == "reload":
            # Step: vanilla SGLang tears the server down (whichever rank died); the user relaunches it on the survivors.
            deadline = time.monotonic() + 120
            while srv.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            res["teardown_s"] = time.perf_counter() - t_kill
            srv.stop()
            second = ServerProcess(model, tp_size=tp - 1, extra_args=extra, start_timeout_s=1800)
            res["restart_server_log"] = str(second.log_path)
            second.start()
            res["restart_start_s"] = second.start_s
            load.url = second.url
        res["tfs_s"] = _wait_tfs(load, t_kill, second or srv)
        if res["tfs_s"] is None:
            raise RuntimeError(_no_tfs_why(second or srv))
        time.sleep(args.after_s)
        res["every_client_s"] = load.every_client_after(t_kill)
        load.finish()
        res.update(requests_ok=load.ok, requests_failed=load.failed, errors=load.errors)  # failed: attempts
        if mode == "reload" and measure_tput:
            res["decode_tp"] = tp - 1
            res["decode_tok_s_after"] = _decode_tput(second.url, args.clients, args.tput_tokens, args.seed, args.max_token_id)
        return res
    finally:
        if load is not None:
            load.finish()
        if second is not None:
            second.stop()
        srv.stop()


def run_reload_steps(model: str, args, rep: int) -> dict:
    """The ``reload`` baseline of every step: a fresh vanilla server at tp, tp-1, ..., each killed and
    replaced by one at one rank fewer. The first step's fields at the top level, ``steps`` all of them;
    decode throughput after the last step only (the tp the elastic server ends at)."""
    steps = []
    for i in range(args.steps):
        tp = args.tp - i
        print(f"[bench]   reload step {i + 1}/{args.steps}: tp {tp} -> {tp - 1}", file=sys.stderr, flush=True)
        try:
            st = run_once("reload", model, args, rep, tp, measure_tput=i + 1 == args.steps)
        except Exception as e:  # noqa: BLE001 - kept in the results, the other steps go on
            st = {"mode": "reload", "repeat": rep, "tp_before": tp, "tp_after": tp - 1,
                  "killed_rank": args.kill_rank, "error": f"{type(e).__name__}: {e}"}
        st["step"] = i + 1
        steps.append(st)
    res = {k: v for k, v in steps[0].items() if k not in ("step", "decode_tp", "decode_tok_s_after")}
    for k in ("decode_tp", "decode_tok_s_after"):
        if k in steps[-1]:
            res[k] = steps[-1][k]
    res["steps"] = [{k: v for k, v in st.items() if k not in ("mode", "repeat")} for st in steps]
    return res  # with the first step's "error", if it had one


def _read_alone_s(model: str, nbytes: int, repeats: int = 3) -> float:
    """Median seconds to read ``nbytes`` of the checkpoint (whole tensors, largest first) with the
    migration's reader into new shared-memory pages (not pre-faulted: a migration gets new pages too),
    page cache warm: what a migration that only reloaded the lost bytes would take."""
    from sgl_elastic.executor.safetensors_io import SafetensorsCheckpoint
    from sgl_elastic.executor.shm import ShardSpec, ShmArena

    times = []
    with SafetensorsCheckpoint(model) as ck:
        chosen, total = [], 0
        for name, e in sorted(ck.entries.items(), key=lambda kv: -kv[1].nbytes):
            if total >= nbytes:
                break
            chosen.append((name, e))
            total += e.nbytes
        for _ in range(repeats):
            with ShmArena.create("readalone", [ShardSpec("x", (total,), 1)]) as a:
                buf, off = a.array("x"), 0
                t = time.perf_counter()
                for name, e in chosen:
                    ck.read_region(name, buf[off:off + e.nbytes])
                    off += e.nbytes
                times.append((time.perf_counter() - t) * nbytes / total)
                del buf
    return statistics.median(times)


def _med(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _step_summary(rows: list[dict], args) -> list[dict]:
    """Per step, over repeats: medians of elastic TFS, recovery_s and phases; reload TFS; their ratio;
    failed request attempts (sums); steps that ended in an error are left out of the medians."""
    out = []
    for i in range(args.steps):
        def at(mode: str) -> list[dict]:
            return [r["steps"][i] for r in rows if r["mode"] == mode and len(r.get("steps", [])) > i]
        el, rl = [s for s in at("elastic") if "error" not in s], [s for s in at("reload") if "error" not in s]
        phases = list(dict.fromkeys(p for s in el for p in s.get("phases_s", {})))  # in phase order
        m = {"step": i + 1, "tp_before": args.tp - i, "tp_after": args.tp - i - 1, "killed_rank": args.kill_rank,
             "elastic_tfs_s": _med(el, "tfs_s"), "elastic_recovery_s": _med(el, "recovery_s"),
             "elastic_phases_s": {p: statistics.median([s["phases_s"][p] for s in el if p in s["phases_s"]])
                                  for p in phases},
             "elastic_requests_failed": sum(s.get("requests_failed", 0) for s in at("elastic")),
             "elastic_runs": len(el), "elastic_errors": [s["error"] for s in at("elastic") if "error" in s],
             "reload_tfs_s": _med(rl, "tfs_s"),
             "reload_requests_failed": sum(s.get("requests_failed", 0) for s in at("reload")),
             "reload_runs": len(rl), "reload_errors": [s["error"] for s in at("reload") if "error" in s]}
        if m["elastic_tfs_s"] and m["reload_tfs_s"]:
            m["tfs_ratio_reload_over_elastic"] = m["reload_tfs_s"] / m["elastic_tfs_s"]
        out.append(m)
    return out


def _print_steps(steps: list[dict], args) -> None:
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    print(f"\nper step (elastic: {args.steps} kill(s) in a row on one server; reload: a fresh vanilla server per"
          f" step; failed: request attempts, sums)")
    print(f"{'step':<5} {'tp':>7} {'rank':>5} {'elastic TFS s':>14} {'recovery s':>11} {'reload TFS s':>13}"
          f" {'reload/elastic':>15} {'failed el':>10} {'failed rl':>10}")
    for m in steps:
        print(f"{m['step']:<5} {str(m['tp_before']) + ' -> ' + str(m['tp_after']):>7} {m['killed_rank']:>5}"
              f" {f(m['elastic_tfs_s']):>14} {f(m['elastic_recovery_s']):>11} {f(m['reload_tfs_s']):>13}"
              f" {f(m.get('tfs_ratio_reload_over_elastic')):>15} {m['elastic_requests_failed']:>10}"
              f" {m['reload_requests_failed']:>10}")
    for m in steps:
        if m["elastic_phases_s"]:
            print(f"step {m['step']} elastic phases (s): "
                  + ", ".join(f"{p} {v:.3f}" for p, v in m["elastic_phases_s"].items()))
        for mode in ("elastic", "reload"):
            for err in m[f"{mode}_errors"]:
                print(f"step {m['step']} {mode} error: {err[:200]}")


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
    ap.add_argument("--kill-rank", type=int, default=1, help="TP rank SIGKILLed at each step (0: the intake rank)")
    ap.add_argument("--steps", type=int, default=1, help="failures in a row on one elastic server (tp -> tp-N)")
    ap.add_argument("--add-rank", choices=("fresh", "standby"), default=None,
                    help="after the kills, POST /elastic/add_rank under the same load (elastic mode): a fresh process"
                         " (pays SGLang's import) or the warm standby (--elastic-standby 1)")
    ap.add_argument("--nodes", type=int, default=1, choices=(1, 2),
                    help="2: tp --tp over two nodes of this machine (bench/_nodes_failover.py): a rank on node 1"
                         " and node 1 whole lost, elastic against vanilla SGLang relaunched on what is left")
    ap.add_argument("--events", default="rank,node,rank-slow", help="with --nodes 2: rank, node, rank-slow")
    ap.add_argument("--slow-gbps", type=float, default=0.125, help="with --nodes 2, rank-slow: the link's GB/s")
    ap.add_argument("--ep", action=argparse.BooleanOptionalAction, default=True,
                    help="with --nodes 2: expert parallelism (--ep-size = tp)")
    ap.add_argument("--json", default="results/failover_bench.json")
    args = ap.parse_args(argv)
    if args.nodes == 2:
        if args.tp % 2 or args.tp < 4:
            ap.error("--nodes 2: give an even --tp >= 4 (SGLang runs tp/2 ranks per node; a rank loss relaunches tp-2)")
        model = str(build_model(args.family, args.size))
        args.max_token_id = min(1000, json.loads((Path(model) / "config.json").read_text())["vocab_size"])
        from _nodes_failover import main_nodes

        return main_nodes(args, model, Load)
    if args.tp < 2:
        ap.error("--tp must be >= 2 (a rank is killed)")
    if not 1 <= args.steps <= args.tp - 1:
        ap.error(f"--steps {args.steps}: must be 1..{args.tp - 1} (tp {args.tp} ends at tp {args.tp} - steps >= 1)")
    if not 0 <= args.kill_rank <= args.tp - args.steps:
        ap.error(f"--kill-rank {args.kill_rank}: the last step runs at tp {args.tp - args.steps + 1}, so ranks"
                 f" 0..{args.tp - args.steps} exist at every step")
    model = str(build_model(args.family, args.size))
    # Prompt token ids are drawn from [3, 1000), below the vocabulary (the tiny models have 512 ids: an id
    # past it is masked to zeros by a vocab-parallel embedding at tp > 1 but fails the forward at tp 1).
    args.max_token_id = min(1000, json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    rows: list[dict] = []
    for rep in range(args.repeats):
        for mode in args.modes.split(","):
            print(f"[bench] {mode} repeat {rep + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
            try:
                if mode.startswith("elastic"):
                    rows.append(run_elastic(model, args, rep, mode))
                else:
                    run = {"reload": run_reload_steps}.get(mode)
                    rows.append(run(model, args, rep) if run else run_once(mode, model, args, rep))
            except Exception as e:  # noqa: BLE001 - kept in the results, the run goes on
                rows.append({"mode": mode, "repeat": rep, "error": f"{type(e).__name__}: {e}"})
            print(f"[bench]   {json.dumps(rows[-1])[:400]}", file=sys.stderr, flush=True)
    summary = {}
    for mode in args.modes.split(","):
        rs = [r for r in rows if r["mode"] == mode and "error" not in r]
        summary[mode] = {k: _med(rs, k) for k in ("tfs_s", "every_client_s", "recovery_s", "decode_tok_s_after",
                                                  "start_s", "shm_rest_before", "shm_peak", "shm_rest_after")}
        summary[mode]["requests_failed"] = sum(r.get("requests_failed", 0) for r in rs)
        summary[mode]["requests_ok"] = sum(r.get("requests_ok", 0) for r in rs)
        summary[mode]["runs"] = len(rs)
        migs = [r["migration"] for r in rs if r.get("migration")]
        for k in ("achieved_s", "move_s", "reload_s", "copy_s", "alloc_s", "reload_bytes", "keep_bytes",
                  "remapped_bytes", "alloc_bytes"):
            vals = [m[k] for m in migs if m.get(k) is not None]
            summary[mode][f"migration_{k}"] = statistics.median(vals) if vals else None
    lost = [summary[m].get("migration_reload_bytes") for m in summary if summary[m].get("migration_reload_bytes")]
    if lost:  # the floor of a migration: reading the lost bytes alone, into new pages, measured now
        summary["read_lost_alone_s"] = _read_alone_s(model, int(statistics.median(lost)))
    e, rl = summary.get("elastic", {}), summary.get("reload", {})
    if e.get("tfs_s") and rl.get("tfs_s"):
        summary["tfs_ratio_reload_over_elastic"] = rl["tfs_s"] / e["tfs_s"]
    if e.get("decode_tok_s_after") and rl.get("decode_tok_s_after"):
        summary["decode_after_elastic_over_vanilla"] = e["decode_tok_s_after"] / rl["decode_tok_s_after"]
    summary["steps"] = _step_summary(rows, args)
    out = {"args": vars(args), "model": model, "runs": rows, "summary": summary}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"\n{args.family}/{args.size}, tp {args.tp} -> {args.tp - 1}, {args.clients} streaming clients,"
          f" medians of {args.repeats} (JSON: {args.json})")
    if args.steps > 1:
        print(f"(first of {args.steps} steps; failed/ok: whole runs; decode after: tp {args.tp - args.steps})")
    print(f"{'mode':<9} {'TFS s':>8} {'all clients s':>14} {'recovery s':>11} {'failed':>7} {'ok':>5}"
          f" {'decode tok/s after':>19}")
    for mode in args.modes.split(","):
        m = summary[mode]
        f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        print(f"{mode:<9} {f(m['tfs_s']):>8} {f(m['every_client_s']):>14} {f(m['recovery_s']):>11}"
              f" {m['requests_failed']:>7} {m['requests_ok']:>5}"
              f" {f(m['decode_tok_s_after'], 1):>19}")
    for k in ("tfs_ratio_reload_over_elastic", "decode_after_elastic_over_vanilla"):
        if k in summary:
            print(f"{k}: {summary[k]:.2f}")
    for mode in args.modes.split(","):
        m = summary[mode]
        if m.get("migration_achieved_s") is None:
            continue
        mb = lambda k: (m.get(k) or 0) / 1e6  # noqa: E731
        alone = summary.get("read_lost_alone_s")
        ratio = f" = {m['migration_achieved_s'] / alone:.2f}x reading the lost bytes alone ({alone:.3f} s)" if alone else ""
        print(f"{mode} migration {m['migration_achieved_s']:.3f} s{ratio}: reload {mb('migration_reload_bytes'):.0f} MB"
              f" in {m['migration_reload_s'] or 0:.3f} s, kept {mb('migration_keep_bytes'):.0f} MB"
              f" ({mb('migration_remapped_bytes'):.0f} MB remapped in place, the rest copied or moved; moves"
              f" {m['migration_move_s'] or 0:.3f} s), new memory {mb('migration_alloc_bytes'):.0f} MB")
    if e.get("shm_rest_before") is not None:
        print(f"daemon shm: rest {e['shm_rest_before'] / 1e6:.0f} MB before, peak {e['shm_peak'] / 1e6:.0f} MB during,"
              f" rest {e['shm_rest_after'] / 1e6:.0f} MB after")
    _print_steps(summary["steps"], args)
    adds = [r["add_rank"] for r in rows if r.get("mode") == "elastic" and "add_rank" in r]
    ok = [a for a in adds if "error" not in a]
    if adds:
        summary["add_rank"] = {k: _med(ok, k) for k in ("ready_s", "pause_s", "recovery_s")}
        Path(args.json).write_text(json.dumps(out, indent=2))
        m = summary["add_rank"]
        f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"\nadd_rank ({args.add_rank}; tp {adds[0]['tp_before']} -> {adds[0]['tp_after']}, medians of {len(ok)}):"
              f" request -> serving {f(m['ready_s'])} s, pause (regroup -> first token) {f(m['pause_s'])} s,"
              f" recovery {f(m['recovery_s'])} s; failed attempts {sum(a.get('requests_failed', 0) for a in ok)}")
        for a in adds:
            if "error" in a:
                print(f"add_rank error: {a['error'][:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
