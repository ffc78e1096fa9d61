"""``eplb_bench.py --server``: expert placement policies on a running server after a failure (see
``eplb_bench.py``'s docstring for what is measured). Imported by ``eplb_bench.py``; not run directly."""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import requests
from _common import AUTH, FLAGS, rank_pid
from failover_bench import _decode_tput, _wait_recovered

from sgl_elastic.testing.models import build_model
from sgl_elastic.testing.server import ServerProcess


def skewed_model(hot: int, scale: float, seed: int) -> Path:
    """The bench Qwen3-MoE with ``hot`` experts per layer whose router rows are scaled by ``scale``
    (seeded; a copy beside the bench checkpoint, files without a router hard-linked)."""
    import torch
    from safetensors.torch import load_file, save_file

    base = build_model("qwen3-moe", "bench")
    out = base.parent / f"{base.name}-hot{hot}x{scale:g}-s{seed}"
    if (out / "sgl_elastic_model.json").exists():
        return out
    tmp = base.parent / f".{out.name}.tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir()
    rng = random.Random(seed)
    for f in sorted(base.iterdir()):
        if f.suffix != ".safetensors":
            os.link(f, tmp / f.name)
            continue
        tensors = load_file(str(f))
        gates = [k for k in tensors if k.endswith(".mlp.gate.weight")]
        if not gates:
            os.link(f, tmp / f.name)
            continue
        for k in sorted(gates):
            w = tensors[k].clone()
            for e in rng.sample(range(w.shape[0]), hot):
                w[e] *= scale
            tensors[k] = w
        save_file(tensors, str(tmp / f.name), metadata={"format": "pt"})
        del tensors
    tmp.rename(out)
    return out


def _prefill_tput(url: str, clients: int, length: int, seed: int) -> float:
    rng = random.Random(seed + 1)
    prompts = [[rng.randrange(3, 1000) for _ in range(length)] for _ in range(clients)]
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            r = requests.post(url + "/generate", timeout=600, json={"input_ids": prompts[i], "sampling_params": {
                "max_new_tokens": 1, "temperature": 0}})
            r.raise_for_status()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    t0 = time.perf_counter()
    ts = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(600)
    if errors:
        raise RuntimeError(f"prefill requests failed: {errors[:3]}")
    return clients * length / (time.perf_counter() - t0)


def _status(url: str) -> dict:
    return requests.get(url + "/elastic/status", headers=AUTH, timeout=30).json()


POLICIES = ("none", "lost", "rebalance", "copies", "copies-deepseek", "copies-elasticity")
ALGORITHM = {"rebalance": "ours", "copies": "ours", "copies-deepseek": "deepseek", "copies-elasticity": "elasticity_aware"}


def _rebalance(url: str, algorithm: str = "ours", timeout_s: float = 300) -> tuple[dict, dict | None]:
    """POST /elastic/rebalance and wait for its decision: (eplb.last, the move's recovery or None)."""
    n = len(_status(url)["recoveries"])
    r = requests.post(url + "/elastic/rebalance", headers=AUTH, json={"algorithm": algorithm}, timeout=30)
    if r.status_code != 202:
        raise RuntimeError(f"rebalance refused: {r.status_code} {r.text}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = _status(url)
        last = s["eplb"]["last"]
        if s["state"] == "serving" and last.get("decision") in ("moved", "skipped", "failed"):
            recs = s["recoveries"][n:]
            return last, (recs[-1] if recs else None)
        time.sleep(0.1)
    raise RuntimeError("no rebalance decision in time")


def run_policy(model: Path, policy: str, args, rep: int) -> dict:
    tp = args.tp
    extra = list(FLAGS) + ["--ep-size", str(tp)] + (["--no-elastic-eplb"] if policy == "none" else [])
    if policy.startswith("copies"):
        extra += ["--elastic-redundant-experts", str(args.redundant)]
    srv = ServerProcess(model, tp_size=tp, extra_args=extra, start_timeout_s=1800)
    srv.start()
    res: dict = {"policy": policy, "repeat": rep, "tp_before": tp, "tp_after": tp - 1, "server_log": str(srv.log_path)}
    try:
        url = srv.url
        _decode_tput(url, 1, 4, args.seed)  # warm-up
        res["decode_tok_s_before"] = _decode_tput(url, args.clients, args.max_new, args.seed)
        res["prefill_tok_s_before"] = _prefill_tput(url, args.clients, args.prefill_len, args.seed)
        res["imbalance_before"] = _status(url)["eplb"]["imbalance_now"]
        n = len(_status(url)["recoveries"])
        os.kill(rank_pid(srv, 1, via_admin=True), signal.SIGKILL)
        rec = _wait_recovered(srv, tp - 1, n, 600)
        res.update(recovery_s=rec["recovery_s"], phases_s=rec["phases_s"],
                   placed_after_failure=_status(url)["eplb"]["placed"])
        _decode_tput(url, args.clients, args.max_new, args.seed + 7)  # traffic after the recovery (loads)
        if policy in ALGORITHM:
            last, move = _rebalance(url, ALGORITHM[policy])
            res["rebalance"] = {"decision": last.get("decision"), "plan_s": last.get("plan_s"),
                                "imbalance_before": last.get("imbalance_before"),
                                "imbalance_after": last.get("imbalance_after"), "moved_bytes": last.get("moved_bytes"),
                                "apply_s": move["recovery_s"] if move else None,
                                "migration_s": move["migration"].get("seconds") if move else None}
        # new prompts: the survivors keep the KV cache (--elastic-kv-backup), so the prompts measured
        # before would be prefix-cache hits now
        res["decode_tok_s_after"] = _decode_tput(url, args.clients, args.max_new, args.seed + 1000)
        res["prefill_tok_s_after"] = _prefill_tput(url, args.clients, args.prefill_len, args.seed + 1000)
        res["imbalance_after"] = _status(url)["eplb"]["imbalance_now"]
        return res
    finally:
        srv.stop()


def bench_server(args) -> int:
    policies = [p for p in args.policies.split(",") if p]
    bad = [p for p in policies if p not in POLICIES]
    if bad or not policies or args.tp < 2 or args.repeats < 1:
        print(f"error: policies {policies} must be a non-empty subset of {','.join(POLICIES)},"
              f" --tp {args.tp} >= 2, --repeats {args.repeats} >= 1", file=sys.stderr)
        return 2
    model = skewed_model(args.hot, args.hot_scale, args.seed)
    print(f"model {model}; tp {args.tp} -> {args.tp - 1} (rank 1 killed), EP; {args.clients} clients,"
          f" {args.max_new} new tokens, prefill {args.prefill_len} tokens; policies {policies}", flush=True)
    runs = []
    for rep in range(args.repeats):
        for policy in policies:
            r = run_policy(model, policy, args, rep)
            print(json.dumps(r), flush=True)
            runs.append(r)
    rows = []
    for policy in policies:
        mine = [r for r in runs if r["policy"] == policy]

        def med(key, sub=None):
            vals = [(r.get(sub) or {}).get(key) if sub else r.get(key) for r in mine]
            vals = [v for v in vals if v is not None]
            return statistics.median(vals) if vals else None

        row = {"policy": policy, "runs": len(mine)}
        for k in ("decode_tok_s_before", "decode_tok_s_after", "prefill_tok_s_before", "prefill_tok_s_after",
                  "imbalance_before", "imbalance_after", "recovery_s"):
            row[k] = med(k)
        row["decode_of_bound"] = row["decode_tok_s_after"] / (0.75 * row["decode_tok_s_before"])
        row["prefill_of_bound"] = row["prefill_tok_s_after"] / (0.75 * row["prefill_tok_s_before"])
        if "rebalance" in mine[0]:
            row.update({f"rebalance_{k}": med(k, "rebalance") for k in ("plan_s", "apply_s", "migration_s", "moved_bytes")})
        rows.append(row)
    print(f"\n{'policy':<10} {'decode before':>13} {'after':>7} {'of 3/4':>7} {'prefill before':>14} {'after':>7}"
          f" {'of 3/4':>7} {'imbal. after':>12} {'recovery s':>10}")
    for r in rows:
        print(f"{r['policy']:<10} {r['decode_tok_s_before']:>13.1f} {r['decode_tok_s_after']:>7.1f}"
              f" {r['decode_of_bound']:>7.3f} {r['prefill_tok_s_before']:>14.1f} {r['prefill_tok_s_after']:>7.1f}"
              f" {r['prefill_of_bound']:>7.3f} {r['imbalance_after'] or 0:>12.3f} {r['recovery_s']:>10.3f}")
        if "rebalance_plan_s" in r:
            print(f"{'':<10} rebalance: plan {r['rebalance_plan_s']} s, apply (pause) {r['rebalance_apply_s']} s,"
                  f" migration {r['rebalance_migration_s']} s, {(r['rebalance_moved_bytes'] or 0) / 1e6:.1f} MB moved")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                         "runs": runs, "summary": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0
