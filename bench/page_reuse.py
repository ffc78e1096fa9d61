"""What new shared-memory pages cost on this host, and whether freeing first makes them cheaper.

A failover's migration gives the survivors the dead rank's share in new pages (``executor.cpu``:
the regrown files' extensions). On a VM those pages cost far more than the copy into them. This
script measures, ``--rounds`` times, for a segment of ``--mib`` MiB in /dev/shm:

- ``alloc then free``: a segment standing for the lost rank's is in use; a new one is allocated
  and written (one byte per page) and the old one is freed after (what the daemon did until
  session 11: the failed ranks' segments were freed with the old layout, after the migration);
- ``free then alloc``: the old one is freed first, then the new one allocated (what
  ``daemon.store.ModelStore.migrate`` does now).

Medians of the allocation, the free and their sum. Usage:
``python bench/page_reuse.py [--mib 700] [--rounds 5] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from multiprocessing import shared_memory

import numpy as np


def _segment(nbytes: int) -> shared_memory.SharedMemory:
    """A new segment with every page allocated (one byte written per 4 KiB page)."""
    seg = shared_memory.SharedMemory(create=True, size=nbytes)
    view = np.frombuffer(seg.buf, dtype=np.uint8)
    view[::4096] = 1
    del view
    return seg


def _free(seg: shared_memory.SharedMemory) -> None:
    seg.close()
    seg.unlink()


def one_round(nbytes: int) -> dict[str, dict[str, float]]:
    out = {}
    lost = _segment(nbytes)
    t0 = time.perf_counter()
    new = _segment(nbytes)
    t1 = time.perf_counter()
    _free(lost)
    t2 = time.perf_counter()
    _free(new)
    out["alloc then free"] = {"alloc_s": t1 - t0, "free_s": t2 - t1}
    lost = _segment(nbytes)
    t0 = time.perf_counter()
    _free(lost)
    t1 = time.perf_counter()
    new = _segment(nbytes)
    t2 = time.perf_counter()
    _free(new)
    out["free then alloc"] = {"alloc_s": t2 - t1, "free_s": t1 - t0}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=700)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if args.mib <= 0 or args.rounds <= 0:
        ap.error("--mib and --rounds must be positive")
    rounds = [one_round(args.mib << 20) for _ in range(args.rounds)]
    summary = {}
    print(f"{args.mib} MiB of /dev/shm, medians of {args.rounds} rounds")
    print(f"{'order':<16} {'alloc s':>8} {'free s':>8} {'sum s':>8}   alloc per round")
    for order in rounds[0]:
        allocs = [r[order]["alloc_s"] for r in rounds]
        frees = [r[order]["free_s"] for r in rounds]
        sums = [a + f for a, f in zip(allocs, frees)]
        summary[order] = {"alloc_s": statistics.median(allocs), "free_s": statistics.median(frees),
                          "sum_s": statistics.median(sums), "alloc_s_each": allocs}
        print(f"{order:<16} {summary[order]['alloc_s']:>8.3f} {summary[order]['free_s']:>8.3f}"
              f" {summary[order]['sum_s']:>8.3f}   " + " ".join(f"{a:.2f}" for a in allocs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mib": args.mib, "rounds": args.rounds, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
