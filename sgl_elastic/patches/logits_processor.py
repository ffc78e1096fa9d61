"""Patch of ``sglang.srt.layers.logits_processor``: variable-width logits all-gather.

Each rank's LM head produces the logits of its own vocab rows (``patches.vocab_parallel_embedding``);
SGLang's gatherer concatenates equal shards. The hook replaces a processor's gatherer with one
that gathers the layout's vocab widths (padded to the widest, then compacted), so the gathered
logits are exactly ``[tokens, vocab_size]`` in vocabulary order.
"""

from __future__ import annotations

from sgl_elastic.rank import state
from sgl_elastic.rank.shard import all_gather_variable


class VariableWidthLogitsGatherer:
    """Callable like SGLang's MultimemAllGatherer: ``[tokens, widths[rank]] -> [tokens, sum(widths)]``."""

    def __init__(self, widths: tuple[int, ...]):
        self.widths = widths

    def __call__(self, logits):
        from sglang.srt.distributed import get_tp_group

        return all_gather_variable(logits, self.widths, get_tp_group())


def logits_processor_init(result, self, *args, **kwargs):
    """LogitsProcessor.__init__ (AFTER): swap in the variable-width gatherer."""
    layout = state.layout()
    if layout is None or layout.tp_size == 1 or "vocab" not in layout.families:
        return None
    if not self.do_tensor_parallel_all_gather:
        return None
    if self.use_attn_tp_group or self.use_tp_lm_head_all_to_all or self.do_tensor_parallel_all_gather_dp_attn:
        raise NotImplementedError(
            "elastic vocab widths support the plain TP logits gather only (no --enable-dp-lm-head, "
            "--enable-tp-lm-head-all-to-all or dp-attention)"
        )
    from sgl_elastic.patches.vocab_parallel_embedding import vocab_widths

    self._logits_gatherer = VariableWidthLogitsGatherer(vocab_widths(layout))
    return None
