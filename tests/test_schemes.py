import math

import pytest
import torch

from lazyfp8 import PerBlock, PerChannel, PerTensor, ScaleShapeError
from lazyfp8.formats.schemes import MX_BLOCK, Scheme, auto_scheme, grid_shape, make_scheme, matrix_shape


def test_matrix_view():
    assert matrix_shape(()) == (1, 1)
    assert matrix_shape((7,)) == (1, 7)
    assert matrix_shape((2, 3, 5)) == (6, 5)


@pytest.mark.parametrize(
    "g, weight, scale",
    [
        (PerTensor(), (300, 200), ()),
        (PerChannel(), (300, 200), (300, 1)),
        (PerBlock((128, 128)), (300, 200), (3, 2)),  # ragged edges: partial last blocks
        (PerBlock((128, 128)), (256, 256), (2, 2)),
        (PerBlock((1, 32)), (4, 100), (4, 4)),
    ],
)
def test_each_granularity_states_its_scale_shape(g, weight, scale):
    assert tuple(g.scale_shape(weight)) == scale


def test_grid_rounds_up():
    assert grid_shape(300, 200, (128, 128)) == (3, 2)
    assert grid_shape(1, 1, (128, 128)) == (1, 1)


def test_block_size_must_be_positive_pairs():
    with pytest.raises(ValueError, match="two positive integers"):
        PerBlock((0, 128))
    with pytest.raises(ValueError):
        PerBlock((128,))


def pick(scheme, weight, scale, code="F32"):
    return scheme.granularity(weight, scale, code, weight_key="w", scale_key="s", file="f")


def test_auto_picks_by_shape():
    s = auto_scheme((128, 128))
    assert pick(s, (300, 200), ()) == PerTensor()
    assert pick(s, (300, 200), (1,)) == PerTensor()
    assert pick(s, (300, 200), (300, 1)) == PerChannel()
    assert pick(s, (300, 200), (300,)) == PerChannel()
    assert pick(s, (300, 200), (3, 2)) == PerBlock((128, 128))


def test_auto_ue8m0_scales_are_mx_blocks():
    assert pick(auto_scheme(), (4, 64), (4, 2), code="U8") == PerBlock(MX_BLOCK)
    assert pick(auto_scheme(), (4, 64), (4, 2), code="F8_E8M0") == PerBlock(MX_BLOCK)


def test_block_is_never_inferred_from_shapes():
    # 3x2 grid on 300x200 with no configured block: an error, not 100x100 blocks.
    with pytest.raises(ScaleShapeError, match=r"shape \[3, 2\].*weight_block_size"):
        pick(auto_scheme(), (300, 200), (3, 2))


def test_declared_scheme_is_strict():
    fp8_block = Scheme("fp8", (PerBlock((128, 128)),), ("_scale_inv",))
    with pytest.raises(ScaleShapeError, match=r"scheme 'fp8' expects \[3, 2\] for blocks of \[128, 128\]"):
        pick(fp8_block, (300, 200), (300, 1))
    # a small weight's one-cell grid may be stored as a scalar
    assert pick(fp8_block, (64, 64), ()) == PerBlock((128, 128))


def test_scale_keys_by_convention():
    both = auto_scheme()
    assert both.scale_keys("a.weight") == ["a.weight_scale_inv", "a.weight_scale", "a.scale", "a.qscale_weight"]
    assert both.scale_keys("a.w") == ["a.w_scale_inv"]
    ct = Scheme("ct", (PerTensor(),), ("_scale",), module_scales=())
    assert ct.scale_keys("x.weight") == ["x.weight_scale"]


def test_make_scheme_forms():
    assert make_scheme(None, None) is None
    assert make_scheme(PerChannel(), None).granularities == (PerChannel(),)
    assert make_scheme("block", (64, 64)).granularities == (PerBlock((64, 64)),)
    assert make_scheme("mx", None).granularities == (PerBlock((1, 32)),)
    assert make_scheme("per-tensor", None).granularities == (PerTensor(),)
    with pytest.raises(ValueError, match="needs block_size"):
        make_scheme("block", None)
    with pytest.raises(ValueError, match="unknown scheme 'int4'"):
        make_scheme("int4", None)


def test_scale_dtype_table_is_torch_exact_for_ue8m0():
    exps = torch.tensor([0, 1, 126, 127, 128, 254], dtype=torch.uint8)
    vals = exps.view(torch.float8_e8m0fnu).to(torch.float32)
    assert vals.tolist() == [2.0 ** (int(e) - 127) for e in exps]


# --- a granularity is an object with behaviour ------------------------------------------------

from hypothesis import given
from hypothesis import strategies as st

from lazyfp8.formats.schemes import Granularity


@given(
    rows=st.integers(1, 700), cols=st.integers(1, 700),
    g=st.sampled_from([PerTensor(), PerChannel(), PerBlock((128, 128)), PerBlock((1, 32)), PerBlock((64, 96))]),
)
def test_every_granularity_recognises_its_own_scale_shape(rows, cols, g):
    shape = (rows, cols)
    assert isinstance(g, Granularity)
    assert g.matches(shape, g.scale_shape(shape))
    b0, b1 = g.block_size(shape)
    grid = g.scale_shape(shape)
    assert math.prod(grid) == -(-rows // b0) * -(-cols // b1)
    assert g.describe(shape) and g.name
    # the config forms round-trip through the config reader
    from lazyfp8.formats.config import scheme_from_config

    cfg = {"quant_method": "compressed-tensors", "config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 8, "type": "float", **g.compressed_tensors_strategy()}}}}
    assert scheme_from_config({"quantization_config": cfg}, "config.json").granularities == (g,)
    if g.weight_block_size is not None:
        fp8 = {"quant_method": "fp8", "weight_block_size": g.weight_block_size}
        assert PerBlock(tuple(g.weight_block_size)) in scheme_from_config({"quantization_config": fp8}, "c").granularities


def test_a_new_granularity_needs_no_change_elsewhere():
    """A subclass that tiles every row in two halves is recognised, described and named through
    its own methods (no isinstance chain to extend)."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Halves(Granularity):
        def block_size(self, shape):
            return 1, max(-(-shape[-1] // 2), 1)

        def scale_shape(self, shape):
            return shape[0], 2

        def describe(self, shape):
            return f"[{shape[0]}, 2] halves"

    scheme = Scheme("halves", (Halves(),))
    assert scheme.granularity((10, 8), (10, 2), "F32", weight_key="w", scale_key="s", file="f") == Halves()
    with pytest.raises(ScaleShapeError, match=r"\[10, 2\] halves"):
        scheme.granularity((10, 8), (10, 3), "F32", weight_key="w", scale_key="s", file="f")
