"""Machine-code table lookups, compiled at first use with llvmlite (the ``fast`` extra).

torch has no byte-indexed table lookup that runs near memory speed: ``index_select`` moves about
one element per cycle. The kernels here do the same lookups over the same tables, so their bits
are those of the pure-torch kernels in ``_dequant`` (and the tests compare the two):

- ``lut16``/``lut32``: ``dst[i] = table[src[i]]`` for 2- and 4-byte outputs. On CPUs with
  AVX-512 VBMI, 64 codes at a time through ``vpermi2b`` over the table's low and high bytes,
  faster than a memcpy of the output; elsewhere a scalar loop that LLVM compiles for the host.
- ``grid_bf16``: a scale grid. For each scale it meets it builds the 256-entry table of
  ``bf16(value(code) * scale)`` (round to nearest even, NaN codes as torch writes them), then
  looks that block's codes up in it.
- ``stream=True``: for large outputs written straight into their destination, streaming
  (non-temporal) stores, which do not read the destination's cache lines first.

llvmlite ships LLVM inside its wheels, so this needs no compiler on the user's machine. Without
it, or with ``LAZYFP8_JIT=0`` in the environment, or if compilation fails, ``kernels()`` returns
``None`` and callers use the pure-torch kernels. The machine code is cached on disk (see
``_cache_dir``), so only the first process on a machine pays for code generation.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import sys
import threading

import torch

__all__ = ["JitKernels", "kernels", "TABLE_BYTES"]

# Rows a grid kernel takes together per block column: enough to reuse each table's registers,
# few enough that the rows' streams stay prefetchable. Measured on an 8192 x 8192 weight with
# 128 x 128 blocks, one thread (GB/s for 1, 2, 4, 8, 16, 128 rows): ordinary stores 9.2, 10.8,
# 13.1, 12.5, 7.7, 6.4; streaming stores 11.1, 14.1, 17.4, 18.5, 17.3, 6.3.
_ROWS_PER_GROUP = {False: 4, True: 8}

log = logging.getLogger(__name__)

#: Bytes of one 2-byte-output table block: low bytes [256], high bytes [256], then the 256
#: little-endian 16-bit values (the scalar loop and the vector loop's tail read those).
TABLE_BYTES = 1024

_SCALAR_IR = r"""
define void @lut16(ptr noalias nocapture readonly %src, i64 %n, ptr noalias nocapture readonly %tab,
                   ptr noalias nocapture %dst) nounwind {
entry:
  %words = getelementptr inbounds i8, ptr %tab, i64 512
  %empty = icmp eq i64 %n, 0
  br i1 %empty, label %done, label %loop
loop:
  %i = phi i64 [0, %entry], [%next, %loop]
  %sp = getelementptr inbounds i8, ptr %src, i64 %i
  %c = load i8, ptr %sp, align 1
  %ci = zext i8 %c to i64
  %tp = getelementptr inbounds i16, ptr %words, i64 %ci
  %v = load i16, ptr %tp, align 2
  %dp = getelementptr inbounds i16, ptr %dst, i64 %i
  store i16 %v, ptr %dp, align 2
  %next = add nuw i64 %i, 1
  %more = icmp ult i64 %next, %n
  br i1 %more, label %loop, label %done
done:
  ret void
}

define void @lut32(ptr noalias nocapture readonly %src, i64 %n, ptr noalias nocapture readonly %tab,
                   ptr noalias nocapture %dst) nounwind {
entry:
  %empty = icmp eq i64 %n, 0
  br i1 %empty, label %done, label %loop
loop:
  %i = phi i64 [0, %entry], [%next, %loop]
  %sp = getelementptr inbounds i8, ptr %src, i64 %i
  %c = load i8, ptr %sp, align 1
  %ci = zext i8 %c to i64
  %tp = getelementptr inbounds i32, ptr %tab, i64 %ci
  %v = load i32, ptr %tp, align 4
  %dp = getelementptr inbounds i32, ptr %dst, i64 %i
  store i32 %v, ptr %dp, align 4
  %next = add nuw i64 %i, 1
  %more = icmp ult i64 %next, %n
  br i1 %more, label %loop, label %done
done:
  ret void
}

; The 1024-byte table block of bf16(vals[c] * s) for all 256 codes: round to nearest even as
; torch does, NaN results taken from nan[c] (what torch writes for that NaN code).
define void @table_bf16(ptr noalias nocapture readonly %vals, ptr noalias nocapture readonly %nan,
                        float %s, ptr noalias nocapture %tab) nounwind {
entry:
  %words = getelementptr inbounds i8, ptr %tab, i64 512
  br label %loop
loop:
  %c = phi i64 [0, %entry], [%cn, %loop]
  %vp = getelementptr inbounds float, ptr %vals, i64 %c
  %v = load float, ptr %vp, align 4
  %y = fmul float %v, %s
  %b = bitcast float %y to i32
  %sh = lshr i32 %b, 16
  %odd = and i32 %sh, 1
  %t1 = add i32 %b, 32767
  %t2 = add i32 %t1, %odd
  %r32 = lshr i32 %t2, 16
  %r = trunc i32 %r32 to i16
  %isnan = fcmp uno float %y, 0.0
  %np = getelementptr inbounds i16, ptr %nan, i64 %c
  %nv = load i16, ptr %np, align 2
  %o = select i1 %isnan, i16 %nv, i16 %r
  %lo = trunc i16 %o to i8
  %hs = lshr i16 %o, 8
  %hi = trunc i16 %hs to i8
  %lp = getelementptr inbounds i8, ptr %tab, i64 %c
  store i8 %lo, ptr %lp, align 1
  %hidx = add nuw i64 %c, 256
  %hp = getelementptr inbounds i8, ptr %tab, i64 %hidx
  store i8 %hi, ptr %hp, align 1
  %wp = getelementptr inbounds i16, ptr %words, i64 %c
  store i16 %o, ptr %wp, align 2
  %cn = add nuw i64 %c, 1
  %more = icmp ult i64 %cn, 256
  br i1 %more, label %loop, label %done
done:
  ret void
}

"""

# Rows r0 .. r0+nr x columns c0 .. c0+w of a [rows, cols] weight, flat row-major in src and dst.
# Scale row of weight row r: (r / period) * ceil(period / b0) + (r % period) / b0; scale column
# of column c: c / b1. The rectangle is walked in bands of rows that share a scale row: each
# band first builds the tables of its block columns (1024 bytes each, in tables), then takes
# groups of `group` rows, and in each group block column by block column looks the codes up
# (@BAND: one table's registers across the group's rows).
# Instantiated as @grid_bf16 (ordinary stores) and, with AVX-512 VBMI, @grid_bf16_stream.
_GRID_IR = r"""
define void @GRID(ptr noalias nocapture readonly %src, ptr noalias nocapture %dst, i64 %nr, i64 %w,
                  i64 %r0, i64 %c0, ptr noalias nocapture readonly %scale, i64 %scols, i64 %b0,
                  i64 %b1, i64 %period, ptr noalias nocapture readonly %vals,
                  ptr noalias nocapture readonly %nan, ptr noalias nocapture %tables, i64 %group) nounwind {
entry:
  %pm0 = add i64 %period, %b0
  %pm1 = sub i64 %pm0, 1
  %per_matrix = udiv i64 %pm1, %b0
  %g0 = udiv i64 %c0, %b1
  %cend = add i64 %c0, %w
  %clast = sub i64 %cend, 1
  %glast = udiv i64 %clast, %b1
  %nbm1 = sub i64 %glast, %g0
  %nb = add i64 %nbm1, 1
  br label %bandhead
bandhead:
  %i = phi i64 [0, %entry], [%inext, %bandend]
  %rowsleft = icmp ult i64 %i, %nr
  br i1 %rowsleft, label %bandbody, label %exit
bandbody:
  %r = add i64 %r0, %i
  %mat = udiv i64 %r, %period
  %rin = urem i64 %r, %period
  %rb = udiv i64 %rin, %b0
  %mbase = mul i64 %mat, %per_matrix
  %srow = add i64 %mbase, %rb
  ; the band ends with the scale block, the matrix or the rectangle, whichever comes first
  %inblk = urem i64 %rin, %b0
  %toblk = sub i64 %b0, %inblk
  %tomat = sub i64 %period, %rin
  %torect = sub i64 %nr, %i
  %lt1 = icmp ult i64 %toblk, %tomat
  %m1 = select i1 %lt1, i64 %toblk, i64 %tomat
  %lt2 = icmp ult i64 %m1, %torect
  %band = select i1 %lt2, i64 %m1, i64 %torect
  %sbase = mul i64 %srow, %scols
  br label %build
build:
  %g = phi i64 [0, %bandbody], [%gn, %build]
  %gabs = add i64 %g0, %g
  %sidx = add i64 %sbase, %gabs
  %sp = getelementptr inbounds float, ptr %scale, i64 %sidx
  %s = load float, ptr %sp, align 4
  %toff = mul i64 %g, 1024
  %tp = getelementptr inbounds i8, ptr %tables, i64 %toff
  call void @table_bf16(ptr %vals, ptr %nan, float %s, ptr %tp)
  %gn = add nuw i64 %g, 1
  %bmore = icmp ult i64 %gn, %nb
  br i1 %bmore, label %build, label %grouphead
grouphead:
  %q = phi i64 [0, %build], [%qn, %groupend]
  %qleft = icmp ult i64 %q, %band
  br i1 %qleft, label %groupbody, label %bandend
groupbody:
  %qrest = sub i64 %band, %q
  %glt = icmp ult i64 %group, %qrest
  %grows = select i1 %glt, i64 %group, i64 %qrest
  %iq = add i64 %i, %q
  %rowoff = mul i64 %iq, %w
  br label %segloop
segloop:
  %k = phi i64 [0, %groupbody], [%kn, %segloop]
  %kabs = add i64 %g0, %k
  %bstart = mul i64 %kabs, %b1
  %kabs1 = add i64 %kabs, 1
  %bend = mul i64 %kabs1, %b1
  %startlt = icmp ult i64 %bstart, %c0
  %start = select i1 %startlt, i64 %c0, i64 %bstart
  %endgt = icmp ugt i64 %bend, %cend
  %end = select i1 %endgt, i64 %cend, i64 %bend
  %len = sub i64 %end, %start
  %rel = sub i64 %start, %c0
  %off = add i64 %rowoff, %rel
  %ssp = getelementptr inbounds i8, ptr %src, i64 %off
  %dsp = getelementptr inbounds i16, ptr %dst, i64 %off
  %koff = mul i64 %k, 1024
  %ktp = getelementptr inbounds i8, ptr %tables, i64 %koff
  call void @BAND(ptr %ssp, ptr %dsp, i64 %grows, i64 %w, i64 %len, ptr %ktp)
  %kn = add nuw i64 %k, 1
  %kmore = icmp ult i64 %kn, %nb
  br i1 %kmore, label %segloop, label %groupend
groupend:
  %qn = add nuw i64 %q, %grows
  br label %grouphead
bandend:
  %inext = add nuw i64 %i, %band
  br label %bandhead
exit:
  FENCE
  ret void
}
"""

# nrows row segments of len codes, row stride w (in elements), one table: @ROW on each row with
# the table's 8 vectors loaded once (@band_scalar takes no vectors: ROWARGS is empty there).
_BAND_IR = r"""
define internal void @BAND(ptr noalias nocapture readonly %src, ptr noalias nocapture %dst, i64 %nrows, i64 %w,
                           i64 %len, ptr noalias nocapture readonly %tab) nounwind {
entry:
  LOADS
  br label %head
head:
  %r = phi i64 [0, %entry], [%rn, %row]
  %more = icmp ult i64 %r, %nrows
  br i1 %more, label %row, label %done
row:
  %roff = mul i64 %r, %w
  %rs = getelementptr inbounds i8, ptr %src, i64 %roff
  %rd = getelementptr inbounds i16, ptr %dst, i64 %roff
  call void @ROW(ptr %rs, i64 %len, ptr %tab, ptr %rd ROWARGS)
  %rn = add nuw i64 %r, 1
  br label %head
done:
  ret void
}
"""

# 64 codes per step: vpermi2b picks from 128 table bytes by the low 7 bits of each code, so two
# lookups (codes below and above 0x80) and a select by the sign bit give the low output bytes,
# two more the high bytes; interleaving them gives 64 little-endian 16-bit outputs. The table
# comes in registers (lo0..hi3) so a caller looping over rows loads it once.
_VPERM_DECLARATION = "declare <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8>, <64 x i8>, <64 x i8>)"
_TABLE_VECTORS = ("lo0", "lo1", "lo2", "lo3", "hi0", "hi1", "hi2", "hi3")
# The table's vectors as extra parameters of a function, and as the matching call arguments.
_VECTOR_PARAMS = "".join(f", <64 x i8> %{v}" for v in _TABLE_VECTORS)
_LOAD_VECTORS = "\n  ".join(
    f"%{v}.p = getelementptr inbounds i8, ptr %tab, i64 {64 * i}\n  %{v} = load <64 x i8>, ptr %{v}.p, align 1"
    for i, v in enumerate(_TABLE_VECTORS)
)
_VBMI_IR = r"""
define internal void @NAME_regs(ptr noalias nocapture readonly %src, i64 %n, ptr noalias nocapture readonly %tab,
                                ptr noalias nocapture %dst VECTOR_PARAMS) alwaysinline nounwind {
entry:
  %nv = lshr i64 %n, 6
  %none = icmp eq i64 %nv, 0
  br i1 %none, label %tail, label %vloop
vloop:
  %j = phi i64 [0, %entry], [%jn, %vloop]
  %off = shl i64 %j, 6
  %sp = getelementptr inbounds i8, ptr %src, i64 %off
  %c = load <64 x i8>, ptr %sp, align 1
  %a0 = call <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8> %lo0, <64 x i8> %c, <64 x i8> %lo1)
  %a1 = call <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8> %lo2, <64 x i8> %c, <64 x i8> %lo3)
  %h0 = call <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8> %hi0, <64 x i8> %c, <64 x i8> %hi1)
  %h1 = call <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8> %hi2, <64 x i8> %c, <64 x i8> %hi3)
  %upper = icmp slt <64 x i8> %c, zeroinitializer
  %lo = select <64 x i1> %upper, <64 x i8> %a1, <64 x i8> %a0
  %hi = select <64 x i1> %upper, <64 x i8> %h1, <64 x i8> %h0
  %pairs = shufflevector <64 x i8> %lo, <64 x i8> %hi, <128 x i32> <INTERLEAVE>
  %dp = getelementptr inbounds i16, ptr %dst, i64 %off
  store <128 x i8> %pairs, ptr %dp, STORE
  %jn = add nuw i64 %j, 1
  %more = icmp ult i64 %jn, %nv
  br i1 %more, label %vloop, label %tail
tail:
  %head = shl i64 %nv, 6
  %rest = sub i64 %n, %head
  %sp2 = getelementptr inbounds i8, ptr %src, i64 %head
  %dp2 = getelementptr inbounds i16, ptr %dst, i64 %head
  call void @lut16(ptr %sp2, i64 %rest, ptr %tab, ptr %dp2)
  ret void
}
"""

# With streaming (non-temporal) stores, for large outputs written once into their final place:
# the output's cache lines are not read first (half the memory traffic of ordinary stores).
# Codes up to dst's first 64-byte boundary go through the scalar loop, so every vector store is
# aligned. Streaming stores are weakly ordered: the entry points end with a fence, so the output
# is visible to every thread once the call returns.
_STREAM_IR = r"""
define internal void @lut16_stream_regs(ptr noalias nocapture readonly %src, i64 %n, ptr noalias nocapture readonly %tab,
                                        ptr noalias nocapture %dst VECTOR_PARAMS) alwaysinline nounwind {
entry:
  %addr = ptrtoint ptr %dst to i64
  %mis = and i64 %addr, 63
  %gap = sub i64 64, %mis
  %gapm = and i64 %gap, 63
  %headn = lshr i64 %gapm, 1
  %short = icmp ult i64 %n, %headn
  %head = select i1 %short, i64 %n, i64 %headn
  call void @lut16(ptr %src, i64 %head, ptr %tab, ptr %dst)
  %rest = sub i64 %n, %head
  %sp = getelementptr inbounds i8, ptr %src, i64 %head
  %dp = getelementptr inbounds i16, ptr %dst, i64 %head
  call void @lut16_vbmi_nt_regs(ptr %sp, i64 %rest, ptr %tab, ptr %dp VECTOR_ARGS)
  ret void
}

define void @lut16_vbmi(ptr noalias nocapture readonly %src, i64 %n, ptr noalias nocapture readonly %tab,
                        ptr noalias nocapture %dst) nounwind {
entry:
  LOADS
  call void @lut16_vbmi_regs(ptr %src, i64 %n, ptr %tab, ptr %dst VECTOR_ARGS)
  ret void
}

define void @lut16_stream(ptr noalias nocapture readonly %src, i64 %n, ptr noalias nocapture readonly %tab,
                          ptr noalias nocapture %dst) nounwind {
entry:
  LOADS
  call void @lut16_stream_regs(ptr %src, i64 %n, ptr %tab, ptr %dst VECTOR_ARGS)
  fence seq_cst
  ret void
}

!0 = !{i32 1}
"""

_LUT_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p)
_GRID_FN = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4 + [ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 3 + [ctypes.c_int64]))


def _require(ok: bool, what: str) -> None:
    # Machine code trusts the lengths it is given: a wrong one writes out of bounds. These are
    # real checks, kept under ``python -O``.
    if not ok:
        raise ValueError(f"lazyfp8 compiled kernel: {what}")


def _flat_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.is_contiguous()


class JitKernels:
    """The compiled kernels of this process, over contiguous CPU tensors (ctypes releases the GIL
    for each call, so workers run them in parallel)."""

    def __init__(self, engine, vector: bool, from_cache: bool):
        self._engine = engine  # owns the machine code the function pointers point into
        self.vector = vector  #: the AVX-512 VBMI kernels (else the portable ones)
        self.from_cache = from_cache  #: the machine code came from the on-disk cache
        self._lut16 = _LUT_FN(engine.get_function_address("lut16_vbmi" if vector else "lut16"))
        self._stream16 = _LUT_FN(engine.get_function_address("lut16_stream")) if vector else self._lut16
        self._lut32 = _LUT_FN(engine.get_function_address("lut32"))
        self._grid = _GRID_FN(engine.get_function_address("grid_bf16"))
        self._grid_stream = _GRID_FN(engine.get_function_address("grid_bf16_stream")) if vector else self._grid

    @staticmethod
    def table16(table: torch.Tensor) -> torch.Tensor:
        """The 1024-byte block ``lut16`` reads, from 256 two-byte results."""
        b = table.contiguous().view(torch.uint8).view(256, 2)
        return torch.cat([b[:, 0], b[:, 1], b.reshape(-1)]).contiguous()

    def lut16(self, codes: torch.Tensor, block: torch.Tensor, out: torch.Tensor, stream: bool = False) -> None:
        """``out[i] = block's value for codes[i]``. ``stream``: ``out`` is large and not read
        again soon (a parameter being filled), so bypass the cache when writing it."""
        _require(all(map(_flat_cpu, (codes, block, out))), "tensors must be contiguous on the CPU")
        _require(codes.element_size() == 1 and out.element_size() == 2, "codes are bytes, outputs 2 bytes")
        _require(codes.numel() == out.numel() and block.numel() == TABLE_BYTES, "sizes do not match")
        fn = self._stream16 if stream else self._lut16
        fn(codes.data_ptr(), codes.numel(), block.data_ptr(), out.data_ptr())

    def lut32(self, codes: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> None:
        _require(all(map(_flat_cpu, (codes, table, out))), "tensors must be contiguous on the CPU")
        _require(codes.element_size() == 1 and out.element_size() == 4 == table.element_size(), "wrong item sizes")
        _require(codes.numel() == out.numel() and table.numel() == 256, "sizes do not match")
        self._lut32(codes.data_ptr(), codes.numel(), table.data_ptr(), out.data_ptr())

    def grid_bf16(
        self,
        codes: torch.Tensor,
        out: torch.Tensor,
        rows: tuple[int, int],
        col_start: int,
        scale: torch.Tensor,
        block: tuple[int, int],
        period: int,
        values: torch.Tensor,
        nan: torch.Tensor,
        tables: torch.Tensor,
        stream: bool = False,
    ) -> None:
        """Dequantize the rectangle ``rows`` x ``col_start:col_start + w`` (``scale`` is the
        float32 grid, ``tables`` scratch of ``TABLE_BYTES``;
        ``stream`` as for :meth:`lut16`)."""
        r0, r1 = rows
        nr = r1 - r0
        b0, b1 = block
        _require(all(map(_flat_cpu, (codes, out, scale, values, nan, tables))), "tensors must be contiguous on the CPU")
        _require(nr > 0 and r0 >= 0 and col_start >= 0 and b0 > 0 and b1 > 0 and period > 0, "empty rectangle or block")
        w = codes.numel() // nr
        _require(w > 0 and nr * w == codes.numel() == out.numel(), "codes do not fill the rectangle")
        _require(codes.element_size() == 1 and out.dtype == torch.bfloat16, "codes are bytes, the output bfloat16")
        _require(scale.dtype == torch.float32 and scale.dim() == 2, "the scale grid is 2-d float32")
        _require(values.dtype == torch.float32 and values.numel() == 256 == nan.numel() and nan.element_size() == 2, "bad code tables")
        blocks = (col_start + w - 1) // b1 - col_start // b1 + 1
        _require(tables.numel() >= blocks * TABLE_BYTES, "table scratch too small")
        last_scale_row = (r1 - 1) // period * -(-period // b0) + (r1 - 1) % period // b0
        _require(last_scale_row < scale.shape[0] and (col_start + w - 1) // b1 < scale.shape[1], "rectangle outside the scale grid")
        (self._grid_stream if stream else self._grid)(
            codes.data_ptr(), out.data_ptr(), nr, w, r0, col_start,
            scale.data_ptr(), scale.shape[1], b0, b1, period,
            values.data_ptr(), nan.data_ptr(), tables.data_ptr(), _ROWS_PER_GROUP[stream],
        )  # fmt: skip


def _mode() -> str:
    """``LAZYFP8_JIT``: unset or ``1`` for the best kernels this CPU runs, ``scalar`` for the
    portable ones only (what a CPU without AVX-512 VBMI gets), ``0`` for none."""
    value = os.environ.get("LAZYFP8_JIT", "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    return "scalar" if value == "scalar" else "best"


def _assemble(vector: bool) -> str:
    """The module's IR: the scalar kernels, plus the AVX-512 VBMI ones where the CPU has them."""
    def band(name: str, row: str, with_vectors: bool) -> str:
        return (
            _BAND_IR.replace("@BAND", name)
            .replace("@ROW", row)
            .replace("LOADS", _LOAD_VECTORS if with_vectors else "")
            .replace("ROWARGS", _VECTOR_PARAMS if with_vectors else "")
        )

    def grid(name: str, band_name: str, fence: str) -> str:
        return _GRID_IR.replace("@GRID", name).replace("@BAND", band_name).replace("FENCE", fence)

    if not vector:
        return _SCALAR_IR + band("@band_scalar", "@lut16", False) + grid("@grid_bf16", "@band_scalar", "")
    interleave = ", ".join(f"i32 {k}" for i in range(64) for k in (i, 64 + i))
    core = _VBMI_IR.replace("<INTERLEAVE>", f"<{interleave}>").replace("VECTOR_PARAMS", _VECTOR_PARAMS)
    parts = [
        _SCALAR_IR,
        _VPERM_DECLARATION,
        core.replace("@NAME", "@lut16_vbmi").replace("STORE", "align 1"),
        core.replace("@NAME", "@lut16_vbmi_nt").replace("STORE", "align 64, !nontemporal !0"),
        _STREAM_IR.replace("VECTOR_PARAMS", _VECTOR_PARAMS).replace("VECTOR_ARGS", _VECTOR_PARAMS).replace("LOADS", _LOAD_VECTORS),
        band("@band_vbmi", "@lut16_vbmi_regs", True),
        band("@band_stream", "@lut16_stream_regs", True),
        grid("@grid_bf16", "@band_vbmi", ""),
        grid("@grid_bf16_stream", "@band_stream", "fence seq_cst"),
    ]
    return "\n".join(parts)


def _cache_dir() -> str | None:
    """Where compiled objects are kept between processes: ``$LAZYFP8_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/lazyfp8``, else ``~/.cache/lazyfp8``; an empty ``LAZYFP8_CACHE_DIR`` turns
    the cache off."""
    path = os.environ.get("LAZYFP8_CACHE_DIR")
    if path is not None:
        return path or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lazyfp8")


def _private(st: os.stat_result) -> bool:
    """Owned by this user and not writable by anyone else: machine code from a file another
    user could have written would run as ours."""
    if not hasattr(os, "getuid"):  # no POSIX ownership to check
        return True
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


class _ObjectCache:
    """MCJIT's object cache on disk, keyed by everything the machine code depends on: the IR, the
    host CPU and its features, and the LLVM build. A cache hit skips optimisation and code
    generation (80 ms -> a few ms); any I/O problem just means compiling again. Objects are only
    read from a directory and file of this user that nobody else can write."""

    def __init__(self, directory: str | None, key: str):
        self.path = os.path.join(directory, f"kernels-{key}.o") if directory else None

    def load(self) -> bytes | None:
        if self.path is None:
            return None
        try:
            with open(self.path, "rb") as f:
                if not (_private(os.fstat(f.fileno())) and _private(os.stat(os.path.dirname(self.path)))):
                    log.debug("lazyfp8: ignoring %s: not private to this user", self.path)
                    return None
                blob = f.read()
        except OSError:
            return None
        # A damaged object would be executed, not parsed: only take one whose digest matches.
        digest, data = blob[:32], blob[32:]
        return data if len(blob) > 32 and hashlib.sha256(data).digest() == digest else None

    def store(self, data: bytes) -> None:
        if self.path is None:
            return
        tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(hashlib.sha256(data).digest() + data)
            os.replace(tmp, self.path)  # readers see the whole object or none
        except OSError as e:
            log.debug("lazyfp8: could not cache compiled kernels in %s: %s", self.path, e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)


_compile_lock = threading.Lock()


@functools.cache
def _compile(allow_vector: bool = True) -> JitKernels | None:
    if sys.byteorder != "little":
        return None
    try:
        import llvmlite
        import llvmlite.binding as llvm
    except ImportError:
        return None
    try:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        cpu = llvm.get_host_cpu_name()
        features = llvm.get_host_cpu_features().flatten()
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        vector = allow_vector and x86 and "+avx512vbmi" in features.split(",")
        source = _assemble(vector)
        ident = "\0".join([source, cpu, features, llvmlite.__version__, ".".join(map(str, llvm.llvm_version_info))])
        cache = _ObjectCache(_cache_dir(), hashlib.sha256(ident.encode()).hexdigest()[:32])
        cached = cache.load()
        module = llvm.parse_assembly(source)
        module.verify()
        machine = llvm.Target.from_default_triple().create_target_machine(cpu=cpu, features=features, opt=3, jit=True)
        if cached is None:
            passes = llvm.create_pass_builder(machine, llvm.create_pipeline_tuning_options(speed_level=3))
            passes.getModulePassManager().run(module, passes)
        engine = llvm.create_mcjit_compiler(module, machine)
        engine.set_object_cache(lambda _module, data: cache.store(data), lambda _module: cached)
        engine.finalize_object()
        return JitKernels(engine, vector, from_cache=cached is not None)
    except Exception as e:  # a broken or unusual LLVM: the torch kernels still work
        log.warning("lazyfp8: compiled kernels unavailable (%s); using the pure-torch kernels", e)
        return None


def kernels() -> JitKernels | None:
    """This process's compiled kernels, or ``None`` (no llvmlite, ``LAZYFP8_JIT=0``, or a
    compilation failure, logged once)."""
    mode = _mode()
    if mode == "off":
        return None
    with _compile_lock:  # one compilation per process, whichever thread asks first
        return _compile(mode == "best")
