"""Real model hyperparameters (from the models' published config.json), for benchmarks and tests.

``preset_config(name)`` returns a plain namespace with the HF config fields (no transformers import);
``preset_config(name, transformers=True)`` builds the real ``transformers`` config object.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

__all__ = ["PRESETS", "preset_config"]

PRESETS: dict[str, dict[str, Any]] = {
    "Mixtral-8x22B": dict(
        _cls="MixtralConfig", model_type="mixtral", hidden_size=6144, num_attention_heads=48, num_key_value_heads=8,
        head_dim=128, intermediate_size=16384, num_local_experts=8, num_experts_per_tok=2, vocab_size=32768,
        num_hidden_layers=56, tie_word_embeddings=False, dtype="bfloat16",
    ),
    "Qwen3-30B-A3B": dict(
        _cls="Qwen3MoeConfig", model_type="qwen3_moe", hidden_size=2048, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936, num_hidden_layers=48,
        tie_word_embeddings=False, dtype="bfloat16",
    ),
    "Qwen3-14B": dict(
        _cls="Qwen3Config", model_type="qwen3", hidden_size=5120, num_attention_heads=40, num_key_value_heads=8,
        head_dim=128, intermediate_size=17408, vocab_size=151936, num_hidden_layers=40, tie_word_embeddings=False,
        dtype="bfloat16",
    ),
}


def preset_config(name: str, *, transformers: bool = False) -> Any:
    """HF config of preset ``name`` (see ``PRESETS``), as a namespace or a transformers config."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    cls_name = fields.pop("_cls")
    if not transformers:
        return SimpleNamespace(**fields)
    import transformers as tf

    fields.pop("model_type")
    dtype = fields.pop("dtype")
    cfg = getattr(tf, cls_name)(**fields)
    cfg.dtype = dtype
    return cfg
