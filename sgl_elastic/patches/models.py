"""Patches of ``sglang.srt.models.*``: the attention and dense-MLP block constructors.

Attention (Qwen3-MoE, Qwen3, Mixtral): the constructors assert ``heads % tp == 0`` and compute
``heads // tp``. The hook builds the block under a single-rank view of the parallel state (so the
asserts pass and every head-derived size, ``head_dim`` included, is computed from the true totals),
with the block's linear layers sized by this rank's attention plan (``patches.linear``), then sets
the block's per-rank head counts (``num_heads``, ``num_kv_heads``, ``q_size``, ``kv_size`` and the
``RadixAttention`` head numbers) to this rank's whole KV-head groups.

Dense MLP (Qwen2/Qwen3 MLP, Qwen2/Qwen3-MoE dense layers): the block is built under an "mlp" plan
so its gate_up / down layers take this rank's intermediate columns.
"""

from __future__ import annotations

import inspect
import logging

from sgl_elastic.rank import state
from sgl_elastic.rank.shard import parallel_view

logger = logging.getLogger(__name__)

# Attributes every patched attention block must have after construction (checked, not assumed).
_ATTN_ATTRS = ("num_heads", "num_kv_heads", "head_dim", "q_size", "kv_size", "attn", "qkv_proj", "o_proj")


def _attn_rank() -> int:
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().attn_tp_rank


def attention_init(original, self, *args, **kwargs):
    """Qwen3MoeAttention / Qwen3Attention / MixtralAttention ``__init__``."""
    layout = state.layout()
    if layout is None or layout.tp_size == 1:
        return original(self, *args, **kwargs)
    b = inspect.signature(original).bind(self, *args, **kwargs)
    total_q, total_kv = b.arguments["num_heads"], b.arguments["num_kv_heads"]
    attn = layout.family("attn")
    if (total_q, total_kv) != (attn.num_q_heads, attn.num_kv_heads):
        raise ValueError(
            f"{type(self).__name__}: built with {total_q} q / {total_kv} kv heads but the elastic layout "
            f"has {attn.num_q_heads} / {attn.num_kv_heads}; the layout was made for another model"
        )
    if attn.replicated:
        raise NotImplementedError(
            f"{attn.num_kv_heads} KV heads on {layout.tp_size} ranks needs KV-head replication, which the "
            f"elastic patches do not implement yet; use at most {attn.num_kv_heads} ranks"
        )
    rank = _attn_rank()
    plan = state.AttnPlan(attn.rank_q_head_range(rank), attn.rank_kv_head_range(rank), total_q, total_kv)
    with state.building(plan), parallel_view(original, tp_size=1, attn_tp_size=1, tp_rank=0, attn_tp_rank=0):
        original(*b.args, **b.kwargs)
    missing = [a for a in _ATTN_ATTRS if not hasattr(self, a)]
    if missing:
        raise RuntimeError(f"{type(self).__name__} has no {missing} after construction; SGLang changed")
    self.num_heads, self.num_kv_heads = plan.num_q_heads, plan.num_kv_heads
    self.q_size = plan.num_q_heads * self.head_dim
    self.kv_size = plan.num_kv_heads * self.head_dim
    self.attn.tp_q_head_num = plan.num_q_heads
    self.attn.tp_k_head_num = plan.num_kv_heads
    self.attn.tp_v_head_num = plan.num_kv_heads
    if b.arguments.get("layer_id", 0) == 0:
        logger.info(
            "sgl-elastic: TP%d holds q heads [%d, %d) kv heads [%d, %d) of %d / %d",
            rank, *plan.q_heads, *plan.kv_heads, total_q, total_kv,
        )


def mlp_init(original, self, *args, **kwargs):
    """Qwen2MLP / Qwen2MoeMLP ``__init__`` (Qwen3 dense MLP, Qwen3-MoE dense layers)."""
    layout = state.layout()
    if layout is None or layout.tp_size == 1:
        return original(self, *args, **kwargs)
    b = inspect.signature(original).bind(self, *args, **kwargs)
    if b.arguments.get("parallel_group", "tp") not in ("tp", None):
        return original(self, *args, **kwargs)
    inter = b.arguments["intermediate_size"]
    if "mlp" not in layout.families or layout.family("mlp").dim_size != inter:
        raise NotImplementedError(
            f"{type(self).__name__} {b.arguments.get('prefix', '')!r} with intermediate size {inter} is not a "
            f"dense MLP of the elastic layout ({layout.describe()}); shared experts are not supported yet"
        )
    from sglang.srt.runtime_context import get_parallel

    fam = layout.family("mlp")
    start, end = fam.rank_dim_range(get_parallel().tp_rank)
    with state.building(state.BlockPlan("mlp", start, end - start, inter)):
        original(*b.args, **b.kwargs)
