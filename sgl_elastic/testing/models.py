"""Deterministic random-weight checkpoints for tests and benchmarks, built locally (no hub).

Three families (Qwen3-MoE, Mixtral, dense Qwen3) in two sizes:
- ``tiny``: ~2 M params, float32; 8 query heads, 4 KV heads, 8 experts top-2; for tests.
- ``bench``: ~1.6 GB of float32 weights; 16 query heads, 8 KV heads, 16 experts top-2; for benchmarks.

Each checkpoint is a HF directory: ``config.json``, ``model.safetensors`` (sharded above 2 GB) and a
byte-level BPE tokenizer trained in about a second on a seeded synthetic corpus, with a chat
template. Checkpoints are cached by the hash of everything that defines them, so a second call is a
directory lookup.

CLI: ``python -m sgl_elastic.testing.models --family qwen3-moe --size tiny [--out DIR]`` prints the
checkpoint directory as its last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

FAMILIES = ("qwen3-moe", "mixtral", "qwen3")
SIZES = ("tiny", "bench")
FACTORY_VERSION = 1  # bump when the recipe changes: invalidates every cached checkpoint
SEED = 1234


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSpec:
    """Architecture of one checkpoint. Widths in elements; ``vocab_size`` >= the tokenizer's size."""

    family: str
    size: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP (qwen3) or per-expert FFN width (mixtral / qwen3-moe)
    num_experts: int
    num_experts_per_tok: int
    vocab_size: int
    tokenizer_vocab_size: int
    max_position_embeddings: int
    init_std: float

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{self.num_attention_heads=} is not a multiple of {self.num_key_value_heads=}"
            )
        if self.tokenizer_vocab_size > self.vocab_size:
            raise ValueError(f"{self.tokenizer_vocab_size=} exceeds {self.vocab_size=}")

    @property
    def is_moe(self) -> bool:
        return self.family != "qwen3"


def model_spec(family: str, size: str) -> ModelSpec:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if size == "tiny":
        return ModelSpec(
            family=family, size=size, hidden_size=128, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=4, head_dim=16,
            intermediate_size=256, num_experts=8 if family != "qwen3" else 0,
            num_experts_per_tok=2 if family != "qwen3" else 0,
            vocab_size=512, tokenizer_vocab_size=512, max_position_embeddings=2048,
            init_std=0.08,
        )
    if size == "bench":
        dense = family == "qwen3"
        return ModelSpec(
            family=family, size=size, hidden_size=1024, num_hidden_layers=16,
            num_attention_heads=16, num_key_value_heads=8, head_dim=64,
            intermediate_size=4096 if dense else 512, num_experts=0 if dense else 16,
            num_experts_per_tok=0 if dense else 2,
            vocab_size=8192, tokenizer_vocab_size=4096, max_position_embeddings=4096,
            init_std=0.02,
        )
    raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")


def hf_config(spec: ModelSpec):
    """The transformers config object of ``spec`` (float32, untied embeddings)."""
    import transformers

    common = dict(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=spec.init_std,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dtype="float32",
    )
    if spec.family == "qwen3":
        return transformers.Qwen3Config(intermediate_size=spec.intermediate_size, **common)
    if spec.family == "qwen3-moe":
        return transformers.Qwen3MoeConfig(
            intermediate_size=spec.intermediate_size,
            moe_intermediate_size=spec.intermediate_size,
            num_experts=spec.num_experts,
            num_experts_per_tok=spec.num_experts_per_tok,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            **common,
        )
    return transformers.MixtralConfig(
        intermediate_size=spec.intermediate_size,
        num_local_experts=spec.num_experts,
        num_experts_per_tok=spec.num_experts_per_tok,
        sliding_window=None,
        **common,
    )


def _spec_hash(spec: ModelSpec) -> str:
    blob = json.dumps([FACTORY_VERSION, SEED, dataclasses.asdict(spec)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    root = os.environ.get("SGLE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sgl-elastic"
    )
    return Path(root) / "models"


# Step 0: a seeded synthetic corpus for the tokenizer (no data download).
_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or "
    "one had by word but not what all were we when your can said there use an each which she do "
    "how their if will up other about out many then them these so some her would make like him "
    "into time has look two more write go see number no way could people my than first water been "
    "call who oil its now find long down day did get come made may part server model token layer "
    "expert tensor parallel rank shard failure recovery memory cache request hello world question "
    "answer please explain why how what where when python code function return value"
).split()


def _corpus(num_lines: int = 4000) -> list[str]:
    rng = random.Random(SEED)
    lines = []
    for _ in range(num_lines):
        n = rng.randint(4, 24)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 9999)))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ",", ""]))
    return lines


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4


def build_tokenizer(vocab_size: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (pad 0, bos 1, eos 2) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _write_checkpoint(spec: ModelSpec, out: Path) -> None:
    import torch
    import transformers

    # Step 1: tokenizer (its ids must fit the model's vocab).
    tokenizer = build_tokenizer(spec.tokenizer_vocab_size)
    if len(tokenizer) > spec.vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens > {spec.vocab_size=}")
    # Step 2: seeded random weights (init on CPU in float32).
    config = hf_config(spec)
    torch.manual_seed(SEED)
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Norm weights start at 1.0; jitter them so a wrong shard offset cannot hide behind symmetry.
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    # Step 3: save (safetensors), tokenizer, generation config.
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    tokenizer.save_pretrained(out)
    (out / "sgl_elastic_model.json").write_text(
        json.dumps({"factory_version": FACTORY_VERSION, "seed": SEED, **dataclasses.asdict(spec)},
                   indent=2)
    )


def build_model(family: str, size: str = "tiny", out_dir: str | os.PathLike | None = None) -> Path:
    """Build (or find in the cache) the checkpoint of ``family``/``size``; return its directory.

    ``out_dir`` is the parent directory of checkpoints (default: ``$SGLE_CACHE/models`` or
    ``~/.cache/sgl-elastic/models``). The build goes to a temporary sibling and is renamed into
    place, so concurrent builders and interrupted builds never leave a half-written checkpoint.
    """
    spec = model_spec(family, size)
    parent = Path(out_dir) if out_dir is not None else default_cache_dir()
    target = parent / f"{family}-{size}-{_spec_hash(spec)}"
    if (target / "sgl_elastic_model.json").exists():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    os.chmod(tmp, 0o755)
    try:
        _write_checkpoint(spec, tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "sgl_elastic_model.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sgl_elastic.testing.models",
        description="Build a deterministic random-weight checkpoint; print its directory last.",
    )
    parser.add_argument("--family", required=True, choices=FAMILIES)
    parser.add_argument("--size", default="tiny", choices=SIZES)
    parser.add_argument("--out", default=None, help="parent directory (default: the cache)")
    args = parser.parse_args(argv)
    spec = model_spec(args.family, args.size)
    print(f"building {args.family}/{args.size} ({spec.num_hidden_layers} layers, "
          f"hidden {spec.hidden_size}) if not cached...", file=sys.stderr)
    print(build_model(args.family, args.size, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
