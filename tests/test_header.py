import json
import os
import signal
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open

from lazyfp8 import CorruptCheckpointError, MissingShardError, UnsafePathError, UnsupportedDtypeError
from lazyfp8.storage.header import read_header
from tests.helpers import raw_file, save
from tests.strategies import PASSTHROUGH_DTYPES, random_tensor, shapes


def test_agrees_with_safe_open(tmp_path):
    tensors = {
        "a": torch.randn(3, 4).to(torch.bfloat16),
        "b": torch.zeros(0, 5),
        "c": torch.tensor(2.0),
        "d": torch.randn(7).to(torch.float8_e4m3fn),
    }
    path = save(tensors, str(tmp_path / "m.safetensors"))
    header = read_header(path)
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(header.tensors)
        for k in f.keys():
            sl = f.get_slice(k)
            assert list(header.tensors[k].shape) == sl.get_shape()
            assert header.tensors[k].dtype.code == sl.get_dtype()
    raw = open(path, "rb").read()
    for k, t in tensors.items():
        e = header.tensors[k]
        assert raw[e.offset : e.offset + e.nbytes] == t.reshape(-1).view(torch.uint8).numpy().tobytes()


@given(st.lists(st.tuples(shapes, st.sampled_from(PASSTHROUGH_DTYPES)), min_size=1, max_size=5))
def test_offsets_locate_every_tensor(tmp_path_factory, specs):
    d = tmp_path_factory.mktemp("h")
    tensors = {f"t{i}": random_tensor(s, dt, i) for i, (s, dt) in enumerate(specs)}
    path = save(tensors, str(d / "m.safetensors"))
    header = read_header(path)
    raw = open(path, "rb").read()
    for k, t in tensors.items():
        e = header.tensors[k]
        assert e.shape == tuple(t.shape) and e.dtype.torch == t.dtype
        stored = raw[e.offset : e.offset + e.nbytes]
        assert stored == t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_file_shorter_than_length_prefix(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(CorruptCheckpointError, match="too short"):
        read_header(str(p))


def test_header_length_past_end_of_file(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CorruptCheckpointError, match="past the end") as e:
        read_header(str(p))
    assert e.value.file == str(p)


def test_header_not_json(tmp_path):
    p = raw_file(str(tmp_path / "x.safetensors"), None, header_bytes=b"{not json")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        read_header(p)


def test_header_not_an_object(tmp_path):
    p = raw_file(str(tmp_path / "x.safetensors"), [1, 2])
    with pytest.raises(CorruptCheckpointError, match="JSON object"):
        read_header(p)


def test_duplicate_tensor_name(tmp_path):
    hb = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}'
    p = raw_file(str(tmp_path / "x.safetensors"), None, b"\0\0", header_bytes=hb)
    with pytest.raises(CorruptCheckpointError, match="'a' twice"):
        read_header(p)


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "holds 4 bytes"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "'shape'"),
        ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "'shape'"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "'data_offsets'"),
        ({"dtype": "F32", "shape": [2]}, "'data_offsets'"),
        ({"dtype": 7, "shape": [2], "data_offsets": [0, 8]}, "'dtype'"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "truncated"),
        ("nope", "must be an object"),
    ],
)
def test_bad_entries_name_file_and_key(tmp_path, entry, match):
    p = raw_file(str(tmp_path / "x.safetensors"), {"w": entry}, b"\0" * 8)
    with pytest.raises(CorruptCheckpointError, match=match) as e:
        read_header(p)
    assert e.value.key == "w" and "x.safetensors" in str(e.value) and "'w'" in str(e.value)


def test_overlapping_tensors(tmp_path):
    header = {
        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
        "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
    }
    p = raw_file(str(tmp_path / "x.safetensors"), header, b"\0" * 6)
    with pytest.raises(CorruptCheckpointError, match="overlap"):
        read_header(p)


def test_unknown_dtype(tmp_path):
    p = raw_file(str(tmp_path / "x.safetensors"), {"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0")
    with pytest.raises(UnsupportedDtypeError, match="'F4'") as e:
        read_header(p)
    assert e.value.key == "w"


def test_bad_metadata(tmp_path):
    p = raw_file(str(tmp_path / "x.safetensors"), {"__metadata__": {"a": 1}})
    with pytest.raises(CorruptCheckpointError, match="__metadata__"):
        read_header(p)


def test_metadata_kept(tmp_path):
    p = raw_file(str(tmp_path / "x.safetensors"), {"__metadata__": {"format": "pt"}})
    assert read_header(p).metadata == {"format": "pt"}


@given(st.integers(0, 10_000))
def test_truncation_anywhere_is_detected(tmp_path_factory, cut):
    d = tmp_path_factory.mktemp("t")
    path = save({"a": torch.arange(40, dtype=torch.float32), "b": torch.ones(3, 3)}, str(d / "m.safetensors"))
    data = open(path, "rb").read()
    cut = cut % len(data)
    with open(path, "wb") as f:
        f.write(data[:cut])
    with pytest.raises(CorruptCheckpointError):
        read_header(path)
    assert os.path.getsize(path) == cut


def test_header_json_is_not_what_the_data_says(tmp_path):
    # A header that is valid JSON but declares more tensors than the data holds.
    header = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(3)}
    p = raw_file(str(tmp_path / "x.safetensors"), header, b"\0" * 8)
    with pytest.raises(CorruptCheckpointError, match="'t2'"):
        read_header(p)
    assert json.loads(json.dumps(header))  # the header itself was well-formed


def test_the_header_pins_the_file_it_was_read_from(tmp_path):
    path = save({"a": torch.ones(3)}, str(tmp_path / "m.safetensors"))
    st_ = os.stat(path)
    ident = read_header(path).identity
    assert (ident.device, ident.inode, ident.size, ident.mtime_ns) == (st_.st_dev, st_.st_ino, st_.st_size, st_.st_mtime_ns)


@pytest.mark.parametrize("kind", ["fifo", "directory", "loop"])
def test_only_a_regular_file_is_read(tmp_path, kind):
    # A FIFO used to block the open forever; a directory or a looping link raised a bare OSError.
    p = tmp_path / "m.safetensors"
    {"fifo": os.mkfifo, "directory": os.mkdir, "loop": lambda q: os.symlink(q, q)}[kind](p)
    old = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("blocked opening a FIFO"))
    signal.alarm(10)
    try:
        with pytest.raises(UnsafePathError, match=r"m\.safetensors.*(not a regular file|loops)"):
            read_header(p)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_an_absent_file_is_a_missing_shard(tmp_path):
    with pytest.raises(MissingShardError, match="does not exist") as e:
        read_header(tmp_path / "gone.safetensors")
    assert isinstance(e.value, FileNotFoundError)


@pytest.mark.parametrize("dims", [[2**62], [2**62, 2], [2**31, 2**31, 4]])
def test_a_header_claiming_a_huge_shape_is_refused(tmp_path, dims):
    p = raw_file(str(tmp_path / "x.safetensors"), {"t": {"dtype": "F32", "shape": dims, "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(CorruptCheckpointError, match="'t'"):
        read_header(p)
