import math
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


# --- 4-bit schemes: NVFP4 (both conventions), MXFP4, int4 ----------------------------------------


from lazyfp8.formats.quantize import MXFP4, NVFP4, Int4, e2m1_codes, unpack_nibbles  # noqa: E402

E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
PACKED = [NVFP4(divide=True), NVFP4(divide=False), MXFP4(), Int4(16), Int4(128), Int4(32, symmetric=False)]
# Relative slack for the float32 arithmetic around an exact bound (a quotient and a product, each
# rounded once).
SLACK = 1 + 2.0**-20


def divisor(scheme, scale, global_scale):
    """float32 per group: what a code's value is multiplied by (docs/formats.md, written out)."""
    if isinstance(scheme, NVFP4):
        s = scale.to(torch.float32)
        return s / global_scale if scheme.divide else s * global_scale
    if isinstance(scheme, MXFP4):
        return torch.exp2(scale.to(torch.float32) - 127)
    return scale.to(torch.float32)


def formula(scheme, p, shape):
    """The weight the stored codes and scales stand for, in float32."""
    codes = unpack_nibbles(p.codes).long()
    table = torch.tensor(E2M1_VALUES) if scheme.codec.name == "e2m1" else torch.arange(16.0) - 8
    d = divisor(scheme, p.scale, p.global_scale).repeat_interleave(scheme.group, dim=-1)
    v = table[codes]
    if p.zero_point is not None:
        v = v - p.zero_point.to(torch.float32).repeat_interleave(scheme.group, dim=-1)
    return (v * d).reshape(shape)


def error_bound(scheme, w, p):
    """The bound each scheme promises (docs/writing.md): NVFP4 and MXFP4 max(|w|, d) / 4, int4
    d / 2, with d the element's group divisor."""
    d = divisor(scheme, p.scale, p.global_scale).repeat_interleave(scheme.group, dim=-1).reshape(w.shape)
    if isinstance(scheme, Int4):
        return d / 2
    return torch.maximum(w.abs(), d) / 4


@st.composite
def packed_weights(draw, scheme):
    """Weights a scheme stores: rows of very different magnitudes (1e-12 to 1e12), zero groups and
    tiny groups (which push NVFP4's e4m3 scales into the subnormals), in bf16, f16 or f32."""
    stacked = not isinstance(scheme, Int4) and draw(st.booleans())
    lead = (draw(st.integers(1, 3)),) if stacked else ()
    rows = draw(st.integers(1, 24))
    cols = scheme.group * draw(st.integers(1, 5))  # every group here is a multiple of 8
    shape = (*lead, rows, cols)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    w = w * torch.pow(10.0, torch.empty(*lead, rows, 1, dtype=torch.float64).uniform_(-12, 12, generator=g))
    groups = w.view(*lead, rows, cols // scheme.group, scheme.group)
    pick = torch.rand(groups.shape[:-1], generator=g)
    groups[pick < 0.1] = 0.0
    groups[(pick >= 0.1) & (pick < 0.2)] *= 1e-7
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    if dtype == torch.float16:
        w = w / w.abs().max().clamp(min=1e-300) * 100.0  # inside fp16's range
    return w.to(dtype)


@pytest.mark.parametrize("scheme", PACKED, ids=str)
@given(data=st.data())
def test_packed_round_trip_within_its_bound_and_requantizes_to_the_same_codes(scheme, data):
    w = data.draw(packed_weights(scheme))
    p = scheme.quantize(w, name="w")
    rows_cols = w.shape[-1]
    assert p.codes.dtype == torch.uint8 and tuple(p.codes.shape) == (*w.shape[:-1], rows_cols // 2)
    assert p.scale.dtype == scheme.scale_dtype and tuple(p.scale.shape) == tuple(scheme.granularity.scale_shape(w.shape))
    d = divisor(scheme, p.scale, p.global_scale)
    assert bool(torch.isfinite(d).all()) and bool((d > 0).all()), "every scale finite and non-zero"
    if isinstance(scheme, NVFP4):
        assert p.global_scale.dtype == torch.float32 and p.global_scale.shape == ()
    back = formula(scheme, p, w.shape)
    wf = w.to(torch.float32)
    assert ((wf - back).abs() <= error_bound(scheme, wf, p) * SLACK).all()
    again = scheme.quantize(back, scale=p.scale, global_scale=p.global_scale, zero_point=p.zero_point)
    assert torch.equal(again.codes, p.codes), "re-quantizing with the same scales gives the same bytes"


def test_packed_error_bounds_are_reached_and_typical_errors(capsys):
    """The bounds are tight: some element of a large random weight sits right at each. The
    printed RMS errors (relative to the weight's RMS) are the figures in docs/writing.md."""
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    for scheme in PACKED:
        p = scheme.quantize(w)
        err = (formula(scheme, p, w.shape) - w).abs()
        ratio = float((err / error_bound(scheme, w, p)).max())
        assert 0.99 < ratio <= SLACK, (scheme, ratio)
        rms = float(err.pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
        with capsys.disabled():
            print(f"\n{scheme}: max error / bound {ratio:.4f}, RMS error {rms:.4f} of the weight's RMS", end="")


def test_e2m1_rounds_to_nearest_ties_to_even_and_keeps_the_sign_bit():
    grid = torch.tensor(E2M1_VALUES[:8], dtype=torch.float64)
    ties = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0}
    x = [*ties, 6.0, 6.5, 7.9, 1e30, 0.0]
    for t in ties:  # the float32 values on either side of each midpoint
        x += [math.nextafter(t, 0), math.nextafter(t, 9)]
    x = torch.tensor(x, dtype=torch.float32)
    codes = e2m1_codes(x.clone())
    got = torch.tensor(E2M1_VALUES)[codes.long()]
    for xi, gi in zip(x.tolist(), got.tolist()):
        nearest = grid[(grid - min(xi, 6.0)).abs().argmin()].item()
        assert gi == ties.get(xi, nearest), (xi, gi)
    neg = e2m1_codes(-x.clone())
    assert torch.equal(neg, codes | 8), "the sign is the sign bit, -0.0 and rounded-away negatives included"


def test_e2m1_codes_match_compressed_tensors_rounding():
    ct = pytest.importorskip("compressed_tensors.quantization.utils.fp4_utils")
    x = torch.cat([torch.linspace(-7, 7, 100_001), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])])
    x = x[x != 0]  # compressed-tensors writes +0 for -0.0 (torch.sign): the one difference
    values = torch.tensor(E2M1_VALUES)[e2m1_codes(x.clone()).long()]
    assert torch.equal(values, ct.cast_to_fp4(x.clone()))


def test_nvfp4_scales_are_the_producers_for_float32_weights():
    """compressed-tensors' own calibration (generate_gparam, calculate_qparams) and ModelOpt's rule
    (written out from NVFP4QTensor: scale_2 = amax / (6 * 448), e4m3(amax_g / (6 * scale_2)))
    give these scales, bit for bit, for a float32 weight (compressed-tensors computes in the
    weight's dtype, so a bf16 weight's scales may differ by a rounding)."""
    qh = pytest.importorskip("compressed_tensors.quantization.utils.helpers")
    from compressed_tensors.quantization.quant_scheme import NVFP4A16

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.02
    w[1] *= 40
    grouped = w.unflatten(-1, (-1, 16))
    ct = NVFP4(divide=True).quantize(w)
    g = qh.generate_gparam(w.amin(), w.amax())
    s, _ = qh.calculate_qparams(grouped.amin(-1), grouped.amax(-1), NVFP4A16["weights"], global_scale=g)
    assert torch.equal(ct.global_scale.reshape(1), g)
    assert torch.equal(ct.scale.view(torch.uint8), s.to(torch.float8_e4m3fn).view(torch.uint8))
    mo = NVFP4(divide=False).quantize(w)
    scale_2 = w.abs().amax().float() / (6.0 * 448.0)
    per_block = (grouped.abs().amax(-1).float() / (6.0 * scale_2)).to(torch.float8_e4m3fn)
    assert torch.equal(mo.global_scale, scale_2) and torch.equal(mo.scale.view(torch.uint8), per_block.view(torch.uint8))


def test_packed_codes_are_what_compressed_tensors_packs_with_the_same_scales():
    """Given our scales, compressed-tensors' own compressors (quantize_and_pack_fp4,
    pack_to_int32) write the same bytes."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize

    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(4)) * 0.05
    p = NVFP4(divide=True).quantize(w)
    assert torch.equal(quantize_and_pack_fp4(w, p.scale.float(), global_scale=p.global_scale.reshape(1), group_size=16), p.codes)
    p = MXFP4().quantize(w)
    assert torch.equal(quantize_and_pack_fp4(w, torch.exp2(p.scale.float() - 127), group_size=32), p.codes)
    p = Int4(64).quantize(w)
    args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=64, symmetric=True)
    q = ct_quantize(w, p.scale, torch.zeros_like(p.scale), args, dtype=torch.int8)
    assert torch.equal(pack_to_int32(q, 4), p.codes.view(torch.int32))
    p = Int4(64, symmetric=False).quantize(w)
    args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=64, symmetric=False)
    q = ct_quantize(w, p.scale, p.zero_point, args, dtype=torch.int8)
    assert torch.equal(pack_to_int32(q, 4), p.codes.view(torch.int32))


def test_asymmetric_int4_is_compressed_tensors_rule_with_the_scale_rounded_up():
    """compressed-tensors' calculate_qparams: s = (max(max, 0) - min(min, 0)) / 15,
    z = round(clamp(-8 - min / s, -8, 7)); ours rounds s up to float32 (so the ends stay within
    half a step), and z follows from that s."""
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(9)) + 0.7
    w[0] = w[0].abs()  # all positive: z = -8
    p = Int4(32, symmetric=False).quantize(w)
    g = w.unflatten(-1, (-1, 32))
    lo, hi = g.amin(-1).clamp(max=0).double(), g.amax(-1).clamp(min=0).double()
    assert (p.scale.double() >= (hi - lo) / 15).all() and (torch.nextafter(p.scale, torch.zeros(())).double() < (hi - lo) / 15).all()
    assert torch.equal(p.zero_point, (-8 - lo.float() / p.scale).clamp(-8, 7).round().to(torch.int8))
    assert (p.zero_point[0] == -8).all()


def test_mxfp4_scale_is_the_triton_round_up_rule():
    """gpt-oss's writer (triton_kernels' downcast_to_mxfp, ROUND_UP): the float32 amax / 6 with its
    mantissa rounded up to the next power of two; nothing saturates."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(5)) * torch.logspace(-20, 20, 64)[:, None]
    w[0, :32] = torch.tensor(6.0).repeat(32)  # amax / 6 exactly a power of two
    p = MXFP4().quantize(w)
    amax = w.abs().unflatten(-1, (-1, 32)).amax(-1)
    bits = (amax / 6.0).view(torch.int32)
    want = (((bits + 0x007FFFFF) & 0x7F800000) >> 23).to(torch.uint8)
    assert torch.equal(p.scale, want)
    assert p.scale[0, 0].item() == 127


def test_int4_scale_is_amax_over_7_5_rounded_up():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(6))
    p = Int4(32).quantize(w)
    amax = w.abs().unflatten(-1, (-1, 32)).amax(-1).double()
    assert (p.scale.double() >= amax / 7.5).all()
    assert (torch.nextafter(p.scale, torch.zeros(())).double() < amax / 7.5).all()


@pytest.mark.parametrize("scheme", PACKED, ids=str)
def test_zero_groups_get_scale_one_and_zero_codes(scheme):
    w = torch.zeros(4, 128)
    w[2:] = torch.randn(2, 128, generator=torch.Generator().manual_seed(7))
    p = scheme.quantize(w)
    d = divisor(scheme, p.scale, p.global_scale)
    assert torch.equal(formula(scheme, p, w.shape)[:2], torch.zeros(2, 128))
    if not isinstance(scheme, NVFP4):
        assert (d[:2] == 1.0).all()
    else:
        assert (p.scale[:2].float() == 1.0).all()
    all_zero = scheme.quantize(torch.zeros(2, 128))
    assert bool(torch.isfinite(divisor(scheme, all_zero.scale, all_zero.global_scale)).all())


@pytest.mark.parametrize("scheme", PACKED, ids=str)
def test_packed_bands_do_not_change_a_byte(scheme, monkeypatch):
    mod = sys.modules["lazyfp8.formats.quantize"]
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(8))
    whole = scheme.quantize(w)
    monkeypatch.setattr(mod, "_PACKED_BAND_ELEMENTS", 300)
    monkeypatch.setattr(mod, "_BAND_ELEMENTS", 700)
    banded = scheme.quantize(w)
    assert torch.equal(whole.codes, banded.codes) and torch.equal(bits(whole.scale), bits(banded.scale))


@pytest.mark.parametrize(
    "scheme, shape, match",
    [
        (NVFP4(), (16, 24), "multiple of 16"),
        (MXFP4(), (4, 48), "multiple of 32"),
        (NVFP4(), (64,), "two or more dims"),
        (MXFP4(), (4, 0), "non-zero multiple"),
        (Int4(16), (2, 4, 32), "2-D weights"),
        (Int4(6), (4, 12), "multiple of 8 columns"),
    ],
)
def test_shapes_a_packed_scheme_cannot_store_are_refused_naming_the_tensor(scheme, shape, match):
    with pytest.raises(ValueError, match=rf"'layers\.0\.w'.*{match}"):
        scheme.quantize(torch.ones(shape), name="layers.0.w")


@pytest.mark.parametrize("kwargs, match", [({"group": 32}, "16 elements"), ({"divide": True, "group": 8}, "16 elements")])
def test_nvfp4_groups_are_16(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NVFP4(**kwargs)


@pytest.mark.parametrize("bad", [0, -16, 7, True, 12.0])
def test_int4_group_size_must_be_a_positive_even_integer(bad):
    with pytest.raises(ValueError, match="group size"):
        Int4(bad)


@pytest.mark.parametrize("scheme", PACKED, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_packed_non_finite_input_names_the_tensor(scheme, bad):
    w = torch.ones(4, 128)
    w[3, 100] = bad
    with pytest.raises(NonFiniteError, match="'x.weight'"):
        scheme.quantize(w, name="x.weight")


@pytest.mark.parametrize("scheme", PACKED, ids=str)
def test_packed_input_is_never_modified(scheme):
    w = torch.randn(8, 128)
    before = w.clone()
    scheme.quantize(w)
    assert torch.equal(w, before)


def test_given_scales_of_the_wrong_size_are_refused():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="scale for 'w'"):
        MXFP4().quantize(w, scale=torch.full((4, 3), 127, dtype=torch.uint8), name="w")
    with pytest.raises(ValueError, match="global scale"):
        NVFP4().quantize(w, scale=torch.ones(4, 4).to(torch.float8_e4m3fn), name="w")
    with pytest.raises(ValueError, match="needs a zero point"):
        Int4(32, symmetric=False).quantize(w, scale=torch.ones(4, 2), name="w")
    with pytest.raises(ValueError, match="no zero point"):
        Int4(32).quantize(w, scale=torch.ones(4, 2), zero_point=torch.zeros(4, 2), name="w")
