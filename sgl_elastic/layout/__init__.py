"""Elastic layout: per sharded tensor family, the unit of sharding and each rank's width in units.

Pure (msgspec only; no torch, no sglang). See ``family.py`` for the vocabulary (unit, dim, widths).
"""

from sgl_elastic.layout.elastic import POLICIES, ElasticLayout, replicated_kv_heads
from sgl_elastic.layout.family import FAMILY_NAMES, FamilyLayout
from sgl_elastic.layout.model import ModelShape
from sgl_elastic.layout.tensors import TensorSpec, model_tensors
from sgl_elastic.layout.widths import capacity_widths, equal_widths, proportional_widths, validate_widths

__all__ = [
    "ElasticLayout",
    "FamilyLayout",
    "ModelShape",
    "TensorSpec",
    "model_tensors",
    "FAMILY_NAMES",
    "POLICIES",
    "equal_widths",
    "capacity_widths",
    "proportional_widths",
    "validate_widths",
    "replicated_kv_heads",
]
