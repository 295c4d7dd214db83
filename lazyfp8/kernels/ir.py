"""The LLVM IR of the compiled dequantization kernels (compiled by ``_jit``).

Written by hand, with one job per function: ``lut16``/``lut32`` (scalar table lookups),
``table_bf16`` (one scale's 256-entry bf16 table), the AVX-512 VBMI lookups (64 codes per step,
ordinary or streaming stores), and ``grid_bf16`` (a scale grid: bands of rows, one table per
block). ``assemble(vector)`` returns the module for a CPU with or without AVX-512 VBMI; every
exported function has the C signature ``_jit`` declares for it.
"""

from __future__ import annotations

__all__ = ["assemble", "TABLE_BYTES"]

#: Bytes of one 2-byte-output table block: low bytes [256], high bytes [256], then the 256
#: little-endian 16-bit values (the scalar loop and the vector loop's tail read those).
TABLE_BYTES = 1024

# dst[i] = table[src[i]] for one output width: @lut16 reads the 16-bit words at byte 512 of its
# table block (TABLE_BYTES), @lut32 a plain table of 256 32-bit values.
_LUT_IR = r"""
define void @NAME(ptr noalias nocapture readonly %src, i64 %n, ptr noalias nocapture readonly %tab,
                  ptr noalias nocapture %dst) nounwind {
entry:
  %words = getelementptr inbounds i8, ptr %tab, i64 OFFSET
  %empty = icmp eq i64 %n, 0
  br i1 %empty, label %done, label %loop
loop:
  %i = phi i64 [0, %entry], [%next, %loop]
  %sp = getelementptr inbounds i8, ptr %src, i64 %i
  %c = load i8, ptr %sp, align 1
  %ci = zext i8 %c to i64
  %tp = getelementptr inbounds WORD, ptr %words, i64 %ci
  %v = load WORD, ptr %tp, align ALIGN
  %dp = getelementptr inbounds WORD, ptr %dst, i64 %i
  store WORD %v, ptr %dp, align ALIGN
  %next = add nuw i64 %i, 1
  %more = icmp ult i64 %next, %n
  br i1 %more, label %loop, label %done
done:
  ret void
}
"""


def _lut(name: str, word: str, align: int, offset: int) -> str:
    return (
        _LUT_IR.replace("@NAME", name).replace("WORD", word).replace("ALIGN", str(align)).replace("OFFSET", str(offset))
    )


_SCALAR_IR = _lut("@lut16", "i16", 2, 512) + _lut("@lut32", "i32", 4, 0) + r"""
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


def assemble(vector: bool) -> str:
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
