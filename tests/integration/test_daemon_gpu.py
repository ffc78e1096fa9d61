"""CUDA backend of the daemon: IPC handover keyed by GPU UUID between two processes on one GPU.

Skipped without CUDA (conftest); written to run as is on a machine with a GPU.
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sgl_elastic.daemon import DaemonProcess
from sgl_elastic.memory.shm import segments_of_pid

pytestmark = pytest.mark.gpu


def _layout(ckpt: str, tp: int):
    from sgl_elastic.layout import ElasticLayout

    with open(os.path.join(ckpt, "config.json")) as f:
        return ElasticLayout.from_hf_config(SimpleNamespace(**json.load(f)), tp, mlp_unit=64, vocab_unit=64)


def test_cuda_ipc_handover_to_another_process():
    from safetensors.torch import load_file

    from sgl_elastic.testing.models import build_model

    ckpt = str(build_model("qwen3-moe", "tiny"))
    with DaemonProcess.start(backend="cuda") as d:
        c = d.client(timeout=60)
        c.load_model(ckpt, _layout(ckpt, 1))
        c.wait_ready(120)
        h = c.export_weights(0)
        assert all(ref.backend == "cuda" and ref.device_uuid for ref in h.segments)
        out = subprocess.run([sys.executable, "-c", f"""
import time, torch
from sgl_elastic.daemon import DaemonClient
c = DaemonClient.from_run_dir({d.run_dir!r})
t = time.perf_counter()
a = c.attach_weights(0)
torch.cuda.synchronize()
dt = time.perf_counter() - t
w = a.tensors["model.embed_tokens.weight"]
print(w.device.type, float(w.double().sum()), dt)
"""], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        dev, checksum, _ = out.stdout.split()
        want = load_file(os.path.join(ckpt, "model.safetensors"))["model.embed_tokens.weight"].double().sum()
        assert dev == "cuda" and abs(float(checksum) - float(want)) < 1e-6 * max(1.0, abs(float(want)))
        c.close()
    assert segments_of_pid(d.pid) == []
