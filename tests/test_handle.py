"""``lazyfp8.safe_open``: safetensors' handle, over a sharded quantized checkpoint."""

import pytest
import safetensors
import torch

import lazyfp8
from tests.test_packed import ct_nvfp4, write


def test_same_calls_as_safetensors_on_a_plain_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(5, 7, generator=g).to(torch.bfloat16), "b": torch.arange(6, dtype=torch.int64)}
    write(tmp_path, tensors)
    file = tmp_path / "model.safetensors"
    with safetensors.safe_open(file, framework="pt") as theirs, lazyfp8.safe_open(file, framework="pt") as ours:
        assert ours.keys() == list(theirs.keys())
        assert ours.offset_keys() == list(theirs.offset_keys())
        assert ours.metadata() == theirs.metadata()
        for k in theirs.keys():
            assert torch.equal(ours.get_tensor(k), theirs.get_tensor(k))
            assert ours.get_slice(k).get_shape() == theirs.get_slice(k).get_shape()
            assert ours.get_slice(k).get_dtype() == theirs.get_slice(k).get_dtype()
        assert torch.equal(ours.get_slice("a")[1:4, 2:], theirs.get_slice("a")[1:4, 2:])


def test_a_sharded_quantized_checkpoint_dequantizes(tmp_path):
    ct_nvfp4(tmp_path)
    view = lazyfp8.LazyFP8View(tmp_path, dtype=torch.float32)
    with lazyfp8.safe_open(tmp_path, dtype=torch.float32) as f:
        assert f.keys() == ["mlp.down_proj.weight"]
        assert f.get_tensor("mlp.down_proj.weight").dtype == torch.float32
        assert torch.equal(f.get_slice("mlp.down_proj.weight")[3:5], view.get_tensor("mlp.down_proj.weight")[3:5])


def test_metadata_of_shards_is_what_they_agree_on(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, tmp_path / "s1.safetensors", metadata={"format": "pt", "who": "one"})
    save_file({"b": torch.ones(2)}, tmp_path / "s2.safetensors", metadata={"format": "pt", "who": "two"})
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}'
    )
    with lazyfp8.safe_open(tmp_path) as f:
        assert f.metadata() == {"format": "pt"} and f.keys() == ["a", "b"]


def test_other_frameworks_are_refused(tmp_path):
    write(tmp_path, {"a": torch.ones(1)})
    with pytest.raises(ValueError, match="framework='pt'"):
        lazyfp8.safe_open(tmp_path, framework="np")
