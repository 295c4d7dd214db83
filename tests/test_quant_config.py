import pytest

from lazyfp8 import PerBlock, PerChannel, PerTensor, UnsupportedSchemeError
from lazyfp8._quant_config import scheme_from_config


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


def test_compressed_tensors_int4_is_refused():
    with pytest.raises(UnsupportedSchemeError, match="4-bit int"):
        scheme_from_config(ct(type="int", num_bits=4, strategy="group", group_size=128), "c")


def test_fbgemm_and_modelopt():
    assert scheme_from_config(qc(quant_method="fbgemm_fp8"), "c").granularities == (PerChannel(),)
    assert scheme_from_config(qc(quant_method="modelopt", quant_algo="FP8"), "c").granularities == (PerTensor(),)
    with pytest.raises(UnsupportedSchemeError, match="NVFP4"):
        scheme_from_config(qc(quant_method="modelopt", quant_algo="NVFP4"), "c")


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", None])
def test_other_methods_are_refused_naming_what_was_found(method):
    with pytest.raises(UnsupportedSchemeError, match=f"quant_method is {method!r}.*fp8, compressed-tensors"):
        scheme_from_config(qc(quant_method=method), "config.json")


def test_malformed_block():
    with pytest.raises(UnsupportedSchemeError, match="weight_block_size"):
        scheme_from_config(qc(quant_method="fp8", weight_block_size=[128]), "c")
