"""The writer and the converter attacked as a hostile or careless user would: destinations that
are not directories, links planted where save writes, an old index naming files outside DST,
sources inside destinations and the reverse, concurrent writers, odd umasks.

The rule every case checks: nothing outside DST is removed or written, inside DST only the
names save writes are touched (links among them removed, never followed), and what cannot be
done is refused before anything is written.
"""

from __future__ import annotations

import os
import stat
import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lazyfp8
from lazyfp8 import LazyFP8Error, LazyFP8View, SaveError, UnsafePathError, save
from lazyfp8.cli import main

INDEX = "model.safetensors.index.json"


def sd(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}.weight": torch.randn(32, 32, generator=g) for i in range(n)}


def files(path):
    """name -> bytes (or link target) of every entry directly in ``path``."""
    out = {}
    for n in os.listdir(path):
        p = os.path.join(path, n)
        if os.path.islink(p):
            out[n] = ("link", os.readlink(p))
        elif os.path.isfile(p):
            out[n] = open(p, "rb").read()
        else:
            out[n] = stat.filemode(os.lstat(p).st_mode)
    return out


def dead_pid():
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- An old index in DST naming anything at all ------------------------------------------------

SENTINELS = ["s0", "s1.safetensors", "model-00001-of-00002.safetensors"]

hostile_names = st.one_of(
    st.sampled_from(["..", ".", "", "/", "sub", "sub/", "\\", "model.safetensors", INDEX, "config.json"]),
    st.builds(lambda up, s: "../" * up + "outside/" + s, st.integers(1, 4), st.sampled_from(SENTINELS)),
    st.builds(lambda s: "sub/../../outside/" + s, st.sampled_from(SENTINELS)),
    st.builds(lambda s: "..\\outside\\" + s, st.sampled_from(SENTINELS)),
    st.builds(lambda s: "model-00001-of-00002.safetensors/../../outside/" + s, st.sampled_from(SENTINELS)),
    st.sampled_from(["ABSOLUTE/" + s for s in SENTINELS]),
    st.text(st.sampled_from("./\\-_ams0\x00é\udc80"), max_size=12),
    st.integers(), st.none(), st.lists(st.integers(), max_size=2),
)


@given(
    weight_map=st.dictionaries(st.text(max_size=5), hostile_names, max_size=8),
    links=st.lists(st.sampled_from(["model.safetensors", "model-00001-of-00002.safetensors", INDEX, "config.json"]),
                   unique=True, max_size=3),
    new_shards=st.sampled_from([10**9, 3000]),
)
def test_hostile_old_index_never_costs_a_file_outside_dst(tmp_path_factory, weight_map, links, new_shards):
    import json

    root = tmp_path_factory.mktemp("hostile")
    outside = root / "outside"
    outside.mkdir()
    for s in SENTINELS:
        (outside / s).write_text(f"sentinel {s}")
    dst = root / "a" / "b" / "dst"  # deep enough that "../../.." from DST stays under root
    (dst / "sub").mkdir(parents=True)
    (dst / "sub" / "keep.safetensors").write_text("user's")
    (dst / "notes.txt").write_text("user's")
    wm = {k: (v.replace("ABSOLUTE", str(outside)) if isinstance(v, str) else v) for k, v in weight_map.items()}
    (dst / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    for name in links:  # links named like our files, pointing at sentinels
        if not os.path.lexists(dst / name):
            os.symlink(outside / SENTINELS[0], dst / name)
    before = files(outside)
    r = save(sd(), dst, overwrite=True, max_shard_size=new_shards)
    assert files(outside) == before
    assert files(dst / "sub") == {"keep.safetensors": b"user's"} and (dst / "notes.txt").read_text() == "user's"
    assert set(os.listdir(dst)) == {"sub", "notes.txt", *r.files, *([INDEX] if r.index else [])}
    assert set(LazyFP8View(dst)) == set(sd())


# -- Destinations that are not plain directories ------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "fifo", "dangling link", "link loop", "link to a file", "socket path too"])
def test_destination_that_is_not_a_directory_is_refused_untouched(tmp_path, kind):
    dst = tmp_path / "dst"
    if kind == "file":
        dst.write_text("mine")
    elif kind == "fifo":
        os.mkfifo(dst)
    elif kind == "dangling link":
        os.symlink(tmp_path / "nowhere", dst)
    elif kind == "link loop":
        os.symlink(dst, dst)
    elif kind == "link to a file":
        (tmp_path / "f").write_text("mine")
        os.symlink(tmp_path / "f", dst)
    else:
        dst = tmp_path / "f" / "sub"
        (tmp_path / "f").write_text("mine")
    before = files(tmp_path)
    with pytest.raises(SaveError) as e:
        save(sd(), dst, overwrite=True)
    assert str(dst) in str(e.value)
    assert files(tmp_path) == before


def test_destination_that_links_to_a_directory_is_written_through(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "dst")
    save(sd(), tmp_path / "dst")
    assert os.path.islink(tmp_path / "dst") and os.listdir(tmp_path / "real") == ["model.safetensors"]


def test_directory_named_like_a_shard_is_refused(tmp_path):
    save(sd(), tmp_path)
    (tmp_path / "model-00001-of-00002.safetensors").mkdir()
    before = files(tmp_path)
    with pytest.raises(SaveError, match="is a directory"):
        save(sd(1), tmp_path, overwrite=True, max_shard_size=5000)
    assert files(tmp_path) == before


def test_a_safetensors_file_save_did_not_write_blocks_overwrite(tmp_path):
    """Once our files are gone and before the new ones are in, a reader would load that lone
    file: save cannot replace the checkpoint atomically and says so."""
    save(sd(), tmp_path)
    (tmp_path / "consolidated.safetensors").write_bytes(b"mistral's")
    before = files(tmp_path)
    with pytest.raises(SaveError, match="consolidated.safetensors"):
        save(sd(1), tmp_path, overwrite=True)
    assert files(tmp_path) == before
    with pytest.raises(FileExistsError):
        save(sd(1), tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_destination_is_refused_before_anything_is_read(tmp_path):
    save(sd(), tmp_path / "dst")
    os.chmod(tmp_path / "dst", 0o555)
    try:
        with pytest.raises(SaveError, match="not writable"):
            save(sd(1), tmp_path / "dst", overwrite=True)
    finally:
        os.chmod(tmp_path / "dst", 0o755)


# -- Links and hard links planted where save writes ---------------------------------------------


def test_files_of_dst_linked_elsewhere_are_unlinked_never_written_through(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("a", "b", "c"):
        (outside / name).write_text(name)
    dst = tmp_path / "dst"
    save(sd(), dst, config={"model_type": "x"})
    os.remove(dst / "model.safetensors")
    os.link(outside / "a", dst / "model.safetensors")  # a hard link
    os.remove(dst / "config.json")
    os.symlink(outside / "b", dst / "config.json")
    os.symlink(outside / "c", dst / INDEX)
    before = files(outside)
    save(sd(1), dst, overwrite=True, config={"model_type": "y"})
    assert files(outside) == before
    assert not os.path.islink(dst / "config.json") and os.stat(dst / "model.safetensors").st_nlink == 1


def test_links_planted_at_staging_and_temporary_names(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.safetensors").write_text("sentinel")
    dst = tmp_path / "dst"
    dst.mkdir()
    pid = dead_pid()
    for name in (f".lazyfp8.tmp-{os.getpid()}", f".lazyfp8.tmp-{pid}"):
        os.symlink(outside, dst / name)
    os.symlink(outside / "model.safetensors", dst / f".model.safetensors.tmp-{pid}")
    save(sd(), dst)
    assert files(outside) == {"model.safetensors": b"sentinel"}
    assert sorted(os.listdir(dst)) == ["model.safetensors"]


# -- Sources and destinations inside each other -------------------------------------------------


def test_source_inside_destination(tmp_path):
    dst = tmp_path / "dst"
    src = dst / "orig"
    save(sd(), src, scheme=None, config={"model_type": "x"})
    (src / "tokenizer.json").write_text("{}")
    before = files(src)
    assert main(["-q", "quantize", str(src), str(dst), "--scheme", "per-tensor", "--force"]) == 0
    assert main(["-q", "quantize", str(src), str(dst), "--scheme", "per-tensor", "--force"]) == 0
    assert files(src) == before and set(LazyFP8View(dst)) == set(sd())


def test_destination_inside_source(tmp_path):
    src = tmp_path / "src"
    save(sd(), src, scheme=None, config={"model_type": "x"})
    (src / "tokenizer.json").write_text("{}")
    before = files(src)
    for force in ([], ["--force"]):
        assert main(["-q", "quantize", str(src), str(src / "out"), "--scheme", "per-tensor", *force]) == 0
    after = files(src)
    del after["out"]
    assert after == before
    assert sorted(os.listdir(src / "out")) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_dst_is_a_hub_snapshot_of_the_source(tmp_path):
    """The files of a cache snapshot are links into blobs/: writing into the snapshot would
    replace the links, and writing into blobs/ would overwrite the files. Both refused."""
    repo = tmp_path / "models--org--name"
    blobs, snap = repo / "blobs", repo / "snapshots" / "rev"
    save(sd(), blobs, scheme=None)
    os.rename(blobs / "model.safetensors", blobs / "sha256-abc")
    snap.mkdir(parents=True)
    os.symlink("../../blobs/sha256-abc", snap / "model.safetensors")
    view = LazyFP8View(snap)
    for dst in (snap, blobs):
        with pytest.raises(SaveError):
            save(view, dst, overwrite=True)
    assert os.path.islink(snap / "model.safetensors") and (blobs / "sha256-abc").exists()


# -- Two writers, odd umasks, odd names ----------------------------------------------------------


def test_concurrent_saves_into_one_directory(tmp_path, monkeypatch):
    started, release = threading.Event(), threading.Event()
    real = lazyfp8.writer._save_file

    def slow(tensors, path):
        started.set()
        release.wait(30)
        real(tensors, path)

    monkeypatch.setattr(lazyfp8.writer, "_save_file", slow)
    errors, first_errors = [], []

    def first_save():
        try:
            save(sd(0), tmp_path)
        except BaseException as e:  # reported below
            first_errors.append(e)

    first = threading.Thread(target=first_save, daemon=True)
    first.start()
    assert started.wait(30)
    monkeypatch.setattr(lazyfp8.writer, "_save_file", real)
    try:
        save(sd(1), tmp_path, overwrite=True)
    except SaveError as e:
        errors.append(e)
    release.set()
    first.join(30)
    assert errors and "another save is writing" in str(errors[0]) and first_errors == []
    assert set(LazyFP8View(tmp_path)) == set(sd(0))
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


@pytest.mark.parametrize("umask, file_mode", [(0o077, 0o600), (0o022, 0o644), (0o222, 0o444), (0o777, 0o000)])
def test_odd_umasks(tmp_path, umask, file_mode):
    old = os.umask(umask)
    try:
        save(sd(), tmp_path / "dst", config={}, max_shard_size=5000)
        save(sd(1), tmp_path / "dst", config={}, overwrite=True)  # over read-only files too
    finally:
        os.umask(old)
    modes = {n: stat.S_IMODE(os.stat(tmp_path / "dst" / n).st_mode) for n in os.listdir(tmp_path / "dst")}
    assert set(modes.values()) == {file_mode}, modes
    assert stat.S_IMODE(os.stat(tmp_path / "dst").st_mode) & 0o700 == 0o700  # the writer could write in it


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "model.safetensors", "config.json", "x.safetensors",
                                  "x.index.json", "", "a\x00b", "..", "model-00001-of-00002.safetensors"])
def test_extra_file_names_that_are_not_plain_or_are_ours_are_refused(tmp_path, name):
    import io

    with pytest.raises(SaveError, match="extra file name"):
        save(sd(), tmp_path / "dst", extra_files={name: io.BytesIO(b"x")})
    assert not (tmp_path / "dst").exists()


def test_extra_file_that_is_not_a_regular_file_is_refused_before_writing(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        save(sd(), tmp_path / "dst", extra_files={"tokenizer.json": tmp_path / "fifo"})
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("path", ["", "a\x00b"])
def test_unusable_destination_paths(tmp_path, path):
    with pytest.raises((LazyFP8Error, ValueError)):
        save(sd(), path)


def test_a_scale_name_taken_by_another_tensor(tmp_path):
    """compressed-tensors names the scale of ``l.weight`` ``l.weight_scale``: a state dict that
    already holds that key would lose one of the two silently."""
    tensors = {"l.weight": torch.randn(4, 4), "l.weight_scale": torch.ones(4, 1)}
    with pytest.raises(LazyFP8Error, match="'l.weight_scale', the name of the tensor 'l.weight_scale'"):
        save(tensors, tmp_path / "dst", scheme="per-channel", format="compressed-tensors", quantize=["^l.weight$"])
    assert not (tmp_path / "dst").exists()


def test_cli_dequantize_of_a_source_with_a_surrogate_free_but_odd_key(tmp_path):
    """Keys the reader accepts (spaces, unicode, slashes) convert and read back."""
    src = tmp_path / "src"
    save({"a b/é.weight": torch.randn(4, 4), "x.weight": torch.randn(4, 4)}, src, scheme="per-tensor",
         quantize=lambda k: True, exclude=(), config={})
    assert main(["-q", "dequantize", str(src), str(tmp_path / "out")]) == 0
    assert set(LazyFP8View(tmp_path / "out")) == {"a b/é.weight", "x.weight"}


# -- convert: into its source, across each other, killed half-way, asked nonsense --------------

import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from lazyfp8 import PerBlock  # noqa: E402


def fp8_checkpoint(path, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {f"layers.{i}.proj.weight": torch.randn(64, 128, generator=g) for i in range(n)}
    save(tensors, path, scheme=PerBlock((32, 32)), max_shard_size=12_000, config={"model_type": "x"})
    (path / "tokenizer.json").write_text('{"old": true}')
    return path


def tree(path):
    out = {}
    for root, _dirs, names in os.walk(path):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, path)] = os.readlink(p) if os.path.islink(p) else open(p, "rb").read()
    return out


def snapshot(path):
    """Every tensor of the checkpoint at ``path`` as raw bits, or None when it does not load."""
    try:
        view = LazyFP8View(path)
        return {k: view.get_tensor(k).contiguous().view(torch.uint8).numpy().tobytes() for k in view}
    except LazyFP8Error:
        return None


@pytest.mark.parametrize("to", ["nvfp4", "bf16"])
@pytest.mark.parametrize("form", ["SRC SRC", "SRC SRC/", "SRC link-to-SRC", "SRC/shard SRC", "SRC hardlinks-of-SRC"])
def test_convert_into_its_own_source_is_refused_before_anything_is_written(tmp_path, capsys, to, form):
    src = fp8_checkpoint(tmp_path / "src")
    os.symlink(src, tmp_path / "link")
    links = tmp_path / "links"
    links.mkdir()
    for n in os.listdir(src):
        os.link(src / n, links / n)
    first = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))[0]
    src_arg, dst_arg = {
        "SRC SRC": (src, src),
        "SRC SRC/": (src, f"{src}/"),
        "SRC link-to-SRC": (src, tmp_path / "link"),
        "SRC/shard SRC": (src / first, src),
        "SRC hardlinks-of-SRC": (src, links),
    }[form]
    before, before_links = tree(src), tree(links)
    capsys.readouterr()
    assert main(["convert", str(src_arg), str(dst_arg), "--to", to, "--force"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(dst_arg).rstrip("/") in err, err
    assert tree(src) == before and tree(links) == before_links


def test_convert_into_a_directory_inside_its_source(tmp_path):
    src = fp8_checkpoint(tmp_path / "src")
    before = tree(src)
    for force in ([], ["--force"]):
        assert main(["-q", "convert", str(src), str(src / "out"), "--to", "nvfp4", *force]) == 0
    after = tree(src)
    assert {k: v for k, v in after.items() if not k.startswith("out" + os.sep)} == before
    assert sorted(os.listdir(src / "out")) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert set(LazyFP8View(src / "out")) == set(LazyFP8View(src))


def test_convert_a_source_inside_its_destination(tmp_path):
    dst = tmp_path / "dst"
    src = fp8_checkpoint(dst / "orig")
    before = tree(src)
    for _ in range(2):
        assert main(["-q", "convert", str(src), str(dst), "--to", "int4", "--group-size", "32", "--force"]) == 0
    assert tree(src) == before and set(LazyFP8View(dst)) == set(LazyFP8View(src))


_KILLED_CHILD = r"""
import sys, time
import lazyfp8.writer as w
from lazyfp8.cli import main

real, wanted, written = w._save_file, int(sys.argv[1]), []

def save_then_wait(tensors, path):
    real(tensors, path)
    written.append(path)
    if len(written) == wanted:
        print("written", flush=True)
        time.sleep(600)  # killed here

w._save_file = save_then_wait
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("old", [False, True], ids=["fresh", "over-an-old-one"])
@pytest.mark.parametrize("after_shard", [1, 4])
def test_a_conversion_killed_half_way_leaves_the_old_checkpoint_or_nothing(tmp_path, old, after_shard):
    """SIGKILLed after its first or its last (4th) shard, before anything is moved in: DST loads as
    before (the old checkpoint, bit for bit, or not at all), never as half a conversion; the
    next run cleans up and converts."""
    src = fp8_checkpoint(tmp_path / "src")
    dst = tmp_path / "dst"
    if old:
        save({"old.weight": torch.ones(8, 8)}, dst, scheme=None, config={"model_type": "old"})
    before = snapshot(dst) if old else None
    args = ["-q", "convert", str(src), str(dst), "--to", "nvfp4-modelopt", "--max-shard-size", "9KB", "--force"]
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(after_shard), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "written", child.stderr.read()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert snapshot(dst) == before if old else snapshot(dst) is None
    if old:
        assert json.loads((dst / "config.json").read_text()) == {"model_type": "old"}
    assert any(".tmp-" in n for n in os.listdir(dst)), "the dead run's staging directory is still there"
    assert main(args) == 0
    assert not [n for n in os.listdir(dst) if ".tmp-" in n]
    view = LazyFP8View(dst)
    assert set(view) == set(LazyFP8View(src)) and sum(n.endswith(".safetensors") for n in os.listdir(dst)) == 4


@pytest.mark.parametrize(
    "args",
    [
        ["--to", "nf4"],
        ["--to", ""],
        ["--to", "NVFP4"],
        [],
        ["--to", "nvfp4", "--group-size", "0"],
        ["--to", "int4", "--group-size", "-8"],
        ["--to", "fp8", "--block-size", "0", "1"],
        ["--to", "nvfp4", "--only", "(bad"],
        ["--to", "nvfp4", "--max-shard-size", "0"],
    ],
)
def test_convert_arguments_that_make_no_sense_are_usage_errors(tmp_path, capsys, args):
    src = fp8_checkpoint(tmp_path / "src")
    with pytest.raises(SystemExit) as e:
        main(["convert", str(src), str(tmp_path / "dst"), *args])
    assert e.value.code == 2 and not (tmp_path / "dst").exists()
    assert "error:" in capsys.readouterr().err


def test_a_tensor_the_target_cannot_hold_is_refused_before_the_old_checkpoint_is_touched(tmp_path, capsys):
    src = tmp_path / "src"
    save({"a.weight": torch.randn(16, 64), "b.weight": torch.randn(16, 48)}, src, scheme="per-tensor",
         quantize=lambda k: True, exclude=(), config={})
    dst = tmp_path / "dst"
    save({"old.weight": torch.ones(4, 4)}, dst, scheme=None)
    before = tree(dst)
    assert main(["convert", str(src), str(dst), "--to", "mxfp4", "--force"]) == 1
    err = capsys.readouterr().err
    assert "'b.weight' of shape [16, 48]" in err and "exclude" in err
    assert tree(dst) == before
    assert main(["-q", "convert", str(src), str(dst), "--to", "mxfp4", "--exclude", "^b", "--force"]) == 0
    assert sorted(k for k in LazyFP8View(dst) if LazyFP8View(dst).info(k).scale_key) == ["a.weight"]
