"""The catalogue is the one picture of a checkpoint: the view and inspect_checkpoint, given the
same arguments, must agree on the scheme, the pairs and the keys, and on whether it reads at all."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lazyfp8 import LazyFP8Error, LazyFP8View, PerBlock
from lazyfp8.formats.catalogue import build_catalogue
from lazyfp8.formats.quantize import quantize
from lazyfp8.inspection import inspect_checkpoint
from lazyfp8.storage.checkpoint import open_checkpoint
from tests.helpers import write_sharded


def _checkpoint(directory, block, declared):
    """One 256 x 192 FP8 weight with a grid of ``block`` blocks, a bf16 norm, and a config that
    declares ``declared`` blocks (``None``: no quantization_config)."""
    codes, scale = quantize(torch.randn(256, 192, generator=torch.Generator().manual_seed(0)), PerBlock(block))
    config = {"model_type": "toy"}
    if declared is not None:
        config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(declared)}
    tensors = {"w.weight": codes, "w.weight_scale_inv": scale, "norm.weight": torch.ones(192).bfloat16()}
    return write_sharded(str(directory), {"model-00001-of-00001.safetensors": tensors}, config)


BLOCKS = [(64, 64), (128, 128), (32, 96)]


@given(
    block=st.sampled_from(BLOCKS),
    declared=st.none() | st.sampled_from(BLOCKS),
    asked=st.none() | st.sampled_from(BLOCKS),
    scheme=st.sampled_from([None, "auto", "block", "per-tensor"]),
)
def test_view_and_inspect_agree(tmp_path_factory, block, declared, asked, scheme):
    path = _checkpoint(tmp_path_factory.mktemp("c"), block, declared)
    report = inspect_checkpoint(path, block_size=asked, scheme=scheme)
    try:
        view = LazyFP8View(path, block_size=asked, scheme=scheme)
    except (LazyFP8Error, ValueError) as e:  # ValueError: scheme="block" without a block size
        assert report.problems, f"the view refused ({e}) what inspect calls sound"
        return
    assert not report.problems, f"inspect reports {report.problems} for a checkpoint the view reads"
    assert report.scheme == view.scheme.name
    assert sorted(view) == sorted(report.runtime_names or view.disk_keys())
    assert {f["key"] for f in report.fp8} == {k for k in view if view.info(k).scale_key is not None}


def test_the_block_size_argument_is_honoured_by_both(tmp_path):
    """The case that used to disagree: config says 128, the scales are a 64 x 64 grid, the user
    says 64. The view read it; inspect reported it broken."""
    path = _checkpoint(tmp_path / "c", (64, 64), (128, 128))
    assert inspect_checkpoint(path).problems and inspect_checkpoint(path, block_size=(64, 64)).problems == []
    view = LazyFP8View(path, block_size=(64, 64))
    assert view.info("w.weight").granularity == PerBlock((64, 64))
    with pytest.raises(LazyFP8Error):
        LazyFP8View(path)


def test_build_catalogue_collects_instead_of_raising(tmp_path):
    path = _checkpoint(tmp_path / "c", (64, 64), (128, 128))
    with pytest.raises(LazyFP8Error):
        build_catalogue(open_checkpoint(path))
    problems = []
    cat = build_catalogue(open_checkpoint(path), problems=problems)
    assert problems and "w.weight" not in cat.pairing.scales and "norm.weight" in cat.exposed


def test_a_scale_shape_that_fits_one_granularity_is_that_one_whatever_the_config(tmp_path):
    """A config that declares 128x128 blocks, and weights whose scales are one value (0-d and
    [1]) or one per row: transformers loads such a checkpoint; each scale is read as the one
    granularity its shape fits. An explicit scheme= still means what it says."""
    from lazyfp8 import PerChannel, PerTensor, ScaleShapeError
    from tests.builders import expected

    g = torch.Generator().manual_seed(1)
    tensors = {}
    quantized = {}
    for name, gran in (("a", PerBlock((128, 128))), ("b", PerTensor()), ("c", PerChannel())):
        codes, scale = quantize(torch.randn(256, 192, generator=g), gran)
        tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"] = codes, scale
        quantized[name] = (codes, scale, gran)
    tensors["d.weight"], scale = quantize(torch.randn(64, 32, generator=g), PerTensor())
    tensors["d.weight_scale_inv"] = scale.reshape(1)
    quantized["d"] = (tensors["d.weight"], scale, PerTensor())
    config = {"model_type": "toy", "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    path = write_sharded(str(tmp_path), {"model-00001-of-00001.safetensors": tensors}, config)
    view = LazyFP8View(path)
    assert view.scheme.name == "fp8"
    # d's one value also fits the declared 128x128 blocks (a 64x32 weight is one block): the
    # config decides, and both mean one multiplier for the whole weight
    assert [view.info(f"{n}.weight").granularity for n in "abcd"] == [PerBlock((128, 128)), PerTensor(), PerChannel(), PerBlock((128, 128))]
    for name, (codes, scale, gran) in quantized.items():
        block = (128, 128) if gran == PerBlock((128, 128)) else None  # d: one value, the same either way
        want = expected(codes, scale, torch.bfloat16, block)
        assert torch.equal(view.get_tensor(f"{name}.weight").view(torch.int16), want.view(torch.int16)), name
    assert inspect_checkpoint(path).problems == []
    with pytest.raises(ScaleShapeError, match="'b.weight'"):
        LazyFP8View(path, scheme=PerBlock((128, 128)))
