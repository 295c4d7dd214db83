"""Dequantization kernels: FP8 codes of one chunk -> the target dtype, bit-exact.

The reference is ``(w.to(float32) * s.to(float32)).to(dtype)``. Its result depends only on the
8-bit code and the scale, so with one scale per chunk we tabulate the reference over all 256
codes and look codes up; with a scale grid we look up the exact float32 of each code, multiply by
the expanded scale in float32 and round once. Both are the reference formula, evaluated in a
different order of elements. torch's CPU fp8 conversion is ~20x below memory bandwidth; table
lookups through ``index_select`` are not, and the compiled lookups of ``_jit`` (when llvmlite is
installed) run the same tables faster than a memcpy of the output.
"""

from __future__ import annotations

import functools
import os
import sys
import threading

import torch

from . import jit as _jit

__all__ = ["PerTensorKernel", "GridKernel", "Workspace"]

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
    """Reusable buffers for one worker, grown on demand: each holds one chunk at most, so a
    worker's memory is bounded by the chunk size whatever the tensor size."""

    def __init__(self, device: torch.device = torch.device("cpu")):
        self.device = device
        self._buffers: dict[tuple[torch.dtype, str], torch.Tensor] = {}

    def get(self, n: int, dtype: torch.dtype, slot: str = "") -> torch.Tensor:
        """A tensor of ``n`` elements of ``dtype`` (contents undefined). Buffers of one dtype
        share memory unless their ``slot`` names differ."""
        buf = self._buffers.get((dtype, slot))
        if buf is None or buf.numel() < n:
            buf = self._buffers[(dtype, slot)] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n]


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


@functools.cache
def _codes(fp8_dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8_dtype)


@functools.cache
def code_values(fp8_dtype: torch.dtype) -> torch.Tensor:
    """The exact float32 value of each of the 256 codes (NaN codes give NaN)."""
    return _codes(fp8_dtype).to(torch.float32)


@functools.cache
def _nan_bf16(fp8_dtype: torch.dtype) -> torch.Tensor:
    """What torch's float32 -> bfloat16 conversion writes for each code's value (used for the
    NaN codes, whose payload bits are torch's choice, not IEEE's)."""
    return code_values(fp8_dtype).to(torch.bfloat16).view(torch.int16)


@functools.cache
def _value_pairs(fp8_dtype: torch.dtype) -> torch.Tensor:
    """For each little-endian code pair ``hi * 256 + lo``: the float32 values of ``lo`` and ``hi``
    packed in one int64 (512 KiB, scale-free, built once per FP8 dtype)."""
    bits = code_values(fp8_dtype).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return (bits.view(1, 256) | (bits.view(256, 1) << 32)).reshape(-1)


def _u16_pairs_to_index(codes: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Two adjacent codes as one little-endian 16-bit index, widened to int32 into ``idx``."""
    idx.copy_(codes.view(torch.uint16))
    return idx


class PerTensorKernel:
    """One float32 scale for every element: a 256-entry table of the reference results, and for
    large 2-byte outputs a 65,536-entry table over code pairs (one lookup writes two outputs)."""

    def __init__(
        self,
        fp8_dtype: torch.dtype,
        scale: torch.Tensor,
        out_dtype: torch.dtype,
        numel: int,
        device: torch.device = torch.device("cpu"),
    ):
        s = scale.reshape(()).to(device=device, dtype=torch.float32)
        self.out_dtype = out_dtype
        self.table = (code_values(fp8_dtype).to(device) * s).to(out_dtype)
        self.pairs: torch.Tensor | None = None
        self.jit = _jit.kernels() if device.type == "cpu" and out_dtype.itemsize in (2, 4) else None
        if self.jit is not None:
            self.jit_table = self.jit.table16(self.table) if out_dtype.itemsize == 2 else self.table
        elif (
            device.type == "cpu"
            and out_dtype.itemsize == 2
            and numel >= _PAIR_TABLE_MIN_ELEMENTS
            and sys.byteorder == "little"
        ):
            # Pair index v = hi * 256 + lo (little-endian): row hi, column lo of a 256 x 256 grid.
            bits = self.table.view(torch.int16).to(torch.int32) & 0xFFFF
            self.pairs = (bits.view(1, 256) | (bits.view(256, 1) << 16)).reshape(-1)

    def __call__(self, codes: torch.Tensor, out: torch.Tensor, work: Workspace, final: bool = False) -> None:
        """``out[i] = reference(codes[i])`` for a flat chunk. ``final``: ``out`` is the
        destination itself, not a buffer read again right away."""
        if self.jit is not None:
            if out.element_size() == 2:
                stream = final and out.numel() >= _STREAM_MIN_ELEMENTS
                self.jit.lut16(codes, self.jit_table, out, stream=stream)
            else:
                self.jit.lut32(codes, self.jit_table, out)
            return
        n = codes.numel()
        if self.pairs is not None and n >= 2 and out.data_ptr() % 4 == 0 and codes.data_ptr() % 2 == 0:
            m = n - (n & 1)
            idx = _u16_pairs_to_index(codes[:m], work.get(m // 2, torch.int32))
            torch.index_select(self.pairs, 0, idx, out=out[:m].view(torch.int32))
            if m == n:
                return
            codes, out = codes[m:], out[m:]
            n = 1
        idx = work.get(n, torch.int32)
        idx.copy_(codes)
        torch.index_select(self.table, 0, idx, out=out)


class GridKernel:
    """A float32 scale grid over the weight's ``[rows, cols]`` view, one scale per ``block``.

    ``period`` rows form one matrix whose tiling starts afresh (a stack of fused experts); the
    grid holds each matrix's ``ceil(period / b0)`` scale rows one after another."""

    def __init__(
        self,
        fp8_dtype: torch.dtype,
        scale_grid: torch.Tensor,
        block: tuple[int, int],
        period: int,
        device: torch.device = torch.device("cpu"),
    ):
        self.values = code_values(fp8_dtype).to(device)
        self.pairs = _value_pairs(fp8_dtype) if device.type == "cpu" and sys.byteorder == "little" else None
        self.scale = scale_grid.to(device=device, dtype=torch.float32).reshape(-1, scale_grid.shape[-1])
        self.block = block
        self.period = period
        self.device = device
        self.jit = _jit.kernels() if device.type == "cpu" else None
        if self.jit is not None:
            self.scale = self.scale.contiguous()
            self.nan = _nan_bf16(fp8_dtype)

    def __call__(
        self,
        codes: torch.Tensor,
        out: torch.Tensor,
        rows: tuple[int, int],
        col_start: int,
        work: Workspace,
        final: bool = False,
    ) -> None:
        """Dequantize the rectangle rows ``rows[0]:rows[1]`` x columns
        ``col_start:col_start + codes.numel() // (rows[1] - rows[0])``, given as flat row-major
        ``codes`` into flat ``out``."""
        r0, r1 = rows
        nr = r1 - r0
        n = codes.numel()
        w = n // nr
        b0, b1 = self.block
        if self.jit is not None and out.dtype == torch.bfloat16 and min(nr, b0) * min(w, b1) >= _JIT_MIN_ELEMENTS_PER_TABLE:
            blocks = (col_start + w - 1) // b1 - col_start // b1 + 1
            tables = work.get(blocks * _jit.TABLE_BYTES, torch.uint8, slot="tables")  # codes use the plain slot
            stream = final and n >= _STREAM_MIN_ELEMENTS
            self.jit.grid_bf16(
                codes, out, rows, col_start, self.scale, self.block, self.period, self.values, self.nan, tables, stream
            )
            return
        f32 = work.get(n, torch.float32)
        m = n - (n & 1) if self.pairs is not None and codes.data_ptr() % 2 == 0 and f32.data_ptr() % 8 == 0 else 0
        if m:
            # Two codes per lookup: their exact float32 values side by side.
            idx = _u16_pairs_to_index(codes[:m], work.get(m // 2, torch.int32))
            torch.index_select(self.pairs, 0, idx, out=f32[:m].view(torch.int64))
        if m < n:
            idx = work.get(n - m, torch.int32)
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
