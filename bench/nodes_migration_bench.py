"""Two nodes' state daemons migrate one layout together: the planner's link model against the clock.

tp 4 over two nodes of this machine (ranks 0-1 on node 0, 127.0.0.1; ranks 2-3 on node 1,
127.0.0.2, in its own IPC + mount namespaces with a private ``/dev/shm`` where allowed), the
bench-size Qwen3-MoE (``--size``), one daemon per node holding its node's ranks. Rank ``--fail``
(default 3, on node 1) is lost. For each inter-node read rate of ``--links`` (GB/s; 0: the
transfer engine's own speed over loopback, measured) and each source rule:

- ``peer``: every byte a reachable survivor holds is copied (the seed paper's rule: cross-node
  copies over the network);
- ``time``: per byte, a copy or a reload from the destination node's own checkpoint, whichever the
  model finishes sooner (``planner.sources``);

both daemons start their share at once (``ApplyMigration`` with ``ranks`` / ``remote``); the
migration's time is the slower daemon's. Its model is ``planner.sources.makespan`` on
``Topology.nodes`` with this host's measured reload and copy rates (``ShmMemory.measure_bandwidths``,
as the daemon measures them), per node, and the link's rate. Printed: bytes over the network,
reloaded and kept, measured and modelled seconds and their ratio (the target: 0.8-1.25), medians of
``--repeats`` (fresh daemons each run, page cache warm). Caveat: the two "nodes" share two cores and
one page cache, which the per-node model does not know.

Usage: ``python bench/nodes_migration_bench.py [--size bench] [--fail 3] [--links 0,0.125] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from sgl_elastic.daemon.launch import DaemonProcess
from sgl_elastic.daemon.protocol import decode_remote
from sgl_elastic.executor.remote import transfer_unavailable
from sgl_elastic.executor.safetensors_io import SafetensorsCheckpoint
from sgl_elastic.layout import ElasticLayout
from sgl_elastic.memory.shm import ShmMemory
from sgl_elastic.planner import PEER, RELOAD, ClusterChange, Topology, plan_migration
from sgl_elastic.planner.sources import makespan
from sgl_elastic.testing.models import build_model
from sgl_elastic.testing.nodes import isolation_prefix

NODE_OF_SLOT = (0, 0, 1, 1)


def _start(ckpt: str, layout, link_gbps: float):
    logs = open("/dev/null", "w")
    a = DaemonProcess.start(tcp=True, checkpoint=ckpt, layout=layout, ranks=[0, 1], node_host="127.0.0.1",
                            link_gbps=link_gbps, log=logs, timeout=120)
    b = DaemonProcess.start(tcp=True, checkpoint=ckpt, layout=layout, ranks=[2, 3], node_host="127.0.0.2",
                            link_gbps=link_gbps, log=logs, wrap=isolation_prefix(), timeout=120)
    ca, cb = a.client(timeout=60), b.client(timeout=60)
    ca.wait_ready(600)
    cb.wait_ready(600)
    return (a, ca), (b, cb)


def run_once(ckpt: str, layout, plan, link_gbps: float) -> dict:
    (a, ca), (b, cb) = _start(ckpt, layout, link_gbps)
    try:
        mine = {k: [r for r in range(plan.new_layout.tp_size) if NODE_OF_SLOT[plan.new2slot[r]] == k] for k in (0, 1)}
        ra, rb = decode_remote(ca.export_remote().arenas), decode_remote(cb.export_remote().arenas)
        failed = set(plan.change.failed)
        t0 = time.perf_counter()
        ea = ca.start_migration(plan, ranks=mine[0], remote={r: v for r, v in rb.items() if r not in failed},
                                hold_old=True)
        eb = cb.start_migration(plan, ranks=mine[1], remote={r: v for r, v in ra.items() if r not in failed},
                                hold_old=True)
        sa, sb = ca.wait_ready(600, epoch=ea + 1), cb.wait_ready(600, epoch=eb + 1)
        wall = time.perf_counter() - t0
        ma, mb = sa.last_migration, sb.last_migration
        ca.release_old()
        cb.release_old()
        remote_bytes = ma.remote_bytes + mb.remote_bytes
        remote_s = max(ma.remote_s, mb.remote_s)
        return {"achieved_s": max(ma.achieved_s, mb.achieved_s), "wall_s": wall,
                "node0_s": ma.achieved_s, "node1_s": mb.achieved_s, "remote_bytes": remote_bytes,
                "remote_gbps": remote_bytes / remote_s / 1e9 if remote_s > 0 else 0.0,
                "rerouted_bytes": ma.rerouted_bytes + mb.rerouted_bytes,
                "file_bytes_read": ma.file_bytes_read + mb.file_bytes_read}
    finally:
        for c in (ca, cb):
            c.close()
        for d in (a, b):
            d.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="qwen3-moe")
    ap.add_argument("--size", default="bench", choices=("tiny", "bench"))
    ap.add_argument("--fail", default="3", help="comma-separated old ranks lost (default 3, on node 1)")
    ap.add_argument("--links", default="0,0.125", help="inter-node read caps in GB/s (0: uncapped)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="results/nodes_migration_bench.json")
    args = ap.parse_args(argv)
    why = transfer_unavailable()
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    ckpt = str(build_model(args.family, args.size))
    with open(Path(ckpt) / "config.json") as f:
        from types import SimpleNamespace

        layout = ElasticLayout.from_hf_config(SimpleNamespace(**json.load(f)), 4)
    with SafetensorsCheckpoint(ckpt) as ck:
        read_gbps, copy_gbps, _ = ShmMemory("bench").measure_bandwidths(ck)
    print(f"[bench] this host: reload {read_gbps:.2f} GB/s, copy {copy_gbps:.2f} GB/s; node 1 isolated: {bool(isolation_prefix())}")
    failed = tuple(int(x) for x in args.fail.split(","))
    links = [float(x) for x in args.links.split(",")]
    # The engine's own speed over loopback, for the uncapped case's model: one run copying by the peer rule.
    measured_link = None
    rows = []
    for link in links:
        for rule in ("peer", "time"):
            model_link = link
            if link <= 0:
                if measured_link is None:
                    probe_topo = Topology.nodes(NODE_OF_SLOT, intra_gbps=copy_gbps, inter_gbps=1.0, host_gbps=read_gbps,
                                                storage_gbps=read_gbps, node_copy_gbps=copy_gbps)
                    probe = run_once(ckpt, layout, plan_migration(layout, ClusterChange(failed=failed), probe_topo,
                                                                  source_choice="peer"), 0.0)
                    measured_link = probe["remote_gbps"] or 1.0
                    print(f"[bench] transfer engine over loopback, uncapped: {measured_link:.2f} GB/s")
                model_link = measured_link
            topo = Topology.nodes(NODE_OF_SLOT, intra_gbps=copy_gbps, inter_gbps=model_link, host_gbps=read_gbps,
                                  storage_gbps=read_gbps, node_copy_gbps=copy_gbps)
            plan = plan_migration(layout, ClusterChange(failed=failed), topo, source_choice=rule)
            net = sum(op.nbytes for op in plan.ops if op.kind == PEER
                      and topo.link_class(op.src_slot, plan.new2slot[op.dst_rank]) == "network")
            model = makespan(plan.ops, plan.new2slot, topo)
            runs = []
            for k in range(args.repeats):
                print(f"[bench] link {link or 'uncapped'} GB/s, rule {rule}: run {k + 1}/{args.repeats}", flush=True)
                runs.append(run_once(ckpt, layout, plan, link))
            med = statistics.median(r["achieved_s"] for r in runs)
            rows.append({"link_gbps": link, "model_link_gbps": model_link, "rule": rule, "network_bytes": net,
                         "reload_bytes": sum(op.nbytes for op in plan.ops if op.kind == RELOAD),
                         "keep_bytes": plan.keep_bytes, "model_s": model, "achieved_s": med,
                         "ratio": med / model if model > 0 else float("nan"), "runs": runs})
    print(f"\n{args.family}/{args.size}, tp 4 over 2 nodes, ranks {list(failed)} lost, medians of {args.repeats}")
    print(f"{'link GB/s':>10} {'rule':>5} {'net MB':>7} {'reload MB':>9} {'model s':>8} {'measured s':>10} {'ratio':>6}")
    for r in rows:
        print(f"{r['link_gbps'] or 'uncapped':>10} {r['rule']:>5} {r['network_bytes'] / 1e6:7.0f} {r['reload_bytes'] / 1e6:9.0f}"
              f" {r['model_s']:8.3f} {r['achieved_s']:10.3f} {r['ratio']:6.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"host": {"read_gbps": read_gbps, "copy_gbps": copy_gbps,
                                                    "link_gbps_measured": measured_link}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
