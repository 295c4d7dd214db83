"""Machine-code table lookups, compiled at first use with llvmlite.

torch has no byte-indexed table lookup that runs near memory speed: ``index_select`` moves about
one element per cycle. The kernels here do the same lookups over the same tables, so their bits
are those of the pure-torch kernels in ``dequant`` (and the tests compare the two):

- ``lut16``/``lut32``: ``dst[i] = table[src[i]]`` for 2- and 4-byte outputs. On CPUs with
  AVX-512 VBMI, 64 codes at a time through ``vpermi2b`` over the table's low and high bytes,
  faster than a memcpy of the output; on AArch64, 16 at a time through NEON ``tbl``; elsewhere
  a scalar loop that LLVM compiles for the host.
- ``grid_bf16``: a scale grid. For each scale it meets it builds the 256-entry table of
  ``bf16(value(code) * scale)`` (round to nearest even, NaN codes as torch writes them), then
  looks that block's codes up in it.
- ``group``: 4-bit codes (FP4 e2m1, int4), two a byte, with a scale grid, zero points and a
  global scale, into bfloat16 or float32: per block the 16 results of the formula as one
  float32 vector (rounded as torch rounds), then 16 codes per step through a byte shuffle
  (``pshufb``, ``tbl``) of the results' bytes.
- ``stream=True``: for large outputs written straight into their destination, streaming
  (non-temporal) stores, which do not read the destination's cache lines first.

llvmlite ships LLVM inside its wheels, so this needs no compiler on the user's machine. Without
it, or with ``LAZYFP8_JIT=0`` in the environment, or if compilation fails, ``kernels()`` returns
``None`` and callers use the pure-torch kernels. The kernels are written in ``ir`` (which also
declares each exported function's parameters: the ctypes types here are derived from that); the
machine code is cached on disk by ``jit_cache``, so only the first process on a machine pays
for code generation.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import sys
import threading

import torch

from .jit_cache import ObjectCache, cache_dir

__all__ = ["JitKernels", "kernels"]

# Rows a grid kernel takes together per block column: enough to reuse each table's registers,
# few enough that the rows' streams stay prefetchable. Measured on an 8192 x 8192 weight with
# 128 x 128 blocks, one thread (GB/s for 1, 2, 4, 8, 16, 128 rows): ordinary stores 9.2, 10.8,
# 13.1, 12.5, 7.7, 6.4; streaming stores 11.1, 14.1, 17.4, 18.5, 17.3, 6.3.
_ROWS_PER_GROUP = {False: 4, True: 8}

log = logging.getLogger(__name__)

#: The ctypes type of each parameter kind of ``ir.SIGNATURES``.
_CTYPES = {"in": ctypes.c_void_p, "out": ctypes.c_void_p, "i64": ctypes.c_int64, "f32": ctypes.c_float}


class _Entry:
    """One exported function of the machine code, called by parameter name as ``ir`` declares
    them: ``fn(src=..., n=..., table=..., dst=...)``. A name missing or unknown is a TypeError,
    so a signature changed in ``ir`` cannot be called with its old argument order."""

    def __init__(self, engine, name: str, params):
        self.name = name
        self._names = tuple(p.name for p in params)
        ctype = ctypes.CFUNCTYPE(None, *(_CTYPES[p.kind] for p in params))
        self._fn = ctype(engine.get_function_address(name))

    def __call__(self, **args: int) -> None:
        if set(args) != set(self._names):
            raise TypeError(f"{self.name} takes {', '.join(self._names)}; got {', '.join(args)}")
        self._fn(*(args[n] for n in self._names))


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

    def __init__(self, engine, variant, signatures, table_bytes: int, group_table_bytes: int, from_cache: bool):
        self._engine = engine  # owns the machine code the function pointers point into
        self.variant: str = variant.name  #: "vbmi", "neon", "neon-emulated" or "portable" (``ir.VARIANTS``)
        self.from_cache = from_cache  #: the machine code came from the on-disk cache
        self.table_bytes: int = table_bytes  #: bytes of one ``table16`` block (and of grid scratch per block)
        self.group_table_bytes: int = group_table_bytes  #: scratch bytes of a ``group`` call

        def entry(name: str) -> _Entry:
            return _Entry(engine, name, signatures[name])

        self._lut16 = entry(variant.lut16)
        self._stream16 = entry(variant.lut16_stream)
        self._lut32 = entry("lut32")
        self._grid = entry("grid_bf16")
        self._grid_stream = entry(variant.grid_bf16_stream)
        self._group = {torch.bfloat16: entry("group_bf16"), torch.float32: entry("group_f32")}
        self._no_zero = torch.zeros(1)  # the zero point of a weight without zero points (read only)

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
        _require(codes.numel() == out.numel() and block.numel() == self.table_bytes, "sizes do not match")
        fn = self._stream16 if stream else self._lut16
        fn(src=codes.data_ptr(), n=codes.numel(), table=block.data_ptr(), dst=out.data_ptr())

    def lut32(self, codes: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> None:
        _require(all(map(_flat_cpu, (codes, table, out))), "tensors must be contiguous on the CPU")
        _require(codes.element_size() == 1 and out.element_size() == 4 == table.element_size(), "wrong item sizes")
        _require(codes.numel() == out.numel() and table.numel() == 256, "sizes do not match")
        self._lut32(src=codes.data_ptr(), n=codes.numel(), table=table.data_ptr(), dst=out.data_ptr())

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
        float32 grid, ``tables`` scratch of ``table_bytes`` per block column it meets;
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
        _require(tables.numel() >= blocks * self.table_bytes, "table scratch too small")
        last_scale_row = (r1 - 1) // period * -(-period // b0) + (r1 - 1) % period // b0
        _require(last_scale_row < scale.shape[0] and (col_start + w - 1) // b1 < scale.shape[1], "rectangle outside the scale grid")
        (self._grid_stream if stream else self._grid)(
            src=codes.data_ptr(), dst=out.data_ptr(), nr=nr, w=w, r0=r0, c0=col_start,
            scale=scale.data_ptr(), scols=scale.shape[1], b0=b0, b1=b1, period=period,
            values=values.data_ptr(), nan=nan.data_ptr(), tables=tables.data_ptr(), group=_ROWS_PER_GROUP[stream],
        )  # fmt: skip


    #: The output dtypes ``group`` writes.
    group_dtypes = (torch.bfloat16, torch.float32)

    def group(
        self,
        codes: torch.Tensor,
        out: torch.Tensor,
        rows: tuple[int, int],
        cols: tuple[int, int],
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        after: float,
        block: tuple[int, int],
        period: int,
        values: torch.Tensor,
        tables: torch.Tensor,
    ) -> None:
        """Dequantize the rectangle ``rows`` x ``cols`` of a weight of 4-bit codes into ``out``
        (``group_dtypes``): ``codes`` holds each row's bytes ``code_span(c0, c1, 4)`` back to
        back (two codes a byte, low nibble first), ``scale`` the float32 grid, ``zero`` float32
        zero points of the grid's shape or ``None``, ``after`` the global scale that multiplies
        the product (1.0 for none), ``values`` the codec's 16 float32 values, ``tables``
        ``group_table_bytes`` of 64-byte-aligned scratch. Every result must be finite or
        infinite, never NaN (see ``ir._group``)."""
        (r0, r1), (c0, c1) = rows, cols
        nr, w = r1 - r0, c1 - c0
        b0, b1 = block
        _require(all(map(_flat_cpu, (codes, out, scale, values, tables))), "tensors must be contiguous on the CPU")
        _require(nr > 0 and w > 0 and r0 >= 0 and c0 >= 0 and b0 > 0 and b1 > 0 and period > 0, "empty rectangle or block")
        _require(out.dtype in self.group_dtypes and out.numel() == nr * w, "the output is bfloat16 or float32, one a code")
        row_bytes = (c1 + 1) // 2 - c0 // 2
        _require(codes.dtype == torch.uint8 and codes.numel() >= nr * row_bytes, "codes do not fill the rectangle")
        _require(scale.dtype == torch.float32 and scale.dim() == 2, "the scale grid is 2-d float32")
        if zero is None:
            zero, zeros = self._no_zero, 0
        else:
            ok = _flat_cpu(zero) and zero.dtype == torch.float32 and zero.shape == scale.shape
            _require(ok, "zero points are float32 in the scale's shape")
            zeros = 1
        _require(values.dtype == torch.float32 and values.numel() == 16, "16 float32 code values")
        _require(tables.nbytes >= self.group_table_bytes and tables.data_ptr() % 64 == 0, "table scratch too small or unaligned")
        last_scale_row = (r1 - 1) // period * -(-period // b0) + (r1 - 1) % period // b0
        _require(last_scale_row < scale.shape[0] and (c1 - 1) // b1 < scale.shape[1], "rectangle outside the scale grid")
        self._group[out.dtype](
            src=codes.data_ptr(), dst=out.data_ptr(), nr=nr, w=w, r0=r0, c0=c0,
            scale=scale.data_ptr(), zero=zero.data_ptr(), zeros=zeros, scols=scale.shape[1], b0=b0, b1=b1, period=period,
            values=values.data_ptr(), after=after, tables=tables.data_ptr(),
        )  # fmt: skip


def _mode() -> str:
    """``LAZYFP8_JIT``: unset or ``1`` for the best kernels this CPU runs, ``scalar`` for the
    portable ones only (what a CPU without AVX-512 VBMI or NEON gets), ``neon`` for the NEON
    kernels (on a CPU without NEON their table lookups are emulated in generic code: slow, for
    testing their algorithm), ``0`` for none."""
    value = os.environ.get("LAZYFP8_JIT", "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    return value if value in ("scalar", "neon") else "best"


def _variant(mode: str, machine: str, features: str) -> str:
    """The ``ir.VARIANTS`` key for ``mode`` on a CPU of ``platform.machine()`` ``machine`` whose
    LLVM features are ``features`` (comma-separated ``+name``/``-name``)."""
    flags = features.split(",")
    arm = machine.lower() in ("aarch64", "arm64")
    if mode == "neon":
        return "neon" if arm else "neon-emulated"
    if mode == "best" and machine.lower() in ("x86_64", "amd64") and "+avx512vbmi" in flags:
        return "vbmi"
    if mode == "best" and arm and "-neon" not in flags:  # Advanced SIMD is part of AArch64
        return "neon"
    return "portable"


# Reentrant: the fork hook below takes it, and a thread that forks while holding it (a signal
# handler run in the middle of a compilation) must not wait for itself.
_compile_lock = threading.RLock()


def _after_fork_in_child() -> None:
    global _compile_lock
    _compile_lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    # A fork waits for a compilation in progress in another thread: the child then inherits the
    # finished kernels, never a held lock or LLVM stopped half-way through code generation (its
    # own locks would stay held in the child, where the compiling thread does not exist).
    os.register_at_fork(
        before=lambda: _compile_lock.acquire(),
        after_in_parent=lambda: _compile_lock.release(),
        after_in_child=_after_fork_in_child,
    )


@functools.cache
def _compile(mode: str) -> JitKernels | None:
    if sys.byteorder != "little":
        return None
    try:
        import llvmlite
        import llvmlite.binding as llvm

        from . import ir  # written with llvmlite.ir
    except ImportError:
        return None
    try:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        cpu = llvm.get_host_cpu_name()
        features = llvm.get_host_cpu_features().flatten()
        variant = ir.VARIANTS[_variant(mode, platform.machine(), features)]
        target = llvm.Target.from_default_triple()
        machine = target.create_target_machine(cpu=cpu, features=features, opt=3, jit=True)
        source = str(ir.assemble(variant.name, triple=target.triple, data_layout=str(machine.target_data)))
        ident = "\0".join([source, cpu, features, llvmlite.__version__, ".".join(map(str, llvm.llvm_version_info))])
        cache = ObjectCache(cache_dir(), hashlib.sha256(ident.encode()).hexdigest()[:32])
        cached = cache.load()
        module = llvm.parse_assembly(source)
        module.verify()
        if cached is None:
            passes = llvm.create_pass_builder(machine, llvm.create_pipeline_tuning_options(speed_level=3))
            passes.getModulePassManager().run(module, passes)
        engine = llvm.create_mcjit_compiler(module, machine)
        engine.set_object_cache(lambda _module, data: cache.store(data), lambda _module: cached)
        engine.finalize_object()
        tables = (ir.TABLE_BYTES, ir.GROUP_TABLE_BYTES)
        return JitKernels(engine, variant, ir.SIGNATURES, *tables, from_cache=cached is not None)
    except Exception as e:  # a broken or unusual LLVM: the torch kernels still work
        log.warning("lazyfp8: compiled kernels unavailable (%s); using the pure-torch kernels", e)
        return None


def kernels() -> JitKernels | None:
    """This process's compiled kernels for the ``LAZYFP8_JIT`` setting, or ``None`` (no llvmlite,
    ``LAZYFP8_JIT=0``, or a compilation failure, logged once). Compiled once per setting."""
    mode = _mode()
    if mode == "off":
        return None
    with _compile_lock:  # one compilation per process, whichever thread asks first
        return _compile(mode)
