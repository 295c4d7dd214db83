"""FP4 and int weights in every stored form the pairing knows (``formats.pairing.FORMS``): each
read lazily and bit-exactly against the format's formula, evaluated here independently (codes
looked up, scales expanded element by element, float32 throughout, rounded once)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lazyfp8 import LazyFP8View
from lazyfp8.errors import CheckpointError, ScaleShapeError, UnsupportedDtypeError
from lazyfp8.formats.codecs import E2M1, INT4, INT8, INT8_OFFSET
from lazyfp8.formats.schemes import PerBlock
from lazyfp8.inspection import inspect_checkpoint

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _saves(dtype: torch.dtype) -> bool:
    from safetensors.torch import save

    try:
        save({"t": torch.zeros(1, dtype=torch.uint8).view(dtype)})
    except (KeyError, ValueError, TypeError):
        return False
    return True


#: safetensors before 0.6 cannot write F8_E8M0 tensors (the lowest-versions run has 0.4.3).
needs_e8m0 = pytest.mark.skipif(not _saves(torch.float8_e8m0fnu), reason="this safetensors cannot write F8_E8M0")


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[..., 2k]`` 4-bit codes -> ``[..., k]`` bytes, element ``2i`` in the low nibble."""
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def pack_int32(codes: torch.Tensor) -> torch.Tensor:
    """``[..., 8k]`` 4-bit codes -> ``[..., k]`` int32 words, eight nibbles little-endian."""
    return pack_nibbles(codes).view(torch.int32)


def expected(codes, values, scale, group, dtype, *, zero=None, global_scale=None, divide=False):
    """The formula of ``formats.pairing.Quantized`` on whole tensors: every code's value, minus
    its group's zero point, times its group's scale (over, or times, the global scale)."""
    cols = codes.shape[-1]
    v = values[codes.long()]
    s = scale.to(torch.float32)
    if global_scale is not None:
        s = s / global_scale if divide else s * global_scale
    s = s.repeat_interleave(group, dim=-1)[..., :cols]
    if zero is not None:
        v = v - zero.to(torch.float32).repeat_interleave(group, dim=-1)[..., :cols]
    return (v * s).to(dtype)


def write(path, tensors, config=None, name="model.safetensors"):
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, name))
    if config is not None:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
    return str(path)


def rand_codes(gen, shape, bits=4):
    return torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.int32).to(torch.uint8)


def e4m3_scales(gen, shape):
    # positive, finite e4m3 values across the range (codes 0x08-0x7e: normal, below NaN)
    return torch.randint(0x08, 0x7F, shape, generator=gen, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)


# --- one writer per form ---------------------------------------------------------------------


def modelopt_nvfp4(tmp_path, out=48, cols=96, seed=0, hf_quant_config=False):
    gen = torch.Generator().manual_seed(seed)
    codes = rand_codes(gen, (out, cols))
    scale = e4m3_scales(gen, (out, cols // 16))
    s2 = torch.tensor(0.00731, dtype=torch.float32)
    tensors = {
        "layer.weight": pack_nibbles(codes),
        "layer.weight_scale": scale,
        "layer.weight_scale_2": s2,
        "layer.input_scale": torch.tensor(0.5),
        "norm.weight": torch.randn(out, generator=gen).to(torch.bfloat16),
    }
    qc = {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}
    if hf_quant_config:
        write(tmp_path, tensors, {"model_type": "llama"})
        with open(os.path.join(tmp_path, "hf_quant_config.json"), "w") as f:
            json.dump({"producer": {"name": "modelopt"}, "quantization": qc}, f)
    else:
        write(tmp_path, tensors, {"quantization_config": {"quant_method": "modelopt", **qc}})
    return codes, scale, s2


def ct_nvfp4(tmp_path, out=32, cols=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    codes = rand_codes(gen, (out, cols))
    scale = e4m3_scales(gen, (out, cols // 16))
    g = torch.tensor([448.0 * 6.0 / 3.7], dtype=torch.float32)
    tensors = {
        "mlp.down_proj.weight_packed": pack_nibbles(codes),
        "mlp.down_proj.weight_scale": scale,
        "mlp.down_proj.weight_global_scale": g,
        "mlp.down_proj.input_global_scale": torch.tensor([3.0]),
    }
    config = {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True}}},
    }}
    write(tmp_path, tensors, config)
    return codes, scale, g


def gpt_oss_mxfp4(tmp_path, experts=2, out=64, cols=96, seed=2):
    gen = torch.Generator().manual_seed(seed)
    codes = rand_codes(gen, (experts, out, cols))
    exps = torch.randint(110, 135, (experts, out, cols // 32), generator=gen, dtype=torch.int32).to(torch.uint8)
    tensors = {
        "model.layers.0.mlp.experts.gate_up_proj_blocks": pack_nibbles(codes).view(experts, out, cols // 32, 16),
        "model.layers.0.mlp.experts.gate_up_proj_scales": exps,
        "model.layers.0.mlp.experts.gate_up_proj_bias": torch.randn(experts, out, generator=gen).to(torch.bfloat16),
    }
    write(tmp_path, tensors, {"quantization_config": {"quant_method": "mxfp4"}})
    return codes, exps


def ct_int4(tmp_path, out=16, cols=256, group=64, seed=3, scale_dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    codes = rand_codes(gen, (out, cols))
    scale = (torch.rand(out, cols // group, generator=gen) * 0.02 + 1e-3).to(scale_dtype)
    tensors = {
        "proj.weight_packed": pack_int32(codes),
        "proj.weight_scale": scale,
        "proj.weight_shape": torch.tensor([out, cols]),
    }
    config = {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "strategy": "group", "group_size": group, "symmetric": True}}},
    }}
    write(tmp_path, tensors, config)
    return codes, scale


def ct_int8_channel(tmp_path, out=24, cols=40, seed=4):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (out, cols), generator=gen, dtype=torch.int32).to(torch.int8)
    scale = torch.rand(out, 1, generator=gen) * 0.01 + 1e-4
    zero = torch.randint(-5, 5, (out, 1), generator=gen, dtype=torch.int32).to(torch.int8)
    tensors = {"fc.weight": q, "fc.weight_scale": scale, "fc.weight_zero_point": zero}
    config = {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "naive-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "int", "strategy": "channel", "symmetric": False}}},
    }}
    write(tmp_path, tensors, config)
    return q, scale, zero


def deepseek_v4_experts(tmp_path, out=32, cols=128, seed=5):
    gen = torch.Generator().manual_seed(seed)
    codes = rand_codes(gen, (out, cols))
    exps = torch.randint(115, 130, (out, cols // 32), generator=gen, dtype=torch.int32).to(torch.uint8)
    tensors = {
        "layers.0.ffn.experts.0.w1.weight": pack_nibbles(codes).view(torch.int8),
        "layers.0.ffn.experts.0.w1.scale": exps.view(torch.float8_e8m0fnu),
    }
    write(tmp_path, tensors)
    return codes, exps


def e8m0(exps):
    return torch.exp2(exps.to(torch.float32) - 127)


# --- reading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hf_quant_config", [False, True])
def test_modelopt_nvfp4_global_scale_multiplies(tmp_path, dtype, hf_quant_config):
    codes, scale, s2 = modelopt_nvfp4(tmp_path, hf_quant_config=hf_quant_config)
    view = LazyFP8View(tmp_path, dtype=dtype)
    assert sorted(view) == ["layer.weight", "norm.weight"]  # scales and input_scale hidden
    assert view["layer.weight"].shape == (48, 96)
    want = expected(codes, E2M1.values(), scale, 16, dtype, global_scale=s2)
    assert torch.equal(view.get_tensor("layer.weight").view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_compressed_tensors_nvfp4_global_scale_divides(tmp_path, dtype):
    codes, scale, g = ct_nvfp4(tmp_path)
    view = LazyFP8View(tmp_path, dtype=dtype)
    assert list(view) == ["mlp.down_proj.weight"]
    assert view.disk_key("mlp.down_proj.weight") == "mlp.down_proj.weight_packed"
    want = expected(codes, E2M1.values(), scale, 16, dtype, global_scale=g, divide=True)
    assert torch.equal(view.get_tensor("mlp.down_proj.weight").view(torch.uint8), want.view(torch.uint8))


def test_the_two_nvfp4_conventions_differ(tmp_path):
    """Dividing by the global scale is not multiplying by it: a reader that mixes the two up is
    wrong by a factor of g^2, and this checkpoint tells them apart."""
    codes, scale, g = ct_nvfp4(tmp_path)
    got = LazyFP8View(tmp_path, dtype=torch.float32).get_tensor("mlp.down_proj.weight")
    wrong = expected(codes, E2M1.values(), scale, 16, torch.float32, global_scale=g)
    assert not torch.equal(got, wrong)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpt_oss_mxfp4_blocks(tmp_path, dtype):
    codes, exps = gpt_oss_mxfp4(tmp_path)
    view = LazyFP8View(tmp_path, dtype=dtype)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert sorted(view) == [key, key + "_bias"]
    assert view[key].shape == (2, 96, 64)  # [E, in, out], as transformers' GptOssExperts holds it
    want = expected(codes, E2M1.values(), e8m0(exps), 32, dtype).transpose(1, 2)
    assert torch.equal(view.get_tensor(key).view(torch.uint8), want.contiguous().view(torch.uint8))


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_int4_pack_quantized(tmp_path, scale_dtype):
    codes, scale = ct_int4(tmp_path, scale_dtype=scale_dtype)
    view = LazyFP8View(tmp_path)
    assert list(view) == ["proj.weight"]  # weight_shape and the scale hidden
    assert view["proj.weight"].shape == (16, 256)
    want = expected(codes, INT4.values(), scale, 64, torch.bfloat16)
    assert torch.equal(view.get_tensor("proj.weight").view(torch.int16), want.view(torch.int16))


def test_int8_asymmetric_channel(tmp_path):
    q, scale, zero = ct_int8_channel(tmp_path)
    view = LazyFP8View(tmp_path, dtype=torch.float32)
    want = expected(q.view(torch.uint8), INT8.values(), scale, 40, torch.float32, zero=zero)
    assert torch.equal(view.get_tensor("fc.weight"), want)


@needs_e8m0
def test_deepseek_v4_fp4_experts(tmp_path):
    codes, exps = deepseek_v4_experts(tmp_path)
    view = LazyFP8View(tmp_path)
    key = "layers.0.ffn.experts.0.w1.weight"
    assert view[key].shape == (32, 128)
    want = expected(codes, E2M1.values(), e8m0(exps), 32, torch.bfloat16)
    assert torch.equal(view.get_tensor(key).view(torch.int16), want.view(torch.int16))


def test_int_codecs_are_offset_like_compressed_tensors_packs_them():
    assert INT4.values().tolist() == list(range(-8, 8))
    assert INT8_OFFSET.values().tolist() == list(range(-128, 128))
    assert INT8.values()[:128].tolist() == list(range(128)) and INT8.values()[255].item() == -1
    assert E2M1.values()[8].item() == 0.0 and str(E2M1.values()[8].item()) == "-0.0"


# --- boxes: a shard boundary anywhere, inside a byte or a group ------------------------------


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_box_of_a_packed_weight_is_that_slice(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("box")
    codes, scale, g = ct_nvfp4(tmp, out=12, cols=80)
    view = LazyFP8View(tmp, chunk_elements=data.draw(st.sampled_from([7, 64, 1 << 20])))
    full = view.get_tensor("mlp.down_proj.weight")
    r0 = data.draw(st.integers(0, 11))
    r1 = data.draw(st.integers(r0, 12))
    c0 = data.draw(st.integers(0, 79))
    c1 = data.draw(st.integers(c0, 80))
    dst = torch.empty(r1 - r0, c1 - c0, dtype=torch.bfloat16)
    view.read_box("mlp.down_proj.weight", dst, (r0, c0), (r1 - r0, c1 - c0))
    assert torch.equal(dst.view(torch.int16), full[r0:r1, c0:c1].view(torch.int16))
    assert torch.equal(view["mlp.down_proj.weight"][r0:r1, c0:c1].view(torch.int16), full[r0:r1, c0:c1].view(torch.int16))


def test_box_of_stacked_mxfp4_experts(tmp_path):
    gpt_oss_mxfp4(tmp_path, experts=3, out=8, cols=64)
    view = LazyFP8View(tmp_path, chunk_elements=50)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    full = view.get_tensor(key)
    assert full.shape == (3, 64, 8)
    dst = torch.empty(2, 33, 5, dtype=torch.bfloat16)
    view.read_box(key, dst, (1, 17, 3), (2, 33, 5))
    assert torch.equal(dst, full[1:3, 17:50, 3:8])
    # the same through a strided destination: a column block of a wider parameter
    wide = torch.zeros(2, 33, 9, dtype=torch.bfloat16)
    view.read_box(key, wide[:, :, 2:7], (1, 17, 3), (2, 33, 5))
    assert torch.equal(wide[:, :, 2:7], full[1:3, 17:50, 3:8]) and not wide[:, :, :2].any()


def test_padded_int4_rows_read_at_an_offset(tmp_path):
    # a weight whose column count is a multiple of 8 but read from the middle of each row
    codes, scale = ct_int4(tmp_path, out=5, cols=64, group=32)
    view = LazyFP8View(tmp_path, chunk_elements=9)
    full = expected(codes, INT4.values(), scale, 32, torch.bfloat16)
    assert torch.equal(view["proj.weight"][1:4, 3:61], full[1:4, 3:61])


def test_load_state_dict_into_a_linear(tmp_path):
    codes, scale, s2 = modelopt_nvfp4(tmp_path)
    layer = torch.nn.Linear(96, 48, bias=False, dtype=torch.bfloat16)
    view = LazyFP8View(tmp_path)
    layer.load_state_dict({"weight": view["layer.weight"]})
    assert torch.equal(layer.weight.detach(), expected(codes, E2M1.values(), scale, 16, torch.bfloat16, global_scale=s2))


# --- detection and refusals ------------------------------------------------------------------


def test_inspect_reports_each_format(tmp_path):
    ct_nvfp4(tmp_path / "a")
    gpt_oss_mxfp4(tmp_path / "b")
    ct_int4(tmp_path / "c")
    forms = {}
    for d in "abc":
        report = inspect_checkpoint(tmp_path / d)
        assert not report.problems
        forms[d] = {(e["format"], e["codec"], e["granularity"]) for e in report.fp8}
    assert forms == {
        "a": {("nvfp4-ct", "e2m1", "block[1, 16]")},
        "b": {("mxfp4", "e2m1", "block[1, 32]")},
        "c": {("int-packed", "int4", "block[1, 64]")},
    }


def test_int32_codes_without_a_config_are_refused_naming_the_key(tmp_path):
    ct_int4(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(UnsupportedDtypeError, match="proj.weight_packed.*num_bits"):
        LazyFP8View(tmp_path)


def test_mx_blocks_of_the_wrong_width_are_named(tmp_path):
    blocks = torch.zeros(4, 2, 8, dtype=torch.uint8)  # 8 bytes a block, not 16
    write(tmp_path, {"e.w_blocks": blocks, "e.w_scales": torch.full((4, 2), 127, dtype=torch.uint8)})
    with pytest.raises(CheckpointError, match=r"e\.w_blocks.*\[4, 2, 8\]"):
        LazyFP8View(tmp_path)


def test_nvfp4_scale_of_the_wrong_shape_is_named(tmp_path):
    gen = torch.Generator().manual_seed(0)
    write(tmp_path, {
        "l.weight": pack_nibbles(rand_codes(gen, (8, 64))),
        "l.weight_scale": e4m3_scales(gen, (8, 3)),  # 64 columns need 4 groups of 16
        "l.weight_scale_2": torch.tensor(1.0),
    })
    with pytest.raises(ScaleShapeError, match=r"l\.weight_scale.*\[8, 3\]"):
        LazyFP8View(tmp_path)


def test_a_packed_name_that_collides_with_a_stored_one_is_ambiguous(tmp_path):
    ct_nvfp4(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    tensors["mlp.down_proj.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="ambiguous"):
        LazyFP8View(tmp_path)


def test_a_plain_byte_tensor_is_not_mistaken_for_fp4(tmp_path):
    write(tmp_path, {"mask.weight": torch.ones(4, 4, dtype=torch.uint8), "other": torch.ones(2)})
    view = LazyFP8View(tmp_path)
    assert view["mask.weight"].dtype == torch.uint8 and view["mask.weight"].shape == (4, 4)


# --- the DCP reader ------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["nvfp4-ct", "modelopt", "mxfp4", "int4"])
def test_dcp_load_reads_packed_weights(tmp_path, writer):
    import torch.distributed.checkpoint as dcp

    import lazyfp8

    {"nvfp4-ct": ct_nvfp4, "modelopt": modelopt_nvfp4, "mxfp4": gpt_oss_mxfp4, "int4": ct_int4}[writer](tmp_path)
    view = LazyFP8View(tmp_path)
    sd = {k: torch.empty(view[k].shape, dtype=view[k].dtype) for k in view}
    dcp.load(sd, storage_reader=lazyfp8.LazyFP8StorageReader(str(tmp_path), chunk_elements=100), no_dist=True)
    for k, v in sd.items():
        assert torch.equal(v, view.get_tensor(k)), k


# --- composite keys: per-expert NVFP4 weights fused the way transformers 5 holds them ---------


def test_per_expert_nvfp4_fused_into_a_transformers_moe(tmp_path):
    transformers = pytest.importorskip("transformers")
    import re

    from tests.builders import unfuse_experts

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
    )  # fmt: skip
    torch.manual_seed(0)
    per_expert = unfuse_experts(transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).state_dict())
    linear = re.compile(r"model\.layers\.\d+\.(self_attn|mlp\.experts\.\d+)\.\w+_proj\.weight$")
    gen = torch.Generator().manual_seed(1)
    disk, want = {}, {}
    for key, value in per_expert.items():
        if not linear.match(key):
            disk[key] = want[key] = value.contiguous()
            continue
        module = key.removesuffix(".weight")
        codes = rand_codes(gen, value.shape)
        scale = e4m3_scales(gen, (value.shape[0], value.shape[1] // 16))
        g = torch.tensor([100.0 + len(disk)])
        disk |= {module + ".weight_packed": pack_nibbles(codes), module + ".weight_scale": scale, module + ".weight_global_scale": g}
        want[key] = expected(codes, E2M1.values(), scale, 16, torch.bfloat16, global_scale=g, divide=True)
    config = {**cfg.to_dict(), "quantization_config": {
        "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}}},
    }}
    write(tmp_path, disk, config)
    view = LazyFP8View(tmp_path, key_mapping="transformers")
    model = transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    result = model.load_state_dict(view, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    p = "model.layers.0.mlp.experts"
    gate_up = torch.stack([torch.cat([want[f"{p}.{e}.gate_proj.weight"], want[f"{p}.{e}.up_proj.weight"]]) for e in range(4)])
    down = torch.stack([want[f"{p}.{e}.down_proj.weight"] for e in range(4)])
    sd = model.state_dict()
    assert torch.equal(sd[f"{p}.gate_up_proj"], gate_up) and torch.equal(sd[f"{p}.down_proj"], down)
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], want["model.layers.0.self_attn.q_proj.weight"])
    # one expert's rows of the fused value read only that expert's bytes
    fresh = LazyFP8View(tmp_path, key_mapping="transformers")
    assert torch.equal(fresh[f"{p}.gate_up_proj"][2], gate_up[2])
    codes_and_scales = sum(disk[f"{p}.2.{w}.{t}"].nbytes for w in ("gate_proj", "up_proj")
                           for t in ("weight_packed", "weight_scale", "weight_global_scale"))
    assert fresh.bytes_read == codes_and_scales


# --- FP8 under the newer names: DeepSeek-V4, Mistral's native format, MXFP8 -------------------


def e4m3_codes(gen, shape):
    return torch.randint(0, 0x7F, shape, generator=gen, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)


@needs_e8m0
def test_deepseek_v4_fp8_with_module_scale_grid(tmp_path):
    gen = torch.Generator().manual_seed(6)
    w = e4m3_codes(gen, (300, 256))
    exps = torch.randint(110, 130, (3, 2), generator=gen, dtype=torch.int32).to(torch.uint8)
    write(tmp_path, {"layers.0.attn.wq.weight": w, "layers.0.attn.wq.scale": exps.view(torch.float8_e8m0fnu)},
          {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}})
    view = LazyFP8View(tmp_path)
    assert list(view) == ["layers.0.attn.wq.weight"]
    s = e8m0(exps).repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :256]
    assert torch.equal(view.get_tensor("layers.0.attn.wq.weight"), (w.to(torch.float32) * s).to(torch.bfloat16))


def test_mistral_native_qscale_weight(tmp_path):
    gen = torch.Generator().manual_seed(7)
    w = e4m3_codes(gen, (32, 48))
    write(tmp_path, {"layers.0.attention.wq.weight": w, "layers.0.attention.wq.qscale_weight": torch.tensor(0.013),
                     "layers.0.attention.wq.qscale_act": torch.tensor(0.5)})
    view = LazyFP8View(tmp_path)
    assert list(view) == ["layers.0.attention.wq.weight"]  # the activation scale is not a key
    assert view.info("layers.0.attention.wq.weight").scale_key == "layers.0.attention.wq.qscale_weight"
    want = (w.to(torch.float32) * torch.tensor(0.013)).to(torch.bfloat16)
    assert torch.equal(view.get_tensor("layers.0.attention.wq.weight"), want)


def test_mxfp8(tmp_path):
    gen = torch.Generator().manual_seed(8)
    w = e4m3_codes(gen, (8, 96))
    exps = torch.randint(115, 130, (8, 3), generator=gen, dtype=torch.int32).to(torch.uint8)
    write(tmp_path, {"l.weight": w, "l.weight_scale": exps}, {"quantization_config": {"quant_method": "mxfp8"}})
    view = LazyFP8View(tmp_path)
    assert view.info("l.weight").granularity == PerBlock((1, 32))
    want = (w.to(torch.float32) * e8m0(exps).repeat_interleave(32, 1)).to(torch.bfloat16)
    assert torch.equal(view.get_tensor("l.weight"), want)


@pytest.mark.parametrize("tensors,what", [
    ({"l.qweight": torch.zeros(4, 8, dtype=torch.int32), "l.qzeros": torch.zeros(1, 1, dtype=torch.int32),
      "l.scales": torch.ones(1, 8, dtype=torch.float16)}, "GPTQ/AWQ"),
    ({"l.weight": torch.zeros(16, 1, dtype=torch.uint8), "l.weight.absmax": torch.ones(1),
      "l.weight.quant_state.bitsandbytes__nf4": torch.zeros(8, dtype=torch.uint8)}, "bitsandbytes"),
])
def test_formats_not_read_are_refused_naming_what_was_found(tmp_path, tensors, what):
    write(tmp_path, tensors)
    with pytest.raises(UnsupportedDtypeError, match=f"{what}.*does not read"):
        LazyFP8View(tmp_path)
