"""One stored tensor: read its bytes and dequantize them into a destination, chunk by chunk.

This is the whole hot path. A destination that is a contiguous CPU tensor of the output dtype
is written in place: pass-through tensors are read straight into it, FP8 tensors are read a
chunk of codes at a time and dequantized into it. Any other destination (another dtype or
device) goes through one chunk-sized staging buffer. Nothing of the tensor's size is ever
allocated besides the destination.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import torch

from ._dequant import GridKernel, PerTensorKernel, Workspace
from ._header import TensorEntry
from ._parallel import run_split
from ._reader import ShardFile
from .errors import InvalidScaleError, UnsupportedDtypeError
from .schemes import Granularity, PerBlock, PerTensor, grid_shape, matrix_shape

__all__ = ["ScaleRef", "TensorSource", "DEFAULT_CHUNK_ELEMENTS", "SCALE_DTYPES"]

# 2M elements per step and worker: 2 MiB of codes and 4 MiB of pair indices for a per-tensor scale;
# a scale grid works on 1M at a time (1 + 4 + 4 MiB of codes, indices and float32 products).
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

    __slots__ = ("key", "shard", "entry", "scale", "dtype", "device", "chunk", "threads")

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
        threads: int = 1,
    ):
        self.key = key
        self.shard = shard
        self.entry = entry
        self.scale = scale
        self.dtype = dtype if scale is not None else entry.dtype.torch
        self.device = device
        self.chunk = max(int(chunk), 1)
        self.threads = max(int(threads), 1)

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
        if dst.device.type == "cuda":
            from ._cuda import read_into_cuda

            read_into_cuda(self, dst)
            return
        flat = dst.view(-1)
        e = self.entry
        self.shard.will_need(e.offset, e.nbytes)
        plan = self.plan()
        kernel = self.kernel(torch.device("cpu"))
        direct = dst.device.type == "cpu" and dst.dtype == self.dtype

        def work_on(chunks: Sequence[Chunk]) -> None:
            work = Workspace()
            for a, b, rows, c0 in chunks:
                out = flat[a:b] if direct else work.get(b - a, self.dtype)
                if kernel is None:
                    self.shard.read_into(out, e.offset + a * e.dtype.itemsize, e.name)
                else:
                    codes = work.get(b - a, torch.uint8)
                    self.shard.read_into(codes, e.offset + a, e.name)
                    kernel(codes, out, rows, c0, work)
                if not direct:
                    flat[a:b].copy_(out)

        run_split(plan.chunks, self.threads, work_on)

    def plan(self) -> "Plan":
        """The chunks to process: flat ``[a, b)`` ranges, with their rectangle for a scale grid."""
        e = self.entry
        if self.scale is None or isinstance(self.scale.granularity, PerTensor):
            chunks = [(a, min(a + self.chunk, self.numel), None, 0) for a in range(0, self.numel, self.chunk)]
            return Plan(chunks, grid=False)
        rows, cols = matrix_shape(e.shape)
        block = self.scale.granularity.block_size(e.shape)
        # A scale grid needs float32 products besides the codes and indices: half the chunk keeps
        # each worker's buffers near those of the per-tensor path.
        budget = max(self.chunk // 2, 1)
        chunks = [
            (r0 * cols + c0, (r1 - 1) * cols + c1, (r0, r1), c0)
            for r0, r1, c0, c1 in _rectangles(rows, cols, block[1], budget)
        ]
        return Plan(chunks, grid=True)

    def kernel(self, device: torch.device) -> "Kernel | None":
        """``kernel(codes, out, rows, col_start, work)`` dequantizing one chunk on ``device``, or
        ``None`` for a tensor that is not FP8. Reads the scale."""
        if self.scale is None:
            return None
        scale = read_scale(self.scale, self.key).to(device)
        e = self.entry
        fp8 = e.dtype.torch
        g = self.scale.granularity
        if isinstance(g, PerTensor):
            k = PerTensorKernel(fp8, scale, self.dtype, self.numel, device=device)
            return lambda codes, out, rows, c0, work: k(codes, out, work)
        rows, cols = matrix_shape(e.shape)
        block = g.block_size(e.shape)
        period = g.period(e.shape) if isinstance(g, PerBlock) else rows
        grid = GridKernel(fp8, scale.reshape(-1, grid_shape(1, cols, block)[1]), block, period, device=device)
        return lambda codes, out, rows, c0, work: grid(codes, out, rows, c0, work)


Kernel = Callable[[torch.Tensor, torch.Tensor, "tuple[int, int] | None", int, Workspace], None]
#: (flat start, flat stop, rows of the rectangle for a scale grid, its first column)
Chunk = tuple[int, int, "tuple[int, int] | None", int]


@dataclasses.dataclass(frozen=True)
class Plan:
    chunks: list[Chunk]
    grid: bool

    @property
    def largest(self) -> int:
        return max((b - a for a, b, _, _ in self.chunks), default=0)


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
