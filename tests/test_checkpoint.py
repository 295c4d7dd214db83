import json
import os

import pytest
import torch

from lazyfp8 import CheckpointError, CorruptCheckpointError, LazyFP8Error, MissingShardError, UnsafePathError
from lazyfp8.inspection import inspect_checkpoint
from lazyfp8.storage.checkpoint import INDEX_NAME, SINGLE_NAME, open_checkpoint
from tests import helpers
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


# --- special files, odd names, and which files a directory means --------------------------

@pytest.fixture
def deadline():
    """Fail instead of hanging: a FIFO opened blocking waits forever for a writer."""
    with helpers.deadline(10, "blocked on a special file"):
        yield


@pytest.mark.parametrize("where", ["shard", SINGLE_NAME, INDEX_NAME, "config.json"])
def test_a_fifo_where_a_file_should_be_is_refused_not_waited_on(tmp_path, deadline, where):
    if where == "shard":
        write_index(str(tmp_path), {"a": "s.safetensors"})
        fifo = tmp_path / "s.safetensors"
    else:
        save(T, str(tmp_path / "s.safetensors"))
        if where == INDEX_NAME:
            (tmp_path / "s.safetensors").rename(tmp_path / "s1.safetensors")
        fifo = tmp_path / where
    os.mkfifo(fifo)
    with pytest.raises(UnsafePathError, match=rf"{fifo.name}.*not a regular file") as e:
        open_checkpoint(tmp_path)
    assert e.value.file == str(fifo)


def test_a_fifo_passed_as_the_path_is_refused(tmp_path, deadline):
    os.mkfifo(tmp_path / "w.safetensors")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        open_checkpoint(tmp_path / "w.safetensors")


@pytest.mark.parametrize("name", ["s\x00.safetensors", "\ud800.safetensors"])
def test_a_shard_name_no_file_system_can_hold_is_refused(tmp_path, name):
    # Was: ValueError("embedded null byte") / UnicodeEncodeError from deep inside os.
    save(T, str(tmp_path / "s.safetensors"))
    write_index(str(tmp_path), {"a": name})
    with pytest.raises(UnsafePathError, match=r"model\.safetensors\.index\.json.*'a'") as e:
        open_checkpoint(tmp_path)
    assert e.value.file.endswith(INDEX_NAME) and e.value.key == "a"


@pytest.mark.parametrize("value", [None, True, 3.5, ["s.safetensors"], {"f": "s.safetensors"}, ""])
def test_weight_map_values_of_other_types(tmp_path, value):
    save(T, str(tmp_path / "s.safetensors"))
    write_index(str(tmp_path), {"a": value})
    with pytest.raises(CorruptCheckpointError, match="weight_map entry for 'a' must be a file name") as e:
        open_checkpoint(tmp_path)
    assert e.value.key == "a"


def test_an_empty_weight_map_beside_shards_is_refused(tmp_path):
    # Was: 0 tensors, and inspect found nothing wrong.
    write_sharded(str(tmp_path), {"model-00001-of-00001.safetensors": T})
    write_index(str(tmp_path), {})
    with pytest.raises(CorruptCheckpointError, match="weight_map is empty, but the directory holds 1"):
        open_checkpoint(tmp_path)
    report = inspect_checkpoint(tmp_path)
    assert any("weight_map is empty" in p for p in report.problems)


def _both(tmp_path):
    save({"single": torch.ones(2)}, str(tmp_path / SINGLE_NAME))
    write_sharded(str(tmp_path), {"s.safetensors": T})
    return tmp_path


def test_model_safetensors_wins_over_the_index_as_in_transformers(tmp_path):
    _both(tmp_path)
    ck = open_checkpoint(tmp_path)
    assert set(ck.tensors) == {"single"} and ck.index_path is None
    report = inspect_checkpoint(tmp_path)
    assert any("holds both model.safetensors and model.safetensors.index.json" in p for p in report.problems)


def test_the_same_files_as_transformers(tmp_path):
    modeling_utils = pytest.importorskip("transformers.modeling_utils")
    resolve = getattr(modeling_utils, "_get_resolved_checkpoint_files", None)
    if resolve is None:
        pytest.skip("transformers moved its checkpoint resolution")
    _both(tmp_path)
    (tmp_path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": {"a": "s.safetensors", "b": "s.safetensors"}}))
    theirs, _ = resolve(str(tmp_path), None, None, None, {}, False)
    assert [os.path.basename(f) for f in theirs] == [SINGLE_NAME]
    assert set(open_checkpoint(tmp_path).tensors) == {"single"}
    # config.json's transformers_weights names the file outright
    theirs, _ = resolve(str(tmp_path), None, None, None, {}, False, transformers_explicit_filename=INDEX_NAME)
    (tmp_path / "config.json").write_text(json.dumps({"transformers_weights": INDEX_NAME}))
    assert {os.path.basename(f) for f in theirs} == {"s.safetensors"}
    assert set(open_checkpoint(tmp_path).tensors) == {"a", "b"}
    assert inspect_checkpoint(tmp_path).problems == []


@pytest.mark.parametrize("value", [3, "weights.bin", "../x.safetensors", "/abs.safetensors"])
def test_a_bad_transformers_weights_is_refused(tmp_path, value):
    write_sharded(str(tmp_path), {"s.safetensors": T}, config={"transformers_weights": value})
    with pytest.raises(CheckpointError, match=r"config\.json: transformers_weights") as e:
        open_checkpoint(tmp_path)
    assert e.value.key == "transformers_weights"


@pytest.mark.parametrize("body", ["[1, 2]", "3", '"x"', "null", "{broken", "\xff"])
def test_a_damaged_config_is_refused_by_the_reader_and_reported_by_inspect(tmp_path, body):
    write_sharded(str(tmp_path), {"s.safetensors": T})
    (tmp_path / "config.json").write_bytes(body.encode("latin-1"))
    with pytest.raises(CorruptCheckpointError, match=r"config\.json"):
        open_checkpoint(tmp_path)
    report = inspect_checkpoint(tmp_path)  # was: raised, though only a missing checkpoint may
    assert report.tensors == 2 and report.files[0]["name"] == "s.safetensors"
    assert len(report.problems) == 1 and "config.json" in report.problems[0]


def test_a_shard_name_differing_in_case_or_normalisation_gets_a_hint(tmp_path):
    import unicodedata

    nfd = unicodedata.normalize("NFD", "café.safetensors")
    save(T, str(tmp_path / nfd))
    write_index(str(tmp_path), {"a": unicodedata.normalize("NFC", "Café.safetensors")})
    with pytest.raises(MissingShardError, match="differs only in case or Unicode normalisation"):
        open_checkpoint(tmp_path)


def test_every_open_failure_is_a_lazyfp8_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files without read permission")
    write_sharded(str(tmp_path), {"s.safetensors": T})
    os.chmod(tmp_path / "s.safetensors", 0)
    with pytest.raises(LazyFP8Error, match=r"s\.safetensors: cannot open shard"):
        open_checkpoint(tmp_path)
