import contextlib
import errno
import io
import json
import os
import re
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

import lazyfp8
from lazyfp8 import (
    LazyFP8Error,
    LazyFP8View,
    NonFiniteError,
    PerBlock,
    PerChannel,
    PerTensor,
    init_empty_weights,
    load_into,
    save,
)
from lazyfp8.keymap import KeyMapping, KeyMappingError, Rule
from tests.helpers import bits, reference
from tests.strategies import key_trees, random_tensor

INDEX = "model.safetensors.index.json"


def raw(path, key):
    """The stored tensor, straight from safetensors."""
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    for f in files:
        with safe_open(os.path.join(path, f), "pt") as h:
            if key in h.keys():
                return h.get_tensor(key)
    raise KeyError(key)


class Net(nn.Module):
    def __init__(self, tie=True):
        super().__init__()
        self.embed = nn.Embedding(40, 64)
        self.up = nn.Linear(64, 300)
        self.down = nn.Linear(300, 64, bias=False)
        self.norm = nn.LayerNorm(64)
        self.lm_head = nn.Linear(64, 40, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight


def test_model_round_trip_and_ties(tmp_path):
    torch.manual_seed(0)
    src = Net().to(torch.bfloat16)
    r = save(src, tmp_path, scheme=PerBlock((128, 128)), config={"model_type": "net"})
    assert r.quantized == ["up.weight", "down.weight"]  # Linear weights; the head is excluded
    assert r.tied == ["lm_head.weight"]
    view = LazyFP8View(tmp_path)
    assert "lm_head.weight" not in view and set(view) == set(src.state_dict()) - {"lm_head.weight"}
    assert view.scheme.name == "fp8" and view.info("up.weight").granularity == PerBlock((128, 128))
    with init_empty_weights():
        dst = Net().to(torch.bfloat16)
    load_into(dst, view)
    assert dst.lm_head.weight is dst.embed.weight
    for k in ["embed.weight", "norm.weight", "up.bias"]:
        assert torch.equal(bits(dst.state_dict()[k]), bits(src.state_dict()[k]))
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]


def test_single_file_without_index(tmp_path):
    r = save({"a.weight": torch.randn(4, 4)}, tmp_path)
    assert r.files == ["model.safetensors"] and r.index is None
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


SCHEMES = st.one_of(
    st.just(PerTensor()),
    st.just(PerChannel()),
    st.tuples(st.integers(1, 64), st.integers(1, 64)).map(PerBlock),
)
SHAPES = st.one_of(
    st.tuples(st.integers(0, 40), st.integers(0, 40)),
    st.tuples(st.integers(1, 150), st.integers(1, 150)),
    st.tuples(st.integers(0, 50)),
)


@given(
    keys=key_trees(min_size=1, max_size=6),
    data=st.data(),
    scheme=SCHEMES,
    fp8=st.sampled_from([torch.float8_e4m3fn, torch.float8_e5m2]),
    shard_size=st.integers(1, 20_000),
    prefix=st.sampled_from(["", "model.", "language_model.model."]),
)
def test_property_save_then_view(tmp_path_factory, keys, data, scheme, fp8, shard_size, prefix):
    d = str(tmp_path_factory.mktemp("w"))
    sd = {}
    for i, k in enumerate(keys):
        shape = data.draw(SHAPES)
        dtype = data.draw(st.sampled_from([torch.bfloat16, torch.float32, torch.float16, torch.int64]))
        sd[k] = random_tensor(shape, dtype, i)
    mapping = {"^" + prefix.replace(".", r"\."): ""} if prefix else None
    fmt = "compressed-tensors" if isinstance(scheme, PerChannel) else "fp8"
    quantize = lambda key: sd[key].dim() == 2  # noqa: E731
    r = save(sd, d, scheme=scheme, fp8_dtype=fp8, key_mapping=mapping, quantize=quantize, exclude=(), max_shard_size=shard_size, format=fmt)
    view = LazyFP8View(d, key_mapping=mapping, block_size=getattr(scheme, "block", None), dtype=torch.float32)
    assert set(view) == set(sd)
    for k, t in sd.items():
        got = view.get_tensor(k)
        if k in r.quantized:
            scale = view.scale(k)
            block = view.info(k).granularity.block_size(t.shape)
            codes = raw(d, view.disk_key(k))
            assert torch.equal(bits(got), bits(reference(codes, scale, torch.float32, block)))
            # within half an fp8 step of each value (relative), or of the smallest subnormal step
            step = 2.0 ** -(4 if fp8 == torch.float8_e4m3fn else 3)
            tiny = reference(torch.ones_like(codes, dtype=torch.float32).to(fp8), scale, torch.float32, block) * 2.0**-9
            err = (got - t.float()).abs()
            assert (err <= torch.maximum(t.float().abs() * step, tiny) * 1.0001).all()
            again, _ = lazyfp8.quantize(got, view.info(k).granularity, fp8, scale=scale)
            assert torch.equal(bits(again), bits(codes)), "re-quantizing gives the same bytes"
        else:
            assert got.dtype == t.dtype and torch.equal(bits(got), bits(t))
        assert view.disk_key(k) == prefix + k
    if len(r.files) > 1:
        index = json.loads(open(os.path.join(d, r.index)).read())
        assert set(index["weight_map"].values()) == set(r.files)


def test_resave_of_a_view_reproduces_the_fp8_bytes(tmp_path):
    torch.manual_seed(1)
    src = Net(tie=False).to(torch.bfloat16)
    for scheme in [PerTensor(), PerBlock((128, 128)), PerBlock((1, 32))]:
        a, b = tmp_path / f"a{scheme}", tmp_path / f"b{scheme}"
        save(src, a, scheme=scheme)
        view = LazyFP8View(a, block_size=getattr(scheme, "block", None))
        r = save(view, b, scheme=scheme, scales=view, quantize=lambda k, v=view: v.info(k).scale_key is not None)
        assert sorted(r.quantized) == ["down.weight", "up.weight"]
        for k in r.quantized:
            assert torch.equal(bits(raw(a, k)), bits(raw(b, k)))
            assert torch.equal(bits(raw(a, k + "_scale_inv")), bits(raw(b, k + "_scale_inv")))


def test_ue8m0_writes_exponent_bytes(tmp_path):
    save({"x.weight": torch.randn(8, 64)}, tmp_path, scheme="mx", ue8m0=True)
    assert raw(tmp_path, "x.weight_scale_inv").dtype == torch.uint8
    view = LazyFP8View(tmp_path)
    assert view.info("x.weight").granularity == PerBlock((1, 32))


def test_compressed_tensors_format(tmp_path):
    save({"l.weight": torch.randn(8, 16)}, tmp_path, scheme=PerChannel(), format="compressed-tensors", config={})
    view = LazyFP8View(tmp_path)
    assert view.scheme.name == "compressed-tensors" and view.info("l.weight").scale_key == "l.weight_scale"


def test_incompatible_format(tmp_path):
    with pytest.raises(ValueError, match="no per-channel"):
        save({"l.weight": torch.randn(8, 16)}, tmp_path, scheme=PerChannel())


def test_nan_input_names_the_tensor_and_leaves_nothing(tmp_path):
    sd = {f"l{i}.weight": torch.randn(64, 64) for i in range(4)}
    sd["l3.weight"][5, 5] = float("nan")
    with pytest.raises(NonFiniteError, match="'l3.weight'"):
        save(sd, tmp_path, max_shard_size=10_000)
    assert os.listdir(tmp_path) == []


def test_failure_midway_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    calls = []
    real = lazyfp8.writer._save_file

    def flaky(tensors, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real(tensors, path)

    monkeypatch.setattr(lazyfp8.writer, "_save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        save({f"l{i}.weight": torch.randn(64, 64) for i in range(5)}, tmp_path, max_shard_size=10_000, config={})
    assert os.listdir(tmp_path) == []


def test_refuses_to_overwrite_then_replaces_and_cleans_stale_shards(tmp_path):
    sd = {f"l{i}.weight": torch.randn(64, 64) for i in range(5)}
    first = save(sd, tmp_path, scheme=None, max_shard_size=10_000)
    assert len(first.files) == 5
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save(sd, tmp_path)
    second = save(sd, tmp_path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"] and second.index is None
    assert set(LazyFP8View(tmp_path)) == set(sd)


def test_key_mapping_that_does_not_invert(tmp_path):
    with pytest.raises(KeyMappingError, match="cannot be inverted"):
        save({"model.layers.0.w": torch.ones(2)}, tmp_path, key_mapping={r"^layers\.(\d+)": r"model.layers.\1"})
    with pytest.raises(KeyMappingError, match="reads back"):
        save({"new.w": torch.ones(2), "old.w": torch.ones(2)}, tmp_path, key_mapping={r"^old\.": "new."})


def test_streams_one_tensor_at_a_time_from_a_view(tmp_path, monkeypatch):
    sd = {f"l{i}.weight": torch.randn(64, 64).to(torch.bfloat16) for i in range(6)}
    save(sd, tmp_path / "src", scheme=None)
    view = LazyFP8View(tmp_path / "src")
    events = []
    real_mat = lazyfp8.LazyTensor.materialize
    monkeypatch.setattr(lazyfp8.LazyTensor, "materialize", lambda self: (events.append(("read", self.key)), real_mat(self))[1])
    real_save = lazyfp8.writer._save_file
    monkeypatch.setattr(lazyfp8.writer, "_save_file", lambda t, p: (events.append(("write", sorted(t))), real_save(t, p))[1])
    r = save(view, tmp_path / "dst", scheme=None, max_shard_size=2 * 64 * 64 * 2)
    assert len(r.files) == 3
    # each shard is written before the next shard's tensors are read
    kinds = [e[0] for e in events]
    assert kinds == ["read", "read", "write"] * 3


def test_files_get_the_usual_permissions(tmp_path):
    # safetensors writes 0600; a checkpoint must be as readable as any file the user creates
    old = os.umask(0o022)
    try:
        save({"a.weight": torch.randn(64, 64), "b.weight": torch.randn(64, 64)}, tmp_path, max_shard_size=5000, config={})
    finally:
        os.umask(old)
    modes = {f: os.stat(tmp_path / f).st_mode & 0o777 for f in os.listdir(tmp_path)}
    assert set(modes.values()) == {0o644}, modes


def test_an_unwritable_config_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(lazyfp8.writer, "_materialize", lambda v: pytest.fail("read a tensor"))
    with pytest.raises(ValueError, match="ue8m0"):
        save({"x.weight": torch.randn(8, 64)}, tmp_path, scheme="mx", ue8m0=True, config={})
    with pytest.raises(ValueError, match="format must be one of"):
        save({"x.weight": torch.randn(8, 64)}, tmp_path, scheme=None, format="gguf")
    assert os.listdir(tmp_path) == []


def test_empty_block_scaled_weight_round_trips(tmp_path):
    # Found by the property test above: a [0, 3] weight with 1 x 2 blocks has a [0, 2] grid.
    save({"w": torch.randn(0, 3)}, tmp_path, scheme=PerBlock((1, 2)), quantize=lambda k: True, exclude=())
    view = LazyFP8View(tmp_path, block_size=(1, 2), dtype=torch.float32)
    codes = raw(str(tmp_path), "w")
    assert view.get_tensor("w").shape == (0, 3) and tuple(view.scale("w").shape) == (0, 2)
    assert reference(codes, view.scale("w"), torch.float32, (1, 2)).shape == (0, 3)


# --- Issue 11: nothing lost, nothing leaked ----------------------------------------------------


def sentinel(path, text="keep me"):
    path.write_text(text)
    return path


def dead_pid():
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_overwrite_removes_only_files_save_would_write(tmp_path):
    """A hostile old index (``..``, absolute paths, subdirectories) or a link named like a shard
    makes overwrite remove nothing outside DST, and inside DST only save's own names."""
    dst = tmp_path / "dst"
    save({"a.weight": torch.randn(8, 8), "b.weight": torch.randn(8, 8)}, dst, max_shard_size=300)
    outside = sentinel(tmp_path / "victim.txt")
    linked = sentinel(tmp_path / "linked.safetensors", "not mine to delete")
    (dst / "sub").mkdir()
    inner = sentinel(dst / "sub" / "x.safetensors")
    notes = sentinel(dst / "notes.txt")
    hostile = {"a": "../victim.txt", "b": str(outside), "c": "sub/x.safetensors", "d": "sub/../../victim.txt",
               "e": "notes.txt", "f": "model-00009-of-00009.safetensors"}
    (dst / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": hostile}))
    os.symlink(linked, dst / "model-00009-of-00009.safetensors")
    save({"a.weight": torch.randn(8, 8)}, dst, overwrite=True)
    for f in (outside, linked, inner, notes):
        assert f.exists(), f
    assert linked.read_text() == "not mine to delete"
    assert sorted(os.listdir(dst)) == ["model.safetensors", "notes.txt", "sub"]


def test_dead_temporaries_removed_are_only_ours(tmp_path):
    pid = dead_pid()
    save({"a.weight": torch.randn(4, 4)}, tmp_path)
    users = [sentinel(tmp_path / f".x.tmp-{pid}"), sentinel(tmp_path / f".notes.txt.tmp-{pid}"),
             sentinel(tmp_path / f".model.safetensors.tmp-{pid}x")]
    ours = [sentinel(tmp_path / f".model.safetensors.tmp-{pid}"), sentinel(tmp_path / f".{INDEX}.tmp-{pid}"),
            sentinel(tmp_path / f".model-00001-of-00002.safetensors.tmp-{pid}")]
    staging = tmp_path / f".lazyfp8.tmp-{pid}"
    staging.mkdir()
    sentinel(staging / "model.safetensors")
    live = tmp_path / f".lazyfp8.tmp-{os.getppid()}"  # a writer still at work
    live.mkdir()
    save({"a.weight": torch.randn(4, 4)}, tmp_path, overwrite=True)
    assert all(f.exists() for f in users) and live.exists()
    assert not any(f.exists() for f in ours) and not staging.exists()


@pytest.mark.parametrize("how", ["same path", "trailing slash", "symlink to it", "file of it inside", "hard link inside", "as scales"])
def test_save_refuses_to_overwrite_its_own_source(tmp_path, how):
    src = tmp_path / "src"
    save({"a.weight": torch.randn(64, 64), "b.weight": torch.randn(64, 64)}, src, max_shard_size=5000, config={})
    before = {f: (src / f).read_bytes() for f in os.listdir(src)}
    view = LazyFP8View(src)
    kwargs = {}
    dst = src
    if how == "trailing slash":
        dst = str(src) + "/"
    elif how == "symlink to it":
        dst = tmp_path / "link"
        os.symlink(src, dst)
    elif how == "file of it inside":
        view = LazyFP8View(src / "model-00001-of-00002.safetensors")
        dst = tmp_path / "other"
        dst.mkdir()
        os.symlink(src / "model-00001-of-00002.safetensors", dst / "model.safetensors")
    elif how == "hard link inside":
        dst = tmp_path / "other"
        dst.mkdir()
        os.link(src / "model-00002-of-00002.safetensors", dst / "model-00002-of-00002.safetensors")
    elif how == "as scales":
        kwargs = {"scales": view}
        view = {"a.weight": torch.randn(64, 64)}
    with pytest.raises(lazyfp8.SaveError, match=re.escape(str(src))) as e:
        save(view, dst, overwrite=True, **kwargs)
    assert isinstance(e.value, (LazyFP8Error, ValueError)) and str(dst).rstrip("/") in str(e.value)
    assert {f: (src / f).read_bytes() for f in os.listdir(src)} == before


def test_a_dict_of_a_views_tensors_may_replace_that_view(tmp_path):
    """Every tensor is read before anything old is removed: ``save(dict(view), view.path)`` is
    safe, and gives the same tensors back."""
    torch.manual_seed(3)
    save({f"l{i}.weight": torch.randn(64, 64) for i in range(4)}, tmp_path, scheme=None, max_shard_size=40_000)
    view = LazyFP8View(tmp_path, dtype=torch.float32)
    want = {k: view.get_tensor(k) for k in view}
    save(dict(view), tmp_path, scheme=None, overwrite=True)
    again = LazyFP8View(tmp_path, dtype=torch.float32)
    assert all(torch.equal(again.get_tensor(k), t) for k, t in want.items()) and len(again.files) == 1


@pytest.mark.parametrize("size", [0, -1, "0KB", "-5MB", "5", "lots", "5XB", "infGB", "nanMB", True, 1.5, None])
def test_max_shard_size_is_checked_before_the_destination_is_touched(tmp_path, size):
    if size == "5":
        assert lazyfp8.writer.parse_shard_size(size) == 5  # plain digits are bytes
        return
    with pytest.raises(ValueError, match="max_shard_size"):
        save({"a.weight": torch.randn(4, 4)}, tmp_path / "dst", max_shard_size=size)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    "sd, key_mapping, match",
    [
        ({"a\udc80.weight": torch.ones(2, 2)}, None, "lone surrogate"),
        ({"a\x00b": torch.ones(2)}, None, "NUL"),
        ({"": torch.ones(2)}, None, "empty"),
        ({"__metadata__": torch.ones(2)}, None, "reserves"),
        ({3: torch.ones(2)}, None, "is a int"),
        ({("a", 1): torch.ones(2)}, None, "is a tuple"),
        # a runtime key that is fine, written under a disk key that is not
        ({"model.x.weight": torch.ones(2)}, KeyMapping((Rule("^m\udc80[.]", "model."),), inverse=(Rule("^model[.]", "m\udc80."),)),
         "'model.x.weight' \\(written as 'm\\\\udc80.x.weight'\\).*lone surrogate"),
        ({"l.weight": torch.ones(4, 4), "l.weight_scale_inv": torch.ones(1)}, None, "'l.weight_scale_inv', the name of"),
        ({"a": 1.0}, None, "is a float, not a tensor"),
        ({"a": torch.ones(2, device="meta")}, None, "meta device"),
        ({"a": torch.ones(2, 2).to_sparse()}, None, "layout"),
        ({"a": torch.ones(2, dtype=torch.complex128)}, None, "cannot store"),
    ],
)
def test_unwritable_keys_and_values_are_refused_naming_them(tmp_path, sd, key_mapping, match):
    dst = tmp_path / "dst"
    with pytest.raises(LazyFP8Error, match=match) as e:
        save(sd, dst, key_mapping=key_mapping, quantize=lambda k: k == "l.weight")
    assert str(dst) in str(e.value) and isinstance(e.value, ValueError)
    assert not dst.exists()


def test_other_destinations_refused_before_anything_is_written(tmp_path):
    sd = {"a.weight": torch.randn(4, 4)}
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    os.mkfifo(tmp_path / "fifo")
    for name, match in [("file", "not a directory"), ("dangling", "link to nothing"), ("fifo", "not a directory")]:
        with pytest.raises(lazyfp8.SaveError, match=match):
            save(sd, tmp_path / name, overwrite=True)
    with pytest.raises(lazyfp8.SaveError, match="Not a directory"):
        save(sd, tmp_path / "file" / "sub")
    assert (tmp_path / "file").read_text() == "x"


# A crash (the process killed, or one file operation failing) after every file operation of an
# overwrite, for every pair of layouts: DST must load as the old checkpoint, the new one, or not
# at all, read the way this package reads it, the way transformers does (model.safetensors before
# the index) and index first. Old and new differ in values, scheme and shard count, so any mix is
# visible.

LAYOUTS = {
    "single, per-tensor": dict(scheme="per-tensor", max_shard_size=10**9, seed=1),
    "2 shards, 32x32 blocks": dict(scheme=PerBlock((32, 32)), max_shard_size=13_000, seed=2),
    "3 shards, per-tensor, no config": dict(scheme="per-tensor", max_shard_size=9_000, seed=3, config=None),
    "4 shards, 16x64 blocks": dict(scheme=PerBlock((16, 64)), max_shard_size=6_000, seed=4),
}


class Crash(BaseException):
    """The process dies here: nothing after it runs (a BaseException passes every handler)."""


def save_layout(dst, layout, n=6, **kw):
    """Save the layout's tensors, config and a tokenizer.json (an extra file) to ``dst``."""
    g = torch.Generator().manual_seed(layout["seed"])
    sd = {f"layers.{i}.weight": torch.randn(64, 64, generator=g) for i in range(n)}
    sd["norm.weight"] = torch.randn(64, generator=g)
    config = layout.get("config", {"model_type": "toy", "seed": layout["seed"]})
    tokenizer = io.BytesIO(f'{{"seed": {layout["seed"]}}}'.encode() * 1000)
    return save(sd, dst, scheme=layout["scheme"], max_shard_size=layout["max_shard_size"], config=config,
                extra_files={"tokenizer.json": tokenizer}, **kw)


def snapshot(path):
    """What a reader gets from ``path``: config, every tensor's bits and the tokenizer beside
    them, or ``None`` if refused."""
    try:
        with LazyFP8View(path, dtype=torch.float32) as v:
            tokenizer = os.path.join(v._checkpoint.root, "tokenizer.json")
            return v.config, {k: bits(v.get_tensor(k)) for k in sorted(v)}, open(tokenizer, "rb").read()
    except LazyFP8Error:
        return None


def same(a, b):
    if a is None or b is None:
        return a is b
    return a[0] == b[0] and a[2] == b[2] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def assert_old_new_or_nothing(dst, old, new, what):
    entries = [dst] + [os.path.join(dst, n) for n in ("model.safetensors", INDEX) if os.path.lexists(os.path.join(dst, n))]
    for path in entries:
        got = snapshot(path)
        assert got is None or same(got, old) or same(got, new), f"{what}: {path} loads as a mix: {sorted(os.listdir(dst))}"


@contextlib.contextmanager
def crash_at(dst, k, mode):
    """Make the ``k``-th file operation under ``dst`` crash: ``kill`` (it and every later one
    raise ``Crash``) or ``fail`` (it alone raises OSError, then the writer's error handling runs)."""
    dst = str(dst)
    count, dead = [0], [False]

    def wrap(real):
        def op(*args, **kwargs):
            if any(isinstance(a, str) and a.startswith(dst) for a in args[:2]):
                if dead[0]:
                    raise Crash
                count[0] += 1
                if count[0] == k:
                    if mode == "kill":
                        dead[0] = True
                        raise Crash
                    raise OSError(errno.EIO, "injected failure", args[0])
            return real(*args, **kwargs)

        return op

    with pytest.MonkeyPatch.context() as mp:
        for name in ("replace", "rename", "remove", "unlink", "rmdir"):
            mp.setattr(os, name, wrap(getattr(os, name)))
        yield count


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Each layout saved once, with its snapshot."""
    out = {}
    for name, layout in LAYOUTS.items():
        d = str(tmp_path_factory.mktemp("layout"))
        save_layout(d, layout)
        out[name] = (d, snapshot(d))
        assert out[name][1] is not None, name
    return out


def crash_every_step(tmp_path, layouts, old_name, new_name, mode):
    """Returns how many file operations the overwrite makes (every one crashed in turn)."""
    old_dir, old = layouts[old_name]
    new = layouts[new_name][1]
    k, total = 1, None
    while total is None or k <= total:
        dst = str(tmp_path / f"{mode}-{k}")
        shutil.copytree(old_dir, dst)
        with crash_at(dst, k, mode) as count:
            try:
                save_layout(dst, LAYOUTS[new_name], overwrite=True)
                total = count[0]  # no crash: k is past the last operation
            except (Crash, OSError):
                pass
        assert_old_new_or_nothing(dst, old, new, f"{old_name} -> {new_name}, {mode} at operation {k}")
        if k == 1:
            assert same(snapshot(dst), old), "the first operation lost the old checkpoint"
        k += 1
    assert same(snapshot(dst), new)
    # and a rerun over what a crash left gives the new checkpoint
    save_layout(dst, LAYOUTS[new_name], overwrite=True)
    assert same(snapshot(dst), new) and not [n for n in os.listdir(dst) if ".tmp-" in n]
    return total


@pytest.mark.parametrize("mode", ["kill", "fail"])
@pytest.mark.parametrize("old_name, new_name", [(a, b) for a in LAYOUTS for b in LAYOUTS if a != b])
def test_overwrite_crashed_at_every_file_operation_loads_old_new_or_nothing(tmp_path, layouts, old_name, new_name, mode):
    total = crash_every_step(tmp_path, layouts, old_name, new_name, mode)
    assert total >= 4


def layouts_drawn(seed):
    # A block checkpoint without config.json needs block_size= to be read: not a layout to compare.
    return st.fixed_dictionaries({
        "scheme": st.sampled_from(["per-tensor", PerBlock((32, 32)), PerBlock((1, 64))]),
        "max_shard_size": st.integers(3000, 60_000),
        "seed": st.just(seed),
        "config": st.sampled_from([None, {"model_type": "toy", "seed": seed}]),
    }).filter(lambda d: d["config"] is not None or d["scheme"] == "per-tensor")


@given(old=layouts_drawn(7), new=layouts_drawn(8), n=st.integers(1, 8), k=st.integers(1, 30), mode=st.sampled_from(["kill", "fail"]))
def test_property_overwrite_crash_loads_old_new_or_nothing(tmp_path_factory, old, new, n, k, mode):
    d = tmp_path_factory.mktemp("crash")
    ref_old, ref_new, dst = str(d / "old"), str(d / "new"), str(d / "dst")
    save_layout(ref_old, old, n=n)
    save_layout(ref_new, new, n=n)
    shutil.copytree(ref_old, dst)
    with crash_at(dst, k, mode):
        try:
            save_layout(dst, new, n=n, overwrite=True)
        except (Crash, OSError):
            pass
    old_snap, new_snap = snapshot(ref_old), snapshot(ref_new)
    assert old_snap is not None and new_snap is not None
    assert_old_new_or_nothing(dst, old_snap, new_snap, f"{old} -> {new}, {mode} at {k}")


# --- which modules stay unquantized, and the config that says so ---------------------------------


def _mistral3_like():
    from torch import nn

    m = nn.Module()
    m.model = nn.Module()
    m.model.vision_tower = nn.Module()
    m.model.vision_tower.attn = nn.Linear(32, 32, bias=False)
    m.model.multi_modal_projector = nn.Module()
    m.model.multi_modal_projector.linear_1 = nn.Linear(32, 32, bias=False)
    m.model.language_model = nn.Module()
    m.model.language_model.q_proj = nn.Linear(32, 32, bias=False)
    m.model.language_model.embed_tokens = nn.Embedding(16, 32)
    m.lm_head = nn.Linear(32, 16, bias=False)
    return m.to(torch.bfloat16)


def test_the_mistral3_preset_keeps_vision_and_projector_in_bf16_and_says_so(tmp_path):
    from safetensors import safe_open

    lazyfp8.save(_mistral3_like(), tmp_path, key_mapping="mistral3", config={"model_type": "mistral3"})
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["language_model.model.q_proj.weight"] == "F8_E4M3"
    assert dtypes["vision_tower.attn.weight"] == dtypes["multi_modal_projector.linear_1.weight"] == "BF16"
    assert dtypes["language_model.lm_head.weight"] == "BF16"
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["lm_head", "model.multi_modal_projector.linear_1", "model.vision_tower.attn"]
    # an explicit exclude= is what the user asked for, family convention or not
    lazyfp8.save(_mistral3_like(), tmp_path / "all", key_mapping="mistral3", exclude=[r"lm_head"], config={"model_type": "mistral3"})
    qc = json.loads((tmp_path / "all" / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["lm_head"]


def test_compressed_tensors_config_lists_unquantized_linears_as_ignore(tmp_path):
    lazyfp8.save(_mistral3_like(), tmp_path, format="compressed-tensors", config={"model_type": "x"})
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head"] and "modules_to_not_convert" not in qc
    view = lazyfp8.LazyFP8View(tmp_path)
    assert view.info("model.vision_tower.attn.weight").scale_key is not None  # no preset: quantized


# --- 4-bit schemes: NVFP4 (compressed-tensors, modelopt), MXFP4 (gpt-oss, compressed-tensors), int4 --

from lazyfp8.formats.quantize import unpack_nibbles  # noqa: E402

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
INT4 = torch.arange(16.0) - 8
# (scheme, format, group): every combination save writes
PACKED_FORMATS = [
    ("nvfp4", "compressed-tensors", 16),
    ("nvfp4", "modelopt", 16),
    ("mxfp4", "mxfp4", 32),
    ("mxfp4", "compressed-tensors", 32),
    ("int4", "compressed-tensors", 32),
    ("int4-asym", "compressed-tensors", 32),
]


def raw_all(path):
    """Every stored tensor, straight from safetensors."""
    out = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as h:
                out |= {k: h.get_tensor(k) for k in h.keys()}
    return out


def packed_formula(stored, disk, fmt):
    """float32 weight that the stored tensors of ``disk`` (its on-disk weight name) stand for:
    docs/formats.md's formulas, evaluated on what safetensors reads back, with the name each
    producer gives each part."""
    module = disk.removesuffix("weight")
    if fmt == ("mxfp4", "mxfp4"):
        blocks, exps = stored[disk + "_blocks"], stored[disk + "_scales"]
        codes = unpack_nibbles(blocks).flatten(-2)  # [..., R, C]
        v = E2M1[codes.long()] * torch.exp2(exps.float() - 127).repeat_interleave(32, -1)
        return v.transpose(-1, -2) if v.dim() >= 3 else v  # stacked experts are exposed [E, in, out]
    if fmt == ("nvfp4", "modelopt"):
        codes, s, s2 = stored[disk], stored[module + "weight_scale"], stored[module + "weight_scale_2"]
        assert codes.dtype == torch.uint8 and s.dtype == torch.float8_e4m3fn and s2.shape == ()
        return E2M1[unpack_nibbles(codes).long()] * (s.float() * s2).repeat_interleave(16, -1)
    packed, s = stored[module + "weight_packed"], stored[module + "weight_scale"]
    if fmt[0].startswith("int4"):
        out, cols = packed.shape[0], packed.shape[1] * 8
        assert packed.dtype == torch.int32 and stored[module + "weight_shape"].tolist() == [out, cols]
        group = cols // s.shape[1]
        v = INT4[unpack_nibbles(packed.view(torch.uint8)).long()]
        if fmt[0] == "int4-asym":  # zero points packed like codes, along the output rows
            words = stored[module + "weight_zero_point"]
            assert words.dtype == torch.int32 and words.shape == (-(-out // 8), s.shape[1])
            stream = words.t().reshape(-1).view(torch.uint8).reshape(words.shape[1], -1)  # each group's words
            z = INT4[unpack_nibbles(stream).long()][:, :out].t()
            v = v - z.repeat_interleave(group, -1)
        else:
            assert module + "weight_zero_point" not in stored
        return v * s.float().repeat_interleave(group, -1)
    if fmt[0] == "nvfp4":
        g = stored[module + "weight_global_scale"]
        assert g.shape == (1,) and g.dtype == torch.float32
        return E2M1[unpack_nibbles(packed).long()] * (s.float() / g).repeat_interleave(16, -1)
    assert s.dtype == torch.uint8
    return E2M1[unpack_nibbles(packed).long()] * torch.exp2(s.float() - 127).repeat_interleave(32, -1)


@pytest.mark.parametrize("scheme, fmt, group", PACKED_FORMATS)
@given(keys=key_trees(min_size=1, max_size=5), data=st.data(), shard_size=st.integers(1, 20_000))
def test_property_packed_save_then_view_is_the_formula_on_the_written_codes(tmp_path_factory, scheme, fmt, group, keys, data, shard_size):
    d = str(tmp_path_factory.mktemp("p"))
    sd = {}
    for i, k in enumerate(keys):
        # int4-asym: more than one word of zero points per group (test_asym_int4_of_few_rows below)
        rows = data.draw(st.integers(9 if scheme == "int4-asym" else 1, 16))
        cols = group * data.draw(st.integers(1, 3))
        stacked = fmt == "mxfp4" and data.draw(st.booleans())
        shape = (data.draw(st.integers(1, 3)), cols, rows) if stacked else (rows, cols)  # experts: [E, in, out]
        dtype = data.draw(st.sampled_from([torch.bfloat16, torch.float32, torch.float16]))
        sd[k] = random_tensor(shape, dtype, i)
    sd["norm"] = torch.ones(3)
    r = save(sd, d, scheme=scheme, format=fmt, group_size=group if scheme.startswith("int4") else None,
             quantize=lambda key: key != "norm", exclude=(), max_shard_size=shard_size, config={"model_type": "x"})
    assert sorted(r.quantized) == sorted(keys)
    stored = raw_all(d)
    for dtype in (torch.float32, torch.bfloat16):
        view = LazyFP8View(d, dtype=dtype)
        assert set(view) == set(sd)
        for k in keys:
            want = packed_formula(stored, k, (scheme, fmt)).to(dtype)
            got = view.get_tensor(k)
            assert got.shape == sd[k].shape and torch.equal(bits(got), bits(want)), k
        assert torch.equal(view.get_tensor("norm"), sd["norm"])
    if r.index is not None:
        index = json.loads(open(os.path.join(d, r.index)).read())
        assert set(index["weight_map"]) == set(stored) and set(index["weight_map"].values()) == set(r.files)


def test_asym_int4_of_few_rows(tmp_path):
    w = torch.randn(8, 64)
    save({"l.weight": w}, tmp_path, scheme="int4-asym", group_size=32, config={})
    want = packed_formula(raw_all(tmp_path), "l.weight", ("int4-asym", "compressed-tensors"))
    assert torch.equal(LazyFP8View(tmp_path, dtype=torch.float32).get_tensor("l.weight"), want)


def test_packed_configs_are_the_producers(tmp_path):
    src = Net(tie=False).to(torch.bfloat16)  # up [300, 64], down [64, 300]: down's 300 columns fit no group
    q = ["up.weight"]
    configs = {}
    for scheme, fmt, _ in PACKED_FORMATS:
        d = tmp_path / f"{scheme}-{fmt}"
        save(src, d, scheme=scheme, format=fmt, group_size=32 if scheme.startswith("int4") else None, quantize=q, config={"model_type": "net"})
        configs[scheme, fmt] = json.loads((d / "config.json").read_text())["quantization_config"]
    ct_nvfp4 = configs["nvfp4", "compressed-tensors"]
    assert ct_nvfp4["quant_method"] == "compressed-tensors" and ct_nvfp4["format"] == "nvfp4-pack-quantized"
    assert ct_nvfp4["quantization_status"] == "compressed" and ct_nvfp4["ignore"] == ["down", "lm_head"]
    assert ct_nvfp4["config_groups"]["group_0"]["weights"] == {
        "num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
        "dynamic": False, "scale_dtype": "torch.float8_e4m3fn",
    }
    assert configs["mxfp4", "compressed-tensors"]["config_groups"]["group_0"]["weights"]["scale_dtype"] == "torch.uint8"
    assert configs["mxfp4", "compressed-tensors"]["format"] == "mxfp4-pack-quantized"
    int4 = configs["int4", "compressed-tensors"]
    assert int4["format"] == "pack-quantized" and int4["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert int4["config_groups"]["group_0"]["weights"]["symmetric"] is True
    assert configs["int4-asym", "compressed-tensors"]["config_groups"]["group_0"]["weights"]["symmetric"] is False
    assert configs["nvfp4", "modelopt"] == {
        "quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["down", "lm_head"],
    }
    assert configs["mxfp4", "mxfp4"] == {"quant_method": "mxfp4", "modules_to_not_convert": ["down", "lm_head"]}


def test_packed_default_formats_and_int4_group(tmp_path):
    w = {"a.weight": torch.randn(8, 256)}
    names = {}
    for scheme in ("nvfp4", "mxfp4", "int4"):
        save(w, tmp_path / scheme, scheme=scheme)
        names[scheme] = sorted(raw_all(tmp_path / scheme))
    assert names == {
        "nvfp4": ["a.weight_global_scale", "a.weight_packed", "a.weight_scale"],
        "mxfp4": ["a.weight_blocks", "a.weight_scales"],
        "int4": ["a.weight_packed", "a.weight_scale", "a.weight_shape"],
    }
    assert raw_all(tmp_path / "int4")["a.weight_scale"].shape == (8, 2)  # group 128 by default


@pytest.mark.parametrize("scheme, fmt, group", [f for f in PACKED_FORMATS if f[1] == "compressed-tensors"])
def test_compressed_tensors_decompresses_what_save_writes_bit_for_bit(tmp_path, scheme, fmt, group):
    """compressed-tensors' own model-free decompression, and transformers' from_pretrained
    (CompressedTensorsConfig(dequantize=True), its CPU path), read our files as the view does."""
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    from tests.producers import ct_oracle

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    config = cfg.to_dict() | {"dtype": "bfloat16"}
    r = save(model, tmp_path, scheme=scheme, format=fmt, group_size=group if scheme.startswith("int4") else None, config=config)
    assert len(r.quantized) == 7  # q, k, v, o, gate, up, down; lm_head and embeddings excluded
    for key, want in ct_oracle(str(tmp_path)).items():
        got = LazyFP8View(tmp_path, dtype=want.dtype).get_tensor(key)
        assert torch.equal(bits(got), bits(want)), key
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, output_loading_info=True,
        quantization_config=transformers.CompressedTensorsConfig(dequantize=True),
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    view = LazyFP8View(tmp_path)
    for key, value in hf.state_dict().items():
        assert torch.equal(bits(value), bits(view.get_tensor(key))), key


PACKED_REFUSALS = [
    ({"scheme": "nvfp4", "format": "fp8"}, "nvfp4 is written with format='compressed-tensors' or 'modelopt'"),
    ({"scheme": "int4", "format": "modelopt"}, "int4 is written with format='compressed-tensors'"),
    ({"scheme": "mxfp4", "format": "modelopt"}, "mxfp4 is written with"),
    ({"scheme": "per-tensor", "format": "modelopt"}, "FP8 weights are written with format='fp8' or 'compressed-tensors'"),
    ({"scheme": "block", "block_size": (1, 16), "format": "mxfp4"}, "format='mxfp4' stores 4-bit weights"),
    ({"scheme": "block", "block_size": (128, 128), "group_size": 32}, "group_size= is for the 4-bit schemes"),
    ({"scheme": "nvfp4", "block_size": (1, 16)}, "takes group_size="),
    ({"scheme": "nvfp4", "group_size": 32}, "NVFP4 groups are 16"),
    ({"scheme": "mxfp4", "group_size": 16}, "MXFP4 blocks are 32"),
    ({"scheme": "int4", "group_size": 7}, "group size must be a positive even"),
    ({"scheme": "nvfp4", "ue8m0": True}, "ue8m0= and fp8_dtype= are for FP8 schemes"),
    ({"scheme": "int4", "fp8_dtype": torch.float8_e5m2}, "ue8m0= and fp8_dtype= are for FP8 schemes"),
    ({"scheme": lazyfp8.formats.quantize.NVFP4(divide=False)}, r"pass NVFP4\(divide=True\)"),
    ({"scheme": lazyfp8.formats.quantize.NVFP4(divide=True), "format": "modelopt"}, r"pass NVFP4\(divide=False\)"),
    ({"scheme": "int4", "scales": {"l0.weight": torch.ones(64, 1)}}, "scales= reuses FP8 scales"),
    ({"scheme": "nvfp4", "format": "gguf"}, "format must be one of"),
]


@pytest.mark.parametrize("kwargs, match", PACKED_REFUSALS)
def test_packed_arguments_no_producer_writes_are_refused_before_anything_is_read(tmp_path, monkeypatch, kwargs, match):
    monkeypatch.setattr(lazyfp8.writer, "_materialize", lambda v: pytest.fail("read a tensor"))
    with pytest.raises(ValueError, match=match):
        save({f"l{i}.weight": torch.randn(64, 64) for i in range(2)}, tmp_path / "dst", config={}, **kwargs)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    "scheme, fmt, sd, match",
    [
        ("nvfp4", "compressed-tensors", {"a.weight": torch.ones(4, 24)}, r"'a\.weight' of shape \[4, 24\].*multiple of 16"),
        ("mxfp4", "mxfp4", {"e.gate_up": torch.ones(2, 48, 8)}, r"'e\.gate_up' of shape \[2, 8, 48\].*multiple of 32"),
        ("int4", "compressed-tensors", {"a.weight": torch.ones(64)}, r"'a\.weight' of shape \[64\]"),
        ("nvfp4", "modelopt", {"a.bias_like": torch.ones(4, 32)}, r"'<module>\.weight_scale'; 'a\.bias_like'"),
        ("int4", "compressed-tensors", {"weights": torch.ones(4, 32)}, r"'<module>\.weight_packed'; 'weights'"),
    ],
)
def test_weights_a_format_cannot_store_are_refused_naming_them(tmp_path, monkeypatch, scheme, fmt, sd, match):
    monkeypatch.setattr(lazyfp8.writer, "_materialize", lambda v: pytest.fail("read a tensor"))
    with pytest.raises(ValueError, match=match):
        save(sd, tmp_path / "dst", scheme=scheme, format=fmt, group_size=16 if scheme == "int4" else None,
             quantize=lambda k: True, exclude=())
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    "scheme, fmt, sd, match",
    [
        ("nvfp4", "compressed-tensors", ["l.weight", "l.weight_packed"], "the codes of 'l.weight' would be written as 'l.weight_packed', the name of the tensor 'l.weight_packed'"),
        ("nvfp4", "modelopt", ["l.weight", "l.weight_scale_2"], "the global scale of 'l.weight'"),
        ("mxfp4", "mxfp4", ["w", "w_scales"], "the scale of 'w' would be written as 'w_scales'"),
        ("int4", "compressed-tensors", ["l.weight", "l.weight_shape"], "the shape of 'l.weight'"),
        ("int4-asym", "compressed-tensors", ["l.weight", "l.weight_zero_point"], "the zero point of 'l.weight'"),
    ],
)
def test_a_packed_part_named_like_another_tensor_is_refused(tmp_path, scheme, fmt, sd, match):
    tensors = {k: torch.randn(4, 64) for k in sd}
    with pytest.raises(lazyfp8.SaveError, match=match):
        save(tensors, tmp_path / "dst", scheme=scheme, format=fmt, group_size=32 if scheme.startswith("int4") else None,
             quantize=[f"^{sd[0]}$"], exclude=())
    assert not (tmp_path / "dst").exists()


def test_gpt_oss_experts_round_trip_byte_for_byte(tmp_path):
    """A view of a gpt-oss checkpoint shows its experts as GptOssExperts holds them ([E, in, out]);
    saving them as MXFP4 stores [E, out, in] blocks again, the same bytes (MX re-quantization of
    MX values is exact: every scale comes back)."""
    pytest.importorskip("transformers")  # its oracle; the lowest-versions run has none
    from tests.producers import write_gptoss_mxfp4

    write_gptoss_mxfp4(str(tmp_path / "src"))
    view = LazyFP8View(tmp_path / "src")
    experts = [k for k in view if view.info(k).scale_key is not None]
    assert experts and all(view[k].dim() == 3 for k in experts)
    save(view, tmp_path / "dst", scheme="mxfp4", quantize=set(experts).__contains__, exclude=(), config=dict(view.config))
    a, b = raw_all(tmp_path / "src"), raw_all(tmp_path / "dst")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(bits(a[k]), bits(b[k])), k
