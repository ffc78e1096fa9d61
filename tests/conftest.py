import os

# Before anything imports sglang: the CPU engine (no CUDA on these machines).
os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.fspath)
        if "/tests/unit/" in path:
            item.add_marker(pytest.mark.unit)
        elif "/tests/integration/" in path:
            item.add_marker(pytest.mark.integration)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA (no accelerator on this machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models():
    """family -> path of the tiny checkpoint (built once, cached)."""
    from sgl_elastic.testing.models import FAMILIES, build_model

    return {family: build_model(family, "tiny") for family in FAMILIES}


@pytest.fixture(scope="session")
def hf_tokens(tiny_models):
    """``hf_tokens(family, prompts, max_new)``: HF's greedy float32 tokens on the tiny checkpoint
    (computed once per arguments in a session)."""
    from sgl_elastic.testing.reference import hf_greedy

    cache = {}

    def get(family, prompts, max_new):
        key = (family, tuple(map(tuple, prompts)), max_new)
        if key not in cache:
            cache[key] = hf_greedy(str(tiny_models[family]), prompts, max_new)
        return cache[key]

    return get
