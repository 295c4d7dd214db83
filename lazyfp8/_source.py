"""One stored tensor: read its bytes and dequantize them into a destination, chunk by chunk.

This is the whole hot path. A destination that is a contiguous CPU tensor of the output dtype
is written in place: pass-through tensors are read straight into it, FP8 tensors are read a
chunk of codes at a time and dequantized into it. Any other destination (another dtype or
device) goes through one chunk-sized staging buffer. Nothing of the tensor's size is ever
allocated besides the destination.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

from ._dequant import GridKernel, PerTensorKernel
from ._header import TensorEntry
from ._reader import ShardFile
from .errors import InvalidScaleError, UnsupportedDtypeError
from .schemes import Granularity, PerBlock, PerTensor, grid_shape, matrix_shape

__all__ = ["ScaleRef", "TensorSource", "DEFAULT_CHUNK_ELEMENTS", "SCALE_DTYPES"]

# 2M elements: 2 MiB of codes, 8 MiB of int32 indices, 8 MiB of float32 for a block scale.
DEFAULT_CHUNK_ELEMENTS = 1 << 21

# Scale dtypes and how a stored scale becomes float32 multipliers.
SCALE_DTYPES = frozenset({"F32", "BF16", "F16", "F64", "U8", "F8_E8M0"})


@dataclasses.dataclass(frozen=True)
class ScaleRef:
    """Where an FP8 weight's scale lives and how it covers the weight."""

    shard: ShardFile
    entry: TensorEntry
    granularity: Granularity


def read_scale(ref: ScaleRef, weight_key: str) -> torch.Tensor:
    """The scale as float32 multipliers, validated (finite and positive)."""
    e = ref.entry
    if e.dtype.code not in SCALE_DTYPES:
        raise UnsupportedDtypeError(
            f"{ref.shard.path}: scale {e.name!r} of {weight_key!r} has dtype {e.dtype.code}; "
            "scales must be F32, BF16, F16, F64, U8 (ue8m0) or F8_E8M0",
            file=ref.shard.path,
            key=e.name,
        )
    raw = torch.empty(e.shape, dtype=e.dtype.torch)
    ref.shard.read_into(raw, e.offset, e.name)
    if e.dtype.code == "U8":  # ue8m0 stored as bytes: the exponent, 2^(b - 127)
        raw = raw.view(torch.float8_e8m0fnu)
    scale = raw.to(torch.float32)
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        value = scale.reshape(-1)[bad.reshape(-1)][0].item()
        raise InvalidScaleError(
            f"{ref.shard.path}: scale {e.name!r} of {weight_key!r} holds {value}; scales must be "
            "finite and positive (the file is damaged or was written wrongly)",
            file=ref.shard.path,
            key=e.name,
        )
    return scale


class TensorSource:
    """A stored tensor as the view exposes it: ``shape``, output ``dtype`` and ``device``.

    FP8 tensors (those with a ``scale``) come out as ``dtype``; others in their stored dtype.
    Holds file positions only, never data.
    """

    __slots__ = ("key", "shard", "entry", "scale", "dtype", "device", "chunk")

    def __init__(
        self,
        key: str,
        shard: ShardFile,
        entry: TensorEntry,
        *,
        scale: ScaleRef | None,
        dtype: torch.dtype,
        device: torch.device,
        chunk: int = DEFAULT_CHUNK_ELEMENTS,
    ):
        self.key = key
        self.shard = shard
        self.entry = entry
        self.scale = scale
        self.dtype = dtype if scale is not None else entry.dtype.torch
        self.device = device
        self.chunk = max(int(chunk), 1)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.entry.shape)

    @property
    def numel(self) -> int:
        return self.entry.numel

    def to_tensor(self) -> torch.Tensor:
        """A new tensor of ``dtype`` on ``device`` holding the (dequantized) values."""
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self.read_into(out)
        return out

    def read_into(self, dst: torch.Tensor) -> None:
        """Write the values into ``dst`` (same shape; any dtype or device), exactly as
        ``dst.copy_(self.to_tensor())`` would, without a temporary of the tensor's size
        unless ``dst`` is not contiguous."""
        if tuple(dst.shape) != self.entry.shape:
            raise ValueError(
                f"{self.key!r} has shape {list(self.entry.shape)}, the destination {list(dst.shape)}"
            )
        if self.numel == 0:
            return
        if not dst.is_contiguous():
            dst.copy_(self.to_tensor())
            return
        flat = dst.view(-1)
        direct = dst.device.type == "cpu" and dst.dtype == self.dtype
        if self.scale is None and direct:
            self.shard.read_into(flat, self.entry.offset, self.entry.name)
            return
        staging = None if direct else torch.empty(min(self.chunk, self.numel), dtype=self.dtype)
        for a, b, fill in self._chunks():
            out = flat[a:b] if staging is None else staging[: b - a]
            fill(out)
            if staging is not None:
                flat[a:b].copy_(out)

    def _chunks(self) -> Iterator[tuple[int, int, object]]:
        """(start, stop, fill) over flat element ranges; ``fill(out)`` writes them into ``out``."""
        e = self.entry
        if self.scale is None:
            isz = e.dtype.itemsize
            for a in range(0, self.numel, self.chunk):
                b = min(a + self.chunk, self.numel)
                yield a, b, lambda out, a=a: self.shard.read_into(out, e.offset + a * isz, e.name)
            return
        scale = read_scale(self.scale, self.key)
        n = min(self.chunk, self.numel)
        codes = torch.empty(n, dtype=torch.uint8)
        scratch = torch.empty(n, dtype=torch.int32)
        fp8 = e.dtype.torch

        def read_codes(a: int, b: int) -> torch.Tensor:
            c = codes[: b - a]
            self.shard.read_into(c, e.offset + a, e.name)
            return c

        if isinstance(self.scale.granularity, PerTensor):
            kernel = PerTensorKernel(fp8, scale, self.dtype, self.numel)
            for a in range(0, self.numel, self.chunk):
                b = min(a + self.chunk, self.numel)
                yield a, b, lambda out, a=a, b=b: kernel(read_codes(a, b), out, scratch)
            return

        rows, cols = matrix_shape(e.shape)
        block = self.scale.granularity.block_size(e.shape)
        g = self.scale.granularity
        period = g.period(e.shape) if isinstance(g, PerBlock) else rows
        grid = GridKernel(fp8, scale.reshape(-1, grid_shape(1, cols, block)[1]), block, period)
        f32 = torch.empty(n, dtype=torch.float32)
        for r0, r1, c0, c1 in _rectangles(rows, cols, block[1], self.chunk):
            a, b = r0 * cols + c0, (r1 - 1) * cols + c1
            yield a, b, lambda out, a=a, b=b, r=(r0, r1), c0=c0: grid(
                read_codes(a, b), out, r, c0, scratch, f32
            )


def _rectangles(rows: int, cols: int, block_cols: int, budget: int) -> Iterator[tuple[int, int, int, int]]:
    """Cover ``[rows, cols]`` row-major with contiguous rectangles of at most ``budget`` elements:
    whole-row bands when a row fits, else single-row segments cut at multiples of the block
    width (or inside one block when a block is wider than the budget)."""
    if cols <= budget:
        step = max(budget // cols, 1)
        for r in range(0, rows, step):
            yield r, min(r + step, rows), 0, cols
        return
    if block_cols <= budget:
        width = (budget // block_cols) * block_cols
        cuts = range(0, cols, width)
    else:
        cuts = sorted({c for k in range(0, cols, block_cols) for c in range(k, min(k + block_cols, cols), budget)})
    cuts = list(cuts) + [cols]
    for r in range(rows):
        for c0, c1 in zip(cuts, cuts[1:]):
            yield r, r + 1, c0, c1
