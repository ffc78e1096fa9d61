"""Chaos runs against a real elastic server: seeded random faults under a steady mix of clients.

    python bench/chaos.py --family mixtral --ep --seeds 20 --events 15 [--first 0] [--out chaos.json]

Each seed starts a tiny-model server (float32, tp 4), takes its greedy answers before any fault,
and sends ``--events`` random faults from outside (rank SIGKILL, rank 0 included, SIGSTOP, state
daemon SIGKILL, add_rank, rebalance with ``--ep``) at random times, many during a recovery; see
``sgl_elastic.testing.chaos`` for what a run checks. Prints one row per seed (seed, events,
requests ok, failed, differ, lost, recoveries, fallbacks, longest pause) and each failing seed's
events, so ``--first S --seeds 1`` reruns it; writes every row to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tqdm import tqdm

from sgl_elastic.testing.chaos import ChaosConfig, run_chaos
from sgl_elastic.testing.models import build_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="qwen3-moe", choices=("qwen3-moe", "mixtral"))
    p.add_argument("--ep", action="store_true", help="--ep-size 4 --elastic-redundant-experts 4 --elastic-eplb-interval 4")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--first", type=int, default=0, help="first seed")
    p.add_argument("--events", type=int, default=15)
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--out", default="chaos.json", help="the table as JSON; the server logs go beside it")
    p.add_argument("--trace", action="store_true",
                   help="trace every request through the server (SGLE_TRACE_REQUESTS; beside --out)")
    a = p.parse_args(argv)
    if a.seeds < 1 or a.events < 1 or a.tp < 2:
        p.error("--seeds and --events must be >= 1 and --tp >= 2")
    if os.path.isdir(a.out):
        p.error(f"--out {a.out} is a directory: give the JSON file's path (logs go beside it)")
    logs = os.path.dirname(os.path.abspath(a.out))
    model = str(build_model(a.family, "tiny"))
    rows, bad = [], []
    bar = tqdm(range(a.first, a.first + a.seeds), desc=f"chaos {a.family}{' ep' if a.ep else ''}", unit="seed")
    for seed in bar:
        t0 = time.monotonic()
        name = f"chaos-{a.family}{'-ep' if a.ep else ''}-{seed}"
        res = run_chaos(ChaosConfig(model, seed, a.events, a.tp, a.ep, log_path=os.path.join(logs, f"{name}.log"),
                                    trace_dir=os.path.join(logs, f"{name}-trace") if a.trace else None),
                        progress=lambda m: bar.set_postfix_str(m[-60:]))
        row = res.row() | {"family": a.family, "ep": a.ep, "seconds": round(time.monotonic() - t0, 1),
                           "passed": res.passed, "fallback_reasons": res.fallbacks, "problem_list": res.problems}
        rows.append(row)
        if not res.passed:
            bad.append(res)
            tqdm.write(f"seed {seed} FAILED (rerun: --first {seed} --seeds 1):\n{res.describe()}")
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    cols = ["seed", "events", "ok", "failed", "differ", "lost", "recoveries", "fallbacks", "longest_pause_s", "end_tp"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    tot = {c: sum(r[c] for r in rows) for c in ("ok", "failed", "differ", "lost", "fallbacks")}
    print(f"{len(rows)} seeds: {tot}; {len(bad)} failing seed(s): {[b.seed for b in bad]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
