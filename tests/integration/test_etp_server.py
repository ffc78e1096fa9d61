"""`python -m sgl_elastic.launch_server --tp 3 --elastic-tp-widths 2,1,1` serves and answers like HF.

One server (tiny Qwen3-MoE, float32, 8 query / 4 KV heads on 3 ranks as 2,1,1 KV heads, no
padding): `/generate` with token ids gives HF transformers' greedy tokens; bad widths are refused
before any process starts.
"""

import subprocess
import sys

import pytest
import requests

from sgl_elastic.testing.reference import hf_greedy
from sgl_elastic.testing.server import ServerProcess

PROMPTS = [[1, 5, 9, 33, 70, 100], [200, 3, 4], [42]]
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def server(tiny_models):
    srv = ServerProcess(
        tiny_models["qwen3-moe"], tp_size=3,
        extra_args=["--dtype", "float32", "--elastic-tp-widths", "2,1,1", "--max-total-tokens", "4096",
                    "--mem-fraction-static", "0.15"],
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.slow
def test_elastic_server_answers_like_hf(server, tiny_models):
    want = hf_greedy(str(tiny_models["qwen3-moe"]), PROMPTS, MAX_NEW_TOKENS)
    r = requests.post(
        server.url + "/generate",
        json={"input_ids": PROMPTS,
              "sampling_params": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0, "ignore_eos": True}},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    assert [out["output_ids"] for out in r.json()] == want
    info = requests.get(server.url + "/get_server_info", timeout=10).json()
    assert info["tp_size"] == 3


def test_bad_widths_exit_2_before_any_process(tiny_models):
    proc = subprocess.run(
        [sys.executable, "-m", "sgl_elastic.launch_server", "--model-path", str(tiny_models["qwen3-moe"]),
         "--tp", "3", "--elastic-tp-widths", "3,3,3", "--port", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: attn: widths 3,3,3 sum to 9 units but the model has 4 KV-head groups" in proc.stderr
