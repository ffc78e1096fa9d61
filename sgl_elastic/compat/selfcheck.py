"""Set-up self-check: the pinned SGLang imports on this machine, with every module we patch.

``python -m sgl_elastic.compat.selfcheck`` prints one OK line or exits non-zero with the reason.
``--quick`` (the set-up's up-to-date path) checks versions, the compat hook and that every module is
present without importing SGLang (which takes ~15 s on these machines).
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib import metadata
import os
import sys
import time
import warnings
from pathlib import Path

from sgl_elastic.version_check import PINNED_SGLANG, check_sglang_version

# The SGLang modules sgl-elastic hooks into (see docs: design.md, "hook points").
PATCHED_MODULES = (
    "sglang.srt.distributed.utils",
    "sglang.srt.layers.linear",
    "sglang.srt.layers.parameter",
    "sglang.srt.layers.vocab_parallel_embedding",
    "sglang.srt.layers.moe.fused_moe_triton.layer",
    "sglang.srt.configs.model_config",
    "sglang.srt.models.qwen3_moe",
    "sglang.srt.models.qwen3",
    "sglang.srt.models.mixtral",
    "sglang.srt.entrypoints.http_server",
)


def quick_check() -> int:
    t0 = time.perf_counter()
    try:
        version = check_sglang_version()
        # find_spec on a submodule would import its parents (all of SGLang): look for files instead.
        root = Path(importlib.util.find_spec("sglang").origin).parent.parent
        missing = [m for m in PATCHED_MODULES if not (root / (m.replace(".", "/") + ".py")).exists()]
        if missing:
            raise ImportError(f"SGLang modules missing: {', '.join(missing)}")
        if "sgl_elastic.compat.boot" not in sys.modules:
            raise ImportError("the compat .pth hook is not active (re-run scripts/setup.sh)")
        torch_version = metadata.version("torch")
    except Exception as exc:
        print(f"[setup] self-check FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"[setup] OK: sglang {version} (pinned {PINNED_SGLANG}), torch {torch_version}, "
          f"{len(PATCHED_MODULES)} patched modules present ({time.perf_counter() - t0:.1f} s, quick)")
    return 0


def main() -> int:
    if "--quick" in sys.argv[1:]:
        return quick_check()
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    t0 = time.perf_counter()
    try:
        version = check_sglang_version()
        with warnings.catch_warnings():
            # SGLang warns at import that AWQ/GGUF/Triton need CUDA: expected on CPU.
            warnings.simplefilter("ignore", UserWarning)
            for name in PATCHED_MODULES:
                importlib.import_module(name)
    except Exception as exc:
        print(f"[setup] self-check FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    import torch

    print(
        f"[setup] OK: sglang {version} (pinned {PINNED_SGLANG}), torch {torch.__version__}, "
        f"{len(PATCHED_MODULES)} patched modules import ({time.perf_counter() - t0:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
