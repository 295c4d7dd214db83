"""Dequantization kernels: FP8 codes of one chunk -> the target dtype, bit-exact.

The reference is ``(w.to(float32) * s.to(float32)).to(dtype)``. Its result depends only on the
8-bit code and the scale, so with one scale per chunk we tabulate the reference over all 256
codes and look codes up; with a scale grid we look up the exact float32 of each code, multiply by
the expanded scale in float32 and round once. Both are the reference formula, evaluated in a
different order of elements. torch's CPU fp8 conversion is ~20x below memory bandwidth; table
lookups through ``index_select`` are not, and the compiled lookups of ``jit`` run the same
tables faster than a memcpy of the output.

Every kernel is called the same way, ``kernel(codes, out, rect, work, final)`` (``Kernel``), and
runs on the ``Backend`` it was given: the process's choice, made once by ``choose_backend``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import threading
from typing import Protocol

import torch

from ..formats.codecs import Codec, fp8_codec
from . import jit as _jit
from .plan import Rect, code_span

__all__ = ["Backend", "TORCH", "choose_backend", "backend_for", "Kernel", "PerTensorKernel", "GridKernel", "GroupKernel", "Workspace"]

# Below this many elements building the 65,536-entry pair table costs more than it saves.
_PAIR_TABLE_MIN_ELEMENTS = 1 << 17

# A compiled grid kernel builds one 256-entry table per scale it meets (~200 ns); below this many
# elements per table (a scale block cut small by the rectangle, MX's 1 x 32) the torch kernel is
# as fast or faster. Measured on 2048 x 4096, one thread, GB/s compiled / torch: 32 elements per
# table 0.3 / 3.4, 128: 1.0 / 3.4, 256: 1.9 / 3.4, 512: 3.3 / 3.5; 16384 (128 x 128): 13 / 3.
_JIT_MIN_ELEMENTS_PER_TABLE = 1024

# Non-temporal stores pay off once a chunk's output is well beyond what the caches keep for it
# (1 MiB of bf16); for less, normal stores leave it in cache for whatever reads it next.
_STREAM_MIN_ELEMENTS = 1 << 19


class Workspace:
    """Reusable buffers for one worker, one per job, grown on demand: each holds one chunk at
    most, so a worker's memory is bounded by the chunk size whatever the tensor size. Two
    buffers of different names never share memory; asking again for a buffer of the same name
    reuses it (its previous contents are gone)."""

    def __init__(self, device: torch.device = torch.device("cpu")):
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def _get(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._buffers[name] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n]

    def codes(self, n: int) -> torch.Tensor:
        """``n`` bytes: a chunk's FP8 codes as read from the file."""
        return self._get("codes", n, torch.uint8)

    def indices(self, n: int) -> torch.Tensor:
        """``n`` int32 lookup indices (the torch kernels' ``index_select``)."""
        return self._get("indices", n, torch.int32)

    def products(self, n: int) -> torch.Tensor:
        """``n`` float32 values before rounding (the torch grid kernel's code values x scales)."""
        return self._get("products", n, torch.float32)

    def tables(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of lookup tables (the compiled grid kernel's, one block per scale column)."""
        return self._get("tables", nbytes, torch.uint8)

    def staging(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """``n`` results of ``dtype``, for a destination that cannot be written in place."""
        return self._get("staging", n * dtype.itemsize, torch.uint8).view(dtype)


@dataclasses.dataclass(frozen=True)
class Backend:
    """The kernels that dequantize on the CPU: compiled ones (``compiled``, a ``jit.JitKernels``
    named by its ``variant``: ``vbmi``, ``neon``, ``portable``...) or the pure-torch ones."""

    name: str
    compiled: _jit.JitKernels | None = None


#: The pure-torch kernels: any device, any dtype, always available.
TORCH = Backend("torch")


def choose_backend() -> Backend:
    """The CPU backend of this process: the best compiled kernels this CPU runs, else torch's.
    ``LAZYFP8_JIT`` decides (``0``: torch; ``scalar``: the portable compiled kernels; ``neon``:
    the NEON ones, emulated off AArch64; see ``jit``). The compilation behind it happens once
    per process and setting; the setting is read at each call, so a test may change it."""
    compiled = _jit.kernels()
    return TORCH if compiled is None else Backend(compiled.variant, compiled)


def backend_for(device: torch.device) -> Backend:
    """``choose_backend()`` for the CPU, ``TORCH`` for any other device."""
    return choose_backend() if device.type == "cpu" else TORCH


class Kernel(Protocol):
    """What every kernel is: ``kernel(codes, out, rect, work, final)`` dequantizes the flat,
    row-major FP8 ``codes`` (uint8) of rectangle ``rect`` of the weight's ``[rows, cols]`` view
    into ``out`` (as many elements), with scratch from ``work``. ``final``: ``out`` is the
    destination itself, not a buffer read again right away."""

    def __call__(self, codes: torch.Tensor, out: torch.Tensor, rect: Rect, work: Workspace, final: bool = False) -> None: ...


_local = threading.local()


def _after_fork_in_child() -> None:
    # A child forked while this thread was inside a read (from a signal handler, say) would hand
    # a nested read the buffers the interrupted one still writes into: give the child new ones.
    global _local
    _local = threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def thread_workspace() -> Workspace:
    """This thread's CPU workspace, kept for the thread's life. Reusing it across tensors avoids
    allocating and freeing chunk-sized buffers per tensor, which glibc's per-thread arenas keep
    resident (measured on the 1.1 GiB load benchmark: 146 MiB above the parameters without this,
    32 MiB with it) and which page-faults anew each time. It holds one chunk of each buffer kind
    at most."""
    work = getattr(_local, "work", None)
    if work is None:
        work = _local.work = Workspace()
    return work


def _codec(codes: Codec | torch.dtype) -> Codec:
    return codes if isinstance(codes, Codec) else fp8_codec(codes)


def code_values(codes: Codec | torch.dtype) -> torch.Tensor:
    """The exact float32 value of each code of an 8-bit codec or FP8 dtype (NaN codes give NaN)."""
    return _codec(codes).values()


@functools.cache
def _nan_bf16(codes: Codec | torch.dtype) -> torch.Tensor:
    """What torch's float32 -> bfloat16 conversion writes for each code's value (used for the
    NaN codes, whose payload bits are torch's choice, not IEEE's)."""
    return code_values(codes).to(torch.bfloat16).view(torch.int16)


@functools.cache
def _value_pairs(codes: Codec | torch.dtype) -> torch.Tensor:
    """For each little-endian code pair ``hi * 256 + lo``: the float32 values of ``lo`` and ``hi``
    packed in one int64 (512 KiB, scale-free, built once per codec)."""
    bits = code_values(codes).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return (bits.view(1, 256) | (bits.view(256, 1) << 32)).reshape(-1)


def _u16_pairs_to_index(codes: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Two adjacent codes as one little-endian 16-bit index, widened to int32 into ``idx``."""
    idx.copy_(codes.view(torch.uint16))
    return idx


class PerTensorKernel:
    """One float32 scale for every element: a 256-entry table of the reference results, and for
    large 2-byte outputs a 65,536-entry table over code pairs (one lookup writes two outputs).
    ``backend``'s compiled lookups serve 2- and 4-byte outputs on the CPU."""

    def __init__(
        self,
        codes: Codec | torch.dtype,
        scale: torch.Tensor,
        out_dtype: torch.dtype,
        numel: int,
        *,
        backend: Backend,
        device: torch.device = torch.device("cpu"),
    ):
        _check_backend(backend, device)
        s = scale.reshape(()).to(device=device, dtype=torch.float32)
        self.out_dtype = out_dtype
        self.table = (code_values(codes).to(device) * s).to(out_dtype)
        self.pairs: torch.Tensor | None = None
        self.compiled = backend.compiled if out_dtype.itemsize in (2, 4) else None
        if self.compiled is not None:
            self.compiled_table = self.compiled.table16(self.table) if out_dtype.itemsize == 2 else self.table
        elif (
            device.type == "cpu"
            and out_dtype.itemsize == 2
            and numel >= _PAIR_TABLE_MIN_ELEMENTS
            and sys.byteorder == "little"
        ):
            # Pair index v = hi * 256 + lo (little-endian): row hi, column lo of a 256 x 256 grid.
            bits = self.table.view(torch.int16).to(torch.int32) & 0xFFFF
            self.pairs = (bits.view(1, 256) | (bits.view(256, 1) << 16)).reshape(-1)

    def __call__(self, codes: torch.Tensor, out: torch.Tensor, rect: Rect, work: Workspace, final: bool = False) -> None:
        """``out[i] = reference(codes[i])`` (``rect`` does not matter: one scale)."""
        if self.compiled is not None:
            if out.element_size() == 2:
                stream = final and out.numel() >= _STREAM_MIN_ELEMENTS
                self.compiled.lut16(codes, self.compiled_table, out, stream=stream)
            else:
                self.compiled.lut32(codes, self.compiled_table, out)
            return
        n = codes.numel()
        if self.pairs is not None and n >= 2 and out.data_ptr() % 4 == 0 and codes.data_ptr() % 2 == 0:
            m = n - (n & 1)
            idx = _u16_pairs_to_index(codes[:m], work.indices(m // 2))
            torch.index_select(self.pairs, 0, idx, out=out[:m].view(torch.int32))
            if m == n:
                return
            codes, out = codes[m:], out[m:]
            n = 1
        idx = work.indices(n)
        idx.copy_(codes)
        torch.index_select(self.table, 0, idx, out=out)


def _check_backend(backend: Backend, device: torch.device) -> None:
    if backend.compiled is not None and device.type != "cpu":
        raise ValueError(f"the {backend.name} kernels run on the CPU, not on {device}: pass backend_for(device)")


class GridKernel:
    """A float32 scale grid over the weight's ``[rows, cols]`` view, one scale per ``block``.

    ``period`` rows form one matrix whose tiling starts afresh (a stack of fused experts); the
    grid holds each matrix's ``ceil(period / b0)`` scale rows one after another."""

    def __init__(
        self,
        codes: Codec | torch.dtype,
        scale_grid: torch.Tensor,
        block: tuple[int, int],
        period: int,
        *,
        backend: Backend,
        device: torch.device = torch.device("cpu"),
    ):
        _check_backend(backend, device)
        self.values = code_values(codes).to(device)
        self.pairs = _value_pairs(codes) if device.type == "cpu" and sys.byteorder == "little" else None
        self.scale = scale_grid.to(device=device, dtype=torch.float32).reshape(-1, scale_grid.shape[-1])
        self.block = block
        self.period = period
        self.device = device
        self.compiled = backend.compiled
        if self.compiled is not None:
            self.scale = self.scale.contiguous()
            self.nan = _nan_bf16(codes)

    def __call__(self, codes: torch.Tensor, out: torch.Tensor, rect: Rect, work: Workspace, final: bool = False) -> None:
        """Dequantize rectangle ``rect`` (rows ``r0:r1`` x columns ``c0:c1``), given as flat
        row-major ``codes`` into flat ``out``. The compiled kernels serve bfloat16 outputs whose
        tables each cover enough elements to pay for building them."""
        r0, r1, col_start = rect.r0, rect.r1, rect.c0
        nr = r1 - r0
        n = codes.numel()
        w = rect.c1 - col_start
        b0, b1 = self.block
        if n != nr * w:
            raise ValueError(f"{n} codes for a rectangle of {nr} x {w}")
        if self.compiled is not None and out.dtype == torch.bfloat16 and min(nr, b0) * min(w, b1) >= _JIT_MIN_ELEMENTS_PER_TABLE:
            blocks = (col_start + w - 1) // b1 - col_start // b1 + 1
            tables = work.tables(blocks * self.compiled.table_bytes)
            stream = final and n >= _STREAM_MIN_ELEMENTS
            self.compiled.grid_bf16(
                codes, out, (r0, r1), col_start, self.scale, self.block, self.period, self.values, self.nan, tables, stream
            )
            return
        f32 = work.products(n)
        m = n - (n & 1) if self.pairs is not None and codes.data_ptr() % 2 == 0 and f32.data_ptr() % 8 == 0 else 0
        if m:
            # Two codes per lookup: their exact float32 values side by side.
            idx = _u16_pairs_to_index(codes[:m], work.indices(m // 2))
            torch.index_select(self.pairs, 0, idx, out=f32[:m].view(torch.int64))
        if m < n:
            idx = work.indices(n - m)
            idx.copy_(codes[m:])
            torch.index_select(self.values, 0, idx, out=f32[m:])
        vals = f32.view(nr, w)
        rows = torch.arange(r0, r1, device=self.device)
        per_matrix = -(-self.period // b0)
        s = self.scale.index_select(0, rows // self.period * per_matrix + rows % self.period // b0)
        g = col_start // b1
        # Columns up to the next block boundary, then whole blocks, then a partial last block.
        lead = min(w, (-col_start) % b1)
        if lead:
            vals[:, :lead].mul_(s[:, g : g + 1])
            g += 1
        full = (w - lead) // b1
        if full:
            vals[:, lead : lead + full * b1].unflatten(1, (full, b1)).mul_(s[:, g : g + full, None])
            g += full
        if lead + full * b1 < w:
            vals[:, lead + full * b1 :].mul_(s[:, g : g + 1])
        out.view(nr, w).copy_(vals)


def unpack_codes(codes: torch.Tensor, rect: Rect, bits: int) -> torch.Tensor:
    """The codes of ``rect`` as a ``[rows, cols]`` uint8 tensor, one code an element, from what
    ``TensorSource.read_rect`` read: for 4-bit codes, each row's bytes ``code_span(c0, c1)``
    back to back, two codes a byte, low nibble first (a rectangle starting at an odd column
    starts in a byte's high nibble)."""
    nr, w = rect.r1 - rect.r0, rect.c1 - rect.c0
    if bits == 8:
        return codes[: nr * w].view(nr, w)
    b0, b1 = code_span(rect.c0, rect.c1, bits)
    packed = codes[: nr * (b1 - b0)].view(nr, b1 - b0)
    both = torch.stack((packed & 0xF, packed >> 4), dim=-1).view(nr, -1)
    lead = rect.c0 - b0 * 2
    return both[:, lead : lead + w]


def _finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite: its smallest and largest, as NaN propagates
    through both (one pass, 5x faster than ``isfinite(t).all()``: 3 ms for NVFP4's 4M scales
    of an 8192 x 8192 weight)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


class GroupKernel:
    """Codes of any codec (4-bit ones packed two a byte) against a scale grid, with an optional
    zero point per block and an optional one-value global scale: the formula of
    ``formats.pairing.Quantized``, evaluated in float32 and rounded once to ``out_dtype``.

    Each block's results form a table of ``2**bits`` entries (a 4-bit codec's 16 values times the
    block's scale, minus its zero point first), and every code looks its block's table up: the
    formula, tabulated per block, with the bits of the reference. Tables cover the blocks one
    rectangle touches: for NVFP4's 16-element blocks as many entries as the rectangle's elements.
    With a compiled backend, 4-bit codecs go through ``jit``'s ``group`` kernel, which does the
    same one block at a time (16 float32 results, rounded, then looked up 16 codes per step):
    the same bits, far faster (docs/kernels.md; ``_compiles`` says which weights it serves).
    """

    def __init__(
        self,
        codec: Codec,
        scale_grid: torch.Tensor,
        block: tuple[int, int],
        period: int,
        out_dtype: torch.dtype,
        *,
        zero_point: torch.Tensor | None = None,
        global_scale: torch.Tensor | None = None,
        divide: bool = False,
        backend: Backend,
        device: torch.device = torch.device("cpu"),
    ):
        _check_backend(backend, device)
        self.codec = codec
        self.values = codec.values().to(device)
        scale = scale_grid.to(device=device, dtype=torch.float32).reshape(-1, scale_grid.shape[-1])
        if global_scale is not None:
            # Both conventions combine the two scales first, in float32 (compressed-tensors
            # divides, ModelOpt multiplies), then multiply the code's value by the result.
            g = global_scale.to(device=device, dtype=torch.float32).reshape(())
            scale = scale / g if divide else scale * g
        self.scale = scale.contiguous()
        # Nothing multiplies after the scale any more (ModelOpt's scale_2 multiplies the group
        # scale, like compressed-tensors' global scale divides it, before the code's value).
        self.after: torch.Tensor | None = None
        self.zero = None if zero_point is None else zero_point.to(device=device, dtype=torch.float32).reshape(self.scale.shape).contiguous()
        self.block = block
        self.period = period
        self.out_dtype = out_dtype
        self.device = device
        self.compiled = backend.compiled if self._compiles(backend) else None
        self._after = 1.0 if self.after is None else float(self.after)  # x * 1.0 is x: no global scale

    def _compiles(self, backend: Backend) -> bool:
        """Whether ``backend``'s compiled ``group`` kernel gives this weight the torch kernel's
        bits. It serves 4-bit codecs into bfloat16 or float32; what stays here:

        - 8-bit codecs (``int8``, ``int8-offset``): a 256-entry table per block, for weights
          that are rare (and per channel, where the torch kernel's tables are few);
        - float16 outputs: rounding to float16 in portable IR is long-winded, and LLVM may lower
          a conversion instruction to a library call the JIT cannot link on CPUs without F16C;
        - weights with a NaN result (a scale over a global scale that overflows to inf, times a
          code of 0, or inf/NaN scales given directly): torch writes its own NaN bits, which
          depend on how its conversion was vectorized.
        """
        k = backend.compiled
        if k is None or self.codec.bits != 4 or self.out_dtype not in k.group_dtypes:
            return False
        if self.after is not None and float(self.after) == 0.0:
            return False  # inf * 0 is NaN: a product that overflows, times a global scale of 0
        return all(_finite(t) for t in (self.scale, self.zero, self.after) if t is not None)

    def scale_rows(self, r0: int, r1: int) -> torch.Tensor:
        """The scale-grid row of each of rows ``r0:r1``."""
        rows = torch.arange(r0, r1, device=self.device)
        per_matrix = -(-self.period // self.block[0])
        return rows // self.period * per_matrix + rows % self.period // self.block[0]

    def tables(self, rect: Rect) -> tuple[torch.Tensor, int]:
        """The results of every code in every block ``rect`` touches: ``[rows, blocks, 2**bits]``
        of ``out_dtype``, and the first block's column index."""
        b1 = self.block[1]
        g0, g1 = rect.c0 // b1, (rect.c1 - 1) // b1 + 1
        srows = self.scale_rows(rect.r0, rect.r1)
        s = self.scale.index_select(0, srows)[:, g0:g1, None]
        t = self.values.view(1, 1, -1)
        if self.zero is not None:
            t = t - self.zero.index_select(0, srows)[:, g0:g1, None]
        return (t * s).to(self.out_dtype), g0

    def __call__(self, codes: torch.Tensor, out: torch.Tensor, rect: Rect, work: Workspace, final: bool = False) -> None:
        """Dequantize rectangle ``rect``: ``codes`` as ``TensorSource.read_rect`` reads them (for
        4-bit codecs each row's ``code_span`` bytes), into flat ``out``. The compiled kernel
        serves the cases ``_compiles`` names; the torch kernel the others."""
        nr, w = rect.r1 - rect.r0, rect.c1 - rect.c0
        if out.numel() != nr * w:
            raise ValueError(f"{out.numel()} outputs for a rectangle of {nr} x {w}")
        if self.compiled is not None and out.dtype == self.out_dtype:
            self.compiled.group(
                codes, out, (rect.r0, rect.r1), (rect.c0, rect.c1), self.scale, self.zero,
                self._after, self.block, self.period, self.values,
                work.tables(self.compiled.group_table_bytes),
            )  # fmt: skip
            return
        table, g0 = self.tables(rect)
        blocks, size = table.shape[1], table.shape[2]
        code = unpack_codes(codes, rect, self.codec.bits)
        idx = work.indices(nr * w).view(nr, w)
        cols = torch.arange(rect.c0, rect.c1, device=self.device, dtype=torch.int32) // self.block[1] - g0
        rows = torch.arange(nr, device=self.device, dtype=torch.int32).view(nr, 1) * blocks
        torch.add(rows, cols.view(1, w), out=idx)
        idx.mul_(size).add_(code)
        torch.index_select(table.view(-1), 0, idx.view(-1), out=out.view(-1))
