"""The capacity-weighted rebalancer: invariants, errors, an exhaustive optimum on tiny cases, and
SGLang's copy of DeepSeek's EPLB (imported) as the baseline it must never lose to."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from types import SimpleNamespace

from sgl_elastic.layout import ElasticLayout
from sgl_elastic.moe import ExpertBudget, expert_budget, rank_load_ratio, rebalance_experts

deepseek = pytest.importorskip("sglang.srt.eplb.eplb_algorithms.deepseek")

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _live(slots, cap):
    cap = [1.0] * len(slots) if cap is None else cap
    return [s > 0 and c > 0 for s, c in zip(slots, cap)]


def check_invariants(weight, slots, cap, phy2log, log2phy, logcnt):
    """Shapes, dead slots empty, every expert >= 1 live replica, log2phy the inverse of phy2log."""
    num_layers, num_logical = weight.shape
    live = _live(slots, cap)
    alive = torch.tensor([a for a, s in zip(live, slots) for _ in range(s)], dtype=torch.bool)
    assert phy2log.shape == (num_layers, sum(slots)) and phy2log.dtype == torch.int64
    assert logcnt.shape == (num_layers, num_logical) and logcnt.dtype == torch.int64
    assert log2phy.shape == (num_layers, num_logical, int(logcnt.max())) and log2phy.dtype == torch.int64
    assert (phy2log[:, ~alive] == -1).all(), "dead slots must hold nothing"
    assert ((phy2log[:, alive] >= 0) & (phy2log[:, alive] < num_logical)).all(), "every live slot is filled"
    assert (logcnt >= 1).all()
    assert (logcnt.sum(-1) == int(alive.sum())).all()
    for layer in range(num_layers):
        assert torch.equal(torch.bincount(phy2log[layer, alive], minlength=num_logical), logcnt[layer])
        for e in range(num_logical):
            n = int(logcnt[layer, e])
            phys = log2phy[layer, e, :n]
            assert (log2phy[layer, e, n:] == -1).all()
            assert torch.equal(phys, torch.sort(phys).values) and len(set(phys.tolist())) == n
            assert alive[phys].all() and (phy2log[layer, phys] == e).all()


def deepseek_ratio(weight, num_ranks, slots_each, cap=None):
    phy2log, _, _ = deepseek.rebalance_experts(weight, num_ranks * slots_each, 1, 1, num_ranks, False)
    return rank_load_ratio(weight, phy2log, [slots_each] * num_ranks, cap).max(-1).values


def ours_ratio(weight, slots, cap=None):
    phy2log, log2phy, logcnt = rebalance_experts(weight, slots, cap)
    check_invariants(weight, slots, cap, phy2log, log2phy, logcnt)
    return rank_load_ratio(weight, phy2log, slots, cap).max(-1).values


@st.composite
def skewed_weight(draw, max_logical=24, max_layers=3):
    """[layers, logical] integer loads, skewed: a few hot experts, many cold (some at 0)."""
    num_layers = draw(st.integers(1, max_layers))
    num_logical = draw(st.integers(1, max_logical))
    power = draw(st.sampled_from([1.0, 2.0, 4.0]))
    base = draw(st.lists(st.lists(st.integers(0, 100), min_size=num_logical, max_size=num_logical),
                         min_size=num_layers, max_size=num_layers))
    return torch.tensor(base, dtype=torch.float64).pow(power).div(100 ** (power - 1)).round()


# ---- never worse than DeepSeek's EPLB ----------------------------------------------------------
@SETTINGS
@given(weight=skewed_weight(), num_ranks=st.integers(1, 8), extra=st.integers(0, 3))
def test_never_worse_than_deepseek_with_equal_slots(weight, num_ranks, extra):
    num_logical = weight.shape[1]
    slots_each = -(-num_logical // num_ranks) + extra
    ours = ours_ratio(weight, [slots_each] * num_ranks)
    ref = deepseek_ratio(weight, num_ranks, slots_each)
    assert (ours <= ref * (1 + 1e-9) + 1e-9).all(), (ours, ref)


@SETTINGS
@given(weight=skewed_weight(), num_ranks=st.integers(2, 8), dead=st.data())
def test_dead_ranks_never_worse_than_deepseek_on_the_survivors(weight, num_ranks, dead):
    num_logical = weight.shape[1]
    dead_rank = dead.draw(st.integers(0, num_ranks - 1))
    slots_each = -(-num_logical // (num_ranks - 1))
    slots = [slots_each] * num_ranks
    cap = [0.0 if r == dead_rank else 1.0 for r in range(num_ranks)]  # dead: capacity 0, slots kept
    ours = ours_ratio(weight, slots, cap)
    ref = deepseek_ratio(weight, num_ranks - 1, slots_each)
    assert (ours <= ref * (1 + 1e-9) + 1e-9).all(), (ours, ref)


def test_clearly_better_than_deepseek_when_capacities_differ():
    g = torch.Generator().manual_seed(0)
    weight = (torch.rand(4, 64, generator=g, dtype=torch.float64) ** 4 * 1000).round()
    cap = [0.5, 1, 1, 1, 1, 1, 1, 1]
    ours, ref = ours_ratio(weight, [10] * 8, cap), deepseek_ratio(weight, 8, 10, cap)
    lower = weight.sum(-1) / sum(cap)
    assert (ours <= 0.7 * ref).all(), (ours, ref)
    assert (ours <= 1.05 * lower).all(), (ours / lower)


# ---- against the exhaustive optimum on tiny cases ----------------------------------------------
def _optimum(w, slots, cap):
    live = [r for r in range(len(slots)) if slots[r] > 0 and cap[r] > 0]
    n = sum(slots[r] for r in live)
    best = np.inf
    for fill in itertools.product(range(len(w)), repeat=n):
        cnt = np.bincount(fill, minlength=len(w))
        if (cnt == 0).any():
            continue
        share, worst, i = np.asarray(w) / np.maximum(cnt, 1), 0.0, 0
        for r in live:
            worst = max(worst, share[list(fill[i:i + slots[r]])].sum() / cap[r])
            i += slots[r]
        best = min(best, worst)
    return best


def test_within_20_percent_of_the_exhaustive_optimum_on_tiny_cases():
    rng = np.random.default_rng(0)
    cases = exact = 0
    while cases < 60:
        num_logical, num_ranks = int(rng.integers(1, 5)), int(rng.integers(1, 4))
        slots = rng.integers(0, 4, num_ranks).tolist()
        cap = rng.choice([0.0, 0.5, 1.0, 2.0], num_ranks).tolist()
        n = sum(s for s, c in zip(slots, cap) if c > 0)
        if not num_logical <= n <= 6:
            continue
        w = rng.choice([0, 1, 5, 20, 100], num_logical).astype(float)
        ours = float(ours_ratio(torch.from_numpy(w[None]), slots, cap)[0])
        opt = _optimum(w, slots, cap)
        assert ours <= 1.2 * opt + 1e-9, (w, slots, cap, ours, opt)
        cases += 1
        exact += ours <= opt * (1 + 1e-9) + 1e-12
    assert exact >= 0.9 * cases, f"optimal on only {exact} of {cases} tiny cases"


# ---- shapes, odd rank counts, unequal slots, dead ranks ----------------------------------------
@SETTINGS
@given(weight=skewed_weight(), data=st.data())
def test_invariants_any_slots_and_capacities(weight, data):
    num_logical = weight.shape[1]
    num_ranks = data.draw(st.integers(1, 8))
    slots = data.draw(st.lists(st.integers(0, 8), min_size=num_ranks, max_size=num_ranks))
    cap = data.draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, 1.5, 3.0]), min_size=num_ranks, max_size=num_ranks))
    live_slots = sum(s for s, c in zip(slots, cap) if c > 0)
    if live_slots < num_logical:
        with pytest.raises(ValueError):
            rebalance_experts(weight, slots, cap)
        return
    before = weight.clone()
    ours = ours_ratio(weight, slots, cap)
    assert torch.equal(weight, before), "input changed"
    lower = weight.sum(-1) / sum(c for s, c in zip(slots, cap) if s > 0)
    assert (ours >= lower * (1 - 1e-9)).all()


def test_eight_experts_on_seven_ranks():
    weight = torch.tensor([[80.0, 10, 10, 10, 10, 10, 10, 10]])
    phy2log, log2phy, logcnt = rebalance_experts(weight, [2] * 7)
    check_invariants(weight, [2] * 7, None, phy2log, log2phy, logcnt)
    assert int(logcnt[0, 0]) >= 5  # the hot expert is spread
    ratio = rank_load_ratio(weight, phy2log, [2] * 7)
    assert float(ratio.max()) <= 1.2 * 150 / 7


def test_unequal_slots_and_a_dead_rank_in_the_middle():
    weight = torch.arange(1.0, 17).pow(2).reshape(1, 16)
    slots, cap = [6, 4, 5, 6], [1.0, 0.5, 0.0, 1.0]
    phy2log, log2phy, logcnt = rebalance_experts(weight, slots, cap)
    check_invariants(weight, slots, cap, phy2log, log2phy, logcnt)
    assert (phy2log[0, 10:15] == -1).all()
    assert ((log2phy < 10) | (log2phy >= 15)).all()


def test_tensor_slots_and_integer_weight_accepted():
    weight = torch.tensor([[5, 1, 0, 3]], dtype=torch.int32)
    a = rebalance_experts(weight, torch.tensor([3, 3]), torch.tensor([1.0, 2.0]))
    b = rebalance_experts(weight.double(), [3, 3], [1.0, 2.0])
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "weight, slots, cap, match",
    [
        (torch.ones(2, 8), [3, 3], None, "6 slots .* 8 logical experts"),
        (torch.ones(2, 4), [3, 3], [1.0, -1.0], "must be finite and >= 0"),
        (torch.ones(2, 4), [3, 3], [1.0], "capacity has 1 entries but slots_per_rank has 2"),
        (torch.ones(2, 4), [3, 3], [0.0, 0.0], "all ranks are dead"),
        (torch.ones(2, 4), [0, 0], None, "all ranks are dead"),
        (torch.ones(2, 4), [3, -1, 3], None, "negative"),
        (torch.ones(2, 4), [2.5, 3], None, "ints"),
        (torch.ones(2, 4), [], None, "non-empty"),
        (-torch.ones(2, 4), [3, 3], None, ">= 0"),
        (torch.full((1, 4), float("nan")), [3, 3], None, "finite"),
        (torch.ones(4), [3, 3], None, r"\[num_layers, num_logical\]"),
    ],
)
def test_bad_input_raises_value_error(weight, slots, cap, match):
    with pytest.raises(ValueError, match=match):
        rebalance_experts(weight, slots, cap)


def test_exactly_enough_live_slots_fits():
    phy2log, _, logcnt = rebalance_experts(torch.ones(2, 8), [4, 4, 4], [1.0, 1.0, 0.0])
    assert (logcnt == 1).all() and (phy2log[:, 8:] == -1).all()


def test_rank_load_ratio_rejects_an_expert_without_live_replica():
    with pytest.raises(ValueError, match="no live replica"):
        rank_load_ratio(torch.ones(1, 3), torch.tensor([[0, 1, 2, 2]]), [2, 2], [1.0, 0.0])


# ---- expert_budget: slots and capacity from the layout -----------------------------------------
def moe_config(num_kv_heads=8, num_q_heads=64, num_experts=256):
    return SimpleNamespace(model_type="qwen3_moe", hidden_size=1024, num_attention_heads=num_q_heads,
                           num_key_value_heads=num_kv_heads, head_dim=64, intermediate_size=2048,
                           moe_intermediate_size=256, num_experts=num_experts, num_experts_per_tok=8,
                           decoder_sparse_step=1, mlp_only_layers=[], vocab_size=4096, num_hidden_layers=4,
                           tie_word_embeddings=False, dtype="bfloat16")


def test_budget_even_layout_gives_equal_capacity_and_slots():
    layout = ElasticLayout.from_hf_config(moe_config(), 8)
    b = expert_budget(layout, [40 * 100] * 8, 100)
    assert b == ExpertBudget(slots=(40,) * 8, capacity=(1.0,) * 8)


def test_budget_rank_with_more_attention_and_kv_gets_less():
    layout = ElasticLayout.from_hf_config(moe_config(), 7)  # 8 KV heads on 7 ranks: (2, 1, 1, 1, 1, 1, 1)
    assert layout.family("attn").widths == (2, 1, 1, 1, 1, 1, 1)
    b = expert_budget(layout, [44] * 7, 1, kv_bytes_per_head=4, attn_fraction=0.5)
    assert b.slots == (36,) + (40,) * 6
    # A_0 = 0.5 * 7 * 16/64 = 0.875, A_r = 0.4375; T = 1.375; left 0.5 vs 0.9375
    assert b.capacity[0] == pytest.approx(0.5 / 0.9375) and b.capacity[1:] == (1.0,) * 6
    assert expert_budget(layout, [44] * 7, 1, kv_bytes_per_head=4, attn_fraction=0.0).capacity == (1.0,) * 7


def test_budget_dead_rank_and_limits():
    layout = ElasticLayout.from_hf_config(moe_config(), 4)
    b = expert_budget(layout, [1000, 1000, 50, 1000], 10, alive=[True, False, True, True], max_slots=64)
    assert b.slots == (64, 0, 5, 64) and b.capacity[1] == 0.0 and max(b.capacity) == 1.0
    phy2log, log2phy, logcnt = rebalance_experts(torch.ones(1, 100), b.slots, b.capacity)
    check_invariants(torch.ones(1, 100), list(b.slots), list(b.capacity), phy2log, log2phy, logcnt)
    for kwargs, match in [
        (dict(free_bytes=[1] * 3, expert_bytes=1), "one entry per rank"),
        (dict(free_bytes=[1] * 4, expert_bytes=0), "expert_bytes=0 must be > 0"),
        (dict(free_bytes=[1] * 4, expert_bytes=1, attn_fraction=1.0), "attn_fraction"),
        (dict(free_bytes=[1] * 4, expert_bytes=1, alive=[False] * 4), "no rank is alive"),
    ]:
        with pytest.raises(ValueError, match=match):
            expert_budget(layout, **kwargs)


def test_eplb_bench_pure_section_runs_and_ours_is_never_worse(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "eplb_bench.py"
    spec = importlib.util.spec_from_file_location("eplb_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--layers", "2", "--json", str(tmp_path / "out.json")]) == 0
    # the server section refuses bad arguments before it builds a model or starts a server
    for bad in (["--policies", "bogus"], ["--policies", ","], ["--tp", "1"], ["--repeats", "0"]):
        assert bench.main(["--server", *bad]) == 2, bad
    for bad in ("a", "-1", ","):
        assert bench.main(["--planner", "--redundant-list", bad]) == 2, bad
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    for scenario in {r["scenario"] for r in rows}:
        got = {r["algorithm"]: r for r in rows if r["scenario"] == scenario and "note" not in r}
        assert all(got["ours"]["imbalance_worst"] <= r["imbalance_worst"] * (1 + 1e-9) for r in got.values())
