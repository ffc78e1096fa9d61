"""Patch of ``sglang.srt.layers.vocab_parallel_embedding``: unequal vocab rows per rank.

SGLang pads the vocabulary to a multiple of ``64 * tp`` and gives each rank ``padded // tp`` rows.
With an elastic layout rank r holds the vocab rows of the layout's "vocab" family (blocks of 64,
widths in the same proportions as the attention widths, the last block clipped, no padding). The
hook lets SGLang build the layer, then sets this rank's shard indices and re-creates the weight
(and the LM-head bias) with SGLang's own ``create_weights`` at this rank's width. Embedding
lookup (mask + all-reduce) and SGLang's loader work unchanged from the shard indices; the LM-head
logits gather is the variable-width one of ``patches.logits_processor``.
"""

from __future__ import annotations

import logging

import torch

from sgl_elastic.rank import state

logger = logging.getLogger(__name__)


def vocab_widths(layout) -> tuple[int, ...]:
    """Vocab rows of every rank, ``[tp]`` (elements)."""
    fam = layout.family("vocab")
    return tuple(fam.rank_dim_size(r) for r in range(layout.tp_size))


def vocab_init(original, self, *args, **kwargs):
    """VocabParallelEmbedding.__init__ (ParallelLMHead too)."""
    original(self, *args, **kwargs)
    layout = state.layout()
    if layout is None or not self.enable_tp or self.tp_size == 1 or "vocab" not in layout.families:
        return
    if self.tp_size != layout.tp_size:
        raise ValueError(f"{type(self).__name__}: tp_size={self.tp_size} but the elastic layout has {layout.tp_size}")
    fam = layout.family("vocab")
    if self.num_added_embeddings or self.use_presharded_weights or fam.dim_size != self.org_vocab_size:
        raise NotImplementedError(
            f"{type(self).__name__}: elastic vocab needs a plain vocabulary of {fam.dim_size} rows "
            f"(got org={self.org_vocab_size}, added={self.num_added_embeddings}, "
            f"presharded={self.use_presharded_weights})"
        )
    from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbeddingShardIndices
    from sglang.srt.runtime_context import get_parallel

    par = get_parallel()
    rank = par.attn_tp_rank if self.use_attn_tp_group else par.tp_rank
    start, end = fam.rank_dim_range(rank)
    vocab = self.org_vocab_size
    self.shard_indices = VocabParallelEmbeddingShardIndices(start, end, vocab, vocab, start, end, vocab, vocab)
    self.num_embeddings_per_partition = end - start
    self.num_org_embeddings_per_partition = end - start
    self.num_added_embeddings_per_partition = 0
    old = self.weight
    self.quant_method.create_weights(
        self, self.embedding_dim, [end - start], self.embedding_dim, self.num_embeddings_padded,
        params_dtype=old.dtype, weight_loader=self.weight_loader,
    )
    if self.weight.shape[0] != end - start:
        raise RuntimeError(f"{type(self).__name__}: re-created weight has {tuple(self.weight.shape)} rows, want {end - start}")
    if getattr(self, "bias", None) is not None:  # ParallelLMHead builds its bias after this __init__
        self.bias = torch.nn.Parameter(torch.empty(end - start, dtype=self.bias.dtype))
    logger.info("sgl-elastic: TP%d %s holds vocab rows [%d, %d) of %d", rank, type(self).__name__, start, end, vocab)
