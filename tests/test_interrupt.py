"""A converter killed mid-way (SIGKILL: no cleanup code runs) leaves nothing that loads.

``lazyfp8 dequantize``, ``lazyfp8 quantize`` and ``lazyfp8.save`` write every file into a staging
directory ``DST/.lazyfp8.tmp-<pid>/``, then move them into DST, the index last. Each test runs
the real command in a child process on a ~50 MB checkpoint with small ``--max-shard-size`` (~25
shards), kills it at several moments, then checks that the destination holds no index, no file
with a final shard name (``*.safetensors``), and that ``LazyFP8View`` and ``inspect_checkpoint``
both refuse it with ``MissingShardError`` rather than loading part of it.

The staging directory may be left behind: SIGKILL gives the child no chance to remove it. It is
harmless to a reader (a hidden subdirectory: no reader looks for shards or an index there) and the
next save into DST removes it once its process is gone. A rerun with ``--force`` must then succeed
and produce the right checkpoint.

Shards are written in a few milliseconds, so that every kill point comes well before the end
the child is slowed down: a ``sitecustomize`` put on its ``PYTHONPATH`` wraps
``safetensors.torch.save_file`` to sleep after each file (``LAZYFP8_TEST_WRITE_DELAY``). The
command and the code it runs are unchanged. The same hook can SIGKILL the child right after its
N-th shard rename (``LAZYFP8_TEST_KILL_AFTER_RENAMES``), a moment too short to hit by polling.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors import safe_open

import lazyfp8
from lazyfp8 import LazyFP8Error, LazyFP8View, MissingShardError
from lazyfp8.inspection import inspect_checkpoint
from tests.helpers import bits

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# the staging directory ".lazyfp8.tmp-<pid>" (earlier versions: ".<name>.tmp-<pid>" files)
TEMPORARY = re.compile(r"^.+\.tmp-(\d+)$")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOOK = textwrap.dedent(
    """
    import os, signal, time

    if os.environ.get("LAZYFP8_TEST_WRITE_DELAY"):
        import safetensors.torch as _st

        _save_file, _delay = _st.save_file, float(os.environ["LAZYFP8_TEST_WRITE_DELAY"])

        def save_file(*args, **kwargs):
            _save_file(*args, **kwargs)
            time.sleep(_delay)

        _st.save_file = save_file

    if os.environ.get("LAZYFP8_TEST_KILL_AFTER_RENAMES"):
        _replace, _left = os.replace, [int(os.environ["LAZYFP8_TEST_KILL_AFTER_RENAMES"])]

        def replace(src, dst, *args, **kwargs):
            _replace(src, dst, *args, **kwargs)
            if str(dst).endswith(".safetensors"):
                _left[0] -= 1
                if _left[0] == 0:
                    os.kill(os.getpid(), signal.SIGKILL)

        os.replace = replace

    if os.environ.get("LAZYFP8_TEST_KILL_AFTER_OPS"):
        # SIGKILL right after the N-th rename or removal under LAZYFP8_TEST_KILL_DIR.
        _ops, _dir = [int(os.environ["LAZYFP8_TEST_KILL_AFTER_OPS"])], os.environ["LAZYFP8_TEST_KILL_DIR"]

        def _counted(real):
            def op(*args, **kwargs):
                result = real(*args, **kwargs)
                if any(isinstance(a, str) and a.startswith(_dir) for a in args[:2]):
                    _ops[0] -= 1
                    if _ops[0] == 0:
                        os.kill(os.getpid(), signal.SIGKILL)
                return result

            return op

        for _name in ("replace", "rename", "remove", "unlink", "rmdir"):
            setattr(os, _name, _counted(getattr(os, _name)))
    """
)

SAVE_SCRIPT = textwrap.dedent(
    """
    import sys, torch, lazyfp8
    g = torch.Generator().manual_seed(1)
    sd = {f"layers.{i}.mlp.weight": torch.randn(1024, 2048, generator=g).bfloat16() for i in range(24)}
    lazyfp8.save(sd, sys.argv[1], scheme="per-tensor", max_shard_size="2MB", overwrite="--overwrite" in sys.argv)
    """
)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """~50 MB of FP8 weights (24 x 1024 x 2048, per-tensor scales) in 8 shards, plus a bf16
    embedding and a config.json."""
    path = tmp_path_factory.mktemp("interrupt-src")
    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.mlp.weight": torch.randn(1024, 2048, generator=g).bfloat16() for i in range(24)}
    sd["embed.weight"] = torch.randn(256, 1024, generator=g).bfloat16()
    r = lazyfp8.save(sd, path, scheme="per-tensor", max_shard_size="8MB", config={"model_type": "toy"})
    assert r.total_size > 50_000_000 and len(r.quantized) == 24
    return str(path)


@pytest.fixture(scope="module")
def hook_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hook")
    (d / "sitecustomize.py").write_text(HOOK)
    return str(d)


def child_env(hook_dir, **extra):
    env = dict(os.environ)
    env.pop("LAZYFP8_TEST_WRITE_DELAY", None)
    env.pop("LAZYFP8_TEST_KILL_AFTER_RENAMES", None)
    env["PYTHONPATH"] = os.pathsep.join([hook_dir, REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def temporaries(dst):
    return sorted(n for n in os.listdir(dst) if TEMPORARY.match(n)) if os.path.isdir(dst) else []


def staged(dst):
    """Shards written so far into staging directories, under their final names."""
    out = []
    for t in temporaries(dst):
        with contextlib.suppress(OSError):  # the child may be removing it
            out += [f"{t}/{n}" for n in os.listdir(os.path.join(dst, t)) if n.endswith(".safetensors")]
    return sorted(out)


# Kill points: (name, predicate on the destination, pause after each shard file). The pause makes
# every point come long before the child could finish, however slow the machine; a shard itself
# is still written at full speed, so the kill when the second one appears usually lands while
# safetensors is writing it (a partial temporary).
POINTS = [
    ("destination_created", lambda dst: os.path.isdir(dst), 0.05),
    ("second_temporary_shard_appears", lambda dst: len(staged(dst)) >= 2, 0.12),
    ("eight_temporary_shards", lambda dst: len(staged(dst)) >= 8, 0.12),
]


def kill_when(cmd, dst, ready, env, timeout=30.0):
    """Start ``cmd``, SIGKILL it as soon as ``ready(dst)``; fail if it finishes first."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not ready(dst):
            if proc.poll() is not None:
                pytest.fail(f"{cmd} finished (rc {proc.returncode}) before the kill point: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{cmd}: kill point not reached in {timeout} s")
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return proc.pid


def assert_nothing_loads(dst):
    """What an interrupted conversion leaves is not, and does not look like, a checkpoint."""
    names = os.listdir(dst) if os.path.isdir(dst) else []
    assert INDEX not in names
    assert [n for n in names if n.endswith(".safetensors")] == []
    # Left: temporaries (see the module docstring) and the small side files written first.
    assert [n for n in names if not (TEMPORARY.match(n) or n == "config.json")] == []
    with pytest.raises(MissingShardError, match=re.escape(str(dst))):
        LazyFP8View(dst)
    with pytest.raises(MissingShardError):
        inspect_checkpoint(dst)


def assert_same_checkpoint(a, b):
    va, vb = LazyFP8View(a), LazyFP8View(b)
    assert sorted(va) == sorted(vb)
    for k in va:
        assert torch.equal(bits(va.get_tensor(k)), bits(vb.get_tensor(k))), k
    assert inspect_checkpoint(a).problems == []


def interrupt_then_force(tmp_path, hook_dir, cmd, reference, expect_shards):
    """Kill ``cmd + [dst]`` at every point, each in a fresh destination; then rerun ``--force``
    over the leftovers of the last one and compare with ``reference``."""
    for name, ready, delay in POINTS:
        dst = str(tmp_path / name)
        kill_when(cmd(dst), dst, ready, child_env(hook_dir, LAZYFP8_TEST_WRITE_DELAY=delay))
        assert_nothing_loads(dst)
    assert len(staged(dst)) >= 8
    r = subprocess.run(cmd(dst) + ["--force"], cwd=REPO, env=child_env(hook_dir), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(dst, INDEX)) as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) >= expect_shards
    assert_same_checkpoint(dst, reference)
    # the rerun's own temporaries are gone, and so are the killed run's
    assert temporaries(dst) == []
    return dst


def cli(*args):
    return lambda dst: [sys.executable, "-m", "lazyfp8", "-q", *args[:1], args[1], dst, *args[2:]]


def test_dequantize_killed_at_any_point(tmp_path, hook_dir, src):
    reference = tmp_path / "reference"
    lazyfp8.save(LazyFP8View(src), reference, scheme=None, max_shard_size="4MB")
    dst = interrupt_then_force(tmp_path, hook_dir, cli("dequantize", src, "--max-shard-size", "4MB"), reference, 20)
    # bf16 out, the FP8 tensors dequantized
    assert LazyFP8View(dst).info("layers.0.mlp.weight").disk_dtype == torch.bfloat16


def test_quantize_killed_at_any_point(tmp_path, hook_dir, src):
    reference = tmp_path / "reference"
    lazyfp8.save(LazyFP8View(src), reference, scheme="per-tensor", max_shard_size="2MB")
    dst = interrupt_then_force(
        tmp_path, hook_dir, cli("quantize", src, "--scheme", "per-tensor", "--max-shard-size", "2MB"), reference, 20
    )
    assert LazyFP8View(dst).info("layers.0.mlp.weight").disk_dtype == torch.float8_e4m3fn


def test_save_killed_at_any_point(tmp_path, hook_dir):
    def cmd(dst):
        return [sys.executable, "-c", SAVE_SCRIPT, dst]

    for name, ready, delay in POINTS:
        dst = str(tmp_path / name)
        kill_when(cmd(dst), dst, ready, child_env(hook_dir, LAZYFP8_TEST_WRITE_DELAY=delay))
        assert_nothing_loads(dst)
    # save(overwrite=True) over the leftovers
    r = subprocess.run(cmd(dst) + ["--overwrite"], cwd=REPO, env=child_env(hook_dir), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    view = LazyFP8View(dst)
    assert len(view) == 24 and len(view.files) >= 20
    with safe_open(os.path.join(dst, os.path.basename(view.info("layers.5.mlp.weight").file)), "pt") as f:
        assert f.get_tensor("layers.5.mlp.weight").dtype == torch.float8_e4m3fn


def test_force_rerun_leaves_no_temporaries(tmp_path, hook_dir, src):
    dst = str(tmp_path / "dst")
    cmd = cli("quantize", src, "--scheme", "per-tensor", "--max-shard-size", "2MB")
    kill_when(cmd(dst), dst, lambda d: len(staged(d)) >= 3, child_env(hook_dir, LAZYFP8_TEST_WRITE_DELAY=0.12))
    assert temporaries(dst)
    r = subprocess.run(cmd(dst) + ["--force"], cwd=REPO, env=child_env(hook_dir), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert temporaries(dst) == []


def test_killed_between_renames_leaves_nothing_that_loads(tmp_path, hook_dir, src):
    dst = str(tmp_path / "dst")
    cmd = cli("dequantize", src, "--max-shard-size", "4MB")(dst)
    r = subprocess.run(cmd, cwd=REPO, env=child_env(hook_dir, LAZYFP8_TEST_KILL_AFTER_RENAMES=1), timeout=60)
    assert r.returncode == -signal.SIGKILL
    try:
        view = LazyFP8View(dst)
    except LazyFP8Error:
        return  # refused: what must happen
    final = sorted(n for n in os.listdir(dst) if n.endswith(".safetensors"))
    pytest.fail(f"{dst} loads as a checkpoint of {len(view)} of 25 tensors: {final}, no index")


def test_killed_after_several_renames_is_refused(tmp_path, hook_dir, src):
    """Two or more final-named shards and no index: refused (several files, no index)."""
    dst = str(tmp_path / "dst")
    cmd = cli("dequantize", src, "--max-shard-size", "4MB")(dst)
    r = subprocess.run(cmd, cwd=REPO, env=child_env(hook_dir, LAZYFP8_TEST_KILL_AFTER_RENAMES=2), timeout=60)
    assert r.returncode == -signal.SIGKILL
    assert INDEX not in os.listdir(dst)
    with pytest.raises(MissingShardError, match="no model.safetensors.index.json"):
        LazyFP8View(dst)


def snapshot(path):
    """Config, tokenizer and every tensor's bits as read from ``path``, or ``None`` if refused."""
    try:
        with LazyFP8View(path, dtype=torch.float32) as v:
            tokenizer = os.path.join(v._checkpoint.root, "tokenizer.json")
            tok = open(tokenizer, "rb").read() if os.path.exists(tokenizer) else None
            return v.config, tok, {k: bits(v.get_tensor(k)).clone() for k in sorted(v)}
    except LazyFP8Error:
        return None


def same(a, b):
    if a is None or b is None:
        return a is b
    return a[:2] == b[:2] and a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def small_src(path, seed):
    """A bf16 checkpoint of 8 x 256 x 256 weights, a config and a tokenizer, all depending on
    ``seed`` (a model and its fine-tuned version)."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"layers.{i}.mlp.weight": torch.randn(256, 256, generator=g).bfloat16() for i in range(8)}
    lazyfp8.save(sd, path, scheme=None, config={"model_type": "toy", "seed": seed})
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write(json.dumps({"seed": seed}))
    return str(path)


@pytest.mark.parametrize(
    "old, new",
    [
        # the same shard names, other weights: renaming over them under the old index is a mix
        (["--scheme", "per-tensor", "--max-shard-size", "200KB"], ["--scheme", "per-tensor", "--max-shard-size", "200KB"]),
        # transformers reads model.safetensors before the index: it must appear last
        (["--scheme", "block", "--max-shard-size", "200KB"], ["--scheme", "per-tensor"]),
    ],
    ids=["3 shards -> 3 shards of another model", "3 block shards -> single per-tensor"],
)
def test_force_killed_after_every_file_operation_loads_old_new_or_nothing(tmp_path, hook_dir, old, new):
    """``quantize --force`` over an earlier conversion, SIGKILLed right after its k-th rename or
    removal in DST, for every k: DST loads (as this package, transformers and an index-first
    reader would read it) as the old conversion, the new one, or not at all."""
    import shutil

    from lazyfp8.cli import main

    src_old, src_new = small_src(tmp_path / "src-old", 5), small_src(tmp_path / "src-new", 6)
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    assert main(["-q", "quantize", src_old, str(old_dir), *old]) == 0
    assert main(["-q", "quantize", src_new, str(new_dir), *new]) == 0
    want_old, want_new = snapshot(old_dir), snapshot(new_dir)
    assert want_old is not None and not same(want_old, want_new)
    k = 0
    while True:
        k += 1
        dst = str(tmp_path / f"dst-{k}")
        shutil.copytree(old_dir, dst)
        cmd = cli("quantize", src_new, *new, "--force")(dst)
        r = subprocess.run(cmd, cwd=REPO, env=child_env(hook_dir, LAZYFP8_TEST_KILL_AFTER_OPS=k, LAZYFP8_TEST_KILL_DIR=dst),
                           capture_output=True, text=True, timeout=120)
        entries = [dst] + [os.path.join(dst, n) for n in (SINGLE, INDEX) if os.path.lexists(os.path.join(dst, n))]
        for path in entries:
            got = snapshot(path)
            assert got is None or same(got, want_old) or same(got, want_new), f"killed after operation {k}: {path} is a mix"
        if r.returncode == 0:
            break  # k is past the last operation
        assert r.returncode == -signal.SIGKILL, r.stderr
    assert same(snapshot(dst), want_new) and k >= 6
