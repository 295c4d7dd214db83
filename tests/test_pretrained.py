"""lazyfp8.from_pretrained: the same model, bit for bit, as transformers' own from_pretrained of
the FP8 checkpoint (which dequantizes it on a machine without a GPU), at load_into's memory."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' FP8 quantizer refuses to run without it

import lazyfp8  # noqa: E402
from lazyfp8 import PerBlock, PerTensor  # noqa: E402
from tests.builders import fp8_block_config, quantize_state_dict, unfuse_experts, write_checkpoint  # noqa: E402
from tests.helpers import bits  # noqa: E402

MiB = 1 << 20


def tensors(model):
    """Every parameter and buffer under every name (tied ones under each)."""
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def tie_groups(model):
    groups = {}
    for name, t in tensors(model).items():
        groups.setdefault(id(t), []).append(name)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def assert_same_model(ours, theirs):
    assert type(ours) is type(theirs)
    a, b = tensors(ours), tensors(theirs)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].device == b[key].device, key
        assert torch.equal(bits(a[key]), bits(b[key])), key
    assert tie_groups(ours) == tie_groups(theirs)
    assert not ours.training and not theirs.training
    assert ours.config.to_dict() == theirs.config.to_dict()


def llama_config(**kw):
    # Every Linear a multiple of 128 both ways, so transformers' inferred block is the declared one
    # (test_parity_transformers shows where it is not); llama3 rope scaling: a rope_init_fn
    # other than the default one recomputes the rotary tables.
    return transformers.LlamaConfig(
        hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, vocab_size=256,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        **kw,
    )  # fmt: skip


def build_llama(path, tie=True):
    cfg = llama_config(tie_word_embeddings=tie)
    torch.manual_seed(0)
    src = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    sd = {k: v for k, v in src.state_dict().items() if not (tie and k == "lm_head.weight")}
    disk, _ = quantize_state_dict(sd, lambda k: k.endswith("_proj.weight"), PerBlock((128, 128)))
    write_checkpoint(path, disk, fp8_block_config({**cfg.to_dict(), "architectures": ["LlamaForCausalLM"]}), shards=2)
    return path


def build_qwen3_moe(path):
    # per-expert on disk, fused in the runtime model: transformers' conversion mapping
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
    )  # fmt: skip
    torch.manual_seed(1)
    src = transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    select = lambda k: re.match(r"model\.layers\.\d+\.(self_attn|mlp\.experts\.\d+)\.\w+_proj\.weight$", k) is not None  # noqa: E731
    disk, _ = quantize_state_dict(unfuse_experts(src.state_dict()), select, PerTensor())
    config = {
        **cfg.to_dict(),
        "architectures": ["Qwen3MoeForCausalLM"],
        "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": None},
    }
    write_checkpoint(path, disk, config, shards=2)
    return path


def mistral3_config(tie):
    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, head_dim=16, tie_word_embeddings=tie)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=16, head_dim=16)  # fmt: skip
    return transformers.Mistral3Config(text_config=text, vision_config=vision, tie_word_embeddings=tie)


def build_mistral3(path, tie):
    # the legacy on-disk names of Mistral 3 releases (language_model.model.*, vision_tower.*)
    torch.manual_seed(2)
    src = transformers.Mistral3ForConditionalGeneration(mistral3_config(tie)).to(torch.bfloat16)
    arch = {**src.config.to_dict(), "architectures": ["Mistral3ForConditionalGeneration"]}
    lazyfp8.save(src, path, key_mapping="mistral3", config=arch)
    return path


CASES = {
    "llama-tied": (lambda p: build_llama(p, tie=True), transformers.AutoModelForCausalLM),
    "llama-untied": (lambda p: build_llama(p, tie=False), transformers.LlamaForCausalLM),
    "qwen3-moe": (build_qwen3_moe, transformers.AutoModelForCausalLM),
    "mistral3-tied": (lambda p: build_mistral3(p, tie=True), transformers.AutoModelForImageTextToText),
    "mistral3-untied": (lambda p: build_mistral3(p, tie=False), transformers.Mistral3ForConditionalGeneration),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            built[name] = CASES[name][0](str(tmp_path_factory.mktemp(name)))
        return built[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_same_model_and_bits_as_transformers_from_pretrained(checkpoints, name):
    path, cls = checkpoints(name), CASES[name][1]
    ours = lazyfp8.from_pretrained(cls, path)
    theirs = cls.from_pretrained(path, dtype=torch.bfloat16)
    assert not hasattr(theirs.config, "quantization_config")  # it really dequantized
    assert_same_model(ours, theirs)
    assert all(t.dtype == torch.bfloat16 for t in ours.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, "auto"])
def test_dtype_float32_and_auto(checkpoints, dtype):
    path = checkpoints("llama-tied")
    ours = lazyfp8.from_pretrained(transformers.AutoModelForCausalLM, path, dtype=dtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    want = torch.float32 if dtype == torch.float32 else torch.bfloat16  # config.json says bfloat16
    assert ours.model.layers[0].mlp.up_proj.weight.dtype == want
    assert_same_model(ours, theirs)


def test_the_model_runs_and_equals_transformers_logits(checkpoints):
    path = checkpoints("qwen3-moe")
    ours = lazyfp8.from_pretrained(transformers.AutoModelForCausalLM, path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 7, 42, 99, 3]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_generation_config_is_read(checkpoints, tmp_path):
    import shutil

    path = shutil.copytree(checkpoints("llama-untied"), tmp_path / "ckpt")
    (path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7, "do_sample": True, "temperature": 0.25}))
    ours = lazyfp8.from_pretrained(transformers.AutoModelForCausalLM, path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()
    assert ours.generation_config.temperature == 0.25


def test_an_auto_class_without_a_model_for_the_config_says_so(checkpoints):
    with pytest.raises(ValueError, match="AutoModelForMaskedLM has no model class for LlamaConfig"):
        lazyfp8.from_pretrained(transformers.AutoModelForMaskedLM, checkpoints("llama-tied"))


def test_no_config_json_says_how_to_load_instead(tmp_path):
    write_checkpoint(str(tmp_path), {"w": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"no config.json.*lazyfp8.load_into"):
        lazyfp8.from_pretrained(transformers.AutoModelForCausalLM, tmp_path)


def test_strict_names_what_the_checkpoint_lacks(checkpoints, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    tmp_path = shutil.copytree(checkpoints("llama-untied"), tmp_path / "ckpt")
    for f in os.listdir(tmp_path):
        if f.endswith(".safetensors"):
            sd = load_file(tmp_path / f)
            if "model.norm.weight" in sd:
                del sd["model.norm.weight"]
                save_file(sd, tmp_path / f)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "model.norm.weight"'):
        lazyfp8.from_pretrained(transformers.AutoModelForCausalLM, tmp_path)


# --- memory: a fresh process, peak RSS above the parameters ---------------------------------

CHILD = r"""
import json, sys, torch, transformers, lazyfp8

def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS"):
            out[k] = int(v.split()[0]) * 1024
    return out

warm, path, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
load = lambda p, **kw: lazyfp8.from_pretrained(transformers.AutoModelForCausalLM, p, **kw)
# Imports, compiled kernels, the workers' buffers, transformers' model machinery: a small model.
warm_options = {"device_map": {"": "disk"}, "offload_folder": options["offload_folder"] + "-warm"} if "device_map" in options else {}
load(warm, **warm_options)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
base = status()["VmRSS"]
model = load(path, **options)
resident = {id(t): t for t in [*model.parameters(), *model.buffers()] if not t.is_meta}
in_memory = sum(t.numel() * t.element_size() for t in resident.values())
print(json.dumps({"peak_above": status()["VmHWM"] - base - in_memory, "in_memory": in_memory,
                  "largest": max(t.numel() * t.element_size() for t in model.state_dict().values())}))
"""


def memory_checkpoint(path, hidden=1024, intermediate=2048, layers=3, vocab=2048, *, name="big"):
    """A Llama of ~64 MiB in BF16 (33.6M parameters, tied head) as 128x128-block FP8 in 16 MB
    shards, written from random weights without building the model."""
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=8, vocab_size=vocab, tie_word_embeddings=True)  # fmt: skip
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.LlamaForCausalLM(cfg).state_dict().items() if k != "lm_head.weight"}
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    out = os.path.join(path, name)
    lazyfp8.save(sd, out, scheme=PerBlock((128, 128)), max_shard_size="16MB", config={**cfg.to_dict(), "architectures": ["LlamaForCausalLM"]})
    return out


def peak_above_params(tmp_path, path, **options):
    """Run from_pretrained(AutoModelForCausalLM, path, **options) in a fresh process (after one
    load of a small model): VmHWM - RSS before - the bytes of the tensors it holds in memory."""
    warm = memory_checkpoint(str(tmp_path), 256, 512, 1, 512, name="warm")
    r = subprocess.run([sys.executable, "-c", CHILD, warm, path, json.dumps(options)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's VmHWM reset")
def test_peak_memory_above_the_parameters_is_a_few_buffers(tmp_path):
    """From a 64 MiB (BF16) model's FP8 checkpoint: measured 1.8 MiB above the parameters on the
    2-core dev box (transformers' own from_pretrained of the same checkpoint: 90 MiB above)."""
    path = memory_checkpoint(str(tmp_path))
    r = peak_above_params(tmp_path, path)
    print(f"\npeak above parameters {r['peak_above'] / MiB:.1f} MiB for {r['in_memory'] / MiB:.0f} MiB of parameters")
    assert r["in_memory"] > 60 * MiB
    assert r["peak_above"] < 16 * MiB


def test_a_hub_repo_id_reads_config_and_weights_from_its_snapshot(checkpoints, monkeypatch, tmp_path):
    import pathlib

    pytest.importorskip("huggingface_hub")
    from tests.test_hub import add_snapshot, go_offline

    local = checkpoints("qwen3-moe")
    cache = go_offline(monkeypatch, tmp_path / "hub-cache")
    add_snapshot(cache, "org/tiny-moe-fp8", pathlib.Path(local))
    ours = lazyfp8.from_pretrained(transformers.AutoModelForCausalLM, "org/tiny-moe-fp8")
    assert ours.config.name_or_path == "org/tiny-moe-fp8"
    assert_same_model(ours, _with_name(lazyfp8.from_pretrained(transformers.AutoModelForCausalLM, local), "org/tiny-moe-fp8"))


def _with_name(model, name):
    model.config.name_or_path = name
    return model


def test_modules_the_model_keeps_in_float32_stay_float32(tmp_path):
    """T5 keeps its ``wo`` Linears in float32 at float16 (``_keep_in_fp32_modules``), as
    transformers' from_pretrained does for a float16 checkpoint. Its FP8-dequantizing path casts
    them to float16 instead; lazyfp8 follows the model's dtype plan: the same values, widened
    (dequantized in float16, then exact in float32). Every other tensor: the same bits."""
    cfg = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    sd = transformers.T5ForConditionalGeneration(cfg).to(torch.bfloat16).state_dict()
    sd = {k: v for k, v in sd.items() if not (k.endswith("embed_tokens.weight") or k == "lm_head.weight")}  # tied to shared
    disk, _ = quantize_state_dict(sd, lambda k: re.search(r"\.(q|k|v|o|wi|wo)\.weight$", k) is not None, PerTensor())
    config = {**cfg.to_dict(), "architectures": ["T5ForConditionalGeneration"],
              "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": None}}  # fmt: skip
    write_checkpoint(str(tmp_path), disk, config)
    ours = lazyfp8.from_pretrained(transformers.AutoModelForSeq2SeqLM, tmp_path, dtype=torch.float16)
    theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path, dtype=torch.float16)
    a, b = tensors(ours), tensors(theirs)
    assert a.keys() == b.keys()
    kept = {k for k in a if ".DenseReluDense.wo." in k}
    assert len(kept) == 4
    for key in a:
        if key in kept:
            assert a[key].dtype == torch.float32 and b[key].dtype == torch.float16, key
            assert torch.equal(bits(a[key]), bits(b[key].to(torch.float32))), key
        else:
            assert a[key].dtype == b[key].dtype and torch.equal(bits(a[key]), bits(b[key])), key
    assert tie_groups(ours) == tie_groups(theirs)
