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
    assert "3 x fp8 (F8_E4M3) block[128, 128], scale '<name>_scale_inv' (F32)" in out
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
    assert (dst / "keep.txt").read_text() == "x"  # --force replaces the checkpoint, nothing else


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


# --- Issue 11: nothing lost, nothing leaked ----------------------------------------------------


def tree(path):
    """Every file under ``path`` with its bytes (links as their target)."""
    out = {}
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = os.readlink(p) if os.path.islink(p) else open(p, "rb").read()
    return out


@pytest.mark.parametrize("command", [["dequantize"], ["quantize", "--scheme", "per-tensor"]])
@pytest.mark.parametrize("form", ["SRC SRC", "SRC SRC/", "SRC link-to-SRC", "SRC/shard SRC"])
def test_converting_into_its_own_source_is_refused_before_anything_is_written(fp8_ckpt, tmp_path, capsys, command, form):
    if command[0] == "quantize":  # quantize reads a bf16 checkpoint
        assert main(["-q", "dequantize", str(fp8_ckpt), str(tmp_path / "bf16")]) == 0
        for side in ("tokenizer.json", "generation_config.json"):
            assert (tmp_path / "bf16" / side).exists()
        src = tmp_path / "bf16"
    else:
        src = fp8_ckpt
    # Without side files: copying those onto themselves used to fail first, by luck.
    for side in ("tokenizer.json", "generation_config.json"):
        os.remove(src / side)
    os.symlink(src, tmp_path / "link")
    first = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))[0]
    src_arg, dst_arg = {
        "SRC SRC": (str(src), str(src)),
        "SRC SRC/": (str(src), str(src) + "/"),
        "SRC link-to-SRC": (str(src), str(tmp_path / "link")),
        "SRC/shard SRC": (str(src / first), str(src)),
    }[form]
    before = tree(src)
    capsys.readouterr()
    assert main([command[0], src_arg, dst_arg, "--force", *command[1:]]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(src) in err and dst_arg.rstrip("/") in err, err
    assert tree(src) == before


def test_side_file_linking_out_of_src_is_refused(fp8_ckpt, tmp_path, capsys):
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    os.remove(fp8_ckpt / "tokenizer.json")
    os.symlink(secret, fp8_ckpt / "tokenizer.json")
    dst = tmp_path / "out"
    assert main(["dequantize", str(fp8_ckpt), str(dst)]) == 1
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and "leaves" in err
    assert not dst.exists() or "PRIVATE KEY" not in str(tree(dst))
    # a link inside SRC is fine, and copied as a file
    os.remove(fp8_ckpt / "tokenizer.json")
    (fp8_ckpt / "sub").mkdir()
    (fp8_ckpt / "sub" / "tok.json").write_text('{"inside": 1}')
    os.symlink("sub/tok.json", fp8_ckpt / "tokenizer.json")
    assert main(["-q", "dequantize", str(fp8_ckpt), str(dst)]) == 0
    assert not os.path.islink(dst / "tokenizer.json") and (dst / "tokenizer.json").read_text() == '{"inside": 1}'
    assert not (dst / "sub").exists()  # directories are not copied


def test_side_files_of_a_hub_cache_snapshot_link_into_blobs(fp8_ckpt, tmp_path):
    repo = tmp_path / "models--org--name"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for name in os.listdir(fp8_ckpt):
        os.replace(fp8_ckpt / name, blobs / f"sha-{name}")
        os.symlink(f"../../blobs/sha-{name}", snap / name)
    dst = tmp_path / "out"
    assert main(["-q", "dequantize", str(snap), str(dst)]) == 0
    assert (dst / "tokenizer.json").read_text() == "{}" and not os.path.islink(dst / "tokenizer.json")


def test_only_regular_side_files_are_copied_and_other_weights_are_not(fp8_ckpt, tmp_path):
    os.mkfifo(fp8_ckpt / "tokenizer.model")  # would block a plain copy forever
    (fp8_ckpt / "pytorch_model.bin").write_bytes(b"stale weights")
    (fp8_ckpt / "pytorch_model.bin.index.json").write_text("{}")
    (fp8_ckpt / ".cache").write_text("hidden")
    os.symlink(fp8_ckpt / "nowhere", fp8_ckpt / "dangling.txt")
    dst = tmp_path / "out"
    assert main(["-q", "dequantize", str(fp8_ckpt), str(dst)]) == 1  # the dangling link is named
    os.remove(fp8_ckpt / "dangling.txt")
    assert main(["-q", "dequantize", str(fp8_ckpt), str(dst)]) == 0
    names = set(os.listdir(dst))
    assert {"tokenizer.json", "generation_config.json"} <= names
    assert not names & {"tokenizer.model", "pytorch_model.bin", "pytorch_model.bin.index.json", ".cache"}


def test_a_killed_copy_leaves_no_half_side_file(fp8_ckpt, tmp_path, monkeypatch):
    """Side files are staged with the shards and moved in before the checkpoint becomes loadable:
    a run killed while copying leaves the old tokenizer (or none), never part of the new one."""
    import shutil

    dst = tmp_path / "out"
    assert main(["-q", "dequantize", str(fp8_ckpt), str(dst)]) == 0
    (fp8_ckpt / "tokenizer.json").write_text('{"new": "' + "x" * 100_000 + '"}')
    real = shutil.copyfileobj

    def dies_half_way(src, dst_file, *args):
        dst_file.write(src.read(1000))
        raise KeyboardInterrupt  # what Ctrl-C would do mid-copy

    monkeypatch.setattr(shutil, "copyfileobj", dies_half_way)
    assert main(["-q", "dequantize", str(fp8_ckpt), str(dst), "--force"]) == 130
    assert (dst / "tokenizer.json").read_text() == "{}"
    assert not [n for n in os.listdir(dst) if ".tmp-" in n]
    monkeypatch.setattr(shutil, "copyfileobj", real)
    assert main(["-q", "dequantize", str(fp8_ckpt), str(dst), "--force"]) == 0
    assert (dst / "tokenizer.json").read_text().startswith('{"new"')


@pytest.mark.parametrize(
    "args",
    [
        ["dequantize", "--max-shard-size", "0"],
        ["dequantize", "--max-shard-size=-1KB"],
        ["dequantize", "--max-shard-size", "lots"],
        ["dequantize", "--dtype", "int8"],
        ["dequantize", "--dtype", "Tensor"],
        ["dequantize", "--scheme", "bogus"],
        ["quantize", "--max-shard-size", "0KB"],
        ["quantize", "--block-size", "0", "128"],
        ["quantize", "--block-size", "-3", "128"],
        ["quantize", "--fp8-dtype", "bf16"],
        ["quantize", "--scheme", "int4"],
        ["quantize", "--format", "gguf"],
        ["quantize", "--exclude", "(unclosed"],
        ["convert", "--to", "nf4"],
        ["convert", "--to", "int4", "--group-size", "0"],
        ["convert", "--to", "nvfp4", "--only"],
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(fp8_ckpt, tmp_path, capsys, args):
    dst = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main([args[0], str(fp8_ckpt), str(dst), *args[1:]])
    assert e.value.code == 2 and not dst.exists()
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--key-mapping", "{not json"], ["--key-mapping", "no-such-preset"], ["--scheme", "x"]])
def test_bad_inspect_and_verify_arguments_are_usage_errors(fp8_ckpt, capsys, args):
    for command in (["inspect", str(fp8_ckpt)], ["verify", str(fp8_ckpt)]):
        with pytest.raises(SystemExit) as e:
            main([*command, *args])
        assert e.value.code == 2


def test_combinations_save_refuses_write_nothing(fp8_ckpt, tmp_path, capsys):
    dst = tmp_path / "out"
    assert main(["quantize", str(fp8_ckpt), str(dst), "--scheme", "per-channel", "--format", "fp8"]) == 1
    assert "per-channel" in capsys.readouterr().err and not dst.exists()


def test_verify_fails_on_what_only_the_headers_show(fp8_ckpt, tmp_path, capsys):
    """A directory holding both model.safetensors and an index reads (model.safetensors wins, as in
    transformers), but verify must not call it sound: it exits 1 and names the problem."""
    assert main(["verify", str(fp8_ckpt)]) == 0
    assert "every scale and shape is sound" in capsys.readouterr().out
    single = tmp_path / "single"
    save({"w": torch.ones(4, 4)}, single, scheme=None)
    both = tmp_path / "both"
    both.mkdir()
    for f in os.listdir(fp8_ckpt):
        os.link(fp8_ckpt / f, both / f)
    os.link(single / "model.safetensors", both / "model.safetensors")
    assert main(["verify", str(both)]) == 1
    out = capsys.readouterr().out
    assert "every scale and shape is sound" not in out
    assert "model.safetensors" in out and "index" in out


def test_non_utf8_names_in_messages_are_printed_escaped(tmp_path, capsys):
    bad = os.fsdecode(b"ckpt-\xff")
    (tmp_path / bad).mkdir()
    assert main(["inspect", str(tmp_path / bad)]) != 0
    err = capsys.readouterr().err
    assert "ckpt-" in err
