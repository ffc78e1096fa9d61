"""Greedy references for parity tests: HF transformers, and real SGLang engines on CPU.

- :func:`hf_greedy`: float32 HF model, plain full-sequence argmax loop (no KV cache, no sampling).
- :func:`sglang_greedy`: start ``sgl.Engine`` with the CPU settings of docs/cpu-sglang.md, greedy
  (temperature 0, ignore_eos), shut it down. ``elastic=ElasticArgs(...)`` runs it with sgl-elastic's
  patches (``sgl_elastic.patches.activate``) and deactivates them afterwards.
- :func:`sglang_engine` + :func:`engine_greedy`: the same, keeping one engine for several asserts.

Scripts calling these must sit under ``if __name__ == "__main__":`` (SGLang spawns processes).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import psutil

from sgl_elastic.launch_server import omp_threads_bind
from sgl_elastic.controller.procs import free_port, remove_leftover_shm, shm_inodes_of

__all__ = [
    "hf_greedy",
    "sglang_greedy",
    "sglang_engine",
    "engine_greedy",
    "cpu_engine_kwargs",
    "free_port",
]


def hf_greedy(model_path: str, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of every prompt with HF transformers in float32: ``[num_prompts][max_new_tokens]``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    model.eval()
    out: list[list[int]] = []
    with torch.no_grad():
        for prompt in prompt_ids:
            ids = torch.tensor([list(prompt)], dtype=torch.long)
            new: list[int] = []
            for _ in range(max_new_tokens):
                logits = model(input_ids=ids, use_cache=False).logits[0, -1]
                tok = int(torch.argmax(logits))
                new.append(tok)
                ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
            out.append(new)
    return out


def cpu_engine_kwargs(model_path: str, tp_size: int = 1, **overrides: Any) -> dict[str, Any]:
    """``sgl.Engine`` kwargs that work on these CPU machines (float32 for exact-match tests)."""
    kwargs: dict[str, Any] = dict(
        model_path=str(model_path),
        tp_size=tp_size,
        device="cpu",
        attention_backend="torch_native",
        disable_cuda_graph=True,
        mem_fraction_static=0.15,  # 0.05 works alone; other processes loading at the same time need slack
        max_total_tokens=4096,
        skip_server_warmup=True,
        sleep_on_idle=True,
        dtype="float32",
        random_seed=0,
        log_level="error",
        host="127.0.0.1",
        port=free_port(),
    )
    kwargs.update(overrides)
    return kwargs


@contextlib.contextmanager
def _cpu_env(tp_size: int) -> Iterator[None]:
    """CPU engine env vars for one engine; the previous values are restored afterwards (a later
    engine or server with another tp size must not inherit this one's thread binding)."""
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    key = "SGLANG_CPU_OMP_THREADS_BIND"
    old = os.environ.get(key)
    if tp_size > 1:
        os.environ[key] = omp_threads_bind(tp_size, max(1, len(os.sched_getaffinity(0))))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


@contextlib.contextmanager
def sglang_engine(model_path: str, tp_size: int = 1, *, elastic=None, **engine_kwargs: Any) -> Iterator[Any]:
    """A running ``sgl.Engine`` on CPU (shut down on exit).

    ``elastic``: an ``sgl_elastic.config.ElasticArgs`` to run with sgl-elastic's patches
    (validated and activated before the engine spawns its processes; deactivated on exit).
    """
    with _cpu_env(tp_size):
        import sglang as sgl

        kwargs = cpu_engine_kwargs(model_path, tp_size, **engine_kwargs)
        if elastic is not None:
            from sgl_elastic.patches import activate

            activate(elastic, kwargs)
        try:
            others = {p.pid for p in psutil.Process().children(recursive=True)}
            engine = sgl.Engine(**kwargs)
            try:
                yield engine
            finally:
                # SGLang leaves /dev/shm files of its children behind: remove exactly those.
                children = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in others]
                shm_inodes = shm_inodes_of(children)
                engine.shutdown()
                remove_leftover_shm(shm_inodes)
        finally:
            if elastic is not None:
                from sgl_elastic.patches import deactivate

                deactivate()


def engine_greedy(
    engine, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *, return_logprob: bool = False
):
    """Greedy tokens ``[num_prompts][max_new_tokens]`` (and, with ``return_logprob``, their logprobs)."""
    outs = engine.generate(
        input_ids=[list(p) for p in prompt_ids],
        sampling_params={"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True},
        return_logprob=return_logprob,
    )
    if isinstance(outs, dict):
        outs = [outs]
    tokens = [list(o["output_ids"]) for o in outs]
    if not return_logprob:
        return tokens
    logprobs = [[float(lp) for lp, _tok, *_ in o["meta_info"]["output_token_logprobs"]] for o in outs]
    return tokens, logprobs


def sglang_greedy(
    model_path: str,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    tp_size: int = 1,
    *,
    elastic=None,
    **engine_kwargs: Any,
) -> list[list[int]]:
    """Start an engine, greedy-decode every prompt, shut it down: ``[num_prompts][max_new_tokens]``."""
    with sglang_engine(model_path, tp_size, elastic=elastic, **engine_kwargs) as engine:
        return engine_greedy(engine, prompt_ids, max_new_tokens)
