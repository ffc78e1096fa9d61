"""The tiny-model factory: deterministic, cached, loadable, with a working tokenizer."""

import hashlib
import json
import subprocess
import sys

import pytest

from sgl_elastic.testing.models import build_model, model_spec


def digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_build_is_deterministic_and_cached(tmp_path):
    a = build_model("qwen3", "tiny", tmp_path / "a")
    b = build_model("qwen3", "tiny", tmp_path / "b")
    assert a.name == b.name and digest(a) == digest(b)
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert build_model("qwen3", "tiny", tmp_path / "a") == a  # cache hit: not rebuilt
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime


def test_tiny_shapes(tiny_models):
    cfg = json.loads((tiny_models["qwen3-moe"] / "config.json").read_text())
    num_experts = cfg.get("num_experts", cfg.get("num_local_experts"))  # transformers 5 saves the latter
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], num_experts,
            cfg["num_experts_per_tok"]) == (8, 4, 8, 2)
    mix = json.loads((tiny_models["mixtral"] / "config.json").read_text())
    assert (mix["num_local_experts"], mix["num_key_value_heads"]) == (8, 4)
    assert json.loads((tiny_models["qwen3"] / "config.json").read_text())["model_type"] == "qwen3"


def test_tokenizer_and_chat_template(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models["qwen3-moe"]))
    ids = tok("hello world, the server")["input_ids"]
    assert tok.decode(ids) == "hello world, the server"
    assert max(ids) < model_spec("qwen3-moe", "tiny").vocab_size
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


def test_bad_family_and_size():
    with pytest.raises(ValueError, match="unknown family 'llama'"):
        model_spec("llama", "tiny")
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        model_spec("qwen3", "huge")


def test_cli_prints_directory_last(tiny_models):
    r = subprocess.run([sys.executable, "-m", "sgl_elastic.testing.models", "--family", "mixtral",
                        "--size", "tiny"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(tiny_models["mixtral"])
