"""Find a checkpoint's files and read every header: the on-disk catalogue, no tensor data.

Accepts a directory with ``model.safetensors.index.json`` and its shards, a directory with one
``*.safetensors`` file, or the path of one file. Shard names from an index are resolved only
inside the checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Any

from ._header import ShardHeader, TensorEntry, parse_json, read_header
from .errors import (
    CheckpointError,
    CorruptCheckpointError,
    MissingShardError,
    UnsafePathError,
    raise_or_collect,
)

__all__ = ["Checkpoint", "INDEX_NAME", "open_checkpoint"]

INDEX_NAME = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")
CONFIG_NAME = "config.json"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Every tensor of a checkpoint, located.

    Attributes:
        root: the checkpoint directory.
        shards: parsed headers by absolute file path, in index order.
        tensors: on-disk key -> (shard path, entry), in index order.
        config: the parsed ``config.json`` beside the shards, or ``None``.
        index_path: the index file, or ``None`` for a single-file checkpoint.
    """

    root: str
    shards: dict[str, ShardHeader]
    tensors: dict[str, tuple[str, TensorEntry]]
    config: dict[str, Any] | None
    index_path: str | None

    def locate(self, key: str) -> tuple[str, TensorEntry] | None:
        return self.tensors.get(key)


def _load_json(path: str, what: str) -> Any:
    with open(path, "rb") as f:
        return parse_json(f.read(), path, what)


def _allowed_roots(root: str) -> list[str]:
    """Directories a shard may resolve into.

    The checkpoint directory itself, and, for a Hugging Face cache snapshot
    (``models--org--name/snapshots/<rev>/``), the repository's ``blobs/`` directory: the cache
    stores every file there and links to it, so refusing those links would refuse every cached
    model.
    """
    real = os.path.realpath(root)
    roots = [real]
    parent = os.path.dirname(root.rstrip(os.sep))
    if os.path.basename(parent) == "snapshots":
        blobs = os.path.join(os.path.dirname(parent), "blobs")
        if os.path.isdir(blobs):
            roots.append(os.path.realpath(blobs))
    return roots


def _resolve_shard(root: str, name: Any, key: str, index_path: str, roots: list[str]) -> str:
    if not isinstance(name, str) or not name:
        raise CorruptCheckpointError(
            f"{index_path}: weight_map entry for {key!r} must be a file name, found {name!r}",
            file=index_path,
            key=key,
        )
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts:
        raise UnsafePathError(
            f"{index_path}: shard {name!r} for {key!r} is not a plain name inside the checkpoint "
            "directory (absolute paths and '..' are refused)",
            file=index_path,
            key=key,
        )
    path = os.path.join(root, name)
    real = os.path.realpath(path)
    if not any(os.path.commonpath([real, r]) == r for r in roots):
        raise UnsafePathError(
            f"{index_path}: shard {name!r} for {key!r} is a link that leaves the checkpoint "
            f"directory (it points to {real}); copy the file into the directory instead",
            file=path,
            key=key,
        )
    if not os.path.isfile(path):
        raise MissingShardError(
            f"{index_path}: shard {name!r} (holding {key!r}) does not exist in {root}; "
            "the download is incomplete",
            file=path,
            key=key,
        )
    return path


def _read_index(root: str, index_path: str, problems: list[CheckpointError] | None) -> dict[str, str]:
    """weight_map, validated: on-disk key -> absolute shard path (keys of bad shards left out
    when ``problems`` collects the errors)."""
    index = _load_json(index_path, "the index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(
            f"{index_path}: expected a JSON object with a 'weight_map' object of "
            "tensor name -> shard file name",
            file=index_path,
        )
    roots = _allowed_roots(root)
    resolved: dict[str, str] = {}
    by_name: dict[str, str | None] = {}
    for key, name in weight_map.items():
        hashable = name if isinstance(name, str) else repr(name)
        if hashable not in by_name:
            try:
                by_name[hashable] = _resolve_shard(root, name, key, index_path, roots)
            except CheckpointError as e:
                raise_or_collect(problems, e)
                by_name[hashable] = None
        if by_name[hashable] is not None:
            resolved[key] = by_name[hashable]  # type: ignore[assignment]
    return resolved


def _find_files(path: str) -> tuple[str, str | None, list[str]]:
    """(root, index path or None, single file list) for any accepted form of ``path``."""
    if os.path.isfile(path):
        if path.endswith(".json"):
            return os.path.dirname(path) or ".", path, []
        return os.path.dirname(path) or ".", None, [path]
    if not os.path.isdir(path):
        raise MissingShardError(f"{path}: no such file or directory", file=path)
    index_path = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index_path):
        return path, index_path, []
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    if len(files) == 1:
        part = _SHARD_NAME.search(os.path.basename(files[0]))
        if part and int(part.group(2)) > 1:
            # An interrupted download or conversion: never read it as a whole checkpoint.
            raise MissingShardError(
                f"{path}: holds only {os.path.basename(files[0])}, shard {int(part.group(1))} of "
                f"{int(part.group(2))}, and no {INDEX_NAME}; the download or conversion is incomplete",
                file=files[0],
            )
        return path, None, files
    if not files:
        raise MissingShardError(
            f"{path}: holds neither {INDEX_NAME} nor a *.safetensors file", file=path
        )
    names = ", ".join(os.path.basename(f) for f in files[:4])
    raise MissingShardError(
        f"{path}: holds {len(files)} *.safetensors files ({names}...) but no {INDEX_NAME}; "
        "pass the path of one file, or add the index",
        file=path,
    )


def open_checkpoint(path: str | os.PathLike[str], problems: list[CheckpointError] | None = None) -> Checkpoint:
    """Locate and read every header of the checkpoint at ``path``.

    With ``problems`` given, errors confined to one shard or tensor (a missing or damaged shard,
    an index entry its shard does not hold) are appended there and that shard or tensor is left
    out, so that every problem can be reported at once.

    Raises:
        MissingShardError: nothing to read at ``path``, or the index names an absent shard.
        UnsafePathError: the index names a shard outside the directory.
        CorruptCheckpointError: a damaged index or header, or the index names a tensor its shard
            does not hold.
    """
    root, index_path, files = _find_files(os.fspath(path))
    config_path = os.path.join(root, CONFIG_NAME)
    config = _load_json(config_path, "config.json") if os.path.isfile(config_path) else None
    if config is not None and not isinstance(config, dict):
        raise CorruptCheckpointError(f"{config_path}: expected a JSON object", file=config_path)

    shards: dict[str, ShardHeader] = {}
    tensors: dict[str, tuple[str, TensorEntry]] = {}
    bad: set[str] = set()

    def header_of(shard: str) -> ShardHeader | None:
        if shard not in shards and shard not in bad:
            try:
                shards[shard] = read_header(shard)
            except CheckpointError as e:
                raise_or_collect(problems, e)
                bad.add(shard)
        return shards.get(shard)

    if index_path is None:
        header = header_of(files[0])
        if header is not None:
            tensors = {k: (files[0], e) for k, e in header.tensors.items()}
    else:
        try:
            weight_map = _read_index(root, index_path, problems)
        except CheckpointError as e:
            raise_or_collect(problems, e)
            weight_map = {}
        for key, shard in weight_map.items():
            header = header_of(shard)
            if header is None:
                continue
            entry = header.tensors.get(key)
            if entry is None:
                raise_or_collect(problems, CorruptCheckpointError(
                    f"{index_path}: names {key!r} in {os.path.basename(shard)}, "
                    "but that shard does not hold it",
                    file=shard,
                    key=key,
                ))
                continue
            tensors[key] = (shard, entry)
    return Checkpoint(
        root=root, shards=shards, tensors=tensors, config=config, index_path=index_path
    )
