"""The on-disk cache of compiled kernels: written once, used after, never trusted blindly.

Each case runs a fresh interpreter: the kernels are compiled (or loaded) once per process."""

import json
import os
import subprocess
import sys

import pytest

from lazyfp8.kernels import jit as _jit

needs_jit = pytest.mark.skipif(_jit.kernels() is None, reason="compiled kernels unavailable (llvmlite not installed)")


_CACHE_PROBE = """
import json, torch
from lazyfp8.kernels import jit as _jit
k = _jit.kernels()
codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
table = torch.arange(256, dtype=torch.int16) * 7
out = torch.empty(256, dtype=torch.int16)
k.lut16(codes, k.table16(table), out)
print(json.dumps({"from_cache": k.from_cache, "exact": bool(torch.equal(out, table))}))
"""


def _probe(env_extra):
    env = {**os.environ, **env_extra}
    env.pop("LAZYFP8_JIT", None)
    r = subprocess.run([sys.executable, "-c", _CACHE_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@needs_jit
def test_object_cache_is_written_then_used(tmp_path):
    env = {"LAZYFP8_CACHE_DIR": str(tmp_path)}
    assert _probe(env) == {"from_cache": False, "exact": True}
    (cached,) = tmp_path.iterdir()
    stamp = cached.stat().st_mtime_ns
    assert _probe(env) == {"from_cache": True, "exact": True}
    assert cached.stat().st_mtime_ns == stamp, "a cache hit must not rewrite the object"


@needs_jit
def test_damaged_cache_object_is_compiled_again(tmp_path):
    env = {"LAZYFP8_CACHE_DIR": str(tmp_path)}
    _probe(env)
    (cached,) = tmp_path.iterdir()
    blob = bytearray(cached.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte in the machine code
    cached.write_bytes(bytes(blob))
    assert _probe(env) == {"from_cache": False, "exact": True}
    assert _probe(env) == {"from_cache": True, "exact": True}, "the recompiled object replaces the damaged one"


@needs_jit
def test_cache_off_or_unwritable_still_compiles(tmp_path):
    assert _probe({"LAZYFP8_CACHE_DIR": ""}) == {"from_cache": False, "exact": True}
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert _probe({"LAZYFP8_CACHE_DIR": str(blocker / "sub")}) == {"from_cache": False, "exact": True}


@needs_jit
def test_cache_writable_by_others_is_not_trusted(tmp_path):
    env = {"LAZYFP8_CACHE_DIR": str(tmp_path / "c")}
    _probe(env)
    (cached,) = (tmp_path / "c").iterdir()
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o700 and cached.stat().st_mode & 0o777 == 0o600
    cached.chmod(0o666)  # anyone could have replaced the machine code
    assert _probe(env)["from_cache"] is False
    cached.chmod(0o600)
    (tmp_path / "c").chmod(0o777)  # or the directory's entries
    assert _probe(env)["from_cache"] is False
