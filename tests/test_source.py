"""Reading boxes (one rank's shard) of stored tensors: only their bytes, exactly their values."""

import os
import random
import subprocess
import sys
import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lazyfp8 import LazyFP8View, PerBlock, PerChannel, PerTensor, ShardChangedError, save
from lazyfp8.storage import reader as _reader
from tests.helpers import bits, write_sharded
from tests.helpers import save as save_file

SCHEMES = [None, PerTensor(), PerChannel(), PerBlock((128, 128)), PerBlock((4, 8))]


@st.composite
def boxes(draw):
    shape = draw(st.one_of(
        st.tuples(st.integers(1, 300), st.integers(1, 300)),
        st.tuples(st.integers(1, 4), st.integers(1, 40), st.integers(1, 70)),
        st.tuples(st.integers(1, 500)),
    ))
    offsets, lengths = [], []
    for d in shape:
        o = draw(st.integers(0, d - 1))
        offsets.append(o)
        lengths.append(draw(st.integers(1, d - o)))
    return shape, tuple(offsets), tuple(lengths)


@given(box=boxes(), scheme=st.sampled_from(SCHEMES), chunk=st.integers(1, 4000), dtype=st.sampled_from([torch.bfloat16, torch.float32]))
def test_any_box_equals_the_slice_of_the_whole(tmp_path_factory, box, scheme, chunk, dtype):
    shape, offsets, lengths = box
    if isinstance(scheme, PerChannel) and len(shape) < 2:
        scheme = PerTensor()
    d = tmp_path_factory.mktemp("b")
    fmt = "compressed-tensors" if isinstance(scheme, PerChannel) else "fp8"
    save({"w.weight": torch.randn(shape)}, d, scheme=scheme, format=fmt, quantize=lambda k: scheme is not None, exclude=())
    view = LazyFP8View(d, dtype=dtype, chunk_elements=chunk, block_size=getattr(scheme, "block", None))
    whole = view.get_tensor("w.weight")
    src = view._sources["w.weight"]
    dst = torch.empty(lengths, dtype=whole.dtype)
    src.read_box_into(dst, offsets, lengths)
    index = tuple(slice(o, o + n) for o, n in zip(offsets, lengths))
    assert torch.equal(bits(dst), bits(whole[index].contiguous()))


def test_a_row_shard_reads_only_its_bytes(tmp_path):
    save({"w.weight": torch.randn(512, 256)}, tmp_path, scheme=PerBlock((128, 128)))
    view = LazyFP8View(tmp_path, block_size=(128, 128))
    src = view._sources["w.weight"]
    before = view.bytes_read
    dst = torch.empty(100, 256, dtype=torch.bfloat16)
    src.read_box_into(dst, (300, 0), (100, 256))  # crosses the block boundary at row 384
    data = view.bytes_read - before
    assert data == 100 * 256 + 4 * 4 * 2  # the codes of the box, and the [4, 2] float32 scale


def test_a_column_shard_reads_only_its_bytes(tmp_path):
    save({"w.weight": torch.randn(64, 512)}, tmp_path, scheme=PerTensor())
    view = LazyFP8View(tmp_path)
    before = view.bytes_read
    dst = torch.empty(64, 128, dtype=torch.bfloat16)
    view._sources["w.weight"].read_box_into(dst, (0, 200), (64, 128))
    assert view.bytes_read - before == 64 * 128 + 4


def test_box_outside_the_tensor(tmp_path):
    save({"w": torch.ones(4, 4)}, tmp_path, scheme=None)
    src = LazyFP8View(tmp_path)._sources["w"]
    with pytest.raises(ValueError, match="outside 'w'"):
        src.read_box_into(torch.empty(2, 2), (3, 3), (2, 2))


@pytest.mark.parametrize("scheme", [PerTensor(), PerChannel(), PerBlock((128, 128)), PerBlock((1, 32))])
@pytest.mark.parametrize("threads", [1, 2])
def test_full_size_chunks_bit_exact(tmp_path, scheme, threads, backend):
    # Chunks as large as the default (a 1024 x 1024 weight fits one per worker), where each
    # kernel's scratch buffers live beside the codes in one workspace: they must not overlap.
    from safetensors.torch import load_file

    from lazyfp8.testing import reference

    fmt = "compressed-tensors" if isinstance(scheme, PerChannel) else "fp8"
    save({"w.weight": torch.randn(1024, 1024)}, tmp_path, scheme=scheme, format=fmt, quantize=lambda k: True, exclude=())
    view = LazyFP8View(tmp_path, threads=threads, block_size=getattr(scheme, "block", None))
    got = view.get_tensor("w.weight")
    info = view.info("w.weight")
    codes = load_file(str(tmp_path / "model.safetensors"))["w.weight"]
    ref = reference(codes, view.scale("w.weight"), torch.bfloat16, info.granularity.block_size(codes.shape))
    assert torch.equal(bits(got), bits(ref))


# --- the shard reader: identity, bounded descriptors, fork ----------------------------------
# (``_reader.ShardFile`` is what ``TensorSource`` reads through.)

def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _two_files(tmp_path):
    """``s.safetensors`` (the checkpoint) and ``other.safetensors``: same header, other bytes."""
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(tmp_path / "s.safetensors"))
    save_file({"w": -torch.arange(64, dtype=torch.float32)}, str(tmp_path / "other.safetensors"))
    return tmp_path / "s.safetensors", tmp_path / "other.safetensors"


def test_a_shard_replaced_before_the_first_read_is_refused(tmp_path):
    # Same size, same header: without the identity check the other file's bytes come back as "w".
    shard, other = _two_files(tmp_path)
    view = LazyFP8View(shard)
    os.replace(other, shard)
    with pytest.raises(ShardChangedError, match=r"s\.safetensors: reading 'w': the file changed since the view was opened \(another file now has its name\)") as e:
        view.get_tensor("w")
    assert e.value.file == str(shard) and e.value.key == "w"


def test_a_shard_renamed_over_reads_the_old_file_until_reopened(tmp_path):
    # Our open descriptor still reads the old inode, consistently; a reopen must notice.
    shard, other = _two_files(tmp_path)
    view = LazyFP8View(shard)
    assert torch.equal(view.get_tensor("w"), torch.arange(64, dtype=torch.float32))
    os.replace(other, shard)
    assert torch.equal(view.get_tensor("w"), torch.arange(64, dtype=torch.float32))
    view.close()
    with pytest.raises(ShardChangedError, match="another file now has its name"):
        view.get_tensor("w")


def test_a_shard_rewritten_in_place_is_refused(tmp_path):
    shard, _ = _two_files(tmp_path)
    view = LazyFP8View(shard)
    view.get_tensor("w")  # the descriptor is open: only the per-read fstat can notice
    st = os.stat(shard)
    with open(shard, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\xc0\x7f")  # the last element becomes NaN
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(ShardChangedError, match="modified in place"):
        view.get_tensor("w")


def test_a_link_repointed_after_the_view_was_built_is_refused(tmp_path):
    # The path check passed at construction; the swapped link must not bypass it.
    _two_files(tmp_path)
    ck = tmp_path / "ck"
    ck.mkdir()
    os.symlink(tmp_path / "s.safetensors", ck / "model.safetensors")
    view = LazyFP8View(ck)
    os.remove(ck / "model.safetensors")
    os.symlink(tmp_path / "other.safetensors", ck / "model.safetensors")
    with pytest.raises(ShardChangedError, match="another file"):
        view.get_tensor("w")


def test_a_scale_read_checks_its_shard(tmp_path):
    save({"w.weight": torch.randn(8, 8)}, tmp_path, scheme=PerTensor())
    view = LazyFP8View(tmp_path)
    path = view.info("w.weight").scale_file
    with open(path, "ab") as f:
        f.write(b"\x00")
    with pytest.raises(ShardChangedError, match="has grown"):
        view.scale("w.weight")


def test_the_descriptor_budget_follows_the_limit():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = 128 if soft == resource.RLIM_INFINITY else max(4, min(128, soft // 4))
    assert _reader.default_capacity() == expected


_CHILD_200 = """
import resource, sys, torch
resource.setrlimit(resource.RLIMIT_NOFILE, (100, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from lazyfp8 import LazyFP8View
view = LazyFP8View(sys.argv[1], threads=2)
for i in range(200):
    want = torch.arange(i, i + 16, dtype=torch.float32)
    assert torch.equal(view.get_tensor(f"t{i}"), want), i
print("ok", view.bytes_read)
"""


def test_200_shards_read_under_a_100_descriptor_limit(tmp_path):
    write_sharded(str(tmp_path), {f"s{i:03d}.safetensors": {f"t{i}": torch.arange(i, i + 16, dtype=torch.float32)} for i in range(200)})
    out = subprocess.run([sys.executable, "-c", _CHILD_200, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok", str(200 * 16 * 4)]


@pytest.fixture
def tiny_lru(monkeypatch):
    def set_capacity(n):
        monkeypatch.setattr(_reader._DESCRIPTORS, "capacity", n)
        _reader._DESCRIPTORS.shrink(n)

    return set_capacity


def _many_shards(d, n):
    write_sharded(str(d), {f"s{i:02d}.safetensors": {f"t{i}": torch.arange(1000 * i, 1000 * i + 3000, dtype=torch.int32)} for i in range(n)})
    return {f"t{i}": torch.arange(1000 * i, 1000 * i + 3000, dtype=torch.int32) for i in range(n)}


@given(capacity=st.integers(1, 4), readers=st.integers(2, 6), seed=st.integers(0, 2**16), chunk=st.sampled_from([100, 1000, 5000]))
def test_threads_read_bit_exact_through_a_tiny_lru(tmp_path_factory, tiny_lru, capacity, readers, seed, chunk):
    # Many more shards than descriptors, several readers, chunked reads on the pool too: each
    # descriptor is evicted and reopened under the others; none may be closed mid-read (its
    # number would be reused for another shard and read that one's bytes).
    d = tmp_path_factory.mktemp("lru")
    want = _many_shards(d, 12)
    tiny_lru(capacity)
    view = LazyFP8View(d, chunk_elements=chunk, threads=2)
    errors = []

    def reader(r):
        rng = random.Random(seed + r)
        keys = list(want) * 3
        rng.shuffle(keys)
        try:
            for k in keys:
                assert torch.equal(view.get_tensor(k), want[k]), k
                if rng.random() < 0.1:
                    view.close()  # closes idle descriptors now, busy ones when their read ends
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(r,)) for r in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(_reader._DESCRIPTORS) <= capacity
    view.close()


def test_closing_a_view_closes_its_descriptors(tmp_path):
    want = _many_shards(tmp_path, 6)
    before = _open_fds()
    view = LazyFP8View(tmp_path)
    for k in want:
        view.get_tensor(k)
    assert _open_fds() == before + 6
    view.close()
    assert _open_fds() == before
    del view  # and a view dropped without close gives them back on collection
    view = LazyFP8View(tmp_path)
    view.get_tensor("t0")
    del view
    import gc

    gc.collect()
    assert _open_fds() <= before + 1  # at most one left for the next open to collect


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_reads_even_with_the_lru_lock_held_at_fork(tmp_path):
    want = _many_shards(tmp_path, 4)
    view = LazyFP8View(tmp_path, threads=1)
    view.get_tensor("t0")  # a descriptor in the LRU, inherited by the child
    held, release = threading.Event(), threading.Event()

    def hold_lock():
        try:
            with _reader._DESCRIPTORS._lock:
                held.set()
                release.wait()
        finally:
            held.set()

    t = threading.Thread(target=hold_lock)
    t.start()
    held.wait()
    try:
        pid = os.fork()
        if pid == 0:  # the child: only this thread exists; the lock it inherited is held forever
            code = 1
            try:
                import signal

                signal.alarm(30)
                code = 0 if all(torch.equal(view.get_tensor(k), v) for k, v in want.items()) else 2
            finally:
                os._exit(code)
    finally:
        release.set()
        t.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert torch.equal(view.get_tensor("t1"), want["t1"])  # the parent's descriptors are untouched


def test_a_shard_file_pickles_as_its_path_and_identity(tmp_path):
    import pickle

    shard, other = _two_files(tmp_path)
    view = LazyFP8View(shard)
    f = view._sources["w"].shard
    g = pickle.loads(pickle.dumps(f))
    assert g.path == f.path and g.identity == f.identity and g._token is not f._token
    os.replace(other, shard)
    with pytest.raises(ShardChangedError):
        g.check("w")


# --- platforms without os.preadv -------------------------------------------------------------


def test_reads_choose_a_fallback_where_preadv_is_missing():
    from types import SimpleNamespace

    assert _reader.choose_read_at(SimpleNamespace(preadv=1, pread=1)) is _reader._preadv
    assert _reader.choose_read_at(SimpleNamespace(pread=1)) is _reader._pread
    assert _reader.choose_read_at(SimpleNamespace()) is _reader._seek_read


@pytest.mark.parametrize("read_at", ["_pread", "_seek_read"])
def test_fallback_reads_are_bit_exact(tmp_path, monkeypatch, read_at):
    """Forced fallback (with a tiny step so every read is split): every tensor of a mixed FP8
    checkpoint reads the same bits as with preadv, threads included."""
    g = torch.Generator().manual_seed(5)
    sd = {f"l{i}.weight": torch.randn(300, 200, generator=g) for i in range(3)} | {"norm.weight": torch.randn(200)}
    save(sd, tmp_path / "c", scheme=PerBlock((128, 128)), max_shard_size=100_000)
    want = {k: v.clone() for k, v in LazyFP8View(tmp_path / "c", block_size=(128, 128)).items() for v in [v.materialize()]}
    monkeypatch.setattr(_reader, "_read_at", getattr(_reader, read_at))
    monkeypatch.setattr(_reader, "_FALLBACK_STEP", 4096)
    view = LazyFP8View(tmp_path / "c", block_size=(128, 128), threads=3, chunk_elements=5000)
    assert len(view.files) > 1
    for k, v in want.items():
        assert torch.equal(bits(view.get_tensor(k)), bits(v)), k
