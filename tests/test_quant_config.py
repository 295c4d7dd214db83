import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lazyfp8 import LazyFP8View, PerBlock, PerChannel, PerTensor, UnsupportedSchemeError
from lazyfp8.formats.config import scheme_from_config
from lazyfp8.formats.quantize import quantize
from tests.builders import expected
from tests.helpers import write_sharded


def qc(**kw):
    return {"quantization_config": kw}


def ct(**weights):
    return qc(quant_method="compressed-tensors", config_groups={"group_0": {"targets": ["Linear"], "weights": weights}})


def test_no_config_or_no_quantization():
    assert scheme_from_config(None, "c") is None
    assert scheme_from_config({"model_type": "llama"}, "c") is None


def test_hf_fp8_per_tensor_and_block():
    s = scheme_from_config(qc(quant_method="fp8", activation_scheme="static", weight_block_size=None), "c")
    assert s.granularities == (PerTensor(),) and s.scale_suffixes == ("_scale_inv",)
    s = scheme_from_config(qc(quant_method="fp8", weight_block_size=[128, 128]), "c")
    assert s.granularities == (PerBlock((128, 128)),)


@pytest.mark.parametrize(
    "weights, expected",
    [
        (dict(type="float", num_bits=8, strategy="tensor"), PerTensor()),
        (dict(type="float", num_bits=8, strategy="channel"), PerChannel()),
        (dict(type="float", num_bits=8, strategy="block", block_structure=[128, 128]), PerBlock((128, 128))),
        (dict(type="float", num_bits=8, strategy="group", group_size=32), PerBlock((1, 32))),
    ],
)
def test_compressed_tensors(weights, expected):
    s = scheme_from_config(ct(**weights), "c")
    assert s.granularities == (expected,) and s.scale_suffixes == ("_scale",)


def test_compressed_tensors_int4_groups_record_their_width():
    s = scheme_from_config(ct(type="int", num_bits=4, strategy="group", group_size=128), "c")
    assert s.granularities == (PerBlock((1, 128)),) and s.int_bits == 4


@pytest.mark.parametrize("kind,bits", [("int", 2), ("int", 3), ("float", 16), ("float", 6)])
def test_compressed_tensors_widths_not_read_are_refused(kind, bits):
    with pytest.raises(UnsupportedSchemeError, match=f"{bits}-bit '{kind}'"):
        scheme_from_config(ct(type=kind, num_bits=bits, strategy="group", group_size=128), "c")


def test_compressed_tensors_nvfp4_tensor_group():
    s = scheme_from_config(ct(type="float", num_bits=4, strategy="tensor_group", group_size=16), "c")
    assert s.granularities == (PerBlock((1, 16)),) and s.int_bits is None


def test_fbgemm_and_modelopt():
    assert scheme_from_config(qc(quant_method="fbgemm_fp8"), "c").granularities == (PerChannel(),)
    assert scheme_from_config(qc(quant_method="modelopt", quant_algo="FP8"), "c").granularities == (PerTensor(),)
    assert scheme_from_config(qc(quant_method="modelopt", quant_algo="NVFP4"), "c").granularities == (PerBlock((1, 16)),)
    mixed = qc(quant_method="modelopt", quant_algo="MIXED_PRECISION",
               quantized_layers={"a": {"quant_algo": "NVFP4", "group_size": 16}, "b": {"quant_algo": "FP8"}})
    assert scheme_from_config(mixed, "c").granularities == (PerBlock((1, 16)), PerTensor())
    with pytest.raises(UnsupportedSchemeError, match="W4A8_AWQ"):
        scheme_from_config(qc(quant_method="modelopt", quant_algo="W4A8_AWQ"), "c")


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", None])
def test_other_methods_are_refused_naming_what_was_found(method):
    with pytest.raises(UnsupportedSchemeError, match=f"quant_method is {method!r}.*fp8, compressed-tensors"):
        scheme_from_config(qc(quant_method=method), "config.json")


def test_malformed_block():
    with pytest.raises(UnsupportedSchemeError, match="weight_block_size"):
        scheme_from_config(qc(quant_method="fp8", weight_block_size=[128]), "c")


@pytest.mark.parametrize("nested", ["FP8", ["FP8"], 3, True])
def test_modelopt_quantization_of_another_type(nested):
    # Was: AttributeError: 'str' object has no attribute 'get'.
    with pytest.raises(UnsupportedSchemeError, match="c: quantization_config.quantization must be an object") as e:
        scheme_from_config(qc(quant_method="modelopt", quantization=nested), "c")
    assert e.value.file == "c" and e.value.key == "quantization_config.quantization"


def test_modelopt_nested_quant_algo():
    assert scheme_from_config(qc(quant_method="modelopt", quantization={"quant_algo": "FP8"}), "c").name == "modelopt"


@pytest.mark.parametrize(
    "groups, where",
    [
        ({"g": "weights"}, "config_groups.g must be an object"),
        ({"g": {"weights": [8, "float"]}}, "config_groups.g.weights must be an object"),
        ({"g": {"weights": dict(type="float", num_bits=8, strategy="group", group_size=True)}}, "group_size"),
        ({"g": {"weights": dict(type="float", num_bits=8, strategy="block", block_structure=[2**64, 1])}}, "block_structure"),
    ],
)
def test_compressed_tensors_fields_of_the_wrong_type(groups, where):
    with pytest.raises(UnsupportedSchemeError, match=where):
        scheme_from_config(qc(quant_method="compressed-tensors", config_groups=groups), "c")


def test_a_group_quantizing_only_activations_is_skipped():
    groups = {"acts": {"weights": None, "input_activations": {}}, "w": {"weights": dict(type="float", num_bits=8, strategy="tensor")}}
    assert scheme_from_config(qc(quant_method="compressed-tensors", config_groups=groups), "c").granularities == (PerTensor(),)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_keys = st.sampled_from(["quant_method", "weight_block_size", "config_groups", "quant_algo", "quantization",
                         "weights", "type", "num_bits", "strategy", "block_structure", "group_size"])
_methods = st.sampled_from(["fp8", "compressed-tensors", "fbgemm_fp8", "modelopt", "gptq"])


@st.composite
def quantization_configs(draw):
    """Mostly-plausible configs with any JSON at any level: the shapes that reach deep code."""
    leaf = _json | _methods | st.just(8) | st.just("float") | st.sampled_from(["tensor", "channel", "block", "group"])
    node = st.recursive(leaf, lambda inner: st.dictionaries(_keys | st.text(max_size=4), inner, max_size=5) | st.lists(inner, max_size=3), max_leaves=16)
    qcfg = draw(st.dictionaries(_keys, node, max_size=6))
    if draw(st.booleans()):
        qcfg["quant_method"] = draw(_methods)
    return draw(st.sampled_from([{"quantization_config": qcfg}, {"quantization_config": draw(_json)}, qcfg]))


@given(config=quantization_configs())
def test_any_json_gives_a_scheme_none_or_an_unsupported_scheme_error(config):
    try:
        s = scheme_from_config(config, "cfg.json")
    except UnsupportedSchemeError as e:
        assert str(e).startswith("cfg.json: ") and e.file == "cfg.json"
    else:
        assert s is None or s.granularities


# --- ModelOpt's FP8 variants, and hf_quant_config.json without a quantization_config -------------


@pytest.mark.parametrize(
    "algo, granularity, scale_of",
    [
        ("FP8", "PerTensor", lambda s: s.reshape(())),
        ("FP8_PER_CHANNEL_PER_TOKEN", "PerChannel", lambda s: s.reshape(-1)),  # [N], as ModelOpt stores it
        ("FP8_PB_WO", "block[128, 128]", lambda s: s),
    ],
)
def test_modelopt_fp8_variants_from_hf_quant_config_json(tmp_path, algo, granularity, scale_of):
    gran = {"PerTensor": PerTensor(), "PerChannel": PerChannel(), "block[128, 128]": PerBlock((128, 128))}[granularity]
    codes, scale = quantize(torch.randn(256, 192, generator=torch.Generator().manual_seed(0)), gran)
    tensors = {"self_attn.q_proj.weight": codes, "self_attn.q_proj.weight_scale": scale_of(scale),
               "self_attn.q_proj.input_scale": torch.tensor(1.0), "self_attn.k_scale": torch.tensor(1.0),
               "norm.weight": torch.ones(4).bfloat16()}  # fmt: skip
    path = write_sharded(str(tmp_path), {"model-00001-of-00001.safetensors": tensors}, {"model_type": "llama"})
    (tmp_path / "hf_quant_config.json").write_text(
        json.dumps({"producer": {"name": "modelopt", "version": "0.29"}, "quantization": {"quant_algo": algo, "kv_cache_quant_algo": "FP8"}})
    )
    view = LazyFP8View(path)
    assert view.scheme.name == "modelopt" and set(view) == {"self_attn.q_proj.weight", "norm.weight"}
    assert view.info("self_attn.q_proj.weight").granularity.name == granularity
    block = (128, 128) if algo == "FP8_PB_WO" else None
    assert torch.equal(view.get_tensor("self_attn.q_proj.weight").view(torch.int16), expected(codes, scale, torch.bfloat16, block).view(torch.int16))


def test_an_unknown_modelopt_algo_is_refused_naming_it_and_the_file(tmp_path):
    path = write_sharded(str(tmp_path), {"model-00001-of-00001.safetensors": {"w.weight": torch.zeros(2, 2)}}, {"model_type": "llama"})
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "W4A8_AWQ"}}))
    with pytest.raises(UnsupportedSchemeError, match=r"hf_quant_config\.json.*'W4A8_AWQ'"):
        LazyFP8View(path)
    # a config.json quantization_config wins over hf_quant_config.json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "fp8"}}))
    assert LazyFP8View(path).scheme.name == "fp8"


def test_compressed_tensors_output_scales_are_hidden_like_kv_scales(tmp_path):
    codes, scale = quantize(torch.randn(8, 16), PerTensor())
    tensors = {"k_proj.weight": codes, "k_proj.weight_scale": scale, "k_proj.output_scale": torch.tensor(0.5),
               "v_proj.weight": codes.clone(), "v_proj.weight_scale": scale.clone(), "v_proj.output_scale": torch.tensor(0.5)}  # fmt: skip
    path = write_sharded(str(tmp_path), {"model-00001-of-00001.safetensors": tensors}, None)
    assert set(LazyFP8View(path)) == {"k_proj.weight", "v_proj.weight"}
    assert set(LazyFP8View(path, include_quant_params=True)) >= {"k_proj.output_scale", "v_proj.output_scale"}
