"""The compiled kernels against the reference formula and against the pure-torch kernels."""

import ctypes
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lazyfp8.kernels import jit as _jit
from lazyfp8.kernels.dequant import TORCH, GridKernel, PerTensorKernel, Workspace, choose_backend, code_values
from lazyfp8.kernels.plan import Rect
from tests.helpers import bits, reference
from tests.strategies import fp8_codes

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]
ALL_CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8)

jit = _jit.kernels()
needs_jit = pytest.mark.skipif(jit is None, reason="compiled kernels unavailable (llvmlite not installed)")


@pytest.fixture(params=["best", "scalar", "neon"])
def compiled(request, monkeypatch):
    """The compiled kernels: the best this CPU runs, the portable ones, and the NEON ones (their
    ``tbl`` lookups emulated in generic code where the CPU is not AArch64)."""
    monkeypatch.setenv("LAZYFP8_JIT", {"best": "1", "scalar": "scalar", "neon": "neon"}[request.param])
    k = _jit.kernels()
    if request.param == "neon":
        assert k.variant in ("neon", "neon-emulated")
    return k


def whole(rows: int, cols: int) -> Rect:
    """Rectangle ``[0, rows) x [0, cols)``."""
    return Rect(0, rows, 0, cols, 0)


@needs_jit
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 127, 128, 1000, 4097])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_lut16_any_length_any_alignment(n, offset, compiled):
    # The vector loop takes 64 codes at a time; lengths around that and odd addresses check its
    # tail and its unaligned loads and stores.
    table = torch.randint(-(2**15), 2**15, (256,), dtype=torch.int16)
    codes = ALL_CODES.repeat(n // 256 + 2)[offset : offset + n]
    out = torch.full((n + offset + 1,), 7, dtype=torch.int16)
    compiled.lut16(codes, compiled.table16(table), out[offset : offset + n])
    assert torch.equal(out[offset : offset + n], table[codes.long()])
    assert (out[:offset] == 7).all() and out[offset + n] == 7, "wrote outside its destination"


@needs_jit
@pytest.mark.parametrize("n", [0, 1, 100, 4097])
def test_lut32(n, compiled):
    table = torch.randint(-(2**31), 2**31 - 1, (256,), dtype=torch.int32)
    codes = ALL_CODES.repeat(n // 256 + 1)[:n].roll(5)
    out = torch.empty(n, dtype=torch.int32)
    compiled.lut32(codes, table, out)
    assert torch.equal(out, table[codes.long()])


@needs_jit
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("scale", [1e-38, 2.0**-133, 0.0123, 1.0, 3.5, 1e35, 3e38])
def test_grid_every_code_every_scale(fp8, scale, compiled):
    # 256 columns x 1 block: every code once, in one table built by the compiled code; scales at
    # the edges give subnormal and overflowing (inf) products, and e5m2 has inf codes.
    codes = ALL_CODES.view(1, 256).repeat(4, 1)
    s = torch.tensor([[scale]], dtype=torch.float32)
    k = GridKernel(fp8, s, (4, 256), 4, backend=choose_backend())
    assert k.compiled is compiled
    out = torch.empty(4 * 256, dtype=torch.bfloat16)
    k(codes.reshape(-1), out, whole(4, 256), Workspace())
    assert torch.equal(bits(out), bits(reference(codes.view(fp8), torch.tensor(scale), torch.bfloat16).reshape(-1)))


@needs_jit
@given(
    rows=st.integers(1, 70),
    cols=st.integers(1, 700),
    block=st.sampled_from([(128, 128), (16, 64), (1, 512), (32, 32), (7, 300)]),
    period=st.sampled_from([None, 3, 16]),
    fp8=st.sampled_from(FP8),
    seed=st.integers(0, 2**16),
)
def test_grid_rectangles_match_torch_kernel(rows, cols, block, period, fp8, seed, monkeypatch, compiled):
    # Any rectangle of a (possibly stacked, ``period``-row) weight: the compiled kernel and the
    # torch kernel agree bit for bit.
    period = period or rows
    total = -(-rows // period) * period
    codes = fp8_codes((total, cols), fp8, seed).view(torch.uint8)
    g = torch.Generator().manual_seed(seed)
    grid_rows = -(-total // period) * -(-period // block[0])
    scale = torch.rand((grid_rows, -(-cols // block[1])), generator=g) * 4 + 1e-3
    r0 = seed % total
    r1 = min(total, r0 + 1 + seed % 37)
    c0 = seed % cols
    c1 = min(cols, c0 + 1 + seed % 611)
    rect = codes[r0:r1, c0:c1].contiguous().reshape(-1)
    outs = []
    mode = os.environ["LAZYFP8_JIT"]
    for flag, stream in ((mode, False), (mode, True), ("0", False)):
        monkeypatch.setenv("LAZYFP8_JIT", flag)
        k = GridKernel(fp8, scale, block, period, backend=choose_backend())
        out = torch.empty(rect.numel() + 1, dtype=torch.bfloat16)[seed % 2 :][: rect.numel()]  # any alignment
        if flag != "0":
            tables = torch.empty(-(-(c1 - 1) // block[1]) * compiled.table_bytes + 2 * compiled.table_bytes, dtype=torch.uint8)
            compiled.grid_bf16(rect, out, (r0, r1), c0, k.scale, block, period, k.values, k.nan, tables, stream)
        else:
            k(rect, out, Rect(r0, r1, c0, c1, 0), Workspace())
        outs.append(out)
    assert torch.equal(bits(outs[0]), bits(outs[2]))
    assert torch.equal(bits(outs[1]), bits(outs[2]))


@needs_jit
def test_grid_takes_the_compiled_path_for_large_blocks(monkeypatch):
    calls = []
    monkeypatch.setattr(type(jit), "grid_bf16", lambda self, *a: calls.append(a))
    k = GridKernel(torch.float8_e4m3fn, torch.ones(1, 1), (128, 128), 128, backend=choose_backend())
    k(torch.zeros(128 * 128, dtype=torch.uint8), torch.empty(128 * 128, dtype=torch.bfloat16), whole(128, 128), Workspace())
    assert len(calls) == 1


@needs_jit
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_per_tensor_kernel_uses_compiled_lookup(dtype, compiled):
    k = PerTensorKernel(torch.float8_e4m3fn, torch.tensor(0.5), dtype, 10, backend=choose_backend())
    assert k.compiled is compiled
    out = torch.empty(256, dtype=dtype)
    k(ALL_CODES, out, whole(1, 256), Workspace())
    assert torch.equal(bits(out), bits(reference(ALL_CODES.view(torch.float8_e4m3fn), torch.tensor(0.5), dtype)))


def test_environment_selects_the_kernels(monkeypatch):
    monkeypatch.setenv("LAZYFP8_JIT", "scalar")
    assert jit is None or _jit.kernels().variant == "portable"
    assert choose_backend().name == ("torch" if jit is None else "portable")
    monkeypatch.setenv("LAZYFP8_JIT", "0")
    assert _jit.kernels() is None and choose_backend() == TORCH
    assert PerTensorKernel(torch.float8_e4m3fn, torch.tensor(1.0), torch.bfloat16, 10, backend=choose_backend()).compiled is None


@pytest.mark.parametrize(
    ("mode", "machine", "features", "variant"),
    [
        ("best", "x86_64", "+avx2,+avx512vbmi,+avx512f", "vbmi"),
        ("best", "AMD64", "+avx2,-avx512vbmi", "portable"),
        ("scalar", "x86_64", "+avx512vbmi", "portable"),
        ("neon", "x86_64", "+avx2", "neon-emulated"),  # the test-only mode off AArch64
        ("best", "aarch64", "+neon,+fp-armv8", "neon"),
        ("best", "arm64", "", "neon"),  # macOS: Advanced SIMD is part of the architecture
        ("best", "aarch64", "-neon", "portable"),
        ("scalar", "aarch64", "+neon", "portable"),
        ("neon", "aarch64", "+neon", "neon"),
        ("best", "riscv64", "+v", "portable"),
    ],
)
def test_the_variant_each_cpu_gets(mode, machine, features, variant):
    assert _jit._variant(mode, machine, features) == variant


def test_compiled_kernels_on_other_devices_are_refused():
    fake = type(TORCH)("portable", compiled=object())
    with pytest.raises(ValueError, match="run on the CPU"):
        PerTensorKernel(torch.float8_e4m3fn, torch.tensor(1.0), torch.bfloat16, 10, backend=fake, device=torch.device("meta"))


@needs_jit
def test_call_types_come_from_the_signatures(compiled):
    # One declaration in ir.SIGNATURES: the ctypes argument types and the call's argument names
    # are derived from it.
    from lazyfp8.kernels import ir as _ir

    kinds = {"in": ctypes.c_void_p, "out": ctypes.c_void_p, "i64": ctypes.c_int64, "f32": ctypes.c_float}
    for entry in (compiled._lut16, compiled._stream16, compiled._lut32, compiled._grid, compiled._grid_stream, *compiled._group.values()):
        params = _ir.SIGNATURES[entry.name]
        assert entry._fn.argtypes == tuple(kinds[p.kind] for p in params)
        assert entry._names == tuple(p.name for p in params)
    with pytest.raises(TypeError, match="takes src, n, table, dst"):
        compiled._lut32(src=0, n=0, table=0)  # a missing argument is refused before the call


def test_without_llvmlite_falls_back_to_torch(tmp_path):
    # A fresh interpreter where importing llvmlite fails: loading still works, bit for bit.
    code = f"""
import sys
sys.modules["llvmlite"] = None
import torch
from lazyfp8 import LazyFP8View
from lazyfp8.kernels import jit as _jit
from lazyfp8.testing import quantize_per_tensor, reference
from safetensors.torch import save_file
assert _jit.kernels() is None
w = torch.randn(300, 70)
q, s = quantize_per_tensor(w)
save_file({{"w": q, "w_scale_inv": s}}, r"{tmp_path}/m.safetensors")
got = LazyFP8View(r"{tmp_path}/m.safetensors")["w"].materialize()
assert torch.equal(got.view(torch.int16), reference(q, s, torch.bfloat16).view(torch.int16))
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_nan_table_is_torchs_conversion():
    # NaN payloads are torch's choice; the compiled grid writes whatever torch writes.
    from lazyfp8.kernels.dequant import _nan_bf16

    for fp8 in FP8:
        assert torch.equal(_nan_bf16(fp8), code_values(fp8).to(torch.bfloat16).view(torch.int16))


@needs_jit
@pytest.mark.parametrize("n", [0, 5, 31, 32, 64, 1000, (1 << 19) + 77])
@pytest.mark.parametrize("offset", [0, 1, 2, 31])
def test_streaming_lut16_any_length_any_alignment(n, offset, compiled):
    # Non-temporal stores need 64-byte-aligned addresses: the head up to the boundary goes
    # through the scalar loop, whatever the destination's offset and length.
    table = torch.randint(-(2**15), 2**15, (256,), dtype=torch.int16)
    codes = ALL_CODES.repeat(n // 256 + 2)[offset : offset + n]
    out = torch.full((n + offset + 1,), 7, dtype=torch.int16)
    compiled.lut16(codes, compiled.table16(table), out[offset : offset + n], stream=True)
    assert torch.equal(out[offset : offset + n], table[codes.long()])
    assert (out[:offset] == 7).all() and out[offset + n] == 7, "wrote outside its destination"


@needs_jit
def test_per_tensor_streams_only_into_large_final_destinations(monkeypatch):
    seen = []
    real = type(jit).lut16
    monkeypatch.setattr(type(jit), "lut16", lambda self, c, b, o, stream=False: (seen.append(stream), real(self, c, b, o, stream)))
    k = PerTensorKernel(torch.float8_e4m3fn, torch.tensor(0.5), torch.bfloat16, 1 << 20, backend=choose_backend())
    codes = ALL_CODES.repeat(1 << 12)
    for final in (True, False):
        k(codes, torch.empty(codes.numel(), dtype=torch.bfloat16), whole(1, codes.numel()), Workspace(), final)
    k(codes[:1000], torch.empty(1000, dtype=torch.bfloat16), whole(1, 1000), Workspace(), True)
    assert seen == [True, False, False]


@needs_jit
def test_wrong_sizes_are_refused_before_any_write():
    # The machine code trusts its lengths, so the wrappers check them (not with assert: they
    # must hold under python -O too).
    codes = torch.zeros(100, dtype=torch.uint8)
    block = jit.table16(torch.zeros(256, dtype=torch.int16))
    with pytest.raises(ValueError, match="sizes"):
        jit.lut16(codes, block, torch.empty(99, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        jit.lut16(codes, block, torch.empty(200, dtype=torch.bfloat16)[::2])
    with pytest.raises(ValueError, match="sizes"):
        jit.lut32(codes, torch.zeros(255, dtype=torch.int32), torch.empty(100, dtype=torch.float32))
    k = GridKernel(torch.float8_e4m3fn, torch.ones(1, 1), (128, 128), 128, backend=choose_backend())
    tables = torch.empty(4 * jit.table_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="scale grid"):  # row 128 has no scale row
        jit.grid_bf16(codes[:100], torch.empty(100, dtype=torch.bfloat16), (128, 129), 0, k.scale, (128, 128), 256, k.values, k.nan, tables)
    with pytest.raises(ValueError, match="fill"):
        jit.grid_bf16(codes[:99], torch.empty(99, dtype=torch.bfloat16), (0, 2), 0, k.scale, (128, 128), 128, k.values, k.nan, tables)
