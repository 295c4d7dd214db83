"""A real transformers Mistral3 model, loaded strict from its dawn-ridge FP8 checkpoint."""

import json
import os
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lazyfp8
from lazyfp8 import LazyFP8View, init_empty_weights, load_into  # noqa: E402
from lazyfp8.testing import quantize_per_tensor, write_checkpoint  # noqa: E402
from tests.helpers import bits, reference  # noqa: E402

#: The weights the dawn-ridge layout (Mistral-3.x releases) stores as FP8: the text layers' Linears.
DAWN_RIDGE_FP8 = re.compile(r"^model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


def dawn_ridge_fp8(key: str) -> bool:
    return DAWN_RIDGE_FP8.match(key) is not None


def config(tie: bool):
    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, head_dim=16, tie_word_embeddings=tie)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=16, head_dim=16)
    return transformers.Mistral3Config(text_config=text, vision_config=vision, tie_word_embeddings=tie)


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def dawn_ridge(request, tmp_path):
    tie = request.param
    torch.manual_seed(0)
    src = transformers.Mistral3ForConditionalGeneration(config(tie)).to(torch.bfloat16)
    sd = src.state_dict()
    if tie:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}  # tied checkpoints store no head
    # on-disk names: the inverse of the "mistral3" mapping (language_model.model.*, vision_tower.*...)
    write_checkpoint(
        sd, tmp_path, quantize=dawn_ridge_fp8, key_mapping="mistral3", activation_scales=True, max_shard_size="40KB"
    )
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) >= 3
    return str(tmp_path), src.state_dict(), tie


def expected(key, value):
    if dawn_ridge_fp8(key):
        codes, scale = quantize_per_tensor(value)
        return reference(codes, scale, torch.bfloat16)
    return value


def test_disk_layout_is_the_legacy_one(dawn_ridge):
    path, _, _ = dawn_ridge
    view = LazyFP8View(path)
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in view
    assert all(not k.startswith("model.") for k in view)


def test_load_state_dict_strict(dawn_ridge):
    path, sd, tie = dawn_ridge
    cfg = config(tie)
    model = transformers.Mistral3ForConditionalGeneration(cfg).to(torch.bfloat16)
    view = LazyFP8View(path, key_mapping="mistral3")
    result = model.load_state_dict(view, strict=not tie)
    assert result.unexpected_keys == []
    loaded = model.state_dict()
    for key in view:
        assert torch.equal(bits(loaded[key]), bits(expected(key, sd[key]))), key


def test_load_into_meta_model(dawn_ridge):
    path, sd, tie = dawn_ridge
    with init_empty_weights():
        model = transformers.Mistral3ForConditionalGeneration(config(tie)).to(torch.bfloat16)
    load_into(model, path, key_mapping="mistral3")
    loaded = model.state_dict()
    for key, value in sd.items():
        assert torch.equal(bits(loaded[key]), bits(expected(key, value))), key
    if tie:
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    # the model runs
    ids = torch.tensor([[1, 2, 3]])
    out = model(input_ids=ids)
    assert torch.isfinite(out.logits.float()).all()


def test_auto_key_mapping_finds_the_layout(dawn_ridge, caplog):
    path, sd, tie = dawn_ridge
    with init_empty_weights():
        model = transformers.Mistral3ForConditionalGeneration(config(tie)).to(torch.bfloat16)
    with caplog.at_level("INFO", logger="lazyfp8"):
        load_into(model, path, key_mapping="auto")
    assert "^language_model\\.model\\. -> model.language_model." in caplog.text
    for key, value in model.state_dict().items():
        assert torch.equal(bits(value), bits(expected(key, sd[key]))), key


def test_save_with_the_preset_writes_what_transformers_loads(tmp_path):
    """save(model, key_mapping="mistral3") keeps the vision tower and projector in BF16, as
    Mistral 3's releases do, and lists the unquantized Linears in modules_to_not_convert, so
    transformers' own from_pretrained loads the result: vision weights bit-exact, the language
    model's FP8 weights as lazyfp8 dequantizes them."""
    torch.manual_seed(1)
    src = transformers.Mistral3ForConditionalGeneration(config(False)).to(torch.bfloat16)
    lazyfp8.save(src, tmp_path, key_mapping="mistral3", config={**src.config.to_dict(), "architectures": ["Mistral3ForConditionalGeneration"]})
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert "model.vision_tower.transformer.layers.0.attention.q_proj" in qc["modules_to_not_convert"]
    hf, info = transformers.Mistral3ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = LazyFP8View(tmp_path, key_mapping="mistral3")
    theirs = hf.state_dict()
    for key in ("model.vision_tower.transformer.layers.0.attention.q_proj.weight", "model.multi_modal_projector.linear_1.weight"):
        assert torch.equal(theirs[key], src.state_dict()[key]), key
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert ours.info(key).scale_key is not None
    assert torch.equal(theirs[key].view(torch.int16), ours.get_tensor(key).view(torch.int16))
