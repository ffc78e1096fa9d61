"""SGLang's own benchmark client, ``python -m sglang.bench_serving``, runs against the elastic server
from the project's set-up, and every one of its requests succeeds through a rank's SIGKILL.

Tiny Qwen3-MoE, ``--tp 3``; bench_serving sends 24 random-id requests (no dataset download) at
4 req/s with a streamed output of 24 tokens each; while it runs, rank 1 is SIGKILLed (3 -> 2). Its
JSON result must count 24 completed requests out of 24 and as many output tokens as were asked.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from sgl_elastic.testing.clients import admin_status, wait_serving, wait_state

from tests.integration.conftest import TOKEN

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600), pytest.mark.slow]  # slow tier (docs/testing.md)

N, OUT = 24, 24


def test_bench_serving_through_a_rank_failure(serve, tiny_models, tmp_path):
    model = str(tiny_models["qwen3-moe"])
    with serve("qwen3-moe", 3, "--elastic-standby", "0") as srv:
        accepted = admin_status(srv.url, TOKEN)["requests"]["accepted"]
        out_file = tmp_path / "bench.jsonl"
        cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--base-url", srv.url,
               "--model", model, "--tokenizer", model, "--dataset-name", "random-ids", "--num-prompts", str(N),
               "--random-input-len", "16", "--random-output-len", str(OUT), "--random-range-ratio", "1",
               "--request-rate", "4", "--seed", "1", "--disable-tqdm", "--output-file", str(out_file),
               "--warmup-requests", "1"]
        log = open(tmp_path / "bench.log", "w")
        bench = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # the warm-up is done and the benchmark's requests stream: more than the warm-up accepted,
            # one in flight now
            wait_state(srv.url, TOKEN, lambda st: st["requests"]["accepted"] >= accepted + 3
                       and st["requests"]["in_flight"] >= 1 or bench.poll() is not None,
                       "bench_serving's requests in flight", timeout=120, interval=0.05)
            assert bench.poll() is None, f"bench_serving ended early:\n{(tmp_path / 'bench.log').read_text()[-3000:]}"
            st = admin_status(srv.url, TOKEN)
            os.kill(next(r["pid"] for r in st["ranks"] if r["rank"] == 1), signal.SIGKILL)
            wait_serving(srv.url, TOKEN, lambda s: s["tp_size"] == 2, "the failover to tp 2")
            bench.wait(timeout=300)
        finally:
            if bench.poll() is None:
                os.killpg(bench.pid, signal.SIGKILL)
                bench.wait(10)
            log.close()
        text = (tmp_path / "bench.log").read_text()
        assert bench.returncode == 0, f"bench_serving failed ({bench.returncode}):\n{text[-3000:]}"
        result = json.loads(out_file.read_text().splitlines()[-1])
        assert result["completed"] == N, f"{result['completed']} of {N} requests completed:\n{text[-3000:]}"
        assert result["total_output_tokens"] == N * OUT, result["total_output_tokens"]
        rec = admin_status(srv.url, TOKEN)["recoveries"][-1]
        assert rec["outcome"] == "ok" and rec["failed_ranks"] == [1], rec
