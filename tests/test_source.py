"""Reading boxes (one rank's shard) of stored tensors: only their bytes, exactly their values."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lazyfp8 import LazyFP8View, PerBlock, PerChannel, PerTensor, save
from tests.helpers import bits

SCHEMES = [None, PerTensor(), PerChannel(), PerBlock((128, 128)), PerBlock((4, 8))]


@st.composite
def boxes(draw):
    shape = draw(st.one_of(
        st.tuples(st.integers(1, 300), st.integers(1, 300)),
        st.tuples(st.integers(1, 4), st.integers(1, 40), st.integers(1, 70)),
        st.tuples(st.integers(1, 500)),
    ))
    offsets, lengths = [], []
    for d in shape:
        o = draw(st.integers(0, d - 1))
        offsets.append(o)
        lengths.append(draw(st.integers(1, d - o)))
    return shape, tuple(offsets), tuple(lengths)


@given(box=boxes(), scheme=st.sampled_from(SCHEMES), chunk=st.integers(1, 4000), dtype=st.sampled_from([torch.bfloat16, torch.float32]))
def test_any_box_equals_the_slice_of_the_whole(tmp_path_factory, box, scheme, chunk, dtype):
    shape, offsets, lengths = box
    if isinstance(scheme, PerChannel) and len(shape) < 2:
        scheme = PerTensor()
    d = tmp_path_factory.mktemp("b")
    fmt = "compressed-tensors" if isinstance(scheme, PerChannel) else "fp8"
    save({"w.weight": torch.randn(shape)}, d, scheme=scheme, format=fmt, quantize=lambda k: scheme is not None, exclude=())
    view = LazyFP8View(d, dtype=dtype, chunk_elements=chunk, block_size=getattr(scheme, "block", None))
    whole = view.get_tensor("w.weight")
    src = view._sources["w.weight"]
    dst = torch.empty(lengths, dtype=whole.dtype)
    src.read_box_into(dst, offsets, lengths)
    index = tuple(slice(o, o + n) for o, n in zip(offsets, lengths))
    assert torch.equal(bits(dst), bits(whole[index].contiguous()))


def test_a_row_shard_reads_only_its_bytes(tmp_path):
    save({"w.weight": torch.randn(512, 256)}, tmp_path, scheme=PerBlock((128, 128)))
    view = LazyFP8View(tmp_path, block_size=(128, 128))
    src = view._sources["w.weight"]
    before = view.bytes_read
    dst = torch.empty(100, 256, dtype=torch.bfloat16)
    src.read_box_into(dst, (300, 0), (100, 256))  # crosses the block boundary at row 384
    data = view.bytes_read - before
    assert data == 100 * 256 + 4 * 4 * 2  # the codes of the box, and the [4, 2] float32 scale


def test_a_column_shard_reads_only_its_bytes(tmp_path):
    save({"w.weight": torch.randn(64, 512)}, tmp_path, scheme=PerTensor())
    view = LazyFP8View(tmp_path)
    before = view.bytes_read
    dst = torch.empty(64, 128, dtype=torch.bfloat16)
    view._sources["w.weight"].read_box_into(dst, (0, 200), (64, 128))
    assert view.bytes_read - before == 64 * 128 + 4


def test_box_outside_the_tensor(tmp_path):
    save({"w": torch.ones(4, 4)}, tmp_path, scheme=None)
    src = LazyFP8View(tmp_path)._sources["w"]
    with pytest.raises(ValueError, match="outside 'w'"):
        src.read_box_into(torch.empty(2, 2), (3, 3), (2, 2))


@pytest.mark.parametrize("scheme", [PerTensor(), PerChannel(), PerBlock((128, 128)), PerBlock((1, 32))])
@pytest.mark.parametrize("threads", [1, 2])
def test_full_size_chunks_bit_exact(tmp_path, scheme, threads, backend):
    # Chunks as large as the default (a 1024 x 1024 weight fits one per worker), where each
    # kernel's scratch buffers live beside the codes in one workspace: they must not overlap.
    from safetensors.torch import load_file

    from lazyfp8.testing import reference

    fmt = "compressed-tensors" if isinstance(scheme, PerChannel) else "fp8"
    save({"w.weight": torch.randn(1024, 1024)}, tmp_path, scheme=scheme, format=fmt, quantize=lambda k: True, exclude=())
    view = LazyFP8View(tmp_path, threads=threads, block_size=getattr(scheme, "block", None))
    got = view.get_tensor("w.weight")
    info = view.info("w.weight")
    codes = load_file(str(tmp_path / "model.safetensors"))["w.weight"]
    ref = reference(codes, view.scale("w.weight"), torch.bfloat16, info.granularity.block_size(codes.shape))
    assert torch.equal(bits(got), bits(ref))
