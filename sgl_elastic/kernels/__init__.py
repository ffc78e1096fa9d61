"""Triton kernels, each behind a thin wrapper with a torch reference (tested on CPU with TRITON_INTERPRET=1)."""

from sgl_elastic.kernels.remap import remap_experts, remap_experts_reference

__all__ = ["remap_experts", "remap_experts_reference"]
