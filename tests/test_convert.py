"""``lazyfp8 convert SRC DST --to FORMAT``: every format to every other, streaming.

Each target is reached from an FP8 source and read back to bf16 from itself, so every pair of
formats is connected through one conversion each way; a few direct cross conversions (4-bit to
4-bit) are checked on their own. A conversion to a quantized format must stay within that
format's error bound of the source's values, one to bf16/fp16/fp32 must equal the source read in
that dtype bit for bit, and the peak memory of a conversion in a fresh process stays far below a
bf16 copy of the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lazyfp8 import LazyFP8View, PerBlock, save
from lazyfp8.cli import CONVERT_TARGETS, main
from tests.helpers import bits

QUANTIZED_TARGETS = [t for t, spec in CONVERT_TARGETS.items() if "scheme" in spec]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# What --to writes: the quant_method (and compressed-tensors format) of its config, the scale name
# of a weight ``m.weight``.
WRITTEN = {
    "fp8": ("fp8", None, "m.weight_scale_inv"),
    "fp8-tensor": ("fp8", None, "m.weight_scale_inv"),
    "fp8-channel": ("compressed-tensors", "float-quantized", "m.weight_scale"),
    "nvfp4": ("compressed-tensors", "nvfp4-pack-quantized", "m.weight_scale"),
    "nvfp4-modelopt": ("modelopt", None, "m.weight_scale"),
    "mxfp4": ("mxfp4", None, "m.weight_scales"),
    "mxfp4-compressed-tensors": ("compressed-tensors", "mxfp4-pack-quantized", "m.weight_scale"),
    "int4": ("compressed-tensors", "pack-quantized", "m.weight_scale"),
    "int4-asym": ("compressed-tensors", "pack-quantized", "m.weight_scale"),
}
# Largest relative Frobenius error of a conversion of Gaussian weights (the measured values are
# 0.02-0.03 for FP8 and 0.09-0.12 for the 4-bit formats; docs/writing.md has the element bounds).
REL_ERROR = {"fp8": 0.05, "fp8-tensor": 0.05, "fp8-channel": 0.05}


@pytest.fixture(scope="module")
def fp8_src(tmp_path_factory):
    """An FP8 (128x128 blocks) checkpoint in shards, with a tokenizer and a config."""
    src = tmp_path_factory.mktemp("conv") / "src"
    g = torch.Generator().manual_seed(0)
    sd = {f"model.layers.{i}.mlp.{p}.weight": torch.randn(256, 128, generator=g) * 0.02
          for i in range(2) for p in ("up_proj", "down_proj")}
    sd["m.weight"] = torch.randn(64, 256, generator=g)
    sd |= {"model.embed_tokens.weight": torch.randn(10, 128, generator=g).to(torch.bfloat16), "model.norm.weight": torch.ones(128)}
    save(sd, src, scheme=PerBlock((128, 128)), max_shard_size=60_000, config={"model_type": "toy", "torch_dtype": "bfloat16"})
    (src / "tokenizer.json").write_text('{"t": 1}')
    return src


def quantized(view):
    return sorted(k for k in view if view.info(k).scale_key is not None)


def rel_error(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("to", list(CONVERT_TARGETS))
def test_fp8_to_every_format_and_back_to_bf16(fp8_src, tmp_path, to, capsys):
    dst, back = tmp_path / to, tmp_path / f"{to}-bf16"
    assert main(["convert", str(fp8_src), str(dst), "--to", to, "--max-shard-size", "40KB"]) == 0
    assert "also copied tokenizer.json" in capsys.readouterr().out
    assert (dst / "tokenizer.json").read_text() == '{"t": 1}'
    src_view, view = LazyFP8View(fp8_src), LazyFP8View(dst)
    assert set(view) == set(src_view)
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "toy"
    if to in DTYPES:
        assert "quantization_config" not in config and config["torch_dtype"] == str(DTYPES[to]).removeprefix("torch.")
        assert quantized(view) == []
        exact = LazyFP8View(fp8_src, dtype=DTYPES[to])
        for k in view:
            assert torch.equal(bits(view.get_tensor(k)), bits(exact.get_tensor(k))), k
        return
    method, ct_format, scale = WRITTEN[to]
    assert config["quantization_config"]["quant_method"] == method
    assert config["quantization_config"].get("format") == ct_format
    assert quantized(view) == quantized(src_view), "what the source stores quantized, and that only"
    assert view.info("m.weight").scale_key == scale
    for k in view:
        a, b = view.get_tensor(k), src_view.get_tensor(k)
        if k in quantized(src_view):
            assert rel_error(a, b) < REL_ERROR.get(to, 0.15), (k, rel_error(a, b))
        else:
            assert torch.equal(bits(a), bits(b)), k
    # and back to bf16: exactly the quantized checkpoint's values
    assert main(["-q", "convert", str(dst), str(back), "--to", "bf16"]) == 0
    again = LazyFP8View(back)
    assert quantized(again) == [] and not (back / "hf_quant_config.json").exists()
    for k in view:
        assert torch.equal(bits(again.get_tensor(k)), bits(view.get_tensor(k))), k


@pytest.mark.parametrize("first, second", [("nvfp4", "mxfp4"), ("int4", "nvfp4-modelopt"), ("mxfp4-compressed-tensors", "fp8"), ("nvfp4-modelopt", "int4")])
def test_four_bit_to_another_format_directly(fp8_src, tmp_path, first, second):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["-q", "convert", str(fp8_src), str(a), "--to", first]) == 0
    assert main(["-q", "convert", str(a), str(b), "--to", second]) == 0
    va, vb = LazyFP8View(a), LazyFP8View(b)
    assert quantized(vb) == quantized(va) == quantized(LazyFP8View(fp8_src))
    for k in quantized(va):
        assert rel_error(vb.get_tensor(k), va.get_tensor(k)) < REL_ERROR.get(second, 0.15), k


def test_a_bf16_source_gets_the_default_choice_and_only_and_exclude_choose(fp8_src, tmp_path):
    bf16 = tmp_path / "bf16"
    assert main(["-q", "convert", str(fp8_src), str(bf16), "--to", "bf16"]) == 0
    assert main(["-q", "convert", str(bf16), str(tmp_path / "d"), "--to", "nvfp4"]) == 0
    view = LazyFP8View(tmp_path / "d")
    assert "model.embed_tokens.weight" not in quantized(view) and "m.weight" in quantized(view)
    assert main(["-q", "convert", str(bf16), str(tmp_path / "o"), "--to", "int4", "--group-size", "64", "--only", r"^m\.weight$"]) == 0
    view = LazyFP8View(tmp_path / "o")
    assert quantized(view) == ["m.weight"] and view.info("m.weight").granularity == PerBlock((1, 64))
    assert main(["-q", "convert", str(fp8_src), str(tmp_path / "x"), "--to", "mxfp4", "--exclude", "down_proj"]) == 0
    assert quantized(LazyFP8View(tmp_path / "x")) == [k for k in quantized(LazyFP8View(fp8_src)) if "down_proj" not in k]


def test_block_size_for_fp8_blocks(fp8_src, tmp_path):
    assert main(["-q", "convert", str(fp8_src), str(tmp_path / "d"), "--to", "fp8", "--block-size", "64", "32"]) == 0
    assert json.loads((tmp_path / "d" / "config.json").read_text())["quantization_config"]["weight_block_size"] == [64, 32]
    assert LazyFP8View(tmp_path / "d").info("m.weight").granularity == PerBlock((64, 32))


@pytest.mark.parametrize(
    "args, match",
    [
        (["--to", "nvfp4", "--block-size", "1", "16"], "takes group_size="),
        (["--to", "fp8", "--group-size", "32"], "group_size= is for the 4-bit schemes"),
        (["--to", "bf16", "--group-size", "32"], "dequantizes"),
        (["--to", "int4", "--group-size", "96"], r"'model\.layers\.0\.mlp\.up_proj\.weight' of shape \[256, 128\].*multiple of 96"),
    ],
)
def test_options_a_target_does_not_take_are_errors_and_write_nothing(fp8_src, tmp_path, capsys, args, match):
    import re

    dst = tmp_path / "out"
    assert main(["convert", str(fp8_src), str(dst), *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(match, err), err
    assert not dst.exists() or not any(f.endswith(".safetensors") for f in os.listdir(dst))


def test_a_modelopt_source_declared_in_hf_quant_config(tmp_path):
    """ModelOpt may declare NVFP4 in hf_quant_config.json: the converted copy must not carry it
    (a reader would take the bf16 weights for NVFP4)."""
    src = tmp_path / "src"
    save({"l.weight": torch.randn(32, 64)}, src, scheme="nvfp4", format="modelopt", quantize=["l"], config={"model_type": "x"})
    config = json.loads((src / "config.json").read_text())
    qc = config.pop("quantization_config")
    (src / "config.json").write_text(json.dumps(config))
    (src / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": qc}))
    assert quantized(LazyFP8View(src)) == ["l.weight"]
    assert main(["-q", "convert", str(src), str(tmp_path / "d"), "--to", "bf16"]) == 0
    assert sorted(os.listdir(tmp_path / "d")) == ["config.json", "model.safetensors"]
    assert torch.equal(LazyFP8View(tmp_path / "d").get_tensor("l.weight"), LazyFP8View(src).get_tensor("l.weight"))


def test_gpt_oss_to_bf16_loads_in_transformers_and_back_to_mxfp4_is_the_same_bytes(tmp_path):
    """gpt-oss's experts come out of the view as transformers holds them ([E, in, out]): the bf16
    copy is a plain gpt-oss checkpoint transformers loads with no quantization at all, equal to its
    own MXFP4 dequantization; converting it back (--only the experts) gives the released bytes."""
    transformers = pytest.importorskip("transformers")
    from tests.producers import write_gptoss_mxfp4

    src, bf16, back = tmp_path / "src", tmp_path / "bf16", tmp_path / "back"
    oracle = write_gptoss_mxfp4(str(src))
    assert main(["-q", "convert", str(src), str(bf16), "--to", "bf16"]) == 0
    assert "quantization_config" not in json.loads((bf16 / "config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16).state_dict()
    assert set(hf) == set(oracle)
    for k, v in oracle.items():
        assert torch.equal(bits(hf[k]), bits(v)), k
    assert main(["-q", "convert", str(bf16), str(back), "--to", "mxfp4", "--only", r"experts\.(gate_up|down)_proj$"]) == 0
    from safetensors.torch import load_file

    a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(bits(a[k]), bits(b[k])), k


# --- memory: one tensor at a time, never a bf16 copy of the model ------------------------------

_CHILD = r"""
import json, sys
from lazyfp8.cli import main

def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS"):
            out[k] = int(v.split()[0]) * 1024
    return out

src, dst, to = sys.argv[1:4]
# Imports, compiled kernels, the allocator's first arenas: a conversion that quantizes nothing.
assert main(["-q", "convert", src, dst + "-warm", "--to", to, "--exclude", ".*"]) == 0
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
base = status()["VmRSS"]
assert main(["-q", "convert", src, dst, "--to", to, "--max-shard-size", "4MB"]) == 0
print(json.dumps({"peak_above": status()["VmHWM"] - base}))
"""

MiB = 1 << 20


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's VmHWM reset")
def test_peak_memory_of_a_conversion_is_far_below_a_bf16_copy(tmp_path):
    """FP8 -> NVFP4 of a 64 MiB (bf16) model of 16 weights of 4 MiB, in a fresh process: the
    peak above the process's baseline is one weight being quantized (4 MiB read, its bands and
    codes) plus a 4 MB shard and its serialized copy: measured 24-28 MiB on the 2-core dev box,
    where a bf16 copy would be 64 MiB and the FP8 source alone 32 MiB."""
    src = tmp_path / "src"
    g = torch.Generator().manual_seed(0)
    sd = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(1024, 2048, generator=g).to(torch.bfloat16) for i in range(16)}
    bf16_bytes = sum(t.numel() * 2 for t in sd.values())
    save(sd, src, scheme=PerBlock((128, 128)), max_shard_size="16MB", config={"model_type": "toy"})
    del sd
    r = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(tmp_path / "dst"), "nvfp4"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    peak = json.loads(r.stdout.strip().splitlines()[-1])["peak_above"]
    print(f"\npeak above baseline {peak / MiB:.1f} MiB for a {bf16_bytes / MiB:.0f} MiB bf16 model")
    assert peak < 40 * MiB and peak < bf16_bytes * 5 // 8
    assert len(quantized(LazyFP8View(tmp_path / "dst"))) == 16
