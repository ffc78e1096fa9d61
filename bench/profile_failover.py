"""Where the time from "serving again" to the first token goes after an in-place failover: a
py-spy profile of every survivor across a rank loss, each cut at the end of its rebuild.

Starts an elastic server (``--family``/``--size``, default the bench Qwen3-MoE, ``--tp`` 3) under
``--clients`` streaming clients, starts ``py-spy record --idle`` on every rank but the victim
(every sample kept, at ``--rate`` Hz, so sample index is time), SIGKILLs rank ``--kill-rank``, and
waits for the first token after the kill (TFS, as ``failover_bench.py`` measures it). Then, per
survivor, it finds the last sample inside sgl-elastic's failover code
(``sgl_elastic/rank/failover.py``: the rebuild), and sums the samples of the following ``--window``
seconds by the innermost frame of interest: the model forward (by layer kind), the scheduler's own
work, collectives (time in them is mostly waiting for the slower rank), waiting for work (idle).
Prints those tables and writes the raw speedscope profiles (``--out``, one per survivor). Needs ``py-spy`` (``pip install
py-spy``; the set-up does not install it) and permission to ptrace the ranks (root here).

Usage: ``python bench/profile_failover.py [--tp 3] [--rate 250] [--window 1.0]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FLAGS, rank_pid  # noqa: E402
from failover_bench import Load, _wait_tfs  # noqa: E402

from sgl_elastic.testing.models import build_model  # noqa: E402
from sgl_elastic.testing.server import ServerProcess  # noqa: E402

# (label, substring of a frame "function (file)"), innermost match wins; order = priority among equals.
BUCKETS = (
    ("failover (sgl-elastic rank/failover.py)", "sgl_elastic/rank/failover.py"),
    ("collective (all_reduce / all_gather)", "all_reduce"),
    ("collective (all_reduce / all_gather)", "all_gather"),
    ("attention", "attention"),
    ("MoE experts", "fused_moe"),
    ("MoE experts", "moe"),
    ("linear layers", "linear.py"),
    ("embedding / logits", "logits_processor"),
    ("embedding / logits", "vocab_parallel_embedding"),
    ("sampling", "sampler"),
    ("model forward (other)", "model_runner"),
    ("scheduler: batch building", "schedule_policy"),
    ("scheduler: batch building", "schedule_batch"),
    ("scheduler: output processing", "scheduler_output_processor"),
    ("scheduler: receiving requests", "recv_requests"),
    ("sgl-elastic hooks", "sgl_elastic/"),
    ("scheduler (other)", "scheduler.py"),
)


def bucket(stack: list[str]) -> str:
    for frame in reversed(stack):  # innermost first
        for label, key in BUCKETS:
            if key in frame:
                return label
    return "other"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="qwen3-moe")
    ap.add_argument("--size", default="bench", choices=("tiny", "bench"))
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--kill-rank", type=int, default=1)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rate", type=int, default=250)
    ap.add_argument("--window", type=float, default=1.0, help="seconds after the rebuild to attribute")
    ap.add_argument("--warm-s", type=float, default=6.0)
    ap.add_argument("--out", default="results/profile_failover.speedscope.json")
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.path.exists(spy):
        ap.error("py-spy not found: pip install py-spy")
    model = str(build_model(args.family, args.size))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    srv = ServerProcess(model, tp_size=args.tp, extra_args=list(FLAGS), start_timeout_s=1800)
    srv.start()
    prof, outs = None, {}
    try:
        load = Load(srv.url, args.clients, 64, 16, 0, 1000).start()
        time.sleep(args.warm_s)
        pids = {r: rank_pid(srv, r, via_admin=True) for r in range(args.tp)}
        victim = pids.pop(args.kill_rank)
        duration = 8
        outs = {r: args.out.replace(".json", f".rank{r}.json") for r in pids}
        prof = [subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--idle", "--nonblocking",
                                  "--format", "speedscope", "--duration", str(duration), "-o", outs[r]],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r, pid in pids.items()]
        time.sleep(1.0)
        t_kill = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        tfs = _wait_tfs(load, t_kill, srv, timeout_s=120)
        for p in prof:
            p.wait(timeout=duration + 30)
        load.finish()
    finally:
        for p in prof or []:
            if p.poll() is None:
                p.kill()
        srv.stop()
    print(f"TFS {tfs:.3f} s (client clock)")
    code = 0
    for r, out in outs.items():
        print(f"\n== old rank {r} ==")
        code |= report(out, args)
    return code


def report(path: str, args) -> int:
    data = json.loads(Path(path).read_text())
    frames = [f"{f['name']} ({f.get('file', '')})" for f in data["shared"]["frames"]]
    # py-spy writes one profile per thread: the scheduler's main thread has the most samples.
    main_prof = max(data["profiles"], key=lambda p: len(p["samples"]))
    stacks = [[frames[i] for i in s] for s in main_prof["samples"]]
    dt = 1.0 / args.rate
    last = max((i for i, st in enumerate(stacks) if any("sgl_elastic/rank/failover.py" in f for f in st)), default=None)
    print(f"{len(stacks)} samples of the main thread at {args.rate} Hz")
    if last is None:
        print("no sample inside the failover code: the rank was not rebuilt in the profiled window")
        return 1
    first = next((i for i, st in enumerate(stacks) if any("sgl_elastic/rank/failover.py" in f for f in st)), last)
    print(f"failover code from sample {first} to {last} ({(last - first + 1) * dt:.3f} s)")
    n = int(args.window / dt)
    windows = (("before the kill (tp before)", stacks[:min(first, n)]),
               ("right after the rebuild", stacks[last + 1:last + 1 + n]),
               ("steady state after (from 2 windows later)", stacks[last + 1 + 2 * n:last + 1 + 3 * n]))
    for title, window in windows:
        if not window:
            continue
        counts = Counter("idle (waiting for work)" if _idle(st) else bucket(st) for st in window)
        print(f"{len(window) * dt:.2f} s {title}:")
        for label, k in counts.most_common(6):
            print(f"  {label:<45} {k * dt:6.3f} s  {100 * k / len(window):5.1f} %")
    window = windows[1][1]
    top = Counter(st[-1] for st in window if st and not _idle(st))
    print("innermost frames right after the rebuild (top 6):")
    for f, k in top.most_common(6):
        print(f"  {k * dt:6.3f} s  {f[:150]}")
    return 0


def _idle(stack: list[str]) -> bool:
    """A sample of a thread blocked in a wait (py-spy --idle keeps them): sockets, locks, sleeps."""
    if not stack:
        return True
    leaf = stack[-1]
    return any(k in leaf for k in ("recv_pyobj", "poll (", "wait (", "sleep", "select", "_recv", "recv ("))


if __name__ == "__main__":
    sys.exit(main())
