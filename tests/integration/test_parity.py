"""Vanilla SGLang (through our CPU set-up) gives HF transformers' greedy tokens, float32, tp=1 and 2.

This is the oracle the elastic layouts are held to: if it failed, the set-up (compat layer, CPU
flags, tiny checkpoints) would be wrong, not the elastic patches.
"""

import pytest
from transformers import AutoTokenizer

from sgl_elastic.testing.reference import hf_greedy, sglang_greedy

PROMPTS = ["hello world, the server", "explain why the expert", "1234 tensor parallel rank"]
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def prompt_ids(tiny_models):
    # all three families share the tokenizer recipe; each test tokenizes with its own anyway
    return {
        family: [AutoTokenizer.from_pretrained(str(path))(p)["input_ids"] for p in PROMPTS]
        for family, path in tiny_models.items()
    }


@pytest.fixture(scope="module")
def hf_tokens(tiny_models, prompt_ids):
    return {f: hf_greedy(str(p), prompt_ids[f], MAX_NEW_TOKENS) for f, p in tiny_models.items()}


# The default tier keeps tp 2 of the MoE families; tp 1 and the dense family run under slow.
CASES = [pytest.param(f, tp, id=f"{f}-{tp}", marks=() if tp == 2 and f != "qwen3" else pytest.mark.slow)
         for f in ("qwen3-moe", "mixtral", "qwen3") for tp in (1, 2)]


@pytest.mark.parametrize("family,tp_size", CASES)
def test_sglang_matches_hf(family, tp_size, tiny_models, prompt_ids, hf_tokens):
    got = sglang_greedy(str(tiny_models[family]), prompt_ids[family], MAX_NEW_TOKENS, tp_size=tp_size)
    assert got == hf_tokens[family]
    # the tokens are not degenerate (a model stuck on one token would make parity vacuous)
    assert all(len(set(seq)) > 3 for seq in got), got
