"""TensorSpec: every weight tensor of a model, with the family and dim it is sharded along.

Coordinates (used by the planner and executor, and written in their docstrings):
- A tensor is sharded along one ``dim`` of its *full* (unsharded, HF checkpoint) shape.
- Its family's per-rank ranges are in *granules* of a sub-dim: attention "q" (query heads) and
  "kv" (KV heads), MLP / MoE "i" (intermediate columns), vocab "v" (rows), experts "e" (experts).
  ``granule_elems`` elements of ``dim`` make one granule (``head_dim`` for attention, 1 elsewhere).
- "experts" and "full" tensors are never cut: an expert tensor belongs wholly to expert
  ``expert``; a "full" tensor (norms, router) is held whole by every rank.
Names follow the HF checkpoint so host reload can read them from the safetensors files.
"""

from __future__ import annotations

import math

import msgspec

from sgl_elastic.layout.model import ModelShape

__all__ = ["TensorSpec", "model_tensors", "FAMILY_SUBDIMS"]

# family -> the sub-dims its tensors are sharded along.
FAMILY_SUBDIMS: dict[str, tuple[str, ...]] = {
    "attn": ("q", "kv"),
    "mlp": ("i",),
    "moe": ("i",),
    "experts": ("e",),
    "vocab": ("v",),
    "full": (),
}


class TensorSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One checkpoint tensor.

    ``shape`` is the full shape (elements); ``dim`` the sharded dim (-1: never cut); ``subdim`` the
    granule axis; ``granule_elems`` elements of ``dim`` per granule; ``expert`` the expert index for
    "experts" tensors (-1 otherwise); ``dtype_bytes`` bytes per element.
    """

    name: str
    family: str
    subdim: str
    shape: tuple[int, ...]
    dim: int
    granule_elems: int = 1
    expert: int = -1
    layer: int = -1
    dtype_bytes: int = 2

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype_bytes

    @property
    def slice_bytes(self) -> int:
        """Bytes of one element-index along ``dim`` (a row for dim 0, a column for dim 1)."""
        if self.dim < 0:
            return self.nbytes
        return self.nbytes // self.shape[self.dim]

    @property
    def granule_bytes(self) -> int:
        """Bytes of one granule of ``subdim`` (a whole tensor for "experts"/"full")."""
        if self.dim < 0:
            return self.nbytes
        return self.slice_bytes * self.granule_elems


def model_tensors(model: ModelShape, *, expert_parallel: bool = False) -> tuple[TensorSpec, ...]:
    """All weight tensors of ``model`` in checkpoint naming, with their sharding (see module docstring)."""
    H, hd, b = model.hidden_size, model.head_dim, model.dtype_bytes
    nq, nkv = model.num_q_heads, model.num_kv_heads
    out: list[TensorSpec] = []

    def add(name: str, family: str, subdim: str, shape: tuple[int, ...], dim: int, g: int = 1, e: int = -1, layer: int = -1) -> None:
        out.append(TensorSpec(name=name, family=family, subdim=subdim, shape=shape, dim=dim,
                              granule_elems=g, expert=e, layer=layer, dtype_bytes=b))

    qk_norm = model.model_type.startswith("qwen3")
    moe_layers = set(model.moe_layers)
    add("model.embed_tokens.weight", "vocab", "v", (model.vocab_size, H), 0)
    for i in range(model.num_layers):
        p = f"model.layers.{i}."
        add(p + "self_attn.q_proj.weight", "attn", "q", (nq * hd, H), 0, hd, layer=i)
        add(p + "self_attn.k_proj.weight", "attn", "kv", (nkv * hd, H), 0, hd, layer=i)
        add(p + "self_attn.v_proj.weight", "attn", "kv", (nkv * hd, H), 0, hd, layer=i)
        add(p + "self_attn.o_proj.weight", "attn", "q", (H, nq * hd), 1, hd, layer=i)
        if qk_norm:
            add(p + "self_attn.q_norm.weight", "full", "", (hd,), -1, layer=i)
            add(p + "self_attn.k_norm.weight", "full", "", (hd,), -1, layer=i)
        add(p + "input_layernorm.weight", "full", "", (H,), -1, layer=i)
        add(p + "post_attention_layernorm.weight", "full", "", (H,), -1, layer=i)
        if i in moe_layers:
            I, E = model.moe_intermediate_size, model.num_experts
            # SGLang's fused order (a rank's shards then form its w13 / w2 parameters contiguously):
            # every expert's gate and up, then every expert's down.
            if model.naming == "mixtral":
                blk = p + "block_sparse_moe."
                names = ((("w1", (I, H), 0), ("w3", (I, H), 0)), (("w2", (H, I), 1),))
            else:
                blk = p + "mlp."
                names = ((("gate_proj", (I, H), 0), ("up_proj", (I, H), 0)), (("down_proj", (H, I), 1),))
            add(blk + "gate.weight", "full", "", (E, H), -1, layer=i)
            for group in names:
                for e in range(E):
                    for n, shape, dim in group:
                        name = f"{blk}experts.{e}.{n}.weight"
                        if expert_parallel:
                            add(name, "experts", "e", shape, -1, e=e, layer=i)
                        else:
                            add(name, "moe", "i", shape, dim, layer=i)
        else:
            I = model.intermediate_size
            add(p + "mlp.gate_proj.weight", "mlp", "i", (I, H), 0, layer=i)
            add(p + "mlp.up_proj.weight", "mlp", "i", (I, H), 0, layer=i)
            add(p + "mlp.down_proj.weight", "mlp", "i", (H, I), 1, layer=i)
    add("model.norm.weight", "full", "", (H,), -1)
    if not model.tie_word_embeddings:
        add("lm_head.weight", "vocab", "v", (model.vocab_size, H), 0)
    return tuple(out)
