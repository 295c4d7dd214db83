"""Quantize a tensor: the inverse of what the view reads.

FP8 (:func:`quantize`), any granularity: ``scale = amax / fp8_max`` per group (float32),
``codes = round(clamp(w / scale, ±fp8_max))``. A group of zeros gets scale 1.0 (finite and
non-zero, as readers require). For MX (ue8m0) scales the scale is the smallest power of two
``>= amax / fp8_max``, stored as its biased exponent byte.

4-bit schemes (:class:`NVFP4`, :class:`MXFP4`, :class:`Int4`): groups of ``g`` consecutive
elements of a row share a scale; each element becomes a 4-bit code, two to a byte (element
``2k`` in the low nibble of byte ``k``, the order every producer uses). ``PackedScheme.quantize``
documents the rule each one follows and the error it guarantees.

Rows are processed in bands of a few million elements, so no float32 copy of a whole tensor (and
no temporary of its size) is ever made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import ClassVar

import torch

from ..storage.dtypes import FP8_MAX
from .codecs import E2M1, INT4, Codec
from .schemes import Granularity, PerBlock, PerTensor, grid_shape, matrix_shape

__all__ = [
    "quantize",
    "fp8_max",
    "NonFiniteError",
    "Packed",
    "PackedScheme",
    "NVFP4",
    "MXFP4",
    "Int4",
    "e2m1_codes",
    "pack_nibbles",
    "unpack_nibbles",
]


# Rows are processed this many elements at a time, so no float32 copy of a whole tensor (and no
# temporary of its size) is ever made.
_BAND_ELEMENTS = 1 << 20
# Encoding 4-bit codes holds a few temporaries per element (the band, its sign, its bucket).
_PACKED_BAND_ELEMENTS = 1 << 19


class NonFiniteError(ValueError):
    """The tensor to quantize holds NaN or an infinity."""


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an FP8 dtype."""
    try:
        return FP8_MAX[dtype]
    except KeyError:
        raise ValueError(f"{dtype} is not an FP8 weight dtype; use one of {list(FP8_MAX)}") from None


def _bands(w2: torch.Tensor, step: int, name: str, every: int | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Row bands ``[r0, r1)`` of the ``[rows, cols]`` matrix ``w2`` as float32 copies (worked on in
    place: never the input), checked finite; with ``every`` a band never crosses a multiple of it."""
    rows = w2.shape[0]
    r0 = 0
    while r0 < rows:
        r1 = min(r0 + step, rows)
        if every is not None:
            r1 = min(r1, (r0 // every + 1) * every)
        x = w2[r0:r1].to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteError(f"cannot quantize {name!r}: it holds NaN or an infinity")
        yield r0, r1, x
        r0 = r1


def _block_amax(w2: torch.Tensor, block: tuple[int, int], name: str) -> torch.Tensor:
    """float32 ``[ceil(rows / b0), ceil(cols / b1)]``: the largest ``|w|`` of each block, band by band
    (a block row taller than a band accumulates)."""
    rows, cols = w2.shape
    b0, b1 = block
    gr, gc = grid_shape(rows, cols, block)
    amax = torch.zeros(gr, gc, dtype=torch.float32)
    full = cols // b1
    for r0, _r1, x in _bands(w2, max(_BAND_ELEMENTS // max(cols, 1), 1), name, every=b0):
        x.abs_()
        row = amax[r0 // b0]
        if full:
            torch.maximum(row[:full], x[:, : full * b1].unflatten(1, (full, b1)).amax(dim=(0, 2)), out=row[:full])
        if full * b1 < cols:  # a partial last block column
            torch.maximum(row[full:], x[:, full * b1 :].amax(), out=row[full:])
    return amax


def _block_minmax(w2: torch.Tensor, group: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``[rows, cols / group]`` each: the smallest and largest ``w`` of each group of a row."""
    rows, cols = w2.shape
    lo = torch.empty(rows, cols // group, dtype=torch.float32)
    hi = torch.empty_like(lo)
    for r0, r1, x in _bands(w2, max(_BAND_ELEMENTS // max(cols, 1), 1), name):
        g = x.view(r1 - r0, cols // group, group)
        torch.amin(g, dim=2, out=lo[r0:r1])
        torch.amax(g, dim=2, out=hi[r0:r1])
    return lo, hi


def quantize(
    w: torch.Tensor,
    granularity: Granularity = PerTensor(),
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    *,
    ue8m0: bool = False,
    scale: torch.Tensor | None = None,
    name: str = "tensor",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` for ``w``.

    Args:
        w: any floating tensor (CPU).
        granularity: ``PerTensor()`` (scale shape ``()``), ``PerChannel()`` (``[rows, 1]``) or
            ``PerBlock((b0, b1))`` (``[ceil(rows/b0), ceil(cols/b1)]``), over ``w``'s
            ``[rows, cols]`` view.
        fp8_dtype: the codes' dtype.
        ue8m0: store power-of-two scales as biased exponents (``torch.uint8``), as MX does.
        scale: use these scales (the granularity's shape; float multipliers, or uint8 ue8m0
            exponents) instead of ``amax / fp8_max``: re-quantizing a dequantized tensor with its
            original scales gives back its original codes.
        name: used in error messages.

    Returns:
        codes of ``fp8_dtype`` and ``w.shape``; float32 scales (or uint8 exponents).

    Raises:
        NonFiniteError: ``w`` holds NaN or an infinity (naming ``name``).
    """
    fmax = fp8_max(fp8_dtype)
    if granularity.stacked and w.dim() >= 3:
        # A stack of matrices (fused experts) is tiled matrix by matrix.
        mats = w.detach().reshape(-1, *w.shape[-2:])
        given_mats = None if scale is None else scale.reshape(mats.shape[0], -1)
        parts = [
            quantize(m, granularity, fp8_dtype, ue8m0=ue8m0, name=name,
                     scale=None if given_mats is None else given_mats[i])
            for i, m in enumerate(mats)
        ]
        return (
            torch.stack([c for c, _ in parts]).reshape(w.shape),
            torch.stack([s for _, s in parts]).reshape(granularity.scale_shape(w.shape)),
        )
    rows, cols = matrix_shape(w.shape)
    block = granularity.block_size(w.shape)
    b0, b1 = block
    expected = tuple(granularity.scale_shape(w.shape))
    gr, gc = grid_shape(rows, cols, block)
    given = None
    if scale is not None and w.numel():
        if scale.numel() != gr * gc:
            raise ValueError(f"scale for {name!r} has shape {list(scale.shape)}; {granularity} expects {list(expected)}")
        given = scale.detach().reshape(gr, gc)
        # uint8 scales are ue8m0 exponents; anything else is a multiplier.
        given = torch.exp2(given.to(torch.float32) - 127) if given.dtype == torch.uint8 else given.to(torch.float32)
    if w.numel() == 0:
        out = torch.ones(expected, dtype=torch.float32)
        return torch.empty(w.shape, dtype=fp8_dtype), (out.to(torch.uint8) * 127 if ue8m0 else out)
    w2 = w.detach().reshape(rows, cols)
    if given is not None:
        scale = given
    else:
        scale = _block_amax(w2, block, name) / fmax
        if ue8m0:
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        scale = torch.where((scale > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
    # Pass 2: codes = clamp(w / scale), the scale broadcast over each block, never expanded.
    codes = torch.empty(rows, cols, dtype=fp8_dtype)
    full = cols // b1
    for r0, r1, x in _bands(w2, max(_BAND_ELEMENTS // cols, 1), name):
        s_rows = scale.index_select(0, torch.arange(r0, r1) // b0)  # [band rows, gc]
        if full:
            x[:, : full * b1].unflatten(1, (full, b1)).div_(s_rows[:, :full, None])
        if full * b1 < cols:
            x[:, full * b1 :].div_(s_rows[:, full : full + 1])
        codes[r0:r1] = x.clamp_(-fmax, fmax)
    codes = codes.reshape(w.shape)
    scale = scale.reshape(expected)
    if ue8m0:
        scale = (torch.log2(scale).round() + 127).to(torch.uint8)
    return codes, scale


# ---------------------------------------------------------------------------------------------
# 4-bit schemes

#: Where an e2m1 magnitude (0, 0.5, 1, 1.5, 2, 3, 4, 6) rounds to the next one up: the midpoints,
#: those whose ties round up (to 1, 2 and 4, the neighbours with an even mantissa) moved to the
#: float32 just below, so that one ``bucketize`` (counting the bounds strictly below a value)
#: rounds to nearest, ties to even.
_E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
_E2M1_BOUNDS = torch.where(
    torch.tensor([False, True, False, True, False, True, False]),
    torch.nextafter(_E2M1_BOUNDS, torch.zeros(())),
    _E2M1_BOUNDS,
)
#: float32 ``6 * 448``: the largest e2m1 value times the largest e4m3 one.
_NV_RANGE = 6.0 * 448.0


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """uint8 e2m1 codes (0-15) of float32 ``x``, rounded to the nearest e2m1 value, ties to the one
    with an even mantissa, magnitudes above 6 saturating to 6. The sign bit (8) is ``x``'s sign
    bit, so ``-0.0`` and a negative value that rounds to zero are code 8 (read as ``-0.0``), as
    compressed-tensors writes them. ``x`` is overwritten."""
    sign = torch.signbit(x).view(torch.uint8) << 3
    magnitude = torch.bucketize(x.abs_(), _E2M1_BOUNDS, out_int32=True)
    return sign.bitwise_or_(magnitude.to(torch.uint8))


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 2k]`` 4-bit codes -> ``[..., k]`` bytes, element ``2i`` in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., k]`` -> ``[..., 2k]`` 4-bit codes: the inverse of the packing every 4-bit
    scheme here writes."""
    p = packed.view(torch.uint8)
    return torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)


@dataclasses.dataclass(frozen=True)
class Packed:
    """One weight quantized to 4-bit codes.

    Attributes:
        codes: uint8, ``w.shape`` with the last dim halved: two codes a byte, element ``2k`` of a
            row in the low nibble of byte ``k``.
        scale: one per group, shape ``scheme.granularity.scale_shape(w.shape)``, in the scheme's
            ``scale_dtype``.
        global_scale: the one-value float32 second scale (0-d) of NVFP4, else ``None``.
        zero_point: int8, the scale's shape: an asymmetric int4 weight's zero points (-8..7),
            else ``None``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None


class PackedScheme:
    """A 4-bit scheme: groups of ``group`` consecutive elements of a row share one scale, and each
    element is a 4-bit code of ``codec``. Subclasses say how the scales follow from each group's
    ``amax`` (and the weight's), what ``w`` is divided by, and how a quotient becomes a code.

    Element ``[i, j]`` reads back as ``(codec value of its code - zero point) * divisor of its
    group`` (float32; no zero point but asymmetric int4's); each subclass documents its rule and
    the error it guarantees.
    """

    name: ClassVar[str] = ""
    codec: ClassVar[Codec]
    scale_dtype: ClassVar[torch.dtype]
    group: int

    @property
    def granularity(self) -> PerBlock:
        """One scale per ``group`` consecutive elements of a row."""
        return PerBlock((1, self.group))

    def check_shape(self, shape: tuple[int, ...], name: str) -> None:
        """Refuse a weight this scheme cannot store as its producers do.

        Raises:
            ValueError: fewer than 2 dims, or a last dim that is 0 or not a multiple of the group
                (every producer refuses those, and readers size the weight from the packed bytes).
        """
        if len(shape) < 2 or shape[-1] == 0 or shape[-1] % self.group:
            raise ValueError(
                f"cannot quantize {name!r} of shape {list(shape)} to {self.name}: it needs two or more dims and a "
                f"last dim that is a non-zero multiple of {self.group}; leave it unquantized (exclude=...)"
            )

    def quantize(
        self,
        w: torch.Tensor,
        *,
        scale: torch.Tensor | None = None,
        global_scale: torch.Tensor | None = None,
        zero_point: torch.Tensor | None = None,
        name: str = "tensor",
    ) -> Packed:
        """Quantize ``w`` (any floating dtype, CPU, two or more dims, last dim a multiple of ``group``).

        Args:
            scale, global_scale, zero_point: use these (as a :class:`Packed` holds them) instead of
                computing them from ``w``: re-quantizing a dequantized weight with its own scales
                gives back its codes, byte for byte.
            name: used in error messages.

        Raises:
            NonFiniteError: ``w`` holds NaN or an infinity.
            ValueError: a shape the scheme cannot store, or scales of the wrong size.
        """
        shape = tuple(w.shape)
        self.check_shape(shape, name)
        rows, cols = matrix_shape(shape)
        gc = cols // self.group
        w2 = w.detach().reshape(rows, cols)
        zero = None
        if scale is None:
            stored, glob, zero = self._from_weight(w2, name)
        else:
            stored, glob = self._given(scale, global_scale, rows, gc, name)
            zero = self._given_zero_point(zero_point, rows, gc, name)
        divisor = self._divisor(stored, glob)
        codes = torch.empty(rows, cols // 2, dtype=torch.uint8)
        for r0, r1, x in _bands(w2, max(_PACKED_BAND_ELEMENTS // cols, 1), name):
            groups = x.view(r1 - r0, gc, self.group).div_(divisor[r0:r1, :, None])
            if zero is not None:
                groups.add_(zero[r0:r1, :, None])
            codes[r0:r1] = pack_nibbles(self._encode(x))
        scale_shape = self.granularity.scale_shape(shape)
        return Packed(
            codes.reshape(*shape[:-1], cols // 2),
            stored.reshape(scale_shape),
            glob,
            None if zero is None else zero.to(torch.int8).reshape(scale_shape),
        )

    def _from_weight(self, w2: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(stored scales ``[rows, groups]``, global scale, float32 zero points) from the weight."""
        return (*self._scales(_block_amax(w2, (1, self.group), name)), None)

    def _given(
        self, scale: torch.Tensor, global_scale: torch.Tensor | None, rows: int, gc: int, name: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if scale.numel() != rows * gc:
            raise ValueError(f"scale for {name!r} has {scale.numel()} values; {self.name} needs {rows} x {gc}")
        return scale.detach().reshape(rows, gc).to(self.scale_dtype), None

    def _given_zero_point(self, zero_point: torch.Tensor | None, rows: int, gc: int, name: str) -> torch.Tensor | None:
        if zero_point is not None:
            raise ValueError(f"{self.name} is symmetric: it has no zero point (given for {name!r})")
        return None

    def _scales(self, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(stored scales ``[rows, groups]``, global scale) from each group's ``amax``."""
        raise NotImplementedError

    def _divisor(self, stored: torch.Tensor, glob: torch.Tensor | None) -> torch.Tensor:
        """float32 ``[rows, groups]``: what each group's elements are divided by (and what a code's
        value is multiplied by when read)."""
        raise NotImplementedError

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 codes of the quotients ``x`` (float32, overwritten)."""
        raise NotImplementedError


def _e4m3_scale(raw: torch.Tensor) -> torch.Tensor:
    """``raw`` (float32, ``0 <= raw <= 448``) as e4m3: the nearest value, as producers round it,
    except where that is below 0.8 ``raw`` (only among the subnormals, for a group whose amax is
    below about 1e-5 of the weight's): then the next value up, so that no element's quotient
    passes 7.5 (the error bound holds there too) and no scale is 0. A group of zeros gets 1.0."""
    s = raw.to(torch.float8_e4m3fn)
    low = s.to(torch.float32) < raw * 0.8
    s = (s.view(torch.uint8) + low.to(torch.uint8)).view(torch.float8_e4m3fn)
    return torch.where(raw > 0, s, torch.ones_like(s))


@dataclasses.dataclass(frozen=True)
class NVFP4(PackedScheme):
    """NVFP4: e2m1 codes, one e4m3 scale per 16 elements of a row, and one float32 global scale.

    ``divide`` picks the convention: ``False`` is ModelOpt's (``weight_scale_2 = amax / (6 * 448)``
    multiplies: element = ``v * s * scale_2``), ``True`` compressed-tensors'
    (``weight_global_scale = 6 * 448 / amax`` divides: element = ``v * s / global``). ``amax`` is the
    weight's largest ``|w|``; a zero (or, for the divisor, an overflowing) global scale is 1.0.

    Group scale: ``e4m3(amax_group / (6 * scale_2))`` (ModelOpt) or ``e4m3(global * amax_group / 6)``
    (compressed-tensors), computed in float32 in the producers' order, rounded to the nearest e4m3
    value (see ``_e4m3_scale`` for the one exception), a group of zeros getting 1.0. Codes:
    ``w / (s * scale_2)`` or ``w / (s / global)`` in float32, rounded to the nearest e2m1 value,
    ties to even, saturating at ±6.

    Error bound, every element: ``|w - ŵ| <= max(|w|, d) / 4`` where ``d`` is its group's divisor
    (``s * scale_2`` or ``s / global``): a relative error of at most 1/4 (the e2m1 grid's half
    step at 2, 4 and 6, and the saturation above 6), or a quarter of the divisor near zero.
    """

    divide: bool = True
    group: int = 16
    name: ClassVar[str] = "nvfp4"
    codec: ClassVar[Codec] = E2M1
    scale_dtype: ClassVar[torch.dtype] = torch.float8_e4m3fn

    def __post_init__(self) -> None:
        if self.group != 16:
            raise ValueError(f"NVFP4 groups are 16 elements (every producer and reader), not {self.group}")

    def _scales(self, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        amax_t = amax.max() if amax.numel() else torch.tensor(0.0)
        if self.divide:
            # compressed-tensors' generate_gparam and calculate_qparams
            glob = _NV_RANGE / amax_t.clamp(min=torch.finfo(torch.float32).tiny)
            glob = torch.where(torch.isfinite(glob), glob, torch.ones_like(glob))
            raw = glob * (amax / 6.0)
        else:
            # ModelOpt's NVFP4QTensor.get_weights_scaling_factor(_2)
            glob = amax_t / _NV_RANGE
            glob = torch.where(glob > 0, glob, torch.ones_like(glob))
            raw = amax / (6.0 * glob)
        return _e4m3_scale(raw.clamp(max=448.0)), glob.to(torch.float32).reshape(())

    def _given(self, scale, global_scale, rows, gc, name):
        stored, _ = super()._given(scale, global_scale, rows, gc, name)
        if global_scale is None or global_scale.numel() != 1:
            raise ValueError(f"NVFP4 scales for {name!r} need the one-value global scale too")
        return stored, global_scale.detach().to(torch.float32).reshape(())

    def _divisor(self, stored: torch.Tensor, glob: torch.Tensor | None) -> torch.Tensor:
        assert glob is not None
        s = stored.to(torch.float32)
        return s / glob if self.divide else s * glob

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return e2m1_codes(x)


@dataclasses.dataclass(frozen=True)
class MXFP4(PackedScheme):
    """MXFP4 (OCP MX): e2m1 codes and one power-of-two scale per 32 elements of a row, stored as
    its biased exponent byte (ue8m0, ``2**(b - 127)``).

    Scale: the smallest power of two ``>= amax_group / 6`` (float32 quotient), as the triton kernels
    that wrote gpt-oss compute it (``downcast_to_mxfp``, rounding mode ROUND_UP), clamped to
    ``2**-127 .. 2**127``; a group of zeros gets 1.0 (byte 127). So no quotient passes 6 and
    nothing saturates. (compressed-tensors' calibration picks ``2**(floor(log2 amax') - 2)``,
    ``amax'`` rounded up at 1.75: a scale up to 2x smaller that saturates quotients in (6, 7);
    both read back the same way.) Codes: ``w / 2**(b - 127)``, rounded to the nearest e2m1 value,
    ties to even (the triton kernels round ties away from zero; only exact ties differ).

    Error bound, every element: ``|w - ŵ| <= max(|w|, d) / 4`` with ``d = 2**(b - 127)``.
    """

    group: int = 32
    name: ClassVar[str] = "mxfp4"
    codec: ClassVar[Codec] = E2M1
    scale_dtype: ClassVar[torch.dtype] = torch.uint8

    def __post_init__(self) -> None:
        if self.group != 32:
            raise ValueError(f"MXFP4 blocks are 32 elements (the OCP MX block), not {self.group}")

    def _scales(self, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        v = amax / 6.0
        mantissa, exp = torch.frexp(v)  # v = mantissa * 2**exp, mantissa in [0.5, 1)
        exp = torch.where(mantissa == 0.5, exp - 1, exp)  # ceil(log2 v), exactly
        byte = (exp.clamp(-127, 127) + 127).to(torch.uint8)
        return torch.where(v > 0, byte, torch.full_like(byte, 127)), None

    def _divisor(self, stored: torch.Tensor, glob: torch.Tensor | None) -> torch.Tensor:
        return torch.exp2(stored.to(torch.float32) - 127)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return e2m1_codes(x)


def _float32_at_least(exact: torch.Tensor) -> torch.Tensor:
    """float64 ``exact`` as the smallest float32 ``>=`` it; 0 (a group with no range) as 1.0."""
    s = exact.to(torch.float32)
    s = torch.where(s.to(torch.float64) < exact, torch.nextafter(s, torch.tensor(float("inf"))), s)
    return torch.where(s > 0, s, torch.ones_like(s))


@dataclasses.dataclass(frozen=True)
class Int4(PackedScheme):
    """int4 groups (compressed-tensors ``pack-quantized``): one float32 scale per ``group``
    elements of a row, codes ``q`` in -8..7 stored as ``q + 8``; asymmetric, also an int8 zero
    point ``z`` in -8..7 per group, and element = ``(q - z) * s``.

    Symmetric scale: ``amax_group / 7.5`` (compressed-tensors' rule, ``amax / ((qmax - qmin) / 2)``),
    rounded *up* to float32, so that no quotient passes 7.5. Asymmetric (compressed-tensors' rule
    too): with ``lo = min(min_group, 0)`` and ``hi = max(max_group, 0)``, ``s = (hi - lo) / 15``
    rounded up to float32 and ``z = round(clamp(-8 - lo / s, -8, 7))``. A group with no range gets
    scale 1.0. Codes: ``clamp(round(w / s + z), -8, 7)``, ties to even.

    Error bound, every element: ``|w - ŵ| <= s / 2`` (``+amax`` is 7.5 steps: it rounds to 8 and
    saturates to 7, half a step away like every other element; asymmetric, the group's ends land
    within half a step of -8 and 7 for the same reason).
    """

    group: int = 128
    symmetric: bool = True
    name: ClassVar[str] = "int4"
    codec: ClassVar[Codec] = INT4
    scale_dtype: ClassVar[torch.dtype] = torch.float32

    def __post_init__(self) -> None:
        if not isinstance(self.group, int) or isinstance(self.group, bool) or self.group <= 0 or self.group % 2:
            raise ValueError(f"int4 group size must be a positive even integer, got {self.group!r}")

    def check_shape(self, shape: tuple[int, ...], name: str) -> None:
        super().check_shape(shape, name)
        if len(shape) != 2 or shape[-1] % 8:
            raise ValueError(
                f"cannot quantize {name!r} of shape {list(shape)} to int4: compressed-tensors packs 2-D weights "
                "whose rows are whole int32 words (a multiple of 8 columns); leave it unquantized (exclude=...)"
            )

    def _from_weight(self, w2: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if self.symmetric:
            return super()._from_weight(w2, name)
        lo, hi = _block_minmax(w2, self.group, name)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # 0 is always representable
        s = _float32_at_least((hi.to(torch.float64) - lo.to(torch.float64)) / 15)
        return s, None, (-8 - lo / s).clamp_(-8, 7).round_()

    def _given_zero_point(self, zero_point: torch.Tensor | None, rows: int, gc: int, name: str) -> torch.Tensor | None:
        if self.symmetric:
            return super()._given_zero_point(zero_point, rows, gc, name)
        if zero_point is None or zero_point.numel() != rows * gc:
            raise ValueError(f"asymmetric int4 for {name!r} needs a zero point per scale ({rows} x {gc})")
        return zero_point.detach().reshape(rows, gc).to(torch.float32)

    def _scales(self, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _float32_at_least(amax.to(torch.float64) / 7.5), None

    def _divisor(self, stored: torch.Tensor, glob: torch.Tensor | None) -> torch.Tensor:
        return stored.to(torch.float32)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.round_().clamp_(-8, 7).add_(8).to(torch.uint8)
