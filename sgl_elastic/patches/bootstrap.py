"""Patch of ``sglang.srt.distributed.bootstrap``: one OpenMP pool per TP rank's cores on any CPU.

SGLang binds a CPU rank's OpenMP threads to its ``SGLANG_CPU_OMP_THREADS_BIND`` entry only through
the AMX/ARM kernel (``sgl_kernel.init_cpu_threads_env``). Elsewhere every rank keeps torch's
default pool, one thread per core of the machine, so N ranks run N x cores threads that spin and
preempt each other at every collective (measured here: 3 ranks on 2 cores, tiny Qwen3-MoE, decode
~8x slower than with one thread per rank). The hook sizes the pool to the entry's core count, at
start and at every in-place rebuild (the entry changes with the tp size). Threads are not pinned:
with more ranks than cores the entries share cores and the OS spreads the processes better.
"""

from __future__ import annotations

from sgl_elastic.rank import state


def cores_in(entry: str) -> int:
    """Cores in one ``SGLANG_CPU_OMP_THREADS_BIND`` entry ("0-3", "5", "0-1,4"); 0 when empty."""
    n = 0
    for part in filter(None, (p.strip() for p in (entry or "").split(","))):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def init_cpu_threads_env(original, *, local_omp_cpuid=None, **kwargs):
    out = original(local_omp_cpuid=local_omp_cpuid, **kwargs)
    if state.layout() is None or not isinstance(local_omp_cpuid, str):
        return out
    from sglang.srt.distributed import bootstrap

    if getattr(bootstrap, "_is_cpu_amx_available", False) or getattr(bootstrap, "_is_cpu_arm64", False):
        return out  # SGLang's kernel bound the pool already
    n = cores_in(local_omp_cpuid)
    if n > 0:
        import torch

        torch.set_num_threads(n)
    return out
