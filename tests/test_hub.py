"""Hub repo ids through huggingface_hub's cache (``lazyfp8.storage.hub``), with the real
huggingface_hub and no network.

The cache is written as huggingface_hub documents it (guides/manage-cache): per repo
``models--org--name/`` with ``blobs/<hash>`` holding each file once, ``refs/<branch>`` holding a
commit hash, and ``snapshots/<commit>/<name>`` relative links into ``blobs/``. huggingface_hub's
own ``scan_cache_dir`` and ``try_to_load_from_cache`` check that it reads the tree as its own.
Every test runs offline (``HF_HUB_OFFLINE=1``; no test reaches the network), so what is checked is
the cache path: downloads are never exercised here.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
import subprocess
import sys

import pytest
import torch

pytest.importorskip("huggingface_hub")
import huggingface_hub.constants
import huggingface_hub.file_download
import huggingface_hub.utils

import lazyfp8
from lazyfp8 import LazyFP8View, testing
from lazyfp8.errors import LazyFP8Error, MissingShardError, RepoNotCachedError
from lazyfp8.inspection import inspect_checkpoint
from lazyfp8.storage.checkpoint import _fetch_weights
from lazyfp8.storage.hub import HubRepo, HubSource, _literal, is_repo_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"
CONFIG = {"model_type": "llama"}


def state_dict(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(128, 128, generator=g),
        "other.weight": torch.randn(64, 128, generator=g),
        "norm.weight": torch.randn(64, generator=g).to(torch.bfloat16),
    }


def write_source(directory: pathlib.Path, seed: int = 0, *, shards: bool = True) -> pathlib.Path:
    """A tiny block-scaled FP8 checkpoint (an index over two shards, or one file)."""
    testing.write_checkpoint(
        state_dict(seed), directory, scheme="block", block_size=(64, 64),
        max_shard_size=20_000 if shards else "5GB", config=CONFIG,
    )
    return directory


def blob_name(name: str, data: bytes) -> str:
    # What the Hub names a blob: an LFS file by its sha256, any other by its git blob sha1.
    if name.endswith(".safetensors"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_snapshot(
    cache: pathlib.Path, repo_id: str, source: pathlib.Path, commit: str = COMMIT, refs: tuple[str, ...] = ("main",)
) -> pathlib.Path:
    """Put the files of directory ``source`` into ``cache`` as repo ``repo_id`` at ``commit``,
    the way huggingface_hub lays out a download; returns the snapshot directory."""
    storage = cache / huggingface_hub.file_download.repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = storage / "snapshots" / commit
    for file in sorted(source.rglob("*")):
        if not file.is_file():
            continue
        name = file.relative_to(source).as_posix()
        data = file.read_bytes()
        blob = storage / "blobs" / blob_name(name, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


def go_offline(monkeypatch: pytest.MonkeyPatch, cache: pathlib.Path) -> pathlib.Path:
    """``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` at an empty ``cache``. huggingface_hub reads both
    environment variables once, at import, into ``huggingface_hub.constants``, so those are set
    too (a fresh process reading the variables alone: ``test_the_environment_alone_...``)."""
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_with_repo(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Offline, with ``org/name`` in the cache at ``COMMIT`` (main): (cache, snapshot)."""
    cache = go_offline(monkeypatch, tmp_path / "hub-cache")
    return cache, add_snapshot(cache, "org/name", write_source(tmp_path / "src"))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    return go_offline(monkeypatch, tmp_path / "hub-cache")


@pytest.fixture
def cached(monkeypatch, tmp_path):
    return cache_with_repo(monkeypatch, tmp_path)


def test_the_cache_tree_is_laid_out_as_huggingface_hub_reads_it(cached):
    cache, snapshot = cached
    info = huggingface_hub.scan_cache_dir(cache)
    assert info.warnings == []
    (repo,) = info.repos
    assert (repo.repo_id, repo.repo_type) == ("org/name", "model")
    (rev,) = repo.revisions
    assert rev.commit_hash == COMMIT and rev.refs == frozenset({"main"})
    assert {f.file_name for f in rev.files} == {
        "config.json", "model.safetensors.index.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    }
    found = huggingface_hub.try_to_load_from_cache("org/name", "model.safetensors.index.json", cache_dir=cache)
    assert found == str(snapshot / "model.safetensors.index.json")
    assert huggingface_hub.snapshot_download("org/name", local_files_only=True) == str(snapshot)


def test_a_repo_id_reads_the_snapshot_bit_for_bit(cached):
    _, snapshot = cached
    view = LazyFP8View("org/name")
    assert view.path == "org/name" and len(view.files) == 2
    assert all(pathlib.Path(f).parent == snapshot for f in view.files)
    testing.assert_bitwise_equal(view, LazyFP8View(snapshot))
    assert view._checkpoint.hub.commit == COMMIT and view._checkpoint.hub.downloads is False


def test_a_single_file_repo(offline, tmp_path):
    add_snapshot(offline, "org/one", write_source(tmp_path / "src", shards=False))
    view = LazyFP8View("org/one")
    assert [os.path.basename(f) for f in view.files] == ["model.safetensors"]
    testing.assert_bitwise_equal(view, LazyFP8View(tmp_path / "src"))


def test_revision_is_a_ref_or_a_commit_hash(offline, tmp_path):
    add_snapshot(offline, "org/name", write_source(tmp_path / "a", seed=0), COMMIT, refs=("main",))
    add_snapshot(offline, "org/name", write_source(tmp_path / "b", seed=1), OTHER, refs=("v2",))
    first, second = LazyFP8View(tmp_path / "a"), LazyFP8View(tmp_path / "b")
    testing.assert_bitwise_equal(LazyFP8View("org/name"), first)
    testing.assert_bitwise_equal(LazyFP8View("org/name", revision="main"), first)
    testing.assert_bitwise_equal(LazyFP8View("org/name", revision="v2"), second)
    testing.assert_bitwise_equal(LazyFP8View("org/name", revision=OTHER), second)
    testing.assert_bitwise_equal(LazyFP8View("org/name", revision=COMMIT), first)


def test_a_ref_written_with_a_newline_still_names_its_commit(cached):
    cache, snapshot = cached
    (cache / "models--org--name" / "refs" / "main").write_text(COMMIT + "\n")
    assert LazyFP8View("org/name").files[0].startswith(str(snapshot))


def test_cache_dir_overrides_the_environment(offline, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    snapshot = add_snapshot(elsewhere, "org/name", write_source(tmp_path / "src"))
    with pytest.raises(RepoNotCachedError):
        LazyFP8View("org/name")  # not in HF_HUB_CACHE
    view = LazyFP8View("org/name", cache_dir=elsewhere)
    testing.assert_bitwise_equal(view, LazyFP8View(snapshot))
    assert view._checkpoint.hub.cache_dir == str(elsewhere.resolve())


def test_a_repo_that_is_not_cached_says_how_to_fetch_it(offline):
    with pytest.raises(RepoNotCachedError) as e:
        LazyFP8View("org/absent")
    msg = str(e.value)
    assert "hf download org/absent --include config.json hf_quant_config.json model.safetensors.index.json 'model*.safetensors'" in msg
    assert "HF_HUB_OFFLINE=1" in msg and str(offline) in msg and "local_files_only=False" in msg
    # What a caller already catches: a missing file.
    assert isinstance(e.value, (MissingShardError, FileNotFoundError, LazyFP8Error))
    assert (e.value.repo_id, e.value.revision, e.value.file) == ("org/absent", None, "org/absent")


def test_a_revision_that_is_not_cached_names_it_in_the_command(cached, tmp_path):
    with pytest.raises(RepoNotCachedError, match="hf download org/name --revision v9 --include config.json"):
        LazyFP8View("org/name", revision="v9")
    with pytest.raises(RepoNotCachedError, match=f"--revision {OTHER} "):
        LazyFP8View("org/name", revision=OTHER)
    with pytest.raises(RepoNotCachedError, match=f"--cache-dir {tmp_path}"):
        LazyFP8View("org/name", cache_dir=tmp_path)


def test_local_files_only_never_downloads_even_online(cached, monkeypatch):
    # HF_HUB_OFFLINE off: local_files_only alone keeps huggingface_hub off the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert len(LazyFP8View("org/name", local_files_only=True)) == 3
    with pytest.raises(RepoNotCachedError, match=r"local_files_only=True\)"):
        LazyFP8View("org/absent", local_files_only=True)


def test_a_partly_cached_snapshot_names_the_missing_shard(cached):
    _, snapshot = cached
    os.unlink(snapshot / "model-00002-of-00002.safetensors")
    with pytest.raises(RepoNotCachedError) as e:
        LazyFP8View("org/name")
    assert e.value.file == str(snapshot / "model-00002-of-00002.safetensors")
    assert f"hf download org/name --revision {COMMIT} --include model-00002-of-00002.safetensors" in str(e.value)
    # inspect reports it among its problems, with the same command.
    report = inspect_checkpoint("org/name")
    assert any(f"--revision {COMMIT} --include model-00002-of-00002.safetensors" in p for p in report.problems)


def test_a_local_directory_named_like_a_repo_id_wins(cached, tmp_path, monkeypatch):
    local = write_source(tmp_path / "work" / "org" / "name", seed=7)
    monkeypatch.chdir(tmp_path / "work")
    assert not is_repo_id("org/name")
    view = LazyFP8View("org/name")
    assert all(pathlib.Path(os.path.abspath(f)).parent == local for f in view.files)
    testing.assert_bitwise_equal(view, LazyFP8View(local))
    with pytest.raises(ValueError, match="revision= applies to a Hugging Face Hub repo id"):
        LazyFP8View("org/name", revision="main")
    with pytest.raises(ValueError, match="cache_dir= applies"):
        LazyFP8View(local, cache_dir=tmp_path)


@pytest.mark.parametrize(
    "path, is_id",
    [
        ("org/name", True),
        ("Org-1/name_2.v3", True),
        ("name", False),  # no namespace: a missing local directory, not a legacy repo
        ("org/name/extra", False),
        ("out/model.safetensors", False),
        ("out/model.safetensors.index.json", False),
        ("/org/name", False),
        ("./org/name", False),
        ("~/name", False),
        ("C:/name", False),
        ("org\\name", False),
    ],
)
def test_what_looks_like_a_repo_id(path, is_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_repo_id(path) is is_id


def test_a_pickled_view_reopens_the_same_commit_without_the_token(cached, monkeypatch, tmp_path):
    _, snapshot = cached
    view = LazyFP8View("org/name", token="hf_not_a_real_token")
    data = pickle.dumps(view)
    assert b"hf_not_a_real_token" not in data
    # The receiving process: online, another default cache, main moved on. It reads the pickled
    # commit in the pickled cache, and downloads nothing (local_files_only).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "other-cache"))
    add_snapshot(cached[0], "org/name", write_source(tmp_path / "b", seed=1), OTHER, refs=("main",))
    again = pickle.loads(data)
    assert again.path == "org/name" and again.files == view.files
    testing.assert_bitwise_equal(again, LazyFP8View(snapshot))


def test_every_entry_point_takes_a_repo_id(cached, tmp_path):
    _, snapshot = cached
    reference = LazyFP8View(snapshot)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(128, 128, bias=False, dtype=torch.bfloat16)
            self.other = torch.nn.Linear(128, 64, bias=False, dtype=torch.bfloat16)
            self.norm = torch.nn.Module()
            self.norm.weight = torch.nn.Parameter(torch.empty(64, dtype=torch.bfloat16))

    model = Model()
    lazyfp8.load_into(model, "org/name", revision=COMMIT, local_files_only=True)
    testing.assert_bitwise_equal(model.state_dict(), reference)

    report = inspect_checkpoint("org/name")
    assert report.problems == [] and len(report.files) == 2

    with lazyfp8.safe_open("org/name", revision="main") as f:
        assert sorted(f.keys()) == sorted(reference)
        testing.assert_bitwise_equal(f.get_tensor("layer.weight"), reference.get_tensor("layer.weight"))

    reader = lazyfp8.LazyFP8StorageReader("org/name", revision="main")
    testing.assert_bitwise_equal(reader.view, reference)

    # save writes from a repo id what it writes from the snapshot directory.
    lazyfp8.save(LazyFP8View("org/name"), tmp_path / "by-id")
    lazyfp8.save(reference, tmp_path / "by-path")
    testing.assert_bitwise_equal(LazyFP8View(tmp_path / "by-id"), LazyFP8View(tmp_path / "by-path"))


def test_without_huggingface_hub_the_error_says_what_to_install(offline, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails, as when absent
    with pytest.raises(RepoNotCachedError, match=r"pip install huggingface_hub \(or pip install 'lazyfp8\[cli\]'\)"):
        LazyFP8View("org/name")
    # A path that is no repo id still says only that it is missing.
    with pytest.raises(MissingShardError, match="no such file or directory") as e:
        LazyFP8View("nothing-here")
    assert not isinstance(e.value, RepoNotCachedError)


def test_the_environment_alone_sets_offline_and_the_cache(cached):
    """A fresh process with nothing but ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE``, as a user sets
    them."""
    cache, snapshot = cached
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    code = (
        "import lazyfp8, sys\n"
        "v = lazyfp8.LazyFP8View('org/name'); print(len(v), v.files[0])\n"
        "try: lazyfp8.LazyFP8View('org/absent')\n"
        "except lazyfp8.errors.RepoNotCachedError as e: print('offline:', 'HF_HUB_OFFLINE=1' in str(e))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"3 {snapshot / 'model-00001-of-00002.safetensors'}", "offline: True"]


# --- which files a download fetches ---------------------------------------------------------------
class Recorder(HubRepo):
    """The repo side of a download with what it fetches recorded: ``fetch`` is the one seam
    between choosing files (the checkpoint layer) and huggingface_hub's download, which needs the
    network and is not run here. The snapshot holds the side files, as :func:`open_repo` leaves it."""

    def __init__(self, folder: pathlib.Path, listing: set[str]):
        source = HubSource("org/name", None, COMMIT, str(folder.parent), str(folder), downloads=True)
        super().__init__(huggingface_hub, source, frozenset(listing), None, "", ())
        self.fetched: list[list[str]] = []

    def fetch(self, names):
        names = list(names)
        # The patterns huggingface_hub would get match exactly these names among the repo's files.
        allowed = huggingface_hub.utils.filter_repo_objects(self.listing, allow_patterns=[_literal(n) for n in names])
        assert sorted(allowed) == sorted(n for n in names if n in self.listing)
        self.fetched.append(names)


def test_a_download_fetches_the_index_then_only_the_shards_it_names(tmp_path):
    src = write_source(tmp_path / "src")
    folder = tmp_path / "snap"
    folder.mkdir()
    for name in ("config.json", "model.safetensors.index.json"):
        (folder / name).write_bytes((src / name).read_bytes())
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    listing = {*os.listdir(src), "pytorch_model.bin", "consolidated.safetensors", "model[1]*.safetensors", "README.md"}
    repo = Recorder(folder, listing)
    _fetch_weights(repo)
    assert repo.fetched == [["model.safetensors.index.json"], shards]


def test_a_download_prefers_model_safetensors_as_transformers_does(tmp_path):
    folder = tmp_path / "snap"
    folder.mkdir()
    repo = Recorder(folder, {"model.safetensors", "model.safetensors.index.json", "config.json"})
    _fetch_weights(repo)
    assert repo.fetched == [["model.safetensors"]]


def test_a_download_of_a_lone_file_or_of_nothing(tmp_path):
    folder = tmp_path / "snap"
    folder.mkdir()
    lone = Recorder(folder, {"weights.safetensors", "config.json"})
    _fetch_weights(lone)
    assert lone.fetched == [["weights.safetensors"]]
    # Several files and no index, or one shard of several: refused when read, so nothing fetched.
    for listing in ({"a.safetensors", "b.safetensors"}, {"model-00001-of-00002.safetensors"}):
        repo = Recorder(folder, listing)
        _fetch_weights(repo)
        assert repo.fetched == []


def test_shard_names_that_are_patterns_fetch_only_themselves(tmp_path):
    folder = tmp_path / "snap"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model[1]*.safetensors", "b": "sub/s?.safetensors"}}'
    )
    listing = {"model.safetensors.index.json", "model[1]*.safetensors", "model1x.safetensors", "sub/s?.safetensors", "sub/s1.safetensors"}
    repo = Recorder(folder, listing)
    _fetch_weights(repo)
    assert repo.fetched == [["model.safetensors.index.json"], ["model[1]*.safetensors", "sub/s?.safetensors"]]


def test_the_command_line_takes_a_repo_id_and_its_options(cached, tmp_path, capsys):
    from lazyfp8.cli import main

    _, snapshot = cached
    assert main(["inspect", "org/name"]) == 0
    assert main(["inspect", "org/name", "--revision", COMMIT, "--local-files-only"]) == 0
    assert "no problems found" in capsys.readouterr().out
    assert main(["verify", "org/name", "--revision", "main", "--against", str(snapshot), "--atol", "0"]) == 0
    assert "max abs error against" in capsys.readouterr().out
    assert main(["-q", "dequantize", "org/name", str(tmp_path / "bf16"), "--cache-dir", str(cached[0])]) == 0
    testing.assert_bitwise_equal(LazyFP8View(tmp_path / "bf16"), LazyFP8View(snapshot))
    capsys.readouterr()
    assert main(["inspect", "org/absent"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lazyfp8 inspect: error: 'org/absent' is not a local file or directory")
    assert "hf download org/absent --include config.json" in err
    assert main(["verify", "org/name", "--revision", "v9"]) == 1
    assert "hf download org/name --revision v9 --include" in capsys.readouterr().err


def write_tree_listing(cache: pathlib.Path, repo_id: str, commit: str, names: list[str]) -> None:
    """The repo's file list as huggingface_hub >= 2 keeps it after a download
    (``trees/<commit>.json``, huggingface_hub/_tree_cache.py)."""
    storage = cache / huggingface_hub.file_download.repo_folder_name(repo_id=repo_id, repo_type="model")
    (storage / "trees").mkdir(exist_ok=True)
    files = {n: {"size": 1, "blob_id": hashlib.sha1(n.encode()).hexdigest()} for n in names}
    (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": files}))


def test_a_snapshot_of_only_the_files_read_opens_beside_a_listing_of_more(cached):
    """After a download by lazyfp8 the cache knows the repo's whole file list but holds only the
    files it read: offline, that is a complete snapshot for lazyfp8 (huggingface_hub checks only
    the files asked for), and a file it read gone missing is named."""
    cache, snapshot = cached
    if not hasattr(huggingface_hub, "get_cached_repo_tree"):
        pytest.skip("huggingface_hub < 2 keeps no file list")
    names = sorted(os.listdir(snapshot))
    write_tree_listing(cache, "org/name", COMMIT, [*names, "pytorch_model.bin", "tokenizer.json"])
    testing.assert_bitwise_equal(LazyFP8View("org/name"), LazyFP8View(snapshot))
    os.unlink(snapshot / "config.json")
    with pytest.raises(RepoNotCachedError, match=r"is incomplete: 1 file\(s\) are missing \(config.json\)"):
        LazyFP8View("org/name")


def test_when_the_hub_cannot_be_reached_the_cache_is_read(cached, monkeypatch):
    """Downloads allowed but the Hub refuses the connection (an endpoint nothing listens on):
    huggingface_hub falls back to the cached snapshot, and lazyfp8 reads it; a repo not cached
    says the Hub could not be reached."""
    _, snapshot = cached
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    view = LazyFP8View("org/name")
    testing.assert_bitwise_equal(view, LazyFP8View(snapshot))
    assert view._checkpoint.hub.downloads is False
    with pytest.raises(RepoNotCachedError, match=r"(?s)nothing is downloaded \(the Hub could not be reached: .*check the connection"):
        LazyFP8View("org/absent")


def test_inspect_and_the_dcp_reader_take_repo_ids_with_hub_options(offline, tmp_path):
    """inspect_checkpoint takes the view's Hub options; the DCP reader accepts a repo id as a
    checkpoint id."""
    from lazyfp8.inspection import inspect_checkpoint

    elsewhere = tmp_path / "elsewhere"
    snapshot = add_snapshot(elsewhere, "org/name", write_source(tmp_path / "src"))
    report = inspect_checkpoint("org/name", cache_dir=elsewhere)
    assert not report.problems and report.tensors == inspect_checkpoint(snapshot).tensors
    assert lazyfp8.LazyFP8StorageReader.validate_checkpoint_id("org/name")
    assert not lazyfp8.LazyFP8StorageReader.validate_checkpoint_id("no-such-dir")
