"""One stored tensor: read its bytes and dequantize them into a destination, chunk by chunk.

This is the whole hot path. A destination that is a contiguous CPU tensor of the output dtype
is written in place: pass-through tensors are read straight into it, FP8 tensors are read a
chunk of codes at a time and dequantized into it. Any other destination (another dtype or
device) goes through one chunk-sized staging buffer. Nothing of the tensor's size is ever
allocated besides the destination.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch

from ..errors import CheckpointError, InvalidScaleError
from ..formats.codecs import Codec
from ..formats.schemes import Granularity, grid_shape, matrix_shape
from ..storage.header import TensorEntry
from ..storage.reader import ShardFile
from .dequant import (
    GridKernel,
    GroupKernel,
    Kernel,
    PerTensorKernel,
    Workspace,
    backend_for,
    thread_workspace,
)
from .parallel import run_split
from .plan import Plan, Rect, code_span, plan_box

__all__ = ["ScaleRef", "TensorSource", "TransposedSource", "DEFAULT_CHUNK_ELEMENTS"]

# 2M elements per step and worker: 2 MiB of codes and 4 MiB of pair indices for a per-tensor scale;
# a scale grid works on 1M at a time (1 + 4 + 4 MiB of codes, indices and float32 products).
DEFAULT_CHUNK_ELEMENTS = 1 << 21



@dataclasses.dataclass(frozen=True)
class ScaleRef:
    """Where a quantized weight's scale lives, how it covers the weight, and what the weight's
    codes mean (the fields of ``formats.pairing.Quantized``, with open files). ``codec`` and
    ``shape`` default to an FP8 weight's: its dtype's codes, its stored shape."""

    shard: ShardFile
    entry: TensorEntry
    granularity: Granularity
    codec: Codec | None = None
    shape: tuple[int, ...] | None = None
    global_scale: tuple[ShardFile, TensorEntry] | None = None
    divide: bool = False
    zero_point: tuple[ShardFile, TensorEntry] | None = None
    declared_shape: tuple[ShardFile, TensorEntry] | None = None

    def keys(self) -> tuple[str, ...]:
        """The on-disk keys read with the weight: its scale, then any global scale, zero point
        and shape tensor."""
        extra = (self.global_scale, self.zero_point, self.declared_shape)
        return (self.entry.name, *(e.name for part in extra if part is not None for e in part[1:]))


def _read_small(shard: ShardFile, e: TensorEntry) -> torch.Tensor:
    raw = torch.empty(e.shape, dtype=e.dtype.torch)
    shard.check(e.name)
    shard.read_into(raw, e.offset, e.name)
    if e.dtype.code == "U8":  # ue8m0 stored as bytes: the exponent, 2^(b - 127)
        raw = raw.view(torch.float8_e8m0fnu)
    return raw.to(torch.float32)


def _validated(scale: torch.Tensor, path: str, name: str, weight_key: str) -> torch.Tensor:
    if scale.numel():
        # One pass for the common case; NaN makes both comparisons false and takes the slow path.
        lo, hi = torch.aminmax(scale)
        if bool(lo > 0) and bool(hi < float("inf")):
            return scale
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        value = scale.reshape(-1)[bad.reshape(-1)][0].item()
        raise InvalidScaleError(
            f"{path}: scale {name!r} of {weight_key!r} holds {value}; scales must be "
            "finite and positive (the file is damaged or was written wrongly)",
            file=path,
            key=name,
        )
    return scale


def read_scale(ref: ScaleRef, weight_key: str) -> torch.Tensor:
    """The scale as float32 multipliers, validated (finite and positive). Its dtype was checked
    against ``_dtypes.SCALE_CODES`` when the scale was paired with its weight."""
    return _validated(_read_small(ref.shard, ref.entry), ref.shard.path, ref.entry.name, weight_key)


def read_global_scale(ref: ScaleRef, weight_key: str) -> torch.Tensor | None:
    """The one-value global scale (float32, validated), or ``None``."""
    if ref.global_scale is None:
        return None
    shard, e = ref.global_scale
    return _validated(_read_small(shard, e), shard.path, e.name, weight_key)


def read_zero_point(ref: ScaleRef, weight_key: str, grid: tuple[int, ...]) -> torch.Tensor | None:
    """The zero point as float32 in the scale's shape, or ``None`` for a symmetric weight.

    Raises:
        CheckpointError: a zero point whose size is not the scale's, or that is not finite."""
    if ref.zero_point is None:
        return None
    shard, e = ref.zero_point
    if e.dtype.code == "I32" and ref.codec is not None and len(e.shape) == 2:
        # compressed-tensors packs zero points like codes, but along the output rows: word
        # [k, g] holds rows k * 32 / bits onwards of block column g, offset like the codes.
        raw = torch.empty(e.shape, dtype=torch.int32)
        shard.check(e.name)
        shard.read_into(raw, e.offset, e.name)
        # (flattened first: a [groups, 1] transpose keeps a stride view(uint8) refuses)
        stream = raw.t().contiguous().reshape(-1).view(torch.uint8).view(raw.shape[1], -1)
        if ref.codec.bits == 4:
            stream = torch.stack((stream & 0xF, stream >> 4), dim=-1).flatten(-2)
        zp = ref.codec.values()[stream.long()][:, : grid[0]].t()
        if zp.shape[1] != grid[1] or zp.shape[0] != grid[0]:
            zp = torch.empty(0)  # refused below
    else:
        zp = _read_small(shard, e)
    if zp.numel() != math.prod(grid) or not bool(torch.isfinite(zp).all()):
        raise CheckpointError(
            f"{shard.path}: zero point {e.name!r} of {weight_key!r} has shape {list(e.shape)}; expected "
            f"{list(grid)} finite values, one per scale",
            file=shard.path,
            key=e.name,
        )
    return zp.reshape(grid)


def check_declared_shape(ref: ScaleRef, weight_key: str, shape: tuple[int, ...]) -> None:
    """A packed weight's stored shape tensor (``weight_shape``) must be the shape its header
    gives (every word's codes unpacked): a row whose length is not a whole number of words is
    refused rather than read with padding as values.

    Raises:
        CheckpointError: naming both shapes."""
    if ref.declared_shape is None:
        return
    shard, e = ref.declared_shape
    raw = torch.empty(e.shape, dtype=e.dtype.torch)
    shard.check(e.name)
    shard.read_into(raw, e.offset, e.name)
    declared = [int(x) for x in raw.reshape(-1).tolist()] if not raw.is_floating_point() else None
    if declared != list(shape):
        raise CheckpointError(
            f"{shard.path}: {e.name!r} says {weight_key!r} has shape {declared if declared is not None else raw.tolist()}; "
            f"its packed codes hold {list(shape)}. lazyfp8 reads packed rows that are whole words of codes "
            f"(in a multiple of {32 // (ref.codec.bits if ref.codec else 8)})",
            file=shard.path,
            key=e.name,
        )


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
    def stored_shape(self) -> torch.Size:
        """The shape of the values as stored: the stored shape, or a packed weight's codes
        unpacked. Boxes, plans and kernels work on it."""
        if self.scale is not None and self.scale.shape is not None:
            return torch.Size(self.scale.shape)
        return torch.Size(self.entry.shape)

    @property
    def shape(self) -> torch.Size:
        """The shape the values are exposed in (``stored_shape``, unless a subclass lays them
        out otherwise)."""
        return self.stored_shape

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits(self) -> int:
        """Bits of one stored element (a code of a packed codec: 4)."""
        if self.scale is not None and self.scale.codec is not None:
            return self.scale.codec.bits
        return self.entry.dtype.itemsize * 8

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored row of the ``[rows, cols]`` view (a packed row may end in padding)."""
        rows = matrix_shape(self.stored_shape)[0]
        return self.entry.nbytes // rows if rows else 0

    def to_tensor(self) -> torch.Tensor:
        """A new tensor of ``dtype`` on ``device`` holding the (dequantized) values."""
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self.read_into(out)
        return out

    def read_into(self, dst: torch.Tensor) -> None:
        """Write the values into ``dst`` (same shape; any dtype or device), exactly as
        ``dst.copy_(self.to_tensor())`` would, without a temporary of the tensor's size
        unless ``dst`` is not contiguous."""
        self.read_box_into(dst, (0,) * len(self.shape), tuple(self.shape))

    def read_box_into(self, dst: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> None:
        """Write the box ``[offsets, offsets + lengths)`` of the values into ``dst`` (of shape
        ``lengths``), reading only the bytes of that box from the file: one rank's shard of a
        distributed parameter.

        Raises:
            ValueError: a box outside the tensor, or a destination of another shape.
        """
        shape = tuple(self.stored_shape)
        offsets, lengths = tuple(int(o) for o in offsets), tuple(int(n) for n in lengths)
        if (
            len(offsets) != len(shape)
            or len(lengths) != len(shape)
            or any(o < 0 or n < 0 or o + n > d for o, n, d in zip(offsets, lengths, shape))
        ):
            raise ValueError(f"box at {list(offsets)} of size {list(lengths)} is outside {self.key!r} of shape {list(shape)}")
        if tuple(dst.shape) != lengths:
            raise ValueError(f"the box of {self.key!r} has shape {list(lengths)}, the destination {list(dst.shape)}")
        if dst.numel() == 0:
            return
        # Grad mode is per thread and the pool's threads have it on: write through a detached
        # alias so a parameter that requires grad is filled like under the caller's no_grad.
        dst = dst.detach()
        if not dst.is_contiguous() and dst.device.type != "cpu":
            tmp = torch.empty(lengths, dtype=self.dtype, device=dst.device)
            self.read_box_into(tmp, offsets, lengths)
            dst.copy_(tmp)
            return
        # Once per tensor read, not per chunk: a file rewritten in place since its header was
        # read is refused before any of its bytes are used.
        self.shard.check(self.entry.name)
        if dst.device.type == "cuda":
            from .cuda import read_into_cuda

            read_into_cuda(self, dst, self.plan(offsets, lengths))
            return
        kernel = self.kernel(torch.device("cpu"))
        if dst.is_contiguous():
            self._read_cpu(dst, offsets, lengths, kernel)
            return
        # A strided destination (a transposed view, a column of a fused parameter) is filled a
        # band of at most one chunk at a time through a buffer, the scale read once.
        buf: torch.Tensor | None = None
        for band, off, ln in _bands(dst, offsets, lengths, self.chunk):
            if band.is_contiguous():
                self._read_cpu(band, off, ln, kernel)
                continue
            n = math.prod(ln)
            if buf is None or buf.numel() < n:
                buf = torch.empty(n, dtype=self.dtype)
            tmp = buf[:n].view(ln)
            self._read_cpu(tmp, off, ln, kernel)
            band.copy_(tmp)

    def _read_cpu(self, dst: torch.Tensor, offsets: tuple[int, ...], lengths: tuple[int, ...], kernel: Kernel | None) -> None:
        """The box into contiguous CPU tensor ``dst`` with ``kernel`` (``None``: stored values)."""
        plan = self.plan(offsets, lengths)
        flat = dst.view(-1)
        direct = dst.dtype == self.dtype
        for start, stop in plan.spans:
            self.shard.will_need(start, stop - start)

        def work_on(chunks: Sequence[Rect]) -> None:
            self.fill_rects(flat, chunks, kernel, thread_workspace(), direct)

        run_split(plan.chunks, self.threads, work_on)

    def fill_rects(
        self, flat: torch.Tensor, rects: Sequence[Rect], kernel: Kernel | None, work: Workspace, direct: bool
    ) -> None:
        """Read each rectangle and dequantize it (``kernel``; ``None``: stored values) into its
        place in ``flat``, the destination box flattened, with ``work``'s buffers; ``direct``:
        ``flat`` has this source's dtype, so results land in it without staging."""
        for rect in rects:
            n = rect.numel
            out = flat[rect.local : rect.local + n] if direct else work.staging(n, self.dtype)
            if kernel is None:
                self.read_rect(out, rect)
            else:
                codes = work.codes(self.code_bytes(rect))
                self.read_rect(codes, rect)
                kernel(codes, out, rect, work, direct)
            if not direct:
                flat[rect.local : rect.local + n].copy_(out)

    def code_bytes(self, rect: Rect) -> int:
        """Bytes ``read_rect`` writes for ``rect``: each row's ``code_span``."""
        first, last = code_span(rect.c0, rect.c1, self.bits)
        return (rect.r1 - rect.r0) * (last - first)

    def read_rect(self, buf: torch.Tensor, rect: Rect) -> None:
        """The stored bytes of ``rect`` (row-major) into contiguous CPU tensor ``buf``: one read
        for whole rows, one per row for a column range. A packed tensor's rows are each row's
        ``code_span``, back to back."""
        e = self.entry
        if self.bits % 8 == 0:
            isz = self.bits // 8
            cols = matrix_shape(self.stored_shape)[1]
            w = rect.c1 - rect.c0
            if w == cols or rect.r1 - rect.r0 == 1:
                self.shard.read_into(buf, e.offset + (rect.r0 * cols + rect.c0) * isz, e.name)
                return
            for i, r in enumerate(range(rect.r0, rect.r1)):
                self.shard.read_into(buf[i * w : (i + 1) * w], e.offset + (r * cols + rect.c0) * isz, e.name)
            return
        raw = buf.view(torch.uint8) if buf.dtype != torch.uint8 else buf
        first, last = code_span(rect.c0, rect.c1, self.bits)
        width, stride = last - first, self.row_bytes
        if width == stride or rect.r1 - rect.r0 == 1:
            self.shard.read_into(raw[: (rect.r1 - rect.r0) * width], e.offset + rect.r0 * stride + first, e.name)
            return
        for i, r in enumerate(range(rect.r0, rect.r1)):
            self.shard.read_into(raw[i * width : (i + 1) * width], e.offset + r * stride + first, e.name)

    def plan(self, offsets: Sequence[int] | None = None, lengths: Sequence[int] | None = None) -> Plan:
        """The rectangles of the ``[rows, cols]`` view that cover the box (default: the whole
        tensor), each at most one chunk, with where each lands in the destination."""
        shape = tuple(self.stored_shape)
        offsets = tuple(offsets) if offsets is not None else (0,) * len(shape)
        lengths = tuple(lengths) if lengths is not None else shape
        grid = self.scale is not None and (self.scale.granularity.grid or self.bits < 8)
        # A scale grid needs float32 products besides the codes and indices: half the chunk keeps
        # each worker's buffers near those of the per-tensor path.
        budget = max(self.chunk // 2, 1) if grid else self.chunk
        return plan_box(
            shape, offsets, lengths, budget, self.entry.offset, self.entry.dtype.itemsize,
            bits=self.bits, row_bytes=self.row_bytes,
        )

    def kernel(self, device: torch.device) -> Kernel | None:
        """The ``dequant.Kernel`` that dequantizes this tensor's chunks on ``device``, on the
        process's backend for that device, or ``None`` for a tensor that is not FP8. Reads the
        scale."""
        ref = self.scale
        if ref is None:
            return None
        scale = read_scale(ref, self.key).to(device)
        shape = tuple(self.stored_shape)
        check_declared_shape(ref, self.key, shape)
        codes = ref.codec if ref.codec is not None else self.entry.dtype.torch
        g = ref.granularity
        backend = backend_for(device)
        rows, cols = matrix_shape(shape)
        block = g.block_size(shape)
        period = g.period(shape)
        grid = scale.reshape(-1, grid_shape(1, cols, block)[1])
        if self.bits == 8 and ref.zero_point is None and ref.global_scale is None:
            if not g.grid:
                return PerTensorKernel(codes, scale, self.dtype, self.numel, backend=backend, device=device)
            return GridKernel(codes, grid, block, period, backend=backend, device=device)
        assert ref.codec is not None  # only a codec's weight has a zero point or a global scale
        return GroupKernel(
            ref.codec, grid, block, period, self.dtype,
            zero_point=read_zero_point(ref, self.key, tuple(grid.shape)),
            global_scale=read_global_scale(ref, self.key),
            divide=ref.divide,
            backend=backend,
            device=device,
        )


def _bands(
    dst: torch.Tensor, offsets: tuple[int, ...], lengths: tuple[int, ...], chunk: int
) -> Iterator[tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]]:
    """``dst`` (the box ``offsets``/``lengths``) cut along its leading dims into sub-boxes of at
    most ``chunk`` elements (or one row of the last dim, if that is longer): ``(part of dst,
    its offsets, its lengths)``."""
    if math.prod(lengths) <= chunk or len(lengths) <= 1:
        yield dst, offsets, lengths
        return
    d = next(i for i, n in enumerate(lengths) if n > 1) if any(n > 1 for n in lengths[:-1]) else len(lengths) - 1
    if d == len(lengths) - 1:
        yield dst, offsets, lengths
        return
    inner = math.prod(lengths[d + 1 :])
    step = max(chunk // max(inner, 1), 1)
    for i in range(0, lengths[d], step):
        k = min(step, lengths[d] - i)
        off = offsets[:d] + (offsets[d] + i,) + offsets[d + 1 :]
        ln = lengths[:d] + (k,) + lengths[d + 1 :]
        yield from _bands(dst.narrow(d, i, k), off, ln, chunk)


class TransposedSource(TensorSource):
    """A stored tensor exposed with its last two dims swapped: gpt-oss's MXFP4 experts, stored
    ``[E, out, in]`` like Linear weights and held by transformers as ``[E, in, out]``."""

    __slots__ = ()

    @property
    def shape(self) -> torch.Size:
        s = super().shape
        return torch.Size((*s[:-2], s[-1], s[-2]))

    def read_box_into(self, dst: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> None:
        def swap(t: Sequence[int]) -> tuple[int, ...]:
            t = tuple(int(x) for x in t)
            return (*t[:-2], t[-1], t[-2]) if len(t) >= 2 else t

        if tuple(dst.shape) != tuple(int(n) for n in lengths):
            raise ValueError(f"the box of {self.key!r} has shape {list(lengths)}, the destination {list(dst.shape)}")
        super().read_box_into(dst.transpose(-1, -2), swap(offsets), swap(lengths))
