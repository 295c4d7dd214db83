"""One checkpoint read from many threads at once gives what one thread reading it alone gives.

A view shares one descriptor per shard between every reader (``os.preadv`` at explicit offsets,
no file position, no mmap), splits each tensor's chunks over lazyfp8's own shared thread pool,
and gives each chunk worker its own buffers. These tests hammer that from outside: 6 workers,
each reading every (view, key, mode) once in its own shuffled order, so that the same key is read
by several threads at the same moment, through ``get_tensor`` and ``copy_`` into preallocated
destinations (same dtype: read in place; float32: staged; non-contiguous: materialized), on four
views of the same files with different ``chunk_elements``. Every result must be bit-identical
to a serial read. Then several models loaded at once from one view.
"""

from __future__ import annotations

import concurrent.futures
import faulthandler
import multiprocessing
import os
import pickle
import random
import select
import signal
import subprocess
import sys
import threading
import time
import traceback

import pytest
import torch
from torch import nn

from lazyfp8 import LazyFP8View, PerBlock, init_empty_weights, load_into, save
from tests.helpers import ViewDataset, bits

WORKERS = 6  # each reads every (view, key, mode) once, in its own shuffled order
CHUNKS = (1000, 8192, 50_000, None)  # None: the default; 1000 cuts 520-wide rows at 384 (block 128)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(300, 192)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(192, 520), "down": nn.Linear(520, 192, bias=False), "norm": nn.LayerNorm(192)})
            for _ in range(3)
        )
        self.lm_head = nn.Linear(192, 300, bias=False)


@pytest.fixture(scope="module", params=["per-tensor", "block"])
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    model = Toy().to(torch.bfloat16)
    path = tmp_path_factory.mktemp(f"concurrent-{request.param}")
    scheme = PerBlock((128, 128)) if request.param == "block" else "per-tensor"
    r = save(model, path, scheme=scheme, config={"model_type": "toy"}, max_shard_size=300_000)
    assert len(r.files) >= 4 and r.quantized
    return str(path)


def views(path):
    return [LazyFP8View(path) if c is None else LazyFP8View(path, chunk_elements=c) for c in CHUNKS]


def serial(path):
    """The reference: one thread, lazyfp8's chunk pool not used (``threads=1``)."""
    with LazyFP8View(path, threads=1) as v:
        return {k: v.get_tensor(k) for k in v}


def read(view, key, mode):
    """One read, as a user would do it."""
    lazy = view[key]
    if mode == "get_tensor":
        return view.get_tensor(key)
    if mode == "copy_same_dtype":  # read (and dequantize) straight into the destination
        dst = torch.empty(lazy.shape, dtype=lazy.dtype)
        dst.copy_(lazy)
        return dst
    if mode == "copy_float32":  # another dtype: through a chunk-sized staging buffer
        dst = torch.full(lazy.shape, float("nan"), dtype=torch.float32)
        with torch.no_grad():
            dst.copy_(lazy)
        return dst
    if mode == "copy_non_contiguous":
        if len(lazy.shape) < 2:
            return read(view, key, "copy_same_dtype")
        dst = torch.empty(tuple(reversed(lazy.shape)), dtype=lazy.dtype).t()
        assert not dst.is_contiguous()
        dst.copy_(lazy)
        return dst
    raise AssertionError(mode)


MODES = ("get_tensor", "copy_same_dtype", "copy_float32", "copy_non_contiguous")


def expected(ref, key, mode):
    t = ref[key]
    return t.to(torch.float32) if mode == "copy_float32" and t.is_floating_point() else t


def test_threads_read_bit_identical_to_a_serial_read(checkpoint):
    ref = serial(checkpoint)
    vs = views(checkpoint)  # fresh views: the shard descriptors are opened by the racing threads
    jobs = [(i, k, m) for i in range(len(vs)) for k in ref for m in MODES]
    barrier = threading.Barrier(WORKERS)
    in_flight: dict[str, int] = {}
    overlap = {"max": 0}
    lock = threading.Lock()

    def worker(w):
        order = list(jobs)
        random.Random(w).shuffle(order)
        barrier.wait()  # start together
        wrong = []
        for i, key, mode in order:
            with lock:
                in_flight[key] = in_flight.get(key, 0) + 1
                overlap["max"] = max(overlap["max"], in_flight[key])
            try:
                got = read(vs[i], key, mode)
            finally:
                with lock:
                    in_flight[key] -= 1
            want = expected(ref, key, mode)
            if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(bits(got), bits(want)):
                wrong.append((CHUNKS[i], key, mode))
        return len(order), wrong

    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(worker, range(WORKERS)))
    assert [w for _, wrong in results for w in wrong] == []
    assert sum(n for n, _ in results) == WORKERS * len(jobs)
    assert overlap["max"] >= 2, "no key was ever read by two threads at once; the test proves nothing"


def test_threads_share_one_lazy_value(checkpoint):
    """The same LazyTensor object copied into many destinations from many threads at once."""
    ref = serial(checkpoint)
    view = LazyFP8View(checkpoint, chunk_elements=1000)
    key = max(ref, key=lambda k: ref[k].numel() if view.info(k).scale_key else -1)
    assert view.info(key).scale_key is not None
    lazy = view[key]
    barrier = threading.Barrier(WORKERS)

    def worker(_):
        barrier.wait()
        outs = []
        for _ in range(6):
            dst = torch.empty(lazy.shape, dtype=lazy.dtype)
            dst.copy_(lazy)
            outs.append(dst)
        return outs

    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        outs = [t for ts in pool.map(worker, range(WORKERS)) for t in ts]
    assert len(outs) == WORKERS * 6
    assert all(torch.equal(bits(t), bits(ref[key])) for t in outs)


@pytest.mark.parametrize("kind", ["meta", "in_place"])
def test_concurrent_load_into_models_from_one_view(checkpoint, kind):
    """Four models loaded at the same time from one view: on the meta device (load_into allocates
    each parameter) or real (each parameter filled in place, as load_state_dict does)."""
    ref = serial(checkpoint)
    view = LazyFP8View(checkpoint, chunk_elements=5000, threads=2)
    if kind == "meta":
        with init_empty_weights():
            models = [Toy().to(torch.bfloat16) for _ in range(4)]
    else:
        models = [Toy().to(torch.bfloat16) for _ in range(4)]
    barrier = threading.Barrier(len(models))

    def load(model):
        barrier.wait()
        return load_into(model, view)

    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        results = list(pool.map(load, models))
    for model, r in zip(models, results):
        # lm_head is not tied in Toy, so every key is in the checkpoint
        assert r.missing_keys == [] and r.unexpected_keys == []
        state = model.state_dict()
        assert set(state) == set(ref)
        for k, t in state.items():
            assert not t.is_meta, k
            assert torch.equal(bits(t), bits(ref[k])), k


def test_load_state_dict_into_parameters_that_require_grad(tmp_path):
    """Not a race: any tensor of more than one chunk, read with threads > 1 into a parameter
    (``requires_grad=True``), fails. With the default chunk (2M elements) that is every weight
    above 2M elements, i.e. ``model.load_state_dict(view)`` of any real model."""
    torch.manual_seed(0)
    src = nn.Linear(256, 512).to(torch.bfloat16)
    save(src, tmp_path, scheme="per-tensor")
    view = LazyFP8View(tmp_path, chunk_elements=5000, threads=2)
    dst = nn.Linear(256, 512).to(torch.bfloat16)
    dst.load_state_dict(view)
    assert torch.equal(bits(dst.weight.detach()), bits(view.get_tensor("weight")))


POOL_RACE = r"""
import concurrent.futures, sys, tempfile, threading
import torch, lazyfp8
d = tempfile.mkdtemp()
lazyfp8.save({"w": torch.randn(256, 512)}, d, scheme="per-tensor")
want = lazyfp8.LazyFP8View(d).get_tensor("w")
barrier = threading.Barrier(8)
def worker(i):
    views = [lazyfp8.LazyFP8View(d, threads=t, chunk_elements=512) for t in range(2 + i, 64, 8)]
    barrier.wait()
    failures = []
    for v in views:
        for _ in range(3):
            try:
                assert torch.equal(v.get_tensor("w"), want)
            except RuntimeError as e:
                failures.append(e)
    return failures
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    failures = [f for fs in pool.map(worker, range(8)) for f in fs]
print(f"{len(failures)} failed reads", *sorted({str(f) for f in failures}), sep="\n")
sys.exit(1 if failures else 0)
"""


def test_views_with_different_thread_counts_read_at_once():
    """Views with different ``threads=`` (or, on a machine with more than 2 CPUs, one view reading
    tensors of different chunk counts) read from several threads at once. In a fresh process:
    the race is in the growth of lazyfp8's process-wide pool, which happens only a few times per
    process."""
    r = subprocess.run([sys.executable, "-c", POOL_RACE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# --- fork -------------------------------------------------------------------------------------
# A forked child has only the thread that forked. lazyfp8's pool, locks and compiled kernels must
# work there as if fresh. Every child runs under a deadline: a hang fails the test, not the suite.
# Each child first sets torch.set_num_threads(1), as torch.utils.data workers do: torch's own
# OpenMP pool (libgomp) does not survive a fork, and any parallel torch op (torch.equal of a few
# million elements) on the thread that forked hangs inside torch, with or without lazyfp8.


def run_forked(fn, timeout=60.0):
    """``fn()`` in a child made by ``os.fork``; returns what it returns (through a pipe), raises
    what it raised, and fails if it has not finished within ``timeout`` seconds."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave at once, never back into pytest
        code = 1
        try:
            os.close(r)
            # A hang shows where: every thread's stack on stderr shortly before the deadline.
            faulthandler.dump_traceback_later(max(timeout - 2, 1), exit=True)
            torch.set_num_threads(1)
            try:
                out = pickle.dumps(("ok", fn()))
                code = 0
            except BaseException:
                out = pickle.dumps(("error", traceback.format_exc()))
            with os.fdopen(w, "wb") as f:
                f.write(out)
        finally:
            os._exit(code)
    os.close(w)
    deadline = time.monotonic() + timeout
    data = b""
    with os.fdopen(r, "rb", buffering=0) as f:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([f], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"the forked child did not finish within {timeout} s (a hang)")
            chunk = f.read(1 << 16)
            if not chunk:
                break
            data += chunk
    os.waitpid(pid, 0)
    status, value = pickle.loads(data)
    if status != "ok":
        pytest.fail(f"the forked child failed:\n{value}")
    return value


def wrong_keys(view, ref):
    """The keys of ``view`` whose values are not bit-identical to ``ref``'s."""
    return [k for k in ref if not torch.equal(bits(view.get_tensor(k)), bits(ref[k]))]


def busy_view(path):
    """A view whose reads split over lazyfp8's pool, after enough reads that the pool's threads
    sit idle (an idle thread is what a forked child's copy of the pool waits for in vain)."""
    view = LazyFP8View(path, chunk_elements=1000, threads=4)
    for _ in range(2):
        for k in view:
            view.get_tensor(k)
    time.sleep(0.05)
    return view


def test_forked_child_reads_bit_identical(checkpoint):
    ref = serial(checkpoint)
    view = busy_view(checkpoint)
    assert run_forked(lambda: wrong_keys(view, ref)) == []
    fresh = LazyFP8View(checkpoint, chunk_elements=1000, threads=4)  # opened in the child's copy
    assert run_forked(lambda: wrong_keys(fresh, ref)) == []
    assert wrong_keys(view, ref) == []  # and the parent goes on as before


def test_fork_while_other_threads_read(checkpoint):
    """Forks while another thread of the parent is in the middle of reads (the pool's lock, the
    descriptors and the workers' buffers in use at that moment)."""
    ref = serial(checkpoint)
    view = busy_view(checkpoint)
    stop, reading = threading.Event(), threading.Event()
    errors = []

    def reader():
        try:
            while not stop.is_set():
                for k in ref:
                    reading.set()
                    view.get_tensor(k)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        reading.wait(10)
        for i in range(6):
            time.sleep(0.003 * i)
            assert run_forked(lambda: wrong_keys(view, ref)) == []
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == []


def test_fork_while_a_thread_holds_the_pool_lock(checkpoint):
    """The deterministic case: the pool's lock is held by another thread at the moment of the
    fork (a thread inside ``_get_pool``); the child must not wait for it."""
    from lazyfp8.kernels import parallel as _parallel

    ref = serial(checkpoint)
    view = LazyFP8View(checkpoint, chunk_elements=1000, threads=4)
    held, release = threading.Event(), threading.Event()

    def hold():
        with _parallel._lock:
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        held.wait(10)
        assert run_forked(lambda: wrong_keys(view, ref), timeout=30) == []
    finally:
        release.set()
        t.join()


def test_dataloader_fork_workers(checkpoint):
    ref = serial(checkpoint)
    loader = torch.utils.data.DataLoader(
        ViewDataset(busy_view(checkpoint)), batch_size=None, num_workers=2, multiprocessing_context="fork", timeout=60
    )
    got = dict(loader)  # a hung worker raises "DataLoader timed out" instead of hanging
    assert sorted(got) == sorted(ref)
    assert [k for k in ref if not torch.equal(bits(got[k]), bits(ref[k]))] == []


_FORKED_VIEW = None


def _read_inherited(key):
    return key, _FORKED_VIEW.get_tensor(key)


def test_multiprocessing_fork_pool(checkpoint):
    """Workers that inherit the view through the fork (only keys are pickled)."""
    global _FORKED_VIEW
    ref = serial(checkpoint)
    _FORKED_VIEW = busy_view(checkpoint)
    try:
        with multiprocessing.get_context("fork").Pool(2, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            got = dict(pool.map_async(_read_inherited, sorted(ref)).get(timeout=60))
    finally:
        _FORKED_VIEW = None
    assert [k for k in ref if not torch.equal(bits(got[k]), bits(ref[k]))] == []
