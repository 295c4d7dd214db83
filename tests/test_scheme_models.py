"""Three released FP8 checkpoint styles, generated here, loaded strict into real transformers models.

Each checkpoint is written by ``tests.builders`` (``lazyfp8.quantize``, then ``lazyfp8.testing.write_checkpoint``)
with the config.json its style ships, read with no ``scheme=`` (the scheme comes from the config,
or from the scale dtype), loaded with ``load_into(model_on_meta, path)`` strict, and every model
tensor compared bit for bit with the reference dequantization of the codes and scales written.
"""

import re

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP, DeepseekV3MoE

from lazyfp8 import LazyFP8View, PerBlock, PerChannel, init_empty_weights, load_into
from tests.builders import (
    DEEPSEEK_FP8,
    add_input_scales,
    compressed_tensors_channel_config,
    deepseek_config,
    deepseek_v3_checkpoint,
    expected,
    mx_config,
    quantize_state_dict,
    write_checkpoint,
)
from tests.helpers import bits

LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


def assert_loaded(model, disk, quantized, block):
    """Every tensor of ``model`` is the reference of what was written: FP8 weights dequantized
    (``block`` None: per-channel), everything else the stored tensor in the model's dtype."""
    sd = model.state_dict()
    assert not any(t.is_meta for t in sd.values())
    for key, value in sd.items():
        if key in quantized:
            want = expected(*quantized[key], value.dtype, block)
        else:
            want = disk[key].to(value.dtype)
        assert torch.equal(bits(value), bits(want)), key


# --- (a) DeepSeek-V3 -----------------------------------------------------------------------------
#
# transformers 5 fuses the routed experts at runtime (``mlp.experts.gate_up_proj`` [E, 2I, H] and
# ``mlp.experts.down_proj`` [E, H, I], merged from per-expert tensors by WeightConverters in
# from_pretrained), while DeepSeek ships them per expert (``mlp.experts.{e}.gate_proj.weight`` ...
# each with its own 128x128 ``weight_scale_inv``). lazyfp8 renames keys but never merges tensors,
# so the shipped layout cannot strict-load into ``DeepseekV3ForCausalLM`` as transformers builds it.
# We therefore build the shipped layout and strict-load it into the same model with each MoE
# layer's experts as the ``nn.ModuleList`` of ``DeepseekV3MLP`` that DeepSeek's own modeling code
# uses, which is exactly the on-disk tree. (Parity of the fused runtime tensors with transformers'
# own loading of this layout is tested in test_parity_transformers.py.)


def per_expert_deepseek(cfg):
    """DeepseekV3ForCausalLM on the meta device with DeepSeek's per-expert MoE module tree."""
    with init_empty_weights():
        model = transformers.DeepseekV3ForCausalLM(cfg)
        for layer in model.model.layers:
            if isinstance(layer.mlp, DeepseekV3MoE):
                layer.mlp.experts = nn.ModuleList(
                    DeepseekV3MLP(cfg, intermediate_size=cfg.moe_intermediate_size)
                    for _ in range(cfg.n_routed_experts)
                )
    return model.to(torch.bfloat16)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    cfg = deepseek_config()
    torch.manual_seed(0)
    src = transformers.DeepseekV3ForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # non-zero router biases, so loading them is observable
        src.model.layers[1].mlp.gate.e_score_correction_bias.normal_()
    path = str(tmp_path_factory.mktemp("deepseek_v3"))
    disk, quantized = deepseek_v3_checkpoint(path, src.state_dict(), cfg.to_dict(), shards=3)
    return path, cfg, disk, quantized


def test_deepseek_v3_view_keys_and_values(deepseek):
    path, _, disk, quantized = deepseek
    view = LazyFP8View(path)
    scales = {k for k in disk if k.endswith("_scale_inv")}
    assert set(view) == set(disk) - scales
    assert view.scheme.name == "fp8"
    experts = {k for k in view if ".mlp.experts." in k}
    assert len(experts) == 4 * 3 and all(
        re.fullmatch(r".*\.experts\.[0-3]\.(gate|up|down)_proj\.weight", k) for k in experts
    )
    # FP8: layer 0's 5 MLA Linears + 3 dense MLP, layer 1's 5 MLA + 12 expert + 3 shared-expert
    assert len(quantized) == 28 and set(quantized) == {k for k in view if DEEPSEEK_FP8.match(k)}
    for key in view:
        info = view.info(key)
        if key in quantized:
            assert info.disk_dtype == torch.float8_e4m3fn and info.granularity == PerBlock((128, 128))
            assert info.scale_key == key + "_scale_inv"
            want = expected(*quantized[key], torch.bfloat16, (128, 128))
        else:
            assert info.scale_key is None
            want = disk[key]
        got = view.get_tensor(key)
        assert got.dtype == want.dtype and torch.equal(bits(got), bits(want)), key
    # what stays unquantized, in the dtypes DeepSeek ships
    assert view.info("model.layers.1.mlp.gate.weight").disk_dtype == torch.bfloat16
    assert view.info("model.layers.1.mlp.gate.e_score_correction_bias").disk_dtype == torch.float32
    assert disk["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 2)


def test_deepseek_v3_strict_load_into_per_expert_model(deepseek):
    path, cfg, disk, quantized = deepseek
    model = per_expert_deepseek(cfg)
    result = load_into(model, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_loaded(model, disk, quantized, (128, 128))
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.bfloat16 and bias.abs().sum() > 0


def test_deepseek_v3_does_not_strict_load_into_the_fused_runtime_model(deepseek):
    # Why the test above changes the module tree: strict loading into transformers' own runtime
    # layout reports the fused parameters missing and the per-expert tensors unexpected.
    path, cfg, _, _ = deepseek
    with init_empty_weights():
        model = transformers.DeepseekV3ForCausalLM(cfg).to(torch.bfloat16)
    with pytest.raises(
        RuntimeError,
        match=r'Missing key\(s\) in state_dict: .*"model\.layers\.1\.mlp\.experts\.gate_up_proj"',
    ):
        load_into(model, path)


# --- (b) compressed-tensors, per-channel ---------------------------------------------------------


def llama_config():
    return transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def compressed_tensors(tmp_path_factory):
    cfg = llama_config()
    torch.manual_seed(1)
    src = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    # llm-compressor's FP8 preset: [N, 1] weight_scale per output channel (F32 for attention,
    # BF16 for the MLP here, as exporters differ), a static [1] input_scale beside each weight.
    disk, quantized = quantize_state_dict(
        src.state_dict(),
        lambda k: LINEAR.match(k) is not None,
        PerChannel(),
        suffix="_scale",
        scale_dtype=lambda k: torch.bfloat16 if ".mlp." in k else torch.float32,
    )
    input_scales = add_input_scales(disk, quantized)
    path = str(tmp_path_factory.mktemp("compressed_tensors"))
    write_checkpoint(
        path, disk, compressed_tensors_channel_config(cfg.to_dict(), ignore=["lm_head"]), shards=2
    )
    return path, cfg, disk, quantized, input_scales


def test_compressed_tensors_channel_strict_load(compressed_tensors):
    path, cfg, disk, quantized, _ = compressed_tensors
    view = LazyFP8View(path)
    assert view.scheme.name == "compressed-tensors"
    assert len(quantized) == 14
    for key in quantized:
        assert view.info(key).granularity == PerChannel() and view.info(key).scale_key == key + "_scale"
    assert disk["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.bfloat16
    with init_empty_weights():
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    result = load_into(model, view)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_loaded(model, disk, quantized, None)
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits.float()).all()


def test_compressed_tensors_input_scales_are_what_strict_loading_hides(compressed_tensors):
    # The static input scales are not weights: hidden by default (so strict loading passes),
    # exposed with include_quant_params=True, and then a plain Llama rejects them.
    path, cfg, disk, _, input_scales = compressed_tensors
    view = LazyFP8View(path, include_quant_params=True)
    assert set(input_scales) <= set(view)
    assert torch.equal(view.get_tensor(input_scales[0]), disk[input_scales[0]])
    with init_empty_weights():
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: .*input_scale"):
        load_into(model, view)


# --- (c) ue8m0 exponent scales over 1x32 blocks (MXFP8) ------------------------------------------


def qwen3_config():
    # Every Linear's width (64 or 96) is a multiple of the 32-element MX block.
    return transformers.Qwen3Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
        tie_word_embeddings=False,
    )


@pytest.mark.parametrize(
    "scale_dtype, fp8, declared",
    [
        # ue8m0 bytes stored as U8, config.json declaring fp8 + weight_block_size [1, 32]
        (torch.uint8, torch.float8_e4m3fn, True),
        # the same bytes as F8_E8M0 with e5m2 weights and no quantization_config: the scale
        # dtype alone must select MX 1x32 blocks
        (torch.float8_e8m0fnu, torch.float8_e5m2, False),
    ],
    ids=["U8-e4m3-declared", "F8_E8M0-e5m2-auto"],
)
def test_ue8m0_strict_load(tmp_path, scale_dtype, fp8, declared):
    cfg = qwen3_config()
    torch.manual_seed(2)
    src = transformers.Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    disk, quantized = quantize_state_dict(
        src.state_dict(),
        lambda k: LINEAR.match(k) is not None,
        PerBlock((1, 32)),
        fp8_dtype=fp8,
        scale_dtype=scale_dtype,
    )
    config = mx_config(cfg.to_dict()) if declared else cfg.to_dict()
    write_checkpoint(str(tmp_path), disk, config, shards=2)
    key = "model.layers.0.mlp.down_proj.weight"
    assert disk[key + "_scale_inv"].dtype == scale_dtype and disk[key + "_scale_inv"].shape == (64, 3)
    assert disk[key].dtype == fp8

    view = LazyFP8View(str(tmp_path))
    assert view.scheme.name == ("fp8" if declared else "auto")
    assert all(view.info(k).granularity == PerBlock((1, 32)) for k in quantized)
    with init_empty_weights():
        model = transformers.Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    result = load_into(model, view)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_loaded(model, disk, quantized, (1, 32))
