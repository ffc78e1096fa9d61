"""Unit tests of sgl_elastic.layout: width policies, family geometry, HF-config construction."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_elastic.layout import (
    ElasticLayout,
    FamilyLayout,
    capacity_widths,
    equal_widths,
    proportional_widths,
    validate_widths,
)

pytestmark = pytest.mark.unit


def qwen3_moe_30b():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
                          num_experts_per_tok=8, vocab_size=151936, num_hidden_layers=48)


def mixtral_8x22b():
    from transformers import MixtralConfig

    return MixtralConfig(hidden_size=6144, num_attention_heads=48, num_key_value_heads=8, intermediate_size=16384,
                         num_local_experts=8, vocab_size=32768, num_hidden_layers=56)


def qwen3_14b():
    from transformers import Qwen3Config

    return Qwen3Config(hidden_size=5120, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                       intermediate_size=17408, vocab_size=151936, num_hidden_layers=40)


# ---- width policies ----------------------------------------------------------------------------
def test_equal_widths_examples():
    assert equal_widths(8, 3) == (3, 3, 2)
    assert equal_widths(8, 8) == (1,) * 8
    assert equal_widths(3, 5) == (1, 1, 1, 0, 0)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 500), st.lists(st.floats(0.01, 100.0), min_size=1, max_size=9))
def test_capacity_widths_sum_and_floor(num_units, caps):
    w = capacity_widths(num_units, caps)
    assert sum(w) == num_units and len(w) == len(caps)
    if num_units >= len(caps):
        assert min(w) >= 1
    # largest remainder: never more than one unit away from the quota, except where the >=1 floor binds.
    total = sum(caps)
    for wi, c in zip(w, caps):
        quota = num_units * c / total
        assert wi <= max(1, quota + 1) + 1e-9


def test_capacity_and_proportional_examples():
    assert capacity_widths(8, [1, 1, 2]) == (2, 2, 4)
    assert capacity_widths(8, [1000, 1, 1]) == (6, 1, 1)  # >= 1 unit floor
    assert proportional_widths(768, (3, 3, 2)) == (288, 288, 192)
    assert proportional_widths(7, (1, 1, 1)) == (3, 2, 2)


def test_validate_widths_messages():
    with pytest.raises(ValueError, match=r"widths 3,3,3 sum to 9 units but the model has 8 KV-head groups"):
        validate_widths((3, 3, 3), 8, "attn")
    with pytest.raises(ValueError, match=r"rank\(s\) \[1, 2\] have zero width"):
        validate_widths((8, 0, 0), 8, "mlp")
    with pytest.raises(ValueError):
        validate_widths((3, 0, 0), 3, "experts")
    assert validate_widths((1, 1, 0), 2, "experts") == (1, 1, 0)  # fewer units than ranks: zeros allowed


# ---- FamilyLayout geometry ---------------------------------------------------------------------
def test_family_offsets_and_partial_last_unit():
    f = FamilyLayout(name="mlp", unit_name="mlp_block", num_units=3, unit_size=64, dim_size=150, widths=(2, 1))
    assert f.unit_offsets() == (0, 2, 3)
    assert f.rank_dim_range(0) == (0, 128) and f.rank_dim_range(1) == (128, 150)
    assert f.rank_dim_size(1) == 22
    with pytest.raises(ValueError, match="ceil"):
        FamilyLayout(name="mlp", unit_name="b", num_units=2, unit_size=64, dim_size=150, widths=(1, 1))


def test_unknown_family_rejected():
    with pytest.raises(ValueError, match="unknown family 'ffn'"):
        FamilyLayout(name="ffn", unit_name="b", num_units=1, unit_size=1, dim_size=1, widths=(1,))
    layout = ElasticLayout.from_hf_config(qwen3_14b(), 2)
    with pytest.raises(ValueError, match="this layout has: attn, mlp, vocab"):
        layout.family("moe")
    with pytest.raises(ValueError, match="unknown family"):
        layout.family("ffn")


def test_attention_heads_non_replicated():
    layout = ElasticLayout.from_hf_config(mixtral_8x22b(), 3, attn_widths=(3, 3, 2))
    a = layout.family("attn")
    assert a.widths == (3, 3, 2) and not a.replicated
    assert [a.rank_kv_head_range(r) for r in range(3)] == [(0, 3), (3, 6), (6, 8)]
    assert [a.rank_q_head_range(r) for r in range(3)] == [(0, 18), (18, 36), (36, 48)]
    assert [a.rank_q_heads(r) for r in range(3)] == [18, 18, 12]
    # The other families follow the attention proportions.
    assert layout.family("moe").widths == (96, 96, 64)
    assert layout.family("vocab").widths == (192, 192, 128)


def test_attention_replicated_like_sglang():
    layout = ElasticLayout.from_hf_config(qwen3_moe_30b(), 8)
    a = layout.family("attn")
    assert a.replicated and a.kv_head_of_rank == (0, 0, 1, 1, 2, 2, 3, 3)
    assert [a.rank_kv_heads(r) for r in range(8)] == [1] * 8
    assert [a.rank_q_head_range(r) for r in range(8)] == [(4 * r, 4 * r + 4) for r in range(8)]
    # uneven replication: 4 KV heads on 7 ranks -> replicas (2, 2, 2, 1), query heads split per group.
    a7 = ElasticLayout.from_hf_config(qwen3_moe_30b(), 7).family("attn")
    assert a7.kv_replicas() == (2, 2, 2, 1)
    assert a7.rank_q_head_range(6) == (24, 32) and a7.rank_q_head_range(0) == (0, 4)
    with pytest.raises(ValueError, match="replicated"):
        ElasticLayout.from_hf_config(qwen3_moe_30b(), 8, attn_widths=(1, 1, 1, 1, 1, 1, 1, 2))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 12), st.integers(1, 4), st.integers(1, 16))
def test_query_heads_partition_exactly_once(nkv, qpk, tp):
    nq = nkv * qpk
    if tp > nq:
        return
    cfg = SimpleNamespace(model_type="qwen3", num_hidden_layers=1, hidden_size=64, num_attention_heads=nq,
                          num_key_value_heads=nkv, head_dim=8, intermediate_size=100, vocab_size=300)
    layout = ElasticLayout.from_hf_config(cfg, tp)
    a = layout.family("attn")
    covered = []
    for r in range(tp):
        q0, q1 = a.rank_q_head_range(r)
        k0, k1 = a.rank_kv_head_range(r)
        assert q1 > q0 and k0 * qpk <= q0 and q1 <= k1 * qpk  # q heads lie inside the rank's KV heads
        covered.extend(range(q0, q1))
    assert covered == list(range(nq))
    m = layout.family("mlp")
    assert sum(m.rank_dim_size(r) for r in range(tp)) == 100


def test_from_hf_config_families_and_roundtrip():
    for cfg, fams in ((qwen3_moe_30b(), ["attn", "moe", "vocab"]), (mixtral_8x22b(), ["attn", "moe", "vocab"]),
                      (qwen3_14b(), ["attn", "mlp", "vocab"])):
        layout = ElasticLayout.from_hf_config(cfg, 4)
        assert list(layout.families) == fams
        assert ElasticLayout.from_bytes(layout.to_bytes()) == layout
    ep = ElasticLayout.from_hf_config(mixtral_8x22b(), 7, expert_parallel=True)
    assert ep.family("experts").widths == (2, 1, 1, 1, 1, 1, 1)
    cap = ElasticLayout.from_hf_config(mixtral_8x22b(), 3, policy="capacity", capacities=[1, 1, 2])
    assert cap.family("attn").widths == (2, 2, 4)


def test_placed_experts_geometry_validation_and_roundtrip():
    from sgl_elastic.layout.geometry import rank_tensors

    ep = ElasticLayout.from_hf_config(mixtral_8x22b(), 3, expert_parallel=True)
    fam = ep.family("experts")  # widths 3, 3, 2
    row = (2, 0, 1, 0, 1, 0, 2, 1)
    placed = fam.placed([row] * 56)
    assert placed.rank_experts(0, 5) == (1, 3, 5) and placed.expert_owner(9, 6) == 2
    assert fam.placed([(0, 0, 0, 1, 1, 1, 2, 2)] * 56).held == ()  # the contiguous one is stored as none
    assert placed.held[5] == ((1, 3, 5), (2, 4, 7), (0, 6)) and placed.redundant == 0  # one copy each, ascending
    lay = ep.with_families({**ep.families, "experts": placed})
    assert ElasticLayout.from_bytes(lay.to_bytes()) == lay
    held = {t.expert for t, _ in rank_tensors(lay, 2) if t.family == "experts" and t.layer == 0}
    assert held == {0, 6}
    with pytest.raises(ValueError, match="want 3 distinct"):
        fam.placed([(0,) * 8] * 56)
    with pytest.raises(ValueError, match="outside"):
        fam.placed([(5, 0, 1, 0, 1, 0, 2, 1)] * 56)
    with pytest.raises(ValueError, match="56"):
        ep.with_families({**ep.families, "experts": fam.placed([row] * 3)})
    with pytest.raises(ValueError, match="only the experts"):
        ep.family("attn").placed([row])


def test_redundant_experts_ring_geometry_validation_and_roundtrip():
    from sgl_elastic.layout.geometry import rank_tensors

    lay = ElasticLayout.from_hf_config(mixtral_8x22b(), 3, expert_parallel=True, redundant_experts=6)
    fam = lay.family("experts")  # 14 slots: 5, 5, 4; blocks 3, 3, 2, each followed by copies (a ring)
    assert fam.widths == (5, 5, 4) and fam.redundant == 6 and len(fam.held) == 56
    assert fam.rank_experts(0, 3) == (0, 1, 2, 3, 4) and fam.rank_experts(1, 3) == (3, 4, 5, 6, 7)
    assert fam.rank_experts(2, 3) == (6, 7, 0, 1)  # slot order: its block, then the copies
    assert fam.expert_holders(0, 6) == (1, 2) and fam.expert_holders(0, 5) == (1,) and fam.expert_owner(0, 0) == 0
    assert fam.holds(2, 9, 7) and not fam.holds(2, 9, 3)
    assert ElasticLayout.from_bytes(lay.to_bytes()) == lay
    for r in range(3):  # every rank holds the tensors of exactly its experts, copies included, in slot order
        got = [t for t, _ in rank_tensors(lay, r) if t.family == "experts" and t.layer == 7]
        order = fam.rank_experts(r, 7)
        assert [t.expert for t in got] == [e for e in order for _ in range(2)] + list(order)  # w1 w3 ..., w2 ...
        assert [t.name.rsplit(".", 2)[1] for t in got[:2]] == ["w1", "w3"] and got[-1].name.endswith(".w2.weight")
    row = fam.held[0]
    with pytest.raises(ValueError, match="sum to 8 experts"):
        fam.with_held((5, 5, 5), [row] * 56, 6)
    with pytest.raises(ValueError, match="distinct"):
        fam.with_held((5, 5, 4), [((0, 0, 1, 2, 3), row[1], row[2])] * 56)
    with pytest.raises(ValueError, match="distinct"):
        fam.with_held((5, 5, 4), [((0, 1, 2, 3, 9), row[1], row[2])] * 56)
    with pytest.raises(ValueError, match="no copy of experts"):
        fam.with_held((5, 5, 4), [((0, 1, 2, 3, 4), (0, 1, 2, 3, 4), (0, 1, 2, 3))] * 56)
    with pytest.raises(ValueError, match="56"):
        lay.with_families({**lay.families, "experts": fam.with_held((5, 5, 4), [row] * 2)})
    with pytest.raises(ValueError, match="0..16 on 3 ranks"):  # a rank holds an expert once
        ElasticLayout.from_hf_config(mixtral_8x22b(), 3, expert_parallel=True, redundant_experts=17)
    with pytest.raises(ValueError, match="expert parallelism"):
        ElasticLayout.from_hf_config(mixtral_8x22b(), 3, redundant_experts=2)
    assert fam.with_widths((3, 3, 2)).held == () and fam.with_widths((3, 3, 2)).redundant == 0


def test_tensor_names_follow_checkpoints():
    names = {t.name for t in ElasticLayout.from_hf_config(mixtral_8x22b(), 2).tensors()}
    assert "model.layers.3.block_sparse_moe.experts.7.w2.weight" in names
    names = {t.name for t in ElasticLayout.from_hf_config(qwen3_moe_30b(), 2).tensors()}
    assert "model.layers.47.mlp.experts.127.down_proj.weight" in names
    assert "model.layers.0.self_attn.k_norm.weight" in names
    names = {t.name for t in ElasticLayout.from_hf_config(qwen3_14b(), 2).tensors()}
    assert "model.layers.0.mlp.gate_proj.weight" in names and "lm_head.weight" in names


def test_missing_fields_and_bad_args():
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ElasticLayout.from_hf_config(SimpleNamespace(hidden_size=8), 2)
    with pytest.raises(ValueError, match="capacities"):
        ElasticLayout.from_hf_config(qwen3_14b(), 2, policy="capacity")
    with pytest.raises(ValueError, match="policy"):
        ElasticLayout.from_hf_config(qwen3_14b(), 2, policy="fastest")


def test_layout_imports_without_torch():
    code = "import sys; import sgl_elastic.layout; assert 'torch' not in sys.modules and 'sglang' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
