"""Scheduler crash recovery: `--elastic-daemon` restart vs a full server restart, side by side.

For a ``sgl_elastic.testing.models`` checkpoint (``--family``, ``--size``) at ``--tp``:

- ``daemon``: one server with ``--elastic-daemon``. A shared-prefix prompt is served, then one
  scheduler is SIGKILLed (``--repeats`` times, alternating ranks). Measured per kill: time from the
  kill to the first token of a request sharing the prefix (polling ``/generate`` every 0.2 s), the
  supervisor's restart time, the weight attach time per rank (from the schedulers' log lines), the
  KV slots restored and the prompt tokens served from cache.
- ``baseline``: what the same failure costs without sgl-elastic, where SGLang tears the whole
  server down: a fresh ``sglang``-equivalent server (our launcher without the daemon, same flags),
  from spawn to the first token of the same request; weights are read from the checkpoint (page
  cache warm: nothing here drops caches).

Medians over ``--repeats``; the ratio is baseline / daemon. Greedy tokens after every restart are
checked against those before the first kill.

Usage: ``python bench/restart_bench.py [--family qwen3-moe] [--size tiny|bench] [--tp 2] [--repeats 3] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import time

import psutil
import requests

from sgl_elastic.testing.models import build_model
from sgl_elastic.testing.server import ServerProcess

PREFIX = list(range(3, 259))  # 256 shared prompt tokens
FLAGS = ["--dtype", "float32", "--max-total-tokens", "8192", "--mem-fraction-static", "0.15"]


def _gen(srv, ids, n=1, timeout=120):
    return requests.post(srv.url + "/generate", timeout=timeout, json={
        "input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}})


def _first_token(srv, ids, t0, limit=900):
    while time.perf_counter() - t0 < limit:
        try:
            r = _gen(srv, ids)
            if r.status_code == 200:
                return time.perf_counter() - t0, r.json()
        except requests.RequestException:
            pass
        if srv.proc.poll() is not None:
            raise RuntimeError(f"server died:\n{srv.log_tail(40)}")
        time.sleep(0.2)
    raise TimeoutError("no first token")


def _schedulers(srv):
    return {c.name().split("::")[-1]: c.pid for c in psutil.Process(srv.proc.pid).children()
            if "scheduler_TP" in c.name()}


def run_daemon(model, tp, repeats):
    srv = ServerProcess(model, tp_size=tp, extra_args=[*FLAGS, "--elastic-daemon", "--no-elastic-failover"], start_timeout_s=900)
    srv.start()
    rows = []
    try:
        ref = _gen(srv, [PREFIX + [1, 2]], n=8).json()[0]["output_ids"]
        for i in range(repeats):
            mark = len(srv.log_path.read_text(errors="replace"))
            victim = _schedulers(srv)[f"scheduler_TP{i % tp}"]
            t0 = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            secs, out = _first_token(srv, [PREFIX + [7 + i]], t0)
            log = srv.log_path.read_text(errors="replace")[mark:]
            attach = [float(x) for x in re.findall(r"weights bound to the daemon's shards zero-copy \([\d.]+ MB, held once\) in ([\d.]+) s", log)]
            restart = float(re.search(r"restart \d+ done in ([\d.]+) s", log).group(1))
            restored = [int(x) for x in re.findall(r"restored (\d+) cached KV slots", log)]
            again = _gen(srv, [PREFIX + [1, 2]], n=8).json()[0]["output_ids"]
            rows.append({"kill_to_first_token_s": secs, "restart_s": restart, "attach_s": attach,
                         "restored_slots": restored, "cached_tokens": out[0]["meta_info"]["cached_tokens"],
                         "same_tokens": again == ref})
            print(f"daemon kill {i}: first token {secs:.2f} s, restart {restart:.2f} s, attach {attach} s,"
                  f" cached {rows[-1]['cached_tokens']} tokens, same tokens {again == ref}", flush=True)
        mb = re.findall(r"zero-copy \(([\d.]+) MB, held once\)", srv.log_path.read_text(errors="replace"))
    finally:
        srv.stop()
    return rows, mb


def run_baseline(model, tp, repeats):
    rows = []
    for i in range(repeats):
        srv = ServerProcess(model, tp_size=tp, extra_args=[*FLAGS, "--no-elastic-daemon"], start_timeout_s=900)
        t0 = time.perf_counter()
        try:
            srv.start()
            secs, _ = _first_token(srv, [PREFIX + [7 + i]], t0)
        finally:
            srv.stop()
        rows.append({"spawn_to_first_token_s": secs})
        print(f"baseline restart {i}: first token {secs:.2f} s", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="qwen3-moe")
    ap.add_argument("--size", default="tiny", choices=["tiny", "bench"])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    model = build_model(a.family, a.size)
    d, mb = run_daemon(model, a.tp, a.repeats)
    b = run_baseline(model, a.tp, a.repeats)
    med_d = statistics.median(r["kill_to_first_token_s"] for r in d)
    med_b = statistics.median(r["spawn_to_first_token_s"] for r in b)
    med_attach = statistics.median(x for r in d for x in r["attach_s"])
    out = {"family": a.family, "size": a.size, "tp": a.tp, "published_mb_per_rank": mb, "daemon": d, "baseline": b,
           "median_daemon_kill_to_first_token_s": med_d, "median_baseline_restart_to_first_token_s": med_b,
           "median_weights_attach_s": med_attach, "ratio_baseline_over_daemon": med_b / med_d}
    print(f"\n{a.family}-{a.size} tp={a.tp}: kill -> first token {med_d:.2f} s with the daemon vs {med_b:.2f} s"
          f" full restart ({med_b / med_d:.2f}x); weights attach {med_attach * 1000:.1f} ms per rank;"
          f" all tokens equal: {all(r['same_tokens'] for r in d)}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if all(r["same_tokens"] for r in d) else 1


if __name__ == "__main__":
    sys.exit(main())
