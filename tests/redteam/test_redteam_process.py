"""Attacks on process safety: fork at awkward moments, pickle and copy views and lazy values, and
send them through torch.save, managers and DCP readers. Every outcome is the right bits or a
LazyFP8Error naming the file; no child may hang (each runs under a deadline)."""

import copy
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lazyfp8
from lazyfp8 import (
    LazyFP8StorageReader,
    LazyFP8View,
    MissingShardError,
    ShardChangedError,
    TensorNotFoundError,
)
from lazyfp8.kernels import jit as _jit
from tests.helpers import bits
from tests.test_concurrency import run_forked, wrong_keys


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Several shards of block-scaled FP8 weights and a plain tensor."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("process")
    tensors = {f"layers.{i}.w": torch.randn(384, 256) for i in range(3)} | {"norm": torch.randn(256)}
    lazyfp8.save(tensors, path, scheme=lazyfp8.PerBlock((128, 128)), max_shard_size=300_000)
    return str(path)


def reference(path):
    with LazyFP8View(path, threads=1) as v:
        return {k: v.get_tensor(k) for k in v}


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


# --- pickle, then the checkpoint changes ----------------------------------------------------------
def test_unpickle_after_the_checkpoint_was_deleted(ckpt, tmp_path):
    path = copy_checkpoint(ckpt, tmp_path / "c")
    data = pickle.dumps(LazyFP8View(path)["layers.0.w"])
    shutil.rmtree(path)
    with pytest.raises(MissingShardError, match=os.path.basename(path)):
        pickle.loads(data)


def test_unpickle_after_a_shard_was_replaced_by_an_identical_copy(ckpt, tmp_path):
    """Same bytes, another file: refused, like a read through the pickled view would be (the
    pickle pins each shard's identity, not its content)."""
    path = copy_checkpoint(ckpt, tmp_path / "c")
    view = LazyFP8View(path)
    data = pickle.dumps(view)
    shard = view.files[0]
    shutil.copy(shard, shard + ".tmp")
    os.replace(shard + ".tmp", shard)
    with pytest.raises(ShardChangedError, match=os.path.basename(shard)):
        pickle.loads(data)


def test_unpickle_after_a_shard_was_truncated(ckpt, tmp_path):
    path = copy_checkpoint(ckpt, tmp_path / "c")
    view = LazyFP8View(path)
    data = pickle.dumps(view)
    shard = view.files[-1]
    os.truncate(shard, os.path.getsize(shard) // 2)
    with pytest.raises(lazyfp8.CheckpointError, match=os.path.basename(shard)):
        pickle.loads(data)


def test_unpickle_after_the_index_names_other_shards(ckpt, tmp_path):
    """The checkpoint was re-sharded under the same directory: the shards the pickle pinned are
    gone from the index."""
    path = copy_checkpoint(ckpt, tmp_path / "c")
    data = pickle.dumps(LazyFP8View(path))
    for f in os.listdir(path):
        if f.endswith(".safetensors") or f.endswith(".json"):
            os.remove(os.path.join(path, f))
    lazyfp8.save(reference(ckpt), path)  # one shard now, plain tensors
    with pytest.raises(ShardChangedError, match="changed since the view was pickled"):
        pickle.loads(data)


def test_deepcopy_of_a_value_whose_checkpoint_is_gone(ckpt, tmp_path):
    path = copy_checkpoint(ckpt, tmp_path / "c")
    lazy = LazyFP8View(path)["norm"]
    shutil.rmtree(path)
    with pytest.raises(MissingShardError):
        copy.deepcopy(lazy)
    assert copy.copy(lazy).key == "norm"  # a shallow copy reads nothing


# --- what pickling carries ------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_pickle_protocol(ckpt, protocol):
    view = LazyFP8View(ckpt, key_mapping={r"^layers\.": "model.layers."}, dtype=torch.float32)
    lazy = pickle.loads(pickle.dumps(view["model.layers.1.w"], protocol))
    assert torch.equal(bits(lazy.materialize()), bits(view.get_tensor("model.layers.1.w")))


def test_a_view_opened_by_a_relative_path_unpickles_in_another_directory(ckpt, monkeypatch, tmp_path):
    monkeypatch.chdir(os.path.dirname(ckpt))
    data = pickle.dumps(LazyFP8View(os.path.basename(ckpt)))
    monkeypatch.chdir(tmp_path)
    assert wrong_keys(pickle.loads(data), reference(ckpt)) == []


def test_a_closed_view_pickles_and_reopens(ckpt):
    view = LazyFP8View(ckpt)
    view.close()
    again = pickle.loads(pickle.dumps(view))
    assert wrong_keys(again, reference(ckpt)) == []


def test_a_remapped_copy_leaves_the_original_and_its_hints_alone(ckpt):
    view = LazyFP8View(ckpt)
    with pytest.raises(TensorNotFoundError, match="did you mean 'layers.0.w'"):
        view["layers.0.ww"]  # builds the original's hint index
    other = view.remap({r"^layers\.": "model.layers."})
    with pytest.raises(TensorNotFoundError, match="did you mean 'model.layers.0.w'"):
        other["model.layers.0.ww"]
    with pytest.raises(TensorNotFoundError, match="on-disk name of 'model.layers.0.w'"):
        other["layers.0.w"]
    assert "layers.0.w" in view and "model.layers.0.w" not in view


def test_torch_save_of_a_view_is_a_reference(ckpt, tmp_path):
    """A view is a handle on files, not data: torch.save keeps it as one. weights_only loads
    refuse it with torch's own message; a full load reopens the checkpoint."""
    view = LazyFP8View(ckpt)
    torch.save(view, tmp_path / "v.pt")
    with pytest.raises(pickle.UnpicklingError, match="lazyfp8"):
        torch.load(tmp_path / "v.pt", weights_only=True)
    again = torch.load(tmp_path / "v.pt", weights_only=False)
    assert isinstance(again, LazyFP8View) and wrong_keys(again, reference(ckpt)) == []


def test_torch_save_of_a_state_dict_of_lazy_values(ckpt, tmp_path):
    view = LazyFP8View(ckpt)
    torch.save(dict(view), tmp_path / "sd.pt")
    sd = torch.load(tmp_path / "sd.pt", weights_only=True)
    ref = reference(ckpt)
    assert all(type(t) is torch.Tensor for t in sd.values())
    assert [k for k in ref if not torch.equal(bits(sd[k]), bits(ref[k]))] == []


def test_dcp_storage_reader_pickles_before_and_after_opening(ckpt):
    reader = LazyFP8StorageReader(ckpt, key_mapping={r"^layers\.": "model.layers."})
    fresh = pickle.loads(pickle.dumps(reader))
    assert fresh._view is None and "model.layers.0.w" in fresh.view
    reader.view  # noqa: B018 - open it
    opened = pickle.loads(pickle.dumps(reader))
    assert opened.view is not reader.view
    assert torch.equal(bits(opened.view.get_tensor("model.layers.2.w")), bits(reader.view.get_tensor("model.layers.2.w")))


def test_views_and_values_through_a_manager(ckpt):
    """A multiprocessing Manager holds views and lazy values by pickle, in its own process."""
    ref = reference(ckpt)
    view = LazyFP8View(ckpt, threads=2, chunk_elements=1000)
    with multiprocessing.get_context("fork").Manager() as manager:
        shared = manager.dict()
        shared["view"] = view
        shared["lazy"] = view["layers.1.w"]
        back, lazy = shared["view"], shared["lazy"]
        namespace = manager.Namespace()
        namespace.view = view
        assert len(namespace.view) == len(view)
    assert wrong_keys(back, ref) == []
    assert torch.equal(bits(lazy.materialize()), bits(ref["layers.1.w"]))


# --- fork at awkward moments ---------------------------------------------------------------------
def test_fork_while_a_compile_is_in_progress(ckpt, monkeypatch):
    """Another thread is generating machine code when the process forks: the fork waits for it,
    and the child has working kernels instead of a held lock (or a half-run LLVM)."""
    if _jit.kernels() is None:
        pytest.skip("compiled kernels unavailable (llvmlite not installed)")
    from lazyfp8.kernels import ir as _ir

    ref = reference(ckpt)
    view = LazyFP8View(ckpt, threads=2, chunk_elements=5000)
    started = threading.Event()
    real = _ir.assemble

    def slow_assemble(*args, **kwargs):
        started.set()
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(_ir, "assemble", slow_assemble)
    _jit._compile.cache_clear()
    compiling = threading.Thread(target=_jit.kernels)
    compiling.start()
    try:
        assert started.wait(30)
        assert run_forked(lambda: (_jit.kernels() is not None, wrong_keys(view, ref)), timeout=60) == (True, [])
    finally:
        compiling.join(60)
    assert _jit.kernels() is not None


FORK_UNDER_THE_COMPILE_LOCK = r"""
import os, sys, torch
from lazyfp8.kernels import jit as _jit
with _jit._compile_lock:  # e.g. a signal handler that forks, run while this thread compiles
    pid = os.fork()
    if pid == 0:
        torch.set_num_threads(1)
        os._exit(0 if _jit.kernels() is not None or _jit._mode() == "off" else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_fork_from_the_thread_that_holds_the_compile_lock():
    """The fork hook takes the compile lock; a thread that already holds it must not deadlock."""
    r = subprocess.run([sys.executable, "-c", FORK_UNDER_THE_COMPILE_LOCK], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@settings(max_examples=8, deadline=None)
@given(
    reads_before=st.integers(0, 3),
    readers=st.integers(0, 3),
    delay_ms=st.integers(0, 20),
    threads=st.sampled_from([1, 2, 4]),
    fork_from_a_thread=st.booleans(),
)
def test_fork_points(ckpt, reads_before, readers, delay_ms, threads, fork_from_a_thread):
    """Fork after any number of reads, while any number of threads read, from the main thread or
    another one: the child reads every tensor bit-exactly and the parent goes on."""
    ref = reference(ckpt)
    view = LazyFP8View(ckpt, threads=threads, chunk_elements=1000)
    for _ in range(reads_before):
        view.get_tensor("layers.0.w")
    stop = threading.Event()
    errors = []

    def read_until_stopped():
        try:
            while not stop.is_set():
                wrong_keys(view, ref)
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=read_until_stopped) for _ in range(readers)]
    for w in workers:
        w.start()
    try:
        time.sleep(delay_ms / 1000)
        if fork_from_a_thread:
            out = []
            forker = threading.Thread(target=lambda: out.append(run_forked(lambda: wrong_keys(view, ref), timeout=60)))
            forker.start()
            forker.join(90)
            assert out == [[]]
        else:
            assert run_forked(lambda: wrong_keys(view, ref), timeout=60) == []
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    assert errors == []
    assert wrong_keys(view, ref) == []


def test_a_child_closing_the_view_leaves_the_parents_reads_alone(ckpt):
    ref = reference(ckpt)
    view = LazyFP8View(ckpt, threads=2, chunk_elements=1000)
    assert wrong_keys(view, ref) == []  # descriptors open in the parent

    def child():
        view.close()
        return wrong_keys(view, ref)  # reopens in the child

    assert run_forked(child) == []
    assert wrong_keys(view, ref) == []


def test_fork_inside_a_pool_worker_of_a_spawned_parent(ckpt):
    """A view unpickled in a spawned worker, read there, then forked from there."""
    view = LazyFP8View(ckpt, threads=2, chunk_elements=1000)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result = pool.apply_async(_read_then_fork, (view,)).get(timeout=300)
    assert result == 0


def _read_then_fork(view):
    torch.set_num_threads(1)
    for k in view:
        view.get_tensor(k)
    pid = os.fork()
    if pid == 0:
        for k in view:
            view.get_tensor(k)
        os._exit(0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return "hung"
