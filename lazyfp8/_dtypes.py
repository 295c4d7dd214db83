"""The one dtype table: safetensors header codes <-> torch dtypes.

Everything else in the package asks this module; there is no second table to drift.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["DType", "by_code", "by_torch", "FP8_WEIGHT_CODES"]


@dataclasses.dataclass(frozen=True)
class DType:
    """One row of the table.

    Attributes:
        code: the string safetensors writes in a header (``"F8_E4M3"``, ``"BF16"``...).
        torch: the matching ``torch.dtype``.
        itemsize: bytes per element on disk.
        fp8_weight: ``True`` for the 8-bit float formats weights are quantized to.
    """

    code: str
    torch: torch.dtype
    itemsize: int
    fp8_weight: bool = False


_TABLE: tuple[DType, ...] = (
    DType("F8_E4M3", torch.float8_e4m3fn, 1, fp8_weight=True),
    DType("F8_E5M2", torch.float8_e5m2, 1, fp8_weight=True),
    DType("F8_E4M3FNUZ", torch.float8_e4m3fnuz, 1, fp8_weight=True),
    DType("F8_E5M2FNUZ", torch.float8_e5m2fnuz, 1, fp8_weight=True),
    DType("F8_E8M0", torch.float8_e8m0fnu, 1),
    DType("BF16", torch.bfloat16, 2),
    DType("F16", torch.float16, 2),
    DType("F32", torch.float32, 4),
    DType("F64", torch.float64, 8),
    DType("C64", torch.complex64, 8),
    DType("I8", torch.int8, 1),
    DType("I16", torch.int16, 2),
    DType("I32", torch.int32, 4),
    DType("I64", torch.int64, 8),
    DType("U8", torch.uint8, 1),
    DType("U16", torch.uint16, 2),
    DType("U32", torch.uint32, 4),
    DType("U64", torch.uint64, 8),
    DType("BOOL", torch.bool, 1),
)

_BY_CODE = {d.code: d for d in _TABLE}
_BY_TORCH = {d.torch: d for d in _TABLE}

FP8_WEIGHT_CODES = frozenset(d.code for d in _TABLE if d.fp8_weight)


def by_code(code: str) -> DType | None:
    """The row for a header dtype string, or ``None`` if this package does not read it."""
    return _BY_CODE.get(code)


def by_torch(dtype: torch.dtype) -> DType | None:
    """The row for a torch dtype, or ``None`` if safetensors cannot store it."""
    return _BY_TORCH.get(dtype)
