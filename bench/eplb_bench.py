"""EPLB benchmark: the capacity-weighted rebalancer against SGLang's placement algorithms.

Section ``--pure`` (the default): pure functions on CPU, at DeepSeek-V3 scale (256 experts,
``--layers`` MoE layers, seeded log-normal loads, ``--sigma`` skew). The model's attention has 64
query / 8 KV heads, so after rank 3 of 8 dies the ETP layout gives survivor 0 two KV heads: it gets
less expert capacity and, with its larger KV pool, fewer slots (``sgl_elastic.moe.expert_budget``).
Scenarios:
  * ``8 ranks``: before the failure, 36 slots each, equal capacity;
  * ``8->7 equal``: rank 3 dead, 40 slots on each survivor, the budget's capacities;
  * ``8->7 budget``: rank 3 dead, slots and capacities from the budget (36 on survivor 0, 40 else).
Algorithms: ``ours`` (``sgl_elastic.moe.rebalance_experts``), ``deepseek`` (SGLang's copy of
DeepSeek's EPLB, global policy, on the live ranks; equal slots only, so the smallest live count),
``elasticity_aware`` (SGLang's, the same slots per rank, dead rank masked), ``none`` (no
rebalancing: each expert stays on its rank of the 8-rank layout, the dead rank's experts dealt
round robin onto survivors with a free slot). Metric, per layer: the largest load / capacity over
the live ranks divided by its ideal, total load / total live capacity (1.00 is perfect); mean and
worst over layers, and each algorithm's run time.

Section ``--server``: a running server, the bench-size Qwen3-MoE (16 experts top-2, 8 KV heads) with
a skewed router (``--hot`` seeded experts per layer have their router rows scaled by ``--hot-scale``:
they win the top-2 far more often), ``--tp 4 --ep-size 4`` on CPU, rank 1 SIGKILLed (4 -> 3). Per
policy, a fresh server: decode throughput (``--clients`` concurrent requests of ``--max-new`` tokens)
and prefill throughput (``--clients`` prompts of ``--prefill-len`` tokens, one new token each) before
the failure and after the recovery, and the measured imbalance of the served placement
(``/elastic/status`` ``eplb.imbalance_now``: the busiest rank's routed tokens over capacity against a
perfect split, from rank 0's counts). Policies:
  * ``none``: ``--no-elastic-eplb``: the planner's contiguous experts (CMM, bytes only);
  * ``lost``: the default: survivors keep their experts, the lost ones go where load / capacity rises least;
  * ``rebalance``: the default, then ``POST /elastic/rebalance`` (every expert placed by
    ``rebalance_experts``, moved by peer copies), with its planning and apply times;
  * ``copies``: ``--elastic-redundant-experts R`` (``--redundant``, default 5: 21 slots), the failure
    (survivors keep their experts and copies, the free slots take copies by load), then a rebalance;
  * ``copies-deepseek``: the same, but the rebalance applies SGLang's DeepSeek EPLB
    (``{"algorithm": "deepseek"}``; it needs equal slots: 16 + 5 = 7 on each of 3 ranks);
  * ``copies-elasticity``: the same with SGLang's ``elasticity_aware`` (every rank of the shrunk
    layout active; the pure section also compares it masking the dead rank of the 8).

Section ``--planner``: redundant expert slots in the planner at Qwen3-30B-A3B scale (128 experts, 48
layers, tp 4, seeded gamma(0.3) loads): for each ``--redundant-list`` N, a rebalance (plan time,
imbalance before / after, bytes moved), then rank 2 dies under the same loads (bytes reloaded, the
lower bound, peer bytes, imbalance after). Imbalance: ``planner.experts.expert_imbalance`` (the
busiest rank's load / capacity over a perfect split, an expert's load split over its copies).

Usage: ``python bench/eplb_bench.py --planner [--redundant-list 0,4,16,32]``,
``python bench/eplb_bench.py [--pure] [--layers 58] [--seed 0] [--sigma 1.5] [--json PATH]``,
``python bench/eplb_bench.py --server [--policies none,lost,rebalance,copies,copies-deepseek,copies-elasticity]
[--redundant 5]
[--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from sglang.srt.eplb.eplb_algorithms import deepseek, elasticity_aware

from sgl_elastic.layout import ElasticLayout
from sgl_elastic.moe import expert_budget, rank_load_ratio, rebalance_experts

NUM_EXPERTS = 256
OLD_TP, DEAD_RANK = 8, 3
EXPERT_BYTES = 1  # budgets in slot units: free memory of 44 slots, the KV pool 4 slots per KV head
FREE_SLOTS, KV_SLOTS_PER_HEAD = 44, 4


def model_config(num_layers: int) -> SimpleNamespace:
    return SimpleNamespace(model_type="qwen3_moe", hidden_size=7168, num_attention_heads=64, num_key_value_heads=8,
                           head_dim=128, intermediate_size=18432, moe_intermediate_size=2048,
                           num_experts=NUM_EXPERTS, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
                           vocab_size=129280, num_hidden_layers=num_layers, tie_word_embeddings=False,
                           dtype="bfloat16")


def skewed_loads(num_layers: int, seed: int, sigma: float) -> torch.Tensor:
    """``[num_layers, 256]`` tokens per expert: log-normal, independent per layer."""
    g = torch.Generator().manual_seed(seed)
    return (1000 * torch.exp(sigma * torch.randn(num_layers, NUM_EXPERTS, generator=g, dtype=torch.float64))).round()


def scenarios(num_layers: int) -> dict[str, tuple[list[int], list[float]]]:
    """name -> (slots, capacity) over the 8 original ranks (rank 3 dead after the failure)."""
    cfg = model_config(num_layers)
    before = expert_budget(ElasticLayout.from_hf_config(cfg, OLD_TP), [36] * OLD_TP, EXPERT_BYTES)
    after = expert_budget(ElasticLayout.from_hf_config(cfg, OLD_TP - 1), [FREE_SLOTS] * (OLD_TP - 1), EXPERT_BYTES,
                          kv_bytes_per_head=KV_SLOTS_PER_HEAD)

    def on_old_ranks(values, dead_value):
        values = list(values)
        return values[:DEAD_RANK] + [dead_value] + values[DEAD_RANK:]

    cap7 = on_old_ranks(after.capacity, 0.0)
    return {
        "8 ranks": (list(before.slots), list(before.capacity)),
        "8->7 equal": ([40] * OLD_TP, cap7),
        "8->7 budget": (on_old_ranks(after.slots, 0), cap7),
    }


# ---- the algorithms: each returns (phy2log, slots it uses) -------------------------------------------
def run_ours(weight, slots, cap):
    return rebalance_experts(weight, slots, cap)[0], slots


def run_deepseek(weight, slots, cap):
    live = [r for r, (s, c) in enumerate(zip(slots, cap)) if s > 0 and c > 0]
    each = _equal_slots(slots, cap)
    phy2log = deepseek.rebalance_experts(weight, each * len(live), 1, 1, len(live), False)[0]
    # back onto the 8 ranks: the live ranks' first ``each`` slots, nothing on the dead rank
    used = [each if r in live else 0 for r in range(len(slots))]
    return phy2log, used


def run_elasticity_aware(weight, slots, cap):
    active = torch.tensor([s > 0 and c > 0 for s, c in zip(slots, cap)])
    each = _equal_slots(slots, cap)
    phy2log = elasticity_aware.rebalance_experts(weight, each * len(slots), 1, 1, len(slots), False, active)[0]
    return phy2log, [each] * len(slots)  # the dead rank's slots are masked by its capacity 0


def run_none(weight, slots, cap):
    num_layers = weight.shape[0]
    per_old = NUM_EXPERTS // OLD_TP
    live = [r for r, (s, c) in enumerate(zip(slots, cap)) if s > 0 and c > 0]
    held = {r: list(range(r * per_old, (r + 1) * per_old)) if r in live else [] for r in range(len(slots))}
    orphans = [e for r in range(len(slots)) if r not in live for e in range(r * per_old, (r + 1) * per_old)]
    i = 0
    for e in orphans:
        while len(held[live[i % len(live)]]) >= slots[live[i % len(live)]]:
            i += 1
        held[live[i % len(live)]].append(e)
        i += 1
    row = torch.tensor([e for r in range(len(slots)) for e in held[r]], dtype=torch.int64)
    return row.expand(num_layers, -1).clone(), [len(held[r]) for r in range(len(slots))]


class DoesNotFit(Exception):
    """The algorithm cannot place the experts on these slots (the reason is the message)."""


def _equal_slots(slots, cap):
    live = [s for s, c in zip(slots, cap) if s > 0 and c > 0]
    each = min(live)
    if each * len(live) < NUM_EXPERTS:
        raise DoesNotFit(f"equal slots only: {each} x {len(live)} live ranks = {each * len(live)} < {NUM_EXPERTS}")
    return each


ALGORITHMS = {"ours": run_ours, "deepseek": run_deepseek, "elasticity_aware": run_elasticity_aware, "none": run_none}


def bench_pure(num_layers: int, seed: int, sigma: float) -> list[dict]:
    weight = skewed_loads(num_layers, seed, sigma)
    rows = []
    for scenario, (slots, cap) in scenarios(num_layers).items():
        ideal = weight.sum(-1) / sum(c for s, c in zip(slots, cap) if s > 0)
        for name, fn in ALGORITHMS.items():
            try:
                fn(weight[:1], slots, cap)  # warm-up (first-call costs), untimed
            except DoesNotFit:
                pass
            t = time.perf_counter()
            try:
                phy2log, used = fn(weight, slots, cap)
            except DoesNotFit as e:
                rows.append(dict(scenario=scenario, algorithm=name, note=str(e)))
                continue
            elapsed = time.perf_counter() - t
            worst = rank_load_ratio(weight, phy2log, used, cap).max(-1).values
            rel = worst / ideal
            rows.append(dict(
                scenario=scenario, algorithm=name, slots=sum(s for s, c in zip(used, cap) if c > 0),
                capacity=[round(c, 3) for c in cap], max_load_per_capacity=float(worst.mean()),
                imbalance_mean=float(rel.mean()), imbalance_worst=float(rel.max()), time_ms=elapsed * 1e3,
            ))
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'scenario':<12} {'algorithm':<17} {'slots':>5} {'max load/cap':>12} {'/ideal mean':>11} {'worst':>7} {'time ms':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "note" in r:
            print(f"{r['scenario']:<12} {r['algorithm']:<17} n/a: {r['note']}")
            continue
        print(f"{r['scenario']:<12} {r['algorithm']:<17} {r['slots']:>5} {r['max_load_per_capacity']:>12.0f}"
              f" {r['imbalance_mean']:>11.4f} {r['imbalance_worst']:>7.4f} {r['time_ms']:>9.1f}")


def bench_planner(redundant: list[int], seed: int) -> list[dict]:
    import numpy as np

    from sgl_elastic.layout.presets import preset_config
    from sgl_elastic.planner import ClusterChange, plan_migration
    from sgl_elastic.planner.experts import default_capacity, expert_imbalance

    cfg = preset_config("Qwen3-30B-A3B")
    loads = np.random.default_rng(seed).gamma(0.3, 100.0, size=(cfg.num_hidden_layers, cfg.num_experts))
    rows = []
    for n in redundant:
        old = ElasticLayout.from_hf_config(cfg, 4, expert_parallel=True, redundant_experts=n)
        t = time.perf_counter()
        plan = plan_migration(old, ClusterChange(), expert_loads=loads, rebalance_experts=True)
        plan_s = time.perf_counter() - t
        cap = default_capacity(old)
        t = time.perf_counter()
        fail = plan_migration(plan.new_layout, ClusterChange(failed=(2,)), expert_loads=loads)
        fail_s = time.perf_counter() - t
        rows.append(dict(redundant=n, rebalance_plan_s=plan_s, imbalance_before=expert_imbalance(old, loads, cap),
                         imbalance_rebalanced=expert_imbalance(plan.new_layout, loads, cap),
                         rebalance_moved_gb=(plan.peer_bytes + plan.reload_bytes) / 1e9, failure_plan_s=fail_s,
                         failure_reload_gb=fail.reload_bytes / 1e9, failure_lower_bound_gb=fail.lower_bound_reload_bytes / 1e9,
                         failure_peer_gb=fail.peer_bytes / 1e9,
                         imbalance_after_failure=expert_imbalance(fail.new_layout, loads, default_capacity(fail.new_layout))))
    head = (f"{'N':>3} {'plan s':>7} {'imbal.':>7} {'-> rebal.':>9} {'moved GB':>9} | {'fail plan s':>11}"
            f" {'reload GB':>9} {'bound GB':>8} {'peer GB':>7} {'imbal.':>7}")
    print(head)
    for r in rows:
        print(f"{r['redundant']:>3} {r['rebalance_plan_s']:>7.2f} {r['imbalance_before']:>7.3f}"
              f" {r['imbalance_rebalanced']:>9.3f} {r['rebalance_moved_gb']:>9.2f} | {r['failure_plan_s']:>11.2f}"
              f" {r['failure_reload_gb']:>9.2f} {r['failure_lower_bound_gb']:>8.2f} {r['failure_peer_gb']:>7.2f}"
              f" {r['imbalance_after_failure']:>7.3f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pure", action="store_true", help="pure-function comparison (the default section)")
    ap.add_argument("--server", action="store_true", help="policies on a running server (tp 4 -> 3)")
    ap.add_argument("--planner", action="store_true", help="redundant slots in the planner (Qwen3-30B scale)")
    ap.add_argument("--redundant-list", default="0,4,16,32", help="planner section: redundant slots to try")
    ap.add_argument("--policies", default="none,lost,rebalance,copies,copies-deepseek,copies-elasticity")
    ap.add_argument("--redundant", type=int, default=5, help="redundant expert slots of the copies policies")
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--hot", type=int, default=3, help="hot experts per layer (server section)")
    ap.add_argument("--hot-scale", type=float, default=3.0, help="router row scale of a hot expert")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1, help="server section: fresh servers per policy")
    ap.add_argument("--layers", type=int, default=58)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sigma", type=float, default=1.5, help="log-normal skew of the per-expert loads")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    if args.server:
        here = str(Path(__file__).resolve().parent)
        if here not in sys.path:  # loadable by path (the unit test), not only as a script
            sys.path.insert(0, here)
        from eplb_server import bench_server

        return bench_server(args)
    if args.planner:
        try:
            red = [int(x) for x in args.redundant_list.split(",") if x.strip()]
        except ValueError:
            red = []
        if not red or min(red) < 0:
            print(f"error: --redundant-list {args.redundant_list!r}: give comma-separated slot counts >= 0", file=sys.stderr)
            return 2
        rows = bench_planner(red, args.seed)
        if args.json:
            args.json.write_text(json.dumps(dict(seed=args.seed, rows=rows), indent=2))
            print(f"wrote {args.json}")
        return 0
    if args.layers < 1:
        print(f"error: --layers={args.layers} must be >= 1", file=sys.stderr)
        return 2
    slots_caps = scenarios(args.layers)
    print(f"{NUM_EXPERTS} experts, {args.layers} layers, log-normal loads sigma={args.sigma} seed={args.seed};"
          f" rank {DEAD_RANK} of {OLD_TP} dies")
    for name, (slots, cap) in slots_caps.items():
        print(f"  {name}: slots {slots} capacity {[round(c, 3) for c in cap]}")
    rows = bench_pure(args.layers, args.seed, args.sigma)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(dict(layers=args.layers, seed=args.seed, sigma=args.sigma,
                                             experts=NUM_EXPERTS, rows=rows), indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
