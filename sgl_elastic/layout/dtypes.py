"""The one dtype table: torch dtype name -> bytes per element and safetensors dtype code.

Pure (no torch import): everything else derives its lookups from ``DTYPES``.
"""

from __future__ import annotations

__all__ = ["DTYPES", "ITEMSIZE", "SAFETENSORS_ITEMSIZE", "SAFETENSORS_TO_TORCH", "ALIASES", "RAW_NUMPY", "RAW_TORCH",
           "dtype_name"]

# torch dtype name: (bytes per element, safetensors dtype code)
DTYPES: dict[str, tuple[int, str]] = {
    "float64": (8, "F64"), "float32": (4, "F32"), "float16": (2, "F16"), "bfloat16": (2, "BF16"),
    "int64": (8, "I64"), "int32": (4, "I32"), "int16": (2, "I16"), "int8": (1, "I8"), "uint8": (1, "U8"),
    "bool": (1, "BOOL"), "float8_e4m3fn": (1, "F8_E4M3"), "float8_e5m2": (1, "F8_E5M2"),
}
ALIASES = {"half": "float16", "float": "float32"}  # torch's other spellings (HF configs use them)

# Bitwise copies: an integer dtype of the same width (the element type never matters).
RAW_NUMPY = {8: "uint64", 4: "uint32", 2: "uint16", 1: "uint8"}  # bytes per element -> numpy dtype name
RAW_TORCH = {8: "int64", 4: "int32", 2: "int16", 1: "uint8"}  # bytes per element -> torch dtype name

ITEMSIZE = {name: size for name, (size, _) in DTYPES.items()}
SAFETENSORS_ITEMSIZE = {code: size for size, code in DTYPES.values()}
SAFETENSORS_TO_TORCH = {code: name for name, (_, code) in DTYPES.items()}


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` (or its string) -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")
