"""At equal widths, sgl-elastic's patched SGLang gives vanilla SGLang's tokens and logprobs.

Tiny Qwen3-MoE at tp=2, float32: one vanilla engine, one with the patches active (no widths given:
equal widths 2,2 KV heads, 2,2 MoE blocks, 4,4 vocab blocks). Logprobs are the log-softmax of the
gathered logits, so equal logprobs mean the variable-width logits gather is the plain one here.
"""

import pytest
import torch

from sgl_elastic.config import ElasticArgs
from sgl_elastic.testing.reference import engine_greedy, sglang_engine

pytestmark = pytest.mark.slow  # slow tier (docs/testing.md)

PROMPTS = [[1, 5, 9, 33, 70, 100, 17, 250], [200, 3, 4], [42]]
MAX_NEW_TOKENS = 16


def test_equal_widths_match_vanilla_sglang(tiny_models):
    path = str(tiny_models["qwen3-moe"])
    with sglang_engine(path, 2) as engine:
        van_tokens, van_logprobs = engine_greedy(engine, PROMPTS, MAX_NEW_TOKENS, return_logprob=True)
    with sglang_engine(path, 2, elastic=ElasticArgs()) as engine:
        our_tokens, our_logprobs = engine_greedy(engine, PROMPTS, MAX_NEW_TOKENS, return_logprob=True)
    assert our_tokens == van_tokens
    torch.testing.assert_close(torch.tensor(our_logprobs), torch.tensor(van_logprobs), rtol=0, atol=1e-5)
