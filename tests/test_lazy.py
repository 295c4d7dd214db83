import copy
import pickle
from collections import OrderedDict

import pytest
import torch
from torch import nn

import lazyfp8
from lazyfp8 import LazyFP8View, LazyTensor
from tests.helpers import bits, save
from tests.strategies import fp8_codes


@pytest.fixture
def view(tmp_path):
    save(
        {
            "lin.weight": fp8_codes((64, 32), torch.float8_e4m3fn, 0),
            "lin.weight_scale_inv": torch.tensor(0.01),
            "lin.bias": torch.randn(64).to(torch.bfloat16),
        },
        str(tmp_path / "m.safetensors"),
    )
    return LazyFP8View(tmp_path)


def test_is_tensor_like_and_metadata(view):
    v = view["lin.weight"]
    assert torch.overrides.is_tensor_like(v)
    assert v.shape == (64, 32) and v.size() == (64, 32) and v.size(1) == 32
    assert v.ndim == v.dim() == 2 and v.numel() == 2048 and v.nbytes == 4096 and v.element_size() == 2
    assert not v.is_meta and not v.requires_grad and len(v) == 64
    assert "lin.weight" in repr(v)


def test_getitem_does_not_read_until_copy(view, monkeypatch):
    reads = []
    real = lazyfp8.storage.reader.ShardFile.read_into
    monkeypatch.setattr(lazyfp8.storage.reader.ShardFile, "read_into", lambda self, dst, off, key: (reads.append(key), real(self, dst, off, key)))
    sd = OrderedDict(view)  # what load_state_dict does first
    assert reads == []
    m = nn.Linear(32, 64).to(torch.bfloat16)
    m.load_state_dict({"weight": sd["lin.weight"], "bias": sd["lin.bias"]})
    assert "lin.weight" in reads and "lin.bias" in reads


def test_copy_writes_straight_into_the_destination(view, monkeypatch):
    dst = torch.empty(64, 32, dtype=torch.bfloat16)
    ptrs = []
    from lazyfp8.kernels import dequant as _dequant

    real = _dequant.PerTensorKernel.__call__
    monkeypatch.setattr(_dequant.PerTensorKernel, "__call__", lambda self, c, out, *a: (ptrs.append(out.data_ptr()), real(self, c, out, *a)))
    dst.copy_(view["lin.weight"])
    assert ptrs == [dst.data_ptr()]


def test_every_use_reads_again(view):
    v = view["lin.bias"]
    a, b = v.materialize(), v.materialize()
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)


def test_operators_and_methods(view):
    v, t = view["lin.bias"], view.get_tensor("lin.bias")
    assert torch.equal(v + 1, t + 1) and torch.equal(-v, -t) and torch.equal(v.float(), t.float())
    assert torch.equal(v[3:5], t[3:5]) and torch.equal(torch.stack([v, v]), torch.stack([t, t]))
    assert torch.equal(torch.as_tensor(v.materialize()), t)
    with pytest.raises(AttributeError):
        v.not_a_tensor_method  # noqa: B018 - the attribute access is what raises


def test_broadcasting_copy(view):
    dst = torch.empty(3, 64, dtype=torch.bfloat16)
    dst.copy_(view["lin.bias"])
    assert torch.equal(dst[2], view.get_tensor("lin.bias"))


def test_swap_module_params_on_conversion(view):
    m = nn.Linear(32, 64).to(torch.bfloat16)
    weight = m.weight
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        m.load_state_dict({"weight": view["lin.weight"], "bias": view["lin.bias"]})
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    assert isinstance(m.weight, nn.Parameter) and m.weight is weight
    assert torch.equal(bits(m.weight.detach()), bits(view.get_tensor("lin.weight")))


def test_load_state_dict_error_for_shape_mismatch_reads_nothing(view, monkeypatch):
    monkeypatch.setattr(lazyfp8.storage.reader.ShardFile, "read_into", lambda *a: pytest.fail("read data"))
    m = nn.Linear(16, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        m.load_state_dict({"weight": view["lin.weight"]}, strict=False)


def test_value_type(view):
    assert isinstance(view["lin.weight"], LazyTensor)


def test_pickle_unpickles_to_the_key_of_a_reopened_view(view):
    a, b = view["lin.weight"], view["lin.bias"]
    a2, b2 = pickle.loads(pickle.dumps([a, b]))
    assert isinstance(a2, LazyTensor) and (a2.key, a2.shape, a2.dtype) == (a.key, a.shape, a.dtype)
    assert a2._view is b2._view is not view  # one view reopened per pickle, shared by its values
    assert torch.equal(bits(a2.materialize()), bits(a.materialize()))
    assert torch.equal(bits(b2.materialize()), bits(b.materialize()))


def test_a_value_not_from_a_view_refuses_to_pickle(view):
    orphan = LazyTensor(view._sources["lin.weight"])
    with pytest.raises(TypeError, match="not fetched from a LazyFP8View.*materialize"):
        pickle.dumps(orphan)


def test_copy_and_deepcopy(view):
    lazy = view["lin.weight"]
    shallow = copy.copy(lazy)
    assert shallow is not lazy and shallow._view is view
    deep = copy.deepcopy({"a": lazy, "b": view["lin.bias"]})
    assert deep["a"]._view is deep["b"]._view is not view
    assert torch.equal(bits(deep["a"].materialize()), bits(lazy.materialize()))


def test_torch_save_stores_the_values(view, tmp_path):
    """torch.save of a lazy value means "save this tensor": torch.load (weights_only too) gives a
    plain tensor, which needs neither lazyfp8 nor the checkpoint."""
    torch.save({"w": view["lin.weight"], "b": view["lin.bias"]}, tmp_path / "sd.pt")
    torch.save(view["lin.weight"], tmp_path / "w.pt")
    sd = torch.load(tmp_path / "sd.pt", weights_only=True)
    w = torch.load(tmp_path / "w.pt", weights_only=True)
    assert type(sd["w"]) is torch.Tensor and type(w) is torch.Tensor
    assert torch.equal(bits(sd["w"]), bits(view.get_tensor("lin.weight")))
    assert torch.equal(bits(w), bits(view.get_tensor("lin.weight")))
    assert torch.equal(bits(sd["b"]), bits(view.get_tensor("lin.bias")))


# --- what the header answers, and partial reads ---------------------------------------------

from hypothesis import given
from hypothesis import strategies as st


def test_metadata_is_answered_from_the_header(view):
    """Everything the header knows costs no read (it used to dequantize the whole tensor)."""
    v, ref = view["lin.weight"], view.get_tensor("lin.weight")
    before = view.bytes_read
    assert v.is_floating_point() and not v.is_complex() and v.is_signed()
    assert v.layout == torch.strided and v.stride() == ref.stride() and v.stride(0) == 32
    assert v.is_contiguous() and v.storage_offset() == 0 and v.itemsize == 2
    assert not v.is_cuda and v.is_cpu and v.get_device() == -1
    assert not v.is_sparse and not v.is_quantized and v.nelement() == 2048 and v.ndimension() == 2
    assert v.get_shape() == [64, 32] and v.get_dtype() == "BF16"
    assert view["lin.bias"].get_dtype() == "BF16" and view.bytes_read == before


def test_asking_for_storage_reads_nothing_and_says_why(view):
    """``untyped_storage()``/``data_ptr()`` used to read and dequantize the whole tensor to answer
    about a temporary; a lazy value has no storage, and says so without reading."""
    v = view["lin.weight"]
    before = view.bytes_read
    for name in ("untyped_storage", "storage", "data_ptr"):
        assert hasattr(v, name)
        with pytest.raises(TypeError, match=rf"lin\.weight.*{name}\(\).*materialize"):
            getattr(v, name)()
    assert view.bytes_read == before
    assert v.materialize().untyped_storage().nbytes() == 64 * 32 * 2


@st.composite
def basic_index(draw, shape):
    """A random basic index: ints (negative too), slices of step 1 (open, clamped, empty), one
    Ellipsis at most, possibly fewer items than dimensions."""
    items = []
    for size in shape:
        kind = draw(st.sampled_from(["int", "slice", "full"]))
        if kind == "int":
            items.append(draw(st.integers(-size, size - 1)))
        elif kind == "slice":
            a = draw(st.none() | st.integers(-size - 2, size + 2))
            b = draw(st.none() | st.integers(-size - 2, size + 2))
            items.append(slice(a, b, draw(st.sampled_from([None, 1]))))
        else:
            items.append(slice(None))
    cut = draw(st.integers(0, len(items)))
    items = items[:cut]
    if items and draw(st.booleans()):
        at = draw(st.integers(0, len(items) - 1))
        items[at:at + 1] = [Ellipsis]
    return tuple(items) if len(items) != 1 or draw(st.booleans()) else items[0]


@given(data=st.data())
def test_basic_indexing_reads_only_its_box_and_equals_indexing_the_tensor(view, data):
    key = data.draw(st.sampled_from(["lin.weight", "lin.bias"]))
    v, full = view[key], view.get_tensor(key)
    index = data.draw(basic_index(tuple(full.shape)))
    before = view.bytes_read
    got = v[index]
    want = full[index]
    assert got.shape == want.shape and torch.equal(bits(got), bits(want))
    scale = 0 if view.info(key).scale_key is None else 4
    assert view.bytes_read - before <= want.numel() * view.info(key).disk_dtype.itemsize + scale


def test_a_row_slice_reads_that_row_only(view):
    full = view.get_tensor("lin.weight")
    before = view.bytes_read
    row = view["lin.weight"][3]
    assert view.bytes_read - before == 32 + 4  # 32 FP8 codes and the 0-d scale
    assert torch.equal(bits(row), bits(full[3]))
    before = view.bytes_read
    col = view.get_slice("lin.weight")[..., 5:7]
    assert view.bytes_read - before == 64 * 2 + 4
    assert torch.equal(bits(col), bits(full[:, 5:7]))


def test_other_indexes_fall_back_and_errors_match_torch(view):
    v, full = view["lin.weight"], view.get_tensor("lin.weight")
    for index in ([0, 2], torch.tensor([1, 3]), slice(None, None, 2), (None, 0), full[:, 0] > 0):
        assert torch.equal(bits(v[index]), bits(full[index]))
    for index in (64, -65, (0, 0, 0), (..., 32)):
        with pytest.raises(IndexError):
            v[index]
