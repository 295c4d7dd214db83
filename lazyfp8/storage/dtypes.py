"""The one dtype table: safetensors header codes <-> torch dtypes.

Everything else in the package asks this module; there is no second table to drift.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["DType", "by_code", "by_torch", "FP8_WEIGHT_CODES", "SCALE_CODES", "TARGETS", "FP8_MAX"]


@dataclasses.dataclass(frozen=True)
class DType:
    """One row of the table.

    Attributes:
        code: the string safetensors writes in a header (``"F8_E4M3"``, ``"BF16"``...).
        torch: the matching ``torch.dtype``.
        itemsize: bytes per element on disk.
        fp8_max: for the 8-bit float formats weights are quantized to, the largest finite value
            (what ``amax`` maps to when quantizing); ``None`` for every other dtype.
        scale: whether a scale may be stored in it (read as float32 multipliers; ``U8`` and
            ``F8_E8M0`` as ue8m0 exponents).
        target: whether FP8 weights may be dequantized to it.
    """

    code: str
    torch: torch.dtype
    itemsize: int
    fp8_max: float | None = None
    scale: bool = False
    target: bool = False

    @property
    def fp8_weight(self) -> bool:
        """One of the 8-bit float formats weights are quantized to."""
        return self.fp8_max is not None


_TABLE: tuple[DType, ...] = (
    DType("F8_E4M3", torch.float8_e4m3fn, 1, fp8_max=448.0),
    DType("F8_E5M2", torch.float8_e5m2, 1, fp8_max=57344.0),
    DType("F8_E4M3FNUZ", torch.float8_e4m3fnuz, 1, fp8_max=240.0),
    DType("F8_E5M2FNUZ", torch.float8_e5m2fnuz, 1, fp8_max=57344.0),
    DType("F8_E8M0", torch.float8_e8m0fnu, 1, scale=True),
    DType("BF16", torch.bfloat16, 2, scale=True, target=True),
    DType("F16", torch.float16, 2, scale=True, target=True),
    DType("F32", torch.float32, 4, scale=True, target=True),
    DType("F64", torch.float64, 8, scale=True, target=True),
    DType("C64", torch.complex64, 8),
    DType("I8", torch.int8, 1),
    DType("I16", torch.int16, 2),
    DType("I32", torch.int32, 4),
    DType("I64", torch.int64, 8),
    DType("U8", torch.uint8, 1, scale=True),
    DType("U16", torch.uint16, 2),
    DType("U32", torch.uint32, 4),
    DType("U64", torch.uint64, 8),
    DType("BOOL", torch.bool, 1),
)

_BY_CODE = {d.code: d for d in _TABLE}
_BY_TORCH = {d.torch: d for d in _TABLE}

FP8_WEIGHT_CODES = frozenset(d.code for d in _TABLE if d.fp8_weight)
#: Header codes a scale may be stored as.
SCALE_CODES = frozenset(d.code for d in _TABLE if d.scale)
#: torch dtypes FP8 weights dequantize to, in the table's order.
TARGETS = tuple(d.torch for d in _TABLE if d.target)
#: torch dtype -> largest finite value, for every FP8 weight format.
FP8_MAX = {d.torch: d.fp8_max for d in _TABLE if d.fp8_max is not None}


def by_code(code: str) -> DType | None:
    """The row for a header dtype string, or ``None`` if this package does not read it."""
    return _BY_CODE.get(code)


def by_torch(dtype: torch.dtype) -> DType | None:
    """The row for a torch dtype, or ``None`` if safetensors cannot store it."""
    return _BY_TORCH.get(dtype)
