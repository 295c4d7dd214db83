"""Attacks on the reader: whatever is on disk, and whatever happens to it while a view is open,
the result is the right bytes or a LazyFP8Error naming the file, never a hang, a bare exception
or another file's bytes."""

import json
import os
import threading
import time
import unicodedata

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lazyfp8 import (
    CorruptCheckpointError,
    LazyFP8Error,
    LazyFP8View,
    MissingShardError,
    ShardChangedError,
    UnsafePathError,
)
from lazyfp8.inspection import inspect_checkpoint
from lazyfp8.storage.checkpoint import INDEX_NAME, open_checkpoint
from tests.helpers import deadline, raw_file, save, write_index, write_sharded

T = {"a": torch.arange(4, dtype=torch.float32), "b": torch.zeros(3)}


@pytest.fixture(autouse=True)
def _deadline():
    """Every attack here must end: a hang is a failure, not a stuck suite."""
    with deadline(120, "the reader hung"):
        yield


def _loop(path):
    os.symlink(path, path)


# --- what is on disk ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", INDEX_NAME, "config.json", "s.safetensors"])
def test_a_symlink_loop_anywhere_is_an_unsafe_path(tmp_path, name):
    if name == INDEX_NAME:
        save(T, str(tmp_path / "s1.safetensors"))
    else:
        write_sharded(str(tmp_path), {"s.safetensors": T})
        (tmp_path / name).unlink(missing_ok=True)
    _loop(tmp_path / name)
    with pytest.raises(UnsafePathError, match=rf"{name}: .*link that loops"):
        LazyFP8View(tmp_path)
    report = inspect_checkpoint(tmp_path)
    assert any("link that loops" in p for p in report.problems)


def test_the_checkpoint_path_itself_a_loop(tmp_path):
    _loop(tmp_path / "ck")
    with pytest.raises(UnsafePathError, match="loops"):
        LazyFP8View(tmp_path / "ck")


def test_a_directory_named_model_safetensors(tmp_path):
    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises(UnsafePathError, match=r"model\.safetensors: shard is not a regular file \(mode d"):
        LazyFP8View(tmp_path)


@pytest.mark.parametrize("name", [".", "sub", "sub/"])
def test_an_index_naming_a_directory(tmp_path, name):
    save(T, str(tmp_path / "s.safetensors"))
    (tmp_path / "sub").mkdir()
    write_index(str(tmp_path), {"a": name})
    with pytest.raises(MissingShardError, match="is a directory") as e:
        LazyFP8View(tmp_path)
    assert e.value.key == "a"


@pytest.mark.parametrize("name", [INDEX_NAME, "config.json"])
def test_an_index_naming_a_json_file_as_a_shard(tmp_path, name):
    write_sharded(str(tmp_path), {"s.safetensors": T}, config={"model_type": "x"})
    write_index(str(tmp_path), {"a": name, "b": "s.safetensors"})
    with pytest.raises(CorruptCheckpointError, match=rf"{name}: (header length|file is)"):
        LazyFP8View(tmp_path)


def test_a_hard_linked_shard_under_two_names_reads_right(tmp_path):
    save(T, str(tmp_path / "s1.safetensors"))
    os.link(tmp_path / "s1.safetensors", tmp_path / "s2.safetensors")
    write_index(str(tmp_path), {"a": "s1.safetensors", "b": "s2.safetensors"})
    view = LazyFP8View(tmp_path)
    assert torch.equal(view.get_tensor("a"), T["a"]) and torch.equal(view.get_tensor("b"), T["b"])


@pytest.mark.parametrize("dims", [[2**62], [2**62, 2], [2**40, 2**40], [2**63]])
def test_a_header_claiming_a_huge_shape(tmp_path, dims):
    raw_file(str(tmp_path / "m.safetensors"), {"t": {"dtype": "F8_E4M3", "shape": dims, "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(CorruptCheckpointError, match="'t'"):
        LazyFP8View(tmp_path)


def test_a_huge_empty_tensor_reads_at_once(tmp_path):
    # numel 0, so its byte count checks out: it must not plan 2^41 empty chunks.
    raw_file(str(tmp_path / "m.safetensors"), {"t": {"dtype": "F32", "shape": [2**62, 0], "data_offsets": [0, 0]}})
    view = LazyFP8View(tmp_path)
    start = time.monotonic()
    assert view.get_tensor("t").shape == (2**62, 0)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("metadata", [0, "", [], False, {"k": 1}])
def test_metadata_must_be_null_or_strings(tmp_path, metadata):
    # Was: a falsy non-object (0, "", [], false) accepted as no metadata.
    raw_file(str(tmp_path / "m.safetensors"), {"__metadata__": metadata, "t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(CorruptCheckpointError, match="__metadata__"):
        LazyFP8View(tmp_path)


def test_an_index_of_a_million_entries_fails_fast_and_names_the_first_bad_one(tmp_path):
    save({"t0": torch.ones(2)}, str(tmp_path / "s.safetensors"))
    write_index(str(tmp_path), {f"t{i}": "s.safetensors" for i in range(1_000_000)})
    start = time.monotonic()
    with pytest.raises(CorruptCheckpointError, match="'t1' in s.safetensors, but that shard does not hold it"):
        LazyFP8View(tmp_path)
    assert time.monotonic() - start < 60  # about 4 s on 2 busy cores: linear, not quadratic


def test_names_differing_in_case_or_normalisation_are_different_files(tmp_path):
    # On Linux "café" (NFC), "café" (NFD) and "CAFÉ" are three files: each is read as itself.
    names = [unicodedata.normalize("NFC", "café.safetensors"), unicodedata.normalize("NFD", "café.safetensors"), "CAFÉ.safetensors"]
    shards = {n: {f"t{i}": torch.full((2,), float(i))} for i, n in enumerate(names)}
    write_sharded(str(tmp_path), shards)
    view = LazyFP8View(tmp_path)
    for i, n in enumerate(names):
        assert os.path.basename(view.info(f"t{i}").file) == n
        assert torch.equal(view.get_tensor(f"t{i}"), torch.full((2,), float(i)))


def test_a_file_name_that_is_not_utf8(tmp_path):
    name = os.fsdecode(b"\xff\xfe.safetensors")  # as listdir gives it back: surrogate-escaped
    save(T, os.path.join(str(tmp_path), name))
    view = LazyFP8View(tmp_path)
    assert torch.equal(view.get_tensor("a"), T["a"])
    assert inspect_checkpoint(tmp_path).problems == []


def test_a_path_with_a_nul_byte(tmp_path):
    with pytest.raises(UnsafePathError, match="NUL"):
        LazyFP8View(str(tmp_path) + "\x00x")


@pytest.mark.parametrize("body", ["[" * 100_000 + "]" * 100_000, '{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}"])
def test_json_nested_past_the_recursion_limit(tmp_path, body):
    save(T, str(tmp_path / "s.safetensors"))
    (tmp_path / INDEX_NAME).write_text(body)
    with pytest.raises(CorruptCheckpointError, match="nests too deeply"):
        LazyFP8View(tmp_path)


# --- what happens while a view is open -----------------------------------------------------


def _writer_after(fifo, seconds):
    """Give a reader blocked opening ``fifo`` its writer after ``seconds``: a reader that opens a
    FIFO blocking then fails the test instead of hanging it (an alarm cannot interrupt an open
    made on a worker thread)."""

    def unblock():
        time.sleep(seconds)
        try:
            fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # never blocks, and is a writer
        except OSError:
            return
        time.sleep(1)
        os.close(fd)

    threading.Thread(target=unblock, daemon=True).start()


def _view(tmp_path):
    save({"w": torch.arange(64, dtype=torch.float32)}, str(tmp_path / "model.safetensors"))
    return LazyFP8View(tmp_path), str(tmp_path / "model.safetensors")


def _replace_with(kind):
    def fifo(p):
        os.remove(p)
        os.mkfifo(p)

    def directory(p):
        os.remove(p)
        os.mkdir(p)

    def loop(p):
        os.remove(p)
        _loop(p)

    return {
        "shrunk": lambda p: os.truncate(p, 100),
        "grown": lambda p: open(p, "ab").write(b"\0" * 8),
        "deleted": os.remove,
        "fifo": fifo,
        "directory": directory,
        "loop": loop,
    }[kind]


@pytest.mark.parametrize("kind", ["shrunk", "grown", "deleted", "fifo", "directory", "loop"])
@pytest.mark.parametrize("opened", [False, True])
def test_a_shard_changed_between_header_and_data(tmp_path, kind, opened):
    view, path = _view(tmp_path)
    if opened:
        view.get_tensor("w")
        if kind in ("deleted", "fifo", "directory", "loop"):
            view.close()  # an open descriptor keeps reading the old inode, which is right
    _replace_with(kind)(path)
    if kind == "fifo":
        _writer_after(path, 10)
    with pytest.raises(ShardChangedError, match=r"model\.safetensors: reading 'w': the file changed since the view was opened") as e:
        view.get_tensor("w")
    assert e.value.file == path and e.value.key == "w"


def test_a_shard_deleted_under_an_open_descriptor_still_reads_its_bytes(tmp_path):
    view, path = _view(tmp_path)
    view.get_tensor("w")
    os.remove(path)
    assert torch.equal(view.get_tensor("w"), torch.arange(64, dtype=torch.float32))


def test_a_shard_shrinking_during_a_read_is_not_a_short_read(tmp_path, monkeypatch):
    # Truncated after the per-read fstat, before the bytes: preadv returns 0 at the old offsets.
    from lazyfp8.storage import reader as _reader

    view, path = _view(tmp_path)
    real = _reader.ShardFile.check

    def check_then_truncate(self, key):
        real(self, key)
        os.truncate(path, 50)

    monkeypatch.setattr(_reader.ShardFile, "check", check_then_truncate)
    with pytest.raises(ShardChangedError, match="truncated: it ended after"):
        view.get_tensor("w")


# --- any JSON where JSON is read -------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
_names = st.sampled_from(["s.safetensors", "t.safetensors", "", ".", "..", "/", "gone.safetensors", "s.safetensors\x00",
                          "\ud800.safetensors", "S.safetensors", "./s.safetensors", "config.json", INDEX_NAME])
_maps = st.dictionaries(st.sampled_from(["a", "b", "c", ""]), _names | _json, max_size=4)
_indexes = st.one_of(_json, _maps.map(lambda m: {"weight_map": m}), st.builds(lambda m, x: {"weight_map": m, "metadata": x}, _maps, _json))
_configs = st.one_of(
    st.none(),
    _json,
    st.dictionaries(st.sampled_from(["quantization_config", "transformers_weights", "model_type"]), _json | _names, max_size=3),
    st.builds(lambda qc: {"quantization_config": qc}, st.dictionaries(
        st.sampled_from(["quant_method", "weight_block_size", "config_groups", "quantization", "quant_algo"]),
        _json | st.sampled_from(["fp8", "modelopt", "compressed-tensors", "FP8"]), max_size=4)),
)


@given(index=_indexes, config=_configs)
def test_any_index_and_config_gives_a_view_or_a_lazyfp8_error(tmp_path_factory, index, config):
    d = tmp_path_factory.mktemp("j")
    save(T, str(d / "s.safetensors"))
    save({"c": torch.ones(1)}, str(d / "t.safetensors"))
    (d / INDEX_NAME).write_text(json.dumps(index))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    try:
        view = LazyFP8View(d)
    except LazyFP8Error as e:
        assert e.file is None or isinstance(e.file, str)
        assert ".json" in str(e) or ".safetensors" in str(e) or str(d) in str(e), e
    else:
        for k in view:
            view.get_tensor(k)
    report = inspect_checkpoint(d)  # never raises: everything is a problem line
    assert all(isinstance(p, str) for p in report.problems)


@given(st.binary(max_size=64) | _json.map(lambda x: json.dumps(x).encode()))
def test_any_bytes_as_config_json(tmp_path_factory, body):
    d = tmp_path_factory.mktemp("c")
    write_sharded(str(d), {"s.safetensors": T})
    (d / "config.json").write_bytes(body)
    try:
        LazyFP8View(d)
    except LazyFP8Error as e:
        assert "config.json" in str(e)
    report = inspect_checkpoint(d)
    assert report.tensors == 2


def test_open_checkpoint_collects_instead_of_raising(tmp_path):
    # inspect's contract: every problem is collected, the rest still read.
    write_sharded(str(tmp_path), {"s.safetensors": T})
    (tmp_path / "config.json").write_text("[]")
    problems = []
    ck = open_checkpoint(tmp_path, problems)
    assert set(ck.tensors) == {"a", "b"} and ck.config is None and len(problems) == 1


@given(st.binary(max_size=64) | _json.map(lambda x: json.dumps(x).encode()))
def test_any_bytes_as_hf_quant_config_json(tmp_path_factory, body):
    """ModelOpt's hf_quant_config.json is read when config.json declares nothing: whatever it
    holds, the result is a view or a LazyFP8Error naming that file, and inspect still reports."""
    d = tmp_path_factory.mktemp("q")
    write_sharded(str(d), {"s.safetensors": T}, config={"model_type": "x"})
    (d / "hf_quant_config.json").write_bytes(body)
    try:
        LazyFP8View(d)
    except LazyFP8Error as e:
        assert "hf_quant_config.json" in str(e)
    report = inspect_checkpoint(d)
    assert report.tensors == 2


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_as_hf_quant_config_json_is_refused_not_waited_on(tmp_path):
    write_sharded(str(tmp_path), {"s.safetensors": T}, config={"model_type": "x"})
    os.mkfifo(tmp_path / "hf_quant_config.json")
    with pytest.raises(UnsafePathError, match=r"hf_quant_config\.json.*not a regular file"):
        LazyFP8View(tmp_path)
