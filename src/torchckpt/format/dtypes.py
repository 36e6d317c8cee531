"""Mapping between torch dtypes, their names in the manifest, and safetensors names.

A dtype is named in the manifest by its ``torch`` attribute name (``"bfloat16"``).
Dtypes that the safetensors format has no name for are stored in rank files as
raw bytes (``U8`` of shape ``[nbytes]``); the manifest keeps the real dtype.
"""

from __future__ import annotations

import torch

__all__ = ["ITEMSIZE", "SAFETENSORS_NAMES", "dtype_from_name", "dtype_name", "safetensors_name"]

# Canonical names: one per dtype, the attribute of the torch module.
_CANONICAL = [
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2",
    "uint1", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7",
    "int1", "int2", "int3", "int4", "int5", "int6", "int7",
]  # fmt: skip

_BY_NAME: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in _CANONICAL if isinstance(getattr(torch, name, None), torch.dtype)
}
_NAME_OF: dict[torch.dtype, str] = {dtype: name for name, dtype in _BY_NAME.items()}
#: Bytes per element of each named dtype.
ITEMSIZE: dict[str, int] = {name: dtype.itemsize for name, dtype in _BY_NAME.items()}

#: dtypes that safetensors names (the names it writes in its header).
SAFETENSORS_NAMES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def dtype_name(dtype: torch.dtype) -> str:
    """Return the manifest name of ``dtype``.

    Raises:
        KeyError: The dtype has no stable name (quantized dtypes).
    """
    return _NAME_OF[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    """Return the dtype a manifest name stands for.

    Raises:
        KeyError: Unknown name.
    """
    return _BY_NAME[name]


def safetensors_name(dtype: torch.dtype) -> str | None:
    """Return the safetensors name of ``dtype``, or None when stored as raw bytes."""
    return SAFETENSORS_NAMES.get(dtype)
