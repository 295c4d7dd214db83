import json
import os

import pytest
import torch

from lazyfp8 import CorruptCheckpointError, MissingShardError, UnsafePathError
from lazyfp8._checkpoint import open_checkpoint
from tests.helpers import save, write_index, write_sharded

T = {"a": torch.ones(2), "b": torch.zeros(3)}


def test_single_file_path(tmp_path):
    p = save(T, str(tmp_path / "weights.safetensors"))
    ck = open_checkpoint(p)
    assert set(ck.tensors) == {"a", "b"} and ck.index_path is None


def test_directory_with_one_file(tmp_path):
    save(T, str(tmp_path / "weights.safetensors"))
    assert set(open_checkpoint(tmp_path).tensors) == {"a", "b"}


def test_sharded_directory_and_index_order(tmp_path):
    write_sharded(str(tmp_path), {"s1.safetensors": {"b": T["b"]}, "s2.safetensors": {"a": T["a"]}})
    ck = open_checkpoint(tmp_path)
    assert list(ck.tensors) == ["b", "a"]
    assert ck.tensors["a"][0].endswith("s2.safetensors")


def test_config_is_read(tmp_path):
    write_sharded(str(tmp_path), {"s.safetensors": T}, config={"model_type": "x"})
    assert open_checkpoint(tmp_path).config == {"model_type": "x"}


def test_nothing_there(tmp_path):
    with pytest.raises(MissingShardError, match="neither"):
        open_checkpoint(tmp_path)
    with pytest.raises(MissingShardError, match="no such file"):
        open_checkpoint(tmp_path / "absent")


def test_several_files_without_index(tmp_path):
    save(T, str(tmp_path / "a.safetensors"))
    save(T, str(tmp_path / "b.safetensors"))
    with pytest.raises(MissingShardError, match="no model.safetensors.index.json"):
        open_checkpoint(tmp_path)


def test_missing_shard_names_file_and_key(tmp_path):
    write_index(str(tmp_path), {"a": "gone.safetensors"})
    with pytest.raises(MissingShardError, match="'gone.safetensors'.*'a'") as e:
        open_checkpoint(tmp_path)
    assert isinstance(e.value, FileNotFoundError) and e.value.key == "a"


def test_index_names_tensor_not_in_shard(tmp_path):
    save(T, str(tmp_path / "s.safetensors"))
    write_index(str(tmp_path), {"a": "s.safetensors", "zzz": "s.safetensors"})
    with pytest.raises(CorruptCheckpointError, match="'zzz'.*does not hold it"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("body", ["{broken", "[]", '{"weight_map": []}', '{"weight_map": {"a": 3}}'])
def test_corrupt_index(tmp_path, body):
    save(T, str(tmp_path / "s.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(body)
    with pytest.raises(CorruptCheckpointError, match="model.safetensors.index.json"):
        open_checkpoint(tmp_path)


def test_index_with_duplicate_key(tmp_path):
    save(T, str(tmp_path / "s.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "s.safetensors", "a": "s.safetensors"}}'
    )
    with pytest.raises(CorruptCheckpointError, match="'a' twice"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("name", ["../outside.safetensors", "sub/../../outside.safetensors", "/etc/passwd"])
def test_index_cannot_leave_the_directory(tmp_path, name):
    ck = tmp_path / "ck"
    ck.mkdir()
    save(T, str(tmp_path / "outside.safetensors"))
    write_index(str(ck), {"a": name})
    with pytest.raises(UnsafePathError, match="refused"):
        open_checkpoint(ck)


def test_link_out_of_the_directory_is_refused(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    save(T, str(tmp_path / "outside.safetensors"))
    os.symlink(tmp_path / "outside.safetensors", ck / "s.safetensors")
    write_index(str(ck), {"a": "s.safetensors"})
    with pytest.raises(UnsafePathError, match="link that leaves"):
        open_checkpoint(ck)


def test_link_inside_the_directory_is_fine(tmp_path):
    save(T, str(tmp_path / "real.safetensors"))
    os.symlink(tmp_path / "real.safetensors", tmp_path / "s.safetensors")
    write_index(str(tmp_path), {"a": "s.safetensors"})
    assert "a" in open_checkpoint(tmp_path).tensors


def test_hugging_face_cache_snapshot_links_are_allowed(tmp_path):
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save(T, str(repo / "blobs" / "deadbeef"))
    os.symlink("../../blobs/deadbeef", snap / "model-00001-of-00001.safetensors")
    write_index(str(snap), {"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"})
    assert set(open_checkpoint(snap).tensors) == {"a", "b"}


def test_index_json_path_is_accepted(tmp_path):
    write_sharded(str(tmp_path), {"s.safetensors": T})
    ck = open_checkpoint(tmp_path / "model.safetensors.index.json")
    assert set(ck.tensors) == {"a", "b"}
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]["a"] == "s.safetensors"
