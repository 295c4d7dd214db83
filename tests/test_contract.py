"""One Mapping contract, run over every implementation of a state-dict source."""

from collections.abc import Mapping

import pytest
import torch

from lazyfp8 import LazyFP8View
from tests.helpers import bits, save, write_sharded

TENSORS = {
    "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b.bias": torch.ones(5, dtype=torch.bfloat16),
    "c.ids": torch.arange(3),
}


def dict_source(tmp_path):
    return dict(TENSORS)


def single_file(tmp_path):
    return LazyFP8View(save(TENSORS, str(tmp_path / "m.safetensors")))


def sharded(tmp_path):
    keys = list(TENSORS)
    write_sharded(str(tmp_path), {"s1.safetensors": {k: TENSORS[k] for k in keys[:1]}, "s2.safetensors": {k: TENSORS[k] for k in keys[1:]}})
    return LazyFP8View(tmp_path)


def written(tmp_path):
    from lazyfp8 import save

    save(TENSORS, tmp_path, scheme=None, max_shard_size=50)
    return LazyFP8View(tmp_path)


@pytest.fixture(params=[dict_source, single_file, sharded, written], ids=["dict", "single-file", "sharded", "writer-output"])
def source(request, tmp_path):
    return request.param(tmp_path)


def as_tensor(v):
    return v if isinstance(v, torch.Tensor) else v.materialize()


def test_is_a_mapping(source):
    assert isinstance(source, Mapping)


def test_len_iter_contains(source):
    assert len(source) == len(TENSORS)
    assert sorted(source) == sorted(TENSORS)
    assert all(k in source for k in TENSORS) and "nope" not in source and 3 not in source


def test_keys_items_values(source):
    assert set(source.keys()) == set(TENSORS)
    assert source.keys() == TENSORS.keys()
    items = dict(source.items())
    assert set(items) == set(TENSORS)
    assert len(list(source.values())) == len(TENSORS)
    for k, v in items.items():
        assert torch.equal(bits(as_tensor(v)), bits(TENSORS[k]))


def test_getitem_and_get(source):
    for k, t in TENSORS.items():
        assert torch.equal(bits(as_tensor(source[k])), bits(t))
        assert tuple(source[k].shape) == tuple(t.shape) and source[k].dtype == t.dtype
        assert source.get(k) is not None
    assert source.get("nope") is None and source.get("nope", 7) == 7
    with pytest.raises(KeyError):
        source["nope"]


def test_load_state_dict_accepts_it(source):
    model = torch.nn.Module()
    model.a = torch.nn.Linear(4, 3, bias=False)
    model.b = torch.nn.Module()
    model.b.register_parameter("bias", torch.nn.Parameter(torch.zeros(5, dtype=torch.bfloat16)))
    model.c = torch.nn.Module()
    model.c.register_buffer("ids", torch.zeros(3, dtype=torch.int64))
    model.load_state_dict(source, strict=True)
    assert torch.equal(model.a.weight.detach(), TENSORS["a.weight"])
    assert torch.equal(model.c.ids, TENSORS["c.ids"])
