"""Patch of ``sglang.srt.layers.moe.fused_moe_native``: expert parallelism on CPU.

With expert parallelism the dispatcher maps the top-k ids of experts held by other ranks to -1;
``moe_forward_native`` then crashes in ``cnts.scatter_`` (negative index). The hook runs SGLang's
function on this rank's (token, slot) pairs only, as top-1 routing, and sums them back per token:
exact (each pair keeps its routing weight), no compute for other ranks' experts, and the other
ranks' contributions arrive through the all-reduce that follows. Calls without -1 ids (plain TP)
go straight to SGLang. Applied whether or not a layout is active: vanilla SGLang EP on CPU needs it
as much.
"""

from __future__ import annotations


def moe_forward_native(original, layer, x, topk_output, moe_runner_config):
    """``x``: ``[tokens, hidden]``; ``topk_ids`` / ``topk_weights``: ``[tokens, top_k]`` (-1: remote)."""
    import torch

    topk_weights, topk_ids = topk_output.topk_weights, topk_output.topk_ids
    local = topk_ids >= 0
    if bool(local.all()):
        return original(layer, x, topk_output, moe_runner_config)
    out = x.new_zeros(x.shape[0], x.shape[-1])
    token_idx, slot_idx = local.nonzero(as_tuple=True)
    if token_idx.numel() == 0:
        return out
    pairs = topk_output._replace(
        topk_weights=topk_weights[token_idx, slot_idx].unsqueeze(1),
        topk_ids=topk_ids[token_idx, slot_idx].unsqueeze(1),
    )
    part = original(layer, x[token_idx], pairs, moe_runner_config)
    return out.index_add_(0, token_idx, part.to(out.dtype))
