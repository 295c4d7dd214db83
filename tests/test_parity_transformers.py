"""Bit-exact parity with transformers 5's FP8 dequantization, and where transformers is wrong.

transformers dequantizes FP8 in ``integrations.finegrained_fp8.Fp8Dequantize._dequantize_one``:
``(w.to(float32) * s.to(float32)).to(out)``, the reference formula, but with the block size
*inferred* as ``rows // scale_rows`` instead of taken from ``weight_block_size``. Where the grid
divides the weight evenly that is right and must agree with lazyfp8 bit for bit; at ragged edges
(a 300x200 weight, a DeepSeek ``kv_a_proj_with_mqa``) it is silently wrong or raises.

``from_pretrained`` of a pre-quantized ``quant_method: fp8`` checkpoint dequantizes on load by
itself on a machine without CUDA/XPU (``FineGrainedFP8HfQuantizer.validate_environment`` sets
``dequantize = True``; it needs accelerate installed); ``FineGrainedFP8Config(dequantize=True)``
asks for the same explicitly.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' FP8 quantizer refuses to run without it

from transformers.integrations.finegrained_fp8 import Fp8Dequantize

from lazyfp8 import LazyFP8View, PerBlock, init_empty_weights, load_into
from tests.builders import (
    deepseek_config,
    deepseek_v3_checkpoint,
    expected,
    fp8_block_config,
    quantize_state_dict,
)
from tests.helpers import bits, reference, save, write_layout
from tests.strategies import fp8_codes

TARGETS = [torch.bfloat16, torch.float16, torch.float32]


def transformers_dequant(codes, scale, dtype):
    # hf_quantizer is only stored by __init__; _dequantize_one does not use it.
    return Fp8Dequantize(hf_quantizer=None)._dequantize_one(codes, scale, output_dtype=dtype)


def random_scales(shape, seed, dtype=torch.float32):
    # Block scales spread over 2^-30 .. 2^12 so f16 targets meet subnormals and overflow too.
    g = torch.Generator().manual_seed(seed)
    return torch.exp2(torch.rand(shape, generator=g) * 42 - 30).to(dtype)


def lazy(path, key, dtype, **kw):
    with LazyFP8View(path, dtype=dtype, **kw) as view:
        return view.get_tensor(key)


# --- (a) Fp8Dequantize on block scales that divide the weight evenly -----------------------------


@pytest.mark.parametrize("dtype", TARGETS)
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("shape", [(128, 128), (256, 384), (384, 128), (128, 640)])
def test_block_128_matches_fp8dequantize_bit_for_bit(tmp_path, shape, fp8, dtype):
    # Every byte value appears (NaN, +-0, subnormals, max), so this covers the whole code table.
    seed = shape[0] * 7 + shape[1]
    codes = fp8_codes(shape, fp8, seed)
    scale = random_scales((shape[0] // 128, shape[1] // 128), seed)
    path = save({"w.weight": codes, "w.weight_scale_inv": scale}, str(tmp_path / "m.safetensors"))
    ours = lazy(path, "w.weight", dtype, scheme=PerBlock((128, 128)))
    theirs = transformers_dequant(codes, scale, dtype)
    assert theirs.dtype == ours.dtype == dtype
    assert torch.equal(bits(ours), bits(theirs))
    # both equal the reference, and the scales really varied (so a reader ignoring them fails)
    assert torch.equal(bits(ours), bits(reference(codes, scale, dtype, (128, 128))))
    assert scale.unique().numel() == scale.numel()


def test_fp8dequantize_convert_with_a_bf16_scale_and_a_destination_module(tmp_path):
    # convert() is what from_pretrained calls: it takes the output dtype from the destination
    # parameter of ``model``. A BF16 scale is read as its exact float32 value by both.
    codes = fp8_codes((256, 256), torch.float8_e4m3fn, 3)
    scale = random_scales((2, 2), 3, torch.bfloat16)
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(256, 256, bias=False, dtype=torch.float16)
    out = Fp8Dequantize(None).convert(
        {"weight": [codes], "weight_scale_inv": [scale]}, full_layer_name="proj.weight", model=model
    )["proj.weight"]
    path = save({"proj.weight": codes, "proj.weight_scale_inv": scale}, str(tmp_path / "m.safetensors"))
    ours = lazy(path, "proj.weight", torch.float16, block_size=(128, 128))
    assert out.dtype == torch.float16
    assert torch.equal(bits(ours), bits(out))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale_dtype", [torch.uint8, torch.float8_e8m0fnu], ids=["U8", "F8_E8M0"])
def test_ue8m0_1x32_matches_fp8dequantize(tmp_path, scale_dtype, dtype):
    # MXFP8: a [rows, cols / 32] grid of exponent bytes. transformers infers 1x32 blocks from the
    # grid (right here, the grid divides evenly) and decodes U8 as 2^(b - 127) itself; lazyfp8
    # picks MX blocks for exponent scales with no config.
    codes = fp8_codes((64, 256), torch.float8_e4m3fn, 11)
    g = torch.Generator().manual_seed(11)
    exps = torch.randint(100, 150, (64, 8), generator=g, dtype=torch.int32).to(torch.uint8)
    scale = exps if scale_dtype == torch.uint8 else exps.view(torch.float8_e8m0fnu)
    path = save({"w.weight": codes, "w.weight_scale_inv": scale}, str(tmp_path / "m.safetensors"))
    ours = lazy(path, "w.weight", dtype)
    theirs = transformers_dequant(codes, scale, dtype)
    assert torch.equal(bits(ours), bits(theirs))
    assert torch.equal(bits(ours), bits(expected(codes, scale, dtype, (1, 32))))


# --- (b) ragged edges: transformers infers the block size from the grid --------------------------


def test_ragged_300x200_transformers_uses_100x100_blocks_lazyfp8_the_declared_128x128(tmp_path):
    # A [300, 200] weight quantized in 128x128 blocks has a [3, 2] grid with partial last blocks.
    # transformers computes block = (300 // 3, 200 // 2) = (100, 100). Rows 100-127 and 200-255
    # and columns 100-127 then take a neighbouring block's scale: 84 * 200 + 300 * 28 - 84 * 28
    # = 22,848 positions. With distinct power-of-two scales and codes that are never zero or NaN
    # (so a different scale always gives a different value), exactly those elements differ.
    g = torch.Generator().manual_seed(5)
    nonzero = [c for c in range(256) if c not in (0x00, 0x80, 0x7F, 0xFF)]
    pick = torch.randint(0, len(nonzero), (300, 200), generator=g)
    codes = torch.tensor(nonzero, dtype=torch.uint8)[pick].view(torch.float8_e4m3fn)
    scale = torch.tensor([[2.0**-8, 2.0**-6], [2.0**-4, 2.0**-2], [2.0**0, 2.0**2]])
    path = save({"w.weight": codes, "w.weight_scale_inv": scale}, str(tmp_path / "m.safetensors"))
    right = reference(codes, scale, torch.float32, block=(128, 128))

    ours = lazy(path, "w.weight", torch.float32, block_size=(128, 128))
    theirs = transformers_dequant(codes, scale, torch.float32)

    assert torch.equal(bits(ours), bits(right))
    assert not torch.equal(theirs, right), "transformers now gets ragged block scales right"
    assert torch.equal(bits(theirs), bits(reference(codes, scale, torch.float32, block=(100, 100))))
    wrong = theirs != right
    assert int(wrong.sum()) == 22_848
    rows = torch.zeros(300, dtype=torch.bool)
    rows[100:128] = rows[200:256] = True
    cols = torch.zeros(200, dtype=torch.bool)
    cols[100:128] = True
    assert torch.equal(wrong, rows[:, None] | cols[None, :])


def test_ragged_real_quantized_weight_differs_in_bf16(tmp_path):
    # The same shape quantized from a real weight with lazyfp8.quantize, read in BF16: the
    # difference is not an artefact of chosen codes.
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(9)) * 0.02
    disk, q = quantize_state_dict({"w.weight": w}, lambda k: True, PerBlock((128, 128)))
    codes, scale = q["w.weight"]
    path = save(disk, str(tmp_path / "m.safetensors"))
    ours = lazy(path, "w.weight", torch.bfloat16, block_size=(128, 128))
    theirs = transformers_dequant(codes, scale, torch.bfloat16)
    assert torch.equal(bits(ours), bits(reference(codes, scale, torch.bfloat16, (128, 128))))
    differ = int((theirs != ours).sum())
    assert 15_000 < differ <= 22_848  # codes that are 0 give 0 under either scale


def test_ragged_deepseek_v3_kv_a_proj_shape_makes_transformers_raise(tmp_path):
    # DeepSeek-V3's kv_a_proj_with_mqa is [576, 7168] with a [5, 56] grid: 576 % 5 != 0, so
    # transformers refuses to dequantize it on CPU; lazyfp8 reads it (here 576 x 128, one grid column).
    codes = fp8_codes((576, 128), torch.float8_e4m3fn, 2)
    scale = random_scales((5, 1), 2)
    path = save({"w.weight": codes, "w.weight_scale_inv": scale}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"not divisible by scale grid \(5, 1\)"):
        transformers_dequant(codes, scale, torch.bfloat16)
    ours = lazy(path, "w.weight", torch.bfloat16, block_size=(128, 128))
    assert torch.equal(bits(ours), bits(reference(codes, scale, torch.bfloat16, (128, 128))))


# --- (c) from_pretrained of a real architecture, dequantized on CPU ------------------------------


def qwen3_config():
    # Every Linear is a multiple of 128 both ways (q/o 256x256, k/v 128x256, gate/up 384x256,
    # down 256x384): transformers' inferred block is the declared one.
    return transformers.Qwen3Config(
        hidden_size=256,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=256,
        tie_word_embeddings=False,
    )


def is_fp8_linear(key):
    return key.startswith("model.layers.") and key.endswith("_proj.weight")


@pytest.fixture(scope="module")
def qwen3_fp8(tmp_path_factory):
    cfg = qwen3_config()
    torch.manual_seed(0)
    src = transformers.Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    disk, q = quantize_state_dict(src.state_dict(), is_fp8_linear, PerBlock((128, 128)))
    path = str(tmp_path_factory.mktemp("qwen3_fp8"))
    config = fp8_block_config({**cfg.to_dict(), "architectures": ["Qwen3ForCausalLM"]})
    write_layout(path, disk, config, shards=2, scales_apart=True)
    return path, q


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("how", ["automatic", "explicit"])
def test_from_pretrained_dequantized_equals_load_into(qwen3_fp8, how, dtype):
    path, quantized = qwen3_fp8
    kwargs = {}
    if how == "explicit":
        kwargs["quantization_config"] = transformers.FineGrainedFP8Config(dequantize=True)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, output_loading_info=True, **kwargs
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # it really dequantized: plain Linears of the requested dtype, quantization config dropped
    assert type(hf.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert not hasattr(hf.config, "quantization_config")

    with init_empty_weights():
        ours = transformers.Qwen3ForCausalLM(qwen3_config()).to(dtype)
    result = load_into(ours, path, dtype=dtype)  # strict
    assert result.missing_keys == [] and result.unexpected_keys == []

    theirs_sd, ours_sd = hf.state_dict(), ours.state_dict()
    assert theirs_sd.keys() == ours_sd.keys()
    for key, value in ours_sd.items():
        assert value.dtype == theirs_sd[key].dtype == dtype, key
        assert torch.equal(bits(value), bits(theirs_sd[key])), key
    assert len(quantized) == 14
    for key, (codes, scale) in quantized.items():
        assert torch.equal(bits(ours_sd[key]), bits(expected(codes, scale, dtype, (128, 128)))), key


# --- (d) from_pretrained of DeepSeek-V3's on-disk layout: parity except at the ragged edge --------


def test_from_pretrained_deepseek_v3_layout_matches_except_ragged_kv_a_proj(tmp_path):
    cfg = deepseek_config()
    torch.manual_seed(0)
    src = transformers.DeepseekV3ForCausalLM(cfg).to(torch.bfloat16)
    path = str(tmp_path)
    _, quantized = deepseek_v3_checkpoint(
        path, src.state_dict(), {**cfg.to_dict(), "architectures": ["DeepseekV3ForCausalLM"]}
    )
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]  # no sign of the error below
    theirs = hf.state_dict()
    view = LazyFP8View(path)
    ragged = {f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight" for i in range(2)}

    experts = "model.layers.1.mlp.experts"
    for key, value in theirs.items():
        if key == f"{experts}.gate_up_proj":  # transformers fuses [gate; up] of every expert
            ours = torch.stack(
                [
                    torch.cat([view.get_tensor(f"{experts}.{e}.{p}_proj.weight") for p in ("gate", "up")])
                    for e in range(4)
                ]
            )
        elif key == f"{experts}.down_proj":
            ours = torch.stack([view.get_tensor(f"{experts}.{e}.down_proj.weight") for e in range(4)])
        else:
            ours = view.get_tensor(key).to(value.dtype)
        if key in ragged:
            codes, scale = quantized[key]
            assert torch.equal(bits(ours), bits(expected(codes, scale, torch.bfloat16, (128, 128))))
            # rows 96-127 use the second row of scales in transformers: 32 x 256 elements at most
            wrong = value != ours
            assert 0 < int(wrong.sum()) <= 32 * 256, key
            assert not wrong[:96].any() and not wrong[128:].any()
        else:
            assert torch.equal(bits(ours), bits(value)), key
