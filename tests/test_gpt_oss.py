"""gpt-oss's MXFP4 experts, checked against transformers' own MXFP4 dequantization: its
``from_pretrained`` (which dequantizes on a CPU) and its ``convert_moe_packed_tensors``."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from lazyfp8 import LazyFP8View, init_empty_weights, load_into
from lazyfp8.errors import InvalidScaleError
from tests.test_packed import pack_nibbles


def tiny_config():
    return transformers.GptOssConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
        layer_types=["sliding_attention", "full_attention"],
    )


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """A tiny gpt-oss checkpoint as the HF releases lay it out: every expert matrix as
    ``*_blocks`` / ``*_scales``, the rest bf16, ``quant_method: mxfp4``."""
    path = tmp_path_factory.mktemp("gpt-oss")
    cfg = tiny_config()
    torch.manual_seed(0)
    sd = transformers.GptOssForCausalLM(cfg).to(torch.bfloat16).state_dict()
    gen = torch.Generator().manual_seed(0)
    disk = {}
    for k, v in sd.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, cin, cout = v.shape  # held [E, in, out]; stored [E, out, in / 32, 16]
            codes = torch.randint(0, 16, (e, cout, cin), generator=gen, dtype=torch.int32).to(torch.uint8)
            disk[k + "_blocks"] = pack_nibbles(codes).view(e, cout, cin // 32, 16)
            disk[k + "_scales"] = torch.randint(110, 135, (e, cout, cin // 32), generator=gen, dtype=torch.int32).to(torch.uint8)
        else:
            disk[k] = v.contiguous()
    save_file(disk, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_dict()
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path, disk


def test_equals_transformers_from_pretrained(gpt_oss):
    path, _ = gpt_oss
    hf = transformers.GptOssForCausalLM.from_pretrained(
        path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.bfloat16
    )
    want = hf.state_dict()
    view = LazyFP8View(path)
    assert set(view) == set(want)
    for key, value in want.items():
        got = view.get_tensor(key)
        assert got.dtype == value.dtype and torch.equal(got.view(torch.int16), value.view(torch.int16)), key


def test_load_state_dict_and_load_into_a_meta_model(gpt_oss):
    path, _ = gpt_oss
    view = LazyFP8View(path)
    model = transformers.GptOssForCausalLM(tiny_config()).to(torch.bfloat16)
    assert not model.load_state_dict(view, strict=True).missing_keys
    with init_empty_weights():
        meta = transformers.GptOssForCausalLM(tiny_config()).to(torch.bfloat16)
    load_into(meta, path)
    for (k, a), (_, b) in zip(model.state_dict().items(), meta.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_code_at_every_scale_matches_transformers(tmp_path, dtype):
    """All 16 codes under each of the 255 finite ue8m0 scales (2^-127 .. 2^127, products that
    are subnormal or overflow included) give transformers' bits."""
    codes = torch.arange(16, dtype=torch.uint8).repeat(2).expand(1, 255, 32).contiguous()
    scales = torch.arange(255, dtype=torch.uint8).view(1, 255, 1)
    blocks = pack_nibbles(codes).view(1, 255, 1, 16)
    save_file({"experts.w_blocks": blocks, "experts.w_scales": scales}, tmp_path / "model.safetensors")
    got = LazyFP8View(tmp_path, dtype=dtype).get_tensor("experts.w")
    want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_the_nan_scale_is_refused_naming_it(tmp_path):
    """Scale byte 255 is e8m0's NaN: transformers turns its block into infinities, lazyfp8
    refuses the weight."""
    blocks = torch.zeros(1, 2, 1, 16, dtype=torch.uint8)
    scales = torch.tensor([[[127], [255]]], dtype=torch.uint8)
    save_file({"experts.w_blocks": blocks, "experts.w_scales": scales}, tmp_path / "model.safetensors")
    with pytest.raises(InvalidScaleError, match="experts.w_scales"):
        LazyFP8View(tmp_path).get_tensor("experts.w")
