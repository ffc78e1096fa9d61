"""Patch of ``sglang.srt.configs.model_config``: the KV pool holds this rank's KV heads."""

from __future__ import annotations

from sgl_elastic.rank import state


def get_num_kv_heads(original, self, tensor_parallel_size, dcp_size=1):
    """ModelConfig.get_num_kv_heads: this rank's KV heads (``total // tp`` in SGLang)."""
    layout = state.layout()
    if layout is None or tensor_parallel_size != layout.tp_size or tensor_parallel_size == 1 or dcp_size != 1:
        return original(self, tensor_parallel_size, dcp_size)
    if getattr(self, "is_draft_model", False):
        return original(self, tensor_parallel_size, dcp_size)
    attn = layout.family("attn")
    if attn.replicated:
        return original(self, tensor_parallel_size, dcp_size)
    from sglang.srt.runtime_context import get_parallel

    try:
        rank = get_parallel().attn_tp_rank
    except Exception:  # no rank in this process (e.g. the tokenizer side): the widest rank
        return max(attn.widths)
    return attn.rank_kv_heads(rank)
