"""The compiled group kernels (``ir._group``: 4-bit codes, a 16-entry table per block) against
the pure-torch ``GroupKernel``, the formula's reference: bit for bit, for every code, extreme
scales, zero points, global scales, any rectangle of any weight, on every variant this CPU runs
(the NEON one emulated here)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lazyfp8.formats.codecs import CODECS, Codec
from lazyfp8.kernels import jit as _jit
from lazyfp8.kernels.dequant import TORCH, GroupKernel, Workspace, choose_backend
from lazyfp8.kernels.plan import Rect, code_span
from tests.helpers import bits

needs_jit = pytest.mark.skipif(_jit.kernels() is None, reason="compiled kernels unavailable (llvmlite not installed)")

#: Every 4-bit codec, and one with values no stored form has (any 16 finite floats must work).
CODECS4 = [c for c in CODECS.values() if c.bits == 4] + [
    Codec("uint4", 4, tuple(float(u) for u in range(16))),
    Codec("odd", 4, (0.0, -0.0, 1e-45, -3.0, 0.1, 7.25, -1e30, 3e38, 2.5, -0.5, 1e-40, 65504.0, -6.0, 6.0, 1.0, -1.0)),  # fmt: skip
]
OUT = [torch.bfloat16, torch.float32]
#: Scales at the edges of float32 (subnormal products, products rounding to 0, overflow to inf)
#: and between (1 + 2**-8 and 1 + 3 * 2**-8 times 1.0 are halfway between two bfloat16 values:
#: ties, one rounded down to even, one up).
EXTREME_SCALES = [2.0**-149, 1e-45, 1e-38, 2.0**-133, 1.1754942e-38, 0.0123, 1.0, 1 + 2**-8, 1 + 3 * 2**-8,
                  3.5, 1e35, 3e38, 3.4028235e38]  # fmt: skip


@pytest.fixture(params=["best", "scalar", "neon"])
def compiled(request, monkeypatch):
    """The compiled kernels: the best this CPU runs, the portable ones, and the NEON ones (their
    table lookups emulated in generic IR where the CPU is not AArch64)."""
    monkeypatch.setenv("LAZYFP8_JIT", {"best": "1", "scalar": "scalar", "neon": "neon"}[request.param])
    k = _jit.kernels()
    if k is None:
        pytest.skip("compiled kernels unavailable (llvmlite not installed)")
    return k


def pack_rect(codes: torch.Tensor, rect: Rect) -> torch.Tensor:
    """What ``TensorSource.read_rect`` reads for ``rect`` of a weight of 4-bit ``codes``
    (``[rows, cols]``, one code an element): each row's bytes ``code_span(c0, c1)``, back to back."""
    rows, cols = codes.shape
    padded = torch.zeros(rows, cols + (cols & 1), dtype=torch.uint8)
    padded[:, :cols] = codes
    stored = padded[:, 0::2] | (padded[:, 1::2] << 4)  # low nibble first
    first, last = code_span(rect.c0, rect.c1, 4)
    return stored[rect.r0 : rect.r1, first:last].contiguous().reshape(-1)


def both(codes, rect, codec, scale, block, period, out_dtype, **kw) -> tuple[torch.Tensor, torch.Tensor, GroupKernel]:
    """``rect`` dequantized by the compiled kernel and by the torch kernel."""
    packed = pack_rect(codes, rect)
    results = []
    for backend in (choose_backend(), TORCH):
        k = GroupKernel(codec, scale, block, period, out_dtype, backend=backend, **kw)
        out = torch.empty(rect.numel + 1, dtype=out_dtype)[1:]  # not 4-byte aligned
        k(packed, out, rect, Workspace())
        results.append((out, k))
    (got, compiled), (want, _) = results
    return got, want, compiled


@needs_jit
@pytest.mark.parametrize("codec", CODECS4, ids=lambda c: c.name)
@pytest.mark.parametrize("out_dtype", OUT, ids=str)
@pytest.mark.parametrize("zero", [None, 0.0, 7.5, -3.0, 1e38])
def test_every_code_every_extreme_scale(codec, out_dtype, zero, compiled):
    # One row per scale, its 16 codes in one block of 16: every code against every scale,
    # subnormal products (2**-149 * 0.5 rounds to 0), overflows to inf (3e38 * 6), zero points
    # large enough to swallow the code's value.
    scales = torch.tensor(EXTREME_SCALES).view(-1, 1)
    rows = scales.shape[0]
    codes = torch.arange(16, dtype=torch.uint8).repeat(rows, 1)
    zp = None if zero is None else torch.full((rows, 1), zero)
    got, want, k = both(codes, Rect(0, rows, 0, 16, 0), codec, scales, (1, 16), rows, out_dtype, zero_point=zp)
    assert k.compiled is compiled
    assert torch.equal(bits(got), bits(want))


@needs_jit
@pytest.mark.parametrize("divide", [False, True])
@pytest.mark.parametrize("g", [1e-30, 0.0073, 448.0 * 6.0 / 3.7, 1e30])
def test_global_scales(g, divide, compiled):
    # NVFP4's two conventions: every positive e4m3 block scale (a row each) with global scales
    # that push the combined scale to the edges of float32 (products that overflow to inf or
    # sink to subnormals)
    e4m3 = torch.arange(0x01, 0x7F, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    scales = e4m3.to(torch.float32).view(-1, 1)
    rows = scales.shape[0]
    codes = torch.arange(16, dtype=torch.uint8).repeat(rows, 2)
    gs = torch.tensor(g)
    if not torch.isfinite(scales / gs if divide else scales * gs).all():
        pytest.skip("a combined scale of inf would give NaN for code 0: the torch kernel's case")
    got, want, k = both(codes, Rect(0, rows, 0, 32, 0), CODECS["e2m1"], scales.repeat(1, 2), (1, 16), rows,
                        torch.bfloat16, global_scale=gs, divide=divide)  # fmt: skip
    assert k.compiled is compiled
    assert torch.equal(bits(got), bits(want))


def _scale_grid(draw, shape, kind):
    n = math.prod(shape)
    if kind == "e8m0":  # MX: powers of two across float32's range
        exps = draw(st.lists(st.integers(-127, 127), min_size=n, max_size=n))
        return torch.exp2(torch.tensor(exps, dtype=torch.float32)).view(shape)
    if kind == "e4m3":  # NVFP4 block scales: positive e4m3 values
        codes = draw(st.lists(st.integers(0x01, 0x7E), min_size=n, max_size=n))
        return torch.tensor(codes, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).view(shape)
    exps = torch.tensor(draw(st.lists(st.integers(-140, 127), min_size=n, max_size=n)), dtype=torch.float32)
    signs = torch.tensor(draw(st.lists(st.sampled_from([1.0, -1.0, 0.0]), min_size=n, max_size=n)))
    # any sign, zero, subnormal, near the maximum; a mantissa that makes ties (1 + 3 * 2**-8)
    mantissa = draw(st.sampled_from([1.37, 1 + 3 * 2**-8, 1 + 2**-8]))
    return (signs * torch.exp2(exps) * mantissa).view(shape)


@st.composite
def cases(draw):
    """A 4-bit weight of ``stack`` matrices of ``period`` rows, a block size (NVFP4's 1 x 16,
    MX's 1 x 32, int groups, per-channel, per-tensor, odd and 2-D blocks), its scale grid, maybe
    zero points and a global scale, and a rectangle anywhere in it (odd first column, odd width,
    several rows, across matrices)."""
    period = draw(st.integers(1, 9))
    stack = draw(st.integers(1, 3))
    rows = period * stack
    cols = draw(st.integers(1, 300))
    blocks = [(1, 16), (1, 32), (1, 64), (1, 128), (1, cols), (period, cols), (2, 16), (3, 7), (1, 1), (1, 33)]
    b0, b1 = draw(st.sampled_from(blocks))
    grid = (stack * -(-period // b0), -(-cols // b1))
    scale = _scale_grid(draw, grid, draw(st.sampled_from(["e8m0", "e4m3", "wide"])))
    zero = None
    if draw(st.booleans()):
        n = math.prod(grid)
        points = draw(st.lists(st.sampled_from([0.0, -0.0, 8.0, 7.0, -2.5, 0.375, 15.0]), min_size=n, max_size=n))
        zero = torch.tensor(points).view(grid)
    g = draw(st.sampled_from([None, 0.0073, 1e-20, 3e4]))
    r0 = draw(st.integers(0, rows - 1))
    r1 = draw(st.integers(r0 + 1, rows))
    c0 = draw(st.integers(0, cols - 1))
    c1 = draw(st.integers(c0 + 1, cols))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, cols), generator=gen, dtype=torch.int32).to(torch.uint8)
    return {
        "codes": codes, "rect": Rect(r0, r1, c0, c1, 0), "codec": draw(st.sampled_from(CODECS4)), "scale": scale,
        "block": (b0, b1), "period": period, "zero": zero, "g": g, "divide": draw(st.booleans()),
        "out_dtype": draw(st.sampled_from(OUT)),
    }  # fmt: skip


@needs_jit
@given(case=cases())
def test_any_rectangle_matches_the_torch_kernel(case, compiled):
    g = None if case["g"] is None else torch.tensor(case["g"])
    got, want, k = both(
        case["codes"], case["rect"], case["codec"], case["scale"], case["block"], case["period"], case["out_dtype"],
        zero_point=case["zero"], global_scale=g, divide=case["divide"],
    )  # fmt: skip
    if k.compiled is None:  # a scale over the global one that overflows (NaN for some code)
        assert not torch.isfinite(k.scale).all()
    assert torch.equal(bits(got), bits(want))


@needs_jit
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 200),
    b1=st.sampled_from([16, 32, 128, 5]),
    after=st.sampled_from([1.0, 0.0073, 3e35, 1e-30, -2.0]),
    seed=st.integers(0, 2**16),
)
def test_a_global_scale_that_multiplies_the_product(rows, cols, b1, after, seed, compiled):
    # ((v - z) * s) * g: the kernel's ``after``, against the formula in torch, element by element
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, cols), generator=gen, dtype=torch.int32).to(torch.uint8)
    grid = (rows, -(-cols // b1))
    scale = torch.exp2(torch.randint(-130, 120, grid, generator=gen).float()) * 1.37
    zero = torch.randint(-3, 9, grid, generator=gen).float()
    values = CODECS["e2m1"].values()
    c0 = seed % cols
    rect = Rect(0, rows, c0, cols, 0)
    out = torch.empty(rect.numel, dtype=torch.bfloat16)
    compiled.group(pack_rect(codes, rect), out, (0, rows), (c0, cols), scale, zero, after, (1, b1), rows, values,
                   Workspace().tables(compiled.group_table_bytes))  # fmt: skip
    cols_of = torch.arange(c0, cols) // b1
    v = values[codes[:, c0:].long()] - zero[:, cols_of]
    want = ((v * scale[:, cols_of]) * torch.tensor(after)).to(torch.bfloat16)
    assert torch.equal(bits(out), bits(want.reshape(-1)))


# --- which kernel serves ------------------------------------------------------------------------


@needs_jit
def test_what_stays_on_the_torch_kernel(monkeypatch):
    scale = torch.ones(4, 2)
    e2m1 = CODECS["e2m1"]

    def kernel(codec=e2m1, s=scale, out=torch.bfloat16, **kw):
        return GroupKernel(codec, s, (1, 16), 4, out, backend=choose_backend(), **kw)

    assert kernel().compiled is not None and kernel(out=torch.float32).compiled is not None
    assert kernel(out=torch.float16).compiled is None  # float16 outputs
    assert kernel(codec=CODECS["int8"]).compiled is None  # 8-bit codecs
    # a group scale over a tiny global scale overflows to inf: inf * 0 (code 0) is NaN
    assert kernel(global_scale=torch.tensor(1e-39), divide=True, s=scale * 1e3).compiled is None
    assert kernel(zero_point=torch.full((4, 2), float("inf"))).compiled is None
    monkeypatch.setenv("LAZYFP8_JIT", "0")
    assert kernel().compiled is None


@needs_jit
def test_the_view_reads_packed_weights_with_the_compiled_kernel(tmp_path, monkeypatch):
    # The whole path: a stored NVFP4 weight read through the view takes the compiled kernel
    # (whole rows, and a box starting inside a byte) and gives the torch kernel's bits.
    from safetensors.torch import save_file

    from lazyfp8 import LazyFP8View

    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (24, 96), generator=gen, dtype=torch.int32).to(torch.uint8)
    scale = torch.randint(0x08, 0x7F, (24, 6), generator=gen, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    save_file({"l.weight": pack_rect(codes, Rect(0, 24, 0, 96, 0)).view(24, 48), "l.weight_scale": scale,
               "l.weight_scale_2": torch.tensor(0.0123)}, tmp_path / "model.safetensors")  # fmt: skip
    calls = []
    real = _jit.JitKernels.group
    monkeypatch.setattr(_jit.JitKernels, "group", lambda self, *a: (calls.append(a[2:4]), real(self, *a)))
    reads = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LAZYFP8_JIT", flag)
        view = LazyFP8View(tmp_path, chunk_elements=500)
        reads[flag] = (view.get_tensor("l.weight"), view["l.weight"][3:17, 5:62])
    assert calls and all(isinstance(c, tuple) for c in calls)
    for a, b in zip(*reads.values()):
        assert torch.equal(bits(a), bits(b))


# --- the wrapper's checks -------------------------------------------------------------------------


@needs_jit
def test_wrong_sizes_are_refused_before_any_write():
    k = _jit.kernels()
    values = CODECS["e2m1"].values()
    scale = torch.ones(2, 1)
    tables = Workspace().tables(k.group_table_bytes)

    def call(codes=torch.zeros(16, dtype=torch.uint8), out=torch.empty(32, dtype=torch.bfloat16), rows=(0, 2), cols=(0, 16),
             s=scale, zero=None, t=tables):  # fmt: skip
        k.group(codes, out, rows, cols, s, zero, 1.0, (1, 16), 2, values, t)

    call()
    with pytest.raises(ValueError, match="fill"):
        call(codes=torch.zeros(15, dtype=torch.uint8))
    with pytest.raises(ValueError, match="one a code"):
        call(out=torch.empty(31, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="one a code"):
        call(out=torch.empty(32, dtype=torch.float16))
    with pytest.raises(ValueError, match="scale grid"):  # row 2 has no scale row
        call(rows=(1, 3), out=torch.empty(32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="scale grid"):  # column 16 has no scale column
        call(cols=(1, 17), codes=torch.zeros(18, dtype=torch.uint8))
    with pytest.raises(ValueError, match="zero points"):
        call(zero=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="table scratch"):
        call(t=torch.empty(128, dtype=torch.uint8)[1:65])
    with pytest.raises(ValueError, match="contiguous"):
        call(out=torch.empty(64, dtype=torch.bfloat16)[::2])
