"""State daemon benchmark: attaching a rank's weights from the daemon vs loading them from disk.

For a ``sgl_elastic.testing.models`` Qwen3-MoE checkpoint (``--size bench``: ~1.9 GB float32;
``--size tiny`` for a quick run) at tp=``--tp``, one daemon loads every rank once, then for rank
``--rank``, ``--repeats`` times each, in this process:

- ``attach``: ExportWeights + map the handles into torch tensors (zero-copy, pages not yet touched);
- ``attach+touch``: the same, then read one byte of every 4 KiB page (what the first forward pass
  pays in page faults on a fresh mapping);
- ``fresh process``: attach (+ touch) timed inside a new Python process (imports excluded), what
  a restarted worker pays;
- ``attach populate+touch``: the same with the mapping pre-faulted in one ``madvise`` call;
- ``disk (preadv)``: allocate private tensors and read the same shards' byte ranges from the
  safetensors file (``SafetensorsCheckpoint.read_region``; the baseline a restarted process pays);
- ``disk (safe_open)``: the same shards through the ``safetensors`` library's ``get_slice``.

Disk reads come from the page cache when the file is cached (nothing here drops caches: other
users share the machine); the table says which. Also: the daemon's one-time load (time, bytes read
vs shard bytes) and its memory overhead (resident memory beyond the shard bytes it holds), and the
round-trip of a KvMatch on a populated prefix index.

Usage: ``python bench/daemon_bench.py [--size tiny|bench] [--tp 2] [--rank 0] [--repeats 3] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np


def _layout(ckpt: str, tp: int):
    from sgl_elastic.layout import ElasticLayout

    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = SimpleNamespace(**json.load(f))
    return ElasticLayout.from_hf_config(cfg, tp)


def _touch(tensors: dict) -> int:
    """Read one byte per 4 KiB page of every tensor (faults the mapping in); returns a checksum."""
    import torch

    s = 0
    for t in tensors.values():
        flat = t.view(-1).view(torch.uint8)
        s += int(flat[::4096].sum())
    return s


def _disk_preadv(ckpt_dir: str, layout, rank: int) -> tuple[dict, int]:
    import torch

    from sgl_elastic.executor.safetensors_io import RAW_DTYPE, SafetensorsCheckpoint
    from sgl_elastic.layout.geometry import rank_tensors, shard_region

    out = {}
    with SafetensorsCheckpoint(ckpt_dir) as ck:
        for t, shape in rank_tensors(layout, rank):
            e = ck.entry(t.name)
            arr = np.empty(shape, dtype=RAW_DTYPE[e.itemsize])
            ck.read_region(t.name, arr, *shard_region(t, layout, rank))
            out[t.name] = torch.from_numpy(arr)
        return out, ck.bytes_read


def _disk_safe_open(ckpt_dir: str, layout, rank: int) -> dict:
    from safetensors import safe_open

    from sgl_elastic.layout.geometry import rank_tensors, shard_region

    out = {}
    files = [os.path.join(ckpt_dir, f) for f in sorted(os.listdir(ckpt_dir)) if f.endswith(".safetensors")]
    handles = [safe_open(f, framework="pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    for t, _ in rank_tensors(layout, rank):
        r0, r1, c0, c1 = shard_region(t, layout, rank)
        sl = where[t.name].get_slice(t.name)
        out[t.name] = (sl[c0:c1] if len(t.shape) == 1 else sl[r0:r1, c0:c1]).contiguous()
    return out


def _page_cached_fraction(path: str) -> float | None:
    """Fraction of ``path``'s pages in the page cache (``mincore`` on a read-only mapping); None if unknown."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        view = np.frombuffer(m, dtype=np.uint8)
        n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * n)()
        rc = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec)
        del view
        m.close()
        return None if rc != 0 else sum(v & 1 for v in vec) / n
    except Exception:
        return None


_CHILD = """
import time
from sgl_elastic.daemon import DaemonClient
import torch
c = DaemonClient.from_run_dir({run_dir!r})
t0 = time.perf_counter()
a = c.attach_weights({rank})
t1 = time.perf_counter()
s = 0
for t in a.tensors.values():
    s += int(t.view(-1).view(torch.uint8)[::4096].sum())
t2 = time.perf_counter()
print(t1 - t0, t2 - t0)
"""


def _timed(fn, repeats: int, cleanup=None) -> tuple[float, float, object]:
    """(median s, best s, result of the last run); ``cleanup(result)`` after every other run."""
    times, result = [], None
    for i in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
        if i < repeats - 1 and cleanup is not None:
            cleanup(result)
    return statistics.median(times), min(times), result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="bench", choices=("tiny", "bench"))
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the records here")
    a = p.parse_args(argv)
    random.seed(a.seed)
    np.random.seed(a.seed)

    import torch

    from sgl_elastic.daemon import DaemonProcess
    from sgl_elastic.memory import attach_handles
    from sgl_elastic.layout.geometry import rank_tensors
    from sgl_elastic.testing.models import build_model

    torch.manual_seed(a.seed)
    ckpt = str(build_model("qwen3-moe", a.size))
    layout = _layout(ckpt, a.tp)
    st_files = [os.path.join(ckpt, f) for f in os.listdir(ckpt) if f.endswith(".safetensors")]
    cached = [_page_cached_fraction(f) for f in st_files]
    shard_bytes = sum(t.dtype_bytes * int(np.prod(s)) for t, s in rank_tensors(layout, a.rank))
    rec: dict = {"model": f"qwen3-moe-{a.size}", "tp": a.tp, "rank": a.rank, "repeats": a.repeats, "seed": a.seed,
                 "rank_shard_bytes": shard_bytes,
                 "checkpoint_bytes": sum(os.path.getsize(f) for f in st_files),
                 "page_cached_fraction_before": min(c for c in cached) if all(c is not None for c in cached) else None}

    d = DaemonProcess.start(log=open(os.devnull, "w"))
    try:
        c = d.client(timeout=60)
        s0 = c.stats()
        t = time.perf_counter()
        c.load_model(ckpt, layout)
        s = c.wait_ready(600)
        rec["daemon_load_s"] = time.perf_counter() - t
        rec["daemon_bytes_read"] = s.checkpoint_bytes_read
        rec["daemon_held_bytes"] = sum(r.weight_bytes for r in s.ranks)
        rec["daemon_rss_anon_idle_bytes"] = s0.rss_anon_bytes
        rec["daemon_rss_anon_bytes"] = s.rss_anon_bytes
        rec["daemon_rss_shmem_bytes"] = s.rss_shmem_bytes
        rec["daemon_overhead_bytes"] = s.rss_anon_bytes + s.rss_shmem_bytes - rec["daemon_held_bytes"]

        # attach (map only) and attach + first touch
        def attach():
            return attach_handles(c.export_weights(a.rank))

        med, best, att = _timed(attach, a.repeats, cleanup=lambda x: x.close())
        rec["attach_s"], rec["attach_best_s"] = med, best
        assert att is not None and att.nbytes == shard_bytes, (att.nbytes, shard_bytes)
        att.close()

        def attach_populate():
            x = attach_handles(c.export_weights(a.rank), populate=True)
            _touch(x.tensors)
            return x

        med, best, att = _timed(attach_populate, a.repeats, cleanup=lambda x: x.close())
        rec["attach_populate_touch_s"], rec["attach_populate_touch_best_s"] = med, best
        att.close()

        def attach_touch():
            x = attach()
            _touch(x.tensors)
            return x

        med, best, att = _timed(attach_touch, a.repeats, cleanup=lambda x: x.close())
        rec["attach_touch_s"], rec["attach_touch_best_s"] = med, best
        ref = att

        # a fresh process (what a restarted scheduler pays): attach + touch, timed inside the child
        child = subprocess.run([sys.executable, "-c", _CHILD.format(run_dir=d.run_dir, rank=a.rank)],
                               capture_output=True, text=True, timeout=600)
        if child.returncode != 0:
            raise RuntimeError(f"attach child failed: {child.stderr[-2000:]}")
        t_attach, t_touch = map(float, child.stdout.split())
        rec["fresh_process_attach_s"], rec["fresh_process_attach_touch_s"] = t_attach, t_touch

        # disk baselines
        med, best, (disk, nread) = _timed(lambda: _disk_preadv(ckpt, layout, a.rank), a.repeats)
        rec["disk_preadv_s"], rec["disk_preadv_best_s"], rec["disk_bytes_read"] = med, best, nread
        same = all(torch.equal(disk[n].view(-1).view(torch.uint8), ref.tensors[n].reshape(-1).view(torch.uint8))
                   for n in disk)
        rec["attach_equals_disk"] = bool(same)
        del disk
        med, best, _ = _timed(lambda: _disk_safe_open(ckpt, layout, a.rank), a.repeats)
        rec["disk_safe_open_s"], rec["disk_safe_open_best_s"] = med, best
        ref.close()

        # KV index round-trip on a populated index
        c.alloc_kv(num_layers=1, head_dim=8, num_slots=1 << 16, dtype="float16", page_size=16)
        rng = random.Random(a.seed)
        slot = 0
        prompts = []
        for _ in range(200):
            toks = [rng.randrange(50000) for _ in range(256)]
            c.kv_insert(toks, list(range(slot, slot + 256)))
            slot += 256
            prompts.append(toks)
        n = 200
        t = time.perf_counter()
        for i in range(n):
            c.kv_match(prompts[i % len(prompts)] + [1, 2, 3])
        rec["kv_match_rtt_us"] = (time.perf_counter() - t) / n * 1e6
        rec["kv_cached_slots"] = c.stats().kv.cached_slots
        c.close()
    finally:
        d.stop()

    rows = [
        ("daemon load (once, all ranks)", rec["daemon_load_s"], f"{rec['daemon_bytes_read'] / 1e6:.1f} MB read"),
        ("attach: map handles", rec["attach_s"], "zero-copy, pages untouched"),
        ("attach + touch every page", rec["attach_touch_s"], "first-use page faults included"),
        ("fresh process: attach", rec["fresh_process_attach_s"], "a new process (torch imported before)"),
        ("fresh process: attach + touch", rec["fresh_process_attach_touch_s"], "what a restarted worker pays"),
        ("attach populate + touch", rec["attach_populate_touch_s"], "MADV_POPULATE_WRITE, then first use"),
        ("disk: preadv byte ranges", rec["disk_preadv_s"], f"{rec['disk_bytes_read'] / 1e6:.1f} MB"),
        ("disk: safetensors get_slice", rec["disk_safe_open_s"], ""),
    ]
    print(f"\nqwen3-moe-{a.size}, tp={a.tp}, rank {a.rank} shard {shard_bytes / 1e6:.1f} MB, median of {a.repeats}"
          f" (page cache before: {rec['page_cached_fraction_before']})")
    print(f"{'path':34} {'seconds':>9} {'GB/s':>7}  note")
    for name, sec, note in rows:
        gbps = shard_bytes / sec / 1e9 if "daemon load" not in name else rec["daemon_bytes_read"] / sec / 1e9
        print(f"{name:34} {sec:9.4f} {gbps:7.2f}  {note}")
    print(f"daemon memory: holds {rec['daemon_held_bytes'] / 1e6:.1f} MB of shards; RssAnon"
          f" {rec['daemon_rss_anon_bytes'] / 1e6:.1f} MB (idle {rec['daemon_rss_anon_idle_bytes'] / 1e6:.1f} MB),"
          f" RssShmem {rec['daemon_rss_shmem_bytes'] / 1e6:.1f} MB -> overhead beyond shards"
          f" {rec['daemon_overhead_bytes'] / 1e6:.1f} MB")
    print(f"KvMatch round trip: {rec['kv_match_rtt_us']:.0f} us (index of {rec['kv_cached_slots']} slots);"
          f" attach == disk: {rec['attach_equals_disk']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rec, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
