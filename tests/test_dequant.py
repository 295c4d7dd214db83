import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lazyfp8.kernels.dequant import GridKernel, PerTensorKernel, Workspace, choose_backend, code_values
from lazyfp8.kernels.plan import Rect
from tests.helpers import bits, reference
from tests.strategies import FLOAT_DTYPES, fp8_codes, scales

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]
ALL_CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8)
SCALES = [1e-38, 2.0**-126, 1e-10, 0.0123, 1.0, 3.5, 1e10, 3e38]


def run_per_tensor(codes_u8, fp8, scale, dtype):
    out = torch.empty(codes_u8.numel(), dtype=dtype)
    k = PerTensorKernel(fp8, torch.tensor(scale, dtype=torch.float32), dtype, codes_u8.numel(), backend=choose_backend())
    k(codes_u8, out, Rect(0, 1, 0, codes_u8.numel(), 0), Workspace())
    return out, k


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("scale", SCALES)
def test_every_code_bit_exact(fp8, dtype, scale, backend):
    # All 256 codes: +-0, subnormals 0x01-0x07, +-max (448 for e4m3fn), NaN.
    out, _ = run_per_tensor(ALL_CODES, fp8, scale, dtype)
    ref = reference(ALL_CODES.view(fp8), torch.tensor(scale), dtype)
    assert torch.equal(bits(out), bits(ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1 << 17, (1 << 17) + 1, (1 << 17) + 3])
def test_pair_table_path_bit_exact(dtype, n, monkeypatch):
    monkeypatch.setenv("LAZYFP8_JIT", "0")  # the pair table is the torch kernel's
    codes = ALL_CODES.repeat(n // 256 + 1)[:n].roll(7)
    out, k = run_per_tensor(codes, torch.float8_e4m3fn, 0.37, dtype)
    assert k.pairs is not None, "this size must take the pair-table path"
    assert torch.equal(bits(out), bits(reference(codes.view(torch.float8_e4m3fn), torch.tensor(0.37), dtype)))


def test_misaligned_output_falls_back_exactly(backend):
    n = 1 << 17
    codes = ALL_CODES.repeat(n // 256)
    k = PerTensorKernel(torch.float8_e4m3fn, torch.tensor(2.0), torch.bfloat16, n, backend=choose_backend())
    big = torch.empty(n + 1, dtype=torch.bfloat16)
    out = big[1:]  # 2-byte aligned, not 4
    k(codes, out, Rect(0, 1, 0, n, 0), Workspace())
    assert torch.equal(bits(out), bits(reference(codes.view(torch.float8_e4m3fn), torch.tensor(2.0), torch.bfloat16)))


def test_smallest_positive_subnormal_e4m3():
    # 0x01 is 2^-9 in e4m3fn.
    assert code_values(torch.float8_e4m3fn)[1].item() == 2.0**-9
    assert code_values(torch.float8_e4m3fn)[0x7E].item() == 448.0
    assert torch.isnan(code_values(torch.float8_e4m3fn)[0x7F])


def grid(codes, scale, block, dtype, rows, cols, budget, fp8=torch.float8_e4m3fn):
    """Dequantize [rows, cols] in rectangles as the source does, return the whole output."""
    from lazyfp8.kernels.plan import _split

    k = GridKernel(fp8, scale, block, rows, backend=choose_backend())
    out = torch.empty(rows * cols, dtype=dtype)
    flat = codes.reshape(-1)
    work = Workspace()
    covered = 0
    for rect in _split(0, rows, 0, cols, 0, budget):
        a, b = rect.local, rect.local + rect.numel
        assert rect.numel <= max(budget, cols if budget >= cols else budget)
        k(flat[a:b], out[a:b], rect, work)
        covered += b - a
    assert covered == rows * cols
    return out.reshape(rows, cols)


@given(
    shape=st.tuples(st.integers(1, 300), st.integers(1, 300)),
    block=st.tuples(st.integers(1, 160), st.integers(1, 160)),
    budget=st.integers(1, 5000),
    dtype=st.sampled_from(FLOAT_DTYPES),
    fp8=st.sampled_from(FP8),
    seed=st.integers(0, 2**16),
)
def test_grid_kernel_matches_reference_any_block_any_chunking(shape, block, budget, dtype, fp8, seed, backend):
    rows, cols = shape
    codes = fp8_codes(shape, fp8, seed)
    g = torch.Generator().manual_seed(seed)
    gs = (-(-rows // block[0]), -(-cols // block[1]))
    scale = torch.rand(gs, generator=g) * 10 + 1e-3
    out = grid(codes.view(torch.uint8), scale, block, dtype, rows, cols, budget, fp8)
    assert torch.equal(bits(out), bits(reference(codes, scale, dtype, block)))


def test_ragged_300x200_with_128_blocks(backend):
    codes = fp8_codes((300, 200), torch.float8_e4m3fn, 1)
    scale = torch.tensor([[1.0, 2.0], [4.0, 8.0], [16.0, 32.0]])
    out = grid(codes.view(torch.uint8), scale, (128, 128), torch.float32, 300, 200, 10**6)
    vals = codes.to(torch.float32)
    # Element [299, 199] is in the partial corner block (2, 1); [127, 127] in block (0, 0).
    for (i, j), s in {(299, 199): 32.0, (127, 127): 1.0, (128, 128): 8.0, (256, 0): 16.0}.items():
        assert bits(out[i, j]) == bits(vals[i, j] * s)


@given(scale=scales, seed=st.integers(0, 1000))
def test_per_tensor_any_scale(scale, seed, backend):
    codes = fp8_codes((300,), torch.float8_e4m3fn, seed)
    out, _ = run_per_tensor(codes.view(torch.uint8), torch.float8_e4m3fn, scale, torch.bfloat16)
    assert torch.equal(bits(out), bits(reference(codes, torch.tensor(scale, dtype=torch.float32), torch.bfloat16)))


def test_workspace_buffers_are_named_and_never_overlap():
    # Each job has its own buffer (a kernel's scratch never lands on the codes it reads); asking
    # again for one reuses it, grown when needed.
    work = Workspace()
    bufs = [work.codes(100), work.indices(100), work.products(100), work.tables(1024), work.staging(100, torch.bfloat16)]
    spans = sorted((b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in bufs)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert [b.dtype for b in bufs] == [torch.uint8, torch.int32, torch.float32, torch.uint8, torch.bfloat16]
    assert work.codes(50).data_ptr() == bufs[0].data_ptr() and work.codes(1000).numel() == 1000
    assert work.staging(10, torch.float32).dtype == torch.float32  # one staging buffer, any dtype


def test_grid_kernel_refuses_codes_that_do_not_fill_the_rectangle():
    k = GridKernel(torch.float8_e4m3fn, torch.ones(1, 1), (128, 128), 128, backend=choose_backend())
    with pytest.raises(ValueError, match="99 codes for a rectangle of 10 x 10"):
        k(torch.zeros(99, dtype=torch.uint8), torch.empty(99, dtype=torch.bfloat16), Rect(0, 10, 0, 10, 0), Workspace())
