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

__all__ = ["Param", "SIGNATURES", "VARIANTS", "Variant", "TABLE_BYTES", "assemble"]

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

SIGNATURES: dict[str, tuple[Param, ...]] = {
    "lut16": _LUT,  # dst: uint16_t[n]; table: a TABLE_BYTES block
    "lut32": _LUT,  # dst: uint32_t[n]; table: uint32_t[256]
    "table_bf16": (Param("values", "in"), Param("nan", "in"), Param("scale", "f32"), Param("table", "out")),
    "grid_bf16": _GRID,
    "lut16_vbmi": _LUT,
    "lut16_stream": _LUT,
    "grid_bf16_stream": _GRID,
    "lut16_neon": _LUT,
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

    def __rshift__(self, o):
        return self._op("lshr", o)

    def __lshift__(self, o):
        return self._op("shl", o)

    def __lt__(self, o) -> ir.Value:
        return self.b.icmp_unsigned("<", self.value, self._v(o))

    def __gt__(self, o) -> ir.Value:
        return self.b.icmp_unsigned(">", self.value, self._v(o))

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
        bits = Int(b, b.bitcast(y, I32))
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).trunc(I16)
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
    if v.lut16_stream != v.lut16:
        streaming = _Rows(lut16, isa, stream=True)
        _lut16_entry(module, v.lut16_stream, streaming)
        _grid(module, v.grid_bf16_stream, table_bf16, streaming)
    return module
