"""Codecs: what each stored code means, and how codes are packed into bytes.

One table, ``CODECS``. A codec maps each ``bits``-bit code to an exact float32 value; a weight's
element ``[i, j]`` is that value, shifted by a zero point and scaled as its format says (see
``formats.quantized``). 8-bit codecs sit one per byte (FP8, int8); 4-bit codecs two per byte, the
low nibble first (element ``2k`` in bits 0-3 of byte ``k``), which is also the order of eight
nibbles in a little-endian int32 word as compressed-tensors packs them.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

__all__ = ["Codec", "CODECS", "E2M1", "INT4", "INT8", "INT8_OFFSET", "fp8_codec", "codec"]

#: The OCP e2m1 (FP4) values of codes 0-7; codes 8-15 are their negatives (code 8 is -0).
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclasses.dataclass(frozen=True)
class Codec:
    """Attributes:
    name: how docs, reports and ``inspect`` call it (``e2m1``, ``int4``, ``e4m3``...).
    bits: bits per code, 4 or 8.
    table: the exact value of each of the ``2**bits`` codes (NaN codes of FP8 give NaN).
    """

    name: str
    bits: int
    table: tuple[float, ...] = dataclasses.field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.table) != 1 << self.bits:
            raise ValueError(f"codec {self.name} has {len(self.table)} values for {self.bits} bits")

    @property
    def per_byte(self) -> int:
        """Codes in one byte."""
        return 8 // self.bits

    def values(self) -> torch.Tensor:
        """float32 ``[2**bits]``: the value of each code."""
        return _table(self)

    def logical_cols(self, stored_bytes_per_row: int) -> int:
        """Elements in a stored row of ``stored_bytes_per_row`` bytes."""
        return stored_bytes_per_row * self.per_byte

    def row_bytes(self, cols: int) -> int:
        """Bytes holding ``cols`` codes (a last odd nibble takes a whole byte)."""
        return -(-cols * self.bits // 8)


@functools.cache
def _table(codec: Codec) -> torch.Tensor:
    return torch.tensor(codec.table, dtype=torch.float32)


#: FP4 (e2m1): MXFP4, NVFP4.
E2M1 = Codec("e2m1", 4, _E2M1_MAGNITUDES + tuple(-v for v in _E2M1_MAGNITUDES))
#: Signed int4 stored offset by 8 (code ``u`` is ``u - 8``), as compressed-tensors packs it
#: (its zero points too).
INT4 = Codec("int4", 4, tuple(float(u - 8) for u in range(16)))
#: Signed int8 stored offset by 128 (code ``u`` is ``u - 128``): compressed-tensors' 8-bit
#: ``pack-quantized``, four codes an int32 word.
INT8_OFFSET = Codec("int8-offset", 8, tuple(float(u - 128) for u in range(256)))
#: Signed int8, two's complement (an ``I8`` tensor's bytes).
INT8 = Codec("int8", 8, tuple(float(u - 256 if u >= 128 else u) for u in range(256)))


@functools.cache
def fp8_codec(fp8_dtype: torch.dtype) -> Codec:
    """The codec of one FP8 format: each byte read as ``fp8_dtype``."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8_dtype).to(torch.float32)
    return Codec(str(fp8_dtype).removeprefix("torch.float8_"), 8, tuple(values.tolist()))


#: The integer and FP4 codecs by name (FP8 codecs come from the dtype table: ``fp8_codec``).
CODECS: dict[str, Codec] = {c.name: c for c in (E2M1, INT4, INT8_OFFSET, INT8)}


def codec(name: str) -> Codec:
    """The codec called ``name``. Raises ``KeyError`` naming the known ones."""
    try:
        return CODECS[name]
    except KeyError:
        raise KeyError(f"unknown codec {name!r}; known: {', '.join(CODECS)}") from None
