"""ModelShape: the hyperparameters of a model that sharding depends on, read from a HF config.

No weights are loaded. Supported: Qwen3-MoE, Mixtral, Qwen3 and any config with the same fields
(``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` or ``hidden_size // heads``,
``hidden_size``, ``intermediate_size``, ``moe_intermediate_size`` (Qwen3-MoE),
``num_experts`` / ``num_local_experts``, ``vocab_size``, ``num_hidden_layers``).
"""

from __future__ import annotations

from typing import Any

import msgspec

from sgl_elastic.layout.dtypes import ALIASES, ITEMSIZE
from sgl_elastic.layout.dtypes import dtype_name as dtype_name_of

__all__ = ["ModelShape", "DTYPE_BYTES"]

# Model weight dtypes the layout accepts, with their bytes per element (from the one dtype table).
DTYPE_BYTES = {name: ITEMSIZE[ALIASES.get(name, name)]
               for name in ("bfloat16", "float16", "half", "float32", "float", "float8_e4m3fn", "float8_e5m2")}

# model_type -> naming scheme of the checkpoint's expert tensors.
_MOE_NAMING = {"qwen3_moe": "qwen3_moe", "qwen2_moe": "qwen3_moe", "mixtral": "mixtral"}


class ModelShape(msgspec.Struct, frozen=True, kw_only=True):
    """Hyperparameters that decide tensor shapes (all counts; sizes in elements).

    ``naming`` picks the checkpoint tensor names: "qwen3_moe" (``mlp.experts.{e}.gate_proj``),
    "mixtral" (``block_sparse_moe.experts.{e}.w1``) or "dense" (``mlp.gate_proj``).
    ``moe_layers``: indices of the layers whose MLP is a sparse MoE block (the others are dense).
    """

    model_type: str
    naming: str
    num_layers: int
    hidden_size: int
    head_dim: int
    num_q_heads: int
    num_kv_heads: int
    vocab_size: int
    intermediate_size: int  # dense MLP (0 when every layer is MoE)
    moe_intermediate_size: int  # per expert (0 for dense models)
    num_experts: int  # 0 for dense models
    moe_layers: tuple[int, ...]
    tie_word_embeddings: bool
    dtype_bytes: int = 2

    @property
    def dense_layers(self) -> tuple[int, ...]:
        moe = set(self.moe_layers)
        return tuple(i for i in range(self.num_layers) if i not in moe)

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> "ModelShape":
        """Read the shape from a ``transformers.PretrainedConfig`` (or any object with its fields)."""

        def need(*names: str) -> Any:
            for n in names:
                v = getattr(hf_config, n, None)
                if v is not None:
                    return v
            raise ValueError(
                f"{type(hf_config).__name__} has none of the fields {names}; ElasticLayout needs them to"
                f" size the shards (supported: Qwen3-MoE, Mixtral, Qwen3 and configs with the same fields)"
            )

        model_type = str(getattr(hf_config, "model_type", "") or "unknown")
        num_layers = int(need("num_hidden_layers"))
        hidden = int(need("hidden_size"))
        nq = int(need("num_attention_heads"))
        nkv = int(getattr(hf_config, "num_key_value_heads", None) or nq)
        head_dim = getattr(hf_config, "head_dim", None)
        if head_dim is None:
            if hidden % nq:
                raise ValueError(f"head_dim missing and hidden_size {hidden} is not a multiple of {nq} heads")
            head_dim = hidden // nq
        if nq % nkv:
            raise ValueError(f"num_attention_heads {nq} is not a multiple of num_key_value_heads {nkv}")
        vocab = int(need("vocab_size"))
        num_experts = int(getattr(hf_config, "num_experts", None) or getattr(hf_config, "num_local_experts", None) or 0)
        if num_experts:
            naming = _MOE_NAMING.get(model_type)
            if naming is None:
                naming = "mixtral" if hasattr(hf_config, "num_local_experts") else "qwen3_moe"
            if naming == "mixtral":
                moe_inter = int(need("intermediate_size"))
                dense_inter = 0
                moe_layers = tuple(range(num_layers))
            else:
                moe_inter = int(need("moe_intermediate_size"))
                step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
                mlp_only = set(getattr(hf_config, "mlp_only_layers", None) or ())
                moe_layers = tuple(i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0)
                dense_inter = int(need("intermediate_size")) if len(moe_layers) < num_layers else 0
        else:
            naming, moe_inter, moe_layers = "dense", 0, ()
            dense_inter = int(need("intermediate_size"))
        # `dtype` (transformers >= 4.56) or the older `torch_dtype` (read from __dict__: the property warns).
        dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "__dict__", {}).get("torch_dtype") or "bfloat16"
        dtype_name = dtype_name_of(dtype)
        if dtype_name not in DTYPE_BYTES:
            raise ValueError(f"unsupported dtype {dtype_name!r}; known: {sorted(DTYPE_BYTES)}")
        return cls(
            model_type=model_type,
            naming=naming,
            num_layers=num_layers,
            hidden_size=hidden,
            head_dim=int(head_dim),
            num_q_heads=nq,
            num_kv_heads=nkv,
            vocab_size=vocab,
            intermediate_size=dense_inter,
            moe_intermediate_size=moe_inter,
            num_experts=num_experts,
            moe_layers=moe_layers,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            dtype_bytes=DTYPE_BYTES[dtype_name],
        )
