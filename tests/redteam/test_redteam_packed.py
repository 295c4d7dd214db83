"""Hostile FP4 / int checkpoints: whatever their headers, scales, zero points and shapes say, a
view is built or refused with a ``LazyFP8Error`` naming the file, and every read gives the
formula's bits or such an error: never a bare exception from deep inside, never wrong bits."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lazyfp8 import LazyFP8View
from lazyfp8.errors import CheckpointError, InvalidScaleError, LazyFP8Error, UnsupportedDtypeError
from tests.test_packed import ct_int4, ct_nvfp4, gpt_oss_mxfp4, modelopt_nvfp4, write


def read_all(path) -> dict[str, torch.Tensor]:
    view = LazyFP8View(path)
    return {k: view.get_tensor(k) for k in view}


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("convention", ["modelopt", "compressed-tensors"])
def test_a_bad_global_scale_is_refused_naming_it(tmp_path, value, convention):
    if convention == "modelopt":
        modelopt_nvfp4(tmp_path)
        key, name = "layer.weight", "layer.weight_scale_2"
    else:
        ct_nvfp4(tmp_path)
        key, name = "mlp.down_proj.weight", "mlp.down_proj.weight_global_scale"
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    tensors[name] = torch.full_like(tensors[name], value)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(InvalidScaleError, match=name.replace(".", r"\.")):
        LazyFP8View(tmp_path).get_tensor(key)


@pytest.mark.parametrize("shape", [(2,), (1, 2), (0,)])
def test_a_global_scale_that_is_not_one_value(tmp_path, shape):
    ct_nvfp4(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    tensors["mlp.down_proj.weight_global_scale"] = torch.ones(shape)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="weight_global_scale.*one float value"):
        LazyFP8View(tmp_path)


@pytest.mark.parametrize("shape", [(16,), (0, 8), (4, 0)])
def test_packed_weights_of_degenerate_shapes(tmp_path, shape):
    gen = torch.Generator().manual_seed(0)
    write(tmp_path, {
        "l.weight_packed": torch.zeros(shape, dtype=torch.uint8),
        "l.weight_scale": torch.ones(1, dtype=torch.float8_e4m3fn),
        "l.weight_global_scale": torch.ones(1),
    })
    with pytest.raises(CheckpointError, match=r"l\.weight"):
        LazyFP8View(tmp_path)
    del gen


def test_a_zero_point_of_the_wrong_size(tmp_path):
    codes, scale = ct_int4(tmp_path, out=8, cols=64, group=32)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    tensors["proj.weight_zero_point"] = torch.zeros(3, 5, dtype=torch.int32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"proj\.weight_zero_point.*\[3, 5\]"):
        LazyFP8View(tmp_path).get_tensor("proj.weight")


def test_a_weight_shape_that_is_not_ints(tmp_path):
    ct_int4(tmp_path, out=8, cols=64, group=32)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    tensors["proj.weight_shape"] = torch.tensor([8.0, 64.0])
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"proj\.weight_shape"):
        LazyFP8View(tmp_path).get_tensor("proj.weight")


@pytest.mark.parametrize("num_bits", [2, 3, 16, "4", None])
def test_an_int_width_lazyfp8_cannot_unpack(tmp_path, num_bits):
    ct_int4(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = num_bits
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LazyFP8Error, match="config.json|num_bits"):
        LazyFP8View(tmp_path)


def test_two_int_widths_in_one_config(tmp_path):
    ct_int4(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    groups = cfg["quantization_config"]["config_groups"]
    groups["group_1"] = json.loads(json.dumps(groups["group_0"]))
    groups["group_1"]["weights"]["num_bits"] = 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LazyFP8Error, match="both 4 and 8 bits"):
        LazyFP8View(tmp_path)


def test_int32_codes_in_a_checkpoint_without_int_groups(tmp_path):
    ct_int4(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    w = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
    w.update(type="float", num_bits=8, strategy="channel")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedDtypeError, match=r"proj\.weight_packed"):
        LazyFP8View(tmp_path)


def test_an_mx_scale_of_255_is_nan_and_refused(tmp_path):
    gpt_oss_mxfp4(tmp_path, experts=1, out=4, cols=32)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.mlp.experts.gate_up_proj_scales"][0, 2, 0] = 255
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(InvalidScaleError, match="gate_up_proj_scales"):
        LazyFP8View(tmp_path).get_tensor("model.layers.0.mlp.experts.gate_up_proj")


def test_a_truncated_packed_file_is_named(tmp_path):
    ct_nvfp4(tmp_path)
    path = tmp_path / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 7)
    with pytest.raises(LazyFP8Error, match="model.safetensors"):
        read_all(tmp_path)


_DTYPES = st.sampled_from([torch.uint8, torch.int8, torch.int32, torch.float8_e4m3fn, torch.float32, torch.bfloat16, torch.int64])


@st.composite
def packed_headers(draw):
    """A module's tensors named like one of the packed forms, with any dtypes and small shapes."""
    form = draw(st.sampled_from(["modelopt", "ct-nvfp4", "ct-int", "mx", "ds4", "int8"]))
    names = {
        "modelopt": ["weight", "weight_scale", "weight_scale_2", "input_scale"],
        "ct-nvfp4": ["weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"],
        "ct-int": ["weight_packed", "weight_scale", "weight_zero_point", "weight_shape"],
        "mx": ["w_blocks", "w_scales"],
        "ds4": ["weight", "scale"],
        "int8": ["weight", "weight_scale", "weight_zero_point"],
    }[form]
    keep = [n for n in names if draw(st.booleans()) or n == names[0]]
    tensors = {}
    for n in keep:
        dtype = draw(_DTYPES)
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=4)))
        numel = 1
        for d in shape:
            numel *= d
        raw = torch.tensor(draw(st.lists(st.integers(0, 255), min_size=numel * dtype.itemsize, max_size=numel * dtype.itemsize)), dtype=torch.uint8)
        tensors["m." + n] = raw.view(dtype).reshape(shape) if numel else torch.empty(shape, dtype=dtype)
    return form, tensors


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=packed_headers())
def test_fuzzed_packed_headers_give_values_or_named_errors(tmp_path_factory, case):
    form, tensors = case
    path = tmp_path_factory.mktemp("fuzz")
    config = None
    if form == "ct-int":
        config = {"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"g": {
            "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 2}}}}}
    write(path, tensors, config)
    try:
        view = LazyFP8View(path)
    except LazyFP8Error as e:
        assert "model.safetensors" in str(e) or "config.json" in str(e), e
        return
    for key in view:
        try:
            value = view.get_tensor(key)
        except LazyFP8Error as e:
            assert "model.safetensors" in str(e), e
            continue
        assert tuple(value.shape) == tuple(view[key].shape)


def test_a_box_past_a_packed_weight_is_a_value_error(tmp_path):
    ct_nvfp4(tmp_path)
    view = LazyFP8View(tmp_path)
    with pytest.raises(ValueError, match="outside"):
        view.read_box("mlp.down_proj.weight", torch.empty(1, 2, dtype=torch.bfloat16), (0, 63), (1, 2))

