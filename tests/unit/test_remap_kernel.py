"""Logical -> physical expert remap: the torch reference against a plain-Python reading of the
spec, and the Triton kernel against the reference (CPU: Triton's interpreter in a subprocess with
TRITON_INTERPRET=1, since it must be set before triton is imported; CUDA: when there is one)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_elastic.kernels.remap import remap_experts, remap_experts_reference, remap_experts_triton
from sgl_elastic.moe import rebalance_experts


def naive(topk_ids, log2phy, logcnt, alive):
    """The module docstring's rule, one entry at a time (-1 for padding, bad ids, no live replica)."""
    out = torch.full_like(topk_ids, -1)
    for t in range(topk_ids.shape[0]):
        for i in range(topk_ids.shape[1]):
            e = int(topk_ids[t, i])
            if not 0 <= e < log2phy.shape[0]:
                continue
            live = [int(p) for p in log2phy[e, : int(logcnt[e])] if 0 <= int(p) < alive.numel() and bool(alive[p])]
            if live:
                out[t, i] = live[(t + e) % len(live)]
    return out


def random_case(seed, num_tokens=50, k=4, num_logical=12, max_replicas=4, num_physical=40, p_dead=0.3,
                dtype=torch.int64, pad_gaps=True):
    """Maps in SGLang's form (replicas first, -1 padded) with random dead slots and -1 / bad ids."""
    g = torch.Generator().manual_seed(seed)
    logcnt = torch.randint(1, max_replicas + 1, (num_logical,), generator=g)
    log2phy = torch.full((num_logical, max_replicas), -1, dtype=torch.int64)
    slots = torch.randperm(num_physical, generator=g)
    used = 0
    for e in range(num_logical):
        n = int(logcnt[e])
        log2phy[e, :n] = slots[used: used + n] if used + n <= num_physical else torch.randint(0, num_physical, (n,), generator=g)
        used += n
    alive = torch.rand(num_physical, generator=g) > p_dead
    topk = torch.randint(-1 if pad_gaps else 0, num_logical, (num_tokens, k), generator=g)
    return topk.to(dtype), log2phy.to(dtype), logcnt.to(dtype), alive


# ---- the reference -----------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), num_tokens=st.integers(0, 30), k=st.integers(1, 8),
       num_logical=st.integers(1, 10), max_replicas=st.integers(1, 5), p_dead=st.sampled_from([0.0, 0.3, 0.8]),
       dtype=st.sampled_from([torch.int32, torch.int64]))
def test_reference_matches_the_spec(seed, num_tokens, k, num_logical, max_replicas, p_dead, dtype):
    case = random_case(seed, num_tokens, k, num_logical, max_replicas, 30, p_dead, dtype)
    out = remap_experts_reference(*case, strict=False)
    assert out.dtype == dtype and out.shape == case[0].shape
    assert torch.equal(out, naive(*case))
    assert torch.equal(remap_experts(*case), out)  # CPU dispatch: the reference, marking


def test_strict_reference_reports_an_expert_without_live_replica():
    log2phy = torch.tensor([[0, 1], [2, -1], [3, -1]])
    logcnt = torch.tensor([2, 1, 1])
    alive = torch.tensor([True, False, False, True])
    topk = torch.tensor([[0, 1], [2, -1]])
    with pytest.raises(ValueError, match=r"logical experts \[1\] have no live replica"):
        remap_experts_reference(topk, log2phy, logcnt, alive)
    assert remap_experts_reference(topk, log2phy, logcnt, alive, strict=False).tolist() == [[0, -1], [3, -1]]
    with pytest.raises(ValueError, match=r"outside \[-1, 3\): \[3\]"):
        remap_experts_reference(torch.tensor([[3]]), log2phy, logcnt, alive)
    with pytest.raises(ValueError, match="logcnt has 2 experts but log2phy has 3"):
        remap_experts_reference(topk, log2phy, logcnt[:2], alive)
    with pytest.raises(ValueError, match="int32 or int64"):
        remap_experts_reference(topk.float(), log2phy, logcnt, alive)


def test_round_robin_spreads_tokens_over_live_replicas_only():
    log2phy = torch.tensor([[5, 1, 3, 7]])
    logcnt = torch.tensor([4])
    alive = torch.ones(8, dtype=torch.bool)
    alive[3] = False
    out = remap_experts_reference(torch.zeros(300, 1, dtype=torch.int64), log2phy, logcnt, alive)
    counts = torch.bincount(out.flatten(), minlength=8)
    assert counts[3] == 0 and counts[[5, 1, 7]].tolist() == [100, 100, 100]
    assert out[:4, 0].tolist() == [5, 1, 7, 5]


def test_remap_on_rebalanced_maps_with_a_dead_rank_hits_live_slots_of_the_right_expert():
    weight = torch.rand(2, 16, generator=torch.Generator().manual_seed(1)) * 100
    slots, cap = [6, 6, 6, 6], [1.0, 1.0, 0.0, 0.5]
    phy2log, log2phy, logcnt = rebalance_experts(weight, slots, cap)
    alive = torch.tensor([c > 0 for c in cap for _ in range(6)])
    topk = torch.randint(0, 16, (64, 4), generator=torch.Generator().manual_seed(2))
    for layer in range(2):
        out = remap_experts_reference(topk, log2phy[layer], logcnt[layer], alive)
        assert alive[out].all() and torch.equal(phy2log[layer][out], topk)
        assert not ((out >= 12) & (out < 18)).any()


# ---- the kernel --------------------------------------------------------------------------------
def kernel_cases():
    """(name, case) pairs covering dtypes, padding, dead experts, bad ids, empty and block edges."""
    yield "empty", random_case(0, num_tokens=0)
    yield "one", random_case(1, num_tokens=1, k=1)
    yield "block_edge", random_case(2, num_tokens=257, k=1)
    yield "int32", random_case(3, num_tokens=100, k=8, dtype=torch.int32)
    yield "many_dead", random_case(4, num_tokens=80, p_dead=0.9)
    yield "no_dead", random_case(5, num_tokens=80, p_dead=0.0, pad_gaps=False)
    yield "wide", random_case(6, num_tokens=64, k=8, num_logical=64, max_replicas=9, num_physical=300)
    topk, log2phy, logcnt, alive = random_case(7, num_tokens=40)
    topk[0, 0], topk[1, 1] = 99, -7  # out of range: -1
    yield "bad_ids", (topk, log2phy, logcnt, alive)
    for seed in range(8, 20):
        yield f"random{seed}", random_case(seed, num_tokens=30 + seed)


def check_kernel(device: str) -> int:
    n = 0
    for name, case in kernel_cases():
        case = tuple(t.to(device) for t in case)
        got = remap_experts_triton(*case, block=64)
        want = remap_experts_reference(*case, strict=False)
        assert got.dtype == want.dtype and torch.equal(got.cpu(), want.cpu()), f"{name}: {got} != {want}"
        n += 1
    return n


def test_triton_kernel_matches_reference_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "interpreter: OK" in proc.stdout


def test_kernel_refuses_cpu_tensors_outside_the_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton's interpreter")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        remap_experts_triton(*random_case(0, num_tokens=2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_matches_reference_on_cuda():
    assert check_kernel("cuda") > 0
    case = tuple(t.cuda() for t in random_case(30, num_tokens=4096, k=8, num_logical=256, max_replicas=4,
                                               num_physical=288))
    assert torch.equal(remap_experts(*case), remap_experts_reference(*case, strict=False))


if __name__ == "__main__":  # the interpreter check, run by the test above with TRITON_INTERPRET=1
    print(f"interpreter: OK ({check_kernel('cpu')} cases)")
