"""The migration alone, without a server: how long the CPU executor takes to turn the survivors'
weight segments into the new layout's, per method, against reading the lost bytes alone.

For a ``sgl_elastic.testing.models`` checkpoint (default the bench Qwen3-MoE) at ``--tp`` (3),
ranks ``--fail`` (1) lost. Each repeat, for each ``--modes`` method in turn (interleaved):

1. every rank's segment as the daemon holds it (``allocate_rank_arenas`` + the checkpoint's
   shards, page cache warm), then the failed ranks' segments freed (as the daemon frees a dead
   rank's memory before the migration);
2. ``CpuExecutor.run`` of the plan (``plan_migration``) on the survivors, timed: ``remap`` (the
   survivors' kept bytes stay in their pages), ``move`` (moved inside their files), ``off`` (copied
   into new files);
3. the floor, ``read-alone``: only the plan's reloads (the lost bytes), by the same reader into new
   sparse segments of the new layout (new pages, as the migration gets them), nothing else.

Prints medians (and each run) of the executor's wall time with its parts (reload, copy, move,
allocation) and the ratio to ``read-alone``; ``--json`` keeps every run. Usage:
``python bench/migration_bench.py [--tp 3] [--fail 1] [--repeats 5] [--modes remap,move,off]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from sgl_elastic.executor.cpu import CpuExecutor, _specs, allocate_rank_arenas, load_rank_from_checkpoint
from sgl_elastic.executor.ops import full_region, shard_view, split_queues
from sgl_elastic.executor.safetensors_io import SafetensorsCheckpoint
from sgl_elastic.executor.shm import ShmArena
from sgl_elastic.layout import ElasticLayout
from sgl_elastic.memory.shm import ShmMemory
from sgl_elastic.planner import ClusterChange, Topology, plan_migration
from sgl_elastic.testing.models import build_model

MODES = ("remap", "move", "off")


def _layout(model: str, tp: int) -> ElasticLayout:
    from types import SimpleNamespace

    cfg = SimpleNamespace(**json.loads((Path(model) / "config.json").read_text()))
    return ElasticLayout.from_hf_config(cfg, tp)


def run_mode(mode: str, ck, old: ElasticLayout, plan, topo, workers: int = 1) -> dict:
    arenas = allocate_rank_arenas(old, f"mb-{mode}")
    new = {}
    try:
        for r, a in arenas.items():
            load_rank_from_checkpoint(old, r, ck, a)
        for r in plan.change.failed:
            arenas.pop(r).close()  # the dead rank's memory goes first, as in the daemon
        t = time.perf_counter()
        new, rep = CpuExecutor(ck, topo, in_place=mode != "off", remap=mode == "remap",
                               reload_workers=workers).run(plan, arenas, label=mode)
        wall = time.perf_counter() - t
        return {"mode": mode, "wall_s": wall, "achieved_s": rep.achieved_s, "reload_s": rep.reload_s, "copy_s": rep.copy_s,
                "move_s": rep.move_s, "alloc_s": rep.alloc_s, "predicted_s": rep.predicted.predicted_s,
                "reload_bytes": rep.reload_bytes, "keep_bytes": rep.keep_bytes, "remapped_bytes": rep.remapped_bytes,
                "alloc_bytes": rep.alloc_bytes, "released_bytes": rep.released_bytes}
    finally:
        for a in new.values():
            a.close()
        for a in arenas.values():
            a.close()


def read_alone(ck, plan, workers: int = 1) -> dict:
    """The plan's reloads only, by ``workers`` threads (as the executor's reload workers), into new
    sparse segments."""
    import threading

    reloads, _, _ = split_queues(plan)
    shapes = {t.name: t.shape for t in plan.old_layout.tensors()}
    dst = {d: ShmArena.create(f"mb-read-r{d}", _specs(plan.new_layout, d)) for d in range(plan.new_layout.tp_size)}
    queue, lock = list(reloads), threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not queue:
                    return
                op = queue.pop(0)
            view = shard_view(dst[op.dst_rank].array(op.tensor), op, op.dst_offset)
            ck.read_region(op.tensor, view, *full_region(shapes[op.tensor], op))

    try:
        t = time.perf_counter()
        threads = [threading.Thread(target=work) for _ in range(workers)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return {"mode": "read-alone", "wall_s": time.perf_counter() - t, "reload_bytes": sum(op.nbytes for op in reloads)}
    finally:
        for a in dst.values():
            a.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="qwen3-moe")
    ap.add_argument("--size", default="bench", choices=("tiny", "bench"))
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--fail", default="1", help="comma-separated old ranks lost")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--reload-workers", type=int, default=1, help="reload threads, of the executor and of read-alone")
    ap.add_argument("--json", default="results/migration_bench.json")
    args = ap.parse_args()
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"--modes {bad}: choose from {', '.join(MODES)}")
    failed = tuple(int(x) for x in args.fail.split(","))
    if any(not 0 <= f < args.tp for f in failed) or len(set(failed)) >= args.tp:
        ap.error(f"--fail {args.fail}: ranks of 0..{args.tp - 1}, at least one left")
    model = str(build_model(args.family, args.size))
    old = _layout(model, args.tp)
    plan = plan_migration(old, ClusterChange(failed=failed))
    rows = []
    with SafetensorsCheckpoint(model) as ck:
        read, copy, alloc = ShmMemory("mb").measure_bandwidths(ck)
        topo = Topology.single_node(args.tp, read_gbps=read, copy_gbps=copy, alloc_gbps=alloc)
        for rep in range(args.repeats):
            for mode in modes + ["read-alone"]:
                row = read_alone(ck, plan, args.reload_workers) if mode == "read-alone" else \
                    run_mode(mode, ck, old, plan, topo, args.reload_workers)
                row["repeat"] = rep
                rows.append(row)
                print(f"[migration_bench] repeat {rep + 1}/{args.repeats} {mode}: {row['wall_s']:.3f} s", file=sys.stderr,
                      flush=True)
    med = {m: statistics.median(r["wall_s"] for r in rows if r["mode"] == m) for m in modes + ["read-alone"]}
    print(f"\n{args.family}/{args.size} tp {args.tp} -> {plan.new_layout.tp_size} (lost {list(failed)}): reload"
          f" {plan.reload_bytes / 1e6:.0f} MB, kept {plan.keep_bytes / 1e6:.0f} MB; medians of {args.repeats}")
    print(f"{'method':<11} {'migration s':>11} {'x read-alone':>12} {'reload s':>9} {'copy s':>7} {'move s':>7}"
          f" {'alloc s':>8} {'remapped MB':>12}  runs")
    for m in modes + ["read-alone"]:
        rs = [r for r in rows if r["mode"] == m]
        f = lambda k: statistics.median(r.get(k) or 0.0 for r in rs)  # noqa: E731
        print(f"{m:<11} {med[m]:>11.3f} {med[m] / med['read-alone']:>12.2f} {f('reload_s'):>9.3f} {f('copy_s'):>7.3f}"
              f" {f('move_s'):>7.3f} {f('alloc_s'):>8.3f} {f('remapped_bytes') / 1e6:>12.0f}  "
              + ", ".join(f"{r['wall_s']:.3f}" for r in rs))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "medians_s": med}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
