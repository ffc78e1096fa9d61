"""Elastic TP vs SGLang's CPU padding: throughput and memory per rank, one run, baselines included.

Cases (bench-size Qwen3-MoE: 16 q / 8 KV heads, 16 experts, moe_intermediate 512, vocab 8192):
- ``tp3-elastic``: sgl-elastic at tp=3, the server's own widths (3,3,2 KV heads, whole units, no padding);
- ``tp3-vanilla-padded``: vanilla SGLang at tp=3 (CPU pads to 9 KV / 18 q heads, 576 columns);
- ``tp2-elastic-equal``: sgl-elastic at tp=2 with equal widths (the patches' overhead);
- ``tp2-vanilla``: vanilla SGLang at tp=2.

Per case one engine; after a warm-up, ``--repeats`` rounds of: a prefill (``--batch`` prompts of
``--input-len`` random token ids, 1 new token) and a full request (``--output-len`` new tokens).
Prefill throughput = prompt tokens / prefill time; decode throughput = batch * (output_len - 1) /
(full time - prefill time). Medians over the repeats. Radix cache off (every round prefills).
Memory: resident set size of each scheduler process after loading (RSS, includes ~0.7 GB of
interpreter + SGLang per process), and the parameter bytes each rank holds (from the layout, and
for the padded baseline from SGLang's padding rule).

    python bench/etp_bench.py [--size bench|tiny] [--repeats 3] [--out bench/etp_bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

SEED = 0


def _scheduler_rss_mb() -> list[float]:
    """RSS (MiB) of this process's SGLang scheduler children, in TP rank order."""
    import psutil

    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            title = " ".join(child.cmdline()) or child.name()
            name = child.name()
        except psutil.Error:
            continue
        for text in (title, name):
            if "scheduler_TP" in text:
                rank = int(text.split("scheduler_TP")[1].split()[0].split("_")[0].rstrip(":"))
                found[rank] = child.memory_info().rss / 2**20
                break
    return [round(found[r], 1) for r in sorted(found)]


def _param_bytes_per_rank(model_path: str, tp: int, elastic: bool) -> list[int]:
    """Bytes of the sharded + replicated parameters each rank holds (analytic, float32 per config)."""
    from transformers import AutoConfig

    from sgl_elastic.layout import ElasticLayout

    cfg = AutoConfig.from_pretrained(model_path)
    elem = 4 if str(getattr(cfg, "dtype", "float32")).endswith("float32") else 2
    hidden, hd, layers = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    nq, nkv, experts, inter, vocab = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_experts,
                                      cfg.moe_intermediate_size, cfg.vocab_size)
    out = []
    if elastic:
        lay = ElasticLayout.from_hf_config(cfg, tp)
        attn, moe, voc = lay.family("attn"), lay.family("moe"), lay.family("vocab")
        for r in range(tp):
            q, kv, i, v = attn.rank_q_heads(r), attn.rank_kv_heads(r), moe.rank_dim_size(r), voc.rank_dim_size(r)
            out.append(_rank_bytes(hidden, hd, layers, q, kv, experts, i, v, cfg, elem))
    else:  # SGLang's CPU padding (configs/update_config.py) then equal shards
        pad_kv = -(-nkv // tp) * tp
        pad_q = pad_kv * (nq // nkv)
        pad_i = -(-inter // (tp * 32)) * tp * 32
        pad_v = -(-vocab // (64 * tp)) * 64 * tp if (-(-vocab // 64) * 64) % tp else -(-vocab // 64) * 64
        for _ in range(tp):
            out.append(_rank_bytes(hidden, hd, layers, pad_q // tp, pad_kv // tp, experts, pad_i // tp, pad_v // tp, cfg, elem))
    return out


def _rank_bytes(hidden, hd, layers, q, kv, experts, inter, vocab_rows, cfg, elem) -> int:
    attn = hidden * (q + 2 * kv) * hd + q * hd * hidden + 2 * hd  # qkv, o, q/k norm
    moe = experts * 3 * hidden * inter + hidden * experts  # w13, w2, router
    norms = 2 * hidden
    emb = vocab_rows * hidden * (1 if cfg.tie_word_embeddings else 2)
    return int(elem * (layers * (attn + moe + norms) + emb + hidden))


def run_case(name: str, model_path: str, tp: int, elastic: bool, args) -> dict:
    import torch

    from sgl_elastic.config import ElasticArgs
    from sgl_elastic.testing.reference import sglang_engine

    gen = torch.Generator().manual_seed(SEED)
    prompts = torch.randint(10, 8000 if args.size == "bench" else 500, (args.repeats + 1, args.batch, args.input_len),
                            generator=gen).tolist()
    prefill_s, full_s = [], []
    with sglang_engine(model_path, tp, elastic=ElasticArgs() if elastic else None, dtype=args.dtype,
                       disable_radix_cache=True, max_total_tokens=args.max_total_tokens,
                       log_level="error") as engine:
        rss = _scheduler_rss_mb()

        def generate(ids, n):
            t0 = time.perf_counter()
            engine.generate(input_ids=ids, sampling_params={"temperature": 0.0, "max_new_tokens": n, "ignore_eos": True})
            return time.perf_counter() - t0

        generate(prompts[0], 4)  # warm-up
        for rep in range(args.repeats):
            prefill_s.append(generate(prompts[rep + 1], 1))
            full_s.append(generate(prompts[rep + 1], args.output_len))
    prefill = statistics.median(prefill_s)
    decode = statistics.median([f - p for f, p in zip(full_s, prefill_s)])
    return {
        "case": name, "tp": tp, "elastic": elastic,
        "prefill_tok_s": round(args.batch * args.input_len / prefill, 1),
        "decode_tok_s": round(args.batch * (args.output_len - 1) / decode, 2),
        "prefill_s": [round(x, 3) for x in prefill_s], "full_s": [round(x, 3) for x in full_s],
        "rss_mb_per_rank": rss,
        "param_mb_per_rank": [round(b / 2**20, 1) for b in _param_bytes_per_rank(model_path, tp, elastic)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("bench", "tiny"), default="bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-total-tokens", type=int, default=4096)
    parser.add_argument("--cases", default="tp3-elastic,tp3-vanilla-padded,tp2-elastic-equal,tp2-vanilla")
    parser.add_argument("--out", default="bench/etp_bench.json")
    args = parser.parse_args(argv)

    from sgl_elastic.testing.models import build_model

    model_path = str(build_model("qwen3-moe", args.size))
    specs = {
        "tp3-elastic": (3, True), "tp3-vanilla-padded": (3, False),
        "tp2-elastic-equal": (2, True), "tp2-vanilla": (2, False),
    }
    results = []
    for name in args.cases.split(","):
        tp, elastic = specs[name]
        print(f"[etp_bench] {name} ...", flush=True)
        results.append(run_case(name, model_path, tp, elastic, args))
        print(json.dumps(results[-1]), flush=True)
        _write(args, results)  # after every case: a cut-short run keeps what it measured

    by = {r["case"]: r for r in results}
    print(f"\nqwen3-moe {args.size}, batch {args.batch} x {args.input_len} in / {args.output_len} out, "
          f"{args.dtype}, median of {args.repeats}")
    print(f"{'case':<20} {'prefill tok/s':>14} {'decode tok/s':>13} {'RSS MiB/rank':>26} {'params MiB/rank':>26}")
    for r in results:
        print(f"{r['case']:<20} {r['prefill_tok_s']:>14} {r['decode_tok_s']:>13} "
              f"{str(r['rss_mb_per_rank']):>26} {str(r['param_mb_per_rank']):>26}")
    for ours, base in (("tp3-elastic", "tp3-vanilla-padded"), ("tp2-elastic-equal", "tp2-vanilla")):
        if ours in by and base in by:
            for k in ("prefill_tok_s", "decode_tok_s"):
                print(f"{ours} / {base} {k}: {by[ours][k] / by[base][k]:.3f}")
    _write(args, results)
    print(f"wrote {args.out}")
    return 0


def _write(args, results) -> None:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    raise SystemExit(main())
