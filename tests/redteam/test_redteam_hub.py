"""Attacks through Hub repo ids and the Hub cache: whatever the id, the revision, or the cache on
disk holds, opening a repo id gives the checkpoint or a LazyFP8Error naming the path, never a
hang, and never a read outside the repo's cache folder.

"Never a read" is checked, not assumed: an audit hook (``sys.addaudithook``) records every file
the process opens while an attack runs, and nothing under the decoy directory ``outside/``
(holding valid checkpoints and refs an attack would steer to) may be among them. Offline
throughout, as in tests/test_hub.py, whose cache builder lays the tree out.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys

import pytest

pytest.importorskip("huggingface_hub")

from lazyfp8 import (
    CorruptCheckpointError,
    LazyFP8Error,
    LazyFP8View,
    MissingShardError,
    UnsafePathError,
)
from lazyfp8.errors import RepoNotCachedError
from lazyfp8.inspection import inspect_checkpoint
from tests.helpers import deadline
from tests.test_hub import COMMIT, add_snapshot, blob_name, cache_with_repo, write_source

_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.abspath(os.fsdecode(args[0])))


sys.addaudithook(_audit)  # process-wide and permanent; inert unless a test records


@contextlib.contextmanager
def recording():
    """The absolute paths of the files opened in the block."""
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


@pytest.fixture(autouse=True)
def _deadline():
    with deadline(120, "opening a repo id hung"):
        yield


@pytest.fixture
def cached(monkeypatch, tmp_path):
    """Offline, ``org/name`` cached at ``COMMIT``: (cache, snapshot)."""
    return cache_with_repo(monkeypatch, tmp_path)


@pytest.fixture
def outside(tmp_path):
    """The decoy: a valid checkpoint, and a ref file holding a valid commit hash, where a path
    leaving the cache would land."""
    decoy = tmp_path / "outside"
    write_source(decoy / "snap", seed=3)
    (decoy / "ref").write_text(COMMIT)
    return decoy


def never_read(opened: list[str], decoy) -> None:
    leaked = [p for p in opened if p.startswith(str(decoy) + os.sep)]
    assert leaked == []


def storage(cache) -> os.PathLike:
    return cache / "models--org--name"


def replace_file(snapshot, name: str, data: bytes) -> None:
    """Give the snapshot's ``name`` new content, as a download of a new blob would."""
    blobs = snapshot.parent.parent / "blobs"
    blob = blobs / blob_name(name, data)
    blob.write_bytes(data)
    link = snapshot / name
    link.unlink()
    os.symlink(os.path.relpath(blob, link.parent), link)


# --- the repo id ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "repo_id",
    ["../outside", "org/..", "..org/name", "org/name..", "org/.name", "org--x/name", "-org/name", "org/name.git",
     "/outside/snap", "//outside/snap", "~/outside", "org/name/../../outside", "org/%2e%2e"],
)
def test_a_repo_id_that_is_a_path_or_invalid_is_only_a_missing_path(repo_id, cached, outside, tmp_path, monkeypatch):
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # where none of these names a file
    with recording() as opened, pytest.raises(MissingShardError) as e:
        LazyFP8View(repo_id)
    assert repo_id in str(e.value) and not isinstance(e.value, RepoNotCachedError)
    never_read(opened, outside)
    never_read(opened, cached[0])  # the cache is not even looked at


# --- the revision -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "revision", ["../../../outside/ref", "refs/../../../../outside/ref", "/abs/ref", "main/", "./main", "a\\..\\b", "", "main\x00"]
)
def test_a_revision_that_is_a_path_is_refused_before_anything_is_read(revision, cached, outside):
    with recording() as opened, pytest.raises(UnsafePathError, match="is not a branch, tag or commit hash") as e:
        LazyFP8View("org/name", revision=revision)
    assert repr(revision) in str(e.value) and e.value.file == "org/name"
    never_read(opened, outside)


# --- the ref file -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content",
    [b"../../../outside/snap", b"", b"not-a-hash", b"A" * 40, b"0" * 41, b"\xff\xfe" * 20, b"0" * 40 + b"\n" + b"1" * 40,
     b"0" * (1 << 20)],
    ids=["path", "empty", "word", "upper-case", "41-hex", "binary", "two-lines", "one-mib"],
)
def test_a_ref_with_garbage_names_the_ref_and_reads_nothing_it_points_to(content, cached, outside):
    ref = storage(cached[0]) / "refs" / "main"
    ref.write_bytes(content)
    with recording() as opened, pytest.raises(CorruptCheckpointError, match="not a 40-hex commit hash") as e:
        LazyFP8View("org/name")
    assert e.value.file == str(ref) and str(ref) in str(e.value) and "delete this file" in str(e.value)
    never_read(opened, outside)
    # The same damage found by inspect: a clear error too (it names the ref).
    with pytest.raises(CorruptCheckpointError, match="refs/main"):
        inspect_checkpoint("org/name")


def test_a_ref_that_links_out_of_the_cache_is_refused_unread(cached, outside):
    ref = storage(cached[0]) / "refs" / "main"
    ref.unlink()
    os.symlink(outside / "ref", ref)
    with recording() as opened, pytest.raises(UnsafePathError, match="is a link out of") as e:
        LazyFP8View("org/name")
    assert e.value.file == str(ref)
    never_read(opened, outside)


def test_a_ref_that_is_a_fifo_or_a_directory_is_refused_without_a_hang(cached):
    refs = storage(cached[0]) / "refs"
    (refs / "main").unlink()
    os.mkfifo(refs / "main")
    with pytest.raises(UnsafePathError, match="not a regular file") as e:
        LazyFP8View("org/name")
    assert e.value.file == str(refs / "main")
    (refs / "v1").mkdir()
    with pytest.raises(UnsafePathError, match="not a regular file"):
        LazyFP8View("org/name", revision="v1")


# --- the snapshot and its files ---------------------------------------------------------------
@pytest.mark.parametrize(
    "shard",
    ["../../blobs/{blob}", "../../../../outside/snap/model-00001-of-00002.safetensors", "{outside}/snap/model-00001-of-00002.safetensors"],
    ids=["into-blobs", "relative-out", "absolute"],
)
def test_an_index_naming_a_shard_outside_the_snapshot_is_refused(shard, cached, outside):
    _, snapshot = cached
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    first = "model-00001-of-00002.safetensors"
    blob = os.path.basename(os.readlink(snapshot / first))
    name = shard.format(blob=blob, outside=outside)
    index["weight_map"] = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
    replace_file(snapshot, "model.safetensors.index.json", json.dumps(index).encode())
    with recording() as opened, pytest.raises(UnsafePathError, match="absolute paths and '..' are refused") as e:
        LazyFP8View("org/name")
    assert e.value.file == str(snapshot / "model.safetensors.index.json") and repr(name) in str(e.value)
    never_read(opened, outside)


@pytest.mark.parametrize("target", ["outside", "other-repo"])
def test_a_snapshot_link_out_of_its_repo_is_refused(target, cached, outside, tmp_path):
    cache, snapshot = cached
    if target == "outside":
        goal = outside / "snap" / "model-00002-of-00002.safetensors"
    else:  # another repo's blob in the same cache: not this repo's files either
        other = add_snapshot(cache, "evil/repo", write_source(tmp_path / "evil", seed=5))
        goal = other / "model-00002-of-00002.safetensors"
    link = snapshot / "model-00002-of-00002.safetensors"
    link.unlink()
    os.symlink(goal, link)
    with recording() as opened, pytest.raises(UnsafePathError, match="link that leaves the checkpoint directory") as e:
        LazyFP8View("org/name")
    assert e.value.file == str(link)
    never_read(opened, outside)
    assert [p for p in opened if "evil" in p] == []


@pytest.mark.parametrize("name", ["model-00002-of-00002.safetensors", "model.safetensors.index.json", "config.json"])
def test_a_missing_blob_behind_a_link_names_the_file_and_how_to_fetch_it(name, cached):
    _, snapshot = cached
    link = snapshot / name
    os.unlink(os.path.realpath(link))  # the link stays, dangling
    with pytest.raises(RepoNotCachedError) as e:
        LazyFP8View("org/name")
    assert isinstance(e.value, (MissingShardError, LazyFP8Error))
    assert str(link) in str(e.value)
    assert f"hf download org/name --revision {COMMIT} --include" in str(e.value)
    if name.endswith(".safetensors"):
        assert e.value.file == str(link) and f"--include {name}" in str(e.value)


def test_a_snapshot_directory_that_links_out_of_the_cache_is_refused_unread(cached, outside):
    _, snapshot = cached
    shutil.rmtree(snapshot)
    os.symlink(outside / "snap", snapshot)
    with recording() as opened, pytest.raises(UnsafePathError, match="not a snapshot in its cache") as e:
        LazyFP8View("org/name")
    assert e.value.file == str(snapshot)
    never_read(opened, outside)


def test_a_blobs_directory_that_links_out_of_the_cache_is_refused_unread(cached, outside):
    blobs = storage(cached[0]) / "blobs"
    shutil.copytree(blobs, outside / "blobs")
    shutil.rmtree(blobs)
    os.symlink(outside / "blobs", blobs)
    with recording() as opened, pytest.raises(UnsafePathError, match=r"blobs/ of org/name is a link out of") as e:
        LazyFP8View("org/name")
    assert e.value.file == str(blobs)
    never_read(opened, outside)


def test_the_recorder_sees_a_read(cached):
    """The audit hook is what the other tests rely on: it does see the files a view reads."""
    _, snapshot = cached
    with recording() as opened:
        LazyFP8View("org/name")
    assert str(snapshot / "model.safetensors.index.json") in opened
