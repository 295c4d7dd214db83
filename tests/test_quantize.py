import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lazyfp8 import PerBlock, PerChannel, PerTensor
from lazyfp8.formats.quantize import NonFiniteError, fp8_max, quantize
from tests.helpers import bits, reference
from tests.strategies import random_tensor

GRANULARITIES = st.one_of(
    st.just(PerTensor()),
    st.just(PerChannel()),
    st.tuples(st.integers(1, 140), st.integers(1, 140)).map(PerBlock),
)


@given(
    shape=st.one_of(st.tuples(st.integers(1, 300)), st.tuples(st.integers(1, 200), st.integers(1, 200))),
    g=GRANULARITIES,
    fp8=st.sampled_from([torch.float8_e4m3fn, torch.float8_e5m2]),
    seed=st.integers(0, 1000),
)
def test_round_trip_within_half_an_fp8_step_and_requantizes_to_the_same_codes(shape, g, fp8, seed):
    if isinstance(g, PerChannel) and len(shape) < 2:
        g = PerTensor()
    w = random_tensor(shape, torch.float32, seed)
    codes, scale = quantize(w, g, fp8)
    assert codes.dtype == fp8 and codes.shape == w.shape
    assert tuple(scale.shape) == tuple(g.scale_shape(w.shape))
    assert torch.isfinite(scale).all() and (scale > 0).all()
    block = g.block_size(w.shape)
    back = reference(codes, scale, torch.float32, block)
    # |w - back| <= half the spacing of fp8 values at w's magnitude, times the scale
    rel = 2.0 ** -(4 if fp8 == torch.float8_e4m3fn else 3)
    s_full = reference(torch.ones_like(codes, dtype=torch.float32).to(fp8), scale, torch.float32, block)
    tiny = s_full * (2.0**-9 if fp8 == torch.float8_e4m3fn else 2.0**-16)
    assert ((w - back).abs() <= torch.maximum(w.abs() * rel, tiny) * 1.0001).all()
    codes2, scale2 = quantize(back, g, fp8)
    assert torch.equal(bits(scale2), bits(scale)) and torch.equal(bits(codes2), bits(codes))


def test_amax_maps_to_fp8_max():
    w = torch.tensor([[1.0, -3.0], [0.5, 2.0]])
    codes, scale = quantize(w, PerTensor())
    assert scale.item() == pytest.approx(3.0 / 448)
    assert codes.float().abs().max().item() == fp8_max(torch.float8_e4m3fn)


def test_zero_group_gets_a_finite_nonzero_scale():
    w = torch.zeros(4, 8)
    w[2:] = 1.0
    codes, scale = quantize(w, PerBlock((2, 8)))
    assert scale.tolist() == [[1.0], [pytest.approx(1 / 448)]]
    assert (codes[:2].float() == 0).all()


def test_ue8m0_scales_are_exponent_bytes():
    w = torch.randn(4, 64)
    codes, exps = quantize(w, PerBlock((1, 32)), ue8m0=True)
    assert exps.dtype == torch.uint8 and exps.shape == (4, 2)
    s = torch.exp2(exps.float() - 127)
    assert (w.reshape(4, 2, 32).abs().amax(-1) / s <= 448).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_names_the_tensor(bad):
    w = torch.ones(3, 3)
    w[1, 1] = bad
    with pytest.raises(NonFiniteError, match="'layers.0.w'"):
        quantize(w, PerTensor(), name="layers.0.w")


@pytest.mark.parametrize("g", [PerTensor(), PerChannel(), PerBlock((16, 16))])
def test_the_input_is_never_modified(g):
    # float32 input: .to(float32) would alias it, and the bands are divided in place
    w = torch.randn(64, 48)
    before = w.clone()
    quantize(w, g)
    assert torch.equal(w, before)


def test_tall_blocks_accumulate_amax_across_bands(monkeypatch):
    # a block row taller than one band (per-tensor on a big matrix) still gets its true amax
    monkeypatch.setattr(sys.modules["lazyfp8.formats.quantize"], "_BAND_ELEMENTS", 64)
    w = torch.randn(40, 16)
    w[37, 3] = 100.0
    codes, scale = quantize(w, PerTensor())
    assert scale.item() == pytest.approx(100.0 / 448)
    c2, s2 = quantize(w, PerBlock((32, 8)))
    assert s2[1, 0].item() == pytest.approx(100.0 / 448)
