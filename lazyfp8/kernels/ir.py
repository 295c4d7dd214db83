"""The compiled dequantization kernels, written with llvmlite's IR builder (compiled by ``jit``).

Read each kernel as the C in its docstring. Every Python statement writes one or a few LLVM
instructions where the builder stands, in the order they run:

- ``Int`` values are integers of the kernel (unsigned, like C's ``size_t``): ``+ - * // % & >> <<``,
  ``<`` and ``.min()`` write the matching instructions, so index arithmetic reads as it would in C;
- ``with loop(b, n) as i:`` is ``for (i.index = 0; i.index < n; i.index += i.step)``;
- ``at(b, p, i, T)`` is ``&((T *)p)[i]``, ``load``/``store`` read and write through it;
- a Python function that takes the builder (``_Rows.row``, ``_lookup_row``) writes its code
  inline where it is called, like a C macro.

How to change a kernel, see it compiled, and test it: docs/kernels.md.

The exported functions and their parameters are declared once, in ``SIGNATURES``; ``jit``
derives the ctypes call types from that table and calls each function by parameter name:

- ``lut16`` / ``lut32``: ``dst[i] = table[src[i]]`` for 2- and 4-byte outputs, a scalar loop.
- ``table_bf16``: the table block of ``bf16(values[c] * scale)`` for the 256 codes ``c``.
- ``grid_bf16``: a rectangle of a weight with a grid of scales: bands of rows that share a scale
  row, one table per block column, codes looked up a group of rows at a time.
- ``lut16_vbmi`` (AVX-512 VBMI, 64 codes per step), ``lut16_stream`` and ``grid_bf16_stream``
  (the same with streaming stores), ``lut16_neon`` (AArch64 NEON, 16 codes per step): vector
  lookups over the table block's low and high byte planes.
- ``group_bf16`` / ``group_f32``: a rectangle of a weight of 4-bit codes (two a byte) with a
  scale grid, zero points and a global scale: per block its 16 results as one vector, looked
  up 16 codes per step with one byte shuffle per result byte (``permute16``).

A 16-bit table block (``TABLE_BYTES``) holds the results' low bytes at 0, their high bytes at 256
and the 16-bit results themselves at 512: the vector loops look the two byte planes up and
interleave them, the scalar loop reads the words.

``assemble(variant)`` writes the module of one variant (``VARIANTS``): ``portable`` (generic IR
only, any CPU), ``vbmi``, ``neon``, and ``neon-emulated`` (the NEON kernels with ``tbl`` written
in generic IR, so that their algorithm runs and is tested on any CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Iterator, Sequence

from llvmlite import ir

__all__ = ["Param", "SIGNATURES", "VARIANTS", "Variant", "TABLE_BYTES", "GROUP_TABLE_BYTES", "assemble"]

#: Bytes of one 16-bit table block: low bytes [256], high bytes [256], 16-bit words [256].
TABLE_BYTES = 1024
_LOW, _HIGH, _WORDS = 0, 256, 512

I8, I16, I32, I64 = (ir.IntType(n) for n in (8, 16, 32, 64))
F32 = ir.FloatType()
PTR = ir.PointerType()  # opaque: the element type is given where memory is read or written


# --- the exported functions' signatures: declared once --------------------------------------


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter: ``kind`` is ``"in"`` (pointer to memory the kernel only reads), ``"out"``
    (pointer to memory it writes; no two pointers of a call overlap), ``"i64"`` or ``"f32"``."""

    name: str
    kind: str


#: The LLVM type of each parameter kind (``jit`` maps the same kinds to ctypes).
KIND_TYPES = {"in": PTR, "out": PTR, "i64": I64, "f32": F32}

_LUT = (Param("src", "in"), Param("n", "i64"), Param("table", "in"), Param("dst", "out"))
_GRID = (
    Param("src", "in"),  # codes of the rectangle, row-major, nr x w
    Param("dst", "out"),  # bf16 results, same layout
    Param("nr", "i64"),  # rows of the rectangle
    Param("w", "i64"),  # columns of the rectangle
    Param("r0", "i64"),  # its first row in the weight's [rows, cols] view
    Param("c0", "i64"),  # its first column
    Param("scale", "in"),  # float32 scale grid, row-major
    Param("scols", "i64"),  # columns of the scale grid
    Param("b0", "i64"),  # block rows
    Param("b1", "i64"),  # block columns
    Param("period", "i64"),  # rows of one matrix of a stack (the tiling restarts there)
    Param("values", "in"),  # float32 value of each of the 256 codes
    Param("nan", "in"),  # bf16 bits torch writes for each code (read for NaN results)
    Param("tables", "out"),  # scratch: TABLE_BYTES per block column of the rectangle
    Param("group", "i64"),  # rows looked up together per block column
)

_GROUP = (
    Param("src", "in"),  # 4-bit codes, low nibble first: each row's code_span(c0, c0 + w), back to back
    Param("dst", "out"),  # results, nr x w, row-major
    Param("nr", "i64"),  # rows of the rectangle
    Param("w", "i64"),  # columns of the rectangle
    Param("r0", "i64"),  # its first row in the weight's [rows, cols] view
    Param("c0", "i64"),  # its first column (odd: the first code is a high nibble)
    Param("scale", "in"),  # float32 scale grid, row-major
    Param("zero", "in"),  # float32 zero points: a grid like scale (zeros = 1) or one 0.0 (zeros = 0)
    Param("zeros", "i64"),  # 1 or 0, as above
    Param("scols", "i64"),  # columns of the scale grid
    Param("b0", "i64"),  # block rows
    Param("b1", "i64"),  # block columns
    Param("period", "i64"),  # rows of one matrix of a stack (the tiling restarts there)
    Param("values", "in"),  # float32 value of each of the 16 codes
    Param("after", "f32"),  # the global scale that multiplies the product (1.0 for none)
    Param("tables", "out"),  # scratch: GROUP_TABLE_BYTES, 64-byte aligned
)

SIGNATURES: dict[str, tuple[Param, ...]] = {
    "lut16": _LUT,  # dst: uint16_t[n]; table: a TABLE_BYTES block
    "lut32": _LUT,  # dst: uint32_t[n]; table: uint32_t[256]
    "table_bf16": (Param("values", "in"), Param("nan", "in"), Param("scale", "f32"), Param("table", "out")),
    "grid_bf16": _GRID,
    "lut16_vbmi": _LUT,
    "lut16_stream": _LUT,
    "grid_bf16_stream": _GRID,
    "lut16_neon": _LUT,
    "group_bf16": _GROUP,  # dst: bf16
    "group_f32": _GROUP,  # dst: float32
}


# --- the writing kit: integers with operators, loops, pointers -------------------------------


class Int:
    """An integer value of the kernel, unsigned. Python's operators write LLVM instructions
    (``//`` is ``udiv``, ``%`` ``urem``, ``>>`` ``lshr``, ``<`` ``icmp ult``); a Python int on
    either side becomes a constant of the same width."""

    __slots__ = ("b", "value")

    def __init__(self, b: ir.IRBuilder, value: ir.Value):
        self.b = b
        self.value = value

    def _v(self, other: Int | int) -> ir.Value:
        return other.value if isinstance(other, Int) else ir.Constant(self.value.type, other)

    def _op(self, op: str, other: Int | int, swap: bool = False) -> Int:
        lhs, rhs = (self._v(other), self.value) if swap else (self.value, self._v(other))
        return Int(self.b, getattr(self.b, op)(lhs, rhs))

    def __add__(self, o):
        return self._op("add", o)

    def __radd__(self, o):
        return self._op("add", o, swap=True)

    def __sub__(self, o):
        return self._op("sub", o)

    def __rsub__(self, o):
        return self._op("sub", o, swap=True)

    def __mul__(self, o):
        return self._op("mul", o)

    def __rmul__(self, o):
        return self._op("mul", o, swap=True)

    def __floordiv__(self, o):
        return self._op("udiv", o)

    def __mod__(self, o):
        return self._op("urem", o)

    def __and__(self, o):
        return self._op("and_", o)

    def __or__(self, o):
        return self._op("or_", o)

    def __rshift__(self, o):
        return self._op("lshr", o)

    def __lshift__(self, o):
        return self._op("shl", o)

    def __lt__(self, o) -> ir.Value:
        return self.b.icmp_unsigned("<", self.value, self._v(o))

    def __gt__(self, o) -> ir.Value:
        return self.b.icmp_unsigned(">", self.value, self._v(o))

    def __ge__(self, o) -> ir.Value:
        return self.b.icmp_unsigned(">=", self.value, self._v(o))

    def min(self, o: Int | int) -> Int:
        return Int(self.b, self.b.select(self < o, self.value, self._v(o)))

    def max(self, o: Int | int) -> Int:
        return Int(self.b, self.b.select(self > o, self.value, self._v(o)))

    def trunc(self, ty: ir.IntType) -> Int:
        return Int(self.b, self.b.trunc(self.value, ty))


def value(x: Int | ir.Value | int, ty: ir.Type = I64) -> ir.Value:
    """The LLVM value of ``x`` (a Python int becomes a constant of ``ty``)."""
    if isinstance(x, Int):
        return x.value
    return ir.Constant(ty, x) if isinstance(x, int) else x


@dataclasses.dataclass
class Loop:
    index: Int
    step: Int | int = 1  #: what the index grows by after this iteration (the body may set it)


@contextlib.contextmanager
def loop(b: ir.IRBuilder, stop: Int | int, start: Int | int = 0) -> Iterator[Loop]:
    """``for (i = start; i < stop; i += step)``, 64-bit unsigned; the ``with`` block is the
    body, and may set ``loop.step`` to a value it computed (a step of 0 never ends)."""
    before = b.block
    head = b.append_basic_block("loop")
    body = b.append_basic_block("body")
    done = b.append_basic_block("done")
    b.branch(head)
    b.position_at_end(head)
    index = b.phi(I64, "i")
    index.add_incoming(value(start), before)
    this = Loop(Int(b, index))
    b.cbranch(this.index < stop, body, done)
    b.position_at_end(body)
    yield this
    index.add_incoming(b.add(index, value(this.step), flags=["nuw"]), b.block)
    b.branch(head)
    b.position_at_end(done)


def at(b: ir.IRBuilder, ptr: ir.Value, index: Int | int, ty: ir.Type = I8) -> ir.Value:
    """``&((ty *)ptr)[index]``."""
    return b.gep(ptr, [value(index)], inbounds=True, source_etype=ty)


def load(b: ir.IRBuilder, ptr: ir.Value, index: Int | int, ty: ir.Type, align: int) -> ir.Value:
    """``((ty *)ptr)[index]``, from an address that is a multiple of ``align``."""
    return b.load(at(b, ptr, index, ty), typ=ty, align=align)


def store(b: ir.IRBuilder, x: ir.Value, ptr: ir.Value, index: Int | int, align: int) -> ir.Instruction:
    """``((typeof x *)ptr)[index] = x``."""
    return b.store(x, at(b, ptr, index, x.type), align=align)


def _intrinsic(module: ir.Module, name: str, ret: ir.Type, args: Sequence[ir.Type]) -> ir.Function:
    fn = module.globals.get(name)
    return fn if fn is not None else ir.Function(module, ir.FunctionType(ret, args), name)


def _define(module: ir.Module, name: str, params: Sequence[Param]):
    """Start function ``name``: returns its builder (at the entry) and its parameters by name
    (``i64`` ones as ``Int``)."""
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [KIND_TYPES[p.kind] for p in params]), name)
    fn.attributes.add("nounwind")
    for arg, p in zip(fn.args, params):
        arg.name = p.name
        if p.kind in ("in", "out"):
            # llvmlite's list of parameter attributes lags LLVM's (no ``readonly``, and
            # ``nocapture`` only under one of its two spellings): add them to the set directly.
            for attr in ("noalias", "nocapture", "readonly")[: 3 if p.kind == "in" else 2]:
                set.add(arg.attributes, attr)
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    args = types.SimpleNamespace(**{p.name: Int(b, a) if p.kind == "i64" else a for p, a in zip(params, fn.args)})
    return fn, b, args


# --- scalar kernels ------------------------------------------------------------------------


def _lut(module: ir.Module, name: str, word: ir.IntType, offset: int) -> ir.Function:
    """``void NAME(const uint8_t *src, int64_t n, const uint8_t *table, WORD *dst)``::

        const WORD *words = (const WORD *)(table + OFFSET);
        for (i = 0; i < n; i++) dst[i] = words[src[i]];
    """
    fn, b, a = _define(module, name, SIGNATURES[name])
    align = word.width // 8
    words = at(b, a.table, offset)
    with loop(b, a.n) as i:
        code = b.zext(load(b, a.src, i.index, I8, 1), I64)
        store(b, load(b, words, code, word, align), a.dst, i.index, align)
    b.ret_void()
    return fn


def _bf16_bits(b: ir.IRBuilder, y: ir.Value) -> Int:
    """The bfloat16 bits of float32 ``y`` (a scalar or a vector; not NaN) in the low half of
    32-bit words, rounded to nearest even as torch rounds (an overflow gives inf)::

        uint32_t bits = bit_cast<uint32_t>(y);
        return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
    """
    ty = ir.VectorType(I32, y.type.count) if isinstance(y.type, ir.VectorType) else I32
    bits = Int(b, b.bitcast(y, ty))
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16


def _table_bf16(module: ir.Module) -> ir.Function:
    """``void table_bf16(const float *values, const uint16_t *nan, float scale, uint8_t *table)``:
    the table block of ``bf16(values[c] * scale)``, rounded to nearest even as torch rounds, a NaN
    result taken from ``nan[c]`` (what torch writes for that code)::

        for (c = 0; c < 256; c++) {
            float y = values[c] * scale;
            uint32_t bits = bit_cast<uint32_t>(y);
            uint16_t r = isnan(y) ? nan[c] : (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
            table[c] = r & 0xFF; table[256 + c] = r >> 8; ((uint16_t *)(table + 512))[c] = r;
        }
    """
    fn, b, a = _define(module, "table_bf16", SIGNATURES["table_bf16"])
    words = at(b, a.table, _WORDS)
    with loop(b, 256) as c:
        y = b.fmul(load(b, a.values, c.index, F32, 4), a.scale)
        rounded = _bf16_bits(b, y).trunc(I16)
        is_nan = b.fcmp_unordered("uno", y, ir.Constant(F32, 0.0))
        r = b.select(is_nan, load(b, a.nan, c.index, I16, 2), rounded.value)
        store(b, b.trunc(r, I8), a.table, c.index + _LOW, 1)
        store(b, b.trunc(b.lshr(r, ir.Constant(I16, 8)), I8), a.table, c.index + _HIGH, 1)
        store(b, r, words, c.index, 2)
    b.ret_void()
    return fn


# --- vector lookups: one table block as registers, L codes per step -------------------------


class _Vbmi:
    """AVX-512 VBMI: ``vpermi2b`` picks bytes from 128 table bytes (two registers) by the low 7
    bits of each of 64 codes. Per byte plane: one lookup for codes below 0x80, one for the rest,
    a select on the code's sign bit."""

    lanes = 64
    _PERMUTE = "llvm.x86.avx512.vpermi2var.qi.512"

    def __init__(self):
        self.vec = ir.VectorType(I8, self.lanes)

    def load_table(self, b: ir.IRBuilder, table: ir.Value) -> list[ir.Value]:
        """The block's 512 plane bytes: low bytes in registers 0-3, high bytes in 4-7."""
        return [load(b, table, k, self.vec, 1) for k in range(8)]

    def lookup(self, b: ir.IRBuilder, regs: Sequence[ir.Value], codes: ir.Value) -> tuple[ir.Value, ir.Value]:
        """The low and high result bytes of 64 codes."""
        permute = _intrinsic(b.module, self._PERMUTE, self.vec, [self.vec] * 3)
        upper = b.icmp_signed("<", codes, ir.Constant(self.vec, None))  # code >= 0x80

        def plane(r: Sequence[ir.Value]) -> ir.Value:
            below = b.call(permute, [r[0], codes, r[1]])
            above = b.call(permute, [r[2], codes, r[3]])
            return b.select(upper, above, below)

        return plane(regs[0:4]), plane(regs[4:8])

    def permute16(self, b: ir.IRBuilder, table: ir.Value, index: ir.Value) -> ir.Value:
        """``result[j] = table[index[j]]`` for 16 bytes (indices below 16): SSSE3 ``pshufb``."""
        fn = _intrinsic(b.module, "llvm.x86.ssse3.pshuf.b.128", _BYTES16, [_BYTES16, _BYTES16])
        return b.call(fn, [table, index])


class _Neon:
    """AArch64 NEON: ``tbl`` with four registers picks bytes from 64 table bytes by 16 codes,
    and gives 0 for an index of 64 or more. Per byte plane: four lookups, the k-th over plane
    bytes 64k..64k+63 with the codes minus 64k (codes outside that range wrap to 64 or more and
    give 0), OR-ed together. ``emulate``: ``tbl`` written in generic IR with the same result, so
    the algorithm runs on any CPU (slowly; for tests)."""

    lanes = 16
    _TBL4 = "llvm.aarch64.neon.tbl4.v16i8"

    def __init__(self, emulate: bool):
        self.emulate = emulate
        self.vec = ir.VectorType(I8, self.lanes)

    def load_table(self, b: ir.IRBuilder, table: ir.Value) -> list[ir.Value]:
        """The block's 512 plane bytes: low bytes in registers 0-15, high bytes in 16-31."""
        return [load(b, table, k, self.vec, 1) for k in range(32)]

    def tbl4(self, b: ir.IRBuilder, tables: Sequence[ir.Value], index: ir.Value) -> ir.Value:
        """``result[j] = index[j] < 64 ? (64 bytes of tables)[index[j]] : 0`` for 16 lanes."""
        if not self.emulate:
            fn = _intrinsic(b.module, self._TBL4, self.vec, [self.vec] * 5)
            return b.call(fn, [*tables, index])
        ramp = ir.VectorType(I32, 2 * self.lanes)
        pair = [b.shuffle_vector(tables[k], tables[k + 1], ir.Constant(ramp, list(range(32)))) for k in (0, 2)]
        whole = b.shuffle_vector(pair[0], pair[1], ir.Constant(ir.VectorType(I32, 64), list(range(64))))
        result = ir.Constant(self.vec, None)
        for j in range(self.lanes):
            k = b.extract_element(index, ir.Constant(I32, j))
            byte = b.extract_element(whole, b.and_(k, ir.Constant(I8, 63)))
            byte = b.select(b.icmp_unsigned("<", k, ir.Constant(I8, 64)), byte, ir.Constant(I8, 0))
            result = b.insert_element(result, byte, ir.Constant(I32, j))
        return result

    def lookup(self, b: ir.IRBuilder, regs: Sequence[ir.Value], codes: ir.Value) -> tuple[ir.Value, ir.Value]:
        """The low and high result bytes of 16 codes."""
        shifted = [codes] + [b.sub(codes, ir.Constant(self.vec, [64 * k] * self.lanes)) for k in (1, 2, 3)]

        def plane(r: Sequence[ir.Value]) -> ir.Value:
            parts = [self.tbl4(b, r[4 * k : 4 * k + 4], shifted[k]) for k in range(4)]
            return b.or_(b.or_(parts[0], parts[1]), b.or_(parts[2], parts[3]))

        return plane(regs[0:16]), plane(regs[16:32])

    def permute16(self, b: ir.IRBuilder, table: ir.Value, index: ir.Value) -> ir.Value:
        """``result[j] = table[index[j]]`` for 16 bytes (indices below 16): ``tbl`` with one
        register (emulated: the portable form)."""
        if self.emulate:
            return b.call(_permute16_lanes(b.module), [table, index])
        fn = _intrinsic(b.module, "llvm.aarch64.neon.tbl1.v16i8", _BYTES16, [_BYTES16, _BYTES16])
        return b.call(fn, [table, index])


@dataclasses.dataclass(frozen=True)
class _Rows:
    """How a row of codes is looked up in one table block: the scalar ``lut16`` (``isa`` None),
    or ``isa``'s vector loop with ordinary or streaming stores."""

    lut16: ir.Function
    isa: _Vbmi | _Neon | None = None
    stream: bool = False

    def load_table(self, b: ir.IRBuilder, table: ir.Value) -> list[ir.Value]:
        return self.isa.load_table(b, table) if self.isa is not None else []

    def row(self, b: ir.IRBuilder, src: ir.Value, n: Int, table: ir.Value, regs: list[ir.Value], dst: ir.Value) -> None:
        """``dst[i] = lookup(src[i])`` for ``i < n``, ``regs`` from ``load_table``."""
        if self.isa is None:
            b.call(self.lut16, [src, n.value, table, dst])
        elif not self.stream:
            _lookup_row(b, self.isa, self.lut16, src, n, table, regs, dst, streaming=False)
        else:
            # Streaming stores need 64-byte-aligned addresses: the codes up to dst's first
            # 64-byte boundary go through the scalar loop.
            address = Int(b, b.ptrtoint(dst, I64))
            head = (((64 - (address & 63)) & 63) >> 1).min(n)
            b.call(self.lut16, [src, head.value, table, dst])
            _lookup_row(b, self.isa, self.lut16, at(b, src, head), n - head, table, regs, at(b, dst, head, I16), streaming=True)


def _lookup_row(b, isa, lut16, src: ir.Value, n: Int, table: ir.Value, regs, dst: ir.Value, streaming: bool) -> None:
    """``L = isa.lanes``::

        for (j = 0; j < n / L; j++) {
            codes = src[j*L .. j*L + L];            // one vector load
            lo, hi = isa.lookup(table, codes);     // the result bytes of L codes
            dst[j*L .. j*L + L] = interleave(lo, hi);   // L little-endian 16-bit results
        }
        lut16(src + n / L * L, n % L, table, dst + n / L * L);   // the tail

    ``streaming``: non-temporal stores (``dst`` 64-byte aligned): the destination's cache lines
    are not read first, half the memory traffic of ordinary stores for a large output.
    """
    lanes = isa.lanes
    interleave = ir.Constant(ir.VectorType(I32, 2 * lanes), [k for i in range(lanes) for k in (i, lanes + i)])
    with loop(b, n // lanes) as j:
        offset = j.index * lanes
        codes = b.load(at(b, src, offset), typ=isa.vec, align=1)
        lo, hi = isa.lookup(b, regs, codes)
        pairs = b.shuffle_vector(lo, hi, interleave)
        out = b.store(pairs, at(b, dst, offset, I16), align=64 if streaming else 1)
        if streaming:
            out.set_metadata("nontemporal", b.module.add_metadata([ir.Constant(I32, 1)]))
    done = n // lanes * lanes
    b.call(lut16, [at(b, src, done), (n - done).value, table, at(b, dst, done, I16)])


def _lut16_entry(module: ir.Module, name: str, rows: _Rows) -> None:
    """``void NAME(const uint8_t *src, int64_t n, const uint8_t *table, uint16_t *dst)``: the
    lookup of ``rows`` over one row of ``n`` codes (streaming ones end with a fence)."""
    _, b, a = _define(module, name, SIGNATURES[name])
    rows.row(b, a.src, a.n, a.table, rows.load_table(b, a.table), a.dst)
    if rows.stream:
        b.fence("seq_cst")
    b.ret_void()


# --- the scale grid ------------------------------------------------------------------------


def _grid(module: ir.Module, name: str, table_bf16: ir.Function, rows: _Rows) -> None:
    """``void NAME(src, dst, nr, w, r0, c0, scale, scols, b0, b1, period, values, nan, tables,
    group)`` (``SIGNATURES``): rows ``r0 .. r0+nr`` x columns ``c0 .. c0+w`` of a ``[rows, cols]``
    weight whose scale of element ``(r, c)`` is ``scale[srow(r) * scols + c / b1]``, with
    ``srow(r) = r / period * ceil(period / b0) + r % period / b0`` (a stack of matrices of
    ``period`` rows, each tiled afresh)::

        for (i = 0; i < nr; i += band) {             // a band: rows that share a scale row
            band = min(rows to the end of the scale block, of the matrix, of the rectangle);
            for (k = 0; k < blocks; k++)              // the band's tables, one per block column
                table_bf16(values, nan, scale[srow(r0 + i) * scols + c0 / b1 + k], tables + 1024 * k);
            for (q = 0; q < band; q += rows)  {       // groups of `group` rows
                rows = min(group, band - q);
                for (k = 0; k < blocks; k++)          // one table's registers across the group
                    for (r = 0; r < rows; r++)
                        lookup(row i + q + r, the columns of block column k, tables + 1024 * k);
            }
        }
    """
    _, b, a = _define(module, name, SIGNATURES[name])
    per_matrix = (a.period + a.b0 - 1) // a.b0  # scale rows of one matrix
    first_block = a.c0 // a.b1
    col_end = a.c0 + a.w
    blocks = (col_end - 1) // a.b1 - first_block + 1
    with loop(b, a.nr) as band_loop:
        i = band_loop.index
        r = a.r0 + i
        row_in_matrix = r % a.period
        scale_row = r // a.period * per_matrix + row_in_matrix // a.b0
        band = (a.b0 - row_in_matrix % a.b0).min(a.period - row_in_matrix).min(a.nr - i)
        with loop(b, blocks) as k:
            s = load(b, a.scale, scale_row * a.scols + first_block + k.index, F32, 4)
            b.call(table_bf16, [a.values, a.nan, s, at(b, a.tables, k.index * TABLE_BYTES)])
        with loop(b, band) as group_loop:
            q = group_loop.index
            group_rows = a.group.min(band - q)
            with loop(b, blocks) as k:
                block = first_block + k.index
                start = (block * a.b1).max(a.c0)
                end = ((block + 1) * a.b1).min(col_end)
                offset = (i + q) * a.w + (start - a.c0)
                table = at(b, a.tables, k.index * TABLE_BYTES)
                regs = rows.load_table(b, table)
                with loop(b, group_rows) as row:
                    at_row = offset + row.index * a.w
                    rows.row(b, at(b, a.src, at_row), end - start, table, regs, at(b, a.dst, at_row, I16))
            group_loop.step = group_rows
        band_loop.step = band
    if rows.stream:
        b.fence("seq_cst")  # streaming stores are weakly ordered: visible to all once we return
    b.ret_void()


# --- 4-bit codes, two a byte: a table of 16 results per block --------------------------------

#: Codes of a 4-bit codec: entries of a block's table, and codes looked up per step.
_NIBBLE_CODES = 16
#: A group kernel's scratch (``tables``): one block's 16 results, at most 4 bytes each.
GROUP_TABLE_BYTES = 64
_BYTES16 = ir.VectorType(I8, _NIBBLE_CODES)


@dataclasses.dataclass(frozen=True)
class _Result:
    """What a group kernel writes: ``bf16`` (float32 rounded to nearest even, as torch rounds)
    or ``f32`` (the float32 result itself), one ``word`` per result."""

    name: str
    word: ir.IntType

    @property
    def planes(self) -> int:
        """Bytes of one result."""
        return self.word.width // 8

    def words(self, b: ir.IRBuilder, y: ir.Value) -> ir.Value:
        """The result words of the float32 vector ``y``."""
        lanes = y.type.count
        if self.name == "f32":
            return b.bitcast(y, ir.VectorType(I32, lanes))
        return b.trunc(_bf16_bits(b, y).value, ir.VectorType(I16, lanes))


_BF16, _F32 = _Result("bf16", I16), _Result("f32", I32)


def _splat(b: ir.IRBuilder, x: ir.Value, lanes: int) -> ir.Value:
    """``x`` in each of ``lanes`` lanes."""
    vec = ir.VectorType(x.type, lanes)
    one = b.insert_element(ir.Constant(vec, None), x, ir.Constant(I32, 0))
    return b.shuffle_vector(one, ir.Constant(vec, None), ir.Constant(ir.VectorType(I32, lanes), None))  # lane 0 everywhere


def _shuffle(b: ir.IRBuilder, x: ir.Value, y: ir.Value, lanes: Sequence[int]) -> ir.Value:
    """``{(x ++ y)[k] for k in lanes}``: lanes of ``x`` then of ``y``, picked by constants."""
    return b.shuffle_vector(x, y, ir.Constant(ir.VectorType(I32, len(lanes)), list(lanes)))


def _permute16_lanes(module: ir.Module) -> ir.Function:
    """``<16 x i8> permute16(<16 x i8> table, <16 x i8> index)``: ``result[j] = table[index[j]]``
    for 16 bytes, every index below 16, written lane by lane in generic IR. LLVM's instruction
    selection turns that into the host's byte shuffle where it has one (x86 SSSE3 ``pshufb``,
    AArch64 ``tbl``; ``tests/test_kernel_ir.py`` checks both for the portable module), and into
    16 moves where it has none. The recognition is fragile: it needs each lane's index taken
    from one vector, in order (see ``_lookup16``), and compiled for AVX-512 it fails (LLVM
    merges the byte shuffles with the interleave after them), which is why the vector variants
    name their instruction (``permute16`` of ``_Vbmi`` and ``_Neon``).

    One internal function a module, inlined where it is called (written at each call, its 48
    instructions made the group kernels' IR six times as long, and building it 35 ms slower)."""
    fn = module.globals.get("permute16")
    if fn is not None:
        return fn
    fn = ir.Function(module, ir.FunctionType(_BYTES16, [_BYTES16, _BYTES16]), "permute16")
    fn.linkage = "internal"
    fn.attributes.add("alwaysinline")
    fn.attributes.add("nounwind")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    table, index = fn.args
    result = ir.Constant(_BYTES16, None)
    for j in range(_NIBBLE_CODES):
        lane = ir.Constant(I32, j)
        result = b.insert_element(result, b.extract_element(table, b.extract_element(index, lane)), lane)
    b.ret(result)
    return fn


def _permute16(b: ir.IRBuilder, isa, table: ir.Value, index: ir.Value) -> ir.Value:
    """``result[j] = table[index[j]]`` for 16 bytes (every index below 16): ``isa``'s
    instruction, or the portable form."""
    if isa is None:
        return b.call(_permute16_lanes(b.module), [table, index])
    return isa.permute16(b, table, index)


def _block_results(b: ir.IRBuilder, result: _Result, a, values: ir.Value, after: ir.Value, plain: ir.Value, cell: Int):
    """The 16 results of the block whose scale is ``scale[cell]``, as a vector of words::

        for (c = 0; c < 16; c++)                         // one 16-lane vector
            words[c] = RESULT(plain ? values[c] * scale[cell]
                                    : ((values[c] - zero[cell * zeros]) * scale[cell]) * after);

    ``plain``: no zero point and ``after`` 1.0, the usual case. It changes no bit (``x - 0.0``
    and ``x * 1.0`` are ``x``), only skips two operations (a test per block that always goes
    the same way costs less).
    """
    s = _splat(b, load(b, a.scale, cell, F32, 4), _NIBBLE_CODES)
    with b.if_else(plain) as (if_plain, otherwise):
        with if_plain:
            product = b.fmul(values, s)
            plain_block = b.block
        with otherwise:
            z = _splat(b, load(b, a.zero, cell * a.zeros, F32, 4), _NIBBLE_CODES)
            full = b.fmul(b.fmul(b.fsub(values, z), s), after)
            full_block = b.block
    y = b.phi(values.type)
    y.add_incoming(product, plain_block)
    y.add_incoming(full, full_block)
    return result.words(b, y)


def _byte_planes(b: ir.IRBuilder, result: _Result, words: ir.Value) -> list[ir.Value]:
    """Byte ``q`` of each of the 16 results, for each ``q`` (a constant shuffle of their bytes)."""
    size = _NIBBLE_CODES * result.planes
    as_bytes = b.bitcast(words, ir.VectorType(I8, size))
    # One shuffle to plane order (x86: one pshufb per 16 bytes and one cross-lane permute), then
    # each plane a slice: LLVM compiles 2-4 separate strided shuffles less well.
    planes = range(result.planes)
    by_plane = _shuffle(b, as_bytes, as_bytes, [q + result.planes * j for q in planes for j in range(_NIBBLE_CODES)])
    return [_shuffle(b, by_plane, by_plane, range(_NIBBLE_CODES * q, _NIBBLE_CODES * (q + 1))) for q in planes]


def _lookup16(b: ir.IRBuilder, isa, result: _Result, planes: Sequence[ir.Value], codes: ir.Value, out: ir.Value) -> None:
    """The results of the 16 codes in the 8 bytes at ``codes`` into ``out[0 .. 16]``::

        index = {codes[0] & 15, codes[0] >> 4, codes[1] & 15, ..., codes[7] >> 4};
        for (q = 0; q < sizeof(RESULT); q++) picked[q] = permute16(planes[q], index);
        out[0 .. 16] = interleave(picked);    // byte q of out[j] is picked[q][j]
    """
    x = b.zext(b.load(codes, typ=ir.VectorType(I8, 8), align=1), ir.VectorType(I16, 8))
    # The two nibbles of byte j as bytes 2j and 2j + 1 of a 16-bit lane. (Not a shuffle of
    # x & 15 with x >> 4: LLVM would then take each lane's index from one or the other and no
    # longer see a byte shuffle, see _permute16_lanes.)
    low = b.and_(x, ir.Constant(x.type, 0x0F))
    high = b.and_(b.shl(x, ir.Constant(x.type, 4)), ir.Constant(x.type, 0xF00))
    nibbles = b.or_(low, high)
    index = b.bitcast(nibbles, _BYTES16)
    picked = [_permute16(b, isa, plane, index) for plane in planes]
    if len(picked) == 4:  # float32: planes 0 and 1 side by side, then 2 and 3
        picked = [_shuffle(b, picked[q], picked[q + 1], range(2 * _NIBBLE_CODES)) for q in (0, 2)]
    # picked[0] ++ picked[1] holds plane q at lanes 16q .. 16q + 15
    interleave = [_NIBBLE_CODES * q + j for j in range(_NIBBLE_CODES) for q in range(result.planes)]
    store(b, _shuffle(b, picked[0], picked[1], interleave), out, 0, 1)


def _group(module: ir.Module, result: _Result, isa) -> None:
    """``void group_RESULT(src, dst, nr, w, r0, c0, scale, zero, zeros, scols, b0, b1, period,
    values, after, tables)`` (``SIGNATURES``): rows ``r0 .. r0+nr`` x columns ``c0 .. c0+w`` of a
    ``[rows, cols]`` weight of 4-bit codes, the formula of ``formats.pairing.Quantized`` with
    element ``(r, c)``'s scale cell ``at = srow(r) * scols + c / b1`` (``srow`` as in
    ``grid_bf16``)::

        row_bytes = (c0 + w + 1) / 2 - c0 / 2;           // code_span(c0, c0 + w, 4)
        whole = c0 % b1 == 0 && w % b1 == 0 && b1 % 16 == 0;
        for (i = 0; i < nr; i++) {
            const uint8_t *codes = src + i * row_bytes;  // column c0 + j: nibble (c0 & 1) + j
            RESULT *out = dst + i * w;
            for (k = c0 / b1; k <= (c0 + w - 1) / b1; k++) {   // the row's block columns
                at = srow(r0 + i) * scols + k;
                words = block_results(at);              // one 16-lane vector
                start = max(k * b1, c0); end = min((k + 1) * b1, c0 + w);
                if (whole)                               // whole blocks of whole steps: whole
                    for (j = start; j < end; j += 16)    // rows, usually
                        lookup16(planes(words), codes + (j - c0) / 2, out + j - c0);
                else
                    nibbles(codes, start - c0 + (c0 & 1), end - start, words, out + start - c0);
            }
        }

    Each operation is one float32 operation, in the reference's order (``x - 0.0`` and
    ``x * 1.0`` are exact, so a weight without a zero point or global scale gets its bits), and
    ``RESULT`` rounds once. No result may be NaN (the caller checks that the scales, zero points
    and ``after`` are finite and ``after`` is not 0): torch writes NaN bits of its own choosing.
    """
    name = f"group_{result.name}"
    _, b, a = _define(module, name, SIGNATURES[name])
    values = b.load(a.values, typ=ir.VectorType(F32, _NIBBLE_CODES), align=4)
    after = _splat(b, a.after, _NIBBLE_CODES)
    per_matrix = (a.period + a.b0 - 1) // a.b0  # scale rows of one matrix
    col_end = a.c0 + a.w
    row_bytes = (col_end + 1) // 2 - a.c0 // 2
    first_block = a.c0 // a.b1
    blocks = (col_end - 1) // a.b1 - first_block + 1
    remainders = (a.c0 % a.b1) | (a.w % a.b1) | (a.b1 % _NIBBLE_CODES)
    whole = b.icmp_unsigned("==", remainders.value, ir.Constant(I64, 0))
    no_zero = b.icmp_unsigned("==", a.zeros.value, ir.Constant(I64, 0))
    plain = b.and_(no_zero, b.fcmp_ordered("==", a.after, ir.Constant(F32, 1.0)))
    with loop(b, a.nr) as i:
        r = a.r0 + i.index
        scale_row = r // a.period * per_matrix + r % a.period // a.b0
        codes = at(b, a.src, i.index * row_bytes)
        out = at(b, a.dst, i.index * a.w, result.word)
        with b.if_else(whole) as (whole_blocks, general):
            with whole_blocks:
                with loop(b, blocks) as k:
                    cell = scale_row * a.scols + first_block + k.index
                    planes = _byte_planes(b, result, _block_results(b, result, a, values, after, plain, cell))
                    with loop(b, a.b1 // _NIBBLE_CODES) as step:
                        j = k.index * a.b1 + step.index * _NIBBLE_CODES
                        _lookup16(b, isa, result, planes, at(b, codes, j // 2), at(b, out, j, result.word))
            with general:
                with loop(b, blocks) as k:
                    block = first_block + k.index
                    words = _block_results(b, result, a, values, after, plain, scale_row * a.scols + block)
                    start = (block * a.b1).max(a.c0)
                    end = ((block + 1) * a.b1).min(col_end)
                    first = start - a.c0 + (a.c0 & 1)  # the nibble of its first code in the row's bytes
                    _nibbles(b, isa, result, codes, first, end - start, words, a.tables, at(b, out, start - a.c0, result.word))
    b.ret_void()


def _nibbles(b: ir.IRBuilder, isa, result: _Result, codes: ir.Value, p: Int, n: Int, words, table: ir.Value, out: ir.Value):
    """``n`` results from nibble ``p`` of ``codes`` on (nibble ``2j`` is the low half of byte
    ``j``), each code's entry of ``words``, a block's 16 results (``table``: scratch for them)::

        table[0 .. 16] = words;
        if (p & 1) { *out++ = table[codes[p / 2] >> 4]; p++; n--; }   // a high nibble first
        codes += p / 2;
        for (j = 0; j < n / 16 * 16; j += 16)             // 16 codes from 8 bytes
            lookup16(planes(words), codes + j / 2, out + j);
        for (; j < n; j++) out[j] = table[(codes[j / 2] >> 4 * (j & 1)) & 15];   // the rest
    """
    word = result.word
    align = word.width // 8
    store(b, words, table, 0, 64)
    odd = p & 1
    with b.if_then(odd > 0):
        high = b.lshr(load(b, codes, p // 2, I8, 1), ir.Constant(I8, 4))
        store(b, load(b, table, b.zext(high, I64), word, align), out, 0, align)
    n = n - odd
    codes = at(b, codes, (p + odd) // 2)
    out = at(b, out, odd, word)
    planes = _byte_planes(b, result, words)
    with loop(b, n // _NIBBLE_CODES) as step:
        j = step.index * _NIBBLE_CODES
        _lookup16(b, isa, result, planes, at(b, codes, j // 2), at(b, out, j, word))
    done = n // _NIBBLE_CODES * _NIBBLE_CODES
    with loop(b, n, start=done) as j:
        byte = Int(b, b.zext(load(b, codes, j.index // 2, I8, 1), I64))
        code = (byte >> ((j.index & 1) * 4)) & 15
        store(b, load(b, table, code, word, align), out, j.index, align)


# --- variants --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """One module of kernels and which of its functions ``jit`` calls for each job."""

    name: str
    isa: str | None  #: "vbmi", "neon", "neon-emulated", or None for scalar loops only
    lut16: str  #: the 16-bit lookup
    lut16_stream: str  #: the same with streaming stores (or the ordinary one)
    grid_bf16_stream: str  #: the grid with streaming stores (or the ordinary one)


VARIANTS = {
    v.name: v
    for v in (
        Variant("portable", None, "lut16", "lut16", "grid_bf16"),
        Variant("vbmi", "vbmi", "lut16_vbmi", "lut16_stream", "grid_bf16_stream"),
        Variant("neon", "neon", "lut16_neon", "lut16_neon", "grid_bf16"),
        Variant("neon-emulated", "neon-emulated", "lut16_neon", "lut16_neon", "grid_bf16"),
    )
}


def assemble(variant: str, triple: str | None = None, data_layout: str | None = None) -> ir.Module:
    """The module of ``variant`` (a key of ``VARIANTS``), for ``triple`` where given."""
    v = VARIANTS[variant]
    module = ir.Module(name=f"lazyfp8_{v.name}")
    if triple:
        module.triple = triple
    if data_layout:
        module.data_layout = data_layout
    lut16 = _lut(module, "lut16", I16, _WORDS)
    _lut(module, "lut32", I32, 0)
    table_bf16 = _table_bf16(module)
    isa = {None: None, "vbmi": _Vbmi(), "neon": _Neon(emulate=False), "neon-emulated": _Neon(emulate=True)}[v.isa]
    rows = _Rows(lut16, isa)
    if isa is not None:
        _lut16_entry(module, v.lut16, rows)
    _grid(module, "grid_bf16", table_bf16, rows)
    _group(module, _BF16, isa)
    _group(module, _F32, isa)
    if v.lut16_stream != v.lut16:
        streaming = _Rows(lut16, isa, stream=True)
        _lut16_entry(module, v.lut16_stream, streaming)
        _grid(module, v.grid_bf16_stream, table_bf16, streaming)
    return module
