"""CPU compatibility layer for SGLang 0.5.23 on machines without CUDA.

Installed by ``scripts/setup.sh`` as a ``.pth`` hook, so it is active in every process of the
venv (SGLang's spawned scheduler processes too). See :mod:`sgl_elastic.compat.boot`.
"""
