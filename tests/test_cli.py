import json
import os

import pytest
import torch

from lazyfp8 import LazyFP8View, MissingShardError, PerBlock, save
from lazyfp8.cli import main
from tests.helpers import bits


@pytest.fixture
def fp8_ckpt(tmp_path):
    torch.manual_seed(0)
    sd = {f"layers.{i}.proj.weight": torch.randn(256, 130) for i in range(3)}
    sd |= {"embed.weight": torch.randn(10, 130).to(torch.bfloat16), "norm.weight": torch.ones(130)}
    src = tmp_path / "src"
    save(sd, src, scheme=PerBlock((128, 128)), max_shard_size=50_000, config={"model_type": "toy", "torch_dtype": "bfloat16"})
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text("{}")
    return src


def test_inspect_reports_and_exit_status(fp8_ckpt, capsys):
    assert main(["inspect", str(fp8_ckpt)]) == 0
    out = capsys.readouterr().out
    assert "3 x F8_E4M3 block[128, 128], scale '<name>_scale_inv' (F32)" in out
    assert "no problems found" in out and '"quant_method": "fp8"' in out


def test_inspect_json_and_problems(fp8_ckpt, capsys):
    os.remove(fp8_ckpt / sorted(f for f in os.listdir(fp8_ckpt) if f.endswith(".safetensors"))[0])
    assert main(["inspect", str(fp8_ckpt), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert any("does not exist" in p for p in report["problems"])


def test_inspect_with_a_preset(fp8_ckpt, capsys):
    assert main(["inspect", str(fp8_ckpt), "--key-mapping", '{"^layers\\\\.": "model.layers."}']) == 0
    assert "layers.0.proj.weight -> model.layers.0.proj.weight" in capsys.readouterr().out


def test_dequantize_streams_copies_side_files_and_drops_quantization_config(fp8_ckpt, tmp_path, capsys):
    dst = tmp_path / "bf16"
    assert main(["dequantize", str(fp8_ckpt), str(dst), "--max-shard-size", "60KB"]) == 0
    assert {"tokenizer.json", "generation_config.json", "config.json"} <= set(os.listdir(dst))
    config = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    a, b = LazyFP8View(fp8_ckpt), LazyFP8View(dst)
    assert set(a) == set(b)
    for k in a:
        assert b.info(k).scale_key is None
        assert torch.equal(bits(a.get_tensor(k)), bits(b.get_tensor(k)))


def test_dequantize_refuses_to_overwrite(fp8_ckpt, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    assert main(["dequantize", str(fp8_ckpt), str(dst)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err and "Traceback" not in err
    assert main(["dequantize", str(fp8_ckpt), str(dst), "--force"]) == 0


def test_dequantize_fails_on_a_missing_scale(fp8_ckpt, tmp_path, capsys):
    index = json.loads((fp8_ckpt / "model.safetensors.index.json").read_text())
    del index["weight_map"]["layers.1.proj.weight_scale_inv"]
    (fp8_ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["dequantize", str(fp8_ckpt), str(tmp_path / "out")]) == 1
    assert "'layers.1.proj.weight'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any(f.endswith(".safetensors") for f in os.listdir(tmp_path / "out"))


def test_quantize_then_verify_against(fp8_ckpt, tmp_path, capsys):
    bf16, q = tmp_path / "bf16", tmp_path / "q"
    assert main(["-q", "dequantize", str(fp8_ckpt), str(bf16)]) == 0
    assert main(["-q", "quantize", str(bf16), str(q), "--scheme", "block"]) == 0
    view = LazyFP8View(q)
    assert view.scheme.name == "fp8" and view.info("layers.0.proj.weight").granularity == PerBlock((128, 128))
    assert view.info("embed.weight").scale_key is None  # embeddings excluded by default
    capsys.readouterr()
    assert main(["verify", str(q), "--against", str(bf16)]) == 0
    out = capsys.readouterr().out
    assert "max abs error against" in out
    # fresh scales (amax of the bf16 copy) are not the original ones: the error is small, not 0
    assert main(["verify", str(q), "--against", str(bf16), "--atol", "1e-9"]) == 1
    assert main(["verify", str(q), "--against", str(bf16), "--atol", "0.5"]) == 0


def test_verify_reports_key_differences(fp8_ckpt, tmp_path, capsys):
    other = tmp_path / "other"
    save({"embed.weight": torch.zeros(10, 130).to(torch.bfloat16)}, other, scheme=None)
    assert main(["verify", str(fp8_ckpt), "--against", str(other)]) == 1
    assert "is not in" in capsys.readouterr().out


def test_errors_are_one_line_unless_debug(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lazyfp8 inspect: error:") and "no such file" in err
    with pytest.raises(MissingShardError, match="no such file"):  # the real exception, traceback and all
        main(["--debug", "inspect", str(tmp_path / "nope")])


def test_python_dash_m(fp8_ckpt):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lazyfp8", "inspect", str(fp8_ckpt)], capture_output=True, text=True)
    assert r.returncode == 0 and "no problems found" in r.stdout
