"""``failover_bench.py --nodes 2``: tp ``--tp`` over two nodes of this machine, a rank or a node lost
under load, elastic against restart-and-reload, side by side in one run.

Events (``--events``, each on a fresh server per mode and repeat):
- ``rank``: the last rank (on node 1) SIGKILLed. Elastic: both nodes' daemons migrate in place
  (tp-1). Restart-and-reload: vanilla SGLang multi-node (``--no-elastic-daemon``) tears itself
  down; the user relaunches it on what is left that SGLang can run (``tp - 2`` over the two nodes,
  its ranks split evenly), loading the checkpoint from disk.
- ``node``: node 1's process group SIGKILLed (launcher, schedulers, daemon). Elastic: node 0's ranks
  go on at tp/2, node 1's share reloaded from node 0's checkpoint. Restart-and-reload: vanilla SGLang
  relaunched on node 0 alone at tp/2.
- ``rank-slow``: ``rank`` with ``--elastic-link-gbps --slow-gbps`` (the inter-node link modelled and
  capped at that rate): the planner reloads locally what the slow link would bring later. Elastic only.

TFS as in ``failover_bench`` (kill -> first streamed token of a successful request, client clock).
Per elastic run also: the recovery's phases and migration record (bytes by kind, remote bytes read
over the transfer engine, the slowest node's achieved against its executor's model).
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import sys
import time
from pathlib import Path

import requests
from _common import AUTH, FLAGS

from sgl_elastic.testing.nodes import MultiNodeServer


def _status(url: str) -> dict:
    return requests.get(url + "/elastic/status", headers=AUTH, timeout=30).json()


def _scheduler_pids(node) -> dict[int, int]:
    import psutil

    out = {}
    for pid in node.members():
        try:
            name = psutil.Process(pid).name()
        except psutil.Error:
            continue
        m = re.search(r"scheduler_TP(\d+)", name)
        if m:
            out[int(m.group(1))] = pid
    return out


def _wait_tfs(load, t_kill: float, timeout_s: float, alive=lambda: True):
    deadline = time.monotonic() + timeout_s
    while load.first_token_after(t_kill) is None and time.monotonic() < deadline and alive():
        time.sleep(0.05)
    return load.first_token_after(t_kill)


def _wait_tp(url: str, tp: int, n_before: int, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = _status(url)
        recs = s["recoveries"][n_before:]
        if s["state"] == "serving" and s["tp_size"] == tp and recs and recs[-1]["outcome"] == "ok":
            return recs[-1]
        if s["state"] == "failed":
            raise RuntimeError(f"recovery failed: {recs[-1]['outcome'] if recs else s}")
        time.sleep(0.1)
    raise RuntimeError(f"not serving at tp {tp} within {timeout_s:.0f} s")


def run_elastic(model: str, args, event: str, rep: int, Load) -> dict:
    extra = list(FLAGS) + (["--ep-size", str(args.tp)] if args.ep else [])
    if event == "rank-slow":
        extra += ["--elastic-link-gbps", str(args.slow_gbps)]
    srv = MultiNodeServer(model, args.tp, 2, extra, start_timeout_s=1800)
    t0 = time.perf_counter()
    srv.start()
    res = {"mode": "elastic", "event": event, "repeat": rep, "start_s": round(time.perf_counter() - t0, 2)}
    load = None
    try:
        load = Load(srv.url, args.clients, args.prompt_len, args.max_new, args.seed + rep, args.max_token_id).start()
        time.sleep(args.warm_s)
        st = _status(srv.url)
        n_before, tp_after = len(st["recoveries"]), (args.tp - 1 if event != "node" else args.tp // 2)
        t_kill = time.perf_counter()
        if event == "node":
            srv.nodes[1].kill()
        else:
            os.kill(st["ranks"][-1]["pid"], signal.SIGKILL)
        res["tfs_s"] = _wait_tfs(load, t_kill, 600)
        rec = _wait_tp(srv.url, tp_after, n_before)
        time.sleep(args.after_s)
        load.finish()
        res.update(tp_before=args.tp, tp_after=tp_after, recovery_s=rec["recovery_s"], server_tfs_s=rec.get("tfs_s"),
                   phases_s=rec["phases_s"], migration=rec["migration"], requests_ok=load.ok,
                   requests_failed=load.failed, errors=load.errors)
        return res
    finally:
        if load is not None:
            load.finish()
        srv.stop()


def run_reload(model: str, args, event: str, rep: int, Load) -> dict:
    extra = list(FLAGS) + ["--no-elastic-daemon"] + (["--ep-size", str(args.tp)] if args.ep else [])
    srv = MultiNodeServer(model, args.tp, 2, extra, start_timeout_s=1800)
    srv.start()
    res = {"mode": "reload", "event": event, "repeat": rep, "tp_before": args.tp}
    load = second = None
    try:
        load = Load(srv.url, args.clients, args.prompt_len, args.max_new, args.seed + rep, args.max_token_id).start()
        time.sleep(args.warm_s)
        t_kill = time.perf_counter()
        if event == "node":
            srv.nodes[1].kill()
        else:
            os.kill(_scheduler_pids(srv.nodes[1])[args.tp - 1], signal.SIGKILL)
        deadline = time.monotonic() + 120  # vanilla SGLang tears itself down; the user then relaunches
        while srv.nodes[0].proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        res["teardown_s"] = round(time.perf_counter() - t_kill, 2)
        srv.stop()
        if event == "node":  # what is left: node 0 alone
            from sgl_elastic.testing.server import ServerProcess

            tp_after = args.tp // 2
            ep = ["--ep-size", str(tp_after)] if args.ep else []
            second = ServerProcess(model, tp_size=tp_after, extra_args=list(FLAGS) + ["--no-elastic-daemon"] + ep,
                                   start_timeout_s=1800)
        else:  # SGLang runs tp/nnodes ranks per node: tp - 2 over the two nodes
            tp_after = args.tp - 2
            ep = ["--ep-size", str(tp_after)] if args.ep else []
            second = MultiNodeServer(model, tp_after, 2, list(FLAGS) + ["--no-elastic-daemon"] + ep,
                                     start_timeout_s=1800)
        res["tp_after"] = tp_after
        t1 = time.perf_counter()
        second.start()
        res["restart_start_s"] = round(time.perf_counter() - t1, 2)
        load.url = second.url
        res["tfs_s"] = _wait_tfs(load, t_kill, 1800)
        time.sleep(args.after_s)
        load.finish()
        res.update(requests_ok=load.ok, requests_failed=load.failed, errors=load.errors)
        return res
    finally:
        if load is not None:
            load.finish()
        if second is not None:
            second.stop()
        srv.stop()


def main_nodes(args, model: str, Load) -> int:
    rows = []
    for rep in range(args.repeats):
        for event in args.events.split(","):
            for mode in args.modes.split(","):
                if mode not in ("elastic", "reload") or (mode == "reload" and event == "rank-slow"):
                    continue
                print(f"[bench] nodes 2: {event} / {mode}, repeat {rep + 1}/{args.repeats} ...", file=sys.stderr,
                      flush=True)
                try:
                    rows.append((run_elastic if mode == "elastic" else run_reload)(model, args, event, rep, Load))
                except Exception as e:  # noqa: BLE001 - kept in the results; the others go on
                    rows.append({"mode": mode, "event": event, "repeat": rep, "error": f"{type(e).__name__}: {e}"})
                print(f"[bench]   {json.dumps(rows[-1])[:600]}", file=sys.stderr, flush=True)

    def med(event, mode, key):
        vals = [r[key] for r in rows if r["event"] == event and r["mode"] == mode and r.get(key) is not None]
        return statistics.median(vals) if vals else None

    print(f"\n{args.family}/{args.size}, tp {args.tp} over 2 nodes ({args.tp // 2} + {args.tp // 2}),"
          f" {args.clients} streaming clients; medians of {args.repeats}")
    print(f"{'event':<10} {'elastic TFS s':>14} {'reload TFS s':>13} {'ratio':>7} {'recovery s':>11}"
          f" {'migrate s':>10} {'remote MB':>10} {'reload MB':>10} {'failed e/r':>11}")
    summary = {}
    for event in args.events.split(","):
        e, r = med(event, "elastic", "tfs_s"), med(event, "reload", "tfs_s")
        mig = [x["migration"] for x in rows if x["event"] == event and x["mode"] == "elastic" and "migration" in x]
        summary[event] = {"elastic_tfs_s": e, "reload_tfs_s": r, "ratio": (r / e) if e and r else None,
                          "recovery_s": med(event, "elastic", "recovery_s")}
        f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        fe = sum(x.get("requests_failed", 0) for x in rows if x["event"] == event and x["mode"] == "elastic")
        fr = sum(x.get("requests_failed", 0) for x in rows if x["event"] == event and x["mode"] == "reload")
        m = mig[0] if mig else {}
        print(f"{event:<10} {f(e):>14} {f(r, 2):>13} {f(summary[event]['ratio'], 1):>7}"
              f" {f(summary[event]['recovery_s']):>11} {f(m.get('seconds')):>10}"
              f" {f(m.get('remote_bytes', 0) / 1e6, 1):>10} {f(m.get('reload_bytes', 0) / 1e6, 1):>10} {fe:>5}/{fr:<5}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "runs": rows, "summary": summary}, indent=1))
    print(f"JSON: {args.json}")
    return 0
