"""Checkpoints written by their producers' own code (``tests/producers.py``: compressed-tensors'
compressors, the gpt-oss release layout), read lazily and compared bit for bit with the
producers' own decompression."""

import pytest
import torch

from lazyfp8 import LazyFP8View
from lazyfp8.errors import CheckpointError
from lazyfp8.inspection import inspect_checkpoint
from tests import producers

pytest.importorskip("compressed_tensors")

SHAPES = {"model.layers.0.mlp.down_proj": (48, 256), "model.layers.0.mlp.up_proj": (256, 128), "model.layers.0.self_attn.o_proj": (64, 128)}


def assert_same(view: LazyFP8View, oracle: dict[str, torch.Tensor]) -> None:
    assert set(view) == set(oracle)
    for key, want in oracle.items():
        got = view.get_tensor(key)
        if got.dtype != want.dtype:
            got = LazyFP8View(view.path, dtype=want.dtype, include_quant_params=True).get_tensor(key)
        assert got.dtype == want.dtype, key
        assert torch.equal(got.view(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), key


@pytest.mark.parametrize("seed", [0, 1])
def test_nvfp4(tmp_path, seed):
    oracle = producers.write_ct_nvfp4(str(tmp_path), SHAPES, seed)
    assert_same(LazyFP8View(tmp_path), oracle)


def test_mxfp4(tmp_path):
    oracle = producers.write_ct_mxfp4(str(tmp_path), SHAPES, 3)
    assert_same(LazyFP8View(tmp_path), oracle)


@pytest.mark.parametrize("num_bits", [4, 8])
@pytest.mark.parametrize("strategy,group_size", [("group", 32), ("group", 128), ("channel", None)])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_int_pack_quantized(tmp_path, num_bits, strategy, group_size, symmetric):
    oracle = producers.write_ct_int(str(tmp_path), SHAPES, 4, num_bits, strategy, group_size, symmetric)
    view = LazyFP8View(tmp_path)
    assert_same(view, oracle)
    fmt = {e["key"]: (e["format"], e["codec"]) for e in inspect_checkpoint(tmp_path).fp8}
    assert set(fmt.values()) == {("int-packed", "int4" if num_bits == 4 else "int8-offset")}


def test_int_rows_that_are_not_whole_words_are_refused_naming_the_shape(tmp_path):
    producers.write_ct_int(str(tmp_path), {"proj": (16, 37)}, 0, 4, "channel", None, True)
    view = LazyFP8View(tmp_path)
    with pytest.raises(CheckpointError, match=r"proj\.weight_shape.*\[16, 37\].*\[16, 40\]"):
        view.get_tensor("proj.weight")


def test_mixed_fp8_attention_and_nvfp4_mlp(tmp_path):
    oracle = producers.write_ct_mixed(str(tmp_path), 5)
    assert {k for k in oracle if k.endswith("input_scale")}  # static activation scales: not keys by default
    assert_same(LazyFP8View(tmp_path, include_quant_params=True), oracle)
    forms = {e["format"] for e in inspect_checkpoint(tmp_path).fp8}
    assert forms == {"fp8", "nvfp4-ct"}


def test_gpt_oss_release_layout(tmp_path):
    oracle = producers.write_gptoss_mxfp4(str(tmp_path), 7, num_layers=2)
    assert_same(LazyFP8View(tmp_path), oracle)
