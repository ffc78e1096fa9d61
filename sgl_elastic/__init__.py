"""sgl-elastic: keep an SGLang tensor-parallel server serving after a GPU (TP rank) fails.

Kept import-light (no torch, no sglang): it is imported at interpreter start by the CPU compat hook.
"""

__version__ = "0.1.0"
