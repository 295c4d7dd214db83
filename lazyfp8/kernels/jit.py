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
``None`` and callers use the pure-torch kernels. The IR is in ``_kernel_ir``; the machine code is
cached on disk by ``_jit_cache``, so only the first process on a machine pays for code generation.
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

from .ir import TABLE_BYTES, assemble
from .jit_cache import ObjectCache, cache_dir

__all__ = ["JitKernels", "kernels", "TABLE_BYTES"]

# Rows a grid kernel takes together per block column: enough to reuse each table's registers,
# few enough that the rows' streams stay prefetchable. Measured on an 8192 x 8192 weight with
# 128 x 128 blocks, one thread (GB/s for 1, 2, 4, 8, 16, 128 rows): ordinary stores 9.2, 10.8,
# 13.1, 12.5, 7.7, 6.4; streaming stores 11.1, 14.1, 17.4, 18.5, 17.3, 6.3.
_ROWS_PER_GROUP = {False: 4, True: 8}

log = logging.getLogger(__name__)

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
        source = assemble(vector)
        ident = "\0".join([source, cpu, features, llvmlite.__version__, ".".join(map(str, llvm.llvm_version_info))])
        cache = ObjectCache(cache_dir(), hashlib.sha256(ident.encode()).hexdigest()[:32])
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
