"""``lazyfp8.offload``: quantized weights held as the checkpoint's bytes and dequantized into a
reused buffer around each module's forward. Forwards and generations are compared bit for bit
with the model ``load_into`` fills from the same checkpoint; memory is measured in a fresh
process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import lazyfp8
from lazyfp8 import LazyFP8View, init_empty_weights, load_into, offload
from lazyfp8.at_rest import HeldBytes, _HeldSource
from lazyfp8.errors import CheckpointError
from tests.test_gpt_oss import gpt_oss  # noqa: F401 (a fixture)
from tests.test_gpt_oss import tiny_config as gpt_oss_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (save's keywords) per stored form: FP8 per-tensor and 128x128 blocks, packed NVFP4 (both
# producers' conventions), MXFP4 and int4 groups.
SCHEMES = {
    "fp8-per-tensor": {"scheme": "per-tensor"},
    "fp8-block": {"scheme": "block", "block_size": (128, 128)},
    "nvfp4": {"scheme": "nvfp4"},
    "nvfp4-modelopt": {"scheme": "nvfp4", "format": "modelopt"},
    "mxfp4": {"scheme": "mxfp4", "format": "compressed-tensors"},
    "int4": {"scheme": "int4", "group_size": 32},
}


def llama_config(**kw):
    base = dict(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaConfig(**{**base, **kw})


def meta_llama(cfg):
    with init_empty_weights():
        return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


@pytest.fixture(scope="module", params=list(SCHEMES))
def llama(request, tmp_path_factory):
    """(checkpoint path, config, the model load_into fills from it)."""
    cfg = llama_config()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    path = tmp_path_factory.mktemp(request.param)
    lazyfp8.save(model, path, config=cfg.to_dict() | {"dtype": "bfloat16"}, max_shard_size="200KB", **SCHEMES[request.param])
    full = meta_llama(cfg)
    load_into(full, path)
    return path, cfg, full


def tokens(n=2, length=9, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def bits(t):
    return t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t


def linear_weights(model):
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def test_forward_and_generate_are_bit_exact_with_the_loaded_model(llama):
    path, cfg, full = llama
    model = meta_llama(cfg)
    handle = offload(model, path)
    assert set(handle.keys) == linear_weights(model)  # lm_head is stored bf16: loaded as usual
    assert handle.modules == [k.removesuffix(".weight") for k in handle.keys]
    ids = tokens()
    with torch.no_grad():
        want, got = full(ids).logits, model(ids).logits
    assert torch.equal(bits(got), bits(want))
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), full.generate(ids, **kw))
    assert handle.fresh_buffers == 0  # generate runs under no_grad: every weight in a reused buffer


def test_held_bytes_are_the_checkpoints_stored_bytes(llama):
    path, cfg, _ = llama
    view = LazyFP8View(path)
    handle = offload(meta_llama(cfg), view)
    header = {}
    for f in view.files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header |= json.loads(fh.read(n))
    want = sum(
        header[n]["data_offsets"][1] - header[n]["data_offsets"][0]
        for key in handle.keys
        for n in {view.info(key).disk_key, *view.info(key).quant_keys}
    )
    assert handle.held_bytes == want
    assert handle.held_bytes < handle.dense_bytes


def test_held_parameters_are_meta_between_forwards_and_real_during_them(llama):
    path, cfg, full = llama
    model = meta_llama(cfg)
    handle = offload(model, path)
    q = model.model.layers[1].self_attn.q_proj
    seen = []
    # registered after offload's hooks, so it runs after the weight is in place
    q.register_forward_pre_hook(lambda m, a: seen.append((m.weight.device.type, torch.equal(m.weight, full.model.layers[1].self_attn.q_proj.weight))))
    for p in (model.get_parameter(k) for k in handle.keys):
        assert p.is_meta and not p.requires_grad
    with torch.inference_mode():
        model(tokens())
    assert seen == [("cpu", True)]
    assert all(model.get_parameter(k).is_meta for k in handle.keys)
    assert not any(p.is_meta for k, p in model.named_parameters() if k not in handle.keys)
    # the rest was loaded as load_into loads it
    for k, v in full.state_dict().items():
        if k not in handle.keys:
            assert torch.equal(bits(model.state_dict()[k]), bits(v)), k


def test_one_buffer_per_shape_reused_across_modules_and_forwards(llama):
    path, cfg, _ = llama
    model = meta_llama(cfg)
    handle = offload(model, path)
    assert handle.buffer_bytes == 0
    shapes = {tuple(model.get_parameter(k).shape) for k in handle.keys}
    one_each = sum(torch.Size(s).numel() * 2 for s in shapes)
    for _ in range(3):
        with torch.no_grad():
            model(tokens())
        assert handle.buffer_bytes == handle.peak_buffer_bytes == one_each
    assert one_each < handle.dense_bytes / 2


def test_remove_restores_a_fully_loaded_model_or_leaves_meta(llama):
    path, cfg, full = llama
    model = meta_llama(cfg)
    handle = offload(model, path)
    handle.remove(materialize=True)
    assert not handle.active and handle.held_bytes == 0 and handle.buffer_bytes == 0
    want = full.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(bits(v), bits(want[k])), k
    assert not model.model.layers[0].mlp.up_proj._forward_pre_hooks
    other = meta_llama(cfg)
    with offload(other, path) as h:
        keys = h.keys
        with pytest.raises(ValueError, match=r"LlamaForCausalLM is already offloaded \('model.layers.0.self_attn.q_proj.weight' is held\); call remove\(\)"):
            offload(other, path)
    assert all(other.get_parameter(k).is_meta for k in keys)
    assert not other.model.layers[0].mlp.up_proj._forward_hooks
    offload(other, path)  # removed: it may be offloaded again
    with torch.no_grad():
        assert torch.equal(bits(other(tokens()).logits), bits(full(tokens()).logits))


def test_on_device_path_dequantizes_like_the_cpu_path(llama, backend):
    # What a GPU holding the codes runs (rectangles copied out of the held bytes, the kernel on
    # the device: torch's kernels there), exercised on the CPU with each backend: the same bits
    # as the threaded CPU path.
    path, cfg, full = llama
    handle = offload(meta_llama(cfg), path)
    for p in handle._params:
        assert isinstance(p.source, _HeldSource)
        a = torch.empty(p.placeholder.shape, dtype=torch.bfloat16)
        b = torch.empty_like(a)
        p.source.read_into(a)
        p.source._read_on_device(b, (0, 0), tuple(b.shape))
        assert torch.equal(bits(a), bits(b)), p.key
        c = torch.empty(tuple(reversed(b.shape)), dtype=torch.bfloat16).t()  # strided destination
        p.source._read_on_device(c, (0, 0), tuple(b.shape))
        assert torch.equal(bits(c), bits(a)), p.key
    assert torch.equal(bits(a), bits(full.get_parameter(p.key)))


def test_on_device_path_shares_one_workspace_between_threads(nvfp4):
    # The parts of a fused value are read side by side on the pool: with one workspace per
    # device for all held weights, the reads take turns, and each gets its own bits.
    import concurrent.futures

    path, cfg, full = nvfp4
    handle = offload(meta_llama(cfg), path)
    sources = [p.source for p in handle._params]
    assert len({id(s.work) for s in sources}) == 1

    def read(s):
        out = torch.empty(s.shape, dtype=torch.bfloat16)
        for _ in range(5):
            s._read_on_device(out, (0, 0), tuple(out.shape))
        return out

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(read, sources * 2))
    for s, out in zip(sources * 2, got):
        assert torch.equal(bits(out), bits(full.get_parameter(s.key))), s.key


# --- choosing modules --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nvfp4(tmp_path_factory):
    cfg = llama_config()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("nvfp4-choose")
    lazyfp8.save(model, path, scheme="nvfp4", config=cfg.to_dict() | {"dtype": "bfloat16"})
    full = meta_llama(cfg)
    load_into(full, path)
    return path, cfg, full


def test_whole_decoder_layers_hold_every_quantized_weight_under_them(nvfp4):
    path, cfg, full = nvfp4
    model = meta_llama(cfg)
    handle = offload(model, path, modules=r"layers\.\d+$")
    assert handle.modules == ["model.layers.0", "model.layers.1"]
    assert len(handle.keys) == 14
    with torch.no_grad():
        assert torch.equal(bits(model(tokens()).logits), bits(full(tokens()).logits))
    # a whole layer's weights are in use at once (q_proj and o_proj: two buffers of one shape),
    # and the next layer reuses them
    h, i = cfg.hidden_size, cfg.intermediate_size
    assert handle.peak_buffer_bytes == handle.buffer_bytes == 2 * (2 * h * h + 2 * (h // 2) * h + 3 * i * h)


def test_a_predicate_chooses_modules(nvfp4):
    path, cfg, full = nvfp4
    model = meta_llama(cfg)
    handle = offload(model, path, modules=lambda name, m: isinstance(m, nn.Linear) and name.endswith("mlp.down_proj"))
    assert handle.keys == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert not model.model.layers[0].self_attn.q_proj.weight.is_meta
    with torch.no_grad():
        assert torch.equal(bits(model(tokens()).logits), bits(full(tokens()).logits))


def test_modules_holding_nothing_quantized_are_refused(nvfp4):
    path, cfg, _ = nvfp4
    model = meta_llama(cfg)
    with pytest.raises(ValueError, match=r"modules= chose 'model.norm', 'lm_head', which hold no parameter stored quantized"):
        offload(model, path, modules=[r"^lm_head$", r"^model\.norm$", r"q_proj"])
    assert all(p.is_meta for p in model.parameters())  # refused before anything was loaded
    with pytest.raises(ValueError, match="modules= chose no module of LlamaForCausalLM"):
        offload(model, path, modules="nothing-is-called-this")
    with pytest.raises(ValueError, match="modules= takes a predicate"):
        offload(model, path, modules="(")


def test_load_errors_leave_the_model_as_it_was(nvfp4, tmp_path):
    path, _, _ = nvfp4
    model = meta_llama(llama_config(num_hidden_layers=3))
    before = [(n, p) for n, p in model.named_parameters()]
    with pytest.raises(RuntimeError, match="Missing key"):
        offload(model, path)
    assert [(n, p) for n, p in model.named_parameters()] == before  # same tensors, same order


def test_grad_mode_gets_fresh_buffers_and_correct_gradients(nvfp4):
    path, cfg, full = nvfp4
    model = meta_llama(cfg)
    handle = offload(model, path)
    emb = full.model.embed_tokens(tokens()).detach()
    x1 = emb.clone().requires_grad_(True)
    x2 = emb.clone().requires_grad_(True)
    full(inputs_embeds=x1).logits.float().square().sum().backward()
    model(inputs_embeds=x2).logits.float().square().sum().backward()
    assert handle.fresh_buffers == 14 and handle.buffer_bytes == 0
    assert torch.equal(bits(x1.grad), bits(x2.grad))


def test_a_path_source_is_not_read_after_offload_returns(tmp_path):
    cfg = llama_config()
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    lazyfp8.save(model, tmp_path, scheme="block", block_size=(32, 32), config=cfg.to_dict())
    full = meta_llama(cfg)
    load_into(full, tmp_path)
    ours = meta_llama(cfg)
    handle = offload(ours, tmp_path)
    for f in os.listdir(tmp_path):
        os.remove(os.path.join(tmp_path, f))
    with torch.no_grad():
        assert torch.equal(bits(ours(tokens()).logits), bits(full(tokens()).logits))
    assert "14 modules, 14 weights" in repr(handle) and "active" in repr(handle)


def test_real_parameters_are_replaced_and_freed(nvfp4):
    path, cfg, full = nvfp4
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj.weight
    handle = offload(model, path)
    assert model.model.layers[0].self_attn.q_proj.weight is not q and model.model.layers[0].self_attn.q_proj.weight.is_meta
    with torch.no_grad():
        assert torch.equal(bits(model(tokens()).logits), bits(full(tokens()).logits))
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in full.named_parameters()]
    assert handle.dense_bytes == sum(full.get_parameter(k).nbytes for k in handle.keys)


def test_view_options_go_with_a_path_only(nvfp4):
    path, cfg, _ = nvfp4
    with pytest.raises(TypeError, match="apply only when src is a path"):
        offload(meta_llama(cfg), LazyFP8View(path), dtype=torch.float16)
    with pytest.raises(TypeError, match="reads a LazyFP8View or a checkpoint path"):
        offload(meta_llama(cfg), {})
    with pytest.raises(ValueError, match="not 'auto'"):
        offload(meta_llama(cfg), path, key_mapping="auto")


# --- ties, composites, transposed experts -----------------------------------------------------


def test_tied_weights_are_held_only_with_every_module_that_shares_them(tmp_path):
    cfg = llama_config(tie_word_embeddings=True)
    torch.manual_seed(4)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    lazyfp8.save(model, tmp_path, scheme="per-tensor", quantize=[r"embed_tokens", r"_proj\."], exclude=(), config=cfg.to_dict())
    full = meta_llama(cfg)
    load_into(full, tmp_path)
    with pytest.raises(ValueError, match=r"'lm_head.weight' is tied to 'model.embed_tokens.weight' in a module that is not offloaded"):
        offload(meta_llama(cfg), tmp_path, modules=["lm_head"])
    ours = meta_llama(cfg)
    handle = offload(ours, tmp_path, modules=[r"^lm_head$", r"embed_tokens", r"_proj$"])
    assert "model.embed_tokens.weight" in handle.keys
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # one placeholder, still tied
    with torch.no_grad():
        assert torch.equal(bits(ours(tokens()).logits), bits(full(tokens()).logits))
    handle.remove(materialize=True)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight and not ours.lm_head.weight.is_meta


def test_fused_experts_hold_each_experts_nvfp4_bytes(tmp_path):
    from tests.builders import unfuse_experts

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
    )  # fmt: skip
    torch.manual_seed(5)
    per_expert = unfuse_experts(transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).state_dict())
    lazyfp8.save(per_expert, tmp_path, scheme="nvfp4", quantize=r"_proj\.weight$", config=cfg.to_dict())

    def build():
        with init_empty_weights():
            return transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)

    full = build()
    load_into(full, tmp_path, key_mapping="transformers")
    ours = build()
    handle = offload(ours, tmp_path, key_mapping="transformers", modules=[r"mlp\.experts$", r"_proj$"])
    assert "model.layers.0.mlp.experts.gate_up_proj" in handle.keys and "model.layers.1.self_attn.q_proj.weight" in handle.keys
    assert ours.model.layers[0].mlp.experts.gate_up_proj.is_meta
    with torch.no_grad():
        assert torch.equal(bits(ours(tokens(length=7)).logits), bits(full(tokens(length=7)).logits))


def test_gpt_oss_mxfp4_experts_are_held_transposed(gpt_oss):  # noqa: F811 (the fixture)
    path, _ = gpt_oss

    def build():
        with init_empty_weights():
            return transformers.GptOssForCausalLM(gpt_oss_config()).to(torch.bfloat16)

    full = build()
    load_into(full, path)
    ours = build()
    handle = offload(ours, path, modules=r"mlp\.experts$")
    assert handle.modules == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert len(handle.keys) == 4 and all(type(p.source).__name__ == "_HeldTransposedSource" for p in handle._params)
    with torch.no_grad():
        assert torch.equal(bits(ours(tokens()).logits), bits(full(tokens()).logits))


def test_held_bytes_refuse_a_read_outside_them():
    held = HeldBytes("/ckpt/model.safetensors", torch.arange(8, dtype=torch.uint8))
    out = torch.empty(2, dtype=torch.int16)
    held.read_into(out, 4, "w")
    assert out.view(torch.uint8).tolist() == [4, 5, 6, 7]
    with pytest.raises(CheckpointError, match=r"/ckpt/model.safetensors: reading 'w': bytes 6:10 are outside the 8 bytes held"):
        held.read_into(out, 6, "w")
    with pytest.raises(ValueError, match="1-d uint8"):
        HeldBytes("x", torch.zeros(2, 2, dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("codes_device", ["cuda", "cpu"])
def test_cuda_forward_equals_the_cpu_loaded_model(nvfp4, codes_device):
    path, cfg, full = nvfp4
    model = meta_llama(cfg)
    handle = offload(model, path, device="cuda", codes_device=codes_device)
    assert handle.codes_device.type == codes_device
    ref = meta_llama(cfg)
    load_into(ref, path, device="cuda")
    with torch.no_grad():
        ids = tokens().cuda()
        assert torch.equal(bits(model(ids).logits), bits(ref(ids).logits))
    for p in handle._params:
        got = torch.empty(p.placeholder.shape, dtype=torch.bfloat16, device="cuda")
        p.source.read_into(got)
        assert torch.equal(bits(got.cpu()), bits(full.get_parameter(p.key))), p.key


# --- memory, in a fresh process ----------------------------------------------------------------

# A Llama of 120M Linear parameters (240 MiB of bf16 weights) and a small vocabulary, so nearly all
# of the model is weights a checkpoint stores quantized.
BIG = dict(vocab_size=512, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
           num_attention_heads=8, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False)  # fmt: skip


def random_quantized_checkpoint(path, cfg, fmt):
    """``cfg``'s Llama with every ``*_proj`` weight stored as random codes (quantizing 120M
    weights would take a minute here): compressed-tensors NVFP4 (``weight_packed``,
    ``weight_scale``, ``weight_global_scale``) or FP8 with 128x128 block scales."""
    from lazyfp8.testing import write_checkpoint
    from tests.builders import fp8_block_config

    with init_empty_weights():
        shapes = transformers.LlamaForCausalLM(cfg).state_dict()
    gen = torch.Generator().manual_seed(0)

    def randint(lo, hi, shape):
        return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int32).to(torch.uint8)

    disk = {}
    for key, p in shapes.items():
        module, _, leaf = key.rpartition(".")
        if not (module.endswith("_proj") and leaf == "weight"):
            disk[key] = (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
        elif fmt == "nvfp4":
            out_f, in_f = p.shape
            disk[f"{module}.weight_packed"] = randint(0, 256, (out_f, in_f // 2))
            disk[f"{module}.weight_scale"] = randint(0x30, 0x38, (out_f, in_f // 16)).view(torch.float8_e4m3fn)
            disk[f"{module}.weight_global_scale"] = torch.tensor([2000.0])
        else:
            disk[key] = randint(0, 0x7F, tuple(p.shape)).view(torch.float8_e4m3fn)  # 0x7f is NaN
            disk[f"{key}_scale_inv"] = torch.rand(-(-p.shape[0] // 128), -(-p.shape[1] // 128), generator=gen) * 1e-4 + 1e-5
    config = cfg.to_dict() | {"dtype": "bfloat16"}
    if fmt == "nvfp4":
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}}},
        }  # fmt: skip
    else:
        config = fp8_block_config(config)
    write_checkpoint(disk, path, scheme=None, max_shard_size="100MB", config=config)


CHILD = textwrap.dedent(
    """
    import json, sys
    import torch, transformers
    import lazyfp8
    from lazyfp8.kernels import jit
    jit.kernels()  # the compiled kernels' library code, before the baseline

    def status():
        out = {}
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
        return out

    path, cfg = sys.argv[1], transformers.LlamaConfig(**json.loads(sys.argv[2]))
    with lazyfp8.init_empty_weights():
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    ids = torch.arange(16).view(1, 16)
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    base = status()["VmRSS"]
    h = lazyfp8.offload(model, path)
    with torch.inference_mode():
        for _ in range(2):
            assert torch.isfinite(model(ids).logits).all()
    other = sum(p.nbytes for p in model.parameters() if not p.is_meta)
    print(json.dumps(dict(held=h.held_bytes, dense=h.dense_bytes, buffers=h.buffer_bytes, other=other,
                          base=base, hwm=status()["VmHWM"])))
    """
)


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8-block"])
def test_peak_memory_is_the_held_bytes_plus_one_buffer_per_shape(tmp_path, fmt):
    random_quantized_checkpoint(tmp_path, transformers.LlamaConfig(**BIG), fmt)
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), json.dumps(BIG)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    MiB = 1 << 20
    assert r["dense"] == 240 * MiB and r["held"] < (0.52 if fmt == "fp8-block" else 0.29) * r["dense"]
    # one buffer per distinct shape: q/o, k/v, gate/up, down
    h, i, kv = BIG["hidden_size"], BIG["intermediate_size"], BIG["num_key_value_heads"] * BIG["head_dim"]
    assert r["buffers"] == 2 * (h * h + kv * h + i * h + h * i) == 19 * MiB
    peak = r["hwm"] - r["base"]
    expected = r["held"] + r["other"] + r["buffers"]
    # Above that: the kernels' per-thread chunk buffers, activations, the allocator's slack
    # (measured: 11 MiB).
    assert r["held"] + r["other"] <= peak <= expected + 40 * MiB, (peak / MiB, expected / MiB)
    assert peak < 0.65 * r["dense"]  # a full load peaks above r["dense"]
