"""The CPU compat layer, checked in fresh interpreters (as SGLang's spawned schedulers see it)."""

import subprocess
import sys
import textwrap


def run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def test_sgl_kernel_stand_in_raises_naming_the_function():
    r = run_py("""
        import sgl_kernel
        from sgl_kernel import copy_all_layer_kv_cache_cpu
        try:
            copy_all_layer_kv_cache_cpu(1, 2)
        except NotImplementedError as e:
            print("RAISED", e)
    """)
    assert r.returncode == 0, r.stderr
    assert "RAISED sgl_kernel.copy_all_layer_kv_cache_cpu was called" in r.stdout


def test_sgl_kernel_stand_in_keeps_import_error_fallbacks():
    r = run_py("""
        try:
            from sgl_kernel import not_a_cpu_kernel
        except ImportError:
            print("IMPORT-ERROR-1")
        try:
            from sgl_kernel.scalar_type import scalar_types
        except ImportError:
            print("IMPORT-ERROR-2")
    """)
    assert r.returncode == 0, r.stderr
    assert "IMPORT-ERROR-1" in r.stdout and "IMPORT-ERROR-2" in r.stdout


def test_torchvision_imports_on_cpu_torch():
    r = run_py("""
        import torch, torchvision
        print("TV", torchvision.__version__, torch.version.cuda)
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "TV " in r.stdout


def test_selfcheck_passes():
    r = subprocess.run([sys.executable, "-m", "sgl_elastic.compat.selfcheck"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK: sglang 0.5.23" in r.stdout
