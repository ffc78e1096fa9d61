"""sgl-elastic's SGLang patches: the table, the start-up checks, activation, and the pure pieces.

No engine is started here (the integration tests do that): these import SGLang's modules and call
the hooks' building blocks directly.
"""

from __future__ import annotations

import os

import pytest
import torch

from sgl_elastic.config import ElasticArgs
from sgl_elastic.patches import ENV_VAR, activate, deactivate, load_plugin, table
from sgl_elastic.rank import state
from sgl_elastic.rank.shard import LoadSpec, Piece, all_gather_variable, load_elastic


@pytest.fixture
def clean_state():
    deactivate()
    yield
    deactivate()


# ---- the table ------------------------------------------------------------------------------------
def test_every_target_and_hook_resolves():
    table.check_targets()


def test_table_rows_are_unique_and_explained():
    targets = [p.target for p in table.PATCHES]
    assert len(targets) == len(set(targets))
    for p in table.PATCHES:
        assert p.kind in table.KINDS, p
        assert p.reason and "\n" not in p.reason, p
        assert p.target.startswith("sglang.srt."), p


def test_one_hook_module_per_patched_sglang_module():
    import importlib

    def sglang_module(target: str) -> str:
        parts = target.split(".")
        for n in range(len(parts) - 1, 0, -1):
            try:
                importlib.import_module(".".join(parts[:n]))
                return ".".join(parts[:n])
            except ImportError:
                continue
        raise AssertionError(target)

    hooks_of: dict[str, set[str]] = {}
    modules_of: dict[str, set[str]] = {}
    for p in table.PATCHES:
        hook_module, module = p.hook.rsplit(".", 1)[0], sglang_module(p.target)
        hooks_of.setdefault(module, set()).add(hook_module)
        modules_of.setdefault(hook_module, set()).add(module)
    assert all(len(h) == 1 for h in hooks_of.values()), hooks_of
    for hook_module, modules in modules_of.items():
        if hook_module.endswith(".models"):  # the model-constructor hooks: sglang.srt.models.*
            assert all(m.startswith("sglang.srt.models.") for m in modules), modules
        else:
            assert len(modules) == 1, (hook_module, modules)


def test_wrong_sglang_version_fails_loudly(monkeypatch):
    from sgl_elastic import version_check

    monkeypatch.setattr(version_check.metadata, "version", lambda name: "0.5.22")
    with pytest.raises(version_check.SGLangVersionError, match="pinned to sglang==0.5.23"):
        table.check_targets()


def test_missing_target_fails_loudly():
    bad = (table.Patch("sglang.srt.layers.linear.NoSuchLinear.__init__", "around",
                       "sgl_elastic.patches.linear.qkv_init", "test"),)
    with pytest.raises(table.PatchTargetError, match="NoSuchLinear"):
        table.check_targets(bad)


def test_table_markdown_lists_every_patch():
    md = table.table_markdown()
    assert md.count("\n") == len(table.PATCHES) + 1


# ---- activation -----------------------------------------------------------------------------------
def test_bad_widths_fail_before_any_process(tiny_models, clean_state):
    kwargs = {"model_path": str(tiny_models["qwen3-moe"]), "tp_size": 3}
    with pytest.raises(ValueError, match="sum to 9 units but the model has 4 KV-head groups"):
        activate(ElasticArgs(tp_widths=(3, 3, 3)), kwargs)
    with pytest.raises(ValueError, match="gives 2 widths"):
        activate(ElasticArgs(tp_widths=(2, 2)), kwargs)
    with pytest.raises(ValueError, match="--ep-size 2"):
        activate(ElasticArgs(), {**kwargs, "ep_size": 2})
    assert ENV_VAR not in os.environ and state.layout() is None


def test_tp3_without_widths_chooses_whole_units(tiny_models, clean_state):
    layout = activate(ElasticArgs(), {"model_path": str(tiny_models["qwen3-moe"]), "tp_size": 3})
    assert layout.family("attn").widths == (2, 1, 1)  # 4 KV heads on 3 ranks, no padding
    assert layout.family("moe").widths == (2, 1, 1)  # 256 columns = 4 blocks of 64
    assert layout.family("vocab").widths == (3, 3, 2)  # 512 rows = 8 blocks of 64
    assert state.layout() is layout
    assert state.decode(os.environ[ENV_VAR]) == layout  # what spawned processes will read
    deactivate()
    assert ENV_VAR not in os.environ and state.layout() is None


def test_widths_drive_every_family_and_expert_parallelism(tiny_models, clean_state):
    layout = activate(ElasticArgs(tp_widths=(1, 1, 2)),
                      {"model_path": str(tiny_models["mixtral"]), "tp_size": 3, "ep_size": 3})
    assert layout.family("attn").widths == (1, 1, 2)
    assert layout.family("experts").widths == (2, 2, 4)
    assert layout.family("vocab").widths == (2, 2, 4)


def test_tp1_activates_nothing(tiny_models, clean_state):
    assert activate(ElasticArgs(), {"model_path": str(tiny_models["qwen3"]), "tp_size": 1}) is None
    assert ENV_VAR not in os.environ


def test_load_plugin_is_a_noop_without_the_env_var(monkeypatch, clean_state):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert load_plugin() is None
    assert state.layout() is None


# ---- pure pieces ----------------------------------------------------------------------------------
def _param(shape, **attrs):
    p = torch.nn.Parameter(torch.zeros(shape), requires_grad=False)
    for k, v in attrs.items():
        setattr(p, k, v)
    return p


def test_qkv_pieces_load_whole_heads_from_separate_and_fused_checkpoints():
    # 4 q heads / 2 kv heads, head_dim 2; this rank holds q heads [2, 4) and kv head [1, 2).
    hd, nq, nkv = 2, 4, 2
    spec = LoadSpec("output_dim", {
        "q": Piece(0, 2 * hd, 2 * hd, 0),
        "k": Piece(2 * hd, 1 * hd, 1 * hd, nq * hd),
        "v": Piece(3 * hd, 1 * hd, 1 * hd, (nq + nkv) * hd),
    })
    q = torch.arange(nq * hd * 3, dtype=torch.float32).view(nq * hd, 3)
    k = 100 + torch.arange(nkv * hd * 3, dtype=torch.float32).view(nkv * hd, 3)
    v = 200 + torch.arange(nkv * hd * 3, dtype=torch.float32).view(nkv * hd, 3)
    want = torch.cat([q[4:8], k[2:4], v[2:4]])
    separate = _param((8, 3), output_dim=0)
    for sid, w in (("q", q), ("k", k), ("v", v)):
        assert load_elastic(None, spec, separate, w, sid)
    assert torch.equal(separate.data, want)
    fused = _param((8, 3), output_dim=0)
    assert load_elastic(None, spec, fused, torch.cat([q, k, v]), None)
    assert torch.equal(fused.data, want)


def test_replicated_and_quantized_params():
    spec = LoadSpec("input_dim", {None: Piece(0, 2, 2)})
    bias = _param((3,), output_dim=0)  # a row-parallel bias has no input_dim: SGLang loads it
    assert not load_elastic(None, spec, bias, torch.ones(3))
    packed = _param((3, 2), input_dim=1, packed_dim=1)
    with pytest.raises(NotImplementedError, match="unquantized weights only"):
        load_elastic(None, spec, packed, torch.ones(3, 4))


class _FakeGroup:
    """all_gather over pre-set per-rank tensors (what a TP group returns on every rank)."""

    def __init__(self, per_rank):
        self.per_rank = per_rank

    def all_gather(self, x, dim=-1):
        return torch.cat(self.per_rank, dim=dim)


def test_variable_width_gather_concatenates_in_rank_order():
    widths = (3, 1, 2)
    full = torch.arange(2 * sum(widths), dtype=torch.float32).view(2, sum(widths))
    shards = list(full.split(widths, dim=-1))
    padded = [torch.nn.functional.pad(s, (0, max(widths) - s.shape[-1])) for s in shards]
    for rank in range(3):
        assert torch.equal(all_gather_variable(shards[rank], widths, _FakeGroup(padded)), full)


def test_cpu_expert_parallel_native_moe_is_exact():
    """Two EP ranks' -1-masked outputs sum to the one-rank output (SGLang crashes on the -1 ids)."""
    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native as sglang_moe
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    from sgl_elastic.patches.fused_moe_native import moe_forward_native

    class Cfg:
        apply_router_weight_on_input, activation, gemm1_alpha, gemm1_clamp_limit = False, "silu", None, None

    class Layer:
        def __init__(self, w13, w2):
            self.num_experts, self.w13_weight, self.w2_weight = 5, w13, w2

    gen = torch.Generator().manual_seed(0)
    num_experts, hidden, inter, tokens = 5, 8, 6, 7
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen)
    w2 = torch.randn(num_experts, hidden, inter, generator=gen)
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.stack([torch.arange(tokens) % num_experts, (torch.arange(tokens) + 2) % num_experts], dim=1)
    weights = torch.rand(tokens, 2, generator=gen)
    full = sglang_moe(Layer(w13, w2), x, StandardTopKOutput(weights, ids, None), Cfg)
    total = torch.zeros_like(full)
    for lo, hi in ((0, 3), (3, 5)):  # unequal experts per rank: 3 and 2
        local_ids = torch.where((ids >= lo) & (ids < hi), ids - lo, -1)
        total += moe_forward_native(sglang_moe, Layer(w13[lo:hi], w2[lo:hi]), x,
                                    StandardTopKOutput(weights, local_ids, None), Cfg)
    torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-5)


def test_unsupported_model_runs_unpatched_unless_widths_are_asked(tmp_path, clean_state):
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "num_hidden_layers": 1, "vocab_size": 128,
    }))
    kwargs = {"model_path": str(tmp_path), "tp_size": 2}
    assert activate(ElasticArgs(), kwargs) is None
    assert ENV_VAR not in os.environ
    with pytest.raises(ValueError, match="model type 'llama' is not supported"):
        activate(ElasticArgs(tp_widths=(1, 1)), kwargs)


# ---- CPU thread pools ------------------------------------------------------------------------------
def test_cores_in_bind_entries():
    from sgl_elastic.patches.bootstrap import cores_in

    assert [cores_in(e) for e in ("0", "0-3", "4-5,8", "", "2-2")] == [1, 4, 3, 0, 1]


def test_rank_pool_sized_to_its_bind_entry(tiny_models):
    """SGLang's own ``_init_cpu_threads_env`` (patched) leaves a rank with one OpenMP thread per core
    of its entry on a CPU without AMX, and passes through without a layout (a fresh interpreter:
    the pool size is per process)."""
    import subprocess
    import sys

    from sglang.srt.distributed import bootstrap

    if bootstrap._is_cpu_amx_available or bootstrap._is_cpu_arm64:
        pytest.skip("SGLang's kernel binds the pool itself on this CPU")
    code = f"""
import torch
from sgl_elastic.config import ElasticArgs
from sgl_elastic.patches import activate, deactivate
from sglang.srt.distributed import bootstrap
torch.set_num_threads(2)
deactivate()
bootstrap._init_cpu_threads_env(local_omp_cpuid="0", dist_init_method=None)
print(torch.get_num_threads())
activate(ElasticArgs(), {{"model_path": {str(tiny_models["qwen3"])!r}, "tp_size": 2}})
bootstrap._init_cpu_threads_env(local_omp_cpuid="1", dist_init_method=None)
print(torch.get_num_threads())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["2", "1"], out.stdout
