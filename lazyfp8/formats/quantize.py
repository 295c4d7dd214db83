"""Quantize a tensor to FP8 with any granularity: the inverse of what the view reads.

``scale = amax / fp8_max`` per group (float32), ``codes = round(clamp(w / scale, ±fp8_max))``.
A group of zeros gets scale 1.0 (finite and non-zero, as readers require). For MX (ue8m0)
scales the scale is the smallest power of two ``>= amax / fp8_max``, stored as its biased
exponent byte.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..storage.dtypes import FP8_MAX
from .schemes import Granularity, PerTensor, grid_shape, matrix_shape

__all__ = ["quantize", "fp8_max", "NonFiniteError"]


# Rows are processed this many elements at a time, so no float32 copy of a whole tensor (and no
# temporary of its size) is ever made.
_BAND_ELEMENTS = 1 << 22


class NonFiniteError(ValueError):
    """The tensor to quantize holds NaN or an infinity."""


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an FP8 dtype."""
    try:
        return FP8_MAX[dtype]
    except KeyError:
        raise ValueError(f"{dtype} is not an FP8 weight dtype; use one of {list(FP8_MAX)}") from None


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
    step = max(_BAND_ELEMENTS // cols, 1)  # rows per band: every temporary is one band at most

    def bands(stop_at_groups: bool) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Row bands ``[r0, r1)`` as float32, checked finite; with ``stop_at_groups`` a band
        never crosses a block-row boundary."""
        r0 = 0
        while r0 < rows:
            r1 = min(r0 + step, rows)
            if stop_at_groups:
                r1 = min(r1, (r0 // b0 + 1) * b0)
            x = w2[r0:r1].to(torch.float32, copy=True)  # worked on in place: never the input
            if not bool(torch.isfinite(x).all()):
                raise NonFiniteError(f"cannot quantize {name!r}: it holds NaN or an infinity")
            yield r0, r1, x
            r0 = r1

    if given is not None:
        scale = given
    else:
        # Pass 1: amax per block, band by band (a block row taller than a band accumulates).
        amax = torch.zeros(gr, gc, dtype=torch.float32)
        pad = gc * b1 - cols
        for r0, r1, x in bands(stop_at_groups=True):
            col_amax = torch.nn.functional.pad(x.abs_(), (0, pad)).view(r1 - r0, gc, b1).amax(dim=(0, 2))
            torch.maximum(amax[r0 // b0], col_amax, out=amax[r0 // b0])
        scale = amax / fmax
        if ue8m0:
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        scale = torch.where((scale > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
    # Pass 2: codes = clamp(w / scale), the scale broadcast over each block, never expanded.
    codes = torch.empty(rows, cols, dtype=fp8_dtype)
    full = cols // b1
    for r0, r1, x in bands(stop_at_groups=False):
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

